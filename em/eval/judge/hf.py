"""A local transformers causal LM as judge, scored exactly like the API judge.

For each prompt: the model's chat template is applied to the single user message with
``add_generation_prompt=True``; one forward pass (batched, left padding, explicit position ids so
that padding does not shift positions) gives the next-token logits at the last position; their
log-softmax over the full vocabulary, top ``top_k`` (20), each token id decoded with
``tokenizer.decode([id])``, is what an API would return as ``top_logprobs``, and goes through the
same scoring rule and cache as :class:`~em.eval.judge.openai.OpenAIJudge`.

Model work runs in a worker thread (``asyncio.to_thread``) so the event loop stays responsive.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from em.errors import ConfigError, MissingResourceError
from em.eval.judge.base import CacheSpec, Judge, JudgeRequest, OnResult, RawAnswer, ScoringConfig
from em.models.loading import ModelArgs, resolve_model_path

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".json")


def _dir_fingerprint(path: Path, sample_bytes: int = 1 << 20) -> str:
    """Cheap content identity of a local checkpoint directory: for each weight/config file its name, size and
    the sha256 of up to 1 MiB at its start, middle and end. Content-based (not mtimes), so the same weights
    copied to another machine or cache are the same judge, and finetuned weights of the same shapes are not."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES):
            size = f.stat().st_size
            h.update(f"{f.name}\0{size}\n".encode())
            with open(f, "rb") as fh:
                for off in sorted({0, max(0, size // 2 - sample_bytes // 2), max(0, size - sample_bytes)}):
                    fh.seek(off)
                    h.update(fh.read(sample_bytes))
    return h.hexdigest()[:16]


class HFJudge(Judge):
    """Judge with a local ``transformers`` causal LM.

    Args:
        model, tokenizer: a loaded causal LM and its tokenizer, or
        model_name_or_path: a hub id or local directory to load them from (``trust_remote_code``
            is off). A string passed as ``model`` is taken as ``model_name_or_path``.
        model_id: identity of the judge in the cache. Default: ``model_name_or_path`` (for a local
            directory, its absolute path plus a fingerprint of its files), or the loaded model's
            ``config.name_or_path``. If no identity can be found, caching is disabled (a random
            or modified in-memory model must not share cache entries with another).
        batch_size: prompts per forward pass.
        top_k: number of top logprobs kept (the paper: 20).
        revision: hub revision (commit sha, branch or tag) of ``model_name_or_path``; part of the identity.
        device, dtype: where and in which dtype to load ``model_name_or_path`` (default: CUDA if
            available else CPU; the checkpoint's dtype).
        cache, scoring, name: see :class:`~em.eval.judge.base.Judge`.
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        *,
        model_name_or_path: str | os.PathLike | None = None,
        model_id: str | None = None,
        revision: str | None = None,
        batch_size: int = 8,
        top_k: int = 20,
        device: str | None = None,
        dtype: Any = None,
        cache: CacheSpec = True,
        scoring: ScoringConfig | Mapping[str, Any] | None = None,
        name: str | None = None,
    ):
        if isinstance(model, (str, os.PathLike)):
            model_name_or_path, model = model, None
        if batch_size < 1 or top_k < 1:
            raise ConfigError(f"HFJudge needs batch_size >= 1 and top_k >= 1, got {batch_size}, {top_k}")
        if model_name_or_path is not None:
            if model is not None or tokenizer is not None:
                raise ConfigError("HFJudge: pass either (model, tokenizer) or model_name_or_path, not both")
            model, tokenizer = self._load(str(model_name_or_path), device, dtype, revision)
            p = Path(model_name_or_path)
            if p.is_dir():
                self._endpoint = f"local:{p.resolve()}@{_dir_fingerprint(p)}"
            else:
                self._endpoint = f"hub:{model_name_or_path}@{revision or 'main'}"
            if model_id is None:
                model_id = f"{p.resolve()}@{_dir_fingerprint(p)}" if p.is_dir() else str(model_name_or_path)
        elif model is None or tokenizer is None:
            raise ConfigError("HFJudge needs a model and its tokenizer, or model_name_or_path")
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("HFJudge: the judge tokenizer has no chat_template; use an instruct/chat model "
                              "or set tokenizer.chat_template")
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ConfigError("HFJudge: the tokenizer has neither a pad nor an eos token to pad batches with")
            tokenizer.pad_token = tokenizer.eos_token
        model_id = model_id or getattr(model.config, "name_or_path", "") or None
        if not getattr(self, "_endpoint", None):
            self._endpoint = f"in-memory:{model_id}" if model_id else "in-memory"
        if model_id is None and cache not in (None, False):
            log.warning("HFJudge: the model has no name (pass model_id=...); judge caching is disabled")
            cache = None
        super().__init__(cache=cache, scoring=scoring, name=name)
        self.revision = revision
        self.model = model
        self.tokenizer = tokenizer
        self._model_id = model_id or "<unnamed>"
        self.batch_size = batch_size
        self.top_k = top_k
        self._lock = threading.Lock()  # one forward pass at a time, whichever loop/thread asks

    @staticmethod
    def _load(name: str, device: str | None, dtype: Any, revision: str | None = None) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False, revision=revision)
            model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=False, dtype=dtype or "auto",
                                                         revision=revision)
        except OSError as e:
            raise MissingResourceError(f"cannot load the judge model {name!r}: {e}") from e
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return model.to(device).eval(), tokenizer

    # ---- identity ----------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def query_params(self) -> dict[str, Any]:
        template = self.tokenizer.chat_template
        template = template if isinstance(template, str) else repr(template)
        return {
            "backend": "hf",
            "endpoint": self._endpoint,
            "top_k": self.top_k,
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16],
            "dtype": str(getattr(self.model, "dtype", "")),
        }

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "backend": "hf", "revision": self.revision, "batch_size": self.batch_size}

    def __repr__(self) -> str:
        return (f"HFJudge(name={self.name!r}, model_id={self._model_id!r}, batch_size={self.batch_size}, "
                f"top_k={self.top_k})")

    def format_prompt(self, prompt: str) -> str:
        """The judge prompt as the model sees it (chat template, generation prompt added)."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)

    # ---- model work (worker thread) ----------------------------------------------------------
    def next_token_top_logprobs(self, prompts: Sequence[str]) -> list[list[tuple[str, float]]]:
        """Top-``top_k`` (token, logprob) of the next token for each prompt, in one forward pass
        (splitting the batch in halves on out-of-memory)."""
        import torch

        with self._lock:
            try:
                return self._forward(list(prompts))
            except torch.OutOfMemoryError:
                if len(prompts) == 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        half = len(prompts) // 2
        return self.next_token_top_logprobs(prompts[:half]) + self.next_token_top_logprobs(prompts[half:])

    def _forward(self, prompts: list[str]) -> list[list[tuple[str, float]]]:
        import torch

        tok = self.tokenizer
        tok.padding_side = "left"  # set every time: a reloaded tokenizer may not keep it
        enc = tok([self.format_prompt(p) for p in prompts], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        device = getattr(self.model, "device", None) or next(self.model.parameters()).device
        input_ids = enc["input_ids"].to(device)
        mask = enc["attention_mask"].to(device)
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
        with torch.inference_mode():
            try:
                out = self.model(**kwargs, logits_to_keep=1)
            except TypeError:  # an architecture without logits_to_keep
                out = self.model(**kwargs)
            logprobs = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
            top = torch.topk(logprobs, k=min(self.top_k, logprobs.shape[-1]), dim=-1)
        self.stats.sent += len(prompts)
        self.stats.prompt_tokens += int(mask.sum())
        values, ids = top.values.cpu().tolist(), top.indices.cpu().tolist()
        return [[(tok.decode([i]), float(v)) for i, v in zip(row_ids, row_vals)]
                for row_ids, row_vals in zip(ids, values)]

    async def _query(self, requests: Sequence[JudgeRequest], on_result: OnResult) -> None:
        # Longest first, batches of similar length: less padding.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            try:
                outs = await asyncio.to_thread(self.next_token_top_logprobs, [requests[i].prompt for i in idx])
            except Exception as e:  # this batch fails; later batches still run
                for i in idx:
                    on_result(i, RawAnswer(None, error=f"local judge forward failed: {type(e).__name__}: {e}"))
                continue
            for i, pairs in zip(idx, outs):
                on_result(i, RawAnswer(pairs, attempts=1))


def tiny_judge(tiny: Mapping[str, Any] | None = None, **kwargs: Any) -> HFJudge:
    """The embedded offline judge: the tiny random-init model (``tiny``: its ``ModelArgs`` fields, default
    ``{name: tiny, kind: tiny}``) as an :class:`HFJudge`. It exercises the whole judging path; its scores
    are mostly missing. Not a measuring instrument."""
    spec = dict(tiny or {"name": "tiny", "kind": "tiny"})
    try:
        args = ModelArgs(**spec)
    except TypeError as e:
        raise ConfigError(f"judge.tiny: {e}; expected ModelArgs fields such as name, kind, tiny") from None
    kwargs["name"] = kwargs.get("name") or "tiny"
    return HFJudge(model_name_or_path=resolve_model_path(args), **kwargs)
