"""A job being run holds a lock on its run dir, so that two sweeps started on the same grid do not both run it.

``<run_dir>/.em_job.lock`` is created atomically (``O_CREAT | O_EXCL``: works on the shared file systems of a
cluster, where ``flock`` often does not) and holds who runs the job: the *launch* (a SLURM job id, a torchrun
run id, or host:pid for a job in this process), host, pid, start time. While the job runs, a daemon thread
touches it every ``heartbeat_s``.

A lock is **stale** (taken over, with a warning) when its holder is on this host and its process is gone, or
when its heartbeat is older than ``stale_after_s`` (a crashed holder on another node). The same launch
re-acquires its own lock (a SLURM requeue, or every rank of a multi-process job).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_FILE = ".em_job.lock"


def launch_id(env: dict[str, str] | None = None) -> str:
    """Who runs the job: the same for every rank of a multi-process launch and for a requeued SLURM job."""
    env = dict(os.environ) if env is None else env
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}"
    if env.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun:{socket.gethostname()}:{env['TORCHELASTIC_RUN_ID']}"
    return f"proc:{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@dataclass
class Holder:
    """The content of a lock file, and its age."""

    launch: str
    host: str
    pid: int
    started: float
    heartbeat_age_s: float

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"{self.launch} (pid {self.pid} on {self.host}, since {since})"


def read_holder(run_dir: str | os.PathLike) -> Holder | None:
    """Who holds the run dir's lock, or None (no lock, or an unreadable one: a writer that died mid-write)."""
    p = Path(run_dir) / LOCK_FILE
    try:
        data: dict[str, Any] = json.loads(p.read_text(encoding="utf-8"))
        age = time.time() - p.stat().st_mtime
        return Holder(str(data["launch"]), str(data["host"]), int(data["pid"]), float(data["started"]), age)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_stale(h: Holder, stale_after_s: float) -> bool:
    if h.host == socket.gethostname() and not _pid_alive(h.pid):
        return True
    return h.heartbeat_age_s > stale_after_s


class JobLock:
    """``with JobLock(run_dir) as lock:`` — ``lock.acquired`` says whether this process may run the job; when not,
    ``lock.holder`` says who runs it."""

    def __init__(self, run_dir: str | os.PathLike, *, wait_s: float = 0.0, stale_after_s: float = 300.0,
                 heartbeat_s: float = 30.0, poll_s: float = 2.0):
        self.path = Path(run_dir) / LOCK_FILE
        self.wait_s, self.stale_after_s = wait_s, stale_after_s
        self.heartbeat_s, self.poll_s = heartbeat_s, poll_s
        self.me = launch_id()
        self.acquired = False
        self.holder: Holder | None = None
        self.took_over: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquire / release ---------------------------------------------------------------------------------
    def _create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"launch": self.me, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def try_acquire(self) -> bool:
        if self._create():
            return True
        h = read_holder(self.path.parent)
        if h is None:  # unreadable: a holder that died while writing it, or a race with a remover
            if self.path.exists() and time.time() - self.path.stat().st_mtime > self.poll_s:
                self._remove()
            return self._create()
        if h.launch == self.me:  # our own launch: a requeue, or another rank of this job
            self.holder = h
            return True
        if is_stale(h, self.stale_after_s):
            log.warning("taking over the stale lock of %s held by %s", self.path.parent, h.describe())
            self.took_over = h
            self._remove()
            return self._create()
        self.holder = h
        return False

    def acquire(self) -> bool:
        deadline = time.monotonic() + self.wait_s
        while True:
            if self.try_acquire():
                self.acquired = True
                self._start_heartbeat()
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_s)

    def _remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.acquired:
            h = read_holder(self.path.parent)
            if h is not None and h.launch == self.me:
                self._remove()
            self.acquired = False

    # -- heartbeat -----------------------------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        if self._thread is not None:
            return

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        self._thread = threading.Thread(target=beat, name="em-job-lock", daemon=True)
        self._thread.start()

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def job_state(run_dir: str | os.PathLike, status: str | None, stale_after_s: float = 300.0) -> str | None:
    """One vocabulary for a job's state in every view (``em summary``, ``em report``): a results.json that says
    ``running`` is *running* while its lock is held by a live holder, else *interrupted* (the next run of the
    sweep resumes it)."""
    if status != "running":
        return status
    h = read_holder(run_dir)
    return "running" if h is not None and not is_stale(h, stale_after_s) else "interrupted"
