"""Validation of chat-format JSONL: the paper's row format, checked line by line.

A row is one JSON object per line::

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...], ...extra keys}

Every defect of a file is collected (file, 1-based line, field, message) and reported in *one*
:class:`~em.errors.DataValidationError`, so a user fixes a file in one pass instead of one error
at a time. Blank lines are skipped; extra keys on a row (``metadata``, ``_meta``...) and on a
message are kept untouched.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from em.errors import DataValidationError, MissingResourceError, Problem

ROLES = ("system", "user", "assistant")
_ROLE_SET = frozenset(ROLES)
_BOM = "\ufeff"


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
        elif role not in _ROLE_SET:
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
    return out


def validate_chat_lines(
    lines: Iterable[bytes | str],
    source_name: str = "<memory>",
    *,
    summary: ChatSummary | None = None,
    require_assistant: bool = True,
) -> list[dict]:
    """Validate JSONL lines (bytes or str, with or without trailing newlines) and return the rows.

    Raises one :class:`DataValidationError` listing every problem, with ``source_name`` and a 1-based
    line number for each. Pass a :class:`ChatSummary` to have it filled in.
    ``require_assistant=False`` accepts prompt-only rows.
    """
    problems: list[Problem] = []
    rows: list[dict] = []
    bad_rows = 0
    n_lines = 0
    blank = 0
    for lineno, raw in enumerate(lines, start=1):
        n_lines = lineno
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
            row = json.loads(text)
        except json.JSONDecodeError as e:
            bad_rows += 1
            problems.append(Problem(source_name, lineno, f"invalid JSON: {e.msg} (column {e.colno})"))
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


def validate_chat_file(path: str | os.PathLike, *, require_assistant: bool = True) -> ValidationResult:
    """Read ``path`` as bytes, validate every line, and return the rows and a summary."""
    p = Path(path)
    if not p.is_file():
        raise MissingResourceError(f"{p}: no such file (expected a chat JSONL file)")
    data = p.read_bytes()
    summary = ChatSummary()
    rows = validate_chat_lines(data.split(b"\n") if data else [], str(p), summary=summary,
                               require_assistant=require_assistant)
    if data.endswith(b"\n"):  # the final newline makes an empty last "line": not a blank line of the file
        summary.blank_lines -= 1
    return ValidationResult(rows, summary)


def validate_chat_rows(path: str | os.PathLike, *, require_assistant: bool = True) -> list[dict]:
    """The rows of a chat JSONL file, validated (see :func:`validate_chat_file` for the summary too)."""
    return validate_chat_file(path, require_assistant=require_assistant).rows


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
