"""On-disk cache of tokenized datasets, keyed by (rows, tokenizer, template, max length, policy).

A sweep over seeds or learning rates tokenizes once; changing the tokenizer, its chat template,
``max_length`` or the over-length policy re-tokenizes, and nothing else does.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

from em.utils.io import atomic_write_bytes, em_cache_dir

_FORMAT_VERSION = 1


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update((tokenizer.chat_template or "").encode())
    h.update(json.dumps(tokenizer.all_special_tokens).encode())
    return h.hexdigest()


def rows_fingerprint(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r["messages"], sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def cache_key(rows_fp: str, tok_fp: str, max_length: int, overlength: str) -> str:
    blob = json.dumps([_FORMAT_VERSION, rows_fp, tok_fp, int(max_length), overlength])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cache_path(key: str, cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or em_cache_dir() / "tokenized") / f"{key}.pkl"


def load(key: str, cache_dir=None):
    p = cache_path(key, cache_dir)
    if not p.exists():
        return None
    try:
        with open(p, "rb") as f:
            return pickle.load(f)  # our own cache file, written below
    except Exception:  # a corrupt cache entry is rebuilt, never trusted
        return None


def save(key: str, value, cache_dir=None) -> Path:
    return atomic_write_bytes(cache_path(key, cache_dir), pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
