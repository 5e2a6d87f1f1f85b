"""Crash-safe checkpoint writes: a Lightning ``CheckpointIO`` plugin.

Every save goes to a temporary file in the checkpoint's directory, is flushed and fsynced, and only then
renamed over the checkpoint (``os.replace``: atomic on POSIX file systems), and the directory is fsynced. The
version it replaces is kept as ``<name>.prev`` (a hard link: no copy). So at every instant — a SIGKILL, a full
disk, a node lost mid-write — ``<name>`` is either the previous whole checkpoint or the new whole one, and the
one before stays beside it for a resume to fall back to when the newest will not load
(:func:`em.training.ckpt_files.resolve_resume`). Costs one more checkpoint's worth of disk per name kept.

Used for every checkpoint that goes through ``Trainer.save_checkpoint`` (``ModelCheckpoint``, SLURM's
``hpc_ckpt_*``): single device, DDP, FSDP with full state dicts. DeepSpeed and sharded FSDP write directories
with their own engines and do not use it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from em.training.ckpt_files import checkpoint_problem, previous_of, stale_tmp_files, tmp_for

log = logging.getLogger(__name__)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``.<name>.tmp-<pid>``, fsync, keep the old file as ``<name>.prev``, rename into place."""

    def __init__(self) -> None:
        super().__init__()
        self._written: set[Path] = set()  # whole by construction: no need to re-read them before keeping them

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote file systems: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        dst = Path(path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        for old in [*stale_tmp_files(dst), *stale_tmp_files(previous_of(dst))]:  # left by killed writes
            old.unlink(missing_ok=True)
        tmp = tmp_for(dst)
        try:
            with open(tmp, "wb") as f:
                self._write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            if dst.is_file():
                self._keep_previous(dst)
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(dst.parent)
        self._written.add(dst.resolve())

    def _write(self, checkpoint: dict[str, Any], f: BinaryIO) -> None:
        torch.save(checkpoint, f)

    def _keep_previous(self, dst: Path) -> None:
        """Keep the checkpoint about to be replaced as ``<name>.prev`` — if it is whole (a damaged one must not
        push out the last good one)."""
        problem = None if dst.resolve() in self._written else checkpoint_problem(dst)
        if problem is not None:
            log.warning("checkpoint %s %s: not kept as the previous version", dst, problem)
            return
        prev = previous_of(dst)
        link = prev.with_name(f".{prev.name}.tmp-{os.getpid()}")
        link.unlink(missing_ok=True)
        try:
            os.link(dst, link)
        except OSError:  # no hard links here (some network / FUSE file systems): copy
            shutil.copy2(dst, link)
            with open(link, "rb") as f:
                os.fsync(f.fileno())
        os.replace(link, prev)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        if "://" not in str(path):
            previous_of(path).unlink(missing_ok=True)
