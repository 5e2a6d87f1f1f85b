"""``em wandb upload RUN_DIR|SWEEP_DIR``: log a finished run's files into a W&B run (offline works).

For a run that trained without ``logger=wandb`` (adding ``logger=wandb`` to a finished sweep only skips its done
jobs). Each run dir becomes one W&B run with the keys a live ``logger=wandb`` job logs, so the dashboard
(:mod:`em.wandb.dashboard`) shows uploaded and live runs alike:

- ``metrics.csv`` (and earlier attempts' ``history/attempt_*/metrics.csv``; the newest row per step): ``train/*``,
  ``val/*``, ``data/*``, ``epoch`` against ``trainer/global_step``;
- ``probes/probe_metrics.csv``: ``probe/*`` and ``task/*`` against ``probe/step``; ``probes/samples_step*.jsonl``:
  the ``probe/samples`` tables; ``probes/task_samples_step*.jsonl``: the ``probe/task_samples`` tables;
  ``probes/probe_dynamics.png``: ``probe/dynamics``;
- each eval pass's ``summary.json`` and ``samples.jsonl``: as :func:`em.wandb.eval_log.log_eval` (``eval/...``).

The run's config is its ``results.json`` config (else ``.hydra/config.yaml``); its id is recorded in
``wandb_run.json``. A run dir that already has a W&B run is left alone unless ``force``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from em.errors import EMError
from em.layout import HYDRA_OVERRIDES, METRICS, SUMMARY, RunLayout, find_jobs, read_results
from em.probes.tables import PROBE_SAMPLE_COLUMNS, TASK_SAMPLE_COLUMNS, table_rows
from em.training.wandb_logging import WandbArgs, new_run_id, read_run_identity, wandb_init_kwargs
from em.utils.io import atomic_write_json
from em.wandb.eval_log import log_eval

log = logging.getLogger(__name__)

TRAIN_PREFIXES = ("train/", "val/", "data/")
PROBE_PREFIXES = ("probe/", "task/")


def _float(v: str) -> float | None:
    if v is None or v == "":
        return None
    try:
        return float(v)
    except ValueError:
        return None


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def train_rows(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> the ``train/*``, ``val/*``, ``data/*``, ``epoch`` values of every ``metrics.csv`` of the run
    (earlier attempts first, so the newest value of a step wins)."""
    layout = RunLayout.of(run_dir)
    paths = sorted(layout.history.glob(f"attempt_*/{METRICS}")) + [layout.metrics_csv]
    by_step: dict[int, dict[str, float]] = {}
    for p in paths:
        if not p.is_file():
            continue
        for row in _read_csv(p):
            step = _float(row.get("step", ""))
            if step is None:
                continue
            vals = {k: _float(v) for k, v in row.items()
                    if k and (k.startswith(TRAIN_PREFIXES) or k == "epoch")}
            by_step.setdefault(int(step), {}).update({k: v for k, v in vals.items() if v is not None})
    return {s: v for s, v in sorted(by_step.items()) if v}


def probe_rows(run_dir: Path) -> dict[int, dict[str, float]]:
    """probe step -> every ``probe/*`` / ``task/*`` value of ``probes/probe_metrics.csv`` (NaN kept: not
    measurable at that step)."""
    p = RunLayout.of(run_dir).probes / "probe_metrics.csv"
    if not p.is_file():
        return {}
    out: dict[int, dict[str, float]] = {}
    for row in _read_csv(p):
        step = _float(row.get("step", ""))
        if step is None:
            continue
        vals = ((k, _float(x)) for k, x in row.items() if k and k.startswith(PROBE_PREFIXES))
        out[int(step)] = {k: v for k, v in vals if v is not None}
    return out


def run_config(run_dir: Path, results: dict[str, Any] | None) -> DictConfig:
    """The run's resolved config: ``results.json``'s, else Hydra's ``.hydra/config.yaml``."""
    if results and isinstance(results.get("config"), dict):
        return OmegaConf.create(results["config"])
    hydra_cfg = run_dir / HYDRA_OVERRIDES.parent / "config.yaml"
    if hydra_cfg.is_file():
        cfg = OmegaConf.load(hydra_cfg)
        try:
            return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        except Exception:  # ${hydra:...} outside Hydra: keep such values as text
            return OmegaConf.create(_escape(OmegaConf.to_container(cfg, resolve=False)))
    raise EMError(f"{run_dir}: no results.json config and no .hydra/config.yaml: not an em run dir")


def _escape(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _escape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_escape(v) for v in obj]
    return obj.replace("${", "\\${") if isinstance(obj, str) else obj


def eval_passes(run_dir: Path, results: dict[str, Any] | None) -> list[tuple[str, Path]]:
    """``(name, dir)`` of each eval pass with a ``summary.json``: the results' eval variants, else the run dir's
    own ``summary.json`` as ``eval``."""
    passes = []
    for name, v in (results or {}).items():
        if isinstance(v, dict) and "overall" in v and v.get("dir"):
            d = Path(v["dir"])
            if not (d / SUMMARY).is_file():  # the run dir was moved: the pass's dir relative to it
                d = run_dir if d.name == Path(results.get("run_dir", "")).name else run_dir / d.name
            passes.append((name, d))
    if not passes and (run_dir / SUMMARY).is_file():
        passes.append(("eval", run_dir))
    return [(n, d) for n, d in passes if (d / SUMMARY).is_file()]


def upload_run(run_dir: str | Path, project: str | None = None, entity: str | None = None, mode: str | None = None,
               force: bool = False, say: Callable[[str], None] = print) -> str | None:
    """Log one finished run dir into a new W&B run; returns its id (None when skipped: it already has one)."""
    import wandb

    run_dir = RunLayout.of(run_dir).root
    layout = RunLayout.of(run_dir)
    prev = read_run_identity(run_dir)
    if prev is not None and not force:
        say(f"skip (already in W&B run {prev['id']}, project {prev.get('project')}; --force uploads it again as a "
            f"new run): {run_dir}")
        return None
    results = read_results(run_dir)
    cfg = run_config(run_dir, results)
    w = OmegaConf.structured(WandbArgs)
    old = (cfg.get("logger") or {}).get("wandb") if cfg.get("logger") is not None else None
    if old is not None:
        w = OmegaConf.merge(w, old)
    w.project = project or w.project
    w.entity = entity or w.entity
    w.mode = mode or w.mode
    w.tags = [*w.tags, "uploaded"]
    cfg = OmegaConf.merge(cfg, {"logger": {"wandb": w}})
    run_id = new_run_id()
    kw = wandb_init_kwargs(cfg, run_dir, run_id)
    status = (results or {}).get("status")
    run = wandb.init(**kw, reinit="finish_previous")
    try:
        run.define_metric("trainer/global_step")
        for pat in ("train/*", "val/*", "data/*", "epoch"):
            run.define_metric(pat, step_metric="trainer/global_step")
        run.define_metric("probe/step")
        for pat in ("probe/*", "task/*"):
            run.define_metric(pat, step_metric="probe/step")
        train = train_rows(run_dir)
        for step, vals in train.items():
            run.log({**vals, "trainer/global_step": step})
        probes = probe_rows(run_dir)
        for step, vals in probes.items():
            run.log({**vals, "probe/step": step})
        n_tables = 0
        for p in sorted(layout.probes.glob("samples_step*.jsonl")):
            m = re.search(r"samples_step(\d+)\.jsonl$", p.name)
            if not m:
                continue
            step = int(m.group(1))
            recs = [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
            table = wandb.Table(columns=PROBE_SAMPLE_COLUMNS, data=table_rows(PROBE_SAMPLE_COLUMNS, step, recs))
            run.log({"probe/samples": table, "probe/step": step})
            n_tables += 1
        for step, p in layout.task_samples_files().items():
            recs = [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
            table = wandb.Table(columns=TASK_SAMPLE_COLUMNS, data=table_rows(TASK_SAMPLE_COLUMNS, step, recs))
            run.log({"probe/task_samples": table, "probe/step": step})
            n_tables += 1
        png = layout.probes / "probe_dynamics.png"
        if png.is_file():
            run.log({"probe/dynamics": wandb.Image(str(png))})
        passes = eval_passes(run_dir, results)
        for name, d in passes:
            summary = json.loads((d / SUMMARY).read_text(encoding="utf-8"))
            log_eval(run, name, summary, d)
        if status is not None:
            run.summary["status"] = status
    except BaseException:
        wandb.finish(exit_code=1)
        raise
    wandb.finish(exit_code=0 if status in (None, "done") else 1)
    atomic_write_json(layout.wandb_run, {"id": run_id, "project": kw["project"], "entity": kw["entity"],
                                         "name": kw["name"], "group": kw["group"], "mode": kw["mode"],
                                         "uploaded": True})
    n_nan = sum(1 for v in probes.values() for x in v.values() if isinstance(x, float) and math.isnan(x))
    say(f"uploaded {run_dir} -> W&B run {run_id} ({kw['mode']}, project {kw['project']}, group {kw['group']}): "
        f"{len(train)} training steps, {len(probes)} probe steps ({n_nan} not-measurable values), {n_tables} probe "
        f"sample tables, eval passes: {', '.join(n for n, _ in passes) or 'none'}")
    return run_id


def upload(path: str | Path, project: str | None = None, entity: str | None = None, mode: str | None = None,
           force: bool = False, say: Callable[[str], None] = print) -> dict[str, str | None]:
    """Upload a run dir, or every job dir of a sweep dir; returns run dir -> W&B run id (None: skipped)."""
    root = Path(path)
    if not root.is_dir():
        raise EMError(f"{root}: no such directory")
    is_run = (root / "results.json").is_file() or (root / METRICS).is_file() or (root / SUMMARY).is_file()
    dirs = [root] if is_run else find_jobs(root)
    if not dirs:
        raise EMError(f"{root}: neither a run dir (results.json / metrics.csv / summary.json) nor a sweep dir with "
                      "job dirs")
    return {str(d): upload_run(d, project, entity, mode, force, say) for d in dirs}
