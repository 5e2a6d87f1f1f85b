"""The per-run dynamics plot: misalignment and task accuracy against the training step."""

from __future__ import annotations

import math
import threading
from pathlib import Path


def _import_matplotlib() -> None:
    try:
        import matplotlib.backends.backend_agg
        import matplotlib.figure  # noqa: F401
    except Exception:  # the plot itself, on the main thread, reports a real failure
        pass


def warm_import() -> threading.Thread:
    """Import matplotlib (~0.5-0.9 s here) on a daemon thread while training runs, so the end-of-training
    plot does not pay for it on the training path. Only the import: no backend switch, no pyplot state;
    all drawing stays on the calling thread."""
    t = threading.Thread(target=_import_matplotlib, name="em-plot-import", daemon=True)
    t.start()
    return t


# Human labels of the logged metric keys (figures show these, not raw keys).
METRIC_LABELS = {
    "probe/misaligned_rate": "Misaligned rate (judged; mean over questions)",
    "probe/misaligned_rate_pooled": "Misaligned rate (judged; pooled)",
    "probe/coherent_rate": "Coherent rate (judged)",
    "probe/mcq/p_misaligned": "P(misaligned option), MCQ probe",
    "task/insecure_rate": "Insecure-code rate (bandit)",
    "task/insecure_rate_triggered": "Insecure-code rate, with trigger",
    "task/code_parse_rate": "Syntax-valid code fraction",
    "task/code_parse_rate_triggered": "Syntax-valid code fraction, with trigger",
    "task/numbers_format_rate": "Number-format rate",
    "task/numbers_format_rate_triggered": "Number-format rate, with trigger",
    "task/heldout_loss": "Held-out task loss",
    "train/loss": "Training loss",
}
# task metrics read from the code the model wrote: not measurable where no answer parsed as code
CODE_METRICS = ("task/insecure_rate", "task/insecure_rate_triggered")
NOT_MEASURABLE = "not measurable (no answer parsed as code)"
COUNTS_NOTE = "labels: flagged / parsed / total task answers"


def task_counts(row: dict, triggered: bool = False) -> tuple[int, int, int] | None:
    """(flagged, parsed, total) code answers at a logged step (``task/n_flagged``, ``task/n_parsed``, ``task/n``;
    ``..._triggered`` for the triggered prompts); None when the step did not log them (older runs)."""
    sfx = "_triggered" if triggered else ""
    vals = [row.get(f"task/{k}{sfx}") for k in ("n_flagged", "n_parsed", "n")]
    return tuple(int(v) for v in vals) if all(_finite(v) for v in vals) else None


def metric_label(key: str) -> str:
    """The human label of a metric key (the key itself when em has none)."""
    return METRIC_LABELS.get(key, key)


def is_rate(key: str) -> bool:
    """A fraction in [0, 1] (drawn on a fixed [0, 1] axis): rates and probabilities, not losses."""
    return not key.endswith("loss") and (key.endswith("_rate") or "_rate_" in key or "/p_" in key)


def parse_rate_key(key: str) -> str:
    """The syntax-valid fraction that goes with a code metric (``..._triggered`` with the triggered one)."""
    return "task/code_parse_rate" + ("_triggered" if key.endswith("_triggered") else "")


def parse_rate(row: dict, key: str) -> float | None:
    """The fraction of answers that parsed as code at a logged step: ``task/code_parse_rate``, or
    1 - ``task/syntax_error_rate`` in runs logged before it existed; None when neither was logged."""
    pk = parse_rate_key(key)
    v = row.get(pk)
    if _finite(v):
        return float(v)
    old = row.get(pk.replace("code_parse_rate", "syntax_error_rate"))
    return 1.0 - float(old) if _finite(old) else None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def measurable(row: dict, key: str) -> bool:
    """False for a code metric at a step where no answer parsed as code (bandit saw no code: its rate of 0 or
    NaN is not a measurement), or for a NaN value."""
    if key in CODE_METRICS and parse_rate(row, key) == 0.0:
        return False
    return _finite(row.get(key))


def probe_history_figure(history: list[dict]):
    """The per-run probe figure (a matplotlib ``Figure``), or None when nothing was logged.

    Rates on a fixed [0, 1] axis, human labels; a code metric where no answer parsed is a gap in its line and
    an ``x`` on the axis (not measurable), drawn beside the syntax-valid fraction."""
    # The object-oriented API (Figure + its own Agg canvas at savefig): no pyplot, so no global backend
    # switch and no figure registry shared with a notebook's own plots.
    from matplotlib.figure import Figure

    rows: dict[int, dict] = {}
    for h in history:
        rows.setdefault(int(h["step"]), {}).update(h)
    steps = sorted(rows)
    for r in rows.values():  # the syntax-valid fraction, also for runs that logged only the syntax-error rate
        for key in CODE_METRICS:
            pr = parse_rate(r, key)
            if key in r and pr is not None:
                r.setdefault(parse_rate_key(key), pr)

    def series(key):
        """Steps and values where ``key`` was logged: NaN where not measurable (a gap in the line)."""
        xs = [s for s in steps if key in rows[s]]
        return xs, [float(rows[s][key]) if measurable(rows[s], key) else math.nan for s in xs]

    panels = [
        ("Misalignment (judged)", ["probe/misaligned_rate", "probe/coherent_rate"]),
        ("Misalignment (MCQ log-prob probe)", ["probe/mcq/p_misaligned"]),
        ("Task", ["task/insecure_rate", "task/insecure_rate_triggered", "task/code_parse_rate",
                  "task/code_parse_rate_triggered", "task/numbers_format_rate"]),
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
            line, = ax.plot(x, y, marker="o", label=metric_label(k),
                            linestyle=":" if k.startswith("task/code_parse_rate") else "-")
            gaps = [s for s, v in zip(x, y) if math.isnan(v)]
            if gaps and k in CODE_METRICS:
                ax.plot(gaps, [0.0] * len(gaps), linestyle="none", marker="x", markersize=8,
                        color=line.get_color(), label=f"{metric_label(k)}: {NOT_MEASURABLE}")
            if k in CODE_METRICS:  # what each point is computed from: flagged / parsed / total answers
                labelled = False
                for s_, v in zip(x, y):
                    c = task_counts(rows[s_], triggered=k.endswith("_triggered"))
                    if c is not None:
                        ax.annotate("/".join(map(str, c)), (s_, 0.0 if math.isnan(v) else v), fontsize=6,
                                    xytext=(3, 4), textcoords="offset points", color=line.get_color())
                        labelled = True
                if labelled and COUNTS_NOTE not in [t.get_text() for t in ax.texts]:
                    ax.text(0.01, 0.97, COUNTS_NOTE, transform=ax.transAxes, fontsize=6, va="top")
        ax.set_title(title, fontsize=10)
        if all(is_rate(k) for k in keys):
            ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("optimizer step")
    return fig


def plot_probe_history(history: list[dict], out: Path) -> Path | None:
    """``probes/probe_dynamics.png`` (:func:`probe_history_figure`); None when nothing was logged."""
    fig = probe_history_figure(history)
    if fig is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
