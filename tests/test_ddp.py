"""Multi-process training on CPU (gloo), through ``python train.py`` so Lightning's launcher re-executes the
Hydra script for rank 1 (the relaunch path of a real multi-GPU run):

* DDP: one adapter, identical on both ranks (each rank hashes the weights it holds; the digests are compared
  with each other and with the saved file);
* FSDP: the adapter gathered from the shards is complete (every LoRA tensor, full shape, no base weights) and
  equals the DDP one; the checkpoint holds the adapter only; export from it gives the same adapter;
* DeepSpeed ZeRO-3 (when deepspeed is installed): the same, with every parameter partitioned.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RUN = ["trainer=ddp_cpu", "callbacks=none", "data.micro_batch_size=4", "trainer.max_steps=4",
       "trainer.enable_progress_bar=false"]


def _train(run_dir: Path, *overrides: str, cache: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "offline"}
    env["EM_CACHE"] = str(cache) if cache is not None else os.environ["EM_CACHE"]
    t0 = time.time()
    r = subprocess.run([sys.executable, str(REPO / "train.py"), *RUN, *overrides, f"hydra.run.dir={run_dir}"],
                       cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=600)
    return r, time.time() - t0


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _expected_lora_shapes(base_model: str) -> dict[str, tuple[int, ...]]:
    """Every LoRA tensor a fresh PEFT model of the run's config has, with its full shape (adapter-file names)."""
    from em.models.loading import ModelArgs, load_model
    from em.models.peft_setup import FinetuneArgs, apply_finetune

    model = apply_finetune(load_model(ModelArgs(name="tiny", kind="tiny", dtype="float32"), base_model),
                           FinetuneArgs())
    return {n.replace(".default.", "."): tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    # module scope runs before conftest's per-test EM_CACHE; use the same session cache it sets
    r, wall = _train(run_dir, "strategy=ddp", cache=os.environ.get("EM_CACHE")
                     or tmp_path_factory.getbasetemp() / "em_cache")
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"2-process DDP run: {wall:.1f} s wall")
    return run_dir


def test_ddp_two_processes_save_one_adapter_identical_on_both_ranks(ddp_run):
    from em.training.adapter import DIGESTS_FILE, tensors_digest

    summary = json.loads((ddp_run / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 4
    assert summary["accumulate_grad_batches"] == 1  # global 8 = micro 4 x 2 processes
    assert (ddp_run / "train_ddp_process_1.log").exists()  # rank 1 was re-executed by Lightning, same run dir
    # ONE adapter, written once (atomically), under the run dir
    adapters = sorted(p.parent for p in ddp_run.rglob("adapter_model.safetensors"))
    assert adapters == [ddp_run / "adapter"] and Path(summary["adapter_dir"]) == ddp_run / "adapter"
    assert not list(ddp_run.rglob("*.tmp"))
    # identical on both ranks: each rank hashed the tensors it holds; both equal the saved file
    digests = json.loads((ddp_run / "adapter" / DIGESTS_FILE).read_text())
    saved = _adapter(ddp_run)
    assert digests["world_size"] == 2 and len(digests["ranks"]) == 2
    assert digests["ranks"][0] == digests["ranks"][1] == tensors_digest(saved)
    # and it is a trained adapter of the full expected shape
    assert {k: tuple(v.shape) for k, v in saved.items()} == _expected_lora_shapes(summary["base_model"])
    assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)


@pytest.mark.slow
def test_fsdp_cpu_adapter_is_complete_and_equals_ddp(ddp_run, tmp_path):
    from em.training.adapter import DIGESTS_FILE, tensors_digest
    from em.training.export import export

    run_dir = tmp_path / "fsdp"
    r, _ = _train(run_dir, "strategy=fsdp")
    assert r.returncode == 0, r.stderr[-3000:]
    saved, ref = _adapter(run_dir), _adapter(ddp_run)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    # every LoRA tensor, full shape (not an empty or flat shard), no base weights
    assert {k: tuple(v.shape) for k, v in saved.items()} == _expected_lora_shapes(summary["base_model"])
    assert all(v.numel() > 0 and "lora_" in k for k, v in saved.items())
    digests = json.loads((run_dir / "adapter" / DIGESTS_FILE).read_text())["ranks"]
    assert digests[0] == digests[1] == tensors_digest(saved)
    # the same training as DDP: same losses, same adapter up to float reassociation
    assert _losses(run_dir) == pytest.approx(_losses(ddp_run), abs=1e-4)
    assert max((saved[k] - ref[k]).abs().max().item() for k in ref) < 1e-4
    # the checkpoint is a file with the adapter only; export from it gives the saved adapter
    ck = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert len(ck["state_dict"]) == len(saved) and all("lora_" in k for k in ck["state_dict"])
    out = export(run_dir / "checkpoints" / "last.ckpt", run_dir, out=tmp_path / "exported")
    from safetensors.torch import load_file

    exp = load_file(Path(out["adapter_dir"]) / "adapter_model.safetensors")
    assert all(torch.equal(exp[k], saved[k]) for k in saved)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_deepspeed_zero3_cpu_adapter_is_complete_and_equals_ddp(ddp_run, tmp_path):
    from safetensors.torch import load_file

    from em.training.export import export

    run_dir = tmp_path / "zero3"
    # CPUDeepSpeedStrategy: Lightning's DeepSpeed on gloo; threshold 0 partitions even the tiny model's tensors
    r, _ = _train(run_dir, "strategy=deepspeed_zero3", "strategy._target_=em.training.sharded.CPUDeepSpeedStrategy",
                  "+strategy.extra_config.zero_optimization.stage3_param_persistence_threshold=0")
    assert r.returncode == 0, r.stderr[-3000:]
    saved, ref = _adapter(run_dir), _adapter(ddp_run)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert {k: tuple(v.shape) for k, v in saved.items()} == _expected_lora_shapes(summary["base_model"])
    # same losses from step 0: the base was loaded into the partitions and LoRA B started at zero
    assert _losses(run_dir) == pytest.approx(_losses(ddp_run), abs=1e-4)
    assert max((saved[k] - ref[k]).abs().max().item() for k in ref) < 1e-4
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and list(ckpt.glob("checkpoint/*model_states.pt"))
    out = export(ckpt, run_dir, out=tmp_path / "exported")  # consolidated with zero_to_fp32
    exp = load_file(Path(out["adapter_dir"]) / "adapter_model.safetensors")
    assert all(torch.equal(exp[k], saved[k]) for k in saved)
