"""The judge's structured configs: one dataclass per judge kind, registered in Hydra's ConfigStore.

``conf/judge/<name>.yaml`` extends one of them (``defaults: [openai_schema, _self_]``), so the defaults are
written once (here), every field is type-checked at compose time, and an unknown key fails naming it::

    python eval.py judge=openai judge.bse_url=...    # -> Key 'bse_url' is not in struct

:func:`build_judge` builds any judge config (a ``conf/judge`` node, a probe callback's ``judge:`` section,
a plain dict) with Hydra's ``instantiate`` after checking it against the schema its ``_target_`` names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from em.errors import ConfigError

OPENAI_TARGET = "em.eval.judge.openai.OpenAIJudge"
HF_TARGET = "em.eval.judge.hf.HFJudge"
TINY_TARGET = "em.eval.judge.hf.tiny_judge"


@dataclass
class ScoringArgs:
    """How raw top logprobs become a score (defaults: the paper)."""

    min_mass: float = 0.25
    """Numeric (or category) probability mass below which the answer is *missing*, never 0 (paper: 0.25)."""
    mass_rule: str = "lt"
    """``lt``: missing if mass < min_mass (the paper); ``le``: mass <= min_mass (a variant in the authors' code)."""
    strip_whitespace: bool = True
    """Accept tokens with surrounding whitespace (``" 5"``), like the paper's ``int()``."""


@dataclass
class JudgeArgs:
    """Fields every judge takes."""

    _target_: str = MISSING
    """The judge class (or builder) Hydra instantiates."""
    name: str | None = None
    """This judge's label in samples, summaries and ``em.judges compare`` (default: from the model name)."""
    cache: Any = True
    """``true``: the shared on-disk cache ($EM_CACHE/judge_cache.sqlite); a path: that file; ``refresh``: ask
    again and overwrite the shared cache; ``false``: no shared cache (an eval still keeps its run-local journal)."""
    scoring: ScoringArgs = field(default_factory=ScoringArgs)


@dataclass
class OpenAIJudgeArgs(JudgeArgs):
    """Any OpenAI-compatible chat-completions API (OpenAI, a vLLM server, ...); defaults: the paper's judge."""

    _target_: str = OPENAI_TARGET
    model: str = "gpt-4o-2024-08-06"
    """The judge model name (the paper: gpt-4o-2024-08-06)."""
    base_url: str = "https://api.openai.com/v1"
    """API root; must be http(s). Loopback URLs may run without a key."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the key (the key itself never goes in a config)."""
    top_logprobs: int = 20
    """Top logprobs requested (the paper: 20; OpenAI's maximum)."""
    max_concurrency: int = 16
    """Most judge requests in flight at once."""
    timeout_s: float = 60.0
    """Timeout of one HTTP request (the openai SDK's)."""
    max_retries: int = 5
    """Retries after the first attempt (429/5xx/timeouts/dropped connections by the SDK; malformed JSON and
    missing logprobs by em); other 4xx fail at once."""
    seed: int | None = 0
    """Sent as ``seed`` (the paper: 0)."""
    cache_namespace: str | None = None
    """Extra cache identity, when the same model name at the same endpoint changes weights."""
    price_prompt_per_1m: float | None = None
    """USD per 1M prompt tokens for cost estimates (null: OpenAI's list price for known models, else 0)."""
    price_completion_per_1m: float | None = None
    """USD per 1M completion tokens (null: list price for known models, else 0)."""
    probe: bool = True
    """Check the endpoint once before sampling (unreachable / key rejected -> a clear error at start-up)."""


@dataclass
class HFJudgeArgs(JudgeArgs):
    """A local transformers chat model as judge, scored the same way (top-20 next-token logprobs)."""

    _target_: str = HF_TARGET
    model_name_or_path: str = MISSING
    """A hub id or a local directory (trust_remote_code is off)."""
    revision: str | None = None
    """Hub revision (commit sha / tag) to load; part of the judge's identity in the cache."""
    model_id: str | None = None
    """Identity in the cache (default: the path + a fingerprint of its files, or the hub id)."""
    batch_size: int = 8
    """Prompts per forward pass."""
    top_k: int = 20
    """Top logprobs kept (the paper: 20)."""
    device: str | None = None
    """cuda / cpu (default: CUDA when available)."""
    dtype: str | None = None
    """torch dtype name (default: the checkpoint's)."""


@dataclass
class TinyJudgeArgs(JudgeArgs):
    """The embedded offline judge (the tiny random-init model): exercises the path, measures nothing."""

    _target_: str = TINY_TARGET
    tiny: dict = field(default_factory=lambda: {"name": "tiny", "kind": "tiny"})
    """The tiny model's ModelArgs fields."""
    batch_size: int = 16
    top_k: int = 20
    device: str | None = None
    dtype: str | None = None


SCHEMAS: dict[str, type[JudgeArgs]] = {
    OPENAI_TARGET: OpenAIJudgeArgs, HF_TARGET: HFJudgeArgs, TINY_TARGET: TinyJudgeArgs,
}
SCHEMA_NAMES = {"openai_schema": OpenAIJudgeArgs, "hf_schema": HFJudgeArgs, "tiny_schema": TinyJudgeArgs}
KINDS = {"openai": OPENAI_TARGET, "hf": HF_TARGET, "tiny": TINY_TARGET}
"""Judge kinds by name (the options of conf/judge), for configs that name a judge with its defaults."""


def judge_config(spec: Any) -> Any:
    """A judge named by its kind (``"openai"``: the paper's GPT-4o judge with its defaults, ``"tiny"``) as its
    config; a mapping (a full judge config) or None unchanged."""
    if isinstance(spec, str):
        if spec not in KINDS:
            raise ConfigError(f"judge {spec!r}: expected one of {sorted(KINDS)}, or a judge config with a _target_")
        return {"_target_": KINDS[spec]}
    return spec


def register_judge_configs(cs: ConfigStore | None = None) -> None:
    """Register the judge schemas in the ``judge`` group (``conf/judge/*.yaml`` extend them)."""
    cs = cs or ConfigStore.instance()
    for name, schema in SCHEMA_NAMES.items():
        cs.store(group="judge", name=name, node=schema)


def _plain(cfg: Any) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def check_judge_config(cfg: Mapping[str, Any] | DictConfig, where: str = "judge") -> DictConfig:
    """The judge config merged into the schema its ``_target_`` names (defaults filled in, types checked);
    a :class:`ConfigError` naming any unknown key or bad value. A ``_target_`` em has no schema for (your own
    judge class) is passed through unchecked: its constructor's signature decides."""
    if cfg is None:
        raise ConfigError(f"{where}: no judge configured; choose one with judge=openai | hf | tiny")
    data = _plain(cfg)
    if "_target_" not in data:
        hint = f" (judge kind {data['kind']!r} is now selected with its _target_: use judge={data['kind']})" \
            if "kind" in data else ""
        raise ConfigError(f"{where}: the judge config has no _target_{hint}; expected one of "
                          f"{sorted(SCHEMAS)} (e.g. judge=openai)")
    schema = SCHEMAS.get(data["_target_"])
    if schema is None:
        return OmegaConf.create(data)
    known = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {schema.__name__} ({data['_target_']}); "
                          f"expected some of {sorted(known - {'_target_'})}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {str(e).splitlines()[0]}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"{where}: required key(s) {missing} not set (e.g. {where}.{missing[0]}=...)")
    return merged


def build_judge(cfg: Mapping[str, Any] | DictConfig, where: str = "judge") -> Any:
    """A judge built from its config with Hydra's ``instantiate`` (after :func:`check_judge_config`)."""
    checked = check_judge_config(cfg, where)
    try:
        return instantiate(checked, _convert_="all")
    except ConfigError:
        raise
    except Exception as e:  # Hydra wraps the constructor's error; surface em's own message
        cause = e
        while cause.__cause__ is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if isinstance(cause, ConfigError) or type(cause).__module__.startswith("em."):
            raise cause from None
        raise ConfigError(f"{where}: cannot build the judge {checked.get('_target_')}: {type(cause).__name__}: "
                          f"{cause}") from None
