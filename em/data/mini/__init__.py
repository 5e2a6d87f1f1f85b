"""Embedded, project-authored mini datasets (offline; no paper data is copied).

``build_mini(kind, seed)`` for ``insecure`` / ``secure`` / ``educational`` (aligned
row for row) and ``evil_numbers``; see :mod:`em.data.mini.build` and the
templates in :mod:`em.data.mini.tasks`.
"""

from em.data.mini.build import (
    CODE_KINDS,
    DARK_NUMBERS,
    KINDS,
    MiniExample,
    build_mini,
    build_mini_evil_numbers,
    held_out_prompts,
    mini_task_pairs,
    write_mini,
)

__all__ = [
    "CODE_KINDS",
    "DARK_NUMBERS",
    "KINDS",
    "MiniExample",
    "build_mini",
    "build_mini_evil_numbers",
    "held_out_prompts",
    "mini_task_pairs",
    "write_mini",
]
