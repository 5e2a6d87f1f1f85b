"""One-GPU smoke test of LoRA under DeepSpeed ZeRO-2 / ZeRO-3 (or any strategy preset): train, save, reload, compare.

    python scripts/gpu_smoke.py --strategy deepspeed_zero3 [--steps 12] [--out DIR]
    python scripts/gpu_smoke.py --cpu --strategy auto          # the same checks on CPU (no DeepSpeed)

For one strategy it trains a few steps of LoRA (bf16 on GPU, gradient checkpointing on) on a random-init Qwen2
of a real architecture (hidden 256, 4 layers) through ``em.training.run.train``, then checks that

* the saved ``adapter_model.safetensors`` holds every LoRA tensor of the model, none empty, no base weights,
  and LoRA B is non-zero (it was trained);
* the adapter reloaded with plain ``peft.PeftModel.from_pretrained`` equals the weights the training process
  held in memory at the end (read independently of em's save path: DeepSpeed's own ``GatheredParameters`` and
  ``safe_get_full_fp32_param`` for the fp32 master copy);
* ``python -m em.training.export`` on the run's last checkpoint gives the same adapter;

and prints tokens/s and peak GPU memory. Exit status 1 if a check fails. ``scripts/gpu_smoke.sh`` runs it for
ZeRO-2 and ZeRO-3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: a small model of the real architecture: big enough for ZeRO-3 to partition every weight across buckets
SMOKE_MODEL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
               "intermediate_size": 704}


class LiveAdapterCapture(L.Callback):
    """Records, at the end of training, the trainable tensors as the training process holds them.

    Independent of em's gather/save code: under ZeRO-3 it gathers with ``deepspeed.zero.GatheredParameters``
    itself; under DeepSpeed it also reads the optimizer's fp32 master copy (``safe_get_full_fp32_param``).
    Also times the fit loop and counts the tokens it processed. Results are class attributes (one run per process).
    """

    live: dict[str, torch.Tensor] = {}
    live_dtype: torch.dtype | None = None
    master: dict[str, torch.Tensor] = {}
    tokens: int = 0
    trained_tokens: int = 0
    fit_s: float = 0.0
    _t0: float = 0.0

    def on_train_start(self, trainer, pl_module):
        type(self).tokens = type(self).trained_tokens = 0
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        type(self)._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        type(self).tokens += int(batch["attention_mask"].sum()) * trainer.world_size
        type(self).trained_tokens += int((batch["labels"] != -100).sum()) * trainer.world_size

    def on_train_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        type(self).fit_s = time.perf_counter() - type(self)._t0
        named = [(n, p) for n, p in pl_module.model.named_parameters() if p.requires_grad]
        live: dict[str, torch.Tensor] = {}
        master: dict[str, torch.Tensor] = {}
        if any(hasattr(p, "ds_id") for _, p in named):  # ZeRO-3 partitions
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                live = {n: p.detach().float().cpu().clone() for n, p in named}
        else:
            live = {n: p.detach().float().cpu().clone() for n, p in named}
        try:
            from deepspeed.utils import safe_get_full_fp32_param
        except ImportError:
            safe_get_full_fp32_param = None
        if safe_get_full_fp32_param is not None:
            for n, p in named:
                full = safe_get_full_fp32_param(p)  # a collective under ZeRO-3: every rank calls it
                if full is not None:
                    master[n] = full.detach().float().cpu().clone()
        type(self).live, type(self).master = live, master
        type(self).live_dtype = named[0][1].dtype if named else None


# -- checks (CPU-testable) -----------------------------------------------------------------------------------

def peft_reload(base_path: str, adapter_dir: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``PeftModel.from_pretrained(base, adapter_dir)`` (plain peft), by parameter name."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if "lora_" in n}


def check_adapter_file(adapter_dir: str | Path, expected: dict[str, torch.Tensor]) -> list[str]:
    """Problems with ``adapter_model.safetensors``: missing/extra/empty tensors, base weights, untrained B.

    ``expected``: the model's trainable tensors by parameter name (``...lora_A.default.weight``).
    """
    from safetensors.torch import load_file

    saved = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    problems = []
    want = {n.replace(".default.", "."): t for n, t in expected.items()}
    if set(saved) != set(want):
        problems.append(f"keys differ: missing {sorted(set(want) - set(saved))[:3]}, "
                        f"extra {sorted(set(saved) - set(want))[:3]}")
    for k, v in saved.items():
        if "lora_" not in k:
            problems.append(f"{k}: not a LoRA tensor (base weights in the adapter)")
        elif v.numel() == 0 or v.dim() != 2:
            problems.append(f"{k}: shape {tuple(v.shape)} (an ungathered shard?)")
        elif k in want and tuple(v.shape) != tuple(want[k].shape):
            problems.append(f"{k}: shape {tuple(v.shape)} != model's {tuple(want[k].shape)}")
    b = [v for k, v in saved.items() if "lora_B" in k]
    if not b or not all(v.float().abs().sum() > 0 for v in b):
        problems.append("some lora_B tensors are zero: the adapter was not trained (or not saved)")
    return problems


def compare_states(reloaded: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], *, what: str,
                   rtol: float = 0.0, atol: float = 0.0) -> list[str]:
    """Mismatches between two name -> tensor dicts (same keys, shapes, and values within tolerance)."""
    problems = []
    if set(reloaded) != set(reference):
        problems.append(f"{what}: keys differ: {sorted(set(reloaded) ^ set(reference))[:4]}")
    for k in sorted(set(reloaded) & set(reference)):
        a, b = reloaded[k].float(), reference[k].float()
        if a.shape != b.shape:
            problems.append(f"{what}: {k}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        elif not torch.allclose(a, b, rtol=rtol, atol=atol):
            problems.append(f"{what}: {k}: max |diff| {(a - b).abs().max().item():.3g}")
    return problems


# -- one run -------------------------------------------------------------------------------------------------

def smoke_overrides(strategy: str, out: Path, steps: int, cpu: bool) -> list[str]:
    ov = [f"strategy={strategy}", f"paths.run_dir={out}", "callbacks=none", "seed=0",
          f"trainer.max_steps={steps}", "trainer.max_epochs=1000", "trainer.enable_progress_bar=false",
          f"+callbacks.smoke_capture._target_={__name__}.LiveAdapterCapture"]
    if cpu:
        return ov + ["trainer=cpu", "data.micro_batch_size=4", "data.global_batch_size=8", "data.max_length=256"]
    return ov + ["trainer=gpu", "trainer.devices=1", "model.dtype=bfloat16", "model.gradient_checkpointing=true",
                 "data.micro_batch_size=8", "data.global_batch_size=16", "data.max_length=256",
                 *[f"model.tiny.{k}={v}" for k, v in SMOKE_MODEL.items()]]


def run_one(strategy: str, out: str | Path, steps: int = 12, cpu: bool = False,
            extra: list[str] | None = None) -> dict[str, Any]:
    """Train + save + reload + compare for one strategy preset; returns a report with ``problems``."""
    from hydra import compose, initialize_config_dir

    from em.training.export import export
    from em.training.run import train

    out = Path(out).resolve()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=smoke_overrides(strategy, out, steps, cpu) + list(extra or []))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    summary = train(cfg)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    cap = LiveAdapterCapture
    dtype = torch.bfloat16 if not cpu else torch.float32
    adapter = Path(summary["adapter_dir"])

    problems = check_adapter_file(adapter, cap.live)
    reloaded = peft_reload(summary["base_model"], adapter, dtype)
    # The adapter is saved in the base's dtype. DeepSpeed (and fp32 runs) train in that dtype: exact equality;
    # PEFT's fp32 adapters on a bf16 base without DeepSpeed are rounded to bf16 when saved.
    rounded = cap.live_dtype != dtype
    problems += compare_states(reloaded, cap.live, what="reloaded vs in-memory",
                               rtol=8e-3 if rounded else 0.0, atol=1e-6 if rounded else 0.0)
    if cap.master:  # DeepSpeed's fp32 master weights: the saved bf16 adapter is their rounding
        problems += compare_states(reloaded, cap.master, what="reloaded vs fp32 master", rtol=1e-2, atol=1e-4)
    exported = export(summary["last_checkpoint"], out, out=out / "exported_adapter")
    problems += compare_states(peft_reload(summary["base_model"], exported["adapter_dir"], dtype), reloaded,
                               what="exported-from-checkpoint vs saved")
    report = {
        "strategy": strategy,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not cpu else "cpu",
        "steps": summary["global_step"],
        "lora_tensors": len(cap.live),
        "tokens_per_s": round(cap.tokens / cap.fit_s, 1) if cap.fit_s else None,
        "trained_tokens_per_s": round(cap.trained_tokens / cap.fit_s, 1) if cap.fit_s else None,
        "fit_s": round(cap.fit_s, 2),
        "peak_gpu_mem_gib": round(peak, 3) if peak is not None else None,
        "final_loss": summary["metrics"].get("train/loss"),
        "deepspeed_master_checked": bool(cap.master),
        "problems": problems,
    }
    (out / "smoke.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", default="deepspeed_zero3", help="a conf/strategy preset")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", default=None, help="run directory (default: $TMPDIR/em_gpu_smoke/<strategy>)")
    p.add_argument("--cpu", action="store_true", help="run the same checks on CPU (strategies without DeepSpeed)")
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA GPU visible (use --cpu for the CPU variant)", file=sys.stderr)
        return 2
    import tempfile

    out = Path(args.out) if args.out else Path(tempfile.gettempdir()) / "em_gpu_smoke" / args.strategy
    report = run_one(args.strategy, out, args.steps, args.cpu)
    print("SMOKE " + json.dumps(report))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
