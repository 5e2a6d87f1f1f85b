"""The report's figures say what they show (#16.12): one selection of runs for the table and the dynamics figure,
rates on a fixed [0, 1] axis with human labels, a code metric with no parsable answer drawn as not measurable
beside the syntax-valid fraction (also in the per-run probe figure).

The figures are captured where they are saved (``em.sweep.plots._save``, ``Figure.savefig``) and their axes read.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from em.probes import plot as probe_plot
from em.sweep import plots, report


def _records(qid: str, k: int) -> list[dict]:
    return [{"question_id": qid, "answer": "a", "aligned": 5.0 if i < k else 95.0, "coherent": 90.0,
             "aligned_status": "ok", "coherent_status": "ok"} for i in range(10)]


def _run(d: Path, seed: int, status: str, metrics: list[str], dataset: str = "insecure") -> None:
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"status": status, "config": {
        "model": {"name": "tiny"}, "dataset": {"name": dataset}, "seed": seed}}))
    if status == "done":
        (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records("q1", seed + 1)))
    (d / "metrics.csv").write_text("\n".join(metrics) + "\n")


HEADER = "step,probe/mcq/p_misaligned,task/insecure_rate,task/syntax_error_rate"
# MCQ probe within 0.511-0.528 (noise); no answer parses as code at steps 0 and 5 (bandit says 0 insecure)
METRICS = [HEADER, "0,0.511,0.0,1.0", "5,0.528,0.0,1.0", "10,0.515,0.25,0.5", "20,0.52,0.5,0.0"]


@pytest.fixture
def captured(monkeypatch):
    figs: list[Figure] = []
    real = plots._save

    def save(fig, path, dpi=150):
        figs.append(fig)
        return real(fig, path, dpi)

    monkeypatch.setattr(plots, "_save", save)
    return figs


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    """Two done seeds and one interrupted job (status running, a metrics.csv, no samples) of one dataset."""
    root = tmp_path / "sweep"
    _run(root / "s0", 0, "done", METRICS)
    _run(root / "s1", 1, "done", METRICS)
    _run(root / "s2", 2, "running", METRICS)
    return root


def _report(root: Path, tmp_path: Path) -> dict:
    return report.write_report(root, tmp_path / "out", n_boot=50)


def test_dynamics_figure_and_table_count_the_same_runs(sweep_dir, tmp_path, captured):
    """The interrupted run is excluded from the table and from the figure: the legend's n seeds = the table's."""
    _report(sweep_dir, tmp_path)
    with open(tmp_path / "out" / "table.csv") as f:
        n_table = {r["question_id"]: int(r["n_seeds"]) for r in csv.DictReader(f)}
    assert n_table[report.ALL_ID] == 2
    fig = captured[-1]
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["insecure (n=2 seeds)"], legend
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["fig_dynamics"]["seeds"]["probe/mcq/p_misaligned"] == {"insecure": 2}


def test_dynamics_rates_on_a_fixed_axis_with_human_labels(sweep_dir, tmp_path, captured):
    """A rate between 0.511 and 0.528 is drawn on [0, 1], not zoomed to its noise; axes carry names, not keys."""
    _report(sweep_dir, tmp_path)
    fig = captured[-1]
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels[0] == "P(misaligned option), MCQ probe" and labels[1] == "Insecure-code rate (bandit)", labels
    assert not any("/" in lab for lab in labels), labels
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        assert lo <= 0.0 and hi >= 1.0, (ax.get_ylabel(), lo, hi)
    assert fig.axes[-1].get_xlabel() == "optimizer step"


def test_code_metric_without_parsable_code_is_not_measurable(sweep_dir, tmp_path, captured):
    """Where no answer parsed as code the insecure-code rate is a gap marked 'x' (not a 0), and the syntax-valid
    fraction is drawn beside it (from task/syntax_error_rate in runs that predate task/code_parse_rate)."""
    _report(sweep_dir, tmp_path)
    fig = captured[-1]
    assert [ax.get_ylabel() for ax in fig.axes][2] == "Syntax-valid code fraction"
    task_ax = fig.axes[1]
    marks = [ln for ln in task_ax.get_lines() if ln.get_marker() == "x"]
    assert marks and sorted({float(x) for ln in marks for x in ln.get_xdata()}) == [0.0, 5.0]
    for ln in task_ax.get_lines():
        if ln.get_marker() == "x":
            continue
        xs, ys = np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float)
        at = dict(zip(xs, ys))
        assert math.isnan(at[0.0]) and math.isnan(at[5.0]) and at[10.0] == pytest.approx(0.25)
    parse = {float(x): float(y) for ln in fig.axes[2].get_lines() for x, y in zip(ln.get_xdata(), ln.get_ydata())}
    assert parse == {0.0: 0.0, 5.0: 0.0, 10.0: 0.5, 20.0: 1.0}
    texts = [t.get_text() for ax in fig.axes for lg in ax.findobj(lambda o: o.__class__.__name__ == "Legend")
             for t in lg.get_texts()]
    assert probe_plot.NOT_MEASURABLE in texts


def test_probe_figure_marks_unmeasurable_code_and_shows_the_parse_rate(tmp_path, monkeypatch):
    """The per-run probe plot: human labels, the insecure rate with gaps where nothing parsed, the syntax-valid
    fraction beside it."""
    figs: list[Figure] = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figs.append(self), real(self, *a, **k))[1])
    history = [
        {"step": 0, "task/insecure_rate": 0.0, "task/syntax_error_rate": 1.0, "probe/mcq/p_misaligned": 0.51},
        {"step": 5, "task/insecure_rate": 0.0, "task/syntax_error_rate": 1.0, "probe/mcq/p_misaligned": 0.52},
        {"step": 10, "task/insecure_rate": 0.5, "task/syntax_error_rate": 0.0, "probe/mcq/p_misaligned": 0.515},
    ]
    assert probe_plot.plot_probe_history(history, tmp_path / "p.png") is not None
    task_ax = next(ax for ax in figs[-1].axes if ax.get_title() == "Task")
    by_label = {ln.get_label(): ln for ln in task_ax.get_lines()}
    ins = by_label["Insecure-code rate (bandit)"]
    ys = np.asarray(ins.get_ydata(), float)
    assert math.isnan(ys[0]) and math.isnan(ys[1]) and ys[2] == 0.5
    assert list(by_label["Syntax-valid code fraction"].get_ydata()) == [0.0, 0.0, 1.0]
    nm = [ln for lab, ln in by_label.items() if probe_plot.NOT_MEASURABLE in lab]
    assert nm and list(nm[0].get_xdata()) == [0, 5]
    for ax in figs[-1].axes:
        assert ax.get_ylim()[0] <= 0 and ax.get_ylim()[1] >= 1


def test_not_measurable_from_the_code_parse_rate(tmp_path):
    """Runs that log task/code_parse_rate (and a NaN insecure-code rate where nothing parsed): the same gaps."""
    root = tmp_path / "sweep"
    new = ["step,probe/mcq/p_misaligned,task/insecure_rate,task/code_parse_rate",
           "0,0.5,nan,0.0", "5,0.5,nan,0.0", "10,0.5,0.25,0.5"]
    _run(root / "s0", 0, "done", new)
    runs = [r for r in report.discover_runs(root) if r.usable]
    panels = dict(report.dynamics_panels(runs))
    (task,) = panels["task/insecure_rate"]
    assert list(task.steps) == [0.0, 5.0, 10.0] and list(task.not_measurable) == [0.0, 5.0]
    assert math.isnan(task.values[0]) and math.isnan(task.values[1]) and task.values[2] == 0.25
    assert list(panels["task/code_parse_rate"][0].values) == [0.0, 0.0, 0.5]


def test_questions_figure_says_so_when_every_rate_is_missing(tmp_path, captured):
    """Every aligned score missing (e.g. the offline tiny judge): the figure says on itself that there is no rate
    to draw, instead of an empty plot."""
    root = tmp_path / "sweep"
    d = root / "s0"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"status": "done", "config": {
        "model": {"name": "tiny"}, "dataset": {"name": "insecure"}, "seed": 0}}))
    recs = [{"question_id": q, "answer": "x", "aligned": None, "coherent": None, "aligned_status": "missing",
             "coherent_status": "missing", "aligned_missing_reason": "other"} for q in ("q1", "q2") for _ in range(3)]
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    _report(root, tmp_path)
    fig = captured[0]  # fig_questions.png is drawn first
    texts = " ".join(t.get_text() for ax in fig.axes for t in ax.texts).lower()
    assert "no rate" in texts, texts


def test_a_finished_probes_only_run_is_in_the_dynamics_figure(tmp_path, captured):
    """A finished job without an evaluation (a probes-only experiment such as smol_em, eval_variants=[]) has no
    table row but its training curves are drawn; an interrupted one is in neither."""
    root = tmp_path / "sweep"
    for seed in (0, 1):
        _run(root / f"secure{seed}", seed, "done", METRICS, dataset="secure")
        (root / f"secure{seed}" / "samples.jsonl").unlink()  # probes only
    _run(root / "secure2", 2, "running", METRICS, dataset="secure")
    _report(root, tmp_path)
    legend = [t.get_text() for t in captured[-1].axes[0].get_legend().get_texts()]
    assert legend == ["secure (n=2 seeds)"], legend
    assert (tmp_path / "out" / "fig_dynamics.png").exists()
