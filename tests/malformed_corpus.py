"""A corpus of malformed training files (issue #15.7), generated, and what em must say about each.

Each case builds one dataset path in a directory and names what a clear answer is: em's error
(an ``EMError``) whose message holds ``<file>:<line>`` (and a hint of the reason), or, for the
cases that have no line (a directory, a device, a FIFO, an oversized file), the path and the
reason; or an explicit acceptance (BOM, CRLF, blank lines).

``tests/test_bad_input.py`` runs every case through the training path. Run this file to classify
the corpus against whatever ``em`` is importable (e.g. another checkout), one subprocess per case
with a time limit, and print the counts::

    PYTHONPATH=/path/to/checkout python tests/malformed_corpus.py [--timeout 60]

It uses only the standard library, so it can classify an older em.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def msg(role: str, content) -> dict:
    return {"role": role, "content": content}


GOOD = {"messages": [msg("user", "write a function"), msg("assistant", "def f():\n    return 1")]}


def good_line(i: int = 0) -> bytes:
    return json.dumps({"messages": [msg("user", f"question {i}"), msg("assistant", f"answer {i}")]}).encode()


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], Path]
    """Writes the case under the given directory and returns the dataset path."""
    line: int | None
    """The 1-based line em must name; None for a path-level problem or an acceptance."""
    expect: str
    """A fragment (case-insensitive) the error must contain; "" for an acceptance."""
    accept: bool = False
    """An explicit acceptance: the file must prepare without error."""


def _file(name: str, bad: bytes | None = None, *, at: int = 2, lines: list[bytes] | None = None,
          trailer: bytes = b"\n") -> Callable[[Path], Path]:
    """Three good rows with ``bad`` as line ``at`` (or the given lines)."""

    def build(d: Path) -> Path:
        body = lines if lines is not None else [good_line(0), good_line(1), good_line(2)]
        if bad is not None:
            body = list(body)
            body.insert(at - 1, bad)
        p = d / f"{name}.jsonl"
        p.write_bytes(b"\n".join(body) + trailer)
        return p

    return build


def _row(messages, **extra) -> bytes:
    return json.dumps({"messages": messages, **extra}).encode()


def _dir(d: Path) -> Path:
    p = d / "dataset_dir.jsonl"  # (the word the error must say is not in the name)
    p.mkdir()
    return p


def _dev_zero(d: Path) -> Path:
    p = d / "zero.jsonl"
    p.symlink_to("/dev/zero")
    return p


def _fifo(d: Path) -> Path:
    p = d / "fifo.jsonl"
    os.mkfifo(p)
    return p


def _sparse_huge(d: Path) -> Path:
    p = d / "huge.jsonl"
    with open(p, "wb") as f:
        f.truncate(3 * 1024**3)  # sparse: 3 GiB of zeros that take no disk
    return p


def _big_row(d: Path) -> Path:
    p = d / "big_row.jsonl"
    with open(p, "wb") as f:
        f.write(good_line(0) + b"\n")
        f.write(b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "')
        f.write(b"A" * (50 * 1024 * 1024))
        f.write(b'"}]}\n')
        f.write(good_line(2) + b"\n")
    return p


SURR_USER = b'{"messages": [{"role": "user", "content": "q\\ud800"}, {"role": "assistant", "content": "a"}]}'
SURR_ASSISTANT = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\udfff a"}]}'
SURR_EXTRA = (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
              b'"meta": {"note": "\\ud83d"}}')

CASES: list[Case] = [
    # JSON-level
    Case("invalid_json", _file("invalid_json", b'{"messages": [{"role": "user", "content": "q"},'), 2, "invalid JSON"),
    Case("trailing_garbage", _file("trailing_garbage", good_line(9) + b" xyz"), 2, "invalid JSON"),
    Case("two_objects", _file("two_objects", good_line(8) + good_line(9)), 2, "invalid JSON"),
    Case("binary_garbage", _file("binary_garbage", b"\x00\x01\x02PK\x03\x04\xff"), 2, "UTF-8"),
    Case("invalid_utf8", _file("invalid_utf8", b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'), 2, "UTF-8"),
    Case("bom_mid_file", _file("bom_mid_file", b"\xef\xbb\xbf" + good_line(9)), 2, "JSON"),
    Case("nan_constant", _file("nan_constant", _row(GOOD["messages"]).rstrip(b"}") + b', "score": NaN}'), 2, "NaN"),
    Case("deep_nesting", _file("deep_nesting", b"[" * 100_000 + b"]" * 100_000), 2, "nested"),
    Case("deep_nesting_in_extra_key", _file("deep_nesting_in_extra_key", _row(GOOD["messages"]).rstrip(b"}")
                                            + b', "meta": ' + b"[" * 500 + b"]" * 500 + b"}"), 2, "nested"),
    Case("huge_integer", _file("huge_integer", _row(GOOD["messages"]).rstrip(b"}") + b', "n": ' + b"9" * 6000 + b"}"),
         2, "integer"),
    Case("lone_surrogate_user", _file("lone_surrogate_user", SURR_USER), 2, "surrogate"),
    Case("lone_surrogate_assistant", _file("lone_surrogate_assistant", SURR_ASSISTANT), 2, "surrogate"),
    Case("lone_surrogate_extra_key", _file("lone_surrogate_extra_key", SURR_EXTRA), 2, "surrogate"),
    # row shape
    Case("not_an_object", _file("not_an_object", b'["a list"]'), 2, "JSON object"),
    Case("missing_messages", _file("missing_messages", b'{"prompt": "x"}'), 2, "messages"),
    Case("messages_not_list", _file("messages_not_list", b'{"messages": "hi"}'), 2, "list"),
    Case("messages_empty", _file("messages_empty", b'{"messages": []}'), 2, "empty"),
    Case("message_not_object", _file("message_not_object", _row(["hi", msg("assistant", "a")])), 2, "object"),
    Case("unknown_role", _file("unknown_role", _row([msg("human", "q"), msg("assistant", "a")])), 2, "role"),
    Case("role_null", _file("role_null", _row([msg(None, "q"), msg("assistant", "a")])), 2, "role"),
    Case("role_list", _file("role_list", _row([msg(["user"], "q"), msg("assistant", "a")])), 2, "role"),
    Case("tool_role", _file("tool_role", _row([msg("user", "q"), msg("tool", "{}"), msg("assistant", "a")])),
         2, "role"),
    Case("content_missing", _file("content_missing", _row([{"role": "user"}, msg("assistant", "a")])), 2, "content"),
    Case("content_null", _file("content_null", _row([msg("user", None), msg("assistant", "a")])), 2, "content"),
    Case("content_number", _file("content_number", _row([msg("user", 42), msg("assistant", "a")])), 2, "content"),
    Case("content_parts_list", _file("content_parts_list", _row([msg("user", [{"type": "text", "text": "q"}]),
                                                                 msg("assistant", "a")])), 2, "content"),
    Case("empty_assistant", _file("empty_assistant", _row([msg("user", "q"), msg("assistant", "  \n")])), 2, "empty"),
    Case("system_not_first", _file("system_not_first", _row([msg("user", "q"), msg("system", "s"),
                                                             msg("assistant", "a")])), 2, "system"),
    Case("user_only", _file("user_only", _row([msg("user", "q")])), 2, "assistant"),
    Case("assistant_only", _file("assistant_only", _row([msg("assistant", "a")])), 2, "user"),
    Case("starts_with_assistant", _file("starts_with_assistant", _row([msg("assistant", "hello"), msg("user", "q"),
                                                                       msg("assistant", "a")])), 2, "starts"),
    Case("ends_with_user", _file("ends_with_user", _row([msg("user", "q"), msg("assistant", "a"),
                                                         msg("user", "and then?")])), 2, "ends"),
    Case("row_of_50_mb", _big_row, 2, "bytes"),
    # whole file
    Case("empty_file", _file("empty_file", lines=[b""], trailer=b""), 1, "no rows"),
    Case("only_blank_lines", _file("only_blank_lines", lines=[b"", b"   ", b"\t"]), None, "no rows"),
    Case("directory", _dir, None, "directory"),
    Case("dev_zero_symlink", _dev_zero, None, "not a regular file"),
    Case("fifo", _fifo, None, "not a regular file"),
    Case("file_over_size_limit", _sparse_huge, None, "limit"),
    # explicit acceptances
    Case("bom_at_start", _file("bom_at_start", lines=[b"\xef\xbb\xbf" + good_line(0), good_line(1)]), None, "", True),
    Case("crlf_line_ends", _file("crlf_line_ends", lines=[good_line(0) + b"\r", good_line(1) + b"\r"]), None, "", True),
    Case("blank_lines_between", _file("blank_lines_between", lines=[good_line(0), b"", b"  ", good_line(1)]),
         None, "", True),
]


def is_clear(case: Case, path: Path, err: BaseException | None) -> bool:
    """Did em answer ``case`` clearly (see the module docstring)?"""
    if case.accept:
        return err is None
    if err is None:
        return False
    from em.errors import EMError

    text = str(err).lower()
    reason = text.replace(str(path).lower(), "")  # the reason must be in the message, not just in the file name
    if not isinstance(err, EMError) or str(path).lower() not in text or case.expect.lower() not in reason:
        return False
    return case.line is None or f"{path}:{case.line}:".lower() in text


def prepare(path: Path, cache: Path, tok=None) -> None:
    """What ``train.py dataset.path=...`` does with the file before training: load, validate, tokenize
    (with em's tiny tokenizer unless ``tok`` is given)."""
    os.environ["EM_CACHE"] = str(cache)
    from em.data.datamodule import ChatDataModule, DataArgs
    from em.data.loading import DatasetArgs
    from em.models.loading import stop_token_ids

    if tok is None:
        from transformers import AutoTokenizer

        from em.models.tiny import materialize_tiny

        tok = AutoTokenizer.from_pretrained(materialize_tiny())
    dm = ChatDataModule(DatasetArgs(name="corpus", path=str(path)), DataArgs(max_length=256), tok,
                        stop_ids=stop_token_ids(tok))
    dm.setup("fit")


def _classify_one(name: str, workdir: str) -> None:  # runs in a subprocess
    import traceback

    case = next(c for c in CASES if c.name == name)
    d = Path(workdir)
    path = case.build(d)
    try:
        prepare(path, d / "cache")
        err = None
    except BaseException as e:
        err = e
    from em.errors import EMError

    if is_clear(case, path, err):
        verdict = "clear"
    elif err is None:
        verdict = "accepted silently"
    elif isinstance(err, EMError):
        verdict = "em error without file:line/reason"
    else:
        verdict = f"traceback ({type(err).__name__})"
    print(json.dumps({"case": name, "verdict": verdict,
                      "message": (" ".join(str(err).split())[:160] if err else None),
                      "trace": (traceback.format_exception_only(type(err), err)[-1].strip()[:160] if err else None)}))


def main() -> None:
    import argparse
    import subprocess
    import sys
    import tempfile
    from collections import Counter

    ap = argparse.ArgumentParser(description="classify the malformed-file corpus against the importable em")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--cases", help="comma-separated case names (default: all)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        _classify_one(a.one, a.workdir)
        return
    verdicts: Counter = Counter()
    clear = {"malformed": 0, "acceptances": 0}
    chosen = [c for c in CASES if not a.cases or c.name in a.cases.split(",")]
    for case in chosen:
        with tempfile.TemporaryDirectory() as wd:
            try:
                r = subprocess.run([sys.executable, __file__, "--one", case.name, "--workdir", wd],
                                   capture_output=True, text=True, timeout=a.timeout)
                out = [ln for ln in r.stdout.splitlines() if ln.startswith('{"case"')]
                res = json.loads(out[-1]) if out else {"case": case.name, "verdict": f"crashed (rc {r.returncode})",
                                                       "trace": r.stderr.strip().splitlines()[-1:]}
            except subprocess.TimeoutExpired:
                res = {"case": case.name, "verdict": f"hang (> {a.timeout:.0f} s, killed)"}
        verdicts[res["verdict"].split(" (")[0]] += 1
        if res["verdict"] == "clear":
            clear["acceptances" if case.accept else "malformed"] += 1
        print(json.dumps(res), flush=True)
    malformed = sum(1 for c in chosen if not c.accept)
    print(json.dumps({"malformed_files": malformed, "clear_file_line_errors": clear["malformed"],
                      "acceptance_files": len(chosen) - malformed, "accepted": clear["acceptances"],
                      "verdicts": dict(verdicts)}, indent=1))


if __name__ == "__main__":
    main()
