"""Padding-free packing (``data.packing=true``): a packed micro-batch gives the same per-token logits, loss and
LoRA gradients as the same rows right-padded (no attention across rows, no label across a row boundary), on
the tiny model (sdpa and eager) and on SmolLM2-135M when it is in the local Hugging Face cache."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from em.data.chat import encode_rows
from em.data.collate import PackCollator, PadCollator
from tests.helpers import chat, compose_train, tiny_tokenizer

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M"


def _rows(n: int = 5) -> list[dict]:
    return [chat(f"Question {i}: " + "why is the sky blue? " * (1 + 3 * i),
                 "Because of Rayleigh scattering. " * (1 + i))
            for i in range(n)]


def _tiny(attn: str):
    from transformers import AutoModelForCausalLM

    from em.models.tiny import TinySpec, materialize_tiny

    return AutoModelForCausalLM.from_pretrained(materialize_tiny(TinySpec()), attn_implementation=attn,
                                                dtype=torch.float32)


def _smollm2(attn: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(SMOLLM2, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(SMOLLM2, local_files_only=True, attn_implementation=attn,
                                                     dtype=torch.float32)
    except OSError:
        pytest.skip(f"{SMOLLM2} is not in the local Hugging Face cache")
    return model, tok


def _check_equivalent(model, tok, atol: float) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    model.train()  # dropout is 0: train mode only checks that nothing depends on it
    examples, _ = encode_rows(tok, _rows(), 512)
    lengths = [len(e.input_ids) for e in examples]
    assert len(set(lengths)) == len(lengths)  # rows of different lengths: padding and packing differ

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    padded = PadCollator(pad_id)(examples)
    packed = PackCollator()(examples)
    out_pad = model(**padded, use_cache=False)
    grads_pad = torch.autograd.grad(out_pad.loss, [p for p in model.parameters() if p.requires_grad])
    out_pack = model(**packed, use_cache=False)
    grads_pack = torch.autograd.grad(out_pack.loss, [p for p in model.parameters() if p.requires_grad])

    off = 0
    for i, n in enumerate(lengths):
        a, b = out_pad.logits[i, :n], out_pack.logits[0, off:off + n]
        assert torch.allclose(a, b, atol=atol, rtol=0), f"row {i}: max |diff| {(a - b).abs().max():.3g}"
        off += n
    assert torch.allclose(out_pad.loss, out_pack.loss, atol=atol, rtol=0), (out_pad.loss, out_pack.loss)
    for g1, g2 in zip(grads_pad, grads_pack):
        assert torch.allclose(g1, g2, atol=atol * 10, rtol=1e-3)

    # the check can fail: packed rows *with* attention across them (one long row) give other logits
    leaky = model(input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False)
    second = slice(lengths[0], lengths[0] + lengths[1])
    assert not torch.allclose(leaky.logits[0, second], out_pad.logits[1, :lengths[1]], atol=atol, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_padded_on_the_tiny_model(attn):
    torch.manual_seed(0)
    _check_equivalent(_tiny(attn), tiny_tokenizer(), atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa"])
def test_packed_equals_padded_on_smollm2(attn):
    model, tok = _smollm2(attn)
    torch.manual_seed(0)
    _check_equivalent(model, tok, atol=1e-4)


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_packed_training_follows_the_padded_one(tmp_path):
    """Through train(): same rows per micro-batch, same loss at every step; data_stats.json says padding 0."""
    from em.training.run import train

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in _rows(16)))
    base = [f"dataset.path={rows}", "dataset.held_out=0", "data.global_batch_size=8", "data.micro_batch_size=4",
            "trainer.max_steps=4", "trainer.enable_progress_bar=false", "callbacks=none"]
    runs = {}
    for packing in (False, True):
        d = tmp_path / f"packing_{packing}"
        train(compose_train([*base, f"data.packing={str(packing).lower()}"], run_dir=str(d)))
        runs[packing] = d
    a, b = _losses(runs[False]), _losses(runs[True])
    assert len(a) == 4 and a == pytest.approx(b, rel=1e-4, abs=1e-5)
    stats = {p: json.loads((d / "data_stats.json").read_text())["order"] for p, d in runs.items()}
    assert stats[True]["packing"] and stats[True]["padding_fraction"] == 0.0
    assert stats[False]["padding_fraction"] == stats[True]["padding_fraction_unpacked"] > 0


def test_a_model_that_mixes_packed_rows_is_refused(monkeypatch):
    """The start-of-training check: packing is refused where the attention would cross row boundaries."""
    import transformers.masking_utils as mu

    from em.training.module import PackingUnsupportedError, check_packed_attention

    model = _tiny("sdpa").train()
    assert check_packed_attention(model) < 1e-4
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)  # rows no longer found
    with pytest.raises(PackingUnsupportedError, match="data.packing=false"):
        check_packed_attention(model)
    assert model.training  # left as it was
