"""One LightningModule for every finetune kind (LoRA / rsLoRA / rank-1 / full)."""

from __future__ import annotations

import logging

import lightning as L
import torch

from em.models.loading import ModelArgs, load_model
from em.models.peft_setup import FinetuneArgs, apply_finetune
from em.training.optim import OptimArgs, build_optimizer, build_scheduler

log = logging.getLogger(__name__)


class CausalLMModule(L.LightningModule):
    """Causal-LM finetuning; the model is built in ``configure_model`` so sharded strategies can wrap it."""

    def __init__(self, model_args: ModelArgs, finetune_args: FinetuneArgs, optim_args: OptimArgs,
                 model_path: str | None = None):
        super().__init__()
        self.model_args = model_args
        self.finetune_args = finetune_args
        self.optim_args = optim_args
        self.model_path = model_path
        self.model = None
        # LoRA checkpoints hold only the trainable tensors; the frozen base is rebuilt from its source.
        self.strict_loading = finetune_args.kind == "full"

    def configure_model(self) -> None:
        if self.model is not None:
            return
        base = load_model(self.model_args, self.model_path)
        self.model = apply_finetune(base, self.finetune_args)
        self.model.train()  # from_pretrained returns eval mode (dropout off); Lightning does not flip it

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        out = self.model(**batch)
        n_tok = (batch["labels"] != -100).sum()
        self.log("train/loss", out.loss, prog_bar=True, on_step=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/trained_tokens", n_tok.float(), on_step=True, reduce_fx="sum",
                 batch_size=batch["input_ids"].shape[0])
        return out.loss

    def validation_step(self, batch, batch_idx):
        out = self.model(**batch)
        self.log("val/loss", out.loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        opt = build_optimizer(self.model.named_parameters(), self.optim_args)
        total = int(self.trainer.estimated_stepping_batches)
        sched = build_scheduler(opt, self.optim_args, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.lr_scheduler_configs:
            self.log("train/lr", self.trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0], on_step=True)

    # -- checkpoints: only trainable tensors for adapters ----------------------------------------
    def on_save_checkpoint(self, checkpoint):
        if self.finetune_args.kind != "full":
            trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint):
        if self.finetune_args.kind != "full" and self.model is not None:
            missing = [k for k, p in self.model.named_parameters() if p.requires_grad
                       and f"model.{k}" not in checkpoint["state_dict"]]
            if missing:
                raise RuntimeError(f"checkpoint lacks {len(missing)} adapter tensors, e.g. {missing[:3]}: "
                                   "was it saved with a different finetune config?")

    @torch.no_grad()
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}
