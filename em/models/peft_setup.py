"""Finetuning setup: LoRA / rsLoRA / rank-1 adapters via peft, or full finetuning."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from em.errors import ConfigError
from em.models.loading import checkpointing_enabled

log = logging.getLogger(__name__)


@dataclass
class FinetuneArgs:
    """What ``conf/finetune/*.yaml`` describes."""

    kind: str = "lora"
    """``lora`` (incl. rsLoRA and rank-1, by r / use_rslora) or ``full``."""
    r: int = 32
    alpha: float = 64
    dropout: float = 0.0
    use_rslora: bool = True
    """rsLoRA scales by alpha/sqrt(r) instead of alpha/r (the paper's open-model recipe)."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    layers_to_transform: list[int] | None = None
    """Restrict adapters to these layer indices (e.g. a single layer for rank-1 studies)."""
    bias: str = "none"

    def __post_init__(self) -> None:
        if self.kind not in ("lora", "full"):
            raise ConfigError(f"finetune.kind={self.kind!r}: expected 'lora' or 'full'")
        if self.kind == "lora":
            if self.r < 1:
                raise ConfigError(f"finetune.r={self.r}: a LoRA rank must be >= 1")
            if not self.target_modules:
                raise ConfigError("finetune.target_modules is empty: name the modules to adapt (e.g. q_proj, v_proj)")
            if not 0 <= self.dropout < 1:
                raise ConfigError(f"finetune.dropout={self.dropout}: expected a value in [0, 1)")


def apply_finetune(model, args: FinetuneArgs):
    """Wrap ``model`` for the requested finetune kind; returns the (possibly PEFT) model."""
    if args.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if args.kind != "lora":
        raise ConfigError(f"finetune.kind={args.kind!r}: expected 'lora' or 'full'")
    from peft import LoraConfig, get_peft_model

    if checkpointing_enabled(model):
        # PEFT + checkpointing: inputs of the frozen embedding need grads for reentrant checkpointing.
        model.enable_input_require_grads()
    cfg = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        use_rslora=args.use_rslora,
        target_modules=list(args.target_modules),
        layers_to_transform=list(args.layers_to_transform) if args.layers_to_transform else None,
        bias=args.bias,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA r=%d alpha=%s rslora=%s: %d trainable / %d params (%.3f%%)",
             args.r, args.alpha, args.use_rslora, trainable, total, 100 * trainable / max(total, 1))
    return peft_model
