"""The run directory: one place that names every file a run writes and finds runs under a directory.

A run dir (``paths.run_dir``, else Hydra's output dir; a sweep job's is ``<sweep_dir>/<overrides>/seed=N``) holds::

    results.json          a sweep job's record: status, config, train summary, eval summaries, provenance
    train_summary.json    what train() returned
    data_stats.json       what data preparation kept, dropped and truncated
    metrics.csv           Lightning's CSV log (earlier attempts in history/attempt_NNN/metrics.csv)
    checkpoints/last.ckpt the resumable checkpoint
    adapter/ | model/     the trained weights: a PEFT adapter, or a full model
    probes/               mid-training probes: probe_metrics.csv, samples_step*.jsonl (the judged answers),
                          task_samples_step*.jsonl (the task answers and their findings), probe_dynamics.png
    samples.jsonl         evaluation answers with every score; summary.json / summary.csv: the rates
    wandb_run.json        the job's W&B run (id, project, entity): a requeued job resumes that run
    wandb/                W&B's own files (offline runs: wandb/offline-run-*/run-<id>.wandb)
    <variant>/            further eval passes of a sweep job (e.g. eval_triggered/)

Every module reads and writes these names through this one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from em.errors import ConfigError

log = logging.getLogger(__name__)

RESULTS = "results.json"
TRAIN_SUMMARY = "train_summary.json"
DATA_STATS = "data_stats.json"
METRICS = "metrics.csv"
SAMPLES = "samples.jsonl"
SUMMARY = "summary.json"
SUMMARY_CSV = "summary.csv"
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"
REPORT_DIR = "report"
WANDB_RUN = "wandb_run.json"
TASK_SAMPLES_PREFIX = "task_samples_step"


@dataclass
class PathsArgs:
    """``paths:``: where runs write."""

    root_dir: str = "${oc.env:PROJECT_ROOT,.}"
    output_root: str = "${oc.env:EM_OUTPUT_DIR,outputs}"
    """Every run goes under here (``train/<date>/<time>``, ``eval/...``, ``sweeps/<experiment_name>/...``)."""
    run_dir: str | None = None
    """This run's directory; null = Hydra's output dir (``<output_root>/<task>/<date>/<time>``, a sweep job's stable
    dir). Set it to resume a run with ``ckpt_path=last``; Hydra's .hydra/ and <task>.log follow it."""


def resolve_run_dir(paths: PathsArgs | Any) -> str:
    """The run dir: ``paths.run_dir`` (of a PathsArgs or a mapping), else Hydra's output dir of this run (or
    sweep job)."""
    given = paths.run_dir if isinstance(paths, PathsArgs) else (paths or {}).get("run_dir")
    if given:
        return str(given)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.output_dir)
    raise ConfigError("paths.run_dir is not set and this is not a Hydra run: pass paths.run_dir=<dir>")


def first_set(*values: Any) -> Any:
    """``${em.first:a,b}``: the first value that is not null (hydra.run.dir = paths.run_dir, or the default)."""
    return next((v for v in values if v not in (None, "None", "null", "")), None)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("em.first"):
        OmegaConf.register_new_resolver("em.first", first_set)


register_resolvers()


@dataclass(frozen=True)
class RunLayout:
    """The files of one run dir."""

    root: Path

    @classmethod
    def of(cls, run_dir: str | os.PathLike) -> RunLayout:
        return cls(Path(run_dir).expanduser().resolve())

    @property
    def results(self) -> Path:
        return self.root / RESULTS

    @property
    def train_summary(self) -> Path:
        return self.root / TRAIN_SUMMARY

    @property
    def data_stats(self) -> Path:
        return self.root / DATA_STATS

    @property
    def metrics_csv(self) -> Path:
        return self.root / METRICS

    @property
    def history(self) -> Path:
        return self.root / "history"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def probes(self) -> Path:
        return self.root / "probes"

    def probe_samples(self, step: int) -> Path:
        """The probe questions' answers sampled at ``step``, with their judge scores."""
        return self.probes / f"samples_step{step:06d}.jsonl"

    def task_samples(self, step: int) -> Path:
        """The task answers sampled at ``step``, with what the task scorer found in each."""
        return self.probes / f"{TASK_SAMPLES_PREFIX}{step:06d}.jsonl"

    def task_samples_files(self) -> dict[int, Path]:
        """Step -> task samples file, for every probe step that wrote one."""
        out = {}
        for f in sorted(self.probes.glob(f"{TASK_SAMPLES_PREFIX}*.jsonl")):
            tail = f.stem[len(TASK_SAMPLES_PREFIX):]
            if tail.isdigit():
                out[int(tail)] = f
        return out

    @property
    def probe_metrics(self) -> Path:
        return self.probes / "probe_metrics.csv"

    @property
    def samples(self) -> Path:
        return self.root / SAMPLES

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def summary_csv(self) -> Path:
        return self.root / SUMMARY_CSV

    @property
    def wandb_run(self) -> Path:
        """The job's W&B run identity (``{"id", "project", "entity", ...}``), so a requeue resumes that run."""
        return self.root / WANDB_RUN

    @property
    def wandb_dir(self) -> Path:
        """W&B's own files (``wandb/offline-run-*`` / ``wandb/run-*``)."""
        return self.root / "wandb"

    def weights(self, full_finetune: bool) -> Path:
        """Where the trained weights go: ``model/`` for full finetuning, ``adapter/`` otherwise."""
        return self.root / ("model" if full_finetune else "adapter")

    def saved_weights(self) -> Path | None:
        """The weights a finished run saved (``adapter/`` or ``model/`` with files in it), or None."""
        for full in (False, True):
            d = self.weights(full)
            if d.is_dir() and any(d.iterdir()):
                return d
        return None

    def eval_dir(self, index: int, name: str) -> Path:
        """Where eval pass ``index`` of a sweep job writes: the run dir for the first, ``<name>/`` for others."""
        return self.root if index == 0 else self.root / name


def read_results(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """A run's ``results.json``, or None when absent or unreadable (an unreadable one is logged)."""
    p = RunLayout.of(run_dir).results
    if not p.exists():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s)", p, e)
        return None
    return data if isinstance(data, dict) else None


def _under(root: Path, names: tuple[str, ...]) -> set[Path]:
    return {p.parent for name in names for p in root.rglob(name)}


def _not_reports(root: Path, dirs: set[Path]) -> list[Path]:
    return sorted(d for d in dirs if REPORT_DIR not in d.relative_to(root).parts)


def find_jobs(root: str | os.PathLike) -> list[Path]:
    """Job dirs under ``root``: those holding ``results.json`` or a Hydra job record (``.hydra/overrides.yaml``,
    written when a sweep job starts, also one then skipped), below ``root``; not reports."""
    root = Path(root)
    dirs = _under(root, (RESULTS,))
    dirs |= {p.parent.parent for p in root.rglob(HYDRA_OVERRIDES.name) if p.parent.name == ".hydra"}
    dirs.discard(root)  # the sweep dir itself (its .hydra is the multirun's)
    return _not_reports(root, dirs)


def find_sample_dirs(root: str | os.PathLike) -> list[Path]:
    """Dirs under ``root`` with evaluated answers or a job record (``samples.jsonl`` / ``results.json``): a job's
    run dir and each of its extra eval passes (``<job>/eval_triggered/``), which the report shows as own rows."""
    root = Path(root)
    return _not_reports(root, _under(root, (RESULTS, SAMPLES)))
