"""From a dataset config to validated rows: embedded mini sets, the paper's files, local files, recipes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from em.data.builders import build_from_recipe
from em.data.schema import MAX_FILE_BYTES, MAX_ROW_BYTES
from em.data.sources import load_spec
from em.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DatasetArgs:
    """What ``conf/dataset/*.yaml`` describes."""

    name: str = MISSING
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
    held_out: Any = 0
    """Rows held out (a count, or a fraction < 1) for validation loss and task-accuracy prompts."""
    trigger: str | None = None
    """Backdoor trigger of this dataset, if any (probes then measure with and without it)."""
    data_dir: str | None = "${oc.env:EM_DATA_DIR,null}"
    """Where the paper's files are (default ``$EM_DATA_DIR``; else the em cache, else downloaded)."""
    extra: dict[str, Any] = field(default_factory=dict)
    max_file_bytes: int = MAX_FILE_BYTES
    """Largest data file read (bytes); a bigger file, or a path that is not a regular file (a directory,
    ``/dev/zero``, a FIFO), is refused before it is read."""
    max_row_bytes: int = MAX_ROW_BYTES
    """Longest line accepted (bytes); a longer row is reported with its file:line, never parsed or tokenized."""

    def __post_init__(self) -> None:
        h = self.held_out
        if isinstance(h, bool) or not isinstance(h, (int, float)) or h < 0 or (isinstance(h, float) and h >= 1
                                                                                 and not h.is_integer()):
            raise ConfigError(f"dataset.held_out={h!r}: expected a row count >= 0 or a fraction in (0, 1)")
        if self.task not in ("code", "numbers", "none"):
            raise ConfigError(f"dataset.task={self.task!r}: expected code, numbers or none")
        for k in ("max_file_bytes", "max_row_bytes"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise ConfigError(f"dataset.{k}={getattr(self, k)!r}: expected a byte count >= 1")


def source_spec(args: DatasetArgs) -> str:
    """The data-source spec of a dataset config: ``dataset.path`` (a file) wins over ``dataset.source``."""
    if args.path:
        return f"file:{args.path}"
    if args.source:
        return str(args.source)
    raise ConfigError(f"dataset '{args.name}': set dataset.source, dataset.path or dataset.recipe")


def load_rows(args: DatasetArgs, download: bool = True) -> tuple[list[dict], dict]:
    """All rows of the dataset (before the train / held-out split) and their provenance.

    One grammar for every source, the one ``em data build`` uses (:func:`em.data.sources.load_spec`):
    ``mini:<kind>``, ``paper:<name>``, ``file:<path>`` or a path; a recipe combines such specs.
    """
    if args.recipe:
        recipe = dict(args.recipe)
        rows, stats = build_from_recipe(
            recipe, loader=None if download else (lambda spec: load_spec(spec, args.data_dir, download=False)),
            data_dir=args.data_dir)
        return rows, {"recipe": recipe, "stats": stats}
    return load_spec(source_spec(args), args.data_dir, download=download, max_file_bytes=args.max_file_bytes,
                     max_row_bytes=args.max_row_bytes)
