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
