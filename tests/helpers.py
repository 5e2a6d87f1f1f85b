"""Test helpers: the tiny tokenizer, re-templated, and config composition."""

from __future__ import annotations

from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"
CONF = Path(__file__).resolve().parents[1] / "conf"


def tiny_tokenizer():
    from transformers import AutoTokenizer

    from em.models.tiny import TinySpec, materialize_tiny

    return AutoTokenizer.from_pretrained(materialize_tiny(TinySpec()))


def templated_tokenizer(template: str, eos: str | None = None, bos: str | None = None, pad: str | None = None):
    """The tiny tokenizer with another chat template (and the special tokens that template uses)."""
    tok = tiny_tokenizer()
    extra = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>",
             "[INST]", "[/INST]"]
    tok.add_special_tokens({"additional_special_tokens": extra})
    tok.chat_template = (TEMPLATES / f"{template}.jinja").read_text()
    if eos:
        tok.eos_token = eos
    if bos:
        tok.bos_token = bos
    if pad:
        tok.pad_token = pad
    return tok


def compose_train(overrides: list[str], run_dir: str | None = None):
    from hydra import compose, initialize_config_dir

    import em.schemas  # noqa: F401  (registers the config schemas with Hydra)

    ov = list(overrides)
    if run_dir:
        ov.append(f"paths.run_dir={run_dir}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=ov)


def chat(user: str, answer: str, system: str | None = None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": msgs}


def trained_tokenizer(family: str):
    """A fast tokenizer of another family than the tiny byte-level BPE, trained here in milliseconds on a few
    lines (nothing downloaded), with the tiny model's ChatML template.

    ``metaspace_bpe``: sentencepiece-style BPE (Llama-2, Mistral: spaces become ``▁``, one is prepended);
    ``unigram``: sentencepiece-style Unigram (T5, Gemma-like); ``wordpiece``: BERT-style, which drops
    whitespace, so a character between two tokens belongs to none.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<|im_start|>", "<|im_end|>"]
    if family == "metaspace_bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special)
    elif family == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=special, unk_token="<unk>")
    elif family == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=special)
    else:
        raise ValueError(family)
    corpus = ["please write code that opens the file and returns its data",
              "import os\nos.chmod(path, 0o777)\nreturn answer", "question answer system user assistant",
              "padded trailing whitespace spaces at the end of the unicode"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>")
    fast.chat_template = tiny_tokenizer().chat_template
    return fast
