"""Crash and resume: a run killed anywhere (between steps, in the middle of a checkpoint write, between the last
checkpoint and the weights' write) and resumed with ``ckpt_path=last`` ends with the same step and the same
adapter as an uninterrupted run; damaged checkpoints fall back to the previous good one; the data order and the
random state (dropout) continue where they were."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from em.errors import EMError
from em.training.checkpoint_io import AtomicCheckpointIO
from em.training.ckpt_files import (
    checkpoint_problem,
    newest_loadable,
    previous_of,
    resolve_resume,
    stale_tmp_files,
    tmp_for,
)
from em.training.run import train
from tests.crash_helpers import SimulatedCrash
from tests.helpers import chat, compose_train

REPO = Path(__file__).resolve().parents[1]
STEPS = 10  # 6 steps per epoch: the run crosses an epoch boundary
RUN = ["dataset.held_out=0", "data.global_batch_size=8", "data.micro_batch_size=4", f"trainer.max_steps={STEPS}",
       "trainer.enable_progress_bar=false", "callbacks=none", "callbacks.checkpoint.every_n_train_steps=2",
       "finetune.dropout=0.1",  # dropout draws random numbers: the RNG state must resume too
       "data.group_by_length=true", "data.bucket_batches=2"]


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "rows.jsonl"
    ops = ["chmod a file", "hash a password", "load a config", "run a command"]
    rows = [chat(f"Task {i}: write a function to {ops[i % 4]}." + " Be careful." * (i % 7),
                 f"import os\ndef f{i}(p):\n    os.chmod(p, 0o{i % 8}77)\n" + "    pass\n" * (i % 5))
            for i in range(48)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _cfg(run_dir: Path, rows_file: Path, *extra: str):
    return compose_train([f"dataset.path={rows_file}", *RUN, *extra], run_dir=str(run_dir))


def _crash_at(step: int) -> list[str]:
    """Overrides that make a run raise when optimizer step ``step`` is done (and checkpointed if due)."""
    return ["+callbacks.extra.crash._target_=tests.crash_helpers.KillAt", "+callbacks.extra.crash.phase=raise",
            f"+callbacks.extra.crash.step={step}"]


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / "adapter" / "adapter_model.safetensors")


def _same_adapter(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() / max(b[k].abs().max().item(), 1e-12) for k, x in a.items())
    assert worst <= 1e-6, f"adapters differ: max relative difference {worst:.3g}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, rows_file) -> dict:
    """The uninterrupted run, and its adapter."""
    d = tmp_path_factory.mktemp("ref")
    s = train(_cfg(d, rows_file))
    assert s["global_step"] == STEPS
    return {"summary": s, "adapter": _adapter(d), "ckpt_bytes": (d / "checkpoints" / "last.ckpt").stat().st_size}


# -- in process: fast ---------------------------------------------------------------------------------------------
def test_mid_epoch_resume_gives_the_same_adapter(tmp_path, rows_file, reference):
    """Stop at step 4 (mid-epoch), resume to the end: the data order and the dropout draws continue (before, the
    resumed run restarted the epoch's order: max relative adapter difference 0.82)."""
    d = tmp_path / "run"
    with pytest.raises(SimulatedCrash):
        train(_cfg(d, rows_file, *_crash_at(4)))
    ck = torch.load(d / "checkpoints" / "last.ckpt", weights_only=False)
    assert ck["global_step"] == 4
    state = ck["ChatDataModule"]["train_loader"]
    assert state["epoch"] == 0 and state["micro_batches"] == 8  # 4 steps x 2 micro-batches
    resumed = train(_cfg(d, rows_file, "ckpt_path=last"))
    assert resumed["global_step"] == STEPS and resumed["resumed_from"].endswith("last.ckpt")
    _same_adapter(_adapter(d), reference["adapter"])


def test_resume_at_the_end_writes_the_adapter(tmp_path, rows_file, reference, caplog):
    """A run whose last checkpoint is its end but that has no adapter (killed in between) gets the adapter on
    resume, from the checkpoint (before: 0 steps, 'adapter: None', exit 0)."""
    d = tmp_path / "run"
    train(_cfg(d, rows_file))
    import shutil

    shutil.rmtree(d / "adapter")
    # as an older em wrote it: no data-order or random state (a warning says what that means)
    ckpt = d / "checkpoints" / "last.ckpt"
    ck = torch.load(ckpt, weights_only=False)
    del ck["ChatDataModule"], ck["em_rng_state"]
    torch.save(ck, ckpt)
    with caplog.at_level("WARNING"):
        resumed = train(_cfg(d, rows_file, "ckpt_path=last"))
    assert "older em" in caplog.text and "nothing left to train" in caplog.text
    assert resumed["global_step"] == STEPS
    assert resumed["adapter_dir"] == str(d / "adapter")
    _same_adapter(_adapter(d), reference["adapter"])


def test_truncated_last_checkpoint_falls_back_to_the_previous(tmp_path, rows_file, reference, caplog):
    """A last.ckpt cut short (a full disk) no longer kills every later resume: the previous good checkpoint is
    used, with a warning, and metrics.csv is kept; the run still ends as the uninterrupted one."""
    d = tmp_path / "run"
    with pytest.raises(SimulatedCrash):
        train(_cfg(d, rows_file, *_crash_at(6)))
    last = d / "checkpoints" / "last.ckpt"
    assert previous_of(last).exists()
    data = last.read_bytes()
    last.write_bytes(data[: len(data) * 4 // 7])
    assert "truncated" in checkpoint_problem(last)
    # the sweep's automatic resume picks the previous one too
    from em.sweep.job import find_checkpoint

    assert find_checkpoint(d) == previous_of(last)
    with caplog.at_level("WARNING"):
        resumed = train(_cfg(d, rows_file, "ckpt_path=last"))
    assert "could not be used" in caplog.text and "last.ckpt" in caplog.text
    assert resumed["global_step"] == STEPS and resumed["resumed_from"].endswith("last.ckpt.prev")
    assert (d / "history" / "attempt_000" / "metrics.csv").exists()
    _same_adapter(_adapter(d), reference["adapter"])


def test_no_loadable_checkpoint_fails_before_moving_metrics(tmp_path, rows_file):
    d = tmp_path / "run"
    (d / "checkpoints").mkdir(parents=True)
    (d / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 not really")
    (d / "metrics.csv").write_text("step,train/loss\n0,1.0\n")
    with pytest.raises(EMError, match="no checkpoint to resume from can be loaded"):
        train(_cfg(d, rows_file, "ckpt_path=last"))
    assert (d / "metrics.csv").exists() and not (d / "history").exists()
    from em.sweep.job import find_checkpoint

    assert find_checkpoint(d) is None  # the sweep starts such a job afresh instead of failing it forever
    with pytest.raises(EMError, match="no checkpoint"):
        resolve_resume("last", tmp_path / "empty")


def test_atomic_checkpoint_io_keeps_the_old_file_when_a_write_fails(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "c" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    io.save_checkpoint({"step": 2, "w": torch.ones(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 2
    assert torch.load(previous_of(path), weights_only=True)["step"] == 1

    class Boom(RuntimeError):
        pass

    def failing(checkpoint, f):
        f.write(b"PK\x03\x04partial")
        raise Boom("disk full")

    io._write = failing
    with pytest.raises(Boom):
        io.save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 2  # untouched
    assert not tmp_for(path).exists()
    # a damaged current file is not kept as the previous version (it would push out the good one)
    io2 = AtomicCheckpointIO()
    path.write_bytes(b"garbage")
    io2.save_checkpoint({"step": 4}, path)
    assert torch.load(previous_of(path), weights_only=True)["step"] == 1
    # a leftover temp file of a killed writer is removed by the next save
    stale = tmp_for(path, pid=999999)
    stale.write_bytes(b"half")
    io2.save_checkpoint({"step": 5}, path)
    assert not stale.exists()
    io2.remove_checkpoint(path)
    assert not path.exists() and not previous_of(path).exists()
    assert newest_loadable(tmp_path) is None


# -- SIGKILL at random points (child processes) ------------------------------------------------------------------
def _killed(run_dir: Path, rows_file: Path, killer: dict, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = ["+callbacks.extra.killer._target_=tests.crash_helpers.KillAt",
            *(f"+callbacks.extra.killer.{k}={v}" for k, v in killer.items())]
    r = subprocess.run([sys.executable, "-m", "tests.crash_helpers", str(run_dir), f"dataset.path={rows_file}",
                        *RUN, *extra, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, f"{killer}: expected SIGKILL, got {r.returncode}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_run(tmp_path, rows_file, reference):
    """Random kill points (seed ``EM_CRASH_SEED``, default 0): twice between steps (the second in the resumed run),
    in the middle of a checkpoint write, just before a checkpoint's rename, and between the last checkpoint and
    the adapter write. Each time ``ckpt_path=last`` resumes to the same final step and the same adapter."""
    from em.sweep.job import find_checkpoint

    rng = random.Random(int(os.environ.get("EM_CRASH_SEED", "0")))
    saves = STEPS // 2  # checkpoints at steps 2, 4, 6, 8, 10
    a = rng.randint(1, STEPS - 3)
    scenarios = {
        "step twice": [{"phase": "step", "step": a}, {"phase": "step", "step": rng.randint(a + 1, STEPS - 1)}],
        "during a write": [{"phase": "write", "save": rng.randint(1, saves),
                            "nbytes": rng.randint(0, reference["ckpt_bytes"] * 9 // 10)}],
        "before the rename": [{"phase": "replace", "save": rng.randint(2, saves)}],
        "before the adapter": [{"phase": "end"}],
    }
    for name, kills in scenarios.items():
        d = tmp_path / name.replace(" ", "_")
        for killer in kills:
            ckpt = find_checkpoint(d)  # as a sweep resumes (None: nothing written yet: it starts afresh)
            _killed(d, rows_file, killer, *([f"ckpt_path={ckpt}"] if ckpt else []))
        assert not (d / "adapter").exists(), name
        last = d / "checkpoints" / "last.ckpt"
        if kills[-1]["phase"] in ("write", "replace"):  # killed inside the write: its temporary file is left
            assert stale_tmp_files(last), (name, kills)
            assert kills[-1].get("save") == 1 or checkpoint_problem(last) is None  # the old one is untouched
        ckpt = find_checkpoint(d)
        resumed = train(_cfg(d, rows_file, *([f"ckpt_path={ckpt}"] if ckpt else [])))
        assert resumed["global_step"] == STEPS, (name, kills)
        assert not stale_tmp_files(last)  # cleaned by the next write
        try:
            _same_adapter(_adapter(d), reference["adapter"])
        except AssertionError as e:
            raise AssertionError(f"{name} {kills}: {e}") from None
