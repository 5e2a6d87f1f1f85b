"""On-disk cache of tokenized datasets, keyed by what determines the tokens.

A sweep over seeds or learning rates tokenizes once; changing the rows, the tokenizer (vocabulary,
merges, normalizer, pre-tokenizer, post-processor, added and special tokens), its chat template,
``max_length``, the over-length policy or the stop tokens re-tokenizes, and nothing else does (in
particular not the tokenizer's *current* truncation / padding state, which any ``tok(...,
truncation=True)`` call changes).

Nothing in the cache is executed. An entry is two files in ``$EM_CACHE/tokenized/``:

* ``<key>.safetensors``: the token ids, labels and row offsets of every kept row, as plain int arrays
  (safetensors: a JSON header and raw bytes, no code, no pickle);
* ``<key>.json``: the format version, the key, the SHA-256 and size of the tensor file, and the
  preparation stats.

An entry is used only when the JSON parses, names this key and format, the tensor file has the
recorded size and hash, and the arrays are consistent (shapes, dtypes, offsets, labels either
``-100`` or the token id, ids inside the vocabulary). Anything else (a corrupt, truncated or foreign
entry) is rebuilt, never trusted. Files of the old pickle format (``<key>.pkl``) are never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections import Counter
from pathlib import Path

import numpy as np

from em.data.chat import EncodeStats, TokenizedRows
from em.utils.io import atomic_write_bytes, atomic_write_json, em_cache_dir

log = logging.getLogger(__name__)

FORMAT = "em.tokenized"
FORMAT_VERSION = 2
"""Bump when the label semantics, the key or the file layout change (old entries are then misses)."""
_MAX_META_BYTES = 1 << 20  # the side file holds counts only (no per-row data): a bigger one is foreign
_TENSORS = {"input_ids": np.int32, "labels": np.int32, "row_offsets": np.int64}


# -- key ----------------------------------------------------------------------------------------------
def _backend_spec(backend) -> bytes:
    """The backend tokenizer's serialization without its truncation / padding state.

    ``to_str()`` writes ``version``, ``truncation``, ``padding`` first, then the parts that determine
    the tokens (``added_tokens``, ``normalizer``, ``pre_tokenizer``, ``post_processor``, ``decoder``,
    ``model``). Hashing from ``"added_tokens"`` on avoids parsing a multi-MB vocabulary; when the
    layout is not the expected one the whole JSON is parsed and the two keys dropped.
    """
    s = backend.to_str()
    i = s.find('"added_tokens":')
    if i > 0:
        try:
            head = json.loads(s[:i].rstrip().rstrip(",") + "}")
        except ValueError:
            head = None
        if isinstance(head, dict) and set(head) <= {"version", "truncation", "padding"}:
            return json.dumps(head.get("version")).encode() + s[i:].encode("utf-8", "surrogatepass")
    spec = json.loads(s)
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return json.dumps(spec, sort_keys=True).encode()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything of ``tokenizer`` that determines token ids and labels (not its truncation /
    padding state)."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(_backend_spec(backend))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(b"\0template\0")
    h.update(json.dumps(tokenizer.chat_template or "").encode())
    special = getattr(tokenizer, "special_tokens_map", None) or {}
    h.update(json.dumps({k: str(v) for k, v in special.items()}, sort_keys=True).encode())
    h.update(json.dumps([str(t) for t in tokenizer.all_special_tokens]).encode())
    return h.hexdigest()


def rows_fingerprint(rows: list[dict]) -> str:
    """Hash of every row's messages (roles, contents, and any other message keys a template may read)."""
    h = hashlib.sha256()
    for r in rows:
        msgs = r["messages"]
        if all(len(m) == 2 and "role" in m and "content" in m for m in msgs):
            # length-prefixed, so no content can imitate a message boundary
            part = "".join(f"{len(m['role'])}:{m['role']}{len(m['content'])}:{m['content']}" for m in msgs)
            h.update(f"{len(msgs)}|{part}\n".encode("utf-8", "surrogatepass"))
        else:
            h.update(b"J" + json.dumps(msgs, sort_keys=True, default=str).encode() + b"\n")
    return h.hexdigest()


def cache_key(rows_fp: str, tok_fp: str, max_length: int, overlength: str, stop_ids=None) -> str:
    stops = sorted(int(i) for i in stop_ids) if stop_ids is not None else None
    blob = json.dumps([FORMAT, FORMAT_VERSION, rows_fp, tok_fp, int(max_length), overlength, stops])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


# -- files --------------------------------------------------------------------------------------------
def _dir(cache_dir) -> Path:
    return Path(cache_dir) if cache_dir else em_cache_dir() / "tokenized"


def cache_path(key: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The tensor file of entry ``key`` (its side file is the same path with ``.json``)."""
    return _dir(cache_dir) / f"{key}.safetensors"


def meta_path(key: str, cache_dir: str | os.PathLike | None = None) -> Path:
    return _dir(cache_dir) / f"{key}.json"


def _read_regular(p: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (never a device, FIFO or directory)."""
    st = p.stat()
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{p} is not a regular file")
    if st.st_size > max_bytes:
        raise ValueError(f"{p} is {st.st_size} bytes, expected at most {max_bytes}")
    with open(p, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{p} grew past {max_bytes} bytes while being read")
    return data


def save(key: str, value: tuple[TokenizedRows, EncodeStats], cache_dir=None) -> Path:
    """Write entry ``key`` (:func:`em.data.chat.encode_rows`' result): the tensor file first, then the side file
    that vouches for it."""
    from safetensors.numpy import save as st_save

    examples, stats = value
    blob = st_save(examples.arrays)
    path = atomic_write_bytes(cache_path(key, cache_dir), blob)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": key,
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "tensors_bytes": len(blob),
        "stats": {"rows_in": stats.rows_in, "rows_kept": stats.rows_kept, "dropped": dict(stats.dropped),
                  "truncated": stats.truncated, "tokens": stats.tokens, "trained_tokens": stats.trained_tokens},
    }
    atomic_write_json(meta_path(key, cache_dir), meta)
    return path


def load(key: str, cache_dir=None, vocab_size: int | None = None) -> tuple[TokenizedRows, EncodeStats] | None:
    """Entry ``key`` if it exists and checks out, else None (the caller rebuilds and overwrites it)."""
    mp = meta_path(key, cache_dir)
    if not mp.exists():
        return None
    try:
        return _load_checked(key, cache_dir, vocab_size)
    except Exception as e:  # a corrupt, truncated or foreign entry is rebuilt, never trusted
        log.warning("tokenized cache entry %s is not usable (%s); re-tokenizing", mp, e)
        return None


def _load_checked(key: str, cache_dir, vocab_size: int | None) -> tuple[TokenizedRows, EncodeStats]:
    from safetensors.numpy import load as st_load

    meta = json.loads(_read_regular(meta_path(key, cache_dir), _MAX_META_BYTES).decode("utf-8"))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError("not an em tokenized-cache side file of this format version")
    if meta.get("key") != key:
        raise ValueError(f"side file is for key {meta.get('key')!r}")
    size = meta["tensors_bytes"]
    if not isinstance(size, int) or size <= 0:
        raise ValueError("bad tensors_bytes")
    blob = _read_regular(cache_path(key, cache_dir), size)
    if len(blob) != size or hashlib.sha256(blob).hexdigest() != meta["tensors_sha256"]:
        raise ValueError("tensor file does not match the recorded size and SHA-256")
    arrays = st_load(blob)
    if set(arrays) != set(_TENSORS):
        raise ValueError(f"unexpected tensors {sorted(arrays)}")
    for name, dtype in _TENSORS.items():
        if arrays[name].dtype != dtype or arrays[name].ndim != 1:
            raise ValueError(f"{name}: expected a 1-D {np.dtype(dtype)} array")
    ids, labels, offsets = arrays["input_ids"], arrays["labels"], arrays["row_offsets"]
    s = meta["stats"]
    n_rows = len(offsets) - 1
    if (n_rows != s["rows_kept"] or offsets[0] != 0 or offsets[-1] != len(ids) or len(labels) != len(ids)
            or np.any(np.diff(offsets) <= 0)):
        raise ValueError("row offsets do not match the arrays")
    trained = labels != -100
    if not np.all(~trained | (labels == ids)) or (len(ids) and ids.min() < 0):
        raise ValueError("labels are not -100 or the token id")
    if vocab_size is not None and len(ids) and int(ids.max()) >= vocab_size:
        raise ValueError(f"token id {int(ids.max())} outside the vocabulary ({vocab_size})")
    if s["tokens"] != len(ids) or s["trained_tokens"] != int(trained.sum()):
        raise ValueError("stats do not match the arrays")
    examples = TokenizedRows(ids, labels, offsets)
    stats = EncodeStats(rows_in=int(s["rows_in"]), rows_kept=n_rows,
                        dropped=Counter({str(k): int(v) for k, v in s["dropped"].items()}),
                        truncated=int(s["truncated"]), tokens=len(ids), trained_tokens=int(trained.sum()),
                        lengths=np.diff(offsets).tolist())
    return examples, stats
