"""Saving the trained weights in formats other tools load: a PEFT adapter, or a full HF model."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


def save_trained(module, tokenizer, out_dir: str | Path, base_path: str | None = None) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (LoRA) or a full model (full FT).

    Only global rank 0 writes; call it on every rank (sharded strategies gather first).
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model = module.model
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("saved %s to %s", "adapter" if (out / "adapter_config.json").exists() else "model", out)
    return out


class SaveTrainedWeights(L.Callback):
    """At the end of training, save the adapter (or full model) in HF/PEFT format under ``dirpath``."""

    def __init__(self, dirpath: str, tokenizer=None):
        self.dirpath = dirpath
        self.tokenizer = tokenizer
        self.saved: Path | None = None

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.saved = save_trained(pl_module, self.tokenizer, self.dirpath)
        trainer.strategy.barrier("em_save_adapter")
