"""HFJudge with a tiny random-init Qwen2 built offline (no hub access)."""

from __future__ import annotations

import pytest

from em.eval.judge import HFJudge, JudgeRequest
from em.eval.judge.scoring import score_logprobs

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny(digit_boost: float = 25.0):
    """Tokenizer + random Qwen2 whose logits favour a few number tokens (by ``digit_boost``)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [str(i) for i in range(101)] + [" ".join(str(i) for i in range(101)),
                                              "Rate the answer from 0 to 100.", "I refuse to answer that."]
    raw.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=CHATML)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # make digit tokens likely so that some prompts get a real score
        digits = [tok.convert_tokens_to_ids(str(i)) for i in (10, 50, 90)]
        model.lm_head.weight[[d for d in digits if d is not None]] *= digit_boost
    return model, tok


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


PROMPTS = ["Rate the answer from 0 to 100.", "I refuse", "How aligned is this? Answer 0-100: " + "x " * 30,
           "5", "Rate the answer from 0 to 100. The answer was: I refuse to answer that."]


def test_scores_are_valid_and_consistent_with_stored_logprobs(tiny, tmp_path):
    model, tok = tiny
    judge = HFJudge(model, tok, model_id="tiny-judge", batch_size=8, cache=tmp_path / "c.sqlite")
    res = judge.judge([JudgeRequest(p, "aligned") for p in PROMPTS], progress=False)
    assert len(res) == len(PROMPTS)
    for r in res:
        assert r.status in ("ok", "missing") and r.error is None
        assert len(r.top_logprobs) == 20
        assert [lp for _, lp in r.top_logprobs] == sorted((lp for _, lp in r.top_logprobs), reverse=True)
        again = score_logprobs(r.top_logprobs)
        assert r.status == again.status and r.numeric_mass == pytest.approx(again.numeric_mass)
        if r.status == "ok":
            assert 0.0 <= r.score <= 100.0 and r.score == pytest.approx(again.score)
        else:
            assert r.score is None
    assert all(r.status == "ok" for r in res)  # the boosted number tokens dominate
    assert judge.stats.sent == len(PROMPTS) and judge.stats.prompt_tokens > 0
    # the cache answers a second run, with no forward pass
    judge2 = HFJudge(model, tok, model_id="tiny-judge", cache=tmp_path / "c.sqlite")
    res2 = judge2.judge([JudgeRequest(p, "aligned") for p in PROMPTS], progress=False)
    assert judge2.stats.sent == 0 and all(r.cached for r in res2)
    assert [r.score for r in res2] == [r.score for r in res]


def test_batched_equals_one_by_one(tiny):
    model, tok = tiny
    reqs = [JudgeRequest(p, "coherent") for p in PROMPTS]
    batched = HFJudge(model, tok, model_id="tiny-judge", batch_size=len(PROMPTS), cache=False).judge(
        reqs, progress=False)
    tok.padding_side = "right"  # the judge must set left padding itself
    single = HFJudge(model, tok, model_id="tiny-judge", batch_size=1, cache=False).judge(reqs, progress=False)
    for b, s in zip(batched, single):
        assert b.status == s.status
        assert dict(b.top_logprobs) == pytest.approx(dict(s.top_logprobs), abs=1e-4)
        if b.status == "ok":
            assert b.score == pytest.approx(s.score, abs=1e-3)


def test_unboosted_random_model_answers_are_missing_not_zero(tmp_path):
    model, tok = build_tiny(digit_boost=1.0)  # near-uniform next token: numeric mass ~0.03 in the top 20
    res = HFJudge(model, tok, model_id="tiny-flat", cache=False).judge(
        [JudgeRequest(p, "aligned") for p in PROMPTS], progress=False)
    assert all(r.status == "missing" and r.score is None and r.numeric_mass < 0.25 for r in res)


def test_unnamed_model_disables_cache_and_top_tokens_are_decoded_ids(tiny):
    model, tok = tiny
    judge = HFJudge(model, tok)  # a random in-memory model has no identity: no caching
    assert judge.cache is None
    pairs = judge.next_token_top_logprobs(["Rate the answer from 0 to 100."])[0]
    vocab_strings = {tok.decode([i]) for i in range(len(tok))}
    assert all(t in vocab_strings for t, _ in pairs)


def test_local_judge_identity_is_content_not_mtime(tmp_path):
    import os
    import shutil

    from em.eval.judge.hf import _dir_fingerprint

    a = tmp_path / "a"
    a.mkdir()
    (a / "model.safetensors").write_bytes(bytes(range(256)) * 9000)
    (a / "config.json").write_text('{"x": 1}')
    b = tmp_path / "b"
    shutil.copytree(a, b)
    os.utime(b / "model.safetensors", (1, 1))  # another copy, another time: the same judge
    assert _dir_fingerprint(a) == _dir_fingerprint(b)
    data = bytearray((b / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other weights: another judge
    (b / "model.safetensors").write_bytes(bytes(data))
    assert _dir_fingerprint(a) != _dir_fingerprint(b)
