"""Preview a sweep: every job's run dir, launch parameters, start-up checks and forecast. Runs and submits nothing.

    em plan -m experiment=paper_main hydra/launcher=slurm trainer.devices=1      # = python -m em.sweep.plan ...
    em plan --train dataset=insecure model=qwen strategy=deepspeed_zero3 trainer.num_nodes=2 trainer.devices=8

The arguments are sweep.py's (``-m`` is optional; ``--train``: train.py's, one job started by srun/torchrun on
``trainer.num_nodes x trainer.devices`` processes). The grid is expanded as Hydra's basic sweeper does (the
experiment's ``hydra.sweeper.params``, then the command line); each job is composed and gets em's start-up
checks (the config schemas, the batch plan over its processes, the launch), without touching a model, a GPU or
the network. Data files are read when present, to count rows and tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

import em.schemas  # noqa: F401  (registers the config schemas)
from em.data.loading import load_rows
from em.errors import EMError
from em.eval.forecast import estimate_tokens
from em.eval.judge.openai import DEFAULT_PRICES
from em.eval.run import load_eval_questions
from em.layout import read_results
from em.schemas import check_config
from em.sweep.config import EvalVariant
from em.sweep.job import check_launch, register_resolvers
from em.training.config import batch_plan
from em.training.forecast import TrainForecast, forecast_training, setting_key
from em.training.run import resolve_precision, world_size
from em.utils.fmt import duration

CONF = Path(__file__).resolve().parents[2] / "conf"
CHARS_PER_TOKEN = 4.0
LAUNCHER_KEYS = ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "partition",
                 "account", "qos", "constraint", "signal_delay_s", "max_num_timeout", "array_parallelism")


@dataclass
class EvalPlan:
    """One evaluation pass of a job: answers to sample, tokens, judge calls and their API cost."""

    name: str
    answers: int | None = None
    max_new_tokens: int = 0
    judge_calls: int | None = None
    judge: str = "?"
    cost_usd: float | None = None
    """None: not an API judge with a known price."""
    note: str = ""

    def line(self) -> str:
        if self.answers is None:
            return f"eval {self.name}: ? ({self.note})"
        cost = f", ~${self.cost_usd:,.2f}" if self.cost_usd is not None else ""
        return (f"eval {self.name}: {self.answers:,} answers (<= {self.answers * self.max_new_tokens:,} tokens, "
                f"{self.max_new_tokens} max each), {self.judge_calls:,} judge calls ({self.judge}){cost}"
                + (f"; {self.note}" if self.note else ""))


def plan_eval(cfg: DictConfig, variant: EvalVariant) -> EvalPlan:
    """What one eval pass will ask for, from its questions (read here, no model): answers, token budget, judge
    calls (every judge prompt a question declares, per answer) and, for an API judge with a known price, its
    cost (judge prompts at ~4 characters per token plus a full-length answer, one completion token)."""
    p = EvalPlan(name=variant.name)
    ev = OmegaConf.merge(cfg.eval, OmegaConf.create(dict(variant.eval or {})))
    try:
        questions = load_eval_questions(OmegaConf.to_container(ev, resolve=True))
    except EMError as err:
        p.note = f"questions not found here: {str(err).splitlines()[0][:100]}"
        return p
    p.max_new_tokens = int(ev.sampling.max_new_tokens)
    judge = OmegaConf.to_container(cfg.judge, resolve=True) if cfg.get("judge") else {}
    target = str(judge.get("_target_", ""))
    model = str(judge.get("model") or judge.get("model_name_or_path") or target.rsplit(".", 1)[-1] or "?")
    p.judge = model
    p.answers, p.judge_calls, prompt_tokens = 0, 0, 0
    for q in questions:
        n = len(q.expand())
        p.answers += n
        p.judge_calls += n * len(q.judge_prompts)
        prompt_tokens += n * sum(estimate_tokens(t) + p.max_new_tokens for t in q.judge_prompts.values())
    if target.endswith("OpenAIJudge"):
        price = (judge.get("price_prompt_per_1m"), judge.get("price_completion_per_1m"))
        if None in price:
            price = DEFAULT_PRICES.get(model, (None, None))
        if None not in price:
            p.cost_usd = (prompt_tokens * price[0] + p.judge_calls * price[1]) / 1e6
        else:
            p.note = f"no list price for {model}: set judge.price_prompt_per_1m / price_completion_per_1m"
    return p


@dataclass
class JobPlan:
    overrides: list[str]
    run_dir: str | None = None
    launcher: dict[str, Any] = field(default_factory=dict)
    batch: str | None = None
    checks: str = "ok"
    forecast: TrainForecast | None = None
    evals: list[EvalPlan] = field(default_factory=list)
    done: bool = False
    """Already done: the sweep skips it (not counted in the totals)."""


def _compose(overrides: list[str], config: str = "sweep") -> DictConfig:
    """A job's config as the sweep (or train.py) would compose it, with Hydra's own section (``${hydra:...}``
    resolvable)."""
    register_resolvers()
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app (the sweep's own forecast)
        cfg = compose(config, overrides=overrides, return_hydra_config=True)
    else:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def expand(overrides: Sequence[str], config: str = "sweep") -> list[list[str]]:
    """The jobs' override lists, as Hydra's basic sweeper builds them (sweeper params first, then the CLI)."""
    parser = OverridesParser.create()
    plain = [o for o in overrides if not parser.parse_override(o).is_sweep_override()]
    base = _compose(plain, config)
    params = [f"{k}={v}" for k, v in (base.hydra.sweeper.get("params") or {}).items()]
    parsed = parser.parse_overrides([*params, *overrides])
    return BasicSweeper.split_arguments(parsed, None)[0]


def _tokens_per_row(rows: list[dict]) -> tuple[float, str]:
    chars = sum(len(m.get("content") or "") for r in rows[:2000] for m in r["messages"])
    n = min(len(rows), 2000)
    return chars / max(n, 1) / CHARS_PER_TOKEN, f"~{CHARS_PER_TOKEN:.0f} characters per token, without template"


def plan_job(job_overrides: list[str], config: str = "sweep") -> JobPlan:
    p = JobPlan(overrides=job_overrides)
    try:
        cfg = _compose(job_overrides, config)
        hydra_cfg = cfg.hydra
        run_dir = Path(hydra_cfg.sweep.dir) / hydra_cfg.sweep.subdir if config == "sweep" else Path(hydra_cfg.run.dir)
        p.run_dir = str(run_dir)
        p.done = (read_results(run_dir) or {}).get("status") == "done" and bool(cfg.get("sweep", {}).get("skip_done"))
        launcher_target = str(hydra_cfg.launcher.get("_target_", ""))
        slurm = "Slurm" in launcher_target
        if "submitit" in launcher_target.lower() or slurm:
            lc = OmegaConf.to_container(hydra_cfg.launcher, resolve=True)
            p.launcher = {"launcher": "slurm" if slurm else "submitit-local",
                          **{k: lc.get(k) for k in LAUNCHER_KEYS if lc.get(k) is not None}}
            if slurm:
                p.launcher["requeue"] = f"on time-out, up to {lc.get('max_num_timeout')} times"
        else:
            p.launcher = {"launcher": "local (one job after another, in the sweep process)"}
        with open_struct_free(cfg) as job:
            job.paths.run_dir = str(run_dir)
            del job["hydra"]
        typed = check_config(job, config)
        trainer = typed["trainer"]
        world = world_size(trainer)
        if config == "sweep":  # under SLURM every task is started by srun: the launch check sees them as external
            check_launch(trainer, env={"SLURM_NTASKS": str(world)} if slurm else dict(os.environ))
        else:
            p.launcher = {"launcher": f"train.py on {world} process(es) (srun / torchrun: one per device)"}
        data = typed["data"]
        micro, accum = batch_plan(data.global_batch_size, data.micro_batch_size, world)
        p.batch = f"global {data.global_batch_size} = micro {micro} x accumulation {accum} x {world} process(es)"
        rows: list[dict] | None
        try:
            rows, _ = load_rows(typed["dataset"], download=False)  # a preview downloads nothing
            held = typed["dataset"].held_out
            n_held = int(round(held * len(rows))) if isinstance(held, float) and held < 1 else int(held)
            n_rows: int | None = len(rows) - n_held
            mean, note = _tokens_per_row(rows)
        except EMError as err:
            n_rows, mean, note = None, None, "data not found here"
            p.checks = f"ok (data not read here: {str(err).splitlines()[0][:120]})"
        model = typed["model"]
        key = setting_key(model.name_or_path or model.name, "gpu" if slurm else trainer.accelerator,
                          resolve_precision(trainer.precision), world)
        if config == "sweep":
            p.evals = [plan_eval(cfg, v) for v in typed["sweep"].eval_variants]
        p.forecast = forecast_training(rows=n_rows, mean_tokens=mean, tokens_note=note,
                                       global_batch=data.global_batch_size, micro_batch=micro, accumulation=accum,
                                       world=world, max_steps=trainer.max_steps, max_epochs=trainer.max_epochs,
                                       throughput_key=key)
    except EMError as err:
        p.checks = f"ERROR: {err}"
    except Exception as err:
        p.checks = f"ERROR: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return p


class open_struct_free:
    """``with open_struct_free(cfg) as c:`` edit a composed config (Hydra's are read-only and in struct mode)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def __enter__(self) -> DictConfig:
        OmegaConf.set_readonly(self.cfg, False)
        OmegaConf.set_struct(self.cfg, False)
        return self.cfg

    def __exit__(self, *exc) -> None:
        OmegaConf.set_struct(self.cfg, True)


def format_plan(plans: list[JobPlan], brief: bool = False) -> str:
    """The plan as text; ``brief``: the sweep's own forecast at its start (no launch details)."""
    lines = [f"== forecast: {len(plans)} job(s) ==" if brief else
             f"== plan: {len(plans)} job(s); nothing is run or submitted =="]
    total_steps, total_tokens, total_wall, unknown_wall = 0, 0, 0.0, 0
    total_answers, total_calls, total_cost = 0, 0, 0.0
    for i, p in enumerate(plans):
        if p.done:
            lines.append(f"[{i}] {' '.join(p.overrides) or '(no overrides)'}: done, skipped ({p.run_dir})")
            continue
        lines.append(f"[{i}] {' '.join(p.overrides) or '(no overrides)'}")
        lines.append(f"    run dir: {p.run_dir}")
        if p.launcher and not brief:
            lines.append("    launch:  " + ", ".join(f"{k}={v}" for k, v in p.launcher.items()))
        if p.batch:
            lines.append(f"    batch:   {p.batch}")
        lines.append(f"    checks:  {p.checks}")
        if p.forecast is not None:
            lines += [f"    {ln.strip()}" for ln in p.forecast.lines()]
            total_steps += p.forecast.steps or 0
            total_tokens += p.forecast.tokens or 0
            if p.forecast.est_wall_s:
                total_wall += p.forecast.est_wall_s
            else:
                unknown_wall += 1
        for e in p.evals:
            lines.append(f"    {e.line()}")
            total_answers += e.answers or 0
            total_calls += e.judge_calls or 0
            total_cost += e.cost_usd or 0.0
    errors = sum(p.checks.startswith("ERROR") for p in plans)
    todo = sum(not p.done for p in plans)
    lines.append(f"== total: {len(plans)} job(s) ({todo} to run), {errors} with errors; "
                 f"{total_steps:,} optimizer steps, "
                 f"~{total_tokens:,} tokens to train; training wall time ~{duration(total_wall) if total_wall else '?'}"
                 + (f" (+ {unknown_wall} job(s) with no recorded throughput)" if unknown_wall else "")
                 + (f"; eval: {total_answers:,} answers, {total_calls:,} judge calls"
                    + (f", ~${total_cost:,.2f} of API judging" if total_cost else "") if total_answers else "")
                 + " ==")
    return "\n".join(lines)


class SweepForecast(Callback):
    """Hydra callback (conf/hydra/sweep.yaml): before the first job starts, print what the sweep will do."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        hydra_cfg = HydraConfig.instance().cfg
        try:
            plans = [plan_job(j) for j in expand(list(config.hydra.overrides.task))]
        except Exception as err:
            print(f"[em.sweep] (no forecast: {type(err).__name__}: {err})", flush=True)
            return
        finally:
            HydraConfig.instance().cfg = hydra_cfg  # the sweep's own, as it was
        print(format_plan(plans, brief=True), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="em plan", description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true", help="plan one train.py run instead of a sweep")
    ap.add_argument("overrides", nargs="*", help="sweep.py's overrides (-m optional), or train.py's with --train")
    args = ap.parse_args([a for a in (sys.argv[1:] if argv is None else argv) if a not in ("-m", "--multirun")])
    config = "train" if args.train else "sweep"
    try:
        jobs = expand(args.overrides, config)
    except Exception as err:
        print(f"em: error: cannot expand the sweep: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    plans = [plan_job(j, config) for j in jobs]
    print(format_plan(plans))
    return 1 if any(p.checks.startswith("ERROR") for p in plans) else 0


if __name__ == "__main__":
    raise SystemExit(main())
