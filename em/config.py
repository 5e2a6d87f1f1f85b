"""Config plumbing: typed sections checked and converted, and secrets kept out of saved configs."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from em.errors import ConfigError
from em.secrets import is_secret_key, looks_secret

T = TypeVar("T")


def as_args(cls: type[T], section: Any, where: str) -> T:
    """``section`` (a typed or plain config section, a mapping, or already a ``cls``) as ``cls``, through its
    schema: unknown keys and ill-typed values are an error naming them, ``__post_init__`` checks run."""
    if isinstance(section, cls):
        return section
    data = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section or {})
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), data))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{where}{'.' + str(key) if key else ''}: {str(err).splitlines()[0]}") from None


def redact(obj: Any) -> Any:
    """A copy of a plain config container with secret-looking values replaced."""
    if isinstance(obj, dict):
        return {k: ("***" if (isinstance(k, str) and is_secret_key(k) and v) or looks_secret(v) else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return "***" if looks_secret(obj) else obj


def plain(cfg: DictConfig) -> dict:
    """Resolved, redacted plain dict of a config (for results.json, W&B, logs)."""
    return redact(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))


def _check_node(node: Any, where: str) -> None:
    if isinstance(node, DictConfig):
        cls = OmegaConf.get_type(node)
        if dataclasses.is_dataclass(cls):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = [str(k) for k in node.keys() if k not in known]
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {unknown}; {cls.__name__} takes "
                                  f"{sorted(k for k in known if not k.startswith('_'))}")
        for k in node.keys():
            child = node._get_node(k)
            if isinstance(child, (DictConfig, ListConfig)) and not child._is_missing() and not child._is_none():
                _check_node(child, f"{where}.{k}" if where else str(k))
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node._iter_ex(resolve=False)):
            _check_node(child, f"{where}[{i}]")


def check_keys(cfg: DictConfig, sections: dict[str, type], top_level: frozenset[str] | None = None) -> None:
    """Refuse keys that no schema has, naming them (the typed sections, and the top level when given)."""
    if top_level is not None:
        unknown = sorted(str(k) for k in cfg.keys() if k not in top_level and k not in sections)
        if unknown:
            raise ConfigError(f"unknown top-level key(s) {unknown}; expected sections {sorted(sections)} and keys "
                              f"{sorted(top_level - {'hydra'})}")
    for name in sections:
        if name in cfg:
            _check_node(cfg._get_node(name), name)


def section(cfg: DictConfig, name: str):
    """The typed object of section ``name`` (its dataclass; ``__post_init__`` checks run here)."""
    try:
        node = cfg[name]
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{name}: {str(err).splitlines()[0]}") from None
