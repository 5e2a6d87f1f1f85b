"""Sampling backends behind one interface: HF transformers (always) and vLLM (optional, GPU).

Both take chat conversations (lists of messages), render them with the model's own chat template
and return ``n`` answers per conversation. The paper samples at temperature 1, top_p 1.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from em.errors import ConfigError
from em.models.loading import load_model, load_tokenizer, resolve_model_path, stop_token_ids
from em.utils.modes import eval_mode

log = logging.getLogger(__name__)


@dataclass
class SamplingArgs:
    """What ``eval.sampling`` describes (the paper: temperature 1, top_p 1, 600 new tokens)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 600
    batch_size: int = 16
    """Prompts per ``generate`` call (HF backend)."""
    seed: int | None = None
    """Sampling seed; null = the run's top-level ``seed`` (what ``eval.py seed=N`` and every sweep job set)."""
    backend: str = "auto"
    """``hf``, ``vllm``, or ``auto`` (vLLM when installed and a GPU is present)."""


class Sampler(Protocol):
    def sample(self, conversations: Sequence[list[dict]], n: int = 1, progress: bool = True,
               seed: int | None = None, max_new_tokens: Sequence[int] | None = None) -> list[list[str]]:
        """``n`` answers for each conversation, in order (``max_new_tokens``: one budget per conversation). After
        the call, ``last_lengths`` holds each answer's (generated tokens, hit its budget)."""
        ...


@contextlib.contextmanager
def isolated_rng(seed: int):
    """Seeded sampling that leaves the caller's (training) RNG streams untouched."""
    import torch

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class HFSampler:
    """Batched, left-padded ``generate`` with KV cache; works on a PEFT-wrapped or merged model."""

    def __init__(self, model, tokenizer, args: SamplingArgs, stop_ids: Sequence[int] | None = None,
                 synced_gpus: bool = False):
        self.model = model
        # With sharded weights (ZeRO-3 / FSDP) every forward is collective: ranks must keep stepping
        # together until all are done (transformers' synced_gpus), else generate() hangs.
        self.synced_gpus = synced_gpus
        self.tokenizer = tokenizer
        self.args = args
        if stop_ids is None:
            stop_ids = sorted(stop_token_ids(tokenizer, model))
        self.stop_ids = list(stop_ids)
        self.tokens_generated = 0
        """New tokens generated so far (each answer up to and including its stop token, at most its budget)."""
        self.last_lengths: list[list[tuple[int, bool]]] = []
        """Per conversation of the last :meth:`sample` call, per answer: (tokens generated up to and including the
        stop token, whether the answer hit its token budget without stopping)."""

    def render(self, conv: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)

    def sample(self, conversations, n: int = 1, progress: bool = True, seed: int | None = None,
               max_new_tokens: Sequence[int] | None = None) -> list[list[str]]:
        """``n`` answers per conversation. ``max_new_tokens`` (one per conversation) lets prompts with
        different budgets share one decoding loop: a batch decodes to its largest budget and each answer
        is cut at its own, which is the same distribution as decoding it alone with that limit (the
        tokens up to the cut are drawn identically; only the longer tail is discarded)."""
        from tqdm.auto import tqdm

        tok, a = self.tokenizer, self.args
        # transformers 5 reloads a saved tokenizer without its padding side: set it for every call.
        tok.padding_side = "left"
        if max_new_tokens is not None and len(max_new_tokens) != len(conversations):
            raise ValueError(f"max_new_tokens has {len(max_new_tokens)} entries for {len(conversations)} conversations")
        budgets = [int(b) for b in (max_new_tokens or [a.max_new_tokens] * len(conversations)) for _ in range(n)]
        prompts = [self.render(c) for c in conversations for _ in range(n)]
        # prompts of similar budgets share batches (stable order within a budget), answers go back in place
        order = sorted(range(len(prompts)), key=lambda j: budgets[j])
        outs: list[str] = [""] * len(prompts)
        lengths: list[tuple[int, bool]] = [(0, False)] * len(prompts)
        device = next(self.model.parameters()).device
        bar = tqdm(total=len(prompts), desc="sampling", unit="answer", disable=not progress, leave=False)
        with eval_mode(self.model, use_cache=True), isolated_rng(seed if seed is not None else (a.seed or 0)):

            for i in range(0, len(order), a.batch_size):
                idx = order[i: i + a.batch_size]
                chunk = [prompts[j] for j in idx]
                enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                do_sample = a.temperature > 0
                gen = self.model.generate(
                    **enc,
                    max_new_tokens=max(budgets[j] for j in idx),
                    do_sample=do_sample,
                    temperature=a.temperature if do_sample else None,
                    top_p=a.top_p if do_sample else None,
                    top_k=0 if do_sample else None,
                    eos_token_id=self.stop_ids,
                    pad_token_id=tok.pad_token_id,
                    use_cache=True,
                    synced_gpus=self.synced_gpus,
                )
                new = gen[:, enc["input_ids"].shape[1]:]
                for row, j in enumerate(idx):
                    ids = new[row, :budgets[j]].tolist()
                    stop = next((k for k, t in enumerate(ids) if t in self.stop_ids), None)
                    n_gen = len(ids) if stop is None else stop + 1
                    self.tokens_generated += n_gen
                    lengths[j] = (n_gen, stop is None and len(ids) >= budgets[j])
                    outs[j] = tok.decode(new[row, :budgets[j]], skip_special_tokens=True)
                bar.update(len(chunk))
        bar.close()
        self.last_lengths = [lengths[j * n:(j + 1) * n] for j in range(len(conversations))]
        return [outs[j * n:(j + 1) * n] for j in range(len(conversations))]


class VLLMSampler:
    """vLLM backend (``pip install 'em[vllm]'``, GPU): the base model with the LoRA adapter as a LoRARequest."""

    def __init__(self, model_path: str, tokenizer, args: SamplingArgs, adapter_path: str | None = None,
                 max_lora_rank: int = 64, **llm_kwargs):
        from vllm import LLM  # import error is the gate

        self.llm = LLM(model=model_path, enable_lora=adapter_path is not None, max_lora_rank=max_lora_rank,
                       seed=args.seed or 0, trust_remote_code=False, **llm_kwargs)
        self.tokenizer = tokenizer
        self.args = args
        self.adapter_path = adapter_path
        self.tokens_generated = 0
        self.last_lengths: list[list[tuple[int, bool]]] = []

    def sample(self, conversations, n: int = 1, progress: bool = True, seed: int | None = None,
               max_new_tokens: Sequence[int] | None = None) -> list[list[str]]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        a = self.args
        budgets = list(max_new_tokens or [a.max_new_tokens] * len(conversations))
        # one SamplingParams per prompt (vLLM accepts a list) so each keeps its own token budget
        # (and its own seed: one shared per-request seed would give every prompt the same random stream)
        base = seed if seed is not None else (a.seed or 0)
        params = [SamplingParams(n=n, temperature=a.temperature, top_p=a.top_p, max_tokens=int(b), seed=base + i)
                  for i, b in enumerate(budgets)]
        prompts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                   for c in conversations]
        lora = LoRARequest("adapter", 1, self.adapter_path) if self.adapter_path else None
        results = self.llm.generate(prompts, params, lora_request=lora, use_tqdm=progress)
        self.tokens_generated += sum(len(o.token_ids) for r in results for o in r.outputs)
        self.last_lengths = [[(len(o.token_ids), o.finish_reason == "length") for o in r.outputs] for r in results]
        return [[o.text for o in r.outputs] for r in results]


def vllm_available() -> bool:
    import importlib.util

    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def load_eval_model(model_args, adapter_path: str | None = None, merge: bool = False):
    """Base model (+ PEFT adapter, optionally merged) and tokenizer for sampling."""
    path = resolve_model_path(model_args)
    tokenizer = load_tokenizer(model_args, path)
    model = load_model(model_args, path)
    if adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path)
        if merge:
            model = model.merge_and_unload()
    import torch

    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    return model, tokenizer, path


def build_sampler(model_args, args: SamplingArgs, adapter_path: str | None = None):
    """The configured backend; ``auto`` prefers vLLM on a GPU when installed."""
    backend = args.backend
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
    if backend == "vllm":
        path = resolve_model_path(model_args)
        return VLLMSampler(path, load_tokenizer(model_args, path), args, adapter_path)
    if backend != "hf":
        raise ConfigError(f"eval.sampling.backend={backend!r}: expected hf, vllm or auto")
    model, tok, _ = load_eval_model(model_args, adapter_path)
    return HFSampler(model, tok, args)
