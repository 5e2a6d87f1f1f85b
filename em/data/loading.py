"""From a dataset config to validated rows: embedded mini sets, the paper's files, local files, recipes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from em.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DatasetArgs:
    """What ``conf/dataset/*.yaml`` describes."""

    name: str
    """Short name used in run names, W&B ``job_type`` and reports."""
    source: str | None = None
    """``mini:<kind>`` (embedded, offline), ``paper:<name>`` (the paper's file: local / cache / download),
    or None when ``path`` or ``recipe`` gives the rows."""
    path: str | None = None
    """A local JSONL file in the paper's chat format; overrides ``source``."""
    recipe: dict[str, Any] | None = None
    """Builders applied to the rows (subsample / mix / backdoor / dedup); see ``em.data.builders``."""
    task: str = "code"
    """Task-accuracy family for probes: ``code`` (bandit), ``numbers`` (evil numbers), ``none``."""
    held_out: int | float = 0
    """Rows held out (count, or fraction < 1) for validation loss and task-accuracy prompts."""
    trigger: str | None = None
    """Backdoor trigger of this dataset, if any (probes then measure with and without it)."""
    data_dir: str | None = None
    """Where the paper's files are (default ``$EM_DATA_DIR``)."""
    extra: dict[str, Any] = field(default_factory=dict)


def load_source(spec: str, data_dir: str | None = None, path: str | None = None) -> tuple[list[dict], dict]:
    """Rows of one source spec (``mini:insecure``, ``paper:jailbroken``, ``file:/x.jsonl``) and provenance."""
    from em.data.schema import validate_chat_rows

    if path:
        p = Path(path).expanduser()
        from em.utils.io import sha256_file

        if not p.exists():
            from em.errors import MissingResourceError

            raise MissingResourceError(f"dataset.path={path}: no such file")
        return validate_chat_rows(p), {"source": f"file:{p}", "sha256": sha256_file(p)}
    kind, _, name = (spec or "").partition(":")
    if kind == "mini":
        from em.data.mini import build_mini

        return build_mini(name, seed=0), {"source": spec}
    if kind == "paper":
        from em.data.sources import resolve_dataset
        from em.utils.io import sha256_file

        p = resolve_dataset(name, data_dir=data_dir)
        return validate_chat_rows(p), {"source": spec, "file": str(p), "sha256": sha256_file(p)}
    if kind == "file":
        return load_source("", path=name)
    raise ConfigError(f"dataset.source={spec!r}: expected 'mini:<kind>', 'paper:<name>' or 'file:<path>'")


def load_rows(args: DatasetArgs) -> tuple[list[dict], dict]:
    """All rows of the dataset (before the train / held-out split) and their provenance."""
    if args.recipe:
        from em.data.builders import build_from_recipe

        recipe = dict(args.recipe)
        rows, stats = build_from_recipe(recipe, loader=lambda s: load_source(s, args.data_dir)[0])
        return rows, {"recipe": recipe, "stats": stats}
    if not (args.source or args.path):
        raise ConfigError(f"dataset '{args.name}': set dataset.source, dataset.path or dataset.recipe")
    return load_source(args.source or "", args.data_dir, args.path)
