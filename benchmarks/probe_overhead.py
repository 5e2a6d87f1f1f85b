"""Overhead of the mid-training probe callback on the embedded default, measured side by side.

    python benchmarks/probe_overhead.py [--repeats 2] [extra hydra overrides...]

Runs the default `train.py` config (tiny model, mini insecure set, default probe cadence, offline tiny
judge) with `callbacks=none` and with `callbacks=probes`, alternating, and reports the fit wall time of
each and the overhead fraction (probes - none) / none. Also reports the time spent inside probe steps.
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
    probe_s: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        fit_once(["callbacks=none", *a.overrides], Path(tmp) / "warmup")  # build tiny model, tokenize, caches
        for r in range(a.repeats):
            for mode in ("none", "probes"):
                run_dir = Path(tmp) / f"{mode}{r}"
                s = fit_once([f"callbacks={mode}", *a.overrides], run_dir)
                out[mode].append(s["bench_wall_s"])
                if mode == "probes":
                    import csv

                    with open(run_dir / "probes" / "probe_metrics.csv") as f:
                        probe_s.append(sum(float(x["probe/eval_wall_s"]) for x in csv.DictReader(f)
                                           if x.get("probe/eval_wall_s")))
    none, probes = statistics.median(out["none"]), statistics.median(out["probes"])
    result = {
        "train_wall_s_without_probes": round(none, 2),
        "train_wall_s_with_probes": round(probes, 2),
        "overhead_fraction": round((probes - none) / none, 3),
        "time_in_probe_steps_s": round(statistics.median(probe_s), 2),
        "runs": out,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
