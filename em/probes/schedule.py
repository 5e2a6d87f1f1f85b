"""When to probe: every N optimizer steps, or log-spaced (dense early, where the task is learned)."""

from __future__ import annotations

import math


def eval_steps(total_steps: int, every_n_steps: int | None = None, log_points: int | None = None,
               at_start: bool = True, at_end: bool = True) -> list[int]:
    """Sorted optimizer steps at which to probe (0 = before the first update)."""
    steps: set[int] = set()
    if at_start:
        steps.add(0)
    if every_n_steps:
        steps.update(range(every_n_steps, total_steps + 1, every_n_steps))
    if log_points and total_steps > 0:
        for k in range(log_points):
            steps.add(max(1, round(math.exp(math.log(total_steps) * (k + 1) / log_points))))
    if at_end and total_steps > 0:
        steps.add(total_steps)
    return sorted(s for s in steps if 0 <= s <= total_steps)
