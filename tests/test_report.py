"""Cross-seed sweep report on a hand-made sweep with known rates."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from em.errors import EMError
from em.report import main as report_main
from em.sweep.report import ALL_ID, write_report

N_BOOT = 500
# dataset -> question -> misaligned rate per seed (10 eligible answers per seed and question)
RATES = {
    "insecure": {"quick_buck": [0.2, 0.3, 0.4], "i_feel_bored": [0.1, 0.1, 0.1]},
    "secure": {"quick_buck": [0.0, 0.0, 0.1], "i_feel_bored": [0.0, 0.0, 0.0]},
}


def _records(qid: str, rate: float) -> list[dict]:
    k = round(rate * 10)
    recs = [{"question_id": qid, "answer": "a", "aligned": 5.0 if i < k else 95.0, "coherent": 90.0,
             "aligned_status": "ok", "coherent_status": "ok"} for i in range(10)]
    recs += [  # never in the denominator, each counted in its own column
        {"question_id": qid, "answer": "import os", "aligned": None, "coherent": 80.0, "aligned_status": "missing",
         "coherent_status": "ok", "aligned_missing_reason": "CODE"},
        {"question_id": qid, "answer": "b", "aligned": None, "coherent": None, "aligned_status": "failed",
         "coherent_status": "failed"},
        {"question_id": qid, "answer": "c", "aligned": 1.0, "coherent": 10.0, "aligned_status": "ok",
         "coherent_status": "ok"},
    ]
    return recs


def _metrics_csv(path: Path, offset: float) -> None:
    path.parent.mkdir(parents=True)
    lines = ["epoch,step,train/loss,probe/misaligned_rate,task/insecure_rate"]
    for step in range(0, 101, 5):
        lines.append(f"0,{step},{2.0 - step / 100:.3f},,")
        if step % 10 == 0:
            lines.append(f"0,{step},,{min(1.0, offset + step / 400):.3f},")
        if step % 20 == 0:
            lines.append(f"0,{step},,,{min(1.0, 0.2 + offset + step / 150):.3f}")
    path.write_text("\n".join(lines) + "\n")


def _write_run(d: Path, dataset: str, seed: int, status: str = "done", model: str = "tiny-qwen") -> None:
    d.mkdir(parents=True)
    res = {"status": status, "config": {"model": {"name": model}, "dataset": {"name": dataset}, "seed": seed}}
    if status == "failed":
        res["error"] = "CUDA out of memory (simulated)"
    (d / "results.json").write_text(json.dumps(res))
    if status == "done":
        recs = [r for q, rates in RATES[dataset].items() for r in _records(q, rates[seed])]
        (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        _metrics_csv(d / "logs" / "version_0" / "metrics.csv", 0.05 * seed + (0.3 if dataset == "insecure" else 0.0))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("sweep")
    for dataset in RATES:
        for seed in range(3):
            _write_run(root / f"{dataset}_s{seed}", dataset, seed)
    _write_run(root / "insecure_s9", "insecure", 9, status="failed")
    out = root / "report"
    result = write_report(root, out, n_boot=N_BOOT, seed=0)
    return root, out, result


def _rows(out: Path) -> dict[tuple[str, str], dict]:
    """Per-question rows and the pooled ALL row by (dataset, question); the mean-over-questions row as ALL_MEAN."""
    with open(out / "table.csv") as f:
        return {(r["dataset"], r["question_id"] + ("_MEAN" if r["aggregation"] == "question_mean" else "")): r
                for r in csv.DictReader(f)}


def test_table_rates_and_denominators(sweep):
    _, out, _ = sweep
    rows = _rows(out)
    assert set(rows) == {(d, q) for d in RATES for q in [*RATES[d], ALL_ID, ALL_ID + "_MEAN"]}
    r = rows[("insecure", "quick_buck")]
    assert float(r["misaligned_rate"]) == pytest.approx(0.3)
    assert r["seeds"] == "0;1;2" and r["seed_rates"] == "0.2;0.3;0.4" and r["n_seeds"] == "3"
    assert (r["n_sampled"], r["n_judged"], r["n_failed"], r["n_aligned_missing_CODE"]) == ("39", "36", "3", "3")
    assert (r["n_coherent"], r["n_eligible"], r["n_misaligned"]) == ("33", "30", "9")
    assert float(r["ci_samples_low"]) < 0.3 < float(r["ci_samples_high"])
    assert float(rows[("secure", "quick_buck")]["misaligned_rate"]) == pytest.approx(0.1 / 3)
    assert float(rows[("insecure", ALL_ID)]["misaligned_rate"]) == pytest.approx(0.2)
    assert float(rows[("secure", "i_feel_bored")]["ci_seeds_high"]) == 0.0


def test_over_seeds_ci_is_the_percentile_bootstrap(sweep):
    _, out, _ = sweep
    r = _rows(out)[("insecure", "quick_buck")]
    vals = np.array([0.2, 0.3, 0.4])
    idx = np.random.default_rng(0).integers(0, 3, size=(N_BOOT, 3))
    lo, hi = np.percentile(vals[idx].mean(axis=1), [2.5, 97.5])
    assert float(r["ci_seeds_low"]) == pytest.approx(lo, abs=1e-12)
    assert float(r["ci_seeds_high"]) == pytest.approx(hi, abs=1e-12)
    assert lo < hi


def test_failed_run_listed_and_files(sweep):
    root, out, result = sweep
    with open(out / "runs.csv") as f:
        runs = {Path(r["run_dir"]).name: r for r in csv.DictReader(f)}
    assert runs["insecure_s9"]["status"] == "failed" and runs["insecure_s9"]["used"] == "False"
    assert "out of memory" in runs["insecure_s9"]["error"]
    assert sum(r["used"] == "True" for r in runs.values()) == 6
    md = (out / "table.md").read_text()
    assert "insecure_s9" in md and "| tiny-qwen | insecure | ? | quick_buck | 3 | 0.300 |" in md
    for name in ("fig_questions.png", "fig_dynamics.png"):
        p = out / name
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 20_000, name
    assert json.loads((out / "report.json").read_text())["n_boot"] == N_BOOT


def test_single_seed_and_cli(tmp_path, capsys):
    _write_run(tmp_path / "sw" / "only", "insecure", 1)
    (tmp_path / "sw" / "broken").mkdir()
    (tmp_path / "sw" / "broken" / "samples.jsonl").write_text("{not json\n")
    rc = report_main([str(tmp_path / "sw"), "--out", str(tmp_path / "o"), "--n-boot", "100"])
    assert rc == 0
    r = _rows(tmp_path / "o")[("insecure", "quick_buck")]
    assert r["ci_seeds_low"] == r["ci_seeds_high"] == "0.3" and "collapses" in r["note"]
    log = capsys.readouterr().out
    assert "NOT USED" in log and "broken" in log and "wrote" in log


def test_no_metrics_csv_skips_dynamics(tmp_path, capsys):
    _write_run(tmp_path / "sw" / "a", "secure", 0)
    for p in (tmp_path / "sw").rglob("metrics.csv"):
        p.unlink()
    result = write_report(tmp_path / "sw", n_boot=50)
    assert "fig_dynamics.png" not in result["files"] and "skipped" in capsys.readouterr().out
    assert (tmp_path / "sw" / "report" / "fig_questions.png").exists()


def test_module_entry_point(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "em.report", str(empty)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 2 and "no run found" in proc.stdout


def _write_judged_run(d: Path, dataset: str, seed: int, per_question: dict[str, tuple[int, int]], judge: str,
                      questions=None, rule=None, other_judge: str | None = None) -> None:
    """A run whose question q has (misaligned, eligible) = per_question[q], judged by ``judge`` (an identity
    recorded in results.json as an eval does); ``other_judge`` scores every answer aligned."""
    d.mkdir(parents=True)
    cfg = {"model": {"name": "m"}, "dataset": {"name": dataset}, "seed": seed}
    if questions or rule:
        cfg["eval"] = {"questions": questions, "rule": rule}
    judges = [{"name": judge, "model_id": judge + "-model", "endpoint": f"http://{judge}.example/v1"}]
    if other_judge:
        judges.append({"name": other_judge, "model_id": other_judge + "-model", "endpoint": "local:/x@abc"})
    res = {"status": "done", "config": cfg, "eval": {"meta": {"judge": judges[0], "judges": judges}}}
    (d / "results.json").write_text(json.dumps(res))
    recs = []
    for q, (k, n) in per_question.items():
        for i in range(n):
            r = {"question_id": q, "answer": "a", "aligned": 5.0 if i < k else 95.0, "coherent": 90.0,
                 "aligned_status": "ok", "coherent_status": "ok", "judge": judge}
            if other_judge:
                r["judge_scores"] = {other_judge: {"aligned": 99.0, "aligned_status": "ok", "coherent": 90.0,
                                                   "coherent_status": "ok"}}
            recs.append(r)
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_all_rows_pooled_and_mean_side_by_side_with_own_denominators(tmp_path):
    for seed in (0, 1):  # 'small': 2 of 2 misaligned; 'big': 10 of 100
        _write_judged_run(tmp_path / "sw" / f"s{seed}", "insecure", seed, {"small": (2, 2), "big": (10, 100)}, "gpt")
    write_report(tmp_path / "sw", n_boot=200)
    rows = _rows(tmp_path / "sw" / "report")
    pooled, mean = rows[("insecure", ALL_ID)], rows[("insecure", ALL_ID + "_MEAN")]
    assert float(pooled["misaligned_rate"]) == pytest.approx(12 / 102)
    assert (pooled["n_misaligned"], pooled["n_eligible"]) == ("24", "204")
    assert float(mean["misaligned_rate"]) == pytest.approx(0.55)
    assert pooled["judge"] == mean["judge"] == "gpt"
    md = (tmp_path / "sw" / "report" / "table.md").read_text()
    assert "**ALL · pooled**" in md and "**ALL · mean over questions**" in md and "the paper's aggregation" in md
    # the rule the runs recorded is used (here: the authors' cut-off drops 'small' from the mean)
    for seed in (0, 1):
        d = tmp_path / "sw2" / f"s{seed}"
        _write_judged_run(d, "insecure", seed, {"small": (2, 2), "big": (10, 100)}, "gpt",
                          rule={"coherent_inclusive": True, "min_eligible": 5, "aggregation": "pooled"})
    write_report(tmp_path / "sw2", n_boot=100)
    rows = _rows(tmp_path / "sw2" / "report")
    assert float(rows[("insecure", ALL_ID + "_MEAN")]["misaligned_rate"]) == pytest.approx(0.1)
    assert "recorded by the runs" in (tmp_path / "sw2" / "report" / "table.md").read_text()


def test_mixed_judges_are_refused_unless_asked(tmp_path, capsys):
    _write_judged_run(tmp_path / "sw" / "a", "insecure", 0, {"q": (1, 10)}, "gpt")
    _write_judged_run(tmp_path / "sw" / "b", "insecure", 1, {"q": (5, 10)}, "qwen")
    with pytest.raises(EMError, match="different judges.*gpt-model @ http://gpt.example/v1.*--allow-mixed-judges"):
        write_report(tmp_path / "sw", n_boot=50)
    assert report_main([str(tmp_path / "sw"), "--n-boot", "50"]) == 2
    result = write_report(tmp_path / "sw", n_boot=50, allow_mixed_judges=True)
    by_judge = {(r["judge"], r["aggregation"]): r for r in result["rows"] if r["question_id"] == ALL_ID}
    assert by_judge[("gpt", "pooled")]["misaligned_rate"] == 0.1
    assert by_judge[("qwen", "pooled")]["misaligned_rate"] == 0.5


def test_one_judge_of_multi_judge_runs(tmp_path):
    for seed in (0, 1):
        _write_judged_run(tmp_path / "sw" / f"s{seed}", "insecure", seed, {"q": (4, 10)}, "gpt", other_judge="local")
    rows = write_report(tmp_path / "sw", n_boot=50)["rows"]
    assert {r["judge"] for r in rows} == {"gpt"} and rows[-2]["misaligned_rate"] == pytest.approx(0.4)
    rows = write_report(tmp_path / "sw", tmp_path / "local", n_boot=50, judge="local")["rows"]
    assert {r["judge"] for r in rows} == {"local"} and rows[-2]["misaligned_rate"] == 0.0
    result = write_report(tmp_path / "sw", tmp_path / "nobody", n_boot=50, judge="nobody")
    assert result["rows"] == [] and all("not judged by 'nobody'" in r.error for r in result["runs"])


def test_paper_values_beside_ems_for_paper_sets(tmp_path, capsys):
    ref = json.loads((Path(__file__).resolve().parents[1] / "em" / "eval" / "paper_reference.json").read_text())
    assert ref["sets"]["main"]["rates"]["insecure"] == {"rate": 0.198, "ci_half_width": 0.054}
    assert ref["sets"]["preregistered"]["rates"]["jailbroken"]["rate"] == 0.054 and "arXiv:2502.17424" in ref["source"]
    for ds, k in (("insecure", 2), ("secure", 0)):
        _write_judged_run(tmp_path / "sw" / ds, ds, 0, {"what_is_your_wish": (k, 10)}, "gpt",
                          questions=["paper:first_plot_questions"])
    write_report(tmp_path / "sw", n_boot=50, allow_mixed_judges=False)
    rows = _rows(tmp_path / "sw" / "report")
    assert float(rows[("insecure", ALL_ID)]["paper_rate"]) == 0.198
    assert float(rows[("insecure", ALL_ID)]["paper_ci_half_width"]) == 0.054
    assert float(rows[("secure", ALL_ID)]["paper_rate"]) == 0.0004
    assert rows[("secure", ALL_ID + "_MEAN")]["paper_rate"] == ""
    md = (tmp_path / "sw" / "report" / "table.md").read_text()
    assert "## The paper beside em" in md and "em pooled 0.200" in md and "paper 0.1980 ± 0.054" in md
    assert "paper judged by gpt-4o-2024-08-06, this by gpt-model" in md
    assert "paper 0.198" in capsys.readouterr().out


def test_questions_figure_says_when_there_is_no_rate(tmp_path):
    from em.sweep.plots import QuestionSeries, plot_questions

    p = plot_questions(["q1", "q2"], [QuestionSeries("tiny", [None, None], [None, None], [None, None])],
                       tmp_path / "f.png")
    empty = p.read_bytes()
    p2 = plot_questions(["q1", "q2"], [QuestionSeries("tiny", [0.1, 0.2], [0.0, 0.1], [0.2, 0.3])], tmp_path / "g.png")
    assert empty[:4] == b"\x89PNG" and empty != p2.read_bytes()
