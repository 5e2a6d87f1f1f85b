"""Judge under load (issue #15.11): N queued judgments against a loopback OpenAI-compatible server with latency.

    flock /tmp/em-cpu.lock python benchmarks/judge_load.py                 # 10,000 judgments, 16 in flight
    python benchmarks/judge_load.py --n 2000 --latency-ms 10 --concurrency 8 --json out.json

The server runs in its own process (``em.testing.FakeOpenAIServer``, so its threads do not count in the
client's memory) and reports the most requests it ever had in flight. The client is em's OpenAIJudge through
the openai SDK, cache off, so every judgment is a real HTTP request; a short warm-up run first pays the
imports. Reported: judgments/s, the server's max in-flight count against the concurrency limit, the
client's RSS growth during the run (sampled every 20 ms) at a small and at the full queue size, per
judgment, to show that the queue itself adds no memory beyond the results it returns, and the peak RSS.
Figures, not assertions: wall times on a shared CPU box are noisy
(the load average is printed beside them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

SERVER = r"""
import json, sys
from em.testing.fake_openai import FakeOpenAIServer
with FakeOpenAIServer(delay_s=float(sys.argv[1])) as srv:
    print(srv.base_url, flush=True)
    sys.stdin.readline()
    print(json.dumps({"count": srv.count, "max_in_flight": srv.max_in_flight}), flush=True)
"""


def run_once(n: int, concurrency: int, latency_s: float) -> dict:
    from em.eval.judge import JudgeRequest, OpenAIJudge

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    srv = subprocess.Popen([sys.executable, "-c", SERVER, str(latency_s)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True, env=env)
    try:
        base_url = srv.stdout.readline().strip()
        judge = OpenAIJudge(base_url=base_url, cache=False, max_concurrency=concurrency, timeout_s=60, max_retries=2)
        reqs = [JudgeRequest(f"judge prompt {i} [[score={i % 101}]]", "aligned") for i in range(n)]
        proc = psutil.Process()
        rss0 = proc.memory_info().rss
        peak = [rss0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.02):
                peak[0] = max(peak[0], proc.memory_info().rss)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        t0 = time.perf_counter()
        results = judge.judge(reqs, progress=False)
        wall = time.perf_counter() - t0
        stop.set()
        t.join()
        growth = max(0, peak[0] - rss0)
        srv.stdin.write("stats\n")
        srv.stdin.flush()
        stats = json.loads(srv.stdout.readline())
    finally:
        srv.stdin.close()
        srv.wait(timeout=30)
    ok = sum(r.status == "ok" for r in results)
    return {"n": n, "ok": ok, "failed": sum(r.status == "failed" for r in results), "wall_s": round(wall, 2),
            "judgments_per_s": round(n / wall, 1), "server_requests": stats["count"],
            "server_max_in_flight": stats["max_in_flight"], "concurrency_limit": concurrency,
            "rss_growth_mb": round(growth / 2**20, 1), "rss_growth_kb_per_judgment": round(growth / n / 1024, 2),
            "sent": judge.stats.sent, "retries": judge.stats.retries}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--small", type=int, default=1_000, help="the small queue size for the memory comparison")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    out = {"load_avg_before": os.getloadavg()}
    run_once(min(50, args.small), args.concurrency, args.latency_ms / 1000)  # warm-up: imports, first connections
    out["small"] = run_once(args.small, args.concurrency, args.latency_ms / 1000)
    out["full"] = run_once(args.n, args.concurrency, args.latency_ms / 1000)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["load_avg_after"] = os.getloadavg()
    out["latency_ms"] = args.latency_ms
    for k in ("small", "full"):
        r = out[k]
        print(f"{r['n']:>6} judgments: {r['judgments_per_s']:>7} /s ({r['wall_s']} s), ok {r['ok']}, "
              f"failed {r['failed']}, "
              f"server max in flight {r['server_max_in_flight']} (limit {r['concurrency_limit']}), RSS growth "
              f"{r['rss_growth_mb']} MB = {r['rss_growth_kb_per_judgment']} KB/judgment, retries {r['retries']}")
    print(f"client peak RSS {out['peak_rss_mb']} MB; load average {out['load_avg_before']} -> {out['load_avg_after']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    held = all(out[k]["server_max_in_flight"] <= args.concurrency for k in ("small", "full"))
    print("concurrency limit held" if held else "CONCURRENCY LIMIT EXCEEDED")
    return 0 if held else 1


if __name__ == "__main__":
    raise SystemExit(main())
