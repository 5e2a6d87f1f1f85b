"""Switching a model to inference and back, the one way every part of em does it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def eval_mode(model, use_cache: bool | None = None) -> Iterator[torch.nn.Module]:
    """Eval mode and no_grad inside; afterwards every submodule's own train/eval flag is restored as it was (a
    PEFT model mid-training can mix them), and ``config.use_cache`` too when ``use_cache`` sets it (generation
    wants the KV cache, training with gradient checkpointing turns it off)."""
    flags = [(m, m.training) for m in model.modules()]
    cfg = getattr(model, "config", None)
    old_cache = getattr(cfg, "use_cache", None)
    model.eval()
    if use_cache is not None and cfg is not None:
        cfg.use_cache = use_cache
    try:
        with torch.no_grad():
            yield model
    finally:
        if use_cache is not None and cfg is not None and old_cache is not None:
            cfg.use_cache = old_cache
        for m, was_training in flags:
            m.training = was_training
