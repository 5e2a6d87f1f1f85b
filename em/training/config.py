"""Typed config sections of training: the Lightning ``Trainer`` arguments and training's own callbacks.

These dataclasses are the schemas of ``conf/trainer/*.yaml`` and of the ``checkpoint`` / ``weights`` entries of
``conf/callbacks/*.yaml`` (registered with Hydra by :mod:`em.schemas`): their defaults are the only defaults,
the YAML files state what differs, and an unknown key is an error that names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from em.config import check_keys, section
from em.data.datamodule import DataArgs
from em.data.loading import DatasetArgs
from em.errors import ConfigError
from em.layout import PathsArgs
from em.models.loading import ModelArgs
from em.models.peft_setup import FinetuneArgs
from em.training.optim import OptimArgs
from em.training.wandb_logging import LoggerArgs


@dataclass
class TrainerArgs:
    """Lightning ``Trainer`` arguments (``trainer:``). Need another Trainer argument? Add a field here: a test
    checks that every field is one the Trainer takes."""

    accelerator: str = "auto"
    """``auto`` / ``cpu`` / ``gpu``."""
    devices: Any = "auto"
    """Devices per node: a number, a list of ids, or ``auto`` (visible GPUs, or 1 on CPU)."""
    num_nodes: int = 1
    precision: Any = "auto"
    """``auto`` = bf16-mixed on a GPU that supports it, else fp32 (bf16 on CPU is ~25x slower); or any of
    Lightning's values (``32-true``, ``bf16-mixed``, ``16-mixed``, ...)."""
    max_epochs: int | None = 1
    max_steps: int = -1
    """Optimizer steps to train (-1: as many as ``max_epochs`` give)."""
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 1
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 1
    num_sanity_val_steps: int = 0
    enable_progress_bar: bool = True
    enable_model_summary: bool = False
    deterministic: Any = False
    limit_train_batches: Any = None
    """Fraction or number of micro-batches per epoch (None: all)."""
    limit_val_batches: Any = None

    def __post_init__(self) -> None:
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"trainer.max_steps={self.max_steps}: train at least one step (or -1 for max_epochs)")
        if self.max_epochs is not None and self.max_epochs < 1 and self.max_steps == -1:
            raise ConfigError(f"trainer.max_epochs={self.max_epochs}: train at least one epoch")
        if self.num_nodes < 1:
            raise ConfigError(f"trainer.num_nodes={self.num_nodes}: expected 1 or more")
        if isinstance(self.devices, int) and not isinstance(self.devices, bool) and self.devices < 1:
            raise ConfigError(f"trainer.devices={self.devices}: expected 1 or more (or auto)")

    def trainer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for ``lightning.Trainer`` (``None`` leaves Lightning's default)."""
        from dataclasses import asdict

        kw = asdict(self)
        for k in ("limit_train_batches", "limit_val_batches", "val_check_interval"):
            if kw[k] is None:
                kw.pop(k)
        return kw


@dataclass
class CheckpointArgs:
    """``callbacks.checkpoint``: the resumable training checkpoint (``<run_dir>/checkpoints/last.ckpt``)."""

    _target_: str = "lightning.pytorch.callbacks.ModelCheckpoint"
    enabled: bool = True
    every_n_train_steps: int | None = None
    """Also checkpoint every N optimizer steps (set it for long jobs: preemption / SLURM requeue resume from it);
    None = at the end of each epoch only."""
    save_last: bool = True
    save_top_k: int = 0
    save_on_train_epoch_end: bool = True

    def __post_init__(self) -> None:
        if self.every_n_train_steps is not None and self.every_n_train_steps < 1:
            raise ConfigError(f"callbacks.checkpoint.every_n_train_steps={self.every_n_train_steps}: expected >= 1 "
                              "or null")


@dataclass
class WeightsArgs:
    """``callbacks.weights``: write the trained weights at the end of training (a PEFT adapter, or the full
    model), into the run dir's ``adapter/`` or ``model/`` (:mod:`em.layout`)."""

    _target_: str = "em.training.adapter.SaveTrainedWeights"
    enabled: bool = True


TRAINING_SECTIONS: dict[str, type] = {
    "paths": PathsArgs, "model": ModelArgs, "finetune": FinetuneArgs, "optim": OptimArgs, "data": DataArgs,
    "dataset": DatasetArgs, "trainer": TrainerArgs, "logger": LoggerArgs,
}
"""The typed sections :func:`em.training.run.train` reads (``callbacks`` are built from their ``_target_``)."""


@dataclass
class TrainingArgs:
    """The typed sections of a training config, checked."""

    paths: PathsArgs
    model: ModelArgs
    finetune: FinetuneArgs
    optim: OptimArgs
    data: DataArgs
    dataset: DatasetArgs
    trainer: TrainerArgs
    logger: LoggerArgs

    @classmethod
    def from_config(cls, cfg: DictConfig) -> TrainingArgs:
        """Refuse unknown keys (naming them), run every section's checks, return the typed sections."""
        check_keys(cfg, TRAINING_SECTIONS)
        return cls(**{name: section(cfg, name) for name in TRAINING_SECTIONS})


def batch_plan(global_batch: int, micro_max: int, world: int) -> tuple[int, int]:
    """(micro batch, accumulation) with micro x accumulation x world == ``global_batch``: the largest micro batch
    up to ``micro_max`` that divides the per-process share (the paper's 16 on 16 GPUs: micro 1 x accumulation 1).
    The global batch is the recipe; when the world size does not divide it, say how to keep it."""
    if global_batch % world:
        fits = sorted({d for d in range(1, global_batch + 1) if global_batch % d == 0})
        near = [global_batch * k for k in range(1, 4) if (global_batch * k) % world == 0][:1]
        raise ConfigError(
            f"data.global_batch_size={global_batch} cannot be split over {world} processes (devices x nodes). To "
            f"keep the recipe's global batch, train on a number of processes that divides it: {fits}"
            + (f"; or change the recipe: data.global_batch_size={near[0]}" if near else ""))
    share = global_batch // world
    micro = max(d for d in range(1, min(micro_max, share) + 1) if share % d == 0)
    return micro, share // micro
