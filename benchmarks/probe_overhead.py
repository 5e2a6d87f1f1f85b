"""Overhead of the mid-training probe callback on the embedded default, measured side by side.

    python benchmarks/probe_overhead.py [--repeats 2] [extra hydra overrides...]

Runs the default `train.py` config (tiny model, mini insecure set, default probe cadence, offline tiny
judge) with `callbacks=none` and with `callbacks=probes`, alternating, and reports the fit wall time of
each and the overhead fraction (probes - none) / none (median and best-of runs), and, from the callback's
own clock (``probes/probe_timing.json``), the time it held the training loop by phase over the rest of the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def fit_once(overrides: list[str], run_dir: Path) -> dict:
    from hydra import compose, initialize_config_dir

    from em.training.run import train

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.run_dir={run_dir}", "trainer.enable_progress_bar=false"])
    t0 = time.perf_counter()
    s = train(cfg)
    s["bench_wall_s"] = time.perf_counter() - t0
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    out: dict[str, list[float]] = {"none": [], "probes": []}
    timing: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        fit_once(["callbacks=none", "trainer.max_steps=2", *a.overrides], Path(tmp) / "warmup")  # tiny model, caches
        for r in range(a.repeats):
            for mode in ("none", "probes"):
                run_dir = Path(tmp) / f"{mode}{r}"
                s = fit_once([f"callbacks={mode}", *a.overrides], run_dir)
                out[mode].append(s["bench_wall_s"])
                if mode == "probes":
                    t = json.loads((run_dir / "probes" / "probe_timing.json").read_text())
                    t["run_wall_s"] = s["bench_wall_s"]
                    timing.append(t)
    none, probes = statistics.median(out["none"]), statistics.median(out["probes"])
    # In-run: the time the callback held the training loop (its own clock, by phase) over the rest of that
    # same run. Side by side: whole runs with and without the callback (includes contention from the judge
    # thread, but also run-to-run noise of a few percent on a shared 2-core machine).
    in_run = [t["total_on_path_s"] / (t["run_wall_s"] - t["total_on_path_s"]) for t in timing]
    result = {
        "train_wall_s_without_probes": round(none, 2),
        "train_wall_s_with_probes": round(probes, 2),
        "overhead_fraction_side_by_side": round((probes - none) / none, 3),
        "overhead_fraction_side_by_side_min": round((min(out["probes"]) - min(out["none"])) / min(out["none"]), 3),
        "overhead_fraction_in_run": round(statistics.median(in_run), 3),
        "callback_time_on_path_s": timing[len(timing) // 2],
        "runs": out,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
