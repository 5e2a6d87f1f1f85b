"""Two sweeps on the same grid: a job being run holds a lock; the other sweep skips it (or waits), and says
which (#15.6). One state vocabulary in every view (#16.13)."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from em.sweep.lock import LOCK_FILE, JobLock, job_state, launch_id
from em.sweep.summary import summarize_sweep
from tests.test_sweep import REPO, _env


def _write_lock(run_dir: Path, launch: str, pid: int, age_s: float = 0.0, host: str | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    p = run_dir / LOCK_FILE
    p.write_text(json.dumps({"launch": launch, "host": host or socket.gethostname(), "pid": pid,
                             "started": time.time() - age_s}))
    os.utime(p, (time.time() - age_s, time.time() - age_s))
    return p


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_live_lock_of_another_launch_is_respected(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, "proc:elsewhere:1", other.pid)
        lock = JobLock(tmp_path)
        assert not lock.acquire() and lock.holder.pid == other.pid
        assert (tmp_path / LOCK_FILE).exists()  # untouched
        assert job_state(tmp_path, "running") == "running"
    finally:
        other.kill()
        other.wait()


def test_stale_locks_are_taken_over(tmp_path):
    _write_lock(tmp_path / "dead", "proc:x:1", _dead_pid())  # this host, process gone
    lock = JobLock(tmp_path / "dead")
    assert lock.acquire() and lock.took_over is not None
    assert json.loads((tmp_path / "dead" / LOCK_FILE).read_text())["launch"] == launch_id()
    lock.release()
    assert not (tmp_path / "dead" / LOCK_FILE).exists()
    _write_lock(tmp_path / "silent", "slurm:99", 1, age_s=3600, host="node-elsewhere")  # no heartbeat for an hour
    assert JobLock(tmp_path / "silent", stale_after_s=300).acquire()
    assert job_state(tmp_path / "dead", "running") == "interrupted"


def test_the_same_launch_reacquires_its_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _write_lock(tmp_path, "slurm:4242", _dead_pid(), host="node-elsewhere")  # a requeue of the same SLURM job
    assert JobLock(tmp_path).acquire()


def test_heartbeat_keeps_a_long_job_fresh(tmp_path):
    lock = JobLock(tmp_path, heartbeat_s=0.1)
    assert lock.acquire()
    first = (tmp_path / LOCK_FILE).stat().st_mtime
    time.sleep(0.5)
    assert (tmp_path / LOCK_FILE).stat().st_mtime > first
    lock.release()


@pytest.mark.slow
def test_two_sweeps_on_one_grid_run_each_job_once(tmp_path):
    env = _env(tmp_path)
    args = [sys.executable, str(REPO / "sweep.py"), "-m", "experiment=demo", "seed=0", "trainer.max_steps=40",
            "callbacks=none", "sweep.eval_variants=[]", f"paths.output_root={tmp_path}"]
    job = tmp_path / "sweeps" / "demo" / "callbacks=none,sweep.eval_variants=[],trainer.max_steps=40" / "seed=0"
    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (job / LOCK_FILE).exists():  # the first sweep has started the job
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.2)
        second = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "skip (being run by proc:" in second.stdout and "sweep.on_locked=wait" in second.stdout
        summary = summarize_sweep(tmp_path / "sweeps" / "demo", write=False)
        assert [j["action"] for j in summary["jobs"]] == ["running"]  # seen from outside: running elsewhere
        waiter = subprocess.run(args + ["sweep.on_locked=wait"], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=900)
        out, _ = first.communicate(timeout=900)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out[-3000:]
    assert "skip (done)" in waiter.stdout, waiter.stdout[-3000:]  # waited, then found it done
    assert json.loads((job / "results.json").read_text())["status"] == "done"
    with open(job / "metrics.csv") as f:
        steps = [r["step"] for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(steps) == len(set(steps)) == 40  # trained once: no step logged twice
    assert not (job / LOCK_FILE).exists()
