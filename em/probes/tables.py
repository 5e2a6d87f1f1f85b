"""The probes' W&B tables: one definition of their columns and rows, for the live callback and ``em wandb upload``.

``probe/samples``: the probe questions' answers with their judge scores. ``probe/task_samples``: every task answer
with what the task scorer found (filter on ``insecure`` / ``parsed`` / ``hit_budget`` to read the flagged, the
unparsable or the cut-off answers of a step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PROBE_SAMPLE_COLUMNS = ["step", "question_id", "answer", "aligned", "coherent", "aligned_status"]
TASK_SAMPLE_COLUMNS = ["step", "prompt_id", "triggered", "parsed", "insecure", "flagged_test_ids", "format_ok",
                       "dark_numbers", "n_tokens", "hit_budget", "parse_error", "prompt", "answer"]


def _cell(v: Any) -> Any:
    """Lists as comma-joined text (filterable in the W&B table view); everything else as is."""
    return ", ".join(map(str, v)) if isinstance(v, list) else v


def table_rows(columns: Sequence[str], step: int, records: Sequence[dict]) -> list[list[Any]]:
    """One row per record: ``step`` first, then the record's value of each further column (None if absent)."""
    return [[step] + [_cell(r.get(c)) for c in columns[1:]] for r in records]
