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


# The real-model tier (marker real_model): SmolLM2 is fetched once, outside the tests (`em models fetch
# smollm2`; CI does it after set-up), into the user's models dir. That dir is read here, at import, before
# the per-test EM_CACHE above points em's cache at a temporary directory; tests never download it.
def _user_models_dir() -> Path:
    from em.models.fetch import models_dir

    return models_dir()


USER_MODELS_DIR = _user_models_dir()


@pytest.fixture
def smollm2_dir(monkeypatch) -> Path:
    """The fetched SmolLM2 directory (``model=smollm2`` resolves to it in this test), or a clean skip."""
    from em.models.fetch import is_fetched, model_dir

    if not is_fetched("smollm2", USER_MODELS_DIR):
        pytest.skip(f"SmolLM2 is not fetched in {USER_MODELS_DIR}: run `em models fetch smollm2` "
                    "(pip install 'em[gguf]') to run the real-model tests")
    monkeypatch.setenv("EM_MODELS_DIR", str(USER_MODELS_DIR))
    return model_dir("smollm2", USER_MODELS_DIR)
