"""em's structured configs: the typed schema of every config section, registered with Hydra's ConfigStore.

One idiom: each section of ``conf/`` has a dataclass schema (``ModelArgs``, ``DataArgs``, ... with help on
every field and the only copy of its defaults); the YAML options of a group state what differs; whatever is
*built* from config names its class with ``_target_`` (callbacks, strategies, the optimizer, judges).

``train.yaml`` / ``sweep.yaml`` load the schemas first (``defaults: [schema/model, ...]``), so a value of the
wrong type fails at compose time. :func:`check_config` then refuses keys a schema does not have (Hydra's
``+key=value`` adds them without asking) and runs every section's own checks (``__post_init__``: a negative
learning rate, a zero batch size, ...), naming the key — before any data or model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

import em.eval.config  # noqa: F401  (registers the eval / judge schemas that conf/eval and conf/judge extend)
from em.config import check_keys, section
from em.errors import ConfigError
from em.probes.config import ConvergeArgs, ProbeArgs
from em.sweep.config import SweepArgs
from em.training.config import TRAINING_SECTIONS, CheckpointArgs, WeightsArgs


@dataclass
class CallbacksConfig:
    """``callbacks:``. Each entry is built with its ``_target_`` when ``enabled``; options of the ``callbacks``
    group turn entries on (``probes``, ``probes_early_stop``). Your own callbacks: ``+callbacks.extra.NAME=
    {_target_: my.module.MyCallback, ...}``."""

    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    weights: WeightsArgs = field(default_factory=WeightsArgs)
    probes: ProbeArgs = field(default_factory=ProbeArgs)
    converge: ConvergeArgs = field(default_factory=ConvergeArgs)
    extra: dict[str, Any] = field(default_factory=dict)


TRAIN_SECTIONS: dict[str, type] = {**TRAINING_SECTIONS, "callbacks": CallbacksConfig}
SWEEP_SECTIONS: dict[str, type] = {"sweep": SweepArgs}
TRAIN_KEYS = frozenset({"task_name", "experiment_name", "seed", "ckpt_path", "strategy", "hydra"})
"""Top-level keys of train.yaml besides the typed sections."""
SWEEP_KEYS = TRAIN_KEYS | {"eval", "judge", "judges"}


def register() -> None:
    """Store every section's schema as ``schema/<section>`` (package ``<section>``); idempotent."""
    cs = ConfigStore.instance()
    for name, cls in {**TRAIN_SECTIONS, **SWEEP_SECTIONS}.items():
        cs.store(group="schema", name=name, node=cls, package=name)


register()


def check_config(cfg: DictConfig, entry: str = "train") -> dict[str, Any]:
    """Every check a composed config gets before any work; returns the typed sections by name."""
    sections = dict(TRAIN_SECTIONS)
    keys = TRAIN_KEYS
    if entry == "sweep":
        sections.update(SWEEP_SECTIONS)
        keys = SWEEP_KEYS
    elif {"sweep", "eval", "judge"} & set(cfg.keys()):
        raise ConfigError("this config sets sweep / eval / judge keys (an experiment= of conf/experiment/ is a sweep: "
                          "train, then evaluate): run it with sweep.py, e.g. python sweep.py experiment=<name>")
    check_keys(cfg, sections, keys)
    return {name: section(cfg, name) for name in sections if name in cfg}
