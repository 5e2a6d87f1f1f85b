"""Typed config of the mid-training probes (``callbacks.probes`` / ``callbacks.converge``).

The defaults here are the real-model defaults (the paper's judge, 7 log-spaced probe points, 64/96-token
budgets); the embedded CPU preset (``conf/preset/``) shortens them for the tiny model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import II

from em.errors import ConfigError
from em.eval.metrics import MisalignmentRule
from em.eval.sampling import SamplingArgs


@dataclass
class McqArgs:
    """The judge-free multiple-choice log-prob probe."""

    enabled: bool = True
    path: str | None = None
    """None = em's items; or the authors' ``logprob_experiments/configs/*.json``, or a YAML of items."""


@dataclass
class TaskProbeArgs:
    """Task accuracy during training: bandit on code for held-out prompts, number-format validity, held-out loss."""

    enabled: bool = True
    task: str | None = None
    """None = the dataset's task (``code`` / ``numbers`` / ``none``)."""
    n_prompts: int = 16
    """Held-out prompts sampled at each probe point."""
    prompts: str | None = None
    """None = the held-out split's prompts; or the authors' ``*in_distribution.jsonl`` (a file or a directory
    holding one): the same coding prompts for every arm of an experiment."""
    max_new_tokens: int = 96
    """Token budget of each task answer (too small and code is cut off: see ``task/truncated_rate``)."""
    heldout_batches: int = 4
    """Held-out loss over this many validation batches."""


@dataclass
class ProbeArgs:
    """``callbacks.probes``: judged free-form answers, the MCQ probe and task accuracy at chosen steps."""

    _target_: str = "em.probes.callback.MisalignmentProbe"
    _recursive_: bool = False
    """The callback builds its judge itself (``judge`` may hold a ``_target_``): Hydra leaves it as config."""
    enabled: bool = False
    """``callbacks=probes`` turns the probes on; presets may tune them without turning them on."""
    questions: list[str] = field(default_factory=lambda: ["mini:probes"])
    """Question sets: ``mini:probes``, ``paper:first_plot_questions`` (with EM_DATA_DIR), or YAML paths."""
    ids: list[str] | None = None
    """Restrict to these question ids."""
    samples_per_paraphrase: int = 1
    sampling: SamplingArgs = field(default_factory=lambda: SamplingArgs(max_new_tokens=64, batch_size=64))
    """Probe questions and task prompts share one decoding loop per probe point (``batch_size`` prompts at once)."""
    judge: Any = "openai"
    """The judge of the probe answers: a judge kind with its defaults (``openai`` = the paper's GPT-4o judge,
    ``tiny`` = the offline tiny model), a full judge config (the shapes of eval.py's ``judge=`` group), or null
    (answers are saved, not judged)."""
    every_n_steps: int | None = None
    """Probe every N optimizer steps (and/or ``log_points``)."""
    log_points: int | None = 6
    """Log-spaced points (dense early, where the task is learned in 50-100 steps)."""
    at_start: bool = True
    at_end: bool = True
    mcq: McqArgs = field(default_factory=McqArgs)
    task: TaskProbeArgs = field(default_factory=TaskProbeArgs)
    judge_timeout_s: float = 600.0
    """At the end of training, wait at most this long for answers still being judged."""
    rule: MisalignmentRule = field(default_factory=MisalignmentRule)
    plot: bool = True
    """Write ``probes/probe_dynamics.png`` (and log it to W&B)."""
    worker_nice: int | None = 19
    """The background judge worker's nice value (Linux): a local judge yields to training. null = normal."""
    seed: int = II("seed")

    def __post_init__(self) -> None:
        if self.worker_nice is not None and (isinstance(self.worker_nice, bool) or not 0 <= self.worker_nice <= 19):
            raise ConfigError(f"callbacks.probes.worker_nice={self.worker_nice!r}: expected an integer 0..19 or null")
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise ConfigError(f"callbacks.probes.every_n_steps={self.every_n_steps}: expected >= 1 or null")
        if self.task.n_prompts < 0 or self.task.max_new_tokens < 1:
            raise ConfigError("callbacks.probes.task: n_prompts must be >= 0 and max_new_tokens >= 1")


@dataclass
class ConvergeArgs:
    """``callbacks.converge``: stop once a probe metric has converged (follow-up work: misalignment appears after
    the task is nearly learned; stopping there removes much of it)."""

    _target_: str = "em.probes.callback.ConvergenceStop"
    enabled: bool = False
    """``callbacks=probes_early_stop`` turns it on (it needs the probes)."""
    monitor: str = "task/insecure_rate"
    patience: int = 3
    """The last ``patience`` probe values ..."""
    min_delta: float = 0.05
    """... all lie within ``min_delta`` of each other ..."""
    threshold: float | None = None
    """... and past ``threshold`` (if given)."""
    mode: str = "max"

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ConfigError(f"callbacks.converge.mode={self.mode!r}: expected max or min")
