"""The end-of-sweep summary: what ran, what was skipped, what failed (``hydra.callbacks`` in sweep.yaml).

:class:`SweepSummary` is a Hydra callback. At the end of a multirun it scans the sweep directory's job
directories (those holding ``results.json`` or Hydra's ``.hydra/overrides.yaml``), prints one screen
(``done`` / ``skipped`` / ``failed`` / ``interrupted`` / ``running``, with run dirs and the first line of each error)
and writes ``<sweep_dir>/sweep_summary.json``. :func:`summarize_sweep` does the same for any sweep dir, e.g.
``python -m em.sweep.summary <sweep_dir>``.

Which jobs belong to *this* invocation: those whose ``.hydra/overrides.yaml`` (written by Hydra when a job
starts, also when it is then skipped) is newer than the multirun's start. Of those, a ``done`` job whose
results were written before the start was *skipped*. Job directories of earlier invocations (another
grid in the same sweep dir) are counted as ``other``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from em.layout import HYDRA_OVERRIDES, RESULTS, find_jobs
from em.sweep.lock import job_state
from em.utils.io import atomic_write_json

SUMMARY_FILE = "sweep_summary.json"
MAX_LINES = 30
CLOCK_SLACK_S = 2.0
ORDER = {"failed": 0, "interrupted": 1, "running": 2, "not_run": 3, "done": 4, "skipped": 5, "other": 6}


def _ts(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return _dt.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def classify(run_dir: Path, since: float | None) -> dict[str, Any]:
    """One job's line: ``action`` in done / skipped / failed / interrupted / running (by another sweep now) / not_run
    / other."""
    res_path = run_dir / RESULTS
    started_marker = run_dir / HYDRA_OVERRIDES
    in_this = since is None or (started_marker.exists() and started_marker.stat().st_mtime >= since - CLOCK_SLACK_S)
    res: dict[str, Any] = {}
    if res_path.exists():
        try:
            res = json.loads(res_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            res = {"status": "unreadable", "error": f"{RESULTS}: {e}"}
    status = res.get("status")
    written = _ts(res.get("end_time")) or (res_path.stat().st_mtime if res_path.exists() else None)
    if not in_this:
        action = "other"
    elif status == "done":
        action = "skipped" if since is not None and written is not None and written < since - CLOCK_SLACK_S else "done"
    elif status == "failed" or status == "unreadable":
        action = "failed"
    elif status == "running":
        action = job_state(run_dir, status)  # running (its lock is live) or interrupted
    else:
        action = "not_run"
    err = res.get("error")
    return {"run_dir": str(run_dir), "action": action, "status": status,
            "error": str(err).splitlines()[0] if err else None, "wall_s": res.get("wall_s"),
            "resumed_from": res.get("resumed_from")}


def summarize_sweep(sweep_dir: str | os.PathLike, since: float | None = None, write: bool = True) -> dict[str, Any]:
    """Classify every job of the sweep; write ``sweep_summary.json`` (if ``write``) and return it.

    ``since`` (a POSIX time): the start of the invocation being summarised; None = every job counts as
    part of it (done ones as ``done``).
    """
    sweep_dir = Path(sweep_dir).resolve()
    jobs = [classify(d, since) for d in find_jobs(sweep_dir)] if sweep_dir.is_dir() else []
    jobs.sort(key=lambda j: (ORDER.get(j["action"], 9), j["run_dir"]))
    counts = {k: sum(j["action"] == k for j in jobs) for k in ORDER}
    summary = {
        "sweep_dir": str(sweep_dir),
        "started": _dt.datetime.fromtimestamp(since, _dt.timezone.utc).isoformat(timespec="seconds") if since else None,
        "ended": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "counts": counts,
        "jobs": jobs,
    }
    if write and sweep_dir.is_dir():
        atomic_write_json(sweep_dir / SUMMARY_FILE, summary)
    return summary


def format_summary(summary: dict[str, Any], max_lines: int = MAX_LINES) -> str:
    """One screen: the counts, then failures first, one line per job, with run dirs relative to the sweep."""
    c = summary["counts"]
    root = Path(summary["sweep_dir"])
    head = (f"== sweep {root}: {c['done']} done, {c['skipped']} skipped (done before), {c['failed']} failed, "
            f"{c['interrupted']} interrupted, {c['running']} running elsewhere, {c['not_run']} without results")
    if c.get("other"):
        head += f"; {c['other']} other run(s) in this dir not part of this invocation"
    lines = [head + " =="]
    shown = [j for j in summary["jobs"] if j["action"] != "other"]
    for j in shown[:max_lines]:
        rel = os.path.relpath(j["run_dir"], root)
        extra = ""
        if j["action"] == "failed":
            extra = f"  {j['error'] or ''}"
        elif j["action"] == "done" and j.get("wall_s") is not None:
            extra = f"  ({j['wall_s']} s{', resumed' if j.get('resumed_from') else ''})"
        elif j["action"] == "interrupted":
            extra = "  (interrupted: the next run of this sweep resumes it)"
        lines.append(f"  {j['action'].upper() if j['action'] == 'failed' else j['action']:<10} {rel}{extra}")
    if len(shown) > max_lines:
        lines.append(f"  ... and {len(shown) - max_lines} more: see {root / SUMMARY_FILE}")
    if c["failed"]:
        lines.append(f"failed jobs: error + traceback in <run_dir>/{RESULTS}; re-run the same command to retry "
                     "them (done jobs are skipped)")
    lines.append(f"summary: {root / SUMMARY_FILE}; report: python -m em.report {root}")
    return "\n".join(lines)


class SweepSummary(Callback):
    """Hydra callback: on multirun end, print the summary and write ``<sweep_dir>/sweep_summary.json``."""

    def __init__(self, max_lines: int = MAX_LINES) -> None:
        self.max_lines = max_lines
        self.started: float | None = None

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        summary = summarize_sweep(sweep_dir, since=self.started)
        print("\n" + format_summary(summary, self.max_lines), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m em.sweep.summary <sweep_dir>``: the state of every job of a sweep dir."""
    p = argparse.ArgumentParser(prog="python -m em.sweep.summary", description=main.__doc__)
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--no-write", action="store_true", help=f"do not (re)write {SUMMARY_FILE}")
    args = p.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: sweep directory not found: {args.sweep_dir}")
        return 2
    print(format_summary(summarize_sweep(args.sweep_dir, write=not args.no_write)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
