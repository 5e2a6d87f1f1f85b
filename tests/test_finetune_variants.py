"""Full finetuning, rank-1 LoRA, gradient checkpointing; W&B offline: one run per job with its values."""

from __future__ import annotations

from pathlib import Path

import torch

from em.training.run import train
from em.utils.wandb_offline import find_run_file, history
from tests.helpers import compose_train

FAST = ["trainer.max_steps=3", "trainer.enable_progress_bar=false", "callbacks=none",
        "data.global_batch_size=4", "data.micro_batch_size=4"]


def test_full_finetune_saves_a_loadable_model_that_changed(tmp_path):
    from transformers import AutoModelForCausalLM

    s = train(compose_train([*FAST, "finetune=full"], run_dir=str(tmp_path)))
    out = Path(s["adapter_dir"])
    assert out.name == "model" and (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(s["base_model"])
    diff = [n for (n, a), (_, b) in zip(trained.named_parameters(), base.named_parameters()) if not torch.equal(a, b)]
    assert len(diff) > 10  # every block moved, not just a head


def test_rank1_lora_and_gradient_checkpointing(tmp_path):
    from safetensors.torch import load_file

    s = train(compose_train([*FAST, "finetune=rank1", "model.gradient_checkpointing=true"], run_dir=str(tmp_path)))
    w = load_file(Path(s["adapter_dir"]) / "adapter_model.safetensors")
    a = [v for k, v in w.items() if "lora_A" in k]
    assert a and all(v.shape[0] == 1 for v in a)  # rank 1
    assert all("down_proj" in k for k in w)  # only the configured target module
    assert s["global_step"] == 3


def test_wandb_offline_one_run_per_job_with_name_and_values(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    runs = []
    for seed in (0, 1):
        d = tmp_path / f"s{seed}"
        train(compose_train([*FAST, "logger=wandb", f"seed={seed}"], run_dir=str(d)))
        runs.append(find_run_file(d))
    assert runs[0] != runs[1]  # wandb.finish() per job: the second job did not log into the first run
    for seed, f in zip((0, 1), runs):
        h = history(f)
        losses = [r["train/loss"] for r in h if "train/loss" in r]
        assert len(losses) == 3
        raw = f.read_bytes()
        assert f"tiny-mini_insecure-s{seed}".encode() in raw  # run name from model, dataset, seed
