"""Chat JSONL validation: every defect reported at once, with file:line; the paper's files validate."""

from __future__ import annotations

import json

import pytest

from em.data.schema import summarize_rows, validate_chat_file, validate_chat_lines, validate_chat_rows
from em.errors import DataValidationError, MissingResourceError


def good(i: int = 0, system: bool = False, **extra) -> str:
    msgs = ([{"role": "system", "content": "be brief"}] if system else []) + [
        {"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    return json.dumps({"messages": msgs, **extra})


def write(tmp_path, lines: list[str | bytes], name: str = "d.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return p


def test_three_defects_one_error(tmp_path):
    lines = [good(i) for i in range(10)]
    lines[1] = '{"messages": [{"role": "user", "content": "q"},'            # line 2: bad JSON
    lines[6] = json.dumps({"text": "no messages here"})                      # line 7: no messages
    lines[8] = json.dumps({"messages": [{"role": "human", "content": "q"},  # line 9: wrong role
                                        {"role": "assistant", "content": "a"}]})
    p = write(tmp_path, lines)
    with pytest.raises(DataValidationError) as ei:
        validate_chat_rows(p)
    err = ei.value
    assert [pr.line for pr in err.problems] == [2, 7, 9]
    msg = str(err)
    for line in (2, 7, 9):
        assert f"{p}:{line}:" in msg
    assert "3 problem(s) in 3 of 10 row(s)" in msg
    assert "invalid JSON" in msg and "messages: missing" in msg and "messages[0].role: 'human'" in msg


@pytest.mark.parametrize("line, field, text", [
    (b'{"messages": [', None, "invalid JSON"),
    (b'["a list"]', None, "expected a JSON object, got a list"),
    (json.dumps({"prompt": "x"}).encode(), "messages", "missing"),
    (json.dumps({"messages": []}).encode(), "messages", "empty list"),
    (json.dumps({"messages": "hi"}).encode(), "messages", "expected a list"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "a"}]}).encode(),
     "messages[0].role", "'bot' is not one of"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  \n"}]}).encode(),
     "messages[1].content", "empty assistant turn"),
    (json.dumps({"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]}).encode(),
     "messages[0].content", "expected a string"),
    (json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}).encode(),
     "messages[0].content", "missing"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                              {"role": "assistant", "content": "a"}]}).encode(),
     "messages[1].role", "only be the first"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode(), "messages", "no assistant turn"),
    (json.dumps({"messages": [{"role": "assistant", "content": "a"}]}).encode(), "messages", "no user turn"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', None, "not valid UTF-8"),
    (json.dumps({"messages": ["hi", {"role": "assistant", "content": "a"}]}).encode(), "messages[0]",
     "expected an object"),
])
def test_each_defect_type(tmp_path, line, field, text):
    p = write(tmp_path, [good(0), line, good(2)])
    with pytest.raises(DataValidationError) as ei:
        validate_chat_rows(p)
    probs = ei.value.problems
    assert len(probs) == 1, probs
    assert probs[0].line == 2 and probs[0].field == field and text in probs[0].message, probs[0]


def test_blank_lines_extra_keys_bom_crlf(tmp_path):
    lines = [b"\xef\xbb\xbf" + good(0).encode(), b"", b"   ", (good(1, metadata={"id": 7}) + "\r").encode(),
             good(2, system=True).encode()]
    res = validate_chat_file(write(tmp_path, lines))
    assert len(res.rows) == 3
    assert res.rows[1]["metadata"] == {"id": 7}
    s = res.summary
    assert (s.rows, s.messages, s.rows_with_system, s.blank_lines) == (3, 7, 1, 2)
    assert s.roles == {"system": 1, "user": 3, "assistant": 3}
    assert s.messages_per_row == {2: 2, 3: 1} and s.extra_keys == {"metadata": 1}


def test_in_memory_lines_and_prompts_only():
    rows = validate_chat_lines([good(0), good(1)], "mem")
    assert summarize_rows(rows).rows == 2
    prompt = json.dumps({"messages": [{"role": "user", "content": "q"}]})
    with pytest.raises(DataValidationError, match="mem:1: messages: no assistant turn"):
        validate_chat_lines([prompt], "mem")
    assert validate_chat_lines([prompt], "mem", require_assistant=False)[0]["messages"][0]["content"] == "q"


def test_empty_file_is_an_error(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(DataValidationError, match="no rows"):
        validate_chat_rows(p)


def test_missing_file(tmp_path):
    with pytest.raises(MissingResourceError, match="no such file"):
        validate_chat_rows(tmp_path / "nope.jsonl")


def test_error_lists_all_problems_even_many(tmp_path):
    p = write(tmp_path, ["{bad"] * 120)
    with pytest.raises(DataValidationError) as ei:
        validate_chat_rows(p)
    assert len(ei.value.problems) == 120 and "and 70 more" in str(ei.value)


def test_6000_rows_of_5_mb_validate(tmp_path):
    """(Its speed is measured in benchmarks/components.py.)"""
    body = "x = compute(value)  # some code\n" * 30
    lines = [json.dumps({"messages": [{"role": "user", "content": f"task {i}\n{body}"},
                                      {"role": "assistant", "content": body}]}) for i in range(6000)]
    p = write(tmp_path, lines)
    assert p.stat().st_size > 5_000_000
    rows = validate_chat_rows(p)
    assert len(rows) == 6000


@pytest.mark.emdata
def test_paper_files_validate(em_data_dir):
    from em.data.sources import load_registry
    from em.utils.io import git_blob_sha1

    reg = load_registry()
    files = sorted((em_data_dir / "data").glob("*.jsonl"))
    assert files, "no data/*.jsonl in the data dir"
    for f in files:
        entry = reg.dataset(f.stem)
        res = validate_chat_file(f)
        assert git_blob_sha1(f) == entry.blob_sha1, f
        assert entry.rows is not None and res.summary.rows == entry.rows, f
        if f.stem == "jailbroken":
            assert res.summary.rows == 5000 and res.summary.rows_with_system == 5000
