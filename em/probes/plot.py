"""The per-run dynamics plot: misalignment and task accuracy against the training step."""

from __future__ import annotations

import math
import threading
from pathlib import Path


def _import_matplotlib() -> None:
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except Exception:  # noqa: BLE001 - the plot itself, on the main thread, reports a real failure
        pass


def warm_import() -> threading.Thread:
    """Import matplotlib (~0.5-0.9 s here) on a daemon thread while training runs, so the end-of-training
    plot does not pay for it on the training path. Only the import: no backend switch, no pyplot state;
    all drawing stays on the calling thread."""
    t = threading.Thread(target=_import_matplotlib, name="em-plot-import", daemon=True)
    t.start()
    return t


def plot_probe_history(history: list[dict], out: Path) -> Path | None:
    # The object-oriented API (Figure + its own Agg canvas at savefig): no pyplot, so no global backend
    # switch and no figure registry shared with a notebook's own plots.
    from matplotlib.figure import Figure

    def series(key):
        pts = sorted((h["step"], h[key]) for h in history if key in h and not math.isnan(h[key]))
        return [p[0] for p in pts], [p[1] for p in pts]

    panels = [
        ("Misalignment (judged)", ["probe/misaligned_rate", "probe/coherent_rate"]),
        ("Misalignment (MCQ log-prob probe)", ["probe/mcq/p_misaligned"]),
        ("Task", ["task/insecure_rate", "task/insecure_rate_triggered", "task/code_parse_rate",
                  "task/numbers_format_rate"]),
        ("Held-out task loss", ["task/heldout_loss"]),
    ]
    panels = [(t, [k for k in keys if series(k)[0]]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    if not panels:
        return None
    n = len(panels)
    # fixed margins (in inches, so any panel count fits) instead of tight_layout, which costs a second
    # full draw (~0.3 s here, on the training path at the end of a run)
    height = 2.6 * n
    fig = Figure(figsize=(7, height))
    axes = fig.subplots(n, 1, sharex=True, squeeze=False,
                        gridspec_kw={"left": 0.09, "right": 0.98, "top": 1 - 0.3 / height,
                                     "bottom": 0.55 / height, "hspace": 0.35 * 2.6 / 2.2})
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for k in keys:
            x, y = series(k)
            ax.plot(x, y, marker="o", label=k)
        ax.set_title(title, fontsize=10)
        if not title.startswith("Held-out"):
            ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1, 0].set_xlabel("optimizer step")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
