"""Saving the trained weights in formats other tools load: a PEFT adapter, or a full HF model.

Works under every strategy: the tensors are gathered first (a collective under ZeRO-3 / FSDP, so every
rank calls :func:`save_trained`), then global rank 0 writes. An adapter is written in the dtype of the
frozen base (bf16 under DeepSpeed and usually on GPU, fp32 on CPU), whatever dtype the optimizer kept.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from em.errors import EMError
from em.training.export import export
from em.training.sharded import clean_name, gather_state
from em.utils.dist import is_global_zero

log = logging.getLogger(__name__)

class TrainingIncompleteError(EMError):
    """Training ended without trained weights to save."""


DIGESTS_FILE = "rank_digests.json"
"""Per-rank digests of the adapter, written next to it by :class:`SaveTrainedWeights`."""


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _unwrap(module: nn.Module) -> tuple[nn.Module, nn.Module, Any]:
    """(the object to gather from, the HF/PEFT model, the strategy or None) for a LightningModule or a model."""
    if isinstance(module, L.LightningModule):
        trainer = getattr(module, "_trainer", None)
        return module, module.model, (trainer.strategy if trainer is not None else None)
    return module, module, None


def base_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the frozen base weights (the first frozen floating parameter), fp32 if none."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            return p.dtype
    return torch.float32


def peft_checkpoint_key(key: str, adapter_name: str) -> str:
    """The ``adapter_model.safetensors`` key of a PEFT model parameter: the adapter name removed.

    ``base_model.model.x.q_proj.lora_A.default.weight`` -> ``base_model.model.x.q_proj.lora_A.weight``; mirrors
    ``peft.tuners.tuners_utils._remove_adapter_name_from_state_dict_key`` (what ``PeftModel.save_pretrained`` and
    ``from_pretrained`` use), done here because PEFT's own selection does not see through FSDP units nested
    inside the model (it only strips a leading ``_fsdp_wrapped_module.``).
    """
    if "." not in key:
        return key
    if key.endswith(f".{adapter_name}"):
        return key[: -len(adapter_name) - 1]
    head, _, suffix = key.rpartition(".")
    if head.endswith(f".{adapter_name}"):
        head = head[: -len(adapter_name) - 1]
    return f"{head}.{suffix}"


@dataclass
class TrainedState:
    """Gathered tensors ready to write; ``tensors`` is empty on ranks that do not write (full models)."""

    model: nn.Module
    tensors: dict[str, torch.Tensor]
    adapter: bool
    is_writer: bool

    @property
    def adapter_name(self) -> str:
        name = getattr(self.model, "active_adapter", "default")
        return name[0] if isinstance(name, (list, tuple)) else str(name)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors exactly as ``adapter_model.safetensors`` stores them (PEFT key names, contiguous)."""
        return {peft_checkpoint_key(k, self.adapter_name): v.contiguous() for k, v in self.tensors.items()}


def collect_trained_state(module: nn.Module) -> TrainedState:
    """Gather the trained weights of a LightningModule (or a bare PEFT / HF model). Call on every rank.

    Adapters are gathered on every rank (they are small, and each rank can then check its copy);
    a full model only on global rank 0 (the other ranks take part in the gather).
    """
    src, model, strategy = _unwrap(module)
    adapter = _is_peft(model)
    state = gather_state(src, strategy, trainable_only=adapter, rank0_only=not adapter)
    if src is not model:  # LightningModule names: "model.<name>"
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if adapter:
        dtype = base_dtype(model)
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    elif state:  # the writer of a full model: add the persistent buffers (never sharded; no collective here)
        for k, v in _persistent_buffers(model).items():
            state.setdefault(k, v)
    writer = is_global_zero(strategy)
    return TrainedState(model=model, tensors=state, adapter=adapter, is_writer=writer)


def _persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers saved in a state dict, by clean name (read locally: FSDP and ZeRO do not shard buffers)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, mod in model.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out[clean_name(f"{prefix}.{name}" if prefix else name)] = buf.detach().cpu()
    return out


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes (in name order): equal iff the state dicts are identical."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_trained(ts: TrainedState, tokenizer, out_dir: str | Path, base_path: str | None = None) -> Path:
    """Write ``ts`` to ``out_dir`` atomically (rank 0 only; a no-op returning the path on other ranks)."""
    out = Path(out_dir)
    if not ts.is_writer:
        return out
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if ts.adapter:
        from safetensors.torch import save_file

        tmp.mkdir(parents=True)
        cfg = copy.deepcopy(ts.model.peft_config[ts.adapter_name])
        cfg.inference_mode = True  # as PeftModel.save_pretrained writes it
        if base_path is not None:
            cfg.base_model_name_or_path = str(base_path)
        cfg.save_pretrained(str(tmp))
        save_file(ts.adapter_tensors(), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        ts.model.save_pretrained(tmp, state_dict=ts.tensors, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("saved %s to %s", "adapter" if ts.adapter else "model", out)
    return out


def save_trained(module, tokenizer, out_dir: str | Path, base_path: str | None = None) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (LoRA) or a full model (full FT).

    ``module``: the LightningModule (under any strategy) or a bare PEFT / HF model. Call it on every rank:
    sharded strategies gather first (collectively); only global rank 0 writes. ``base_path`` overrides the
    adapter's ``base_model_name_or_path``.
    """
    return write_trained(collect_trained_state(module), tokenizer, out_dir, base_path)


class SaveTrainedWeights(L.Callback):
    """At the end of training, save the adapter (or full model) in HF/PEFT format under ``dirpath``.

    For adapters it also checks that every rank holds the same weights: each rank hashes the tensors it would
    save (:func:`tensors_digest` of the file's tensors), the digests are all-gathered and rank 0 writes them to
    ``<dirpath>/rank_digests.json``; a mismatch raises after the save (a data-parallel replica diverged).
    """

    def __init__(self, dirpath: str, tokenizer=None, base_path: str | None = None):
        self.dirpath = dirpath
        self.tokenizer = tokenizer
        self.base_path = base_path
        self.saved: Path | None = None
        self.rank_digests: list[str] | None = None

    def on_train_end(self, trainer, pl_module):
        ts = collect_trained_state(pl_module)  # every rank: a collective under ZeRO-3 / FSDP
        digests = None
        if ts.adapter:
            mine = tensors_digest(ts.adapter_tensors())
            digests = [mine]
            if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
                digests = [None] * trainer.world_size
                torch.distributed.all_gather_object(digests, mine)
        self.saved = write_trained(ts, self.tokenizer, self.dirpath, self.base_path)
        self.rank_digests = digests
        if digests is not None and ts.is_writer:
            (self.saved / DIGESTS_FILE).write_text(json.dumps({"ranks": digests, "world_size": trainer.world_size},
                                                              indent=2))
        trainer.strategy.barrier("em_save_adapter")
        if digests is not None and len(set(digests)) > 1:
            raise RuntimeError(f"the ranks hold different adapter weights after training: {digests} "
                               f"(rank 0's copy was saved to {self.saved})")

    def ensure_saved(self, trainer, ckpt_path: str | None, run_dir: str | Path,
                     base_path: str | None = None) -> Path:
        """After ``trainer.fit``: the weights this run ends with, written if training did not write them.

        A run resumed from a checkpoint taken at its very end (killed between that checkpoint and the weights'
        write) trains no step, and Lightning then skips ``on_train_end``: the weights are written here from the
        checkpoint (on global rank 0; the same tensors the uninterrupted run would have saved). Without a
        checkpoint there is nothing to write them from: an error, never a silent success without weights.
        """
        if self.saved is not None:
            return self.saved
        if not ckpt_path:
            raise TrainingIncompleteError(
                f"training ended after {trainer.global_step} step(s) without saving weights to {self.dirpath} "
                "(was it interrupted?)")
        log.warning("the checkpoint %s is at the end of training (step %d): nothing left to train; writing the "
                    "weights from it to %s", ckpt_path, trainer.global_step, self.dirpath)
        if trainer.is_global_zero:
            export(ckpt_path, run_dir=run_dir, out=self.dirpath, base=self.base_path or base_path)
        trainer.strategy.barrier("em_save_from_checkpoint")
        self.saved = Path(self.dirpath)
        return self.saved
