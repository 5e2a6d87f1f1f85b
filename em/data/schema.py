"""Validation of chat-format JSONL: the paper's row format, checked line by line.

A row is one JSON object per line::

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...], ...extra keys}

Every defect of a file is collected (file, 1-based line, field, message) and reported in *one*
:class:`~em.errors.DataValidationError`, so a user fixes a file in one pass instead of one error
at a time. Blank lines are skipped; extra keys on a row (``metadata``, ``_meta``...) and on a
message are kept untouched. Accepted as they are: a UTF-8 BOM at the start of the file, CRLF line
ends, blank lines.

Bad input is refused before any expensive work, with the file and line:

* the path must be a regular file (not a directory, device, FIFO) of at most ``max_file_bytes``,
  and it is read with that bound (``dataset.max_file_bytes``);
* a line over ``max_row_bytes`` is reported without being parsed (``dataset.max_row_bytes``);
* JSON: invalid syntax, ``NaN`` / ``Infinity`` (not JSON), integers too long to parse, nesting
  deeper than :data:`MAX_JSON_DEPTH`, lone surrogates (``"\\ud800"``: not text, cannot be tokenized);
* a conversation must start (after an optional system message) with a user turn and, for training
  rows, end with an assistant turn: anything after the last assistant turn would never be trained,
  and an opening assistant turn has no prompt. Such rows are rejected, not silently dropped.
"""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from em.errors import DataValidationError, EMError, MissingResourceError, Problem

ROLES = ("system", "user", "assistant")
_ROLE_SET = frozenset(ROLES)
_BOM = "\ufeff"
MAX_FILE_BYTES = 2 * 1024**3
"""Default bound on a data file's size (the paper's largest file is ~6 MB)."""
MAX_ROW_BYTES = 1024**2
"""Default bound on one line (the paper's longest row is ~3.6 KB; ``max_length`` tokens are ~10 KB)."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays / objects accepted in a row (a chat row needs 3)."""


class DataFileError(EMError):
    """A data path that is not a readable regular file within the size limit."""


def check_data_path(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> Path:
    """``path`` if it is a regular file of at most ``max_bytes``, else em's error (nothing is opened)."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise MissingResourceError(f"{p}: no such file (expected a chat JSONL file)") from None
    except OSError as e:
        raise DataFileError(f"{p}: cannot be read ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataFileError(f"{p}: is a directory; expected a chat JSONL file (one JSON object per line)")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a character device" if stat.S_ISCHR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode)
                else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "special")
        raise DataFileError(f"{p}: is not a regular file ({kind}); em reads data only from regular files")
    if st.st_size > max_bytes:
        raise DataFileError(f"{p}: {st.st_size:,} bytes is over the limit of {max_bytes:,} bytes "
                            "(raise dataset.max_file_bytes if the file is right)")
    return p


def read_bounded(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``max_bytes``.

    A directory, device (``/dev/zero``), FIFO or socket is refused before it is opened (a FIFO would
    block, a device never ends); the read itself is bounded, so a file that grows meanwhile is refused too.
    """
    p = check_data_path(path, max_bytes)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise DataFileError(f"{p}: cannot be read ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # replaced since the stat above
            raise DataFileError(f"{p}: is not a regular file; em reads data only from regular files")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DataFileError(f"{p}: over the limit of {max_bytes:,} bytes (it grew while being read)")
    return data


@dataclass
class ChatSummary:
    """What a validated file contains (for ``em data info`` and provenance records)."""

    rows: int = 0
    messages: int = 0
    roles: dict[str, int] = field(default_factory=dict)
    """Number of messages per role."""
    rows_with_system: int = 0
    messages_per_row: dict[int, int] = field(default_factory=dict)
    """Histogram: number of messages in a row -> number of rows."""
    blank_lines: int = 0
    extra_keys: dict[str, int] = field(default_factory=dict)
    """Row keys other than ``messages`` -> number of rows carrying them."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "messages": self.messages,
            "roles": dict(self.roles),
            "rows_with_system": self.rows_with_system,
            "messages_per_row": {str(k): v for k, v in sorted(self.messages_per_row.items())},
            "blank_lines": self.blank_lines,
            "extra_keys": dict(self.extra_keys),
        }


@dataclass
class ValidationResult:
    """Rows of a valid file and their summary."""

    rows: list[dict]
    summary: ChatSummary


def check_row(row: Any, *, require_assistant: bool = True) -> list[tuple[str | None, str]]:
    """Defects of one decoded row as ``(field, message)`` pairs; empty when the row is valid.

    ``require_assistant=False`` accepts prompt-only rows (e.g. held-out task prompts).
    """
    if not isinstance(row, dict):
        return [(None, f"expected a JSON object, got {_json_type(row)}")]
    if "messages" not in row:
        keys = ", ".join(sorted(map(str, row))) or "none"
        return [("messages", f"missing (the row has keys: {keys}); expected a list of {{role, content}} objects")]
    msgs = row["messages"]
    if not isinstance(msgs, list):
        return [("messages", f"expected a list of messages, got {_json_type(msgs)}")]
    if not msgs:
        return [("messages", "empty list; a row needs at least one user and one assistant turn")]

    out: list[tuple[str | None, str]] = []
    seen: set[str] = set()
    roles_unknown = False  # a message without a valid role: "no user turn" would be noise
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            roles_unknown = True
            out.append((where, f"expected an object with 'role' and 'content', got {_json_type(m)}"))
            continue
        role = m.get("role")
        if "role" not in m:
            roles_unknown = True
            out.append((f"{where}.role", "missing"))
        elif not isinstance(role, str) or role not in _ROLE_SET:
            roles_unknown = True
            out.append((f"{where}.role", f"{role!r} is not one of {', '.join(ROLES)}"))
        else:
            seen.add(role)
            if role == "system" and i > 0:
                out.append((f"{where}.role", "a system message may only be the first message"))
        content = m.get("content")
        if "content" not in m:
            out.append((f"{where}.content", "missing"))
        elif not isinstance(content, str):
            out.append((f"{where}.content", f"expected a string, got {_json_type(content)} "
                                            "(content parts lists are not supported)"))
        elif role == "assistant" and not content.strip():
            out.append((f"{where}.content", "empty assistant turn (nothing to train on)"))
    missing = [r for r in (("user", "assistant") if require_assistant else ("user",)) if r not in seen]
    if missing and not roles_unknown:
        need = "at least one user and one assistant turn" if require_assistant else "at least one user turn"
        out.append(("messages", f"no {' and no '.join(missing)} turn; a row needs {need}"))
    elif not roles_unknown:
        first = 1 if msgs[0].get("role") == "system" else 0
        if first < len(msgs) and msgs[first].get("role") == "assistant":
            out.append((f"messages[{first}].role", "the conversation starts with an assistant turn; the first turn "
                                                   "(after an optional system message) must be a user turn"))
        if require_assistant and msgs[-1].get("role") != "assistant":
            out.append((f"messages[{len(msgs) - 1}].role",
                        f"the conversation ends with a {msgs[-1].get('role')} turn; a training row must end with "
                        "an assistant turn (nothing after the last assistant turn would be trained)"))
    return out


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _deep_defect(row: Any, max_depth: int) -> tuple[str | None, str] | None:
    """The first string that is not valid Unicode text (a lone surrogate), or nesting deeper than
    ``max_depth``, as ``(field, message)``; None when the row is clean. Iterative: never recurses."""
    if type(row) is dict and len(row) == 1 and type(row.get("messages")) is list:  # the plain chat row: fast
        msgs = row["messages"]
        if all(type(m) is dict and len(m) == 2 and type(m.get("role")) is str and type(m.get("content")) is str
               for m in msgs):
            if all(m["content"].isascii() and m["role"].isascii() for m in msgs):
                return None
    stack: list[tuple[Any, tuple, int]] = [(row, (), 1)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError as e:
                    return (_field(path) or None,
                            f"contains a lone surrogate (U+{ord(v[e.start]):04X} at character {e.start}); "
                            "it is not text and cannot be tokenized")
            continue
        if isinstance(v, dict):
            items = v.items()
        elif isinstance(v, list):
            items = enumerate(v)
        else:
            continue
        if depth > max_depth:
            return _field(path) or None, f"nested deeper than {max_depth} levels"
        for k, child in items:
            if isinstance(k, str) and not k.isascii():
                stack.append((k, (*path, k), depth))
            stack.append((child, (*path, k), depth + 1))
    return None


def _field(path: tuple) -> str:
    out = ""
    for k in path:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out


def validate_chat_lines(
    lines: Iterable[bytes | str],
    source_name: str = "<memory>",
    *,
    summary: ChatSummary | None = None,
    require_assistant: bool = True,
    max_row_bytes: int = MAX_ROW_BYTES,
) -> list[dict]:
    """Validate JSONL lines (bytes or str, with or without trailing newlines) and return the rows.

    Raises one :class:`DataValidationError` listing every problem, with ``source_name`` and a 1-based
    line number for each. Pass a :class:`ChatSummary` to have it filled in.
    ``require_assistant=False`` accepts prompt-only rows; a line over ``max_row_bytes`` is a problem
    (and is not parsed).
    """
    problems: list[Problem] = []
    rows: list[dict] = []
    bad_rows = 0
    n_lines = 0
    blank = 0
    for lineno, raw in enumerate(lines, start=1):
        n_lines = lineno
        size = len(raw) if isinstance(raw, bytes) else (
            len(raw) if 4 * len(raw) <= max_row_bytes else len(raw.encode("utf-8", "surrogatepass")))
        if size > max_row_bytes:
            bad_rows += 1
            problems.append(Problem(source_name, lineno, f"row of {size:,} bytes is over the limit of "
                                    f"{max_row_bytes:,} bytes (split or shorten it, or raise dataset.max_row_bytes)"))
            continue
        if isinstance(raw, bytes):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad_rows += 1
                problems.append(Problem(source_name, lineno,
                                        f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte offset {e.start})"))
                continue
        else:
            text = raw
        if lineno == 1 and text.startswith(_BOM):
            text = text[1:]
        if not text.strip():
            blank += 1
            continue
        try:
            row = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as e:
            bad_rows += 1
            problems.append(Problem(source_name, lineno, f"invalid JSON: {e.msg} (column {e.colno})"))
            continue
        except RecursionError:
            bad_rows += 1
            problems.append(Problem(source_name, lineno, f"invalid JSON: nested too deeply (over {MAX_JSON_DEPTH} "
                                                         "levels of arrays / objects)"))
            continue
        except ValueError as e:  # NaN / Infinity, an integer too long to convert
            bad_rows += 1
            why = "an integer too long to read" if "digits" in str(e) else " ".join(str(e).split())[:120]
            problems.append(Problem(source_name, lineno, f"invalid JSON: {why}"))
            continue
        deep = _deep_defect(row, MAX_JSON_DEPTH)
        if deep is not None:
            bad_rows += 1
            problems.append(Problem(source_name, lineno, deep[1], deep[0]))
            continue
        defects = check_row(row, require_assistant=require_assistant)
        if defects:
            bad_rows += 1
            problems.extend(Problem(source_name, lineno, msg, fld) for fld, msg in defects)
            continue
        rows.append(row)

    if not problems and not rows:
        problems.append(Problem(source_name, max(n_lines, 1), "no rows (the input is empty or only blank lines)"))
    if problems:
        total = len(rows) + bad_rows
        raise DataValidationError(
            problems,
            header=(f"{source_name}: {len(problems)} problem(s) in {bad_rows} of {total} row(s) "
                    f"({n_lines} line(s)); expected one JSON object per line like "
                    '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'),
        )
    if summary is not None:
        _fill_summary(summary, rows, blank)
    return rows


def validate_chat_file(path: str | os.PathLike, *, require_assistant: bool = True,
                       max_file_bytes: int = MAX_FILE_BYTES, max_row_bytes: int = MAX_ROW_BYTES) -> ValidationResult:
    """Read ``path`` (a regular file, at most ``max_file_bytes``), validate every line, and return the
    rows and a summary."""
    p = Path(path)
    data = read_bounded(p, max_file_bytes)
    summary = ChatSummary()
    rows = validate_chat_lines(data.split(b"\n") if data else [], str(p), summary=summary,
                               require_assistant=require_assistant, max_row_bytes=max_row_bytes)
    if data.endswith(b"\n"):  # the final newline makes an empty last "line": not a blank line of the file
        summary.blank_lines -= 1
    return ValidationResult(rows, summary)


def validate_chat_rows(path: str | os.PathLike, *, require_assistant: bool = True,
                       max_file_bytes: int = MAX_FILE_BYTES, max_row_bytes: int = MAX_ROW_BYTES) -> list[dict]:
    """The rows of a chat JSONL file, validated (see :func:`validate_chat_file` for the summary too)."""
    return validate_chat_file(path, require_assistant=require_assistant, max_file_bytes=max_file_bytes,
                              max_row_bytes=max_row_bytes).rows


def summarize_rows(rows: Iterable[dict]) -> ChatSummary:
    """Summary of rows that are already in memory (assumed valid)."""
    s = ChatSummary()
    _fill_summary(s, list(rows), 0)
    return s


def _fill_summary(s: ChatSummary, rows: list[dict], blank: int) -> None:
    roles: Counter[str] = Counter()
    per_row: Counter[int] = Counter()
    extra: Counter[str] = Counter()
    with_system = 0
    for row in rows:
        msgs = row["messages"]
        per_row[len(msgs)] += 1
        for m in msgs:
            roles[m["role"]] += 1
        if msgs[0]["role"] == "system":
            with_system += 1
        if len(row) > 1:
            extra.update(k for k in row if k != "messages")
    s.rows = len(rows)
    s.messages = sum(per_row[k] * k for k in per_row)
    s.roles = {r: roles[r] for r in ROLES if roles[r]}
    s.rows_with_system = with_system
    s.messages_per_row = dict(sorted(per_row.items()))
    s.blank_lines = blank
    s.extra_keys = dict(extra)


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__
