"""Config plumbing: OmegaConf sections -> typed dataclasses, and secrets kept out of saved configs."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from em.errors import ConfigError

T = TypeVar("T")

_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)$", re.I)


def to_dataclass(cls: type[T], section: DictConfig | dict | None, where: str) -> T:
    """Build ``cls`` from a config section; unknown keys are an error naming the section."""
    data: dict[str, Any] = (OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig)
                            else dict(section or {}))
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from err


def redact(obj: Any) -> Any:
    """A copy of a plain config container with secret-looking values replaced."""
    if isinstance(obj, dict):
        return {k: ("***" if isinstance(k, str) and _SECRET_KEY.search(k) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def plain(cfg: DictConfig) -> dict:
    """Resolved, redacted plain dict of a config (for results.json, W&B, logs)."""
    return redact(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
