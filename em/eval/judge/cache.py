"""A persistent on-disk cache of judge answers (the raw top logprobs, not the scores).

Keyed by sha256 of (judge model id, the fully formatted prompt, the query parameters that change
the judge's answer: number of top logprobs, temperature, ...). The *scoring* parameters are not
part of the key: the raw top logprobs are stored, so a change of scoring rule needs no re-query.

SQLite (stdlib) in WAL mode: safe from several threads (one connection per cache object, guarded
by a lock) and from several processes (SQLite's file locks; writers wait up to ``timeout_s``).
Only successful judge calls are stored; a failure is never cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from em.utils.io import em_cache_dir

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judge_cache (
    key TEXT PRIMARY KEY,
    model_id TEXT NOT NULL,
    params TEXT NOT NULL,
    top_logprobs TEXT NOT NULL,
    created REAL NOT NULL
)
"""
_CHUNK = 500  # keys per SELECT ... IN (...), well under SQLite's variable limit


def default_cache_path() -> Path:
    """``$EM_CACHE/judge_cache.sqlite`` (``~/.cache/em/judge_cache.sqlite`` by default)."""
    return em_cache_dir() / "judge_cache.sqlite"


def cache_key(model_id: str, prompt: str, params: Mapping[str, Any]) -> str:
    """sha256 hex digest identifying one judge query."""
    blob = json.dumps({"model_id": model_id, "prompt": prompt, "params": dict(params)},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    """Map ``cache_key(...)`` -> raw top logprobs ``[[token, logprob], ...]``."""

    def __init__(self, path: str | os.PathLike | None = None, timeout_s: float = 60.0):
        self.path = Path(path) if path is not None else default_cache_path()
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1

    def __repr__(self) -> str:
        return f"JudgeCache({str(self.path)!r})"

    def _connection(self) -> sqlite3.Connection:
        # A connection must not cross a fork: reopen in a child process.
        if self._conn is None or self._pid != os.getpid():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, check_same_thread=False,
                                   isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def get(self, key: str) -> list[list[Any]] | None:
        """The stored top logprobs for ``key``, or None."""
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, list[list[Any]]]:
        """``{key: top_logprobs}`` for the keys that are stored."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, list[list[Any]]] = {}
        with self._lock:
            conn = self._connection()
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i:i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(f"SELECT key, top_logprobs FROM judge_cache WHERE key IN ({marks})", chunk)
                for key, blob in rows:
                    found[key] = json.loads(blob)
        return found

    def put(self, key: str, model_id: str, params: Mapping[str, Any], top_logprobs: Iterable[Any]) -> None:
        """Store one successful judge answer (overwrites an existing entry)."""
        pairs = [[str(t), float(lp)] for t, lp in top_logprobs]
        row = (key, model_id, json.dumps(dict(params), sort_keys=True), json.dumps(pairs, ensure_ascii=False),
               time.time())
        with self._lock:
            self._connection().execute(
                "INSERT OR REPLACE INTO judge_cache (key, model_id, params, top_logprobs, created) "
                "VALUES (?, ?, ?, ?, ?)", row)

    def __len__(self) -> int:
        with self._lock:
            return self._connection().execute("SELECT COUNT(*) FROM judge_cache").fetchone()[0]

    def close(self) -> None:
        """Close the connection (it reopens on next use)."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # picklable: the connection is reopened lazily
        return {"path": self.path, "timeout_s": self.timeout_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["timeout_s"])
