"""``train(cfg)``: the plain function behind ``train.py`` (tests and sweeps call it directly)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from em.config import plain, to_dataclass
from em.data.datamodule import ChatDataModule, DataArgs, describe_order
from em.data.loading import DatasetArgs
from em.errors import ConfigError
from em.models.loading import ModelArgs, load_tokenizer, resolve_model_path, stop_token_ids
from em.models.peft_setup import FinetuneArgs
from em.training.ckpt_files import resolve_resume
from em.training.optim import OptimArgs
from em.utils.io import atomic_write_json

log = logging.getLogger(__name__)


def world_size(trainer_cfg: dict) -> int:
    """Processes that will train: devices per node x nodes (``auto`` = visible GPUs, or 1 on CPU)."""
    devices = trainer_cfg.get("devices", "auto")
    accel = trainer_cfg.get("accelerator", "auto")
    if isinstance(devices, int):
        n = devices
    elif isinstance(devices, (list, tuple)):
        n = len(devices)
    elif str(devices).isdigit():
        n = int(devices)
    else:
        import torch

        n = torch.cuda.device_count() if accel in ("auto", "gpu", "cuda") and torch.cuda.is_available() else 1
        n = max(n, 1)
    return n * int(trainer_cfg.get("num_nodes", 1) or 1)


def accumulation(data: DataArgs, world: int) -> int:
    per_step = data.micro_batch_size * world
    if data.global_batch_size % per_step:
        raise ConfigError(
            f"data.global_batch_size={data.global_batch_size} is not a multiple of micro_batch_size "
            f"({data.micro_batch_size}) x devices x nodes ({world}); choose one that is, e.g. "
            f"{per_step * max(1, round(data.global_batch_size / per_step))}"
        )
    return data.global_batch_size // per_step


def resolve_precision(p: str | None) -> str:
    if p not in (None, "auto"):
        return str(p)
    import torch

    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"  # bf16 on CPUs without native support is ~25x slower


def build_strategy(cfg: DictConfig):
    s = cfg.get("strategy")
    if s is None:
        return "auto"
    if "_target_" in s:
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate

        try:
            return instantiate(s)
        except InstantiationException as err:  # a ConfigError raised by the strategy: show it as such
            if isinstance(err.__cause__, ConfigError):
                raise err.__cause__ from None
            raise
    return s.get("name", "auto")


def keep_metrics_history(run_dir: Path) -> Path | None:
    """Move ``metrics.csv`` to ``history/attempt_<nnn>/`` before a resume: Lightning's CSV logger starts the
    file afresh in a non-empty dir. The report reads every ``metrics.csv`` under a run (newest row per step)."""
    src = run_dir / "metrics.csv"
    if not src.is_file():
        return None
    n = 0
    while (run_dir / "history" / f"attempt_{n:03d}").exists():
        n += 1
    dst = run_dir / "history" / f"attempt_{n:03d}" / "metrics.csv"
    dst.parent.mkdir(parents=True)
    src.replace(dst)
    return dst


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger

    loggers: list = [CSVLogger(save_dir=str(run_dir), name="", version="")]  # -> run_dir/metrics.csv
    lcfg = cfg.get("logger") or {}
    if lcfg.get("wandb"):
        from em.training.wandb_logging import build_wandb_logger

        loggers.append(build_wandb_logger(cfg, run_dir))
    return loggers


def build_callbacks(cfg: DictConfig, run_dir: Path, tokenizer) -> list:
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    from em.training.adapter import SaveTrainedWeights

    ck = cfg.get("checkpoint") or {}
    callbacks: list = [
        ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=0,
                        every_n_train_steps=ck.get("every_n_train_steps") or None, save_on_train_epoch_end=True),
        SaveTrainedWeights(str(run_dir / ("adapter" if cfg.finetune.kind != "full" else "model")), tokenizer),
    ]
    for name, c in (cfg.get("callbacks") or {}).items():
        if c is not None and "_target_" in c:
            callbacks.append(instantiate(c))
    return callbacks


def train(cfg: DictConfig) -> dict[str, Any]:
    """Finetune per ``cfg``; returns metrics and paths (also written to ``run_dir/train_summary.json``)."""
    import lightning as L

    from em.training.checkpoint_io import AtomicCheckpointIO
    from em.training.module import CausalLMModule

    t0 = time.time()
    run_dir = Path(cfg.paths.run_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    # the checkpoint to resume from, checked (a damaged newest one falls back to the previous) before any work
    ckpt_path = resolve_resume(cfg.get("ckpt_path"), run_dir)
    if cfg.get("seed") is not None:  # seed 0 is a seed (`if cfg.seed:` would skip it)
        L.seed_everything(int(cfg.seed), workers=True)

    model_args = to_dataclass(ModelArgs, cfg.model, "model")
    ft_args = to_dataclass(FinetuneArgs, cfg.finetune, "finetune")
    optim_args = to_dataclass(OptimArgs, cfg.optim, "optim")
    data_args = to_dataclass(DataArgs, cfg.data, "data")
    ds_args = to_dataclass(DatasetArgs, cfg.dataset, "dataset")

    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    world = world_size(trainer_cfg)
    accum = accumulation(data_args, world)

    # Data rows first: a missing dataset is reported before a (possibly huge) model download.
    dm = ChatDataModule(ds_args, data_args, tokenizer=None, seed=cfg.get("seed"))
    dm.load()
    model_path = resolve_model_path(model_args)
    tokenizer = load_tokenizer(model_args, model_path)
    dm.tokenizer = tokenizer
    dm.stop_ids = stop_token_ids(tokenizer)
    dm.setup("fit")
    data_stats = dm.train_stats.summary()
    order = dm.order_summary(world, int(trainer_cfg.get("max_steps") or -1), trainer_cfg.get("max_epochs"))
    log.info("training order: %s", describe_order(order))
    atomic_write_json(run_dir / "data_stats.json", {"train": data_stats, "order": order,
                                                     "held_out_rows": len(dm.held_out_rows),
                                                     "provenance": dm.provenance})

    module = CausalLMModule(model_args, ft_args, optim_args, model_path)
    if ckpt_path and int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0:
        keep_metrics_history(run_dir)
    loggers = build_loggers(cfg, run_dir)
    for lg in loggers:
        lg.log_hyperparams(plain(cfg))
        if hasattr(lg, "log_metrics"):
            lg.log_metrics({f"data/{k}": float(v) for k, v in {**data_stats, **order}.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=0)
    callbacks = build_callbacks(cfg, run_dir, tokenizer)

    trainer_cfg["precision"] = resolve_precision(trainer_cfg.get("precision"))
    trainer = L.Trainer(
        **trainer_cfg,
        strategy=build_strategy(cfg),
        accumulate_grad_batches=accum,
        logger=loggers,
        callbacks=callbacks,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
    )
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        callbacks[1].ensure_saved(trainer, ckpt_path, run_dir, model_path)  # resumed at its end: from the checkpoint
    finally:
        if cfg.get("logger", {}).get("wandb"):
            import wandb

            wandb.finish()  # one W&B run per job, also inside a multirun
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    summary = {
        "run_dir": str(run_dir),
        "global_step": trainer.global_step,
        "accumulate_grad_batches": accum,
        "world_size": world,
        "metrics": metrics,
        "adapter_dir": str(callbacks[1].saved) if callbacks[1].saved else None,
        "last_checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
        "metrics_csv": str(run_dir / "metrics.csv"),
        "base_model": model_path,
        "resumed_from": ckpt_path,
        "data": data_stats,
        "order": order,
        "wall_s": round(time.time() - t0, 2),
    }
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "train_summary.json", summary)
    return summary
