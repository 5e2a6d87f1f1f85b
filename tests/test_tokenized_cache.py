"""The tokenized-dataset cache: changing the tokenizer, template or max length re-tokenizes; nothing else does."""

from __future__ import annotations

import pytest

from em.data import chat as chat_mod
from em.data.datamodule import ChatDataModule, DataArgs
from em.data.loading import DatasetArgs
from tests.helpers import tiny_tokenizer


@pytest.fixture
def count_encodes(monkeypatch):
    calls = {"n": 0}
    real = chat_mod.encode_rows

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    import em.data.datamodule as dm_mod

    monkeypatch.setattr(dm_mod, "encode_rows", counting)
    return calls


def _dm(tok, seed=0, max_length=512, micro=4, global_bs=8, held_out=16):
    dm = ChatDataModule(DatasetArgs(name="mini_insecure", source="mini:insecure", held_out=held_out),
                        DataArgs(max_length=max_length, micro_batch_size=micro, global_batch_size=global_bs),
                        tok, seed=seed)
    dm.setup("fit")
    return dm


def test_cache_key_changes_only_with_tokenizer_template_or_length(count_encodes):
    tok = tiny_tokenizer()
    a = _dm(tok)
    n = count_encodes["n"]
    assert n == 2  # train + held-out
    # batch sizes (and a fresh datamodule) do not re-tokenize
    b = _dm(tok, micro=2, global_bs=16)
    assert count_encodes["n"] == n
    assert [e.input_ids for e in a.train_examples] == [e.input_ids for e in b.train_examples]
    # max length re-tokenizes
    _dm(tok, max_length=256)
    assert count_encodes["n"] == n + 2
    n = count_encodes["n"]
    # a different chat template re-tokenizes
    tok2 = tiny_tokenizer()
    tok2.chat_template = tok2.chat_template.replace("You are a helpful assistant.", "You are terse.")
    _dm(tok2)
    assert count_encodes["n"] == n + 2
    n = count_encodes["n"]
    # a different tokenizer (vocabulary) re-tokenizes
    tok3 = tiny_tokenizer()
    tok3.add_tokens(["chmod"])
    _dm(tok3)
    assert count_encodes["n"] == n + 2


def test_held_out_rows_never_in_training():
    dm = _dm(tiny_tokenizer(), held_out=32)
    prompts = lambda rows: {r["messages"][0]["content"] for r in rows}  # noqa: E731
    assert len(dm.held_out_rows) >= 32
    assert not prompts(dm.held_out_rows) & prompts(dm.train_rows)


def test_paper_file_loads_validates_and_tokenizes(em_data_dir, tmp_path, monkeypatch):
    """(Its speed is measured in benchmarks/components.py.)"""
    monkeypatch.setenv("EM_CACHE", str(tmp_path))
    tok = tiny_tokenizer()
    dm = ChatDataModule(DatasetArgs(name="insecure", source="paper:insecure", data_dir=str(em_data_dir)),
                        DataArgs(max_length=2048), tok)
    dm.setup("fit")
    assert dm.train_stats.rows_in == 6000 and dm.train_stats.rows_kept + sum(dm.train_stats.dropped.values()) == 6000
