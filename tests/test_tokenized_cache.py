"""The tokenized-dataset cache: changing the tokenizer, template or max length re-tokenizes; nothing else does."""

from __future__ import annotations

import os

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


class _Exec:
    """A pickle that runs code when loaded (the attack of issue #15.1)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_planted_pickle_in_the_cache_is_never_executed(tmp_path, monkeypatch):
    import pickle

    monkeypatch.setenv("EM_CACHE", str(tmp_path / "cache"))
    tok = tiny_tokenizer()
    first = _dm(tok)  # writes the cache entries
    cache = tmp_path / "cache" / "tokenized"
    entries = [p for p in cache.iterdir() if p.is_file()]
    assert entries
    marker = tmp_path / "marker"
    payload = pickle.dumps(_Exec(marker))
    for p in entries:  # overwrite every entry, and plant a .pkl beside each (the old format's name)
        p.write_bytes(payload)
        p.with_suffix(".pkl").write_bytes(payload)
    again = _dm(tok)
    assert not marker.exists(), "a pickle planted in $EM_CACHE/tokenized was executed"
    # the corrupt entries were rebuilt, never trusted: same examples as the first run
    assert [e.input_ids for e in again.train_examples] == [e.input_ids for e in first.train_examples]
    assert [e.labels for e in again.train_examples] == [e.labels for e in first.train_examples]
    # and the rebuilt entries are valid again
    third = _dm(tok)
    assert [e.labels for e in third.train_examples] == [e.labels for e in first.train_examples]


def test_cache_written_before_a_truncating_call_is_still_hit(count_encodes):
    tok = tiny_tokenizer()
    _dm(tok)
    n = count_encodes["n"]
    tok("some text to truncate", truncation=True, max_length=4)  # changes the backend's truncation state
    tok(["a", "bb bb"], padding=True)  # and its padding state
    _dm(tok)
    assert count_encodes["n"] == n


def test_entries_are_checked_against_their_hash_and_contents(tmp_path):
    import hashlib
    import json

    from safetensors.numpy import load as st_load
    from safetensors.numpy import save as st_save

    from em.data import tokenized_cache as tc
    from em.data.chat import encode_rows
    from tests.helpers import chat

    tok = tiny_tokenizer()
    value = encode_rows(tok, [chat("q", "an answer"), chat("question two", "another answer")], max_length=64)
    tc.save("k", value, tmp_path)
    examples, stats = tc.load("k", tmp_path, vocab_size=len(tok))
    assert [e.input_ids for e in examples] == [e.input_ids for e in value[0]]
    assert [e.labels for e in examples] == [e.labels for e in value[0]]
    assert stats.describe() == value[1].describe()
    assert tc.load("other-key", tmp_path) is None
    good_blob, good_meta = tc.cache_path("k", tmp_path).read_bytes(), tc.meta_path("k", tmp_path).read_text()

    # a tensor file edited behind the side file's back: hash mismatch -> a miss
    arrays = st_load(good_blob)
    arrays["labels"][:] = arrays["input_ids"]  # "train on the prompt too"
    tc.cache_path("k", tmp_path).write_bytes(st_save(arrays))
    assert tc.load("k", tmp_path) is None
    # the side file re-vouched for it (a foreign writer): hash ok, but an id outside the vocabulary -> a miss
    arrays["input_ids"][0] = len(tok) + 5
    arrays["labels"][0] = -100
    blob = st_save(arrays)
    meta = json.loads(good_meta)
    meta.update(tensors_sha256=hashlib.sha256(blob).hexdigest(), tensors_bytes=len(blob))
    tc.cache_path("k", tmp_path).write_bytes(blob)
    tc.meta_path("k", tmp_path).write_text(json.dumps(meta))
    assert tc.load("k", tmp_path, vocab_size=len(tok)) is None
    # a truncated tensor file, a side file that is not JSON, a tensor file that is a FIFO: misses, no hang
    tc.cache_path("k", tmp_path).write_bytes(good_blob[:-10])
    tc.meta_path("k", tmp_path).write_text(good_meta)
    assert tc.load("k", tmp_path) is None
    tc.meta_path("k", tmp_path).write_bytes(b"\x80\x04garbage")
    assert tc.load("k", tmp_path) is None
    tc.meta_path("k", tmp_path).write_text(good_meta)
    tc.cache_path("k", tmp_path).unlink()
    os.mkfifo(tc.cache_path("k", tmp_path))
    assert tc.load("k", tmp_path) is None
