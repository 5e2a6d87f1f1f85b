"""One LightningModule for every finetune kind (LoRA / rsLoRA / rank-1 / full)."""

from __future__ import annotations

import logging

import lightning as L
import torch

from em.models.loading import ModelArgs
from em.models.peft_setup import FinetuneArgs
from em.training.loss import causal_lm_loss, resolve_cross_entropy
from em.training.optim import OptimArgs, build_optimizer, build_scheduler
from em.training.sharded import build_model, trainable_param_names

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
        self.cross_entropy = model_args.cross_entropy  # resolved against the model and strategy in configure_model
        # LoRA checkpoints hold only the trainable tensors; the frozen base is rebuilt from its source.
        self.strict_loading = finetune_args.kind == "full"

    def configure_model(self) -> None:
        if self.model is not None:
            return
        # build_model adapts loading to the strategy (ZeRO-3: weights into partitions, adapters outside zero.Init)
        strategy = self._trainer.strategy if self._trainer is not None else None
        self.model = build_model(self.model_args, self.finetune_args, self.model_path, strategy)
        self.model.train()  # from_pretrained returns eval mode (dropout off); Lightning does not flip it
        self.cross_entropy = resolve_cross_entropy(self.model_args.cross_entropy, self.model, strategy)

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        loss = causal_lm_loss(self.model, batch, self.cross_entropy)
        n_tok = (batch["labels"] != -100).sum()
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/trained_tokens", n_tok.float(), on_step=True, reduce_fx="sum",
                 batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss = causal_lm_loss(self.model, batch, self.cross_entropy)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])

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
        if self.finetune_args.kind != "full" and "state_dict" in checkpoint:
            trainable = {f"model.{n}" for n in trainable_param_names(self.model)}  # names without FSDP prefixes
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint):
        # no "state_dict" under DeepSpeed: its engine restores the module's tensors itself
        if self.finetune_args.kind != "full" and self.model is not None and "state_dict" in checkpoint:
            missing = [k for k in trainable_param_names(self.model) if f"model.{k}" not in checkpoint["state_dict"]]
            if missing:
                raise RuntimeError(f"checkpoint lacks {len(missing)} adapter tensors, e.g. {missing[:3]}: "
                                   "was it saved with a different finetune config?")

    @torch.no_grad()
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}
