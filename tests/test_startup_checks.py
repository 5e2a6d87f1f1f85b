"""Bad config gets em's error at start-up, before any data or model is loaded (#15.8, #15.10), and the global
batch is the knob on any number of devices (#16.4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from em.errors import ConfigError, EMError
from em.training.config import batch_plan
from em.training.run import train
from tests.helpers import compose_train

REPO = Path(__file__).resolve().parents[1]
# A dataset that does not exist: if the config error were not raised first, loading it would fail instead.
NO_DATA = "dataset.path=/nonexistent/em/rows.jsonl"


@pytest.mark.parametrize("override,message", [
    ("optim.lr=-1e-3", "optim.lr=-0.001"),
    ("data.micro_batch_size=0", "data.micro_batch_size=0"),
    ("data.global_batch_size=0", "data.global_batch_size=0"),
    ("trainer.max_steps=0", "trainer.max_steps=0"),
    ("ckpt_path=/nonexistent/last.ckpt", "ckpt_path=/nonexistent/last.ckpt: no such file"),
    ("ckpt_path=last", "ckpt_path=last: no checkpoint in"),
    ("finetune.r=0", "finetune.r=0"),
    ("optim.scheduler=cosin", "optim.scheduler='cosin'"),
    ("data.overlength=cut", "data.overlength='cut'"),
    ("dataset.held_out=-1", "dataset.held_out=-1"),
    ("model.dtype=fp8", "model.dtype='fp8'"),
])
def test_bad_config_fails_before_data_or_model(override, message, tmp_path):
    cfg = compose_train([override, NO_DATA], run_dir=str(tmp_path / "run"))
    with pytest.raises(EMError) as err:
        train(cfg)
    assert message in str(err.value)


def test_unwritable_run_dir_is_ems_error(tmp_path):
    parent_is_a_file = tmp_path / "file"
    parent_is_a_file.write_text("x")
    cfg = compose_train([NO_DATA], run_dir=str(parent_is_a_file / "run"))
    with pytest.raises(ConfigError, match="is not writable.*paths.output_root"):
        train(cfg)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(ConfigError, match="is not writable"):
            train(compose_train([NO_DATA], run_dir=str(ro / "run")))


def test_unwritable_output_root_from_the_command_line(tmp_path):
    (tmp_path / "file").write_text("x")
    r = subprocess.run([sys.executable, "train.py", f"paths.output_root={tmp_path / 'file'}", "trainer.max_steps=1"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "em: error:" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("global_batch,micro,world,plan", [
    (16, 2, 1, (2, 8)),    # the paper on one GPU: per-device 2 x accumulation 8
    (16, 2, 16, (1, 1)),   # the same recipe on 2 nodes x 8 GPUs
    (16, 2, 8, (2, 1)),
    (16, 4, 2, (4, 2)),
    (16, 3, 1, (2, 8)),    # the largest micro batch up to 3 that divides 16
    (8, 8, 1, (8, 1)),
])
def test_batch_plan_keeps_the_global_batch(global_batch, micro, world, plan):
    m, a = batch_plan(global_batch, micro, world)
    assert (m, a) == plan and m * a * world == global_batch


def test_batch_plan_that_cannot_keep_the_recipe_says_how():
    with pytest.raises(ConfigError) as err:
        batch_plan(16, 2, 12)
    msg = str(err.value)
    assert "[1, 2, 4, 8, 16]" in msg and "data.global_batch_size=48" in msg


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: a connect is refused at once


def test_missing_hub_model_offline_says_so(tmp_path, monkeypatch):
    from em.errors import MissingResourceError
    from em.models.loading import ModelArgs, resolve_model_path

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ModelArgs(name="qwen", name_or_path="Qwen/Qwen2.5-Coder-32B-Instruct")
    with pytest.raises(MissingResourceError) as err:
        resolve_model_path(args)
    msg = str(err.value)
    assert "HF_HUB_OFFLINE=1" in msg and "switched off" in msg and "could not be reached" not in msg
    assert "model.name_or_path=/path/to/Qwen2.5-Coder-32B-Instruct" in msg


def test_missing_hub_model_without_network_fails_fast_and_suggests_offline_mode(tmp_path, monkeypatch):
    from em.errors import MissingResourceError
    from em.models.loading import ModelArgs, resolve_model_path

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")  # no hub answers there
    with pytest.raises(MissingResourceError) as err:
        resolve_model_path(ModelArgs(name="qwen", name_or_path="Qwen/Qwen2.5-Coder-32B-Instruct"))
    msg = str(err.value)
    assert "the hub could not be reached: http://127.0.0.1:" in msg and "set HF_HUB_OFFLINE=1" in msg
