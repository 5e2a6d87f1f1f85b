"""benchmarks/train_throughput.py runs with a tiny budget and prints its fields (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


def _module():
    spec = importlib.util.spec_from_file_location("train_throughput", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_em_variants_parse_overrides_and_environment():
    mod = _module()
    assert mod.parse_variant("sorted:") == ("sorted", [], {})
    assert mod.parse_variant("before:model.cross_entropy=plain,$MALLOC_MMAP_THRESHOLD_=1048576,data.x=1") == (
        "before", ["model.cross_entropy=plain", "data.x=1"], {"MALLOC_MMAP_THRESHOLD_": "1048576"})
    with pytest.raises(SystemExit):
        mod.parse_variant(":data.x=1")


def test_summary_pairs_runs_by_repeat_and_reports_ranges():
    mod = _module()
    runs = [{"side": s, "repeat": r, "samples_per_s": v, "trained_tokens_per_s": v * 10, "positions_per_s": v,
             "peak_rss_mb": 100.0, "loadavg_before": [1.0, 1.0, 1.0]}
            for s, vals in (("em", [4.0, 6.0, 9.0]), ("trl", [2.0, 2.0, 3.0])) for r, v in enumerate(vals)]
    out = mod.summarise(runs, ["em", "trl"])
    r = out["ratios"]["em/trl"]["trained_tokens_per_s"]
    assert (r["min"], r["median_paired"], r["max"], r["pairs"]) == (2.0, 3.0, 3.0, 3)
    assert out["sides"]["em"]["samples_per_s"] == {"min": 4.0, "median": 6.0, "max": 9.0}


def test_a_packed_batch_counts_its_rows_not_its_one_packed_row():
    from em.data.chat import Encoded
    from em.data.collate import PackCollator, PadCollator

    mod = _module()
    rows = [Encoded([5, 6, 7], [-100, 6, 7]), Encoded([8, 9], [-100, 9]), Encoded([4, 5, 6, 7], [-100, -100, 6, 7])]
    rec = mod.StepRecorder(cuda=False)
    rec.record(PackCollator()(rows))
    rec.record(PadCollator(0)(rows))
    packed, padded = rec.steps
    assert packed["samples"] == padded["samples"] == 3
    assert (packed["positions"], packed["real"], padded["positions"], padded["real"]) == (9, 9, 12, 9)
    assert packed["trained"] == padded["trained"] == 5  # labels 6, 7 | 9 | 6, 7


@pytest.mark.slow
def test_benchmark_runs_with_a_tiny_budget_and_prints_its_fields(tmp_path):
    sides = "em,trl,hf" if importlib.util.find_spec("trl") else "em,hf"
    out = tmp_path / "report.json"
    p = subprocess.run([sys.executable, str(BENCH), "--models", "tiny", "--steps", "3", "--warmup", "1",
                        "--repeats", "1", "--sides", sides, "--batch", "4", "--max-length", "128",
                        "--em-variant", "em:", "--em-variant", "unsorted:data.group_by_length=false",
                        "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for field in ("samples/s", "trained tokens/s", "positions/s", "padding", "peak RSS", "em/hf", "unsorted/em",
                  "load avg", "OMP_NUM_THREADS=1"):
        assert field in p.stdout, field
    rep = json.loads(out.read_text())["models"]["tiny"]
    assert {r["side"] for r in rep["runs"]} == set(sides.replace("em", "em,unsorted").split(","))
    for r in rep["runs"]:
        assert r["threads"] == 1 and r["timed_steps"] == 1 and r["samples_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert 0 <= r["padding_fraction"] < 1 and r["trained_tokens_per_s"] > 0
        # samples/s x the mean trained tokens per row of the side's whole data set
        per_row = r["info"]["trained_tokens_per_row"]
        assert per_row > 0 and r["rows_trained_tokens_per_s"] == pytest.approx(r["samples_per_s"] * per_row)
    assert "median_paired" in rep["summary"]["ratios"]["em/hf"]["trained_tokens_per_s"]
    assert "median_paired" in rep["summary"]["ratios"]["em/hf"]["rows_trained_tokens_per_s"]
