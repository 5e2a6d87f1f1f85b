"""A sweep job's W&B run, from training to the final evaluation (called from :mod:`em.sweep.job`).

Training (``train(cfg, keep_wandb_run=True)``) opens the job's run and leaves it open; each eval pass is then
logged into it (:func:`log_eval_pass`) and the job closes it (:func:`finish_job_run`) with its status. When no
run is open any more (e.g. training had nothing left to do on rank 0 of another process), the run recorded in
the run dir is reopened (``resume="allow"``). A W&B failure never fails the job: the results are on disk, and
``em wandb upload <run_dir>`` logs them later.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from em.training.wandb_logging import finish_wandb_run, read_run_identity, run_identity, wandb_init_kwargs
from em.wandb.eval_log import log_eval

log = logging.getLogger(__name__)


def enabled(cfg: DictConfig) -> bool:
    """``logger=wandb`` is on for this job."""
    lg = cfg.get("logger")
    return lg is not None and lg.get("wandb") is not None


def current_run(cfg: DictConfig, run_dir: Path):
    """The job's open W&B run, or the recorded one reopened (``resume="allow"``)."""
    import wandb

    if wandb.run is not None:
        return wandb.run
    prev = read_run_identity(run_dir)
    run_id = prev["id"] if prev else run_identity(cfg, run_dir, resume=False)
    return wandb.init(**wandb_init_kwargs(cfg, run_dir, run_id))


def log_eval_pass(cfg: DictConfig, run_dir: Path, variant: str, summary: Mapping[str, Any],
                  out_dir: Path) -> dict[str, float] | None:
    """Log one eval pass into the job's W&B run (nothing without ``logger=wandb``); a failure is a warning."""
    if not enabled(cfg):
        return None
    try:
        return log_eval(current_run(cfg, run_dir), variant, summary, out_dir)
    except Exception as e:  # the results are on disk; W&B can be filled later (em wandb upload)
        log.warning("W&B: could not log the evaluation %r (%s: %s); the results are on disk: "
                    "`em wandb upload %s` logs them", variant, type(e).__name__, e, run_dir)
        return None


def finish_job_run(cfg: DictConfig, status: str | None) -> None:
    """Close the job's W&B run (exit code 0 when the job is done, 1 otherwise)."""
    if enabled(cfg):
        try:
            finish_wandb_run(exit_code=0 if status == "done" else 1)
        except Exception as e:  # closing the run must not lose the results
            log.warning("W&B: could not finish the run (%s: %s)", type(e).__name__, e)


def skip_done_hint(cfg: DictConfig, run_dir: Path) -> str | None:
    """What to say when ``logger=wandb`` meets a job that is already done (it is skipped, so nothing is logged):
    None without ``logger=wandb``."""
    if not enabled(cfg):
        return None
    prev = read_run_identity(run_dir)
    if prev is not None:
        return (f"logger=wandb: this job is already in W&B run {prev['id']} (project {prev.get('project')}); "
                f"nothing new to log")
    return (f"logger=wandb: a done job is skipped, so nothing is logged to W&B. To log it: em wandb upload {run_dir} "
            "(its curves, probes and final eval, no retraining; or the sweep dir for every job), or re-run it with "
            "sweep.skip_done=false, or sweep into a new experiment_name")
