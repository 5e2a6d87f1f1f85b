"""Read the history of an offline W&B run (``run-*.wandb``) without a server or an account.

The file is a LevelDB-style log of ``wandb_internal_pb2.Record`` protobufs: a 7-byte header
(``:W&B``, magic 0xBEE1, version), then 32 KiB blocks of chunks, each with a 7-byte header
(crc32, length, type: 1 full, 2 first, 3 middle, 4 last). Used by tests and handy to inspect a run
before ``wandb sync``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

_BLOCK = 32768
_HDR = 7


def iter_records(path: str | Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    pos, buf = _HDR, b""
    while pos + _HDR <= len(data):
        left = _BLOCK - (pos % _BLOCK)
        if left < _HDR:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HDR])
        pos += _HDR
        chunk = data[pos:pos + length]
        pos += length
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk
            buf = b""
        elif kind == 0 and length == 0:
            continue


def history(path: str | Path) -> list[dict]:
    """Every ``history`` record of the run as a flat dict (values JSON-decoded)."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for raw in iter_records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in rec.history.item:
            key = item.key or "/".join(item.nested_key)
            try:
                row[key] = json.loads(item.value_json)
            except ValueError:
                row[key] = item.value_json
        rows.append(row)
    return rows


def find_run_file(run_dir: str | Path) -> Path:
    files = sorted(Path(run_dir).rglob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no offline W&B run file under {run_dir}")
    return files[-1]
