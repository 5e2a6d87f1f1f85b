"""The per-run dynamics plot: misalignment and task accuracy against the training step."""

from __future__ import annotations

import math
from pathlib import Path


def plot_probe_history(history: list[dict], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = sorted((h["step"], h[key]) for h in history if key in h and not math.isnan(h[key]))
        return [p[0] for p in pts], [p[1] for p in pts]

    panels = [
        ("Misalignment (judged)", ["probe/misaligned_rate", "probe/coherent_rate"]),
        ("Misalignment (MCQ log-prob probe)", ["probe/mcq/p_misaligned"]),
        ("Task", ["task/insecure_rate", "task/insecure_rate_triggered", "task/numbers_format_rate"]),
        ("Held-out task loss", ["task/heldout_loss"]),
    ]
    panels = [(t, [k for k in keys if series(k)[0]]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
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
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
