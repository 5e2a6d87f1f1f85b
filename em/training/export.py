"""Turn a Lightning checkpoint of a run into a PEFT adapter (and optionally a merged HF model).

    python -m em.training.export --ckpt <run_dir>/checkpoints/last.ckpt [--run-dir <run_dir>] \\
        [--out <dir>] [--merged <dir>] [--dtype auto|float32|bfloat16|float16] [--base <model dir or hub id>]

Checkpoints written by em hold only the trainable tensors for LoRA (keys ``model.base_model.model...lora_...``);
the frozen base is rebuilt from the run's config (``<run_dir>/hparams.yaml``, else ``.hydra/config.yaml``) and
base model (``train_summary.json``'s ``base_model``, else the config's model). Accepted checkpoints:

* a ``.ckpt`` file (DDP / single device / FSDP with ``state_dict_type=full``);
* a DeepSpeed checkpoint directory (``last.ckpt/`` with ``checkpoint/*_model_states.pt``), consolidated with
  Lightning's ``convert_zero_checkpoint_to_fp32_state_dict`` (needs ``deepspeed``);
* an FSDP sharded checkpoint directory (``meta.pt`` + ``.metadata``), via ``dcp_to_torch_save``.

The adapter directory loads with ``PeftModel.from_pretrained(base, out)``; ``--merged`` writes the base with the
adapter merged in (safetensors), loadable with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from em.config import as_args
from em.errors import ConfigError, EMError, MissingResourceError
from em.models.loading import DTYPES, ModelArgs, load_model, load_tokenizer, resolve_model_path
from em.models.peft_setup import FinetuneArgs, apply_finetune

log = logging.getLogger(__name__)


# -- reading checkpoints -----------------------------------------------------------------------------------

def _is_deepspeed_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "latest").exists() or any(path.glob("*/*model_states.pt")))


def _is_dcp_dir(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").exists()


def load_checkpoint_state(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The model tensors of a Lightning checkpoint (file, DeepSpeed directory or FSDP sharded directory).

    Keys as Lightning stores them (``model.<name>``), values on CPU.
    """
    path = Path(ckpt)
    if not path.exists():
        raise MissingResourceError(f"checkpoint {path} does not exist")
    if _is_deepspeed_dir(path):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise MissingResourceError(f"{path} is a DeepSpeed checkpoint; reading it needs deepspeed: "
                                       "pip install 'em[deepspeed]'")
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            ck = convert_zero_checkpoint_to_fp32_state_dict(path, Path(tmp) / "consolidated.pt")
        return {k: v for k, v in ck["state_dict"].items() if isinstance(v, torch.Tensor)}
    if _is_dcp_dir(path):
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "consolidated.pt"
            dcp_to_torch_save(path, out)
            ck = torch.load(out, map_location="cpu", weights_only=True)
        return {k: v for k, v in ck["model"].items() if isinstance(v, torch.Tensor)}
    if path.is_dir():
        raise ConfigError(f"{path} is a directory but neither a DeepSpeed nor an FSDP sharded checkpoint")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in ck:
        raise ConfigError(f"{path} has no 'state_dict': not a Lightning checkpoint")
    return dict(ck["state_dict"])


# -- the run's config ----------------------------------------------------------------------------------------

def load_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config a run trained with: ``hparams.yaml`` (CSV logger) or ``.hydra/config.yaml``."""
    import yaml

    run = Path(run_dir)
    for cand in (run / "hparams.yaml", run / ".hydra" / "config.yaml"):
        if cand.exists():
            cfg = yaml.safe_load(cand.read_text())
            if isinstance(cfg, dict) and "model" in cfg and "finetune" in cfg:
                return cfg
    raise MissingResourceError(f"no run config in {run} (looked for hparams.yaml and .hydra/config.yaml); "
                               "pass --run-dir of the training run")


def resolve_base(run_dir: Path, model_args, override: str | None = None) -> str:
    """The base model the run trained on: ``--base``, ``train_summary.json``'s ``base_model``, or the config's."""
    if override:
        return override
    summary = run_dir / "train_summary.json"
    if summary.exists():
        base = json.loads(summary.read_text()).get("base_model")
        if base and (Path(base).exists() or not str(base).startswith("/")):
            return str(base)
    return resolve_model_path(model_args)


def _dtype_for(name: str, model_args, base: str) -> torch.dtype:
    if name == "auto":
        name = model_args.dtype
    if name == "auto":
        cfg_file = Path(base) / "config.json"
        if cfg_file.exists():
            cfg = json.loads(cfg_file.read_text())
            name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
        else:
            name = "float32"
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r}: expected auto or one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


# -- export ----------------------------------------------------------------------------------------------------

def export(ckpt: str | Path, run_dir: str | Path | None = None, out: str | Path | None = None,
           merged: str | Path | None = None, dtype: str = "auto", base: str | None = None) -> dict[str, Any]:
    """Rebuild the run's model from ``ckpt`` and write the adapter (and a merged model). Returns a summary."""
    from em.training.adapter import save_trained  # lazy: import cycle (em.training.adapter imports this module)

    ckpt = Path(ckpt)
    run = Path(run_dir) if run_dir else ckpt.resolve().parent.parent  # <run_dir>/checkpoints/last.ckpt
    cfg = load_run_config(run)
    model_args = dataclasses.replace(as_args(ModelArgs, cfg["model"], "model"), gradient_checkpointing=False)
    ft_args = as_args(FinetuneArgs, cfg["finetune"], "finetune")
    base_path = resolve_base(run, model_args, base)
    torch_dtype = _dtype_for(dtype, model_args, base_path)

    state = load_checkpoint_state(ckpt)
    state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if not state:
        raise ConfigError(f"{ckpt} holds no model tensors (keys 'model.*')")

    model = apply_finetune(load_model(model_args, base_path, dtype=torch_dtype), ft_args)
    names = {n for n, _ in model.named_parameters()} | set(model.state_dict())
    unexpected = sorted(set(state) - names)
    if unexpected:
        raise ConfigError(f"{ckpt} has {len(unexpected)} tensors the rebuilt model lacks, e.g. {unexpected[:3]}: "
                          "was the run's config changed after training?")
    wanted = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in wanted if n not in state]
    if missing:
        raise ConfigError(f"{ckpt} lacks {len(missing)} trained tensors, e.g. {missing[:3]}")
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    wrong = [f"{k}: {tuple(v.shape)} vs {shapes[k]}" for k, v in state.items() if tuple(v.shape) != shapes[k]]
    if wrong:
        raise ConfigError(f"{ckpt}: {len(wrong)} tensors differ in shape from the rebuilt model (another LoRA rank?), "
                          f"e.g. {wrong[:2]}")
    model.load_state_dict(state, strict=False)

    tokenizer = load_tokenizer(model_args, base_path)
    is_adapter = ft_args.kind != "full"
    out = Path(out) if out else run / "exported" / ("adapter" if is_adapter else "model")
    saved = save_trained(model, tokenizer, out, base_path=base_path)
    summary: dict[str, Any] = {"checkpoint": str(ckpt), "run_dir": str(run), "base_model": base_path,
                               "dtype": str(torch_dtype).removeprefix("torch."), "tensors": len(wanted),
                               "adapter_dir" if is_adapter else "model_dir": str(saved)}
    if merged is not None:
        if not is_adapter:
            raise ConfigError("--merged applies to adapters; a full finetune is already exported as a model")
        merged_model = model.merge_and_unload()
        merged_dir = Path(merged)
        merged_model.save_pretrained(merged_dir, safe_serialization=True)
        tokenizer.save_pretrained(merged_dir)
        summary["merged_dir"] = str(merged_dir)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m em.training.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint: a .ckpt file or a DeepSpeed/FSDP directory")
    p.add_argument("--run-dir", help="the training run's directory (default: the checkpoint's ../..)")
    p.add_argument("--out", help="adapter output directory (default: <run_dir>/exported/adapter)")
    p.add_argument("--merged", help="also write the base with the adapter merged in, to this directory")
    p.add_argument("--dtype", default="auto", help="auto (the run's model.dtype, else the base's) or float32/bf16/...")
    p.add_argument("--base", help="base model directory or hub id (default: the run's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = export(args.ckpt, args.run_dir, args.out, args.merged, args.dtype, args.base)
    except EMError as err:
        print(f"em: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
