"""Bad training input gets em's error naming file, line and field before any expensive work (#15.7).

A corpus of malformed files (tests/malformed_corpus.py) through the training path, the named cases of
the issue one by one, and a hypothesis fuzz test over generated JSONL files.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from em.data.chat import encode_rows
from em.data.datamodule import ChatDataModule, DataArgs
from em.data.loading import DatasetArgs
from em.data.schema import DataFileError, validate_chat_file, validate_chat_rows
from em.errors import DataValidationError, EMError, MissingResourceError
from em.models.loading import stop_token_ids
from tests import malformed_corpus as corpus
from tests.helpers import tiny_tokenizer


@lru_cache(maxsize=1)
def _tok():
    return tiny_tokenizer()


def _prepare(path, tmp_path):
    corpus.prepare(path, tmp_path / "cache", tok=_tok())


@pytest.mark.parametrize("case", corpus.CASES, ids=lambda c: c.name)
def test_malformed_corpus_gets_a_clear_error(case, tmp_path, monkeypatch):
    monkeypatch.setenv("EM_CACHE", str(tmp_path / "cache"))
    path = case.build(tmp_path)
    err = None
    try:
        _prepare(path, tmp_path)
    except EMError as e:
        err = e
    # anything else than em's error propagates: a traceback fails the test
    assert corpus.is_clear(case, path, err), f"{case.name}: {err!r}"


def test_corpus_size():
    assert sum(1 for c in corpus.CASES if not c.accept) >= 30


def test_a_directory_or_device_is_refused_before_reading(tmp_path):
    d = tmp_path / "data.jsonl"
    d.mkdir()
    with pytest.raises(DataFileError, match="is a directory"):
        load = ChatDataModule(DatasetArgs(name="d", path=str(d)), DataArgs(), _tok())
        load.load()
    z = tmp_path / "zero.jsonl"
    z.symlink_to("/dev/zero")
    with pytest.raises(DataFileError, match=r"zero.jsonl: is not a regular file \(a character device\)"):
        validate_chat_rows(z)
    f = tmp_path / "fifo.jsonl"
    os.mkfifo(f)  # opening it would block forever
    with pytest.raises(DataFileError, match="a FIFO"):
        validate_chat_rows(f)
    with pytest.raises(MissingResourceError, match="no such file"):
        validate_chat_rows(tmp_path / "nope.jsonl")


def test_em_data_info_refuses_a_device(tmp_path, capsys):
    from em.data.cli import main

    z = tmp_path / "zero.jsonl"
    z.symlink_to("/dev/zero")
    assert main(["info", str(z)]) == 2
    assert "not a regular file" in capsys.readouterr().err


def test_file_and_row_byte_limits_are_configurable(tmp_path):
    row = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 500}]})
    p = tmp_path / "d.jsonl"
    p.write_text(f"{corpus.good_line(0).decode()}\n{row}\n")
    assert len(validate_chat_rows(p)) == 2
    with pytest.raises(DataValidationError, match=rf"{p}:2: row of 5\d\d bytes is over the limit of 200 bytes"):
        validate_chat_rows(p, max_row_bytes=200)
    with pytest.raises(DataFileError, match="over the limit of 100 bytes"):
        validate_chat_rows(p, max_file_bytes=100)
    # the dataset config carries both limits to the training path
    dm = ChatDataModule(DatasetArgs(name="d", path=str(p), max_row_bytes=200), DataArgs(), _tok())
    with pytest.raises(DataValidationError, match=rf"{p}:2:"):
        dm.load()


def test_50_mb_row_is_rejected_with_its_line_not_tokenized(tmp_path):
    path = corpus._big_row(tmp_path)
    with pytest.raises(DataValidationError) as ei:
        validate_chat_rows(path)
    assert [pr.line for pr in ei.value.problems] == [2] and "over the limit" in str(ei.value)


@pytest.mark.parametrize("line, field, text", [
    (b"[" * 50_000 + b"]" * 50_000, None, "nested too deeply"),
    (b'{"messages": [{"role": "user", "content": "q\\ud800"}, {"role": "assistant", "content": "a"}]}',
     "messages[0].content", "lone surrogate"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
     b'"m": {"x": ["\\udc00"]}}',
     "m.x[0]", "lone surrogate"),
    (b'{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}, '
     b'{"role": "assistant", "content": "a"}]}', "messages[0].role", "starts with an assistant turn"),
    (b'{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "hi"}, '
     b'{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}', "messages[1].role",
     "starts with an assistant turn"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, '
     b'{"role": "user", "content": "more"}]}', "messages[2].role", "ends with a user turn"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "x": NaN}', None,
     "NaN is not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "x": '
     + b"1" * 5000 + b"}",
     None, "integer too long"),
])
def test_issue_cases_rejected_at_validation_with_line_and_field(tmp_path, line, field, text):
    p = tmp_path / "d.jsonl"
    p.write_bytes(corpus.good_line(0) + b"\n" + line + b"\n" + corpus.good_line(2) + b"\n")
    with pytest.raises(DataValidationError) as ei:
        validate_chat_rows(p)
    probs = ei.value.problems
    assert len(probs) == 1 and probs[0].line == 2 and probs[0].field == field and text in probs[0].message, probs


def test_prompt_rows_may_end_with_a_user_turn(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                          {"role": "user", "content": "then?"}]}) + "\n")
    assert len(validate_chat_rows(p, require_assistant=False)) == 1


# -- fuzz ---------------------------------------------------------------------------------------------
MAX_ROW = 4096  # a small row limit, so that over-limit rows are cheap to generate

_text = st.text(st.characters(codec="utf-8"), max_size=40)
_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False,
                         allow_infinity=False), _text)
_json_any = st.recursive(_json_scalar, lambda c: st.one_of(st.lists(c, max_size=3),
                                                            st.dictionaries(_text, c, max_size=3)), max_leaves=8)
_role = st.sampled_from(["user", "assistant"])


@st.composite
def good_rows(draw):
    n = draw(st.integers(1, 3))
    msgs = ([{"role": "system", "content": draw(_text)}] if draw(st.booleans()) else [])
    for _ in range(n):
        msgs += [{"role": "user", "content": draw(_text)},
                 {"role": "assistant", "content": draw(st.sampled_from("ab✓答{")) + draw(_text)}]
    extra = draw(st.dictionaries(st.sampled_from(["metadata", "id", "_meta"]), _json_any, max_size=2))
    return json.dumps({"messages": msgs, **extra}, ensure_ascii=draw(st.booleans())).encode()


@st.composite
def bad_rows(draw, good):
    """A line that em must reject, built from a good one."""
    kind = draw(st.sampled_from(["truncate", "garbage", "not_object", "bad_value", "role", "surrogate", "deep",
                                 "order", "too_long", "constant", "bad_utf8"]))
    row = json.loads(good)
    msgs = row["messages"]
    if kind == "truncate":
        return good[:draw(st.integers(0, len(good) - 1))].rstrip(b" }\n") or b"{"
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=64).filter(
            lambda b: b"\n" not in b and b.decode("utf-8", "surrogateescape").strip() and not _parses_as_row(b)))
    if kind == "not_object":
        return json.dumps(draw(st.one_of(_json_scalar, st.lists(_json_any, max_size=3)))).encode()
    if kind == "bad_value":
        i = draw(st.integers(0, len(msgs) - 1))
        key = draw(st.sampled_from(["content", "role", "message", "messages"]))
        bad = draw(st.one_of(st.none(), st.integers(), st.lists(_json_scalar, max_size=2), st.just({})))
        if key == "messages":
            row["messages"] = bad if bad != [] else []
        elif key == "message":
            msgs[i] = bad
        else:
            msgs[i][key] = bad
        return json.dumps(row).encode()
    if kind == "role":
        msgs[draw(st.integers(0, len(msgs) - 1))]["role"] = draw(st.sampled_from(["human", "bot", "tool", "", "USER"]))
        return json.dumps(row).encode()
    if kind == "surrogate":
        s = chr(draw(st.integers(0xD800, 0xDFFF)))
        i = draw(st.integers(0, len(msgs) - 1))
        msgs[i]["content"] = msgs[i]["content"] + s
        return json.dumps(row).encode()  # ensure_ascii: written as a \\udxxx escape
    if kind == "deep":
        depth = draw(st.integers(100, 20_000))
        return json.dumps({"messages": msgs}).encode()[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "order":
        if draw(st.booleans()):
            msgs.append({"role": "user", "content": "and then?"})
        else:
            first = 1 if msgs[0]["role"] == "system" else 0
            msgs.insert(first, {"role": "assistant", "content": "hello"})
        return json.dumps(row).encode()
    if kind == "too_long":
        msgs[-1]["content"] += "x" * MAX_ROW
        return json.dumps(row).encode()
    if kind == "constant":
        constant = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]))
        return json.dumps(row).encode()[:-1] + b', "score": ' + constant + b"}"
    # bad_utf8: a byte that cannot start or continue UTF-8 inside a string
    return good.replace(b'"content": "', b'"content": "\xff', 1)


def _parses_as_row(b: bytes) -> bool:
    try:
        return isinstance(json.loads(b), dict)
    except (ValueError, RecursionError):
        return False


@st.composite
def files(draw):
    lines: list[bytes] = []
    bad: set[int] = set()
    for i in range(draw(st.integers(1, 8))):
        good = draw(good_rows())
        if draw(st.integers(0, 2)) == 0:
            lines.append(draw(bad_rows(good)))
            bad.add(i + 1)
        else:
            lines.append(good)
        if draw(st.integers(0, 6)) == 0:
            lines.append(b"   ")  # a blank line: accepted
    crlf = draw(st.booleans())
    body = b"".join(ln + (b"\r\n" if crlf else b"\n") for ln in lines)
    if draw(st.booleans()):
        body = b"\xef\xbb\xbf" + body  # a BOM at the start: accepted
    # line numbers shift with the blank lines inserted above
    numbered, k = set(), 0
    for j, ln in enumerate(lines, start=1):
        if ln == b"   ":
            continue
        k += 1
        if k in bad:
            numbered.add(j)
    return body, numbered


# bounded inputs (<= 8 rows of small contents, nesting <= 20k): no wall-time deadline on a shared machine;
# no example database written into the checkout
@settings(max_examples=120, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(f=files())
def test_fuzz_training_jsonl(tmp_path_factory, f):
    """Every generated file is accepted, or refused with em's error naming exactly its bad lines."""
    body, bad_lines = f
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_bytes(body)
    tok = _tok()
    try:
        rows = validate_chat_file(path, max_row_bytes=MAX_ROW).rows
    except DataValidationError as e:
        assert bad_lines, f"a valid file was refused: {e}"
        assert {p.line for p in e.problems} == bad_lines, str(e)
        assert all(p.file == str(path) for p in e.problems) and f"{path}:{min(bad_lines)}:" in str(e)
        return
    assert not bad_lines, f"lines {sorted(bad_lines)} were accepted"
    # every accepted row tokenizes and trains (no traceback later in training)
    encs, stats = encode_rows(tok, rows, max_length=4096, stop_ids=stop_token_ids(tok))
    assert stats.rows_kept == len(rows) and all(e.n_trained for e in encs)
