"""Read the history of an offline W&B run (``run-*.wandb``) without a server or an account.

The file is a LevelDB-style log of ``wandb_internal_pb2.Record`` protobufs: a 7-byte header
(``:W&B``, magic 0xBEE1, version), then 32 KiB blocks of chunks, each with a 7-byte header
(crc32, length, type: 1 full, 2 first, 3 middle, 4 last). Used by tests and handy to inspect a run
before ``wandb sync``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

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


def _decode(value_json: str):
    try:
        return json.loads(value_json)
    except ValueError:
        return value_json


def summary(path: str | Path) -> dict:
    """The run's final summary (every ``summary`` record's updates and removals applied in order): top-level
    key -> value; a logged media dict (a table, an image) is one dict value."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict = {}
    for raw in iter_records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") != "summary":
            continue
        for item in rec.summary.update:
            keys = list(item.nested_key) or [item.key]
            node = out
            for k in keys[:-1]:
                if not isinstance(node.get(k), dict):
                    node[k] = {}
                node = node[k]
            node[keys[-1]] = _decode(item.value_json)
        for item in rec.summary.remove:
            keys = list(item.nested_key) or [item.key]
            if len(keys) == 1:
                out.pop(keys[0], None)
    return out


def run_info(path: str | Path) -> dict:
    """The run record of the file: ``{"id", "project", "entity", "group", "resumed"}``."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in iter_records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "run":
            r = rec.run
            return {"id": r.run_id, "project": r.project, "entity": r.entity, "group": r.run_group,
                    "resumed": r.resumed}
    return {}


def run_files(run_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """The offline run files under ``run_dir`` (all of ``run_id``'s when given: a resumed run has one per
    process), oldest first."""
    pattern = f"run-{run_id}.wandb" if run_id else "run-*.wandb"
    return sorted(Path(run_dir).rglob(pattern), key=lambda p: (p.parent.name, p.name))


def logged_keys(run_dir: str | Path, run_id: str | None = None) -> set[str]:
    """Every metric / media key a run logged (history and summary, over all its files), W&B's own (``_*``) left
    out. A history media dict counts as its key (``probe/samples``), not its fields."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = run_files(run_dir, run_id)
    if not files:
        raise FileNotFoundError(f"no offline W&B run file under {run_dir}")
    keys: set[str] = set()
    for f in files:
        for raw in iter_records(f):
            rec = pb.Record()
            rec.ParseFromString(raw)
            kind = rec.WhichOneof("record_type")
            items = rec.history.item if kind == "history" else rec.summary.update if kind == "summary" else ()
            keys.update(item.key or item.nested_key[0] for item in items)
    return {k for k in keys if not k.startswith("_")}


def find_run_file(run_dir: str | Path) -> Path:
    files = run_files(run_dir)
    if not files:
        raise FileNotFoundError(f"no offline W&B run file under {run_dir}")
    return files[-1]
