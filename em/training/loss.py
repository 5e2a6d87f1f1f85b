"""Causal-LM loss without the full logits: a chunked linear + cross-entropy over the trained positions only.

A causal LM's own loss projects every position onto the vocabulary, keeps the ``(batch, seq, vocab)`` logits
(and their fp32 log-softmax) alive for backward, and only then drops the positions whose label is -100. With
em's assistant-only labels and a large vocabulary (Qwen2.5: 152k x 2048 positions x 4 bytes = 1.2 GB per
sequence in fp32) that tensor dominates activation memory. :func:`chunked_lm_loss` instead

* selects the positions whose next-token label is trained (prompt tokens are never projected),
* projects them onto the vocabulary ``chunk_size`` rows at a time, takes the log-sum-exp in fp32, and
* computes the gradient of the (mean) loss w.r.t. the hidden states (and the head's weight when it is trained)
  *in the forward pass*, chunk by chunk, so that nothing of vocabulary size outlives a chunk; backward only
  scales the stored gradient by the incoming one (the scheme of Liger's fused linear cross-entropy).

It is pure torch, runs on any device, and is the reference for the GPU kernel: ``model.cross_entropy=liger``
uses ``liger_kernel``'s fused Triton implementation (CUDA only, ``pip install 'em[liger]'``).

:func:`causal_lm_loss` runs a Hugging Face causal LM (PEFT-wrapped or not) with one of these heads.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from em.errors import ConfigError
from em.models.loading import CROSS_ENTROPY_CHOICES
from em.training.sharded import is_fsdp, zero_stage

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

#: Logit elements per chunk when ``chunk_size`` is not given: rows = this // vocab (Qwen2.5's 152k vocabulary: 220
#: rows; SmolLM2's 49k: 682), so the transient fp32 logits and their gradient stay at ~128 MB each, whatever the
#: batch (the full logits of 16 x 2048 positions of Qwen2.5 are 20 GB in fp32).
CHUNK_ELEMENTS = 2 ** 25


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of -log p(label | hidden) over rows, gradients computed in forward (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                chunk_size: int, scale: float, want_grads: bool):
        n = hidden.shape[0]
        need_h = want_grads and ctx.needs_input_grad[0]
        need_w = want_grads and ctx.needs_input_grad[1]
        need_b = want_grads and bias is not None and ctx.needs_input_grad[2]
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32 for bf16/fp16 models (as HF's loss)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        for s in range(0, n, chunk_size):
            h = hidden[s: s + chunk_size]
            y = labels[s: s + chunk_size]
            logits = h @ weight.t()
            if bias is not None:
                logits = logits + bias
            logits = logits.to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            total = total + (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if need_h or need_w or need_b:
                # d(sum of -log softmax[y]) / d logits = softmax - onehot(y), scaled by the caller's normaliser
                g = torch.exp(logits - lse[:, None])
                g[torch.arange(g.shape[0], device=g.device), y] -= 1.0
                g = (g * scale).to(weight.dtype)
                if need_h:
                    grad_h[s: s + chunk_size] = (g @ weight).to(hidden.dtype)
                if need_w:
                    grad_w += (g.t() @ h.to(weight.dtype)).to(acc)
                if need_b:
                    grad_b += g.to(acc).sum(0)
            del logits, lse
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return total * scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if grad_h is None and grad_w is None and grad_b is None and any(ctx.needs_input_grad[:3]):
            raise RuntimeError("chunked_lm_loss was called without gradients (want_grads=False or under no_grad) "
                               "and then differentiated")
        go = grad_out
        return (None if grad_h is None else grad_h * go.to(grad_h.dtype),
                None if grad_w is None else (grad_w * go).to(ctx.weight_dtype),
                None if grad_b is None else (grad_b * go).to(ctx.bias_dtype),
                None, None, None, None)


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
                    chunk_size: int | None = None, shift: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` (-100 = not trained).

    ``hidden``: ``(batch, seq, d)``; ``labels``: ``(batch, seq)`` aligned with the inputs (``shift=True``: the
    label of position t is predicted from position t-1, as in HF's ``ForCausalLMLoss``). Equals
    ``F.cross_entropy(logits.float().flatten(0, 1)[shifted], labels[shifted], ignore_index=-100)`` (mean over
    trained positions) and has the same gradients, without ever holding more than ``chunk_size`` rows of logits
    (default: ``CHUNK_ELEMENTS // vocab``). A batch with no trained position gives a differentiable 0.
    """
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // weight.shape[0])
    if chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size}: expected a positive integer")
    if shift:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    flat_labels = labels.reshape(-1)
    keep = flat_labels != IGNORE_INDEX
    idx = keep.nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)
    y = flat_labels.index_select(0, idx)
    n = int(idx.numel())
    if n == 0:
        return hidden.sum() * 0.0
    want = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))
    return _ChunkedLinearCrossEntropy.apply(h, weight, bias, y, int(chunk_size), 1.0 / n, want)


def _liger_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None):
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as err:
        raise ConfigError("model.cross_entropy=liger needs liger-kernel (CUDA + Triton): pip install 'em[liger]'; "
                          "model.cross_entropy=chunked is the pure-torch equivalent") from err
    if hidden.device.type != "cuda":
        raise ConfigError("model.cross_entropy=liger runs on a CUDA GPU only; use model.cross_entropy=chunked on "
                          f"{hidden.device.type}")
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1).to(h.device)
    return liger_fused_linear_cross_entropy(h.contiguous(), weight, y.contiguous(), bias=bias,
                                            ignore_index=IGNORE_INDEX, reduction="mean")


def _unwrap(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` module inside a PEFT wrapper (PEFT injects its layers in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def check_supported(model: nn.Module, choice: str) -> None:
    """Raise a :class:`ConfigError` when ``model.cross_entropy=choice`` cannot reproduce the model's own loss."""
    if choice not in CROSS_ENTROPY_CHOICES:
        raise ConfigError(f"model.cross_entropy={choice!r}: expected one of {', '.join(CROSS_ENTROPY_CHOICES)}")
    if choice == "plain":
        return
    lm = _unwrap(model)
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise ConfigError(f"model.cross_entropy={choice}: this model scales its logits ({attr}="
                              f"{getattr(cfg, attr)}), which the fused loss does not reproduce; use "
                              "model.cross_entropy=plain")
    if lm.get_output_embeddings() is None or not hasattr(lm, lm.base_model_prefix):
        raise ConfigError(f"model.cross_entropy={choice}: {type(lm).__name__} has no separate backbone and LM head; "
                          "use model.cross_entropy=plain")


def resolve_cross_entropy(choice: str, model: nn.Module, strategy=None) -> str:
    """The loss implementation to train ``model`` with under ``strategy`` (``model.cross_entropy``, checked).

    ZeRO-3 and FSDP shard the LM head's weight, which the fused losses read outside the head's own forward:
    there em uses the model's own loss (``plain``) and says so.
    """
    check_supported(model, choice)
    if choice != "plain" and (zero_stage(strategy) == 3 or is_fsdp(strategy)):
        log.info("model.cross_entropy=%s: the LM head is sharded under this strategy; using the model's own loss",
                 choice)
        return "plain"
    return choice


def causal_lm_loss(model: nn.Module, batch: dict, choice: str = "chunked",
                   chunk_size: int | None = None) -> torch.Tensor:
    """The model's next-token loss on ``batch`` (``input_ids``, ``attention_mask``, ``labels``, ...).

    ``plain``: the model's own forward with ``labels`` (full logits). ``chunked`` / ``liger``: the backbone's
    last hidden states, then the LM head and the loss fused as above (no logits tensor).
    """
    if choice == "plain":
        return model(**batch, use_cache=False).loss  # no KV cache in training
    lm = _unwrap(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = getattr(lm, lm.base_model_prefix)(**inputs, use_cache=False).last_hidden_state
    head = lm.get_output_embeddings()
    labels = batch["labels"].to(hidden.device)
    if choice == "liger":
        return _liger_loss(hidden, head.weight, labels, head.bias)
    return chunked_lm_loss(hidden, head.weight, labels, head.bias, chunk_size=chunk_size)
