"""W&B: one run per job, named from model / dataset / seed, offline without an account."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from em.config import plain


def run_name(cfg: DictConfig) -> str:
    return f"{cfg.model.name}-{cfg.dataset.name}-s{cfg.get('seed')}"


def build_wandb_logger(cfg: DictConfig, run_dir: Path):
    from lightning.pytorch.loggers import WandbLogger

    w = cfg.logger.wandb
    mode = w.get("mode") or os.environ.get("WANDB_MODE") or "offline"
    return WandbLogger(
        project=w.get("project", "em"),
        entity=w.get("entity"),
        name=w.get("name") or run_name(cfg),
        group=w.get("group") or cfg.get("experiment_name") or cfg.dataset.name,
        job_type=w.get("job_type") or cfg.dataset.name,
        tags=list(w.get("tags") or []) + [f"model:{cfg.model.name}", f"dataset:{cfg.dataset.name}", f"seed:{cfg.get('seed')}"],
        save_dir=str(run_dir),
        mode=mode,
        config=plain(cfg),
        reinit="finish_previous",
    )
