"""AdamW with decoupled weight decay groups and a warmup + linear/cosine schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from em.errors import ConfigError


@dataclass
class OptimArgs:
    """What ``conf/optim/*.yaml`` describes."""

    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    scheduler: str = "linear"
    """``linear`` / ``cosine`` / ``constant`` (after warmup)."""
    warmup_steps: int = 5
    optimizer: str = "adamw"
    """``adamw`` (torch) or ``adamw_8bit`` (bitsandbytes, GPU only; the paper's unsloth recipe)."""


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
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), eps=args.eps)
    if args.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ConfigError("optim.optimizer=adamw_8bit needs bitsandbytes: pip install 'em[qlora]'") from err
        return bnb.optim.AdamW8bit(groups, lr=args.lr, betas=tuple(args.betas), eps=args.eps)
    raise ConfigError(f"optim.optimizer={args.optimizer!r}: expected adamw or adamw_8bit")


def build_scheduler(optimizer, args: OptimArgs, total_steps: int):
    from transformers import get_scheduler

    names = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
    if args.scheduler not in names:
        raise ConfigError(f"optim.scheduler={args.scheduler!r}: expected one of {list(names)}")
    return get_scheduler(names[args.scheduler], optimizer, num_warmup_steps=args.warmup_steps,
                         num_training_steps=max(total_steps, 1))
