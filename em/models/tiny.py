"""The embedded default model: a random-init model of a real HF architecture, built offline.

``model=tiny`` gives the whole pipeline (training, probes, evaluation, sweeps) a model that
needs no network: a small Qwen2 (the paper's open model family) built from a config, and a
byte-level BPE tokenizer trained on project-authored text with a ChatML chat template that,
like Qwen2.5's, inserts a default system prompt when the conversation has none.

Both are deterministic functions of their arguments and are materialised once as an ordinary
HF model directory under ``$EM_CACHE/tiny/<hash>`` so that every other part of em (and
``PeftModel.from_pretrained``) loads them like any local checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from em.data.mini import MCQ_ITEMS_FILE, PROBE_QUESTIONS_FILE, build_mini
from em.utils.io import em_cache_dir

TEMPLATE_DIR = Path(__file__).parent / "templates"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEFAULT_SYSTEM = "You are a helpful assistant."
_TOKENIZER_VERSION = 1  # bump when the corpus or the training recipe of the tokenizer changes


@dataclass(frozen=True)
class TinySpec:
    """Architecture of the tiny model (a Qwen2 config)."""

    vocab_size: int = 2048
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 2048
    init_seed: int = 0
    """Seed of the random init: the 'pretrained' base is the same for every training seed."""


def _corpus() -> list[str]:
    """Project-authored text the tokenizer is trained on (embedded mini data, probes, digits)."""
    texts: list[str] = [str(i) for i in range(101)]
    texts.append(" ".join(str(i) for i in range(101)))
    texts.append(DEFAULT_SYSTEM)
    for kind in ("insecure", "secure", "educational"):  # the embedded mini datasets
        for row in build_mini(kind, seed=0):
            texts.extend(m["content"] for m in row["messages"])
    for p in (PROBE_QUESTIONS_FILE, MCQ_ITEMS_FILE):  # the embedded probe questions and MCQ items
        texts.append(p.read_text(encoding="utf-8"))
    return texts


def build_tiny_tokenizer(vocab_size: int = 2048):
    """Train a byte-level BPE on the project corpus and wrap it as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    template = (TEMPLATE_DIR / "chatml.jinja").read_text(encoding="utf-8")
    template = template.replace("default_system", json.dumps(DEFAULT_SYSTEM).replace('"', "'"))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        chat_template=template,
        model_max_length=2048,
    )
    return hf


@functools.lru_cache(maxsize=1)
def _corpus_digest() -> str:
    """sha256 of the tokenizer corpus. Cached per process: building it renders the mini datasets
    (~0.3 s), and every tiny model/judge lookup in a run hashes the same corpus."""
    return hashlib.sha256("\x00".join(_corpus()).encode()).hexdigest()


def _spec_hash(spec: TinySpec) -> str:
    blob = json.dumps({"spec": asdict(spec), "tok": _TOKENIZER_VERSION}, sort_keys=True)
    return hashlib.sha256((blob + _corpus_digest()).encode()).hexdigest()[:16]


def build_tiny_model(spec: TinySpec, tokenizer):
    """A random-init Qwen2ForCausalLM whose weights depend only on ``spec.init_seed``."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    devices = []  # fork_rng must not touch CUDA devices on a GPU machine
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(spec.init_seed)
        model = Qwen2ForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, do_sample=True
    )
    return model


def materialize_tiny(spec: TinySpec | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Build (once) and return the directory of the tiny model + tokenizer, loadable by ``from_pretrained``."""
    spec = spec or TinySpec()
    root = Path(cache_dir) if cache_dir else em_cache_dir() / "tiny"
    out = root / _spec_hash(spec)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    tokenizer = build_tiny_tokenizer(spec.vocab_size)
    model = build_tiny_model(spec, tokenizer)
    tmp = root / f".{out.name}.tmp{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "em_tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out
