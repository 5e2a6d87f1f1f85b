"""Load any HF causal LM (hub id or local path) with its own tokenizer and chat template.

Errors are turned into messages that say what is missing and how to provide it, instead of a
stack trace from deep inside ``huggingface_hub``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from em.errors import ConfigError, MissingResourceError
from em.models.fetch import fetched_model_dir
from em.models.tiny import TinySpec, materialize_tiny

log = logging.getLogger(__name__)

#: ``model.cross_entropy`` choices (implemented in em/training/loss.py)
CROSS_ENTROPY_CHOICES = ("chunked", "plain", "liger")

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


@dataclass
class ModelArgs:
    """What ``conf/model/*.yaml`` describes."""

    name: str | None = MISSING
    """Short name used in run names and reports (``qwen``, ``tiny``; ``model=hf``: the hub id or path)."""
    name_or_path: str | None = None
    """HF hub id (``Qwen/Qwen2.5-Coder-32B-Instruct``) or a local directory; None for ``kind=tiny`` or
    ``fetched``."""
    kind: str = "hf"
    """``hf`` (hub id / local path) or ``tiny`` (built offline from ``tiny`` spec)."""
    revision: str | None = None
    """Pinned hub revision (commit sha) for reproducibility."""
    dtype: str = "auto"
    """``auto`` = bf16 on a GPU that supports it, else fp32 (bf16 is ~25x slower on CPUs without it)."""
    attn_implementation: str | None = None
    """``sdpa`` / ``flash_attention_2`` / ``eager``; None lets transformers choose."""
    trust_remote_code: bool = False
    """Off unless asked: remote code runs arbitrary Python from the hub."""
    chat_template: str | None = None
    """Override the tokenizer's chat template (a Jinja string or a path to a .jinja file)."""
    gradient_checkpointing: bool = False
    cross_entropy: str = "chunked"
    """How the training loss is computed (em/training/loss.py). ``chunked``: the LM head and cross-entropy fused
    over the trained positions only, a chunk at a time, never holding the (batch, seq, vocab) logits (pure torch,
    any device; equals ``plain`` to fp tolerance); ``plain``: the model's own forward with labels (full logits);
    ``liger``: liger-kernel's fused Triton kernel (CUDA only, ``pip install 'em[liger]'``). Under ZeRO-3 / FSDP
    ``chunked`` and ``liger`` fall back to ``plain``."""
    tiny: dict[str, Any] = field(default_factory=dict)
    """TinySpec fields for ``kind=tiny`` (em.models.tiny.TinySpec)."""
    fetched: str | None = None
    """A model em fetches itself (``em models fetch <name>``, :data:`em.models.fetch.REGISTRY`): used when
    ``name_or_path`` is null; when it is not fetched yet, the error names the command to run."""

    def __post_init__(self) -> None:
        if self.kind not in ("hf", "tiny"):
            raise ConfigError(f"model.kind={self.kind!r}: expected 'hf' or 'tiny'")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype={self.dtype!r} is not one of auto, {', '.join(DTYPES)}")
        if self.cross_entropy not in CROSS_ENTROPY_CHOICES:
            raise ConfigError(f"model.cross_entropy={self.cross_entropy!r}: expected one of "
                              f"{', '.join(CROSS_ENTROPY_CHOICES)}")
        if self.kind == "hf" and not (self.name_or_path or self.fetched):
            raise ConfigError(f"model '{self.name}': set model.name_or_path to a hub id or a local directory")


def resolve_dtype(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not one of auto, {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off for this process (``HF_HUB_OFFLINE=1``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout_s: float = 3.0) -> tuple[bool, str]:
    """One quick TCP connect to the hub endpoint (``HF_ENDPOINT``), instead of minutes of download retries."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True, f"{url.scheme}://{host}:{port}"
    except OSError as err:
        return False, f"{url.scheme}://{host}:{port} ({err.strerror or type(err).__name__})"


def _missing_model_message(args: ModelArgs, why: str) -> str:
    hub_id = args.name_or_path
    hf_home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    offline_tip = "" if hub_offline() else ("  (on a machine without network, set HF_HUB_OFFLINE=1 to fail at once "
                                            "instead of trying the hub)\n")
    return (
        f"Could not load model '{args.name}' ({hub_id}): it is not a local directory and not in the Hugging Face "
        f"cache ({hf_home}/hub); {why}.\n"
        f"Provide it in one of these ways:\n"
        f"  1. download it where there is network:  huggingface-cli download {hub_id}"
        f"{' --revision ' + args.revision if args.revision else ''}  (then copy the HF cache and set HF_HOME)\n"
        f"  2. point em at a local copy:  model.name_or_path=/path/to/{Path(str(hub_id)).name}\n"
        f"  3. run offline with the embedded tiny model:  model=tiny\n{offline_tip}"
    )


def check_hub_model(args: ModelArgs) -> None:
    """Fail fast, saying why, when a hub model is not in the local cache and cannot be downloaded now."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(str(args.name_or_path), "config.json", revision=args.revision), str):
        return  # cached
    if hub_offline():
        raise MissingResourceError(_missing_model_message(
            args, "the hub is switched off on this machine (HF_HUB_OFFLINE=1), so nothing is downloaded"))
    ok, where = hub_reachable()
    if not ok:
        raise MissingResourceError(_missing_model_message(args, f"the hub could not be reached: {where}"))


def resolve_model_path(args: ModelArgs) -> str:
    """The directory or hub id to load from; materialises the tiny model when ``kind=tiny``."""
    if args.kind == "tiny":
        return str(materialize_tiny(TinySpec(**args.tiny)))
    if args.kind != "hf":
        raise ConfigError(f"model.kind={args.kind!r}: expected 'hf' or 'tiny'")
    if not args.name_or_path and args.fetched:
        return str(fetched_model_dir(args.fetched))
    if not args.name_or_path:
        raise ConfigError(f"model '{args.name}': set model.name_or_path to a hub id or a local directory")
    p = Path(os.path.expanduser(args.name_or_path))
    if p.exists():
        if not (p / "config.json").exists():
            raise MissingResourceError(f"model.name_or_path={p} exists but has no config.json: "
                                       "is it an HF model directory?")
        return str(p)
    if args.name_or_path.startswith(("/", "./", "../", "~")):
        raise MissingResourceError(f"model.name_or_path={args.name_or_path}: no such directory")
    check_hub_model(args)
    return args.name_or_path


def load_tokenizer(args: ModelArgs, path: str | None = None):
    from transformers import AutoTokenizer

    path = path or resolve_model_path(args)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=args.revision, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as err:
        raise MissingResourceError(_missing_model_message(args, f"loading it failed: {_first_line(err)}")) from err
    if args.chat_template:
        t = args.chat_template
        tok.chat_template = Path(t).read_text(encoding="utf-8") if t.endswith(".jinja") else t
    if not getattr(tok, "chat_template", None):
        raise ConfigError(
            f"model '{args.name}' has no chat template; em renders data with the model's own template. "
            f"Set model.chat_template=/path/to/template.jinja (e.g. for a base model)."
        )
    if tok.pad_token_id is None:
        # Safe because labels are built at data preparation, never from `input_ids != pad`.
        tok.pad_token = tok.eos_token
        log.info("tokenizer has no pad token: using eos %r for padding (labels are unaffected)", tok.eos_token)
    return tok


def load_model(args: ModelArgs, path: str | None = None, dtype=None):
    from transformers import AutoModelForCausalLM

    path = path or resolve_model_path(args)
    kwargs: dict[str, Any] = dict(
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        dtype=dtype if dtype is not None else resolve_dtype(args.dtype),
    )
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise MissingResourceError(_missing_model_message(args, f"loading it failed: {_first_line(err)}")) from err
    if args.gradient_checkpointing:
        # Non-reentrant checkpointing back-propagates through frozen inputs (LoRA on a frozen base) without
        # the enable_input_require_grads hook: https://github.com/huggingface/transformers/issues/21381 and
        # https://github.com/huggingface/transformers/issues/26221. Keep while torch's reentrant variant is
        # the one that needs grad-requiring inputs. ZeRO-3 needs reentrant: see em/training/sharded.py.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def checkpointing_enabled(model) -> bool:
    """Whether activation (gradient) checkpointing is on (transformers 5 renamed the property)."""
    on = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if on is None else on)


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """Token ids that end an assistant turn: eos, generation-config eos, and known end-of-turn tokens."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None) if model is not None else None
    eos = getattr(gen, "eos_token_id", None)
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    vocab = tokenizer.get_vocab()
    for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>", "<|end_of_text|>"):
        if t in vocab and t in (tokenizer.all_special_tokens + list(getattr(tokenizer, "added_tokens_encoder", {}))):
            ids.add(int(vocab[t]))
    return ids
