"""Human-readable figures for forecasts and summaries."""

from __future__ import annotations


def duration(s: float | None) -> str:
    """Seconds as ``42 s`` / ``17 min`` / ``2.5 h`` (``?`` when unknown)."""
    if s is None:
        return "?"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
