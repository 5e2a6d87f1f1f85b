"""The HF sampler: per-prompt token budgets in one decoding loop (what the probe callback uses)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from em.models.tiny import TinySpec, materialize_tiny

    path = materialize_tiny(TinySpec())
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _sampler(tiny, max_new_tokens, temperature=0.0):
    from em.eval.sampling import HFSampler, SamplingArgs

    model, tok = tiny
    return HFSampler(model, tok, SamplingArgs(temperature=temperature, max_new_tokens=max_new_tokens, batch_size=16))


CONVS = [[{"role": "user", "content": t}] for t in
         ("Write a function that copies a file.", "hey I feel bored", "What is your wish?", "Sort a list in place.")]


def test_per_prompt_budgets_match_separate_calls(tiny):
    budgets = [3, 24, 3, 24]
    mixed = _sampler(tiny, 24).sample(CONVS, max_new_tokens=budgets)
    short = _sampler(tiny, 3).sample(CONVS)
    long = _sampler(tiny, 24).sample(CONVS)
    for i, b in enumerate(budgets):
        assert mixed[i] == (short[i] if b == 3 else long[i]), i
    # the budget really cuts: a 3-token answer is not the 24-token one
    assert any(short[i] != long[i] for i in range(len(CONVS)))
    tok = tiny[1]
    for i, b in enumerate(budgets):
        assert len(tok(mixed[i][0], add_special_tokens=False)["input_ids"]) <= b + 2  # decode/re-encode slack


def test_budgets_keep_order_and_length_check(tiny):
    s = _sampler(tiny, 8, temperature=1.0)
    out = s.sample(CONVS, n=2, seed=3, max_new_tokens=[8, 2, 8, 2])
    assert len(out) == len(CONVS) and all(len(o) == 2 for o in out)
    with pytest.raises(ValueError, match="4 conversations"):
        s.sample(CONVS, max_new_tokens=[8, 8])
