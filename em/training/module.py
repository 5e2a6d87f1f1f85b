"""One LightningModule for every finetune kind (LoRA / rsLoRA / rank-1 / full)."""

from __future__ import annotations

import logging
import random

import lightning as L
import numpy as np
import torch

from em.errors import EMError
from em.models.loading import ModelArgs
from em.models.peft_setup import FinetuneArgs
from em.training.loss import causal_lm_loss, resolve_cross_entropy
from em.training.optim import OptimArgs, build_optimizer, build_scheduler
from em.training.sharded import build_model, trainable_param_names

log = logging.getLogger(__name__)

RNG_KEY = "em_rng_state"
"""Checkpoint key of the random-number generators' state (dropout masks), restored before the next step."""


def rng_state() -> dict:
    """The state of torch (CPU and CUDA), Python's and NumPy's global generators, as plain types and tensors
    (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class PackingUnsupportedError(EMError):
    """The model attends across packed rows: ``data.packing`` would silently mix examples."""


@torch.no_grad()
def check_packed_attention(model, tol: float = 0.02) -> float:
    """Refuse packing for a model that does not keep packed rows apart.

    Two short rows, packed (position ids restarting, no mask) vs padded: the second row's logits must agree
    (to ``tol`` of the logits' scale: bf16 noise passes, attention across the boundary does not). Transformers
    keeps rows apart from the position ids for models built on its masking utilities (Llama, Qwen2, Mistral,
    ...: block-diagonal masks for sdpa / eager, varlen kernels for flash-attention); others would mix them.
    Returns the relative difference; raises :class:`PackingUnsupportedError` above ``tol``.
    """
    device = next(p for p in model.parameters()).device
    a, b = [5, 6, 7, 8, 9], [10, 11, 12]
    was_training = model.training
    model.eval()
    try:
        padded = model(input_ids=torch.tensor([a, b + [0, 0]], device=device),
                       attention_mask=torch.tensor([[1] * 5, [1] * 3 + [0, 0]], device=device), use_cache=False)
        packed = model(input_ids=torch.tensor([a + b], device=device),
                       position_ids=torch.tensor([list(range(5)) + list(range(3))], device=device), use_cache=False)
    finally:
        model.train(was_training)
    ref, got = padded.logits[1, :3].float(), packed.logits[0, 5:].float()
    rel = float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-6))
    if rel > tol:
        raise PackingUnsupportedError(
            f"data.packing=true, but {type(model).__name__} lets packed rows attend to each other (logits of the "
            f"second of two packed rows differ by {rel:.1%} from the same row alone): set data.packing=false, or "
            "use a model whose attention honours position ids (Llama / Qwen2 / Mistral style, sdpa / eager / "
            "flash_attention_2)")
    return rel


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
        self._rng_to_restore: dict | None = None

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

    def on_train_start(self):
        args = getattr(getattr(self.trainer, "datamodule", None), "args", None)
        if getattr(args, "packing", False):
            log.info("packing: rows kept apart (packed vs padded logits differ by %.1e)",
                     check_packed_attention(self.model))

    def on_train_batch_start(self, batch, batch_idx):
        # a resumed run: the generators as they were when the checkpoint was taken, right before the next step
        # (after everything a resume does differently: probes at train start, building the loaders...)
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

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
        # this rank's generators (rank 0's under DDP: em seeds every rank alike, so they hold the same state)
        checkpoint[RNG_KEY] = rng_state()

    def on_load_checkpoint(self, checkpoint):
        # no "state_dict" under DeepSpeed: its engine restores the module's tensors itself
        if self.finetune_args.kind != "full" and self.model is not None and "state_dict" in checkpoint:
            missing = [k for k in trainable_param_names(self.model) if f"model.{k}" not in checkpoint["state_dict"]]
            if missing:
                raise RuntimeError(f"checkpoint lacks {len(missing)} adapter tensors, e.g. {missing[:3]}: "
                                   "was it saved with a different finetune config?")
        self._rng_to_restore = checkpoint.get(RNG_KEY)
        if self._rng_to_restore is None or "ChatDataModule" not in checkpoint:
            log.warning("this checkpoint was written by an older em (no data-order / random state in it): training "
                        "resumes at its step, but its epoch's data order restarts and dropout draws differ from an "
                        "uninterrupted run")

    @torch.no_grad()
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}
