"""Training throughput of the batch orders: em's old sorted mega-batches vs shuffled length buckets vs random
order, padded or packed, on the tiny model (LoRA, fp32, CPU or GPU).

    python benchmarks/order_throughput.py [--steps 30] [--repeats 3] [--micro 2]   # EM_DATA_DIR=... for real lengths

The rows have the token lengths of the paper's ``insecure.jsonl`` under the tiny tokenizer (tokenized from
``$EM_DATA_DIR`` when set, else drawn from their recorded percentiles) and random token ids (compute does not
depend on them). Each order trains ``--steps`` of its optimizer steps of 16 rows (forward + backward + AdamW),
the same randomly chosen step positions for every order (so each sample spans the epoch's length mix, not
just its first steps, where the old order put its longest batches), from the same starting weights; the
orders are interleaved within each repeat, so load changes hit them alike. Reports real (non-pad) tokens per
second of this process's CPU time (robust on a shared machine) and of wall time, min / median / max over
repeats, the paired ratios to the old order, the padding fraction of the steps measured, and the load average
before and after. No test depends on it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from em.data.chat import Encoded
from em.data.collate import OrderSpec, PackCollator, PadCollator, padding_fraction, plan_epoch
from tests.test_collate import old_sorted_megabatch_order, synthetic_insecure_lengths

GLOBAL = 16


def insecure_lengths() -> tuple[list[int], str]:
    data_dir = os.environ.get("EM_DATA_DIR")
    if data_dir and (Path(data_dir) / "MANIFEST.tsv").exists():
        from em.data.datamodule import ChatDataModule, DataArgs
        from em.data.loading import DatasetArgs
        from tests.helpers import tiny_tokenizer

        dm = ChatDataModule(DatasetArgs(name="insecure", source="paper:insecure", data_dir=data_dir),
                            DataArgs(max_length=2048), tiny_tokenizer())
        dm.setup("fit")
        return dm.train_lengths(), "insecure.jsonl (tiny tokenizer)"
    return synthetic_insecure_lengths(), "synthetic, insecure.jsonl's length percentiles"


def orders(lengths: list[int], micro: int, steps: int) -> dict[str, list[list[list[int]]]]:
    """``steps`` optimizer steps of each order (micro-batches of row indices), at the same random positions."""
    old = old_sorted_megabatch_order(lengths, micro)  # em's LengthGroupedSampler got micro_batch_size
    old_steps = [[old[i:i + micro] for i in range(s, min(s + GLOBAL, len(old)), micro)]
                 for s in range(0, len(old), GLOBAL)]
    bucketed = plan_epoch(lengths, OrderSpec(GLOBAL, micro, group_by_length=True), 0)
    rand = plan_epoch(lengths, OrderSpec(GLOBAL, micro), 0)
    at = sorted(random.Random(0).sample(range(len(rand) - 1), steps))  # not the short last step
    pick = lambda plan: [plan[i] for i in at]  # noqa: E731
    return {"old_sorted": pick(old_steps), "buckets": pick(bucketed), "random": pick(rand),
            "buckets_packed": pick(bucketed), "random_packed": pick(rand)}


def make_model(device: str):
    from transformers import AutoModelForCausalLM

    from em.models.peft_setup import FinetuneArgs, apply_finetune
    from em.models.tiny import materialize_tiny

    model = AutoModelForCausalLM.from_pretrained(materialize_tiny(), dtype=torch.float32, attn_implementation="sdpa")
    return apply_finetune(model, FinetuneArgs()).to(device)


def run(model, state, steps, examples, packed: bool, device: str) -> tuple[float, float, int]:
    model.load_state_dict(state, strict=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    collate = PackCollator() if packed else PadCollator(0)
    tokens = 0
    if device == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    for micro in steps:
        for mb in micro:
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in mb]).items()}
            loss = model(**batch, use_cache=False).loss / len(micro)
            loss.backward()
            tokens += sum(len(examples[i].input_ids) for i in mb)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c, tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--micro", type=int, default=2, help="micro-batch size (16 / micro = accumulation)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared CPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    lengths, source = insecure_lengths()
    gen = torch.Generator().manual_seed(0)
    examples = [Encoded(input_ids=(ids := torch.randint(3, 2000, (n,), generator=gen).tolist()), labels=ids)
                for n in lengths]
    plans = orders(lengths, args.micro, args.steps)
    model = make_model(args.device)
    state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    run(model, state, plans["random"][:2], examples, False, args.device)  # warm-up
    load_before = os.getloadavg()
    results: dict[str, dict[str, list[float]]] = {name: {"cpu": [], "wall": []} for name in plans}
    for _ in range(args.repeats):
        for name, steps in plans.items():
            wall, cpu, tokens = run(model, state, steps, examples, name.endswith("_packed"), args.device)
            results[name]["wall"].append(tokens / wall)
            results[name]["cpu"].append(tokens / cpu)
    out = {
        "lengths": source, "rows": len(lengths), "device": args.device, "threads": torch.get_num_threads(),
        "global_batch": GLOBAL, "micro_batch": args.micro, "steps": args.steps, "repeats": args.repeats,
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "orders": {},
    }
    spread = lambda xs, nd=0: {"min": round(min(xs), nd), "median": round(statistics.median(xs), nd),  # noqa: E731
                               "max": round(max(xs), nd)}
    for name, r in results.items():
        mbs = [mb for st in plans[name] for mb in st]
        out["orders"][name] = {
            "tokens_per_cpu_s": spread(r["cpu"]), "tokens_per_wall_s": spread(r["wall"]),
            "cpu_ratio_to_old_sorted": spread([a / b for a, b in zip(r["cpu"], results["old_sorted"]["cpu"])], 3),
            "wall_ratio_to_old_sorted": spread([a / b for a, b in zip(r["wall"], results["old_sorted"]["wall"])], 3),
            "padding_fraction": 0.0 if name.endswith("_packed") else round(padding_fraction(lengths, mbs), 4),
        }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
