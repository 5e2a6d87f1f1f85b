"""Shared fixtures. Tests run on CPU, offline, in a few minutes on 2 cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _em_data_dir() -> Path | None:
    cand = os.environ.get("EM_DATA_DIR") or str(REPO.parent / "shared" / "em-data")
    p = Path(cand)
    return p if (p / "MANIFEST.tsv").exists() else None


@pytest.fixture(scope="session")
def em_data_dir() -> Path:
    """The paper's public data (../shared/em-data); tests using it skip cleanly where it is absent."""
    d = _em_data_dir()
    if d is None:
        pytest.skip("../shared/em-data not present (set EM_DATA_DIR to run this test)")
    return d


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch, tmp_path_factory):
    """No hub, no W&B account, a private em cache per session."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    if "EM_CACHE" not in os.environ:
        monkeypatch.setenv("EM_CACHE", str(tmp_path_factory.getbasetemp() / "em_cache"))
