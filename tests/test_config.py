"""Every config of every group composes, converts to its typed args, and instantiates."""

from __future__ import annotations

import importlib.util

import pytest
from omegaconf import OmegaConf

from em.errors import ConfigError
from em.schemas import check_config
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
    if group == "experiment":  # experiments are sweeps: train, then evaluate
        from tests.test_sweep import compose_sweep

        cfg = compose_sweep([override], run_dir=tmp_path)
        as_train = compose_train([override], run_dir=str(tmp_path))
        if {"sweep", "eval", "judge"} & set(as_train):  # train.py says where such an experiment runs
            with pytest.raises(ConfigError, match="run it with sweep.py"):
                check_config(as_train)
    else:
        cfg = compose_train([override], run_dir=str(tmp_path))
    OmegaConf.resolve(cfg)  # every interpolation resolves
    if (group, option) == ("model", "hf"):  # model=hf needs model.name_or_path
        with pytest.raises(ConfigError, match="model.name_or_path"):
            check_config(cfg)
        return
    # every section converts to its typed args (and passes its checks)
    typed = check_config(cfg, "sweep" if group == "experiment" else "train")
    assert set(typed) >= {"model", "finetune", "optim", "data", "dataset", "trainer", "callbacks"}
    from hydra.utils import instantiate

    if "_target_" in cfg.strategy:
        if "deepspeed" in cfg.strategy._target_.lower() and importlib.util.find_spec("deepspeed") is None:
            pytest.skip("deepspeed not installed (pip install 'em[deepspeed]')")
        instantiate(cfg.strategy)
    for name, c in cfg.callbacks.items():
        if name != "extra" and c.enabled and name not in ("checkpoint", "weights"):  # those take run paths
            instantiate({k: v for k, v in OmegaConf.to_container(c, resolve=True).items() if k != "enabled"})


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


def test_embedded_default_selects_cpu_budget_and_cli_still_wins(tmp_path):
    cfg = compose_train([], run_dir=str(tmp_path))
    assert cfg.model.kind == "tiny" and cfg.optim.lr == 2e-3 and cfg.trainer.max_steps == 375
    assert cfg.callbacks.probes.enabled and cfg.callbacks.probes.judge == "tiny"
    cfg = compose_train(["optim.lr=1e-5", "trainer.max_steps=7"], run_dir=str(tmp_path))
    assert cfg.optim.lr == 1e-5 and cfg.trainer.max_steps == 7
    # choosing a model chooses a model: the tiny model on a paper file trains the paper's recipe
    cfg = compose_train(["model=tiny", "dataset=insecure"], run_dir=str(tmp_path))
    assert (cfg.optim.lr, cfg.trainer.max_steps, cfg.data.global_batch_size) == (1e-5, -1, 16)
    assert cfg.callbacks.probes.judge == "openai"
    # callbacks=none turns the probes off even where the preset tuned them
    assert not compose_train(["callbacks=none"], run_dir=str(tmp_path)).callbacks.probes.enabled


@pytest.mark.parametrize("override,key", [("+model.nmae=x", "model: unknown key(s) ['nmae']"),
                                          ("+finetune.rank=3", "finetune: unknown key(s) ['rank']"),
                                          ("+callbacks.probes.sampling.temprature=0.5",
                                           "callbacks.probes.sampling: unknown key(s) ['temprature']"),
                                          ("+trainer.max_step=3", "trainer: unknown key(s) ['max_step']"),
                                          ("+sed=1", "unknown top-level key(s) ['sed']")])
def test_unknown_key_is_an_error_naming_it(override, key, tmp_path):
    cfg = compose_train([override], run_dir=str(tmp_path))  # Hydra's `+` adds keys even to typed nodes
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert key in str(err.value)


def test_unknown_key_without_plus_fails_at_compose():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="nmae"):
        compose_train(["model.nmae=x"])


def test_wrong_type_fails_at_compose():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="micro_batch_size"):
        compose_train(["data.micro_batch_size=two"])
