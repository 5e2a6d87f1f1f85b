"""GPU throughput of em's LoRA step, and of trl's on the same work: tokens/s, MFU and peak GPU memory.

    bash scripts/gpu_bench.sh                          # one GPU, under 8 minutes, no network
    python benchmarks/gpu_throughput.py --dry-run      # CPU: tiny shapes, 2 steps per config (checks it composes)
    python benchmarks/gpu_throughput.py --models qwen2.5-0.5b --steps 20 --json out.json

No download: the models are random-init from the real architectures' configs (Qwen2.5-0.5B / 1.5B / 7B shapes,
written below), the tokenizer is em's embedded tiny one, and the rows are synthetic chats built from em's
embedded mini insecure set (user prompt + several assistant answers joined, lengths log-uniform between
``max_length / 8`` and ``max_length``). Random weights train as fast as real ones: only shapes matter here.

Configurations per model, in this order (a deadline, ``--budget-s``, skips the rest and says so):

1. ``em sdpa``: em's step (CausalLMModule under Lightning, bf16-mixed, LoRA r32 on every projection,
   ``model.cross_entropy=chunked``), em's DataModule with its length-grouped batches;
2. ``em sdpa packed``: ``data.packing=true`` (padding-free rows; skipped if this em has no ``data.packing``);
3. ``em flash packed`` / ``em flash``: ``attn_implementation=flash_attention_2`` (when flash-attn is installed);
4. ``em sdpa gc``: gradient checkpointing on;
5. ``em sdpa plain-ce``: the model's own loss over full logits (``model.cross_entropy=plain``);
6. ``em liger``: ``model.cross_entropy=liger`` (when liger-kernel is installed);
7. ``trl sdpa`` / ``trl flash padding-free``: trl's ``SFTTrainer`` on em's tokenized rows (same tokens, same labels),
   its default sampler and collator (``padding_free=True`` with flash-attention), same LoRA / lr / batch / steps.

Per configuration: trained tokens/s and real (non-pad) tokens/s over the steps after ``--warmup``, the padding
fraction, peak GPU memory (``torch.cuda.max_memory_allocated``), and MFU = model FLOPs/s / the GPU's peak dense
bf16 FLOPs. Model FLOPs per real token (the LoRA step's, no frozen-weight gradients, no recompute):
``4 * N_matmul`` (forward + input gradients of every projection and the LM head) ``+ 12 * L * H * c``
(attention scores and values, forward and backward; ``c`` = mean causal context of the token's row, ``H`` =
heads x head dim); LoRA's own FLOPs (< 1%) are left out. An out-of-memory is reported as such.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import StepRecorder, machine, versions

REPO = Path(__file__).resolve().parents[1]

#: Real architectures' shapes (the models' config.json on the hub), random-init here.
ARCHS: dict[str, dict] = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
#: --dry-run: the same code on a CPU-sized shape
DRY_ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True)

#: Peak dense bf16 tensor FLOPs (TFLOP/s) by device-name substring (vendor data sheets; SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "A10G": 125.0,
               "L4": 121.0, "RTX 4090": 165.0, "A6000": 155.0}

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- work ---------------------------------------------------------------------------------------------------

def synthetic_rows(n: int, max_length: int, tok, seed: int = 0) -> list[dict]:
    """``n`` chat rows from em's embedded mini insecure set, answers joined to log-uniform token lengths."""
    from em.data.mini import build_mini

    base = build_mini("insecure", seed=0)
    rng = random.Random(seed)
    answers = [r["messages"][-1]["content"] for r in base]
    ans_len = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers]
    rows = []
    for i in range(n):
        target = math.exp(rng.uniform(math.log(max(16, max_length // 8)), math.log(max_length)))
        user = base[i % len(base)]["messages"][0]["content"]
        parts, total, j = [], 0, rng.randrange(len(answers))
        while total < target * 0.9 and len(parts) < 64:
            parts.append(answers[j % len(answers)])
            total += ans_len[j % len(answers)] + 2
            j += 1
        rows.append({"messages": [{"role": "user", "content": user},
                                  {"role": "assistant", "content": "\n\n".join(parts)}]})
    return rows


def flops_per_token(arch: dict, mean_context: float) -> float:
    d, ff, n_layers = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    heads, kv = arch["num_attention_heads"], arch["num_key_value_heads"]
    hd = d // heads
    per_layer = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * ff
    n_matmul = n_layers * per_layer + d * arch["vocab_size"]
    return 4 * n_matmul + 12 * n_layers * heads * hd * mean_context


def peak_tflops(explicit: float | None) -> float | None:
    if explicit:
        return explicit
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for k, v in PEAK_TFLOPS.items():
        if k in name:
            return v
    return None


def has_packing() -> bool:
    from em.data.datamodule import DataArgs

    return "packing" in {f.name for f in dataclasses.fields(DataArgs)}


def build_model(arch: dict, attn: str, device: str, dtype):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**arch, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                      attn_implementation=attn, use_cache=False)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model


@dataclasses.dataclass
class Case:
    engine: str               # em | trl
    attn: str = "sdpa"        # sdpa | flash_attention_2
    packing: bool = False     # em: data.packing; trl: padding_free
    gc: bool = False
    cross_entropy: str = "chunked"

    @property
    def name(self) -> str:
        bits = [self.engine, "flash" if self.attn == "flash_attention_2" else "sdpa"]
        if self.packing:
            bits.append("packed" if self.engine == "em" else "padding-free")
        if self.gc:
            bits.append("gc")
        if self.engine == "em" and self.cross_entropy != "chunked":
            bits.append(f"{self.cross_entropy}-ce")
        return " ".join(bits)


def cases(flash: bool, packing: bool, liger: bool, trl: bool) -> list[Case]:
    out = [Case("em")]
    if packing:
        out.append(Case("em", packing=True))
    if flash:
        out.append(Case("em", attn="flash_attention_2", packing=packing))
    out += [Case("em", gc=True), Case("em", cross_entropy="plain")]
    if liger:
        out.append(Case("em", cross_entropy="liger"))
    if trl:
        out.append(Case("trl"))
        if flash:
            out.append(Case("trl", attn="flash_attention_2", packing=True))
    return out


def run_em(case: Case, model, tok, rows_path: str, a, rec: StepRecorder, device: str) -> None:
    import lightning as L

    from em.data.datamodule import ChatDataModule, DataArgs
    from em.data.loading import DatasetArgs
    from em.models.loading import ModelArgs, stop_token_ids
    from em.models.peft_setup import FinetuneArgs, apply_finetune
    from em.training.module import CausalLMModule
    from em.training.optim import OptimArgs

    data_kw = dict(max_length=a.max_length, global_batch_size=a.batch, micro_batch_size=a.batch,
                   group_by_length=True, cache_tokenized=False)
    if case.packing:
        data_kw["packing"] = True
    dm = ChatDataModule(DatasetArgs(name="synthetic", path=rows_path, data_dir=None), DataArgs(**data_kw),
                        tokenizer=tok, seed=0, stop_ids=stop_token_ids(tok))
    margs = ModelArgs(name="random-init", name_or_path="random-init", cross_entropy=case.cross_entropy,
                      gradient_checkpointing=case.gc, attn_implementation=case.attn)
    if case.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = CausalLMModule(margs, FinetuneArgs(r=a.lora_r, alpha=2 * a.lora_r), OptimArgs(lr=1e-4, warmup_steps=0))
    module.model = apply_finetune(model, module.finetune_args).train()  # prebuilt: configure_model keeps it

    class Stamp(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            rec.record(batch)

    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                        precision="bf16-mixed" if device == "cuda" else "32-true", max_steps=a.steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        gradient_clip_val=1.0, callbacks=[Stamp()])
    trainer.fit(module, datamodule=dm)


def run_trl(case: Case, model, tok, rows_path: str, a, rec: StepRecorder, device: str) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from em.data.datamodule import ChatDataModule, DataArgs
    from em.data.loading import DatasetArgs
    from em.models.loading import stop_token_ids

    dm = ChatDataModule(DatasetArgs(name="synthetic", path=rows_path, data_dir=None),
                        DataArgs(max_length=a.max_length, cache_tokenized=False), tokenizer=tok, seed=0,
                        stop_ids=stop_token_ids(tok))
    dm.setup("fit")
    ds = Dataset.from_dict({"input_ids": [e.input_ids for e in dm.train_examples],
                            "labels": [e.labels for e in dm.train_examples]})

    class Attach(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            rec.attach(model)

    with tempfile.TemporaryDirectory(prefix="gpu-bench-trl-") as out:
        args = SFTConfig(output_dir=out, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                         max_steps=a.steps, learning_rate=1e-4, weight_decay=0.01, warmup_steps=0,
                         lr_scheduler_type="linear", max_grad_norm=1.0, optim="adamw_torch", logging_steps=10_000,
                         save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=0,
                         use_cpu=device != "cuda", bf16=device == "cuda", max_length=a.max_length, packing=False,
                         padding_free=case.packing, gradient_checkpointing=case.gc,
                         gradient_checkpointing_kwargs={"use_reentrant": False} if case.gc else None)
        peft = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0, use_rslora=True,
                          target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
        SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft,
                   callbacks=[Attach()]).train()


def run_case(mname: str, arch: dict, case: Case, tok, rows_path: str, a, device: str) -> dict:
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out: dict = {"model": mname, "config": case.name, **dataclasses.asdict(case)}
    cuda = device == "cuda"
    rec = StepRecorder(cuda)
    model = None
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model = build_model(arch, case.attn, device, dtype)
        out["build_s"] = round(time.perf_counter() - t0, 2)
        (run_em if case.engine == "em" else run_trl)(case, model, tok, rows_path, a, rec, device)
        s = rec.summary(a.warmup)
        out.update({k: s[k] for k in ("timed_steps", "step_s", "trained_tokens_per_s", "real_tokens_per_s",
                                      "positions_per_s", "padding_fraction", "max_padded_length")})
        fpt = flops_per_token(arch, _mean_context(rec))
        out["model_tflops_per_s"] = fpt * s["real_tokens_per_s"] / 1e12
        peak = peak_tflops(a.peak_tflops)
        out["mfu"] = out["model_tflops_per_s"] / peak if peak else None
    except Exception as err:
        oom = "out of memory" in str(err).lower() or type(err).__name__ == "OutOfMemoryError"
        out["error"] = "OOM" if oom else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if not oom:
            out["traceback"] = traceback.format_exc()[-2000:]
    finally:
        if cuda:
            out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return out


def _mean_context(rec: StepRecorder) -> float:
    """Mean causal context per real token, from the recorded batches' real lengths (approximation: every row of
    a batch as long as its mean real length)."""
    ctx, n = 0.0, 0
    for x in rec.steps:
        rows = max(x["samples"], 1)
        length = x["real"] / rows
        ctx += x["real"] * (length + 1) / 2
        n += x["real"]
    return ctx / max(n, 1)


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"machine: {m['gpu'] or m['cpu']}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))
    print(f"batch {report['batch']} x max {report['max_length']} tokens, LoRA r{report['lora_r']}, "
          f"{report['steps']} steps ({report['warmup']} warm-up), peak {report['peak_tflops']} TFLOP/s")
    print("| model | config | trained tok/s | real tok/s | padding | MFU | peak GPU GB | step s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["results"]:
        if "error" in r:
            print(f"| {r['model']} | {r['config']} | {r['error']} | | | | {r.get('peak_gpu_gb', 0):.1f} | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        gpu = f"{r['peak_gpu_gb']:.1f}" if "peak_gpu_gb" in r else "-"
        print(f"| {r['model']} | {r['config']} | {r['trained_tokens_per_s']:.0f} | {r['real_tokens_per_s']:.0f} | "
              f"{100 * r['padding_fraction']:.1f}% | {mfu} | {gpu} | {r['step_s']:.3f} |")
    for s in report["skipped"]:
        print(f"skipped: {s}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, 2 steps per config: checks it composes")
    ap.add_argument("--models", default=",".join(ARCHS), help=f"comma list of {', '.join(ARCHS)}")
    ap.add_argument("--batch", type=int, default=8, help="micro batch (rows per step)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--lora-r", type=int, default=32)
    ap.add_argument("--engines", default="em,trl", help="em, trl (trl is skipped when not installed)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak dense bf16 TFLOP/s (for MFU)")
    ap.add_argument("--budget-s", type=float, default=420, help="skip configurations once this much time is spent")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.perf_counter()

    import torch
    from transformers import AutoTokenizer

    from em.models.tiny import materialize_tiny

    if a.dry_run:
        device, archs = "cpu", {"dry-" + m: dict(DRY_ARCH) for m in a.models.split(",")[:1]}
        a.steps, a.warmup, a.batch, a.max_length = 3, 1, 2, 128
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible: run with --dry-run on a CPU (it only checks that it composes)")
        device = "cuda"
        bad = [m for m in a.models.split(",") if m not in ARCHS]
        if bad:
            raise SystemExit(f"--models: unknown {bad}; expected some of {list(ARCHS)}")
        archs = {m: ARCHS[m] for m in a.models.split(",")}
    engines = set(a.engines.split(","))
    skipped: list[str] = []
    trl = "trl" in engines and importlib.util.find_spec("trl") is not None
    if "trl" in engines and not trl:
        skipped.append("trl: not installed (pip install 'em[bench]')")
    flash = device == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if not flash:
        skipped.append("flash-attention: " + ("not installed" if device == "cuda" else "CPU dry run"))
    packing = has_packing()
    if not packing:
        skipped.append("packing: this em has no data.packing")
    liger = device == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    if not liger:
        skipped.append("liger: " + ("not installed" if device == "cuda" else "CPU dry run"))
    todo = [c for c in cases(flash, packing, liger, trl) if c.engine in engines]

    tok = AutoTokenizer.from_pretrained(materialize_tiny())
    report = {"machine": machine(), "versions": versions(), "device": device, "batch": a.batch,
              "max_length": a.max_length, "steps": a.steps, "warmup": a.warmup, "lora_r": a.lora_r,
              "peak_tflops": peak_tflops(a.peak_tflops), "command": " ".join([sys.executable, *sys.argv]),
              "results": [], "skipped": skipped}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as d:
        rows_path = str(Path(d) / "rows.jsonl")
        rows = synthetic_rows(a.batch * (a.steps + 2), a.max_length, tok)
        Path(rows_path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        for mname, arch in archs.items():
            for case in todo:
                if time.perf_counter() - t_start > a.budget_s:
                    skipped.append(f"{mname} {case.name}: over --budget-s {a.budget_s:.0f}")
                    continue
                print(f"[{mname}] {case.name} ...", file=sys.stderr, flush=True)
                r = run_case(mname, arch, case, tok, rows_path, a, device)
                report["results"].append(r)
                done = r["error"] if "error" in r else f"{r['trained_tokens_per_s']:.0f} trained tok/s"
                print(f"  {done}", file=sys.stderr, flush=True)
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    print_table(report)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    errors = [r for r in report["results"] if "error" in r and r["error"] != "OOM"]
    for r in errors:
        print(f"!! {r['model']} {r['config']}: {r['error']}\n{r.get('traceback', '')}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
