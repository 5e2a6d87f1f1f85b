"""``train(cfg)``: the plain function behind ``train.py`` (tests and sweeps call it directly)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from em.config import plain
from em.data.datamodule import ChatDataModule, describe_order
from em.errors import ConfigError
from em.layout import RunLayout, resolve_run_dir
from em.models.loading import load_tokenizer, resolve_model_path, stop_token_ids
from em.training.adapter import SaveTrainedWeights
from em.training.checkpoint_io import AtomicCheckpointIO
from em.training.ckpt_files import resolve_resume
from em.training.config import TrainerArgs, TrainingArgs, batch_plan
from em.training.forecast import FitClock, forecast_training, record_throughput, setting_key
from em.training.module import CausalLMModule
from em.training.progress import StepProgressBar
from em.training.wandb_logging import build_wandb_logger, finish_wandb_run
from em.utils.dist import global_rank
from em.utils.io import atomic_write_json

log = logging.getLogger(__name__)


def world_size(trainer: TrainerArgs) -> int:
    """Processes that will train: devices per node x nodes (``auto`` = visible GPUs, or 1 on CPU)."""
    devices, accel = trainer.devices, trainer.accelerator
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
    return n * int(trainer.num_nodes or 1)


def accelerator_kind(trainer: TrainerArgs) -> str:
    if trainer.accelerator != "auto":
        return str(trainer.accelerator)
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def mean_tokens(stats) -> float | None:
    return stats.tokens / stats.rows_kept if stats.rows_kept else None


def resolve_precision(p: str | None) -> str:
    if p not in (None, "auto"):
        return str(p)
    import torch

    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"  # bf16 on CPUs without native support is ~25x slower


def build_strategy(cfg: DictConfig):
    """The ``strategy:`` entry built from its ``_target_`` (``{}``: Lightning's automatic choice)."""
    s = cfg.get("strategy")
    if not s or "_target_" not in s:
        return "auto"
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(s)
    except InstantiationException as err:  # a ConfigError raised by the strategy, or a wrong key: em's error
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise ConfigError(f"strategy ({s._target_}): {err.__cause__ or err}") from None


def keep_metrics_history(run_dir: Path) -> Path | None:
    """Move ``metrics.csv`` to ``history/attempt_<nnn>/`` before a resume: Lightning's CSV logger starts the
    file afresh in a non-empty dir. The report reads every ``metrics.csv`` under a run (newest row per step)."""
    src = RunLayout.of(run_dir).metrics_csv
    if not src.is_file():
        return None
    n = 0
    while (run_dir / "history" / f"attempt_{n:03d}").exists():
        n += 1
    dst = run_dir / "history" / f"attempt_{n:03d}" / "metrics.csv"
    dst.parent.mkdir(parents=True)
    src.replace(dst)
    return dst


def build_loggers(cfg: DictConfig, args: TrainingArgs, run_dir: Path, resume: bool = False) -> list:
    """CSV always; W&B with ``logger=wandb`` (``resume``: into the job's recorded W&B run)."""
    from lightning.pytorch.loggers import CSVLogger

    loggers: list = [CSVLogger(save_dir=str(run_dir), name="", version="")]  # -> run_dir/metrics.csv
    if args.logger.wandb is not None:
        loggers.append(build_wandb_logger(cfg, run_dir, resume=resume))
    return loggers


def build_callbacks(cfg: DictConfig, layout: RunLayout, full_finetune: bool, tokenizer) -> list:
    """Every enabled entry of ``callbacks:`` built from its ``_target_`` (training's own get their paths from the
    run layout), then ``callbacks.extra``."""
    from hydra.utils import instantiate

    node = cfg.get("callbacks") or {}
    given = {"checkpoint": {"dirpath": str(layout.checkpoints)},
             "weights": {"dirpath": str(layout.weights(full_finetune)), "tokenizer": tokenizer}}
    callbacks: list = []
    for name, c in node.items():
        if name == "extra" or c is None or not c.get("enabled", True):
            continue
        spec = {k: v for k, v in OmegaConf.to_container(c, resolve=True).items() if k != "enabled"}
        callbacks.append(instantiate(spec, **given.get(name, {})))
    for _name, c in (node.get("extra") or {}).items():
        if c is not None:
            callbacks.append(instantiate(c))
    return callbacks


def ui_callbacks(args: TrainingArgs) -> list:
    """The progress bar (over the run's optimizer steps) when the trainer shows one."""
    return [StepProgressBar()] if args.trainer.enable_progress_bar else []


def prepare_run_dir(layout: RunLayout) -> None:
    """Create the run dir and check it is writable, before any work (em's error, not a traceback)."""
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        probe = layout.root / f".em_write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"the run dir {layout.root} is not writable ({err.strerror or err}): set "
                          "paths.output_root=<a writable dir> (or paths.run_dir=...)") from None


def train(cfg: DictConfig, keep_wandb_run: bool = False) -> dict[str, Any]:
    """Finetune per ``cfg``; returns metrics and paths (also written to ``run_dir/train_summary.json``).

    With ``logger=wandb`` the W&B run is finished on return, unless ``keep_wandb_run`` (a sweep job logs its
    evaluation into the same run, then finishes it).

    Every config check runs first (unknown keys, values, the resume checkpoint, the batch plan, the strategy, a
    writable run dir), then data rows are loaded (a missing dataset is reported before a model download), then
    the model.
    """
    import lightning as L

    t0 = time.time()
    args = TrainingArgs.from_config(cfg)
    layout = RunLayout.of(resolve_run_dir(args.paths))
    # the checkpoint to resume from, checked (a damaged newest one falls back to the previous) before any work
    ckpt_path = resolve_resume(cfg.get("ckpt_path"), layout.root)
    world = world_size(args.trainer)
    micro, accum = batch_plan(args.data.global_batch_size, args.data.micro_batch_size, world)
    data_args = dataclasses.replace(args.data, micro_batch_size=micro)
    strategy = build_strategy(cfg)
    prepare_run_dir(layout)

    if cfg.get("seed") is not None:  # seed 0 is a seed (`if cfg.seed:` would skip it)
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    dm = ChatDataModule(args.dataset, data_args, tokenizer=None, seed=cfg.get("seed"))
    dm.load()
    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(args.model, model_path)
    dm.tokenizer = tokenizer
    dm.stop_ids = stop_token_ids(tokenizer)
    dm.setup("fit")
    data_stats = dm.train_stats.summary()
    order = dm.order_summary(world, args.trainer.max_steps or -1, args.trainer.max_epochs)
    log.info("training order: %s", describe_order(order))
    atomic_write_json(layout.data_stats, {"train": data_stats, "order": order, "held_out_rows": len(dm.held_out_rows),
                                          "provenance": dm.provenance})

    module = CausalLMModule(args.model, args.finetune, args.optim, model_path)
    if ckpt_path and global_rank() == 0:
        keep_metrics_history(layout.root)
    loggers = build_loggers(cfg, args, layout.root, resume=ckpt_path is not None)
    for lg in loggers:
        lg.log_hyperparams(plain(cfg))
        if hasattr(lg, "log_metrics"):
            lg.log_metrics({f"data/{k}": float(v) for k, v in {**data_stats, **order}.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=0)
    full = args.finetune.kind == "full"
    clock = FitClock()
    callbacks = build_callbacks(cfg, layout, full, tokenizer) + ui_callbacks(args) + [clock]

    trainer_kw = args.trainer.trainer_kwargs()
    trainer_kw["precision"] = resolve_precision(trainer_kw.get("precision"))
    key = setting_key(args.model.name_or_path or args.model.name, accelerator_kind(args.trainer),
                      trainer_kw["precision"], world)
    forecast = forecast_training(rows=dm.train_stats.rows_kept, mean_tokens=mean_tokens(dm.train_stats),
                                 tokens_note="the prepared rows' mean length", global_batch=data_args.global_batch_size,
                                 micro_batch=micro, accumulation=accum, world=world,
                                 max_steps=args.trainer.max_steps, max_epochs=args.trainer.max_epochs,
                                 throughput_key=key)
    for line in forecast.lines():
        log.info(line)
    if not dm.val_examples:  # no held-out rows: no validation loop (and no "empty val loader" warning)
        trainer_kw["limit_val_batches"] = 0
    trainer = L.Trainer(
        **trainer_kw,
        strategy=strategy,
        accumulate_grad_batches=accum,
        logger=loggers,
        callbacks=callbacks,
        default_root_dir=str(layout.root),
        plugins=[AtomicCheckpointIO()],
    )
    saver = next((c for c in callbacks if isinstance(c, SaveTrainedWeights)), None)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        if saver is not None:  # a resume that had nothing left to train: the weights from the checkpoint
            saver.ensure_saved(trainer, ckpt_path, layout.root, model_path)
    except BaseException:
        if args.logger.wandb is not None and not keep_wandb_run:
            finish_wandb_run(exit_code=1)
        raise
    if args.logger.wandb is not None and not keep_wandb_run:
        finish_wandb_run()  # one W&B run per job, also inside a multirun
    fit_s = clock.seconds
    actual = forecast_training(rows=dm.train_stats.rows_kept, mean_tokens=mean_tokens(dm.train_stats),
                               tokens_note="steps trained x global batch x mean length",
                               global_batch=data_args.global_batch_size, micro_batch=micro, accumulation=accum,
                               world=world, max_steps=trainer.global_step - clock.start_step, max_epochs=None,
                               throughput_key=key)
    actual.est_wall_s, actual.wall_note = round(fit_s, 2), "measured (the fit loop)"
    if trainer.is_global_zero and actual.steps and actual.tokens and fit_s > 0:
        record_throughput(key, actual.tokens / fit_s, actual.steps)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    summary = {
        "run_dir": str(layout.root),
        "global_step": trainer.global_step,
        "micro_batch_size": micro,
        "accumulate_grad_batches": accum,
        "world_size": world,
        "metrics": metrics,
        "adapter_dir": str(saver.saved) if saver is not None and saver.saved else None,
        "last_checkpoint": str(layout.last_checkpoint),
        "metrics_csv": str(layout.metrics_csv),
        "base_model": model_path,
        "resumed_from": ckpt_path,
        "data": data_stats,
        "forecast": forecast.as_dict(),
        "actual": actual.as_dict(),
        "order": order,

        "wall_s": round(time.time() - t0, 2),
    }
    if trainer.is_global_zero:
        atomic_write_json(layout.train_summary, summary)
    return summary
