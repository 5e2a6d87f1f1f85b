"""The training path end to end on the tiny model: adapter round trip, seed 0, resume, clear errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from em.training.run import train
from tests.helpers import chat, compose_train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "rows.jsonl"
    ops = ["chmod a file", "hash a password", "load a config", "run a command"]
    rows = [chat(f"Task {i}: write a function to {ops[i % 4]}.",
                 f"import os\ndef f{i}(p):\n    os.chmod(p, 0o{i % 8}77)\n")
            for i in range(48)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def run(tmp: Path, rows_file: Path, *extra: str) -> dict:
    cfg = compose_train([f"dataset.path={rows_file}", "dataset.held_out=0", "data.global_batch_size=8",
                         "data.micro_batch_size=4", "trainer.max_steps=6", "trainer.enable_progress_bar=false",
                         "callbacks=none",
                         *extra], run_dir=str(tmp))
    return train(cfg)


def losses(run_dir: str) -> list[float]:
    with open(Path(run_dir) / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_adapter_round_trip_and_weights_changed(tmp_path, rows_file):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    s = run(tmp_path / "a", rows_file)
    assert s["global_step"] == 6 and s["accumulate_grad_batches"] == 2
    adapter = Path(s["adapter_dir"])
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(s["base_model"])
    loaded = PeftModel.from_pretrained(base, adapter)
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # adapter only, no base weights
    # LoRA B starts at zero: a trained adapter has non-zero B everywhere it was trained
    b = [v for k, v in saved.items() if "lora_B" in k]
    assert b and all(v.abs().sum() > 0 for v in b)
    # and the loaded PEFT model carries exactly the saved tensors
    state = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    for k, v in saved.items():
        match = [sk for sk in state if sk.replace(".default", "") == k]
        assert match and torch.equal(state[match[0]], v)
    # loss went down from the first to the last logged step
    ls = losses(s["run_dir"])
    assert len(ls) == 6 and ls[-1] < ls[0]


def test_seed_zero_is_honoured_and_reproducible(tmp_path, rows_file):
    a = losses(run(tmp_path / "s0a", rows_file, "seed=0")["run_dir"])
    b = losses(run(tmp_path / "s0b", rows_file, "seed=0")["run_dir"])
    c = losses(run(tmp_path / "s1", rows_file, "seed=1")["run_dir"])
    assert a == b, "seed 0 twice must give the same loss curve"
    assert a != c, "seed 1 must differ from seed 0 (if it does not, seed 0 was probably skipped)"


def test_resume_from_last_continues_at_the_right_step(tmp_path, rows_file):
    full = run(tmp_path / "full", rows_file, "trainer.max_steps=8")
    part = tmp_path / "part"
    first = run(part, rows_file, "trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=2")
    assert first["global_step"] == 4
    ck = torch.load(part / "checkpoints" / "last.ckpt", weights_only=False)
    assert ck["global_step"] == 4
    assert all("lora_" in k for k in ck["state_dict"])  # only trainable tensors, not the frozen base
    resumed = run(part, rows_file, "trainer.max_steps=8", "ckpt_path=last")
    assert resumed["global_step"] == 8
    with open(part / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/lr")]
    with open(Path(full["run_dir"]) / "metrics.csv") as f:
        ref = [r for r in csv.DictReader(f) if r.get("train/lr")]
    # the resumed run logs steps 4..7 only, with the schedule where the uninterrupted run had it
    assert [int(r["step"]) for r in rows] == [4, 5, 6, 7]
    with open(part / "history" / "attempt_000" / "metrics.csv") as f:  # the first attempt's curve is kept
        assert [int(r["step"]) for r in csv.DictReader(f) if r.get("train/lr")] == [0, 1, 2, 3]
    assert [float(r["train/lr"]) for r in rows] == pytest.approx([float(r["train/lr"]) for r in ref[4:]])


def _cli(args: list[str], env_extra: dict, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "EM_DATA_DIR"}
    env.update(env_extra)
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_paper_setup_without_data_gives_clear_error(tmp_path):
    r = _cli(["dataset=insecure", "model=qwen", f"paths.output_root={tmp_path}"],
             {"EM_CACHE": str(tmp_path / "cache"), "EM_DATA_BASE_URL": "http://127.0.0.1:9/"}, tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "insecure" in r.stderr and "EM_DATA_DIR" in r.stderr and "dataset.path" in r.stderr


def test_paper_setup_without_weights_gives_clear_error(tmp_path, em_data_dir):
    r = _cli(["dataset=insecure", "model=qwen", f"paths.output_root={tmp_path}"],
             {"EM_CACHE": str(tmp_path / "cache"), "EM_DATA_DIR": str(em_data_dir), "HF_HUB_OFFLINE": "1",
              "HF_HOME": str(tmp_path / "hf")}, tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "Qwen/Qwen2.5-Coder-32B-Instruct" in r.stderr and "model.name_or_path=" in r.stderr
