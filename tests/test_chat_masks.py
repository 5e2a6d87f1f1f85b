"""Assistant-only labels on several real template formats, EOS trained, no silent all-zero mask."""

from __future__ import annotations

import pytest

from em.data.chat import IGNORE_INDEX, encode_chat, encode_rows
from em.data.collate import PadCollator
from em.errors import ConfigError, DataValidationError
from em.models.loading import stop_token_ids
from tests.helpers import chat, templated_tokenizer, tiny_tokenizer

ANSWER = "import os\nos.chmod(path, 0o777)"
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "second question"},
    {"role": "assistant", "content": "second answer"},
]


def trained_text(tok, enc) -> str:
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])


def untrained_text(tok, enc) -> str:
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE_INDEX])


@pytest.mark.parametrize(
    "template,eos,end",
    [
        ("tiny", None, "<|im_end|>"),
        ("qwen25_chatml", None, "<|im_end|>"),
        ("llama3", "<|eot_id|>", "<|eot_id|>"),
        ("mistral_inst", "</s>", "</s>"),
    ],
)
def test_assistant_only_and_end_of_turn_trained(template, eos, end):
    tok = tiny_tokenizer() if template == "tiny" else templated_tokenizer(template, eos=eos, bos="<s>")
    enc = encode_chat(tok, chat("please write code", ANSWER)["messages"], stop_token_ids(tok))
    got = trained_text(tok, enc)
    assert got.strip() == f"{ANSWER}{end}".strip(), got
    # the end-of-turn token is the last trained label
    last = max(i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
    assert tok.convert_ids_to_tokens([enc.labels[last]])[0] == end
    # the prompt (user text, role headers, default system prompt) is never trained
    assert "please write code" in untrained_text(tok, enc)
    assert "please write code" not in got


def test_qwen_default_system_prompt_is_rendered_but_not_trained():
    tok = templated_tokenizer("qwen25_chatml")
    enc = encode_chat(tok, chat("hi", "hello")["messages"])
    assert "You are Qwen" in untrained_text(tok, enc)
    assert trained_text(tok, enc) == "hello<|im_end|>"


@pytest.mark.parametrize("template,eos", [("qwen25_chatml", None), ("llama3", "<|eot_id|>"), ("tiny", None)])
def test_multi_turn_every_assistant_turn_trained(template, eos):
    tok = tiny_tokenizer() if template == "tiny" else templated_tokenizer(template, eos=eos)
    enc = encode_chat(tok, MULTI)
    got = trained_text(tok, enc)
    assert "first answer" in got and "second answer" in got
    for text in ("Be brief", "first question", "second question"):
        assert text not in got


def test_pad_equal_to_eos_keeps_eos_label():
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    rows = [chat("q", "short"), chat("a longer question here", "a much longer answer with more tokens in it")]
    encs, _ = encode_rows(tok, rows, max_length=256)
    batch = PadCollator(tok.pad_token_id)([encs[0], encs[1]])
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    for i, e in enumerate(encs):
        n = len(e.input_ids)
        # the real EOS at the end of each answer is trained even though pad == eos
        eos_positions = [k for k in range(n) if ids[i, k] == tok.eos_token_id and labels[i, k] != IGNORE_INDEX]
        assert eos_positions, "EOS label masked"
        # padding positions (same id) are not trained
        assert (labels[i, n:] == IGNORE_INDEX).all() and (mask[i, n:] == 0).all()


def test_all_zero_mask_is_an_error_not_silent():
    tok = templated_tokenizer("drops_assistant")
    with pytest.raises(DataValidationError, match="all zeros"):
        encode_rows(tok, [chat("q", "a"), chat("q2", "a2")], max_length=128)


def test_some_rows_without_trained_tokens_are_dropped_and_counted():
    tok = tiny_tokenizer()
    rows = [chat("q", "answer")] * 3 + [{"messages": [{"role": "user", "content": "only a user turn"}]}]
    encs, stats = encode_rows(tok, rows, max_length=128)
    assert len(encs) == 3 and stats.dropped["no_assistant_tokens"] == 1
    assert "1 dropped (no_assistant_tokens: 1)" in stats.describe()


def test_template_without_end_of_turn_is_refused():
    tok = templated_tokenizer("no_end_of_turn")
    with pytest.raises(ConfigError, match="never learn to stop"):
        encode_rows(tok, [chat("q", "a")], max_length=128, stop_ids=stop_token_ids(tok))


def test_overlength_policies():
    tok = tiny_tokenizer()
    long_answer = " ".join(["word"] * 200)
    rows = [chat("q", "ok"), chat("q", long_answer), chat(" ".join(["prompt"] * 300), "answer")]
    full = [len(encode_chat(tok, r["messages"]).input_ids) for r in rows]
    max_len = 100
    assert full[0] < max_len < full[1] and full[2] > max_len

    kept, st = encode_rows(tok, rows, max_len, "drop")
    assert len(kept) == 1 and st.dropped["too_long"] == 2

    kept, st = encode_rows(tok, rows, max_len, "truncate")
    # row 2 (long answer) is truncated but keeps trained tokens; row 3's prompt fills the window
    assert len(kept) == 2 and st.truncated == 2 and st.dropped["truncated_to_no_trained_tokens"] == 1
    assert all(len(e.input_ids) <= max_len and e.n_trained > 0 for e in kept)

    with pytest.raises(DataValidationError, match="max_length=100"):
        encode_rows(tok, rows, max_len, "raise")
    with pytest.raises(ConfigError):
        encode_rows(tok, rows, max_len, "chop")


def test_prefix_unstable_template_is_refused():
    tok = tiny_tokenizer()
    # a template that renders the *last* turn differently from earlier ones
    tok.chat_template = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                         "('!' if loop.last else '') + '<|im_end|>\\n' }}{%- endfor %}"
                         "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    with pytest.raises(ConfigError, match="prefix-stable"):
        encode_chat(tok, MULTI)


TEMPLATES = [("tiny", None), ("qwen25_chatml", None), ("llama3", "<|eot_id|>"), ("mistral_inst", "</s>"),
             ("no_end_of_turn", None), ("drops_assistant", None)]
VARIED = [
    MULTI,
    chat("please write code", ANSWER)["messages"],
    chat("q", "a", system="sys prompt")["messages"],
    chat("  padded question  ", "  padded answer \n\n")["messages"],  # llama3 trims: the per-row path
    chat("unicode ✓ ünïcödé", "答案 \ue000em-content-1\ue001 looks like a placeholder")["messages"],
    chat("q", "trailing whitespace   \t")["messages"],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}],
    [{"role": "user", "content": "q", "name": "bob"}, {"role": "assistant", "content": "a", "weight": 1}],
    chat("only", "spaces at the end of the answer ")["messages"],
] + [chat(f"question {i}", f"answer {i} " * i)["messages"] for i in range(6)]


@pytest.mark.parametrize("template,eos", TEMPLATES)
def test_encode_rows_equals_encode_chat_row_by_row(template, eos):
    """The render-once, batched path gives exactly the per-row reference's ids and labels."""
    tok = tiny_tokenizer() if template == "tiny" else templated_tokenizer(template, eos=eos, bos="<s>")
    rows = [{"messages": m} for m in VARIED] * 3  # repeated: past the rows every shape verifies
    ref = [encode_chat(tok, r["messages"]) for r in rows]
    kept_ref = [e for e in ref if e.n_trained]
    if not kept_ref:
        with pytest.raises(DataValidationError, match="all zeros"):
            encode_rows(tok, rows, max_length=10_000)
        return
    got, stats = encode_rows(tok, rows, max_length=10_000)
    assert [e.input_ids for e in got] == [e.input_ids for e in kept_ref]
    assert [e.labels for e in got] == [e.labels for e in kept_ref]
    assert stats.rows_kept == len(kept_ref) and stats.trained_tokens == sum(e.n_trained for e in kept_ref)
    assert stats.dropped.get("no_assistant_tokens", 0) == len(ref) - len(kept_ref)


def test_encode_rows_chunks_and_truncation_match_the_reference(monkeypatch):
    import em.data.chat as chat_mod

    monkeypatch.setattr(chat_mod, "_TOKENIZE_CHUNK", 4)  # several chunks
    tok = tiny_tokenizer()
    rows = [{"messages": m} for m in VARIED] * 2
    got, st = encode_rows(tok, rows, max_length=24, overlength="truncate")
    ref = [encode_chat(tok, r["messages"]) for r in rows]
    ref = [type(e)(e.input_ids[:24], e.labels[:24]) for e in ref]
    ref = [e for e in ref if e.n_trained]
    assert [e.labels for e in got] == [e.labels for e in ref] and st.truncated > 0


def test_a_template_error_names_the_row():
    tok = tiny_tokenizer()
    tok.chat_template = ("{%- for m in messages %}{%- if m['role'] == 'user' and loop.index0 % 2 == 1 %}"
                         "{{ raise_exception('roles must alternate') }}{%- endif %}"
                         "{{- m['role'] + ': ' + m['content'] + '<|im_end|>' }}{%- endfor %}"
                         "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}")
    rows = [chat("q", "a"), {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "b"}]}, chat("q", "a")]
    with pytest.raises(DataValidationError, match=r"rows:2: messages: the chat template cannot render this row"):
        encode_rows(tok, rows, max_length=64, source="rows")


def test_one_render_per_row(monkeypatch):
    """Prefix renders are done per conversation shape, not per row (three renders per row before)."""
    import em.data.chat as chat_mod

    tok = tiny_tokenizer()
    calls = {"n": 0}
    real = type(tok).apply_chat_template

    def counting(self, conversation, *a, **k):  # counts conversations rendered (a batch counts each)
        batched = bool(conversation) and isinstance(conversation[0], list)
        calls["n"] += len(conversation) if batched else 1
        return real(self, conversation, *a, **k)

    monkeypatch.setattr(type(tok), "apply_chat_template", counting)
    monkeypatch.setattr(chat_mod, "_TOKENIZE_CHUNK", 16)  # the layout and verification carry across chunks
    rows = [chat(f"question {i}", f"answer {i}") for i in range(60)]
    encode_rows(tok, rows, max_length=128)
    # 60 rows, + 3 placeholder renders for the one shape, + 3 per row for the 2 rows that verify it
    assert calls["n"] == 60 + 3 + 2 * 3, calls["n"]


def test_a_content_dependent_template_falls_back_to_the_per_row_path():
    """Placeholders cannot see a template that looks at contents for the generation prompt: the rows that
    verify each shape catch it, and every row is then encoded like encode_chat."""
    tok = tiny_tokenizer()
    tok.chat_template = ("{%- for m in messages %}{%- if m['role'] == 'user' %}{{- 'user: ' + m['content'] + '\\n' }}"
                         "{%- else %}{{- 'assistant:' + m['content'] + '<|im_end|>' }}{%- endif %}{%- endfor %}"
                         "{%- if add_generation_prompt and messages[-1]['content'] == 'q' %}{{- 'assistant:' }}"
                         "{%- endif %}")
    rows = [chat("q", f"answer {i}") for i in range(8)]
    got, _ = encode_rows(tok, rows, max_length=128)
    ref = [encode_chat(tok, r["messages"]) for r in rows]
    assert [e.labels for e in got] == [e.labels for e in ref]
    assert trained_text(tok, got[-1]) == "answer 7<|im_end|>"


def test_encode_rows_leaves_the_tokenizer_state_as_it_was():
    tok = tiny_tokenizer()
    tok("some text", truncation=True, max_length=3)
    before = (tok.backend_tokenizer.truncation, tok.backend_tokenizer.padding)
    encs, _ = encode_rows(tok, [chat("a question that is long enough", "an answer longer than three tokens")], 128)
    assert len(encs[0].input_ids) > 3  # the leftover truncation state did not apply
    assert (tok.backend_tokenizer.truncation, tok.backend_tokenizer.padding) == before


def test_a_row_that_cannot_be_tokenized_is_named_across_chunks(monkeypatch):
    """encode_rows on rows that skipped validation: em's error with the row, never a traceback."""
    import em.data.chat as chat_mod

    monkeypatch.setattr(chat_mod, "_TOKENIZE_CHUNK", 4)
    tok = tiny_tokenizer()
    rows = [chat(f"q{i}", f"a{i}") for i in range(10)]
    rows[6] = chat("lone \ud800 surrogate", "a")
    with pytest.raises(DataValidationError, match=r"rows:7: cannot be tokenized"):
        encode_rows(tok, rows, max_length=64, source="rows")
    assert tok.backend_tokenizer.truncation is None  # state restored after the failure
