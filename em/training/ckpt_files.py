"""Checkpoint files on disk: which ones a run can resume from, and whether a file is whole.

Written by :class:`em.training.checkpoint_io.AtomicCheckpointIO`: ``<name>.ckpt`` (replaced atomically), the
version it replaced kept as ``<name>.ckpt.prev``, and ``.<name>.ckpt.tmp-<pid>`` while a write is in progress
(a leftover one is the trace of a killed write, removed by the next save). Standard library only, so the sweep
can look for checkpoints without importing torch.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

from em.errors import MissingResourceError

log = logging.getLogger(__name__)

PREV_SUFFIX = ".prev"
CRC_CHECK_MAX_BYTES = 4 << 30
"""Files up to this size have every member's CRC checked (a bit flip anywhere); larger ones only their zip
directory (a truncated file, the usual failure, has none)."""


class CheckpointError(MissingResourceError):
    """No checkpoint of the run can be loaded."""


def previous_of(path: str | os.PathLike) -> Path:
    """Where the version replaced by the latest save of ``path`` is kept."""
    p = Path(path)
    return p.with_name(p.name + PREV_SUFFIX)


def tmp_for(path: str | os.PathLike, pid: int | None = None) -> Path:
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{os.getpid() if pid is None else pid}")


def stale_tmp_files(path: str | os.PathLike) -> list[Path]:
    """Temporary files of earlier, interrupted writes of ``path`` (not this process's)."""
    p = Path(path)
    mine = tmp_for(p).name
    return [q for q in p.parent.glob(f".{p.name}.tmp-*") if q.name != mine]


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be resumed from (missing, empty, truncated, corrupt), or None when it looks whole.

    A file must be a complete zip archive (what ``torch.save`` writes) holding a ``data.pkl``, every member's
    CRC intact (files up to :data:`CRC_CHECK_MAX_BYTES`). A directory (DeepSpeed / sharded FSDP) must not be empty.
    """
    p = Path(path)
    if not p.exists():
        return "does not exist"
    if p.is_dir():
        return None if any(p.iterdir()) else "is an empty directory"
    size = p.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
            if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
                return "is a zip archive without data.pkl (not a torch checkpoint)"
            if size <= CRC_CHECK_MAX_BYTES:
                bad = z.testzip()
                if bad is not None:
                    return f"is corrupt (CRC mismatch in {bad})"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"is truncated or not a checkpoint ({size:,} bytes: {e})"
    return None


def _mtime(p: Path) -> int:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return -1


def resume_candidates(run_dir: str | os.PathLike) -> list[Path]:
    """A run's checkpoints, newest first: ``checkpoints/last*.ckpt``, SLURM's ``hpc_ckpt_*.ckpt``, and the
    previous version of each (``*.ckpt.prev``, after the one it preceded)."""
    d = Path(run_dir)
    main = [*(d / "checkpoints").glob("last*.ckpt"), *d.glob("hpc_ckpt_*.ckpt")]
    main = sorted((p for p in main if p.exists()), key=_mtime, reverse=True)
    return main + [previous_of(p) for p in main if previous_of(p).exists()]


def newest_loadable(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of ``run_dir`` that is whole (a warning for each one skipped), or None."""
    for p in resume_candidates(run_dir):
        problem = checkpoint_problem(p)
        if problem is None:
            return p
        log.warning("checkpoint %s %s: skipped", p, problem)
    return None


def resolve_resume(ckpt_path: str | os.PathLike | None, run_dir: str | os.PathLike) -> str | None:
    """The checkpoint file a run resumes from, checked before anything is loaded or moved.

    ``None`` -> None (a fresh run). ``last`` -> the newest whole checkpoint of ``run_dir``; a given path -> that
    file if whole, else its kept previous version. Skipping a damaged file logs a warning naming it; when no
    checkpoint is whole (or none exists) a :class:`CheckpointError` says which were tried and what to do.
    """
    if ckpt_path is None or str(ckpt_path) == "":
        return None
    run = Path(run_dir)
    if str(ckpt_path) == "last":
        cands = resume_candidates(run)
        if not cands:
            raise CheckpointError(f"ckpt_path=last: no checkpoint in {run / 'checkpoints'} (nor hpc_ckpt_*.ckpt in "
                                  f"{run}): pass the run's directory as paths.run_dir, or drop ckpt_path to start "
                                  "a new run")
    else:
        p = Path(ckpt_path).expanduser()
        if not p.exists() and not previous_of(p).exists():
            raise CheckpointError(f"ckpt_path={ckpt_path}: no such file")
        cands = [p, previous_of(p)]
    tried = []
    for c in cands:
        problem = checkpoint_problem(c)
        if problem is None:
            if tried:
                log.warning("resuming from %s: the newer checkpoint(s) %s could not be used",
                            c, "; ".join(tried))
            return str(c)
        if c.exists() or c == cands[0]:
            tried.append(f"{c} {problem}")
    raise CheckpointError("no checkpoint to resume from can be loaded:\n  " + "\n  ".join(tried) +
                          "\nDelete the damaged file(s) and resume from an older checkpoint (ckpt_path=<file>), "
                          "or drop ckpt_path to train from scratch.")

