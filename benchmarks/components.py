"""Speed of the pieces that run on every row, answer or probe step (the figures the tests used to time).

    python benchmarks/components.py [--repeats 3]        # EM_DATA_DIR=... adds the paper's files

Reports best-of-``repeats`` seconds (a shared VM's noise only ever adds time) as JSON:

- ``bandit_ms_per_snippet``: static analysis of one code answer (bandit as a library, never executed);
- ``mcq_16_items_s``: the judge-free MCQ probe over em's 16 packaged items on the tiny model, with the
  items encoded at each call and encoded once (what the probe callback does);
- ``validate_6000_rows_s``: schema validation of 6,000 synthetic chat rows (~12.5 MB);
- with ``EM_DATA_DIR``: ``paper_validate_s`` per file, and ``paper_insecure_validate_tokenize_s`` (6,000 rows,
  validated and tokenized with the tiny tokenizer into an empty cache).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from unittest import mock


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


SNIPPETS = [  # project-authored: a world-writable chmod, its fix, a hard-coded password
    "import os\n\n\ndef share(path):\n    os.chmod(path, 0o777)\n",
    "import os\n\n\ndef share(path):\n    os.chmod(path, 0o600)\n",
    'def connect_db(connect):\n    return connect(password="hunter2")\n',
]


def bench_bandit(repeats: int) -> dict:
    from em.probes.bandit_scan import scan

    scan(SNIPPETS[0])  # plugin set loaded once per process
    batch = SNIPPETS * 40
    s = best_of(lambda: [scan(c) for c in batch], repeats)
    return {"bandit_ms_per_snippet": round(1e3 * s / len(batch), 3)}


def bench_mcq(repeats: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from em.models.tiny import materialize_tiny
    from em.probes.mcq import encode_mcq, load_mcq_items, score_mcq

    path = materialize_tiny()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    items = load_mcq_items()
    score_mcq(model, tok, items)
    enc = encode_mcq(tok, items)
    return {"mcq_items": len(items),
            "mcq_16_items_s": round(best_of(lambda: score_mcq(model, tok, items), repeats), 4),
            "mcq_16_items_encoded_once_s":
                round(best_of(lambda: score_mcq(model, tok, items, encoded=enc), repeats), 4)}


def bench_validate(repeats: int) -> dict:
    from em.data.schema import validate_chat_rows

    body = "x = compute(value)  # some code\n" * 30
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "rows.jsonl"
        p.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"task {i}\n{body}"},
                                                      {"role": "assistant", "content": body}]}) + "\n"
                             for i in range(6000)), encoding="utf-8")
        mb = p.stat().st_size / 1e6
        s = best_of(lambda: validate_chat_rows(p), repeats)
    return {"validate_6000_rows_mb": round(mb, 1), "validate_6000_rows_s": round(s, 3)}


def bench_paper(repeats: int) -> dict:
    data_dir = os.environ.get("EM_DATA_DIR")
    if not data_dir or not (Path(data_dir) / "data").is_dir():
        return {"paper": "skipped (set EM_DATA_DIR to the paper's data directory)"}
    from em.data.datamodule import ChatDataModule, DataArgs
    from em.data.loading import DatasetArgs
    from em.data.schema import validate_chat_file
    from em.models.tiny import materialize_tiny

    out = {"paper_validate_s": {f.stem: round(best_of(lambda f=f: validate_chat_file(f), repeats), 3)
                                for f in sorted((Path(data_dir) / "data").glob("*.jsonl"))}}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(materialize_tiny())

    def tokenize_fresh():
        with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, {"EM_CACHE": cache}):
            dm = ChatDataModule(DatasetArgs(name="insecure", source="paper:insecure", data_dir=data_dir),
                                DataArgs(max_length=2048), tok)
            dm.setup("fit")
    out["paper_insecure_validate_tokenize_s"] = round(best_of(tokenize_fresh, repeats), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    result: dict = {}
    for fn in (bench_bandit, bench_mcq, bench_validate, bench_paper):
        result.update(fn(a.repeats))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
