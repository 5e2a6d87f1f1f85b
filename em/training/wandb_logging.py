"""W&B: one run per job, named from model / dataset / seed, offline without an account.

The run's id is recorded in the run dir (``wandb_run.json``, :attr:`em.layout.RunLayout.wandb_run`): a job that
resumes from its checkpoint (a SLURM requeue, ``ckpt_path=last``) logs into the same W&B run (``resume="allow"``),
while a job trained from scratch gets a new run. A sweep job keeps the run open after training so that its
evaluation is logged into it too (:mod:`em.wandb.job`).
"""

from __future__ import annotations

import logging
import os
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from em.config import plain
from em.layout import RunLayout
from em.utils.dist import global_rank
from em.utils.io import atomic_write_json

log = logging.getLogger(__name__)


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


def read_run_identity(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The W&B run recorded in ``run_dir`` (``{"id", "project", "entity", "mode", ...}``), or None."""
    import json

    p = RunLayout.of(run_dir).wandb_run
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s): a new W&B run is started", p, e)
        return None
    return data if isinstance(data, dict) and data.get("id") else None


def new_run_id() -> str:
    """A fresh W&B run id (8 characters of [a-z0-9], as W&B makes them)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def run_identity(cfg: DictConfig, run_dir: str | os.PathLike, resume: bool) -> str | None:
    r"""This job's W&B run id: the recorded one when the job ``resume``\ s (its checkpoint), else a new one; recorded
    in ``wandb_run.json`` by global rank 0 (other ranks log nothing to W&B and get None)."""
    if global_rank() != 0:
        return None
    w = cfg.logger.wandb
    prev = read_run_identity(run_dir) if resume else None
    if prev is not None and prev.get("project") == w.get("project", "em"):
        return str(prev["id"])
    run_id = new_run_id()
    atomic_write_json(RunLayout.of(run_dir).wandb_run, {
        "id": run_id, "project": w.get("project", "em"), "entity": w.get("entity"),
        "name": w.get("name") or run_name(cfg),
        "group": w.get("group") or cfg.get("experiment_name") or cfg.dataset.name, "mode": wandb_mode(cfg)})
    return run_id


def wandb_mode(cfg: DictConfig) -> str:
    return cfg.logger.wandb.get("mode") or os.environ.get("WANDB_MODE") or "offline"


def wandb_init_kwargs(cfg: DictConfig, run_dir: str | os.PathLike, run_id: str | None) -> dict[str, Any]:
    """The ``wandb.init`` arguments of a job's run (also used to reopen it for the evaluation, or to upload)."""
    w = cfg.logger.wandb
    return dict(
        project=w.get("project", "em"),
        entity=w.get("entity"),
        name=w.get("name") or run_name(cfg),
        group=w.get("group") or cfg.get("experiment_name") or cfg.dataset.name,
        job_type=w.get("job_type") or cfg.dataset.name,
        tags=list(w.get("tags") or []) + [f"model:{cfg.model.name}", f"dataset:{cfg.dataset.name}",
                                          f"seed:{cfg.get('seed')}"],
        dir=str(run_dir),
        mode=wandb_mode(cfg),
        config=plain(cfg),
        id=run_id,
        resume="allow",
    )


def build_wandb_logger(cfg: DictConfig, run_dir: Path, resume: bool = False):
    """Lightning's W&B logger for the job's run (``resume``: the job continues from its checkpoint, so it logs
    into the run recorded in the run dir)."""
    from lightning.pytorch.loggers import WandbLogger

    kw = wandb_init_kwargs(cfg, run_dir, run_identity(cfg, run_dir, resume))
    kw["save_dir"] = kw.pop("dir")
    return WandbLogger(**kw, reinit="finish_previous")


def finish_wandb_run(exit_code: int = 0) -> None:
    """Close this process's W&B run, if one is open (one W&B run per job, also inside a multirun)."""
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)
