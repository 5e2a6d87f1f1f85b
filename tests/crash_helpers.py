"""Killing a training run on purpose (SIGKILL: no handler, no cleanup), at a chosen point.

Run as a child process: ``python -m tests.crash_helpers <run_dir> <override> ...`` trains with the overrides
(plus ``+callbacks.killer...`` selecting :class:`KillAt`) and is expected to die by SIGKILL.
"""

from __future__ import annotations

import os
import signal
import sys

import lightning as L

from em.training.adapter import SaveTrainedWeights
from em.training.checkpoint_io import AtomicCheckpointIO


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class _KillAfterBytes:
    """A file wrapper that lets ``limit`` bytes through, then SIGKILLs the process (a write cut short)."""

    def __init__(self, f, limit: int):
        self.f, self.left = f, limit

    def write(self, b) -> int:
        b = bytes(b)
        if len(b) >= self.left:
            self.f.write(b[:self.left])
            self.f.flush()
            os.fsync(self.f.fileno())
            die()
        self.left -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)


class SimulatedCrash(RuntimeError):
    """Raised by ``KillAt(phase="raise")``: a crash in process (no checkpoint is written on the way out)."""


class KillAt(L.Callback):
    """SIGKILL this process at one point of training.

    ``phase``:
    - ``raise``: no kill: raise :class:`SimulatedCrash` when step ``step`` is about to start (its checkpoint, if
      one is due, written), for in-process tests;
    - ``step``: at the end of optimizer step ``step`` (1-based global step), before its checkpoint is written;
    - ``write``: during the ``save``-th checkpoint write (1-based), after ``nbytes`` bytes of it;
    - ``replace``: during the ``save``-th write, when the new file is complete and the old one kept as the previous
      version, right before the rename;
    - ``end``: after the last checkpoint, before the trained weights are written.
    """

    def __init__(self, phase: str, step: int = 0, save: int = 1, nbytes: int = 0):
        self.phase, self.step, self.save, self.nbytes = phase, int(step), int(save), int(nbytes)
        self.saves = 0

    def setup(self, trainer, pl_module, stage):
        io = trainer.strategy.checkpoint_io
        assert isinstance(io, AtomicCheckpointIO), type(io)
        write, keep = io._write, io._keep_previous

        def counting_write(checkpoint, f):
            self.saves += 1
            if self.phase == "write" and self.saves == self.save:
                return write(checkpoint, _KillAfterBytes(f, self.nbytes))
            return write(checkpoint, f)

        def keep_then_die(dst):
            keep(dst)
            if self.phase == "replace" and self.saves == self.save:
                die()

        io._write, io._keep_previous = counting_write, keep_then_die
        if self.phase == "end":
            for cb in trainer.callbacks:
                if isinstance(cb, SaveTrainedWeights):
                    cb.on_train_end = lambda *a, **k: die()
        if self.phase == "replace" and self.save == 1:
            raise ValueError("phase=replace needs save >= 2 (the first save has nothing to replace)")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.phase == "raise" and trainer.global_step == self.step:
            raise SimulatedCrash(f"simulated crash before step {self.step + 1}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.phase == "step" and trainer.global_step == self.step:
            die()


class WaitForFile(L.Callback):
    """Hold training after its first batch until ``path`` exists (at most ``timeout_s``): makes "a job is being
    run" a state the test controls instead of a race against the machine's speed."""

    def __init__(self, path: str, timeout_s: float = 600.0):
        self.path, self.timeout_s, self.waited = path, float(timeout_s), False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import time
        from pathlib import Path

        if self.waited:
            return
        self.waited = True
        deadline = time.monotonic() + self.timeout_s
        while not Path(self.path).exists() and time.monotonic() < deadline:
            time.sleep(0.1)


def main(argv: list[str]) -> None:
    from em.training.run import train
    from tests.helpers import compose_train

    run_dir, overrides = argv[0], argv[1:]
    train(compose_train(overrides, run_dir=run_dir))
    print("finished without being killed", flush=True)
    sys.exit(3)


if __name__ == "__main__":
    main(sys.argv[1:])
