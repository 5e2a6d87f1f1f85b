"""Strategy presets, the sharding helpers, adapter saving/export and the GPU smoke test's checks (CPU, one process).

The multi-process runs (DDP, FSDP, DeepSpeed on gloo) are in tests/test_ddp.py.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from em.errors import ConfigError
from em.training.run import build_strategy
from tests.helpers import compose_train

REPO = Path(__file__).resolve().parents[1]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed (pip install 'em[deepspeed]')")
FAST = ["trainer.max_steps=3", "trainer.enable_progress_bar=false", "callbacks=none",
        "data.global_batch_size=4", "data.micro_batch_size=4"]


def _gpu_smoke():
    """scripts/gpu_smoke.py as module ``gpu_smoke`` (so Hydra can instantiate its callback by name)."""
    if "gpu_smoke" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_smoke", REPO / "scripts" / "gpu_smoke.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["gpu_smoke"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["gpu_smoke"]


def _tiny_peft(dtype=torch.float32):
    from em.models.loading import ModelArgs, load_model, resolve_model_path
    from em.models.peft_setup import FinetuneArgs, apply_finetune

    args = ModelArgs(name="tiny", kind="tiny", dtype="float32")
    path = resolve_model_path(args)
    return apply_finetune(load_model(args, path, dtype=dtype), FinetuneArgs()), path


# -- presets ---------------------------------------------------------------------------------------------

def test_ddp_and_fsdp_presets_instantiate():
    from lightning.pytorch.strategies import DDPStrategy

    from em.training.sharded import AdapterFSDPStrategy

    ddp = build_strategy(compose_train(["strategy=ddp"], run_dir="/tmp/x"))
    assert type(ddp) is DDPStrategy and ddp._ddp_kwargs["find_unused_parameters"] is False
    fsdp = build_strategy(compose_train(["strategy=fsdp"], run_dir="/tmp/x"))
    assert isinstance(fsdp, AdapterFSDPStrategy)
    assert fsdp.kwargs["use_orig_params"] is True and fsdp._state_dict_type == "full"
    assert fsdp.auto_wrap_layers == "auto"
    named = build_strategy(compose_train(["strategy=fsdp", "strategy.auto_wrap_layers=[Qwen2DecoderLayer]"],
                                         run_dir="/tmp/x"))
    assert named.auto_wrap_layers == ["Qwen2DecoderLayer"]
    assert build_strategy(compose_train(["strategy=auto"], run_dir="/tmp/x")) == "auto"


@needs_deepspeed
@pytest.mark.parametrize("preset,stage,offload", [("deepspeed_zero2", 2, False), ("deepspeed_zero3", 3, False),
                                                  ("deepspeed_zero3_offload", 3, True)])
def test_deepspeed_presets_instantiate(preset, stage, offload):
    from em.training.sharded import EMDeepSpeedStrategy, zero_stage

    s = build_strategy(compose_train([f"strategy={preset}"], run_dir="/tmp/x"))
    assert isinstance(s, EMDeepSpeedStrategy) and zero_stage(s) == stage
    assert s.exclude_frozen_parameters is True  # adapter-only checkpoints
    zero = s.config["zero_optimization"]
    assert ("offload_optimizer" in zero and "offload_param" in zero) == offload
    if offload:  # em's torch AdamW must be allowed with offload
        assert s.config["zero_force_ds_cpu_optimizer"] is False


@needs_deepspeed
def test_deepspeed_extra_config_is_merged_and_zero3_fix_is_detected():
    from em.training.sharded import zero3_reentrant_checkpointing_needed

    s = build_strategy(compose_train(["strategy=deepspeed_zero3",
                                      "+strategy.extra_config.zero_optimization.stage3_param_persistence_threshold=0"],
                                     run_dir="/tmp/x"))
    assert s.config["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert s.config["zero_optimization"]["stage"] == 3  # merged, not replaced
    import deepspeed
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc

    # DeepSpeed#8148 (frozen params + checkpoint recompute) is in the installed release iff the helper exists
    assert zero3_reentrant_checkpointing_needed() is (not hasattr(ppc, "update_recompute_parameters")), \
        deepspeed.__version__


def test_deepspeed_preset_without_deepspeed_is_a_clear_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'em\[deepspeed\]'"):
        build_strategy(compose_train(["strategy=deepspeed_zero2"], run_dir="/tmp/x"))


# -- sharding helpers ------------------------------------------------------------------------------------

def test_fsdp_wrap_policy_wraps_decoder_layers_and_lora_leaves():
    from em.training.sharded import fsdp_wrap_policy

    model, _ = _tiny_peft()
    policy = fsdp_wrap_policy(model)
    wrapped = {n for n, m in model.named_modules() if n and policy(module=m, recurse=False, nonwrapped_numel=0)}
    layers = {n for n in wrapped if n.endswith(tuple(f"layers.{i}" for i in range(8)))}
    lora = {n for n in wrapped if ".lora_A." in n or ".lora_B." in n}
    assert len(layers) == 2 and lora and wrapped == layers | lora
    assert not any("base_layer" in n or "embed" in n for n in wrapped)  # frozen base: inside its layer's unit
    with pytest.raises(ConfigError, match="NoSuchLayer"):
        fsdp_wrap_policy(model, ["NoSuchLayer"])


def test_gather_state_without_sharding_is_a_copy_with_clean_names():
    from em.training.sharded import clean_name, gather_state, trainable_param_names

    model, _ = _tiny_peft()
    state = gather_state(model)
    assert list(state) == trainable_param_names(model) and len(state) == 28
    p = next(p for n, p in model.named_parameters() if p.requires_grad)
    assert state[next(iter(state))].data_ptr() != p.data_ptr()  # a copy
    assert clean_name("a._fsdp_wrapped_module.b._checkpoint_wrapped_module.c") == "a.b.c"


# -- saving and exporting ----------------------------------------------------------------------------------

def test_adapter_keys_match_peft_and_dtype_follows_the_base(tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from em.training.adapter import collect_trained_state, save_trained, tensors_digest

    model, base_path = _tiny_peft(dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # PEFT's fp32 adapters
    ts = collect_trained_state(model)
    assert set(ts.adapter_tensors()) == set(get_peft_model_state_dict(model))  # the names PEFT itself saves
    out = save_trained(model, None, tmp_path / "adapter", base_path="my/base")
    saved = load_file(out / "adapter_model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}  # the base's dtype
    assert tensors_digest(saved) == tensors_digest(ts.adapter_tensors())
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "my/base"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), out)
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert len(got) == len(saved)
    for n, p in got.items():
        assert torch.equal(p.detach().to(torch.bfloat16), saved[n.replace(".default.", ".")])


def test_digest_changes_with_any_tensor():
    from em.training.adapter import tensors_digest

    a = {"x": torch.zeros(2, 2), "y": torch.ones(3)}
    assert tensors_digest(a) == tensors_digest({"y": torch.ones(3), "x": torch.zeros(2, 2)})
    b = {"x": torch.zeros(2, 2), "y": torch.tensor([1.0, 1.0, 1.0 + 1e-7])}
    assert tensors_digest(a) != tensors_digest(b)
    assert tensors_digest(a) != tensors_digest({"x": torch.zeros(2, 2, dtype=torch.float64), "y": torch.ones(3)})


def test_export_from_ckpt_gives_the_saved_adapter_and_a_merged_model(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from em.training.export import main
    from em.training.run import train

    s = train(compose_train(FAST, run_dir=str(tmp_path / "run")))
    rc = main(["--ckpt", s["last_checkpoint"], "--out", str(tmp_path / "exp"), "--merged", str(tmp_path / "merged")])
    assert rc == 0
    a = load_file(Path(s["adapter_dir"]) / "adapter_model.safetensors")
    b = load_file(tmp_path / "exp" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(s["base_model"]), tmp_path / "exp").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    # a run whose config no longer matches the checkpoint is refused, not half-loaded; no config: a clear error
    other = tmp_path / "other"
    other.mkdir()
    (other / "hparams.yaml").write_text((tmp_path / "run" / "hparams.yaml").read_text().replace("  r: 32", "  r: 8"))
    assert "r: 8" in (other / "hparams.yaml").read_text()
    with pytest.raises(ConfigError, match="differ in shape"):
        from em.training.export import export

        export(s["last_checkpoint"], other, out=tmp_path / "never")
    r = subprocess.run([sys.executable, "-m", "em.training.export", "--ckpt", s["last_checkpoint"],
                        "--run-dir", str(tmp_path / "nope")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "no run config" in r.stderr


def test_export_reads_a_sharded_dcp_checkpoint(tmp_path):
    import torch.distributed.checkpoint as dcp

    from em.training.export import load_checkpoint_state

    state = {"model": {"model.a.lora_A.default.weight": torch.randn(2, 3)}, "optimizer_0": {}}
    dcp.save(state, checkpoint_id=str(tmp_path / "last.ckpt"))
    got = load_checkpoint_state(tmp_path / "last.ckpt")
    assert list(got) == ["model.a.lora_A.default.weight"]
    assert torch.equal(got["model.a.lora_A.default.weight"], state["model"]["model.a.lora_A.default.weight"])


# -- the GPU smoke test's checks, on CPU ----------------------------------------------------------------------

def test_gpu_smoke_checks_pass_on_cpu_and_catch_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    smoke = _gpu_smoke()
    report = smoke.run_one("auto", tmp_path / "run", steps=3, cpu=True)
    assert report["problems"] == [] and report["lora_tensors"] == 28 and report["tokens_per_s"] > 0
    live = smoke.LiveAdapterCapture.live
    adapter = tmp_path / "run" / "adapter"
    reloaded = smoke.peft_reload(str(Path(json.loads((tmp_path / "run" / "train_summary.json").read_text())
                                          ["base_model"])), adapter, torch.float32)
    assert smoke.compare_states(reloaded, live, what="x") == []
    # the checks can fail: a perturbed tensor, a missing one, a shard, base weights, an untrained adapter
    k = next(iter(live))
    bad = dict(live, **{k: live[k] + 1e-3})
    problems = smoke.compare_states(reloaded, bad, what="x")
    assert len(problems) == 1 and "max |diff|" in problems[0]
    saved = load_file(adapter / "adapter_model.safetensors")
    key = next(iter(saved))
    for corrupt, expect in [({**saved, key: torch.empty(0)}, "ungathered"),
                            ({**saved, "base_model.model.lm_head.weight": torch.ones(2, 2)}, "base weights"),
                            ({kk: torch.zeros_like(v) for kk, v in saved.items()}, "not trained"),
                            ({kk: v for kk, v in saved.items() if kk != key}, "missing")]:
        d = tmp_path / "corrupt"
        d.mkdir(exist_ok=True)
        save_file(corrupt, str(d / "adapter_model.safetensors"))
        assert any(expect in p for p in smoke.check_adapter_file(d, live)), expect


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_gpu_smoke(preset, tmp_path):
    if preset.startswith("deepspeed") and not HAS_DEEPSPEED:
        pytest.skip("deepspeed not installed")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_smoke.py"), "--strategy", preset,
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert report["problems"] == [] and report["peak_gpu_mem_gib"] > 0
