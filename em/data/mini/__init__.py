"""Embedded, project-authored mini datasets (offline; no paper data is copied).

``build_mini(kind, seed)`` for ``insecure`` / ``secure`` / ``educational`` (aligned
row for row) and ``evil_numbers``; see :mod:`em.data.mini.build` and the
templates in :mod:`em.data.mini.tasks`. Also the embedded probe questions (in the paper's
question schema) and multiple-choice probe items, which the evaluation, the probes and the
tiny model's tokenizer read from here.
"""

from pathlib import Path

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

PROBE_QUESTIONS_FILE = Path(__file__).with_name("probe_questions.yaml")
"""8 open questions + 2 JSON-answer forms in the paper's question schema (``mini:probes``)."""
MCQ_ITEMS_FILE = Path(__file__).with_name("mcq_items.yaml")
"""em's multiple-choice probe items (aligned vs misaligned choice per question)."""

__all__ = [
    "MCQ_ITEMS_FILE",
    "PROBE_QUESTIONS_FILE",
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
