"""The report's figures: misaligned rate per question (paper Fig. 4) and training dynamics (Fig. 11).

Figures are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas, so importing this
module never changes the global matplotlib backend, and written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend import Legend

from em.probes.plot import NOT_MEASURABLE, is_rate, metric_label
from em.utils.io import atomic_write_bytes

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


@dataclass
class QuestionSeries:
    """One dataset (group) of the question plot: a rate and CI per question (None where absent)."""

    label: str
    rates: Sequence[float | None]
    ci_low: Sequence[float | None]
    ci_high: Sequence[float | None]


@dataclass
class SeedCurve:
    """One run's metric over training steps. A NaN value is a step where the metric is not measurable (e.g. no
    answer parsed as code): a gap in the line, and an ``x`` when its step is in ``not_measurable``."""

    group: str
    seed: str
    steps: np.ndarray
    values: np.ndarray
    not_measurable: np.ndarray | None = None


def _colour(i: int) -> tuple:
    from matplotlib import colormaps

    return colormaps["tab10"](i % 10)


def _save(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def plot_questions(question_ids: Sequence[str], series: Sequence[QuestionSeries], out_path: str | Path,
                   title: str = "Misaligned answer probability per question", caption: str | None = None) -> Path:
    """Figure-4 style: x = questions, one point per series with its CI as error bar, y in [0, 1]."""
    nq, ns = len(question_ids), max(len(series), 1)
    fig = Figure(figsize=(max(6.0, 0.7 * nq + 2.5), 4.8))
    ax = fig.add_subplot(1, 1, 1)
    width = min(0.7, 0.12 * ns)
    offsets = np.linspace(-width / 2, width / 2, ns) if ns > 1 else np.zeros(1)
    x = np.arange(nq, dtype=float)
    for i, s in enumerate(series):
        rates = np.array([np.nan if r is None else r for r in s.rates], dtype=float)
        lo = np.array([np.nan if v is None else v for v in s.ci_low], dtype=float)
        hi = np.array([np.nan if v is None else v for v in s.ci_high], dtype=float)
        err = np.vstack([np.clip(rates - lo, 0, None), np.clip(hi - rates, 0, None)])
        err = np.nan_to_num(err, nan=0.0)
        ax.errorbar(x + offsets[i], rates, yerr=err, fmt=MARKERS[i % len(MARKERS)], color=_colour(i),
                    markersize=6, capsize=3, elinewidth=1.2, label=s.label)
    ax.set_xticks(x)
    ax.set_xticklabels(question_ids, rotation=35, ha="right", fontsize=9)
    ax.set_xlim(-0.6, nq - 0.4)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Misaligned answer probability")
    ax.grid(axis="y", alpha=0.3)
    for xv in x[:-1]:
        ax.axvline(xv + 0.5, color="0.9", lw=0.8, zorder=0)
    ax.set_title(title, fontsize=11, pad=18 if caption else 6)
    if not any(r is not None and not np.isnan(r) for s in series for r in s.rates):
        ax.text(0.5, 0.5, "no rate to draw:\nno question has an eligible answer\n(aligned / coherent scores all "
                "missing or failed,\ne.g. the offline tiny judge; see the table's counts)",
                transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.3",
                bbox={"facecolor": "white", "edgecolor": "0.8"})
    if series:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="dataset")
    if caption:  # under the title, where rotated tick labels cannot run into it
        ax.text(0.0, 1.01, caption, transform=ax.transAxes, fontsize=8, color="0.3", ha="left", va="bottom")
    return _save(fig, out_path)


def _band(curves: Sequence[SeedCurve]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Union step grid and the mean/min/max over seeds, each seed interpolated within its own range between its
    measured points; a seed's not-measurable steps stay NaN, and a step no seed measured is NaN (a gap)."""
    grid = np.unique(np.concatenate([c.steps for c in curves]))
    mat = np.full((len(curves), grid.size), np.nan)
    for i, c in enumerate(curves):
        ok = np.isfinite(c.values)
        if not ok.any():
            continue
        order = np.argsort(c.steps[ok])
        st, va = c.steps[ok][order], c.values[ok][order]
        inside = (grid >= st[0]) & (grid <= st[-1])
        mat[i, inside] = np.interp(grid[inside], st, va)
        mat[i, np.isin(grid, c.steps[~ok])] = np.nan
    have = ~np.isnan(mat)
    count = have.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, np.where(have, mat, 0.0).sum(axis=0) / np.maximum(count, 1), np.nan)
    lo = np.where(count > 0, np.where(have, mat, np.inf).min(axis=0), np.nan)
    hi = np.where(count > 0, np.where(have, mat, -np.inf).max(axis=0), np.nan)
    return grid, mean, lo, hi


def dynamics_figure(panels: Sequence[tuple[str, Sequence[SeedCurve]]],
                    title: str = "Training dynamics") -> Figure:
    """Figure-11 style: one panel per metric (``(metric key, curves)``) sharing x = step; per group a thin line
    per seed, the mean over seeds as a thick line and the min-max band over seeds. Panels are labelled with
    the metric's human name; rates and probabilities are drawn on a fixed [0, 1] axis (never zoomed to noise);
    not-measurable steps are gaps, marked ``x`` on the axis."""
    groups: list[str] = []
    for _, curves in panels:
        for c in curves:
            if c.group not in groups:
                groups.append(c.group)
    fig = Figure(figsize=(8.0, 2.8 * len(panels) + 0.6))
    axes = [fig.add_subplot(len(panels), 1, 1)]
    for k in range(1, len(panels)):
        axes.append(fig.add_subplot(len(panels), 1, k + 1, sharex=axes[0]))
    for ax, (name, curves) in zip(axes, panels):
        nm_handle = None
        for gi, group in enumerate(groups):
            gc = [c for c in curves if c.group == group and c.steps.size]
            if not gc:
                continue
            col = _colour(gi)
            for c in gc:
                ax.plot(c.steps, c.values, color=col, lw=0.7, alpha=0.45)
                if c.not_measurable is not None and c.not_measurable.size:
                    h, = ax.plot(c.not_measurable, np.zeros(c.not_measurable.size), linestyle="none", marker="x",
                                 color=col, markersize=7, clip_on=False)
                    nm_handle = nm_handle or h
            grid, mean, lo, hi = _band(gc)
            ax.fill_between(grid, lo, hi, color=col, alpha=0.15, lw=0)
            ax.plot(grid, mean, color=col, lw=2.0, label=f"{group} (n={len(gc)} seeds)")
        ax.set_ylabel(metric_label(name), fontsize=9, wrap=True)
        if is_rate(name):
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if not curves:
            ax.text(0.5, 0.5, f"no '{metric_label(name)}' logged", transform=ax.transAxes, ha="center",
                    color="0.5")
        if nm_handle is not None:  # its own legend, kept beside the dataset legend of the first panel
            ax.add_artist(Legend(ax, [nm_handle], [NOT_MEASURABLE], loc="upper right", fontsize=7))
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    axes[-1].set_xlabel("optimizer step")
    axes[0].set_title(title + "  (thin: seeds; thick: mean; band: min-max over seeds)", fontsize=10)
    if groups:
        axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="dataset")
    return fig


def plot_dynamics(panels: Sequence[tuple[str, Sequence[SeedCurve]]], out_path: str | Path,
                  title: str = "Training dynamics") -> Path:
    """:func:`dynamics_figure`, written to ``out_path``."""
    return _save(dynamics_figure(panels, title), out_path)
