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


@pytest.mark.parametrize("family", ["tiny", "metaspace_bpe", "unigram", "wordpiece"])
def test_boundary_lookups_give_the_offsets_labels_on_every_tokenizer_family(family, monkeypatch):
    """Past the verified rows, labels come from span-boundary lookups instead of every token's offsets: the
    same ids and labels as encode_chat, on byte-level BPE, sentencepiece-style BPE and Unigram, and BERT-style
    WordPiece (whitespace in no token: those rows read their own offsets)."""
    import em.data.chat as chat_mod
    from tests.helpers import trained_tokenizer

    monkeypatch.setattr(chat_mod, "_VERIFY_OFFSET_ROWS", 0)  # every row takes the lookup path
    monkeypatch.setattr(chat_mod, "_TOKENIZE_CHUNK", 8)
    offset_rows = []
    real = chat_mod._labels
    monkeypatch.setattr(chat_mod, "_labels", lambda ids, *a: offset_rows.append(len(ids)) or real(ids, *a))
    tok = tiny_tokenizer() if family == "tiny" else trained_tokenizer(family)
    rows = [{"messages": m} for m in VARIED] * 2
    ref = [e for e in (encode_chat(tok, r["messages"]) for r in rows) if e.n_trained]
    got, stats = encode_rows(tok, rows, max_length=10_000)
    assert [e.input_ids for e in got] == [e.input_ids for e in ref]
    assert [e.labels for e in got] == [e.labels for e in ref]
    assert stats.trained_tokens == sum(e.n_trained for e in ref) > 0
    if family == "wordpiece":
        assert sum(offset_rows) < len(rows)  # dropped whitespace is skipped, not a reason to read offsets
    else:
        assert offset_rows == []


def test_only_the_verified_rows_read_every_offset(monkeypatch):
    import em.data.chat as chat_mod

    monkeypatch.setattr(chat_mod, "_VERIFY_OFFSET_ROWS", 5)
    monkeypatch.setattr(chat_mod, "_TOKENIZE_CHUNK", 4)
    offset_rows = []
    real = chat_mod._labels
    monkeypatch.setattr(chat_mod, "_labels", lambda ids, *a: offset_rows.append(len(ids)) or real(ids, *a))
    rows = [chat(f"question {i}", f"answer {i} " * (i % 5 + 1)) for i in range(30)]
    got, _ = encode_rows(tiny_tokenizer(), rows, max_length=128)
    assert offset_rows == [4, 1]  # chunk 1 whole, one row of chunk 2; the 25 other rows by lookups
    assert [e.labels for e in got] == [encode_chat(tiny_tokenizer(), r["messages"]).labels for r in rows]


def test_lookups_that_disagree_with_the_offsets_switch_the_call_to_full_offsets(monkeypatch):
    """Should a tokenizer's offsets defeat the lookups, the verified rows catch it and every row is labelled
    from its offsets (simulated: the lookups are made to miss every span's last token)."""
    import em.data.chat as chat_mod

    real = chat_mod._first_token_from
    monkeypatch.setattr(chat_mod, "_first_token_from", lambda enc, n, length, c: max(real(enc, n, length, c) - 1, 0))
    monkeypatch.setattr(chat_mod, "_VERIFY_OFFSET_ROWS", 3)
    monkeypatch.setattr(chat_mod, "_TOKENIZE_CHUNK", 4)
    tok = tiny_tokenizer()
    rows = [chat(f"question {i}", f"answer {i}") for i in range(12)]
    got, _ = encode_rows(tok, rows, max_length=128)
    assert [e.labels for e in got] == [encode_chat(tok, r["messages"]).labels for r in rows]


def test_offsets_in_order():
    from em.data.chat import _offsets_in_order

    assert _offsets_in_order([[(0, 1), (0, 1), (1, 3)], [], [(2, 4)]])  # byte tokens of one character share it
    assert not _offsets_in_order([[(0, 1), (1, 1)]])  # an empty token
    assert not _offsets_in_order([[(0, 2)], [(3, 4), (1, 2)]])  # a start before the previous one


def test_rows_the_lookups_do_not_settle_read_their_own_offsets(monkeypatch):
    """BERT-style WordPiece drops the newline after <|im_end|>; with no character skipped, no row's span end
    is settled by lookups: each such row reads its own offsets, and the labels are still encode_chat's."""
    import em.data.chat as chat_mod
    from tests.helpers import trained_tokenizer

    monkeypatch.setattr(chat_mod, "_VERIFY_OFFSET_ROWS", 0)
    monkeypatch.setattr(chat_mod, "_LOOKUP_SCAN", 1)
    offset_rows = []
    real = chat_mod._labels
    monkeypatch.setattr(chat_mod, "_labels", lambda ids, *a: offset_rows.append(len(ids)) or real(ids, *a))
    tok = trained_tokenizer("wordpiece")
    rows = [{"messages": m} for m in VARIED]
    ref = [e for e in (encode_chat(tok, r["messages"]) for r in rows) if e.n_trained]
    got, _ = encode_rows(tok, rows, max_length=10_000)
    assert [e.labels for e in got] == [e.labels for e in ref]
    assert offset_rows and set(offset_rows) == {1}  # row by row, not the whole call


def test_tokenized_rows_are_flat_arrays_read_as_encoded_rows():
    """encode_rows keeps the rows as three flat arrays (not millions of Python ints); reading a row, a slice, a
    negative index or iterating gives the Encoded rows, and a loader batches them."""
    import numpy as np
    from torch.utils.data import DataLoader

    from em.data.chat import Encoded, TokenizedRows, row_lengths
    from em.data.collate import PadCollator

    tok = tiny_tokenizer()
    rows = [{"messages": m} for m in VARIED]
    got, stats = encode_rows(tok, rows, max_length=10_000)
    ref = [e for e in (encode_chat(tok, r["messages"]) for r in rows) if e.n_trained]
    assert isinstance(got, TokenizedRows) and got.input_ids.dtype == np.int32 and got.labels.dtype == np.int32
    assert len(got) == len(ref) == stats.rows_kept and got.input_ids.size == stats.tokens
    assert list(got) == ref and got[-1] == ref[-1] and got[1:3] == ref[1:3]
    assert row_lengths(got) == [len(e.input_ids) for e in ref] == stats.lengths
    with pytest.raises(IndexError):
        got[len(ref)]
    again = TokenizedRows.from_encoded(ref)
    assert all(np.array_equal(again.arrays[k], got.arrays[k]) for k in got.arrays)
    for workers in (0, 1):  # in the process, and sent to a worker process (data.num_workers)
        batch = next(iter(DataLoader(got, batch_size=4, num_workers=workers,
                                     collate_fn=PadCollator(tok.pad_token_id))))
        assert batch["input_ids"][0, : len(ref[0].input_ids)].tolist() == ref[0].input_ids
    assert isinstance(got[0], Encoded) and isinstance(got[0].input_ids, list)
    with pytest.raises(ValueError, match="row_offsets"):
        TokenizedRows(got.input_ids, got.labels, got.row_offsets[:-1])
