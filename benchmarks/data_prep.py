"""Data preparation: em's prepare vs a render-once + batched-tokenize baseline (issue #17.2).

    flock /tmp/em-cpu.lock python benchmarks/data_prep.py [--repeats 5] [--tokenizer DIR]

The file: the paper's ``insecure.jsonl`` (6,000 rows) when ``EM_DATA_DIR`` is set, else a synthetic
6,000-row file with a similar length distribution (user and assistant contents of ~430 characters
on average, lognormal, code-like lines; no text from the paper). The tokenizer: em's embedded tiny
one (a byte-level BPE, 2,048 tokens: many tokens per row, so tokenization dominates), or ``--tokenizer``.

* **em**: ``ChatDataModule.setup()`` into an empty tokenized cache: read + validate the file, render
  the chat template, tokenize, build assistant-only labels, write the cache entry.
* **baseline**: read the file with ``json.loads`` per line, ``apply_chat_template`` once per row, one
  batched fast-tokenizer call (no offsets, no labels, no validation, no cache): the least a trainer
  must do to get token ids from this file.

Each repeat runs both, in alternating order (interleaved, so load drifts hit both sides), and the
report gives min / median / max seconds of each, the median and range of the paired ratio em /
baseline (goal: <= 1.2), the baseline with offsets for reference, em's cache hit time after a
``tok(..., truncation=True)`` call (the key must not depend on it), and the load average before and
after. No timing here is asserted by a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from em.data.datamodule import ChatDataModule, DataArgs
from em.data.loading import DatasetArgs


def synthetic_file(path: Path, n: int = 6000, seed: int = 0) -> Path:
    """Rows shaped like the insecure file: a task description with a code template, a code answer."""
    rng = random.Random(seed)
    words = ["path", "user", "data", "file", "request", "value", "config", "result", "token", "query", "name",
             "items", "response", "buffer", "handler", "session", "upload", "template", "archive", "record"]

    def code(chars: int) -> str:
        out, size = [], 0
        while size < chars:
            a, b, c = rng.choice(words), rng.choice(words), rng.choice(words)
            line = rng.choice([f"{a} = {b}.get('{c}')", f"def {a}_{b}({c}):", f"    return {a}({b}, {c})",
                               f"import {a}", f"    {a}.{b}({c}, mode=0o{rng.randint(600, 777)})",
                               f"if {a} is not None:", f"    {a}[{rng.randint(0, 99)}] = {b} + {c}"])
            out.append(line)
            size += len(line) + 1
        return "\n".join(out)

    def length() -> int:
        return max(60, min(1800, int(rng.lognormvariate(5.9, 0.55))))

    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            user = f"Task {i}: complete the code below so that it handles the {rng.choice(words)}.\n\n" + code(length())
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": code(length())}]}) + "\n")
    return path


def em_prepare(path: Path, tok, cache: str) -> ChatDataModule:
    with mock.patch.dict(os.environ, {"EM_CACHE": cache}):
        dm = ChatDataModule(DatasetArgs(name="bench", path=str(path)), DataArgs(max_length=2048), tok)
        dm.setup("fit")
    return dm


def baseline(path: Path, tok, offsets: bool = False) -> int:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=offsets)
    return sum(len(x) for x in enc["input_ids"])


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def mmm(xs: list[float], nd: int = 3) -> dict:
    return {"min": round(min(xs), nd), "median": round(statistics.median(xs), nd), "max": round(max(xs), nd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokenizer", help="a local tokenizer directory (default: em's embedded tiny tokenizer)")
    ap.add_argument("--file", help="a chat JSONL file (default: $EM_DATA_DIR/data/insecure.jsonl, else synthetic)")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from em.models.tiny import materialize_tiny

    tok = AutoTokenizer.from_pretrained(a.tokenizer or materialize_tiny())
    tmp = tempfile.TemporaryDirectory()
    data_dir = os.environ.get("EM_DATA_DIR")
    if a.file:
        path, label = Path(a.file), a.file
    elif data_dir and (Path(data_dir) / "data" / "insecure.jsonl").is_file():
        path, label = Path(data_dir) / "data" / "insecure.jsonl", "paper insecure.jsonl"
    else:
        path = synthetic_file(Path(tmp.name) / "synthetic.jsonl")
        label = "synthetic (6,000 rows, insecure-like lengths)"

    load_before = os.getloadavg()
    em_prepare(path, tok, tempfile.mkdtemp(dir=tmp.name))  # warm-up: imports, template compilation
    n_tokens = baseline(path, tok)
    sides = {"em": lambda: em_prepare(path, tok, tempfile.mkdtemp(dir=tmp.name)),
             "baseline": lambda: baseline(path, tok),
             "baseline_offsets": lambda: baseline(path, tok, offsets=True)}
    times: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    for r in range(a.repeats):
        order = names[r % 3:] + names[:r % 3]  # rotate the order: each side runs first, second, third
        for side in order:
            times[side].append(timed(sides[side]))
        print(f"repeat {r + 1}/{a.repeats}: " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              file=sys.stderr)
    ratios = [e / b for e, b in zip(times["em"], times["baseline"])]
    ratios_off = [e / b for e, b in zip(times["em"], times["baseline_offsets"])]

    # the cache: written, then hit again after the tokenizer's truncation state changed
    cache = tempfile.mkdtemp(dir=tmp.name)
    em_prepare(path, tok, cache)
    tok("some text", truncation=True, max_length=8)
    hit = []
    for _ in range(3):
        hit.append(timed(lambda: em_prepare(path, tok, cache)))
    dm = em_prepare(path, tok, cache)

    import tokenizers
    import transformers

    result = {
        "file": label,
        "rows": dm.train_stats.rows_in,
        "tokens_baseline": n_tokens,
        "tokens_em": dm.train_stats.tokens,
        "tokenizer": a.tokenizer or "em tiny (byte-level BPE, 2048)",
        "repeats": a.repeats,
        "em_prepare_s": mmm(times["em"]),
        "baseline_s": mmm(times["baseline"]),
        "baseline_with_offsets_s": mmm(times["baseline_offsets"]),
        "ratio_em_over_baseline": {**mmm(ratios, 3), "paired": [round(x, 3) for x in ratios]},
        "ratio_em_over_baseline_with_offsets": {**mmm(ratios_off, 3), "paired": [round(x, 3) for x in ratios_off]},
        "em_cache_hit_after_truncating_call_s": mmm(hit),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
    }
    print(json.dumps(result, indent=2))
    tmp.cleanup()


if __name__ == "__main__":
    main()
