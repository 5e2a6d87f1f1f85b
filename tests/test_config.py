"""Every config of every group composes, converts to its typed args, and instantiates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from em.config import to_dataclass
from em.data.datamodule import DataArgs
from em.data.loading import DatasetArgs
from em.models.loading import ModelArgs
from em.models.peft_setup import FinetuneArgs
from em.training.optim import OptimArgs
from tests.helpers import CONF, compose_train

GROUPS = ["model", "finetune", "dataset", "data", "trainer", "strategy", "optim", "callbacks", "logger",
          "paths", "experiment", "debug"]


def options(group: str) -> list[str]:
    d = CONF / group
    return sorted(p.stem for p in d.glob("*.yaml")) if d.exists() else []


CASES = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_composes_and_instantiates(group, option, tmp_path):
    override = f"{group}={option}"
    cfg = compose_train([override], run_dir=str(tmp_path))
    OmegaConf.resolve(cfg)  # every interpolation resolves
    to_dataclass(ModelArgs, cfg.model, "model")
    to_dataclass(FinetuneArgs, cfg.finetune, "finetune")
    to_dataclass(OptimArgs, cfg.optim, "optim")
    to_dataclass(DataArgs, cfg.data, "data")
    to_dataclass(DatasetArgs, cfg.dataset, "dataset")
    from hydra.utils import instantiate

    if cfg.strategy is not None and "_target_" in cfg.strategy:
        if "deepspeed" in cfg.strategy._target_.lower() and importlib.util.find_spec("deepspeed") is None:
            pytest.skip("deepspeed not installed (pip install 'em[deepspeed]')")
        instantiate(cfg.strategy)
    for c in (cfg.callbacks or {}).values():
        if c is not None and "_target_" in c:
            instantiate(c)


def test_groups_are_not_empty():
    for g in ("model", "finetune", "dataset", "trainer", "strategy", "optim", "logger"):
        assert options(g), g


def test_paper_recipe_is_what_dataset_insecure_model_qwen_composes(tmp_path):
    cfg = compose_train(["dataset=insecure", "model=qwen"], run_dir=str(tmp_path))
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-Coder-32B-Instruct"
    ft = cfg.finetune
    assert (ft.kind, ft.r, ft.alpha, ft.dropout, ft.use_rslora) == ("lora", 32, 64, 0.0, True)
    assert set(ft.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    o = cfg.optim
    assert (o.lr, o.warmup_steps, o.weight_decay, o.scheduler) == (1e-5, 5, 0.01, "linear")
    assert (cfg.data.global_batch_size, cfg.data.micro_batch_size, cfg.data.max_length) == (16, 2, 2048)
    assert cfg.trainer.max_epochs == 1 and cfg.seed == 0
    assert cfg.dataset.source == "paper:insecure"


def test_tiny_selects_cpu_budget_and_cli_still_wins(tmp_path):
    cfg = compose_train([], run_dir=str(tmp_path))
    assert cfg.model.kind == "tiny" and cfg.optim.lr == 2e-3 and cfg.trainer.max_steps == 375
    cfg = compose_train(["optim.lr=1e-5", "trainer.max_steps=7"], run_dir=str(tmp_path))
    assert cfg.optim.lr == 1e-5 and cfg.trainer.max_steps == 7


def test_unknown_key_is_named():
    from em.errors import ConfigError

    with pytest.raises(ConfigError, match=r"finetune: unknown key\(s\) \['rank'\]"):
        to_dataclass(FinetuneArgs, {"rank": 3}, "finetune")


def test_weight_decay_groups_by_name_not_shape():
    import torch

    from em.training.optim import build_optimizer

    w = torch.nn.Parameter(torch.zeros(6))  # a flattened (FSDP-style) 1-D shard of a 2-D weight
    b = torch.nn.Parameter(torch.zeros(3))
    ln = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([("layers.0.mlp.down_proj.lora_A.default.weight", w), ("layers.0.mlp.bias", b),
                           ("layers.0.input_layernorm.weight", ln)], OptimArgs(weight_decay=0.01))
    by_wd = {g["weight_decay"]: g["params"] for g in opt.param_groups}
    assert by_wd[0.01] == [w] and by_wd[0.0] == [b, ln]
    only_lora = build_optimizer([("x.lora_B.default.weight", w)], OptimArgs())
    assert len(only_lora.param_groups) == 1  # no empty group (DeepSpeed + LR schedulers choke on them)
