"""W&B: one run per job, named from model / dataset / seed, offline without an account."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from em.config import plain


@dataclass
class WandbArgs:
    """``logger.wandb``: one W&B run per job; offline unless ``WANDB_MODE=online`` (no account needed)."""

    project: str = "em"
    entity: str | None = None
    mode: str | None = None
    """None -> $WANDB_MODE, else offline."""
    name: str | None = None
    """None -> <model>-<dataset>-s<seed>."""
    group: str | None = None
    """None -> experiment_name, else the dataset name."""
    job_type: str | None = None
    """None -> the dataset name."""
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerArgs:
    """``logger:``: CSV is always written (run_dir/metrics.csv); this adds other loggers."""

    wandb: WandbArgs | None = None


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
