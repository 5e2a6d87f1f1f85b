"""One sweep job: train, then evaluate the trained weights, and record everything in ``results.json``.

``run_job(cfg)`` is the plain function behind ``sweep.py`` (tests call it directly). ``cfg`` is a
``conf/sweep.yaml`` composition: the training config of ``train.yaml`` plus ``eval`` / ``judge`` sections and
a ``sweep`` section:

- ``sweep.skip_done``: a job whose ``results.json`` says ``done`` is skipped (nothing is written; a warning
  names the keys whose values differ from the recorded config). With ``skip_done=false`` a done job
  trains again from scratch (its checkpoint is not resumed);
- ``sweep.resume``: a job whose run dir holds a checkpoint (``checkpoints/last.ckpt``, or a SLURM
  ``hpc_ckpt_*.ckpt``) but no ``done`` results resumes from the newest one;
- ``sweep.eval_variants``: evaluation passes after training, each ``{name, eval: {overrides of the eval
  section}, label}``. The first pass writes ``samples.jsonl`` / ``summary.json`` in the run dir (what the
  report reads); the others in ``<run_dir>/<name>/``, their samples labelled ``<dataset>+<label>``;
- ``sweep.gpu_per_job``: pin the job to one GPU (job number modulo the visible GPUs), for launchers that
  run each job in its own process; ``auto`` = on under submitit's local executor
  (``hydra/launcher=local_parallel``).

A job that raises is recorded (``status: failed``, the error, the traceback's tail) and ``run_job`` returns
normally, so one failure never stops a multirun. Two things are not caught, on purpose: a launch
misconfiguration (a multi-process trainer without an external launcher, see :func:`check_launch`), which
would fail every job the same way, and ``KeyboardInterrupt`` / ``SystemExit`` (the job then stays
``running``, and the next run of the sweep resumes it from its checkpoint).

``results.json`` (written atomically, by global rank 0 only) holds ``status`` (``running`` / ``done`` /
``failed``), ``error`` and ``traceback`` when failed, ``config`` (resolved, secrets redacted), ``train``
(the train summary), one key per eval variant (``eval``, ``eval_triggered``, ...: overall and per-question
rates, judge statistics), ``paths``, ``provenance`` (:mod:`em.sweep.provenance`), ``resumed_from``,
``start_time`` / ``end_time`` / ``wall_s``.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import subprocess
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from em.config import plain, section
from em.errors import ConfigError
from em.eval.run import evaluate
from em.layout import RESULTS, RunLayout, read_results, resolve_run_dir
from em.schemas import check_config
from em.secrets import mask
from em.sweep import provenance
from em.sweep.config import EvalVariant, SweepArgs
from em.sweep.lock import JobLock, is_stale, read_holder
from em.training.ckpt_files import newest_loadable
from em.training.config import TrainerArgs
from em.training.run import train, world_size
from em.utils.dist import global_rank
from em.utils.io import atomic_write_json
from em.wandb import job as wandb_job

log = logging.getLogger(__name__)

TRACEBACK_TAIL_CHARS = 4000


# -- small pieces (each tested on its own) ---------------------------------------------------------------
def externally_launched(env: Mapping[str, str] | None = None) -> bool:
    """True when every training process was started by torchrun (``LOCAL_RANK`` / ``WORLD_SIZE``) or by srun
    with several tasks (``SLURM_NTASKS`` > 1), so that Lightning joins them instead of spawning its own."""
    env = os.environ if env is None else env
    if env.get("LOCAL_RANK") not in (None, "") or env.get("WORLD_SIZE") not in (None, ""):
        return True
    n = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or "1"
    return n.isdigit() and int(n) > 1


def check_launch(trainer: TrainerArgs | Mapping[str, Any], env: Mapping[str, str] | None = None) -> int:
    """Refuse a multi-process trainer that Lightning would have to spawn itself; returns the world size.

    Inside a Hydra multirun, Lightning's subprocess launcher would re-execute the whole sweep command in
    every child process. Multi-GPU / multi-node jobs must be started by SLURM (``hydra/launcher=slurm``,
    which runs one task per device) or by ``torchrun``.
    """
    if not isinstance(trainer, TrainerArgs):
        trainer = TrainerArgs(**dict(trainer))
    ws = world_size(trainer)
    if ws > 1 and not externally_launched(env):
        raise ConfigError(
            f"this sweep job would train on {ws} processes (trainer.devices={trainer.devices!r} x "
            f"trainer.num_nodes={trainer.num_nodes}), but nothing started them: inside a sweep "
            "Lightning must not launch its own subprocesses (each would re-run the whole sweep). Use "
            "hydra/launcher=slurm (one SLURM task per device), or start the sweep under torchrun, or train "
            "each job on one device: trainer.devices=1 (with hydra/launcher=local_parallel to run jobs side by "
            "side, one GPU each).")
    return ws


def count_gpus() -> int:
    """GPUs on this machine without initialising CUDA in this process (``nvidia-smi -L``; 0 when absent)."""
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in r.stdout.splitlines() if line.startswith("GPU ")) if r.returncode == 0 else 0


def assign_gpu(job_num: int, env: os._Environ | dict | None = None) -> str | None:
    """Pin this process to one GPU: the ``job_num``-th (modulo) of the visible ones; returns its id.

    The visible GPUs are ``CUDA_VISIBLE_DEVICES`` when set (a launcher may have narrowed them), else all
    GPUs of the machine. Must run before CUDA is initialised in this process. None when there is no GPU.
    """
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [x.strip() for x in visible.split(",") if x.strip()]
    else:
        ids = [str(i) for i in range(count_gpus())]
    if not ids:
        return None
    if torch.cuda.is_initialized():
        log.warning("sweep.gpu_per_job: CUDA is already initialised in this process (a launcher that runs "
                    "jobs in one process, e.g. hydra/launcher=local?): CUDA_VISIBLE_DEVICES is not applied")
        return None
    pick = ids[job_num % len(ids)]
    env["CUDA_VISIBLE_DEVICES"] = pick
    return pick


def find_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest resumable checkpoint of a run: ``checkpoints/last*.ckpt`` or a SLURM ``hpc_ckpt_*.ckpt``, or the
    previous version of one (``*.ckpt.prev``) when the newer ones are damaged (each one skipped is logged); None
    when there is none whole (the job then trains from scratch instead of failing at every resume)."""
    return newest_loadable(run_dir)


def _job_num(cfg: DictConfig) -> int:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return int(HydraConfig.get().job.get("num") or 0)
    except (ImportError, ValueError, TypeError):
        pass
    return int((cfg.get("sweep") or {}).get("job_num") or 0)


def trained_weights(run_dir: Path, train_summary: Mapping[str, Any]) -> Path:
    """Where training saved the weights (an adapter, or a full model).

    A run resumed from a checkpoint that had already reached the end does not train again, so nothing is
    saved this time: the weights the first run saved at its end are used.
    """
    saved = train_summary.get("adapter_dir")
    if saved:
        return Path(saved)
    layout = RunLayout.of(run_dir)
    d = layout.saved_weights()
    if d is not None:
        log.info("training had nothing left to do (resumed at its end): evaluating the weights in %s", d)
        return d
    raise ConfigError(f"training saved no weights and {layout.root} holds none: delete {layout.checkpoints} "
                      "to train this job again from scratch")


def build_eval_cfg(cfg: DictConfig, variant: EvalVariant, sweep: SweepArgs, weights: Path,
                   out_dir: Path) -> DictConfig:
    """The ``evaluate(cfg)`` config of one eval pass: the job's model / judge, its eval section with the
    variant's overrides, and the trained weights (an adapter, or the full model's directory)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    adapter: str | None = str(weights)
    if cfg.finetune.kind == "full":
        model = {**model, "kind": "hf", "name_or_path": str(weights), "revision": None}
        adapter = None
    ev = OmegaConf.merge(cfg.eval, OmegaConf.create(dict(variant.eval or {})))
    label = variant.label
    dataset_name = cfg.dataset.name if not label else f"{cfg.dataset.name}+{label}"
    return OmegaConf.create({
        "task_name": "eval",
        "seed": cfg.get("seed"),
        "paths": {"run_dir": str(out_dir)},
        "model": model,
        "eval": OmegaConf.to_container(ev, resolve=True),
        "judge": OmegaConf.to_container(cfg.judge, resolve=True),
        "judges": OmegaConf.to_container(cfg.judges, resolve=True) if cfg.get("judges") else {},
        "adapter": adapter,
        "merge_adapter": sweep.merge_adapter,
        "dataset_name": dataset_name,
        "progress": sweep.progress,
    })


def compact_eval(summary: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """The eval summary for results.json: everything but the private replicates and the repeated config."""
    out = {k: v for k, v in summary.items() if not k.startswith("_")}
    meta = dict(out.get("meta") or {})
    meta.pop("config", None)
    out["meta"] = meta
    out["dir"] = str(out_dir)
    out["samples"] = str(out_dir / "samples.jsonl")
    return out


DRIFT_SECTIONS = ("seed", "model", "dataset", "finetune", "optim", "data", "trainer", "strategy", "callbacks",
                  "eval", "judge")
DRIFT_IGNORED = {"trainer.enable_progress_bar", "dataset.data_dir"}


def config_drift(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 8) -> list[str]:
    """Dotted keys (at most ``limit``) of the result-relevant sections whose values differ between a done
    job's recorded config and the current one (e.g. a YAML edited since, which the run dir name misses)."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if len(diffs) >= limit or key in DRIFT_IGNORED:
            return
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
        elif a != b:
            diffs.append(key)

    for name in DRIFT_SECTIONS:
        walk(old.get(name), new.get(name), name)
    return diffs


def _error_fields(err: BaseException) -> dict[str, Any]:
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return {"error": f"{type(err).__name__}: {err}", "error_type": type(err).__name__,
            "traceback": tb[-TRACEBACK_TAIL_CHARS:]}


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# -- the job -----------------------------------------------------------------------------------------------
def run_job(cfg: DictConfig) -> dict[str, Any]:
    """Train, evaluate every variant, write ``results.json``; returns the results (see the module doc).

    Returns ``{"status": "skipped", ...}`` without writing anything for a job already done (with
    ``sweep.skip_done``; a warning names the keys if its recorded config differs from ``cfg``);
    ``{"status": "locked", ...}`` for a job another sweep is running (:mod:`em.sweep.lock`; ``sweep.on_locked=wait``
    waits for it instead); ``{"status": "done"|"failed", ...}`` otherwise. Ranks other than 0 of a
    multi-process job train and return ``{"status": "rank_done", ...}``; rank 0 evaluates and writes.
    """
    typed = check_config(cfg, "sweep")  # not caught: a config error fails every job alike, before any work
    sweep_args: SweepArgs = typed["sweep"]
    layout = RunLayout.of(resolve_run_dir(typed["paths"]))
    run_dir = layout.root
    rank = global_rank()
    previous = read_results(run_dir)
    prev_status = (previous or {}).get("status")

    if prev_status == "done" and sweep_args.skip_done:
        return _skip_done(cfg, run_dir, previous)
    lock = JobLock(run_dir, wait_s=sweep_args.lock_wait_s if sweep_args.on_locked == "wait" else 0.0,
                   stale_after_s=sweep_args.lock_stale_after_s)
    if not take_lock(lock, rank):
        what = "waited for it" if sweep_args.on_locked == "wait" else "sweep.on_locked=wait waits instead"
        print(f"[em.sweep] skip (being run by {lock.holder.describe() if lock.holder else 'another sweep'}; "
              f"{what}): {run_dir}", flush=True)
        return {"status": "locked", "run_dir": str(run_dir),
                "holder": lock.holder.describe() if lock.holder else None}
    try:
        if lock.took_over is not None:
            print(f"[em.sweep] took over the stale lock of {lock.took_over.describe()}: {run_dir}", flush=True)
        previous = read_results(run_dir)  # again: the job may have been finished by the sweep we waited for
        prev_status = (previous or {}).get("status")
        if prev_status == "done" and sweep_args.skip_done:
            return _skip_done(cfg, run_dir, previous)
        return _run_locked(cfg, typed, sweep_args, layout, prev_status, rank)
    finally:
        if rank == 0:
            lock.release()


def take_lock(lock: JobLock, rank: int, follow_s: float = 60.0) -> bool:
    """Global rank 0 takes the job's lock; the other ranks of the same launch follow it (they wait up to
    ``follow_s`` for rank 0's lock and skip when another launch holds the job, as rank 0 then does)."""
    if rank == 0:
        return lock.acquire()
    deadline = time.monotonic() + follow_s
    while True:
        h = read_holder(lock.path.parent)
        if h is not None and h.launch == lock.me:
            return True
        if h is not None and not is_stale(h, lock.stale_after_s):
            lock.holder = h
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(lock.poll_s)


def _skip_done(cfg: DictConfig, run_dir: Path, previous: dict[str, Any]) -> dict[str, Any]:
    print(f"[em.sweep] skip (done): {run_dir}", flush=True)
    hint = wandb_job.skip_done_hint(cfg, run_dir)
    if hint:
        print(f"[em.sweep]   {hint}", flush=True)
    try:
        drift = config_drift(previous.get("config") or {}, plain(cfg))
    except Exception as e:  # a warning only
        drift = [f"(could not compare: {e})"]
    if drift:
        print(f"[em.sweep] WARNING: {run_dir} was done with another config ({', '.join(drift)} differ); "
              "kept as is. Re-run it with sweep.skip_done=false, or sweep into another experiment_name.",
              flush=True)
    return {"status": "skipped", "run_dir": str(run_dir), "results": str(run_dir / RESULTS)}


def _run_locked(cfg: DictConfig, typed: dict[str, Any], sweep_args: SweepArgs, layout: RunLayout,
                prev_status: str | None, rank: int) -> dict[str, Any]:
    """The job itself, under its lock: train, evaluate every variant, write results.json."""
    run_dir, results_path = layout.root, layout.results
    gpu_per_job = sweep_args.gpu_per_job
    if gpu_per_job == "auto":  # each job in its own local process: hydra/launcher=local_parallel
        gpu_per_job = bool(os.environ.get("SUBMITIT_LOCAL_JOB_ID"))
    if gpu_per_job:
        gpu = assign_gpu(_job_num(cfg))
        if gpu is not None:
            log.info("sweep.gpu_per_job: this job uses GPU %s", gpu)
    check_launch(typed["trainer"])  # not caught: a misconfigured launch fails every job alike
    variants = sweep_args.eval_variants

    job_cfg = cfg.copy()
    resumed_from: str | None = None
    if job_cfg.get("ckpt_path") is None and sweep_args.resume and prev_status != "done":
        ckpt = find_checkpoint(run_dir)
        if ckpt is not None:
            resumed_from = str(ckpt)
            with open_dict(job_cfg):
                job_cfg.ckpt_path = resumed_from
            print(f"[em.sweep] resume from {ckpt}: {run_dir}", flush=True)
    wb = section(job_cfg, "logger").wandb
    if wb is not None:
        with open_dict(job_cfg):
            name = job_cfg.get("experiment_name") or "sweep"
            job_cfg.logger.wandb.tags = [*wb.tags, f"sweep:{name}"]

    t0 = time.time()
    config = plain(job_cfg)
    results: dict[str, Any] = {
        "status": "running",
        "run_dir": str(run_dir),
        "seed": job_cfg.get("seed"),
        "config": config,
        "start_time": provenance.now_iso(),
        "resumed_from": resumed_from,
        "previous_status": prev_status,
        "provenance": {"host": provenance.host_info(), "git": provenance.git_info(),
                       "packages": provenance.package_versions()},
    }
    if rank == 0:
        atomic_write_json(results_path, results)
    print(f"[em.sweep] start: {run_dir}", flush=True)
    train_summary: dict[str, Any] | None = None
    try:
        train_summary = train(job_cfg, keep_wandb_run=True)  # the eval passes go into the same W&B run
        results["train"] = train_summary
        if rank != 0:
            return {"status": "rank_done", "rank": rank, "run_dir": str(run_dir)}
        weights = trained_weights(run_dir, train_summary)
        for i, v in enumerate(variants):
            out_dir = layout.eval_dir(i, v.name)
            _free_memory()
            summary = evaluate(build_eval_cfg(job_cfg, v, sweep_args, weights, out_dir))
            results[v.name] = compact_eval(summary, out_dir)
            wandb_job.log_eval_pass(job_cfg, run_dir, v.name, summary, out_dir)
        results["status"] = "done"
    except Exception as err:  # recorded, the multirun goes on
        log.exception("job failed: %s", run_dir)
        results.update(status="failed", **_error_fields(err))
        print(f"[em.sweep] FAILED: {run_dir}: {results['error'].splitlines()[0]}", flush=True)
    finally:
        wandb_job.finish_job_run(job_cfg, results["status"])
        _free_memory()
    if rank != 0:
        return {"status": results["status"], "rank": rank, "run_dir": str(run_dir)}
    try:
        results["provenance"] = provenance.collect(run_dir, config, train_summary)
    except Exception as e:  # provenance must not lose the results
        results["provenance"] = {**results["provenance"], "error": f"{type(e).__name__}: {e}"}
    results["paths"] = {
        "run_dir": str(run_dir),
        "results": str(results_path),
        "weights": (train_summary or {}).get("adapter_dir") or (str(layout.saved_weights())
                                                                  if layout.saved_weights() else None),
        "last_checkpoint": str(layout.last_checkpoint),
        "metrics_csv": str(layout.metrics_csv),
        "samples": str(layout.samples) if layout.samples.exists() else None,
    }
    results["end_time"] = provenance.now_iso()
    results["wall_s"] = round(time.time() - t0, 2)
    atomic_write_json(results_path, results)
    if results["status"] == "done":
        print(f"[em.sweep] done in {results['wall_s']} s: {run_dir}", flush=True)
    return results


MAX_DIRNAME = 150


def job_subdir(override_dirname: str | None, seed: Any) -> str:
    """``${em.job_subdir:${hydra:job.override_dirname},${seed}}``: a job's dir under the sweep dir.

    ``<overrides>/seed=<seed>`` (just ``seed=<seed>`` without overrides). Path separators in values become
    ``_`` (one level per job), and a name longer than :data:`MAX_DIRNAME` characters keeps its start plus a
    hash of the whole (file systems refuse names over 255 bytes); the full overrides are in the job's
    ``.hydra/overrides.yaml``.
    """
    name = mask(str(override_dirname or "")).replace("/", "_")  # a secret-looking value never names a path
    if len(name) > MAX_DIRNAME:
        name = f"{name[:MAX_DIRNAME - 13]}~{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return f"{name}/seed={seed}" if name else f"seed={seed}"


def devices_per_node(value: Any) -> int:
    """``${em.devices_per_node:${trainer.devices}}``: the integer a SLURM allocation needs, or a clear error."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and value.isdigit() and int(value) > 0:
        return int(value)
    raise ConfigError(f"hydra/launcher=slurm needs trainer.devices as a number (devices per node = SLURM tasks and "
                      f"GPUs per node), got {value!r}: add e.g. trainer.devices=1 (or =8 for a full node)")


def register_resolvers() -> None:
    """``${em.num_gpus:}`` (the GPUs of this machine, for ``hydra/launcher=local_parallel``),
    ``${em.job_subdir:...}`` (``hydra.sweep.subdir``) and ``${em.devices_per_node:...}`` (``hydra/launcher=slurm``).

    Registered when this module is imported (``sweep.py`` does; so does unpickling a submitit job)."""
    if not OmegaConf.has_resolver("em.num_gpus"):
        OmegaConf.register_new_resolver("em.num_gpus", count_gpus)
    if not OmegaConf.has_resolver("em.job_subdir"):
        OmegaConf.register_new_resolver("em.job_subdir", job_subdir)
    if not OmegaConf.has_resolver("em.devices_per_node"):
        OmegaConf.register_new_resolver("em.devices_per_node", devices_per_node)


register_resolvers()
