"""AdamW with decoupled weight decay groups and a warmup + linear/cosine schedule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from em.errors import ConfigError

SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def _adamw() -> dict[str, Any]:
    return {"_target_": "torch.optim.AdamW", "_partial_": True}


@dataclass
class OptimArgs:
    """``optim:`` (defaults: the paper's open-model recipe, open_models/train.json)."""

    lr: float = 1e-5
    weight_decay: float = 0.01
    """Decoupled weight decay; biases and norm weights get none."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    scheduler: str = "linear"
    """``linear`` / ``cosine`` / ``constant`` (after warmup)."""
    warmup_steps: int = 5
    optimizer: Any = field(default_factory=_adamw)
    """The optimizer class (``_target_``, ``_partial_: true``), called with the parameter groups, lr, betas and
    eps: torch's AdamW, or ``optim=adamw_8bit`` for bitsandbytes' 8-bit AdamW (the paper's unsloth recipe, GPU)."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr={self.lr}: the learning rate must be > 0")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.eps <= 0:
            raise ConfigError("optim: weight_decay and warmup_steps must be >= 0 and eps > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)}: expected two values in [0, 1)")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"optim.scheduler={self.scheduler!r}: expected one of {list(SCHEDULERS)}")
        if not (isinstance(self.optimizer, dict) and self.optimizer.get("_target_")):
            raise ConfigError("optim.optimizer: expected {_target_: <optimizer class>, _partial_: true}")


def _no_decay(name: str) -> bool:
    """Biases and normalisation weights get no weight decay (the usual transformer recipe)."""
    n = name.lower()
    return n.endswith("bias") or "norm" in n


def build_optimizer(params, args: OptimArgs):
    named = [(n, p) for n, p in params if p.requires_grad]
    if not named:
        raise ConfigError("no trainable parameters: check finetune.kind / finetune.target_modules")
    # By name, not by p.ndim: FSDP hands the optimizer flattened 1-D shards of 2-D weights.
    decay = [p for n, p in named if not _no_decay(n)]
    no_decay = [p for n, p in named if _no_decay(n)]
    groups = [g for g in ({"params": decay, "weight_decay": args.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    target = args.optimizer["_target_"]
    try:
        make = instantiate({**args.optimizer, "_partial_": True})
    except InstantiationException as err:
        hint = " (pip install 'em[adamw8bit]')" if "bitsandbytes" in target else ""
        raise ConfigError(f"optim.optimizer: cannot build {target}{hint}: {err.__cause__ or err}") from None
    return make(groups, lr=args.lr, betas=tuple(args.betas), eps=args.eps)


def build_scheduler(optimizer, args: OptimArgs, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(SCHEDULERS[args.scheduler], optimizer, num_warmup_steps=args.warmup_steps,
                         num_training_steps=max(total_steps, 1))
