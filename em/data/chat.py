"""Render chat rows with the model's own chat template and build labels once, at preparation.

Labels are built from character spans of each assistant turn, found by rendering the
conversation prefix by prefix with the tokenizer's template (no hand-written chat format):

* ``render(messages[:i], add_generation_prompt=True)`` ends where assistant turn ``i`` starts;
* ``render(messages[:i+1])`` ends where it ends (trailing whitespace after the end-of-turn
  token is not trained, the end-of-turn / EOS token itself is).

Tokens that start inside an assistant span get their id as label, every other token ``-100``.
Because labels never come from ``input_ids != pad_token_id``, a tokenizer whose pad token equals
its EOS token still trains EOS (the classic "model never stops" bug).

:func:`encode_chat` does exactly that for one conversation (three renders per assistant turn).
:func:`encode_rows`, used for datasets, gives the same ids and labels with one render per row and
one batched tokenizer call per chunk of rows: the prefix renders are done once per *shape* of
conversation (the roles, with every content replaced by a unique placeholder), which gives the
template's literal text between contents and the span boundaries; each row is then rendered once
(one batched ``apply_chat_template`` call per chunk) and used only if it equals that literal text
with the row's contents put back (the template inserts contents verbatim). A row where it does not
(a template that trims or inspects contents), and every shape whose placeholder rendering is not
usable, takes the three-render path; the first rows of every shape take both paths and must agree,
else the shape falls back for good. (A template that changes the *generation prompt* depending on
contents only some rows have would escape that check: no real template does.)

Chunks are tokenized by the backend (``encode_batch``, the call ``tokenizer(texts)`` makes) in a
worker thread while the next chunk is rendered and the previous one labelled. Labels need, per
assistant span, the tokens whose character offset starts inside it. Reading every token's offsets
into Python costs more than the rest of the labelling (2.2M tuples for the paper's insecure file), so
each span boundary is found with a few offset lookups instead (:func:`_first_token_from`), which
gives the same tokens when a row's token offsets start in order and are never empty. The first
``_VERIFY_OFFSET_ROWS`` rows of every call are labelled both ways: if those two conditions fail on
them or the labels differ, the whole call reads full offsets; a later row whose lookups do not settle
a boundary reads its own offsets. (A tokenizer whose offsets go out of order or empty only in rows
past the verified ones would escape that check: the byte-level BPE, sentencepiece-style BPE and
Unigram, and WordPiece tokenizers tested do not.)

The result is a :class:`TokenizedRows`: every kept row's ids and labels as flat int32 arrays, which
the tokenized cache writes as they are and a batch reads row by row.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter

import numpy as np

from em.errors import ConfigError, DataValidationError, Problem

IGNORE_INDEX = -100
OVERLENGTH_POLICIES = ("drop", "truncate", "raise")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class EncodeStats:
    """What preparation did: kept rows, and dropped rows counted by reason."""

    rows_in: int = 0
    rows_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        lens = np.array(self.lengths or [0])
        return {
            "rows_in": self.rows_in,
            "rows_kept": self.rows_kept,
            "rows_dropped": sum(self.dropped.values()),
            "dropped_by_reason": dict(self.dropped),
            "rows_truncated": self.truncated,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "trained_token_fraction": self.trained_tokens / max(self.tokens, 1),
            "length_p50": float(np.percentile(lens, 50)),
            "length_p90": float(np.percentile(lens, 90)),
            "length_p99": float(np.percentile(lens, 99)),
            "length_max": int(lens.max()),
        }

    def describe(self) -> str:
        s = self.summary()
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        return (f"{s['rows_kept']}/{s['rows_in']} rows kept, {s['rows_dropped']} dropped ({why}), "
                f"{s['rows_truncated']} truncated; {s['trained_tokens']}/{s['tokens']} tokens trained "
                f"({100 * s['trained_token_fraction']:.1f}%); length p50/p90/max "
                f"{s['length_p50']:.0f}/{s['length_p90']:.0f}/{s['length_max']}")


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character span of every assistant turn."""
    full = _render(tokenizer, messages, False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(prefix)):
            raise ConfigError(
                "the chat template is not prefix-stable (rendering a conversation prefix is not a prefix of "
                "the full rendering), so assistant spans cannot be located; set model.chat_template to a "
                "template that renders earlier turns unchanged"
            )
        end = len(upto.rstrip())
        if end <= len(prefix):
            continue  # template dropped the assistant content: counted as no trained tokens
        spans.append((len(prefix), end))
    return full, spans


def encode_chat(tokenizer, messages: list[dict], stop_ids: set[int] | None = None) -> Encoded:
    """Tokenize one conversation and label the assistant turns (no length policy applied)."""
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for k, (start, end) in enumerate(enc["offset_mapping"]):
        if end <= start:
            continue
        for s, e in spans:
            if s <= start < e:
                labels[k] = ids[k]
                break
    if stop_ids is not None and spans:
        _check_stops(tokenizer, ids, enc["offset_mapping"], spans, stop_ids)
    return Encoded(ids, labels)


# -- datasets: one render per row, batched tokenization ------------------------------------------------
_SENTINEL = "\ue000em-content-{}\ue001"  # private-use code points: templates pass them through as is
_VERIFY_ROWS = 2
"""Rows of each conversation shape that take both paths (which must agree) before the fast path is trusted."""
_TOKENIZE_CHUNK = 1024


@dataclass
class _Layout:
    """The rendering of one conversation shape with placeholder contents."""

    literals: list[str]
    """Template text before the first content, between contents, after the last (``len(messages) + 1``)."""
    sentinel_lens: list[int]
    bounds: list[tuple[int, int, int, int]]
    """Per assistant turn: (start, contents before start, end before rstrip, contents before end), in
    placeholder coordinates."""

    def spans(self, contents: list[str], text: str) -> list[tuple[int, int]]:
        shift = [0]
        for c, n in zip(contents, self.sentinel_lens):
            shift.append(shift[-1] + len(c) - n)
        out = []
        for start, ks, end, ke in self.bounds:
            s, e = start + shift[ks], end + shift[ke]
            while e > s and text[e - 1].isspace():  # == len(text[:e].rstrip()), without the copy
                e -= 1
            if e > s:
                out.append((s, e))
        return out


def _shape(messages: list[dict]) -> str | tuple:
    if all(len(m) == 2 for m in messages):  # {"role", "content"}: the common case
        return tuple(m["role"] for m in messages)
    return json.dumps([{k: v for k, v in m.items() if k != "content"} for m in messages], sort_keys=True, default=str)


def _layout(tokenizer, messages: list[dict]) -> _Layout | None:
    """The layout of ``messages``' shape, or None when the template does not allow the fast path."""
    sents = [_SENTINEL.format(j) for j in range(len(messages))]
    skel = [{**m, "content": sents[j]} for j, m in enumerate(messages)]
    try:
        full = _render(tokenizer, skel, False)
        pos, at = [], 0
        for s in sents:
            p = full.find(s, at)
            if p < 0 or full.count(s) != 1:
                return None  # a content dropped, duplicated or transformed
            pos.append(p)
            at = p + len(s)
        ends = [p + len(s) for p, s in zip(pos, sents)]
        literals = [full[a:b] for a, b in zip([0, *ends], [*pos, len(full)])]

        def where(b: int) -> int | None:  # contents entirely before boundary b; None if b is inside one
            if any(p < b < e for p, e in zip(pos, ends)):
                return None
            return sum(1 for e in ends if e <= b)

        bounds = []
        for i, m in enumerate(skel):
            if m.get("role") != "assistant":
                continue
            prefix = _render(tokenizer, skel[:i], True)
            upto = _render(tokenizer, skel[: i + 1], False)
            if not (full.startswith(upto) and upto.startswith(prefix)):
                return None  # the per-row path reports it on the real contents
            ks, ke = where(len(prefix)), where(len(upto))
            if ks is None or ke is None:
                return None
            bounds.append((len(prefix), ks, len(upto), ke))
    except ConfigError:
        raise
    except Exception:  # the template refuses this shape: the per-row path reports it with the row's line
        return None
    return _Layout(literals, [len(s) for s in sents], bounds)


def _render_rows(tokenizer, rows: list[dict], source: str, first: int = 0, layouts: dict | None = None,
                 seen: Counter | None = None) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Rendered text and assistant character spans of every row (see the module docstring).

    ``layouts`` / ``seen`` carry the per-shape layouts and verification counts across chunks.
    """
    layouts = {} if layouts is None else layouts
    seen = Counter() if seen is None else seen
    texts: list[str] = []
    spans: list[list[tuple[int, int]]] = []
    problems: list[Problem] = []
    try:  # one batched call renders every row of the chunk (what a per-row call gives, with less overhead)
        rendered = tokenizer.apply_chat_template([row["messages"] for row in rows], tokenize=False)
        if not isinstance(rendered, list) or len(rendered) != len(rows):
            rendered = None
    except Exception:  # a row the template refuses: rendered one by one below, and named
        rendered = None
    for i, row in enumerate(rows):
        msgs = row["messages"]
        try:
            shape = _shape(msgs)
            if shape not in layouts:
                layouts[shape] = _layout(tokenizer, msgs)
            lay = layouts[shape]
            got = None
            if lay is not None:
                contents = [m["content"] for m in msgs]
                text = rendered[i] if rendered is not None else _render(tokenizer, msgs, False)
                pieces = [lay.literals[0]]
                for c, lit in zip(contents, lay.literals[1:]):
                    pieces += (c, lit)
                if text == "".join(pieces):
                    got = (text, lay.spans(contents, text))
            seen[shape] += 1
            if got is None or seen[shape] <= _VERIFY_ROWS:
                ref = assistant_char_spans(tokenizer, msgs)
                if got is not None and got != ref:
                    layouts[shape] = None  # this template is not content-transparent: per-row path from now on
                got = ref
        except ConfigError:
            raise
        except Exception as e:  # a template error on this row (e.g. roles it refuses): name the row
            problems.append(Problem(source, row.get("_line", first + i + 1),
                                    f"the chat template cannot render this row: {type(e).__name__}: "
                                    f"{' '.join(str(e).split())[:300]}", "messages"))
            continue
        texts.append(got[0])
        spans.append(got[1])
    if problems:
        raise DataValidationError(problems, header=f"{len(problems)} row(s) of {source} cannot be rendered "
                                  "with the model's chat template")
    return texts, spans


@contextmanager
def _plain_backend(tokenizer):
    """The backend tokenizer set as ``tokenizer(texts, add_special_tokens=False)`` sets it (no truncation,
    no padding, special tokens split as the tokenizer says), restored on exit. Set once, in the calling
    thread, so that the tokenizing thread only reads it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"{type(tokenizer).__name__} is not a fast tokenizer: em needs the character offsets of a "
                          "fast (tokenizers-backed) tokenizer to label assistant turns")
    truncation, padding, split = backend.truncation, backend.padding, backend.encode_special_tokens
    try:
        if truncation is not None:
            backend.no_truncation()
        if padding is not None:
            backend.no_padding()
        backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
        yield backend
    finally:
        backend.encode_special_tokens = split
        if truncation is not None:
            backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**padding)


def _tokenize(backend, texts: list[str], rows: list[dict], source: str, first: int):
    """The backend's batched encodings of ``texts`` (see :func:`_plain_backend`), without building a
    ``BatchEncoding``; rows that cannot be tokenized are named."""
    try:
        return backend.encode_batch(texts, add_special_tokens=False)
    except Exception:
        problems = []
        for i, t in enumerate(texts):  # find the rows that cannot be tokenized, and name them
            try:
                backend.encode(t, add_special_tokens=False)
            except Exception as e:
                problems.append(Problem(source, rows[i].get("_line", first + i + 1), "cannot be tokenized: "
                                        f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"))
        if not problems:
            raise
        raise DataValidationError(problems, header=f"{len(problems)} row(s) of {source} cannot be tokenized") from None


def _flat_ids(all_ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """The rows' ids end to end, and the row boundaries (``n + 1`` offsets)."""
    bounds = np.zeros(len(all_ids) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, all_ids), dtype=np.int64, count=len(all_ids)), out=bounds[1:])
    return np.fromiter(chain.from_iterable(all_ids), dtype=np.int64, count=int(bounds[-1])), bounds


def _labels(all_ids: list[list[int]], all_offsets: list, spans: list[list[tuple[int, int]]], text_lens: list[int]):
    """Flat ids, labels (token id where the token starts inside an assistant span and is not empty,
    else -100) and row boundaries of a chunk of rows, vectorized over the chunk."""
    n = len(all_ids)
    ids, bounds = _flat_ids(all_ids)
    lens = np.diff(bounds)
    total = int(bounds[-1])
    local = np.fromiter(map(itemgetter(0), chain.from_iterable(all_offsets)), dtype=np.int64, count=total)
    ends = np.fromiter(map(itemgetter(1), chain.from_iterable(all_offsets)), dtype=np.int64, count=total)
    # one character axis for the chunk: row r's characters start at base[r] (rows 1 apart, spans sorted)
    base = np.zeros(n, dtype=np.int64)
    np.cumsum(np.fromiter(text_lens, dtype=np.int64, count=n)[:-1] + 1, out=base[1:])
    starts = local + np.repeat(base, lens)
    ss = np.fromiter((base[r] + a for r, sp in enumerate(spans) for a, _ in sp), dtype=np.int64)
    ee = np.fromiter((base[r] + b for r, sp in enumerate(spans) for _, b in sp), dtype=np.int64)
    if len(ss):
        k = np.searchsorted(ss, starts, side="right") - 1
        mask = (k >= 0) & (starts < ee[np.maximum(k, 0)]) & (ends > local)
    else:
        mask = np.zeros(total, dtype=bool)
    return ids, np.where(mask, ids, IGNORE_INDEX), mask, bounds


_VERIFY_OFFSET_ROWS = 256
"""Rows of each :func:`encode_rows` call labelled from full offsets and from boundary lookups (which must agree)."""


_LOOKUP_SCAN = 16
"""Characters in no token (e.g. whitespace a BERT-style tokenizer drops) skipped at a boundary before the
row reads its own offsets."""


def _first_token_from(enc, n: int, text_len: int, c: int) -> int | None:
    """Index of the first token of ``enc`` (``n`` tokens) whose start offset is >= ``c``, from a few offset
    lookups; None when they do not settle it (the caller then reads the row's offsets)."""
    t, p = None, c
    while t is None and p < min(text_len, c + _LOOKUP_SCAN):
        t = enc.char_to_token(p)  # the first token whose [start, end) holds character p
        p += 1
    if t is None:
        if p < text_len:
            return None
        t = n  # no token holds a character from c to the end
    elif enc.token_to_chars(t)[0] < c:  # it straddles c: the next token is the first to start at or after c
        t += 1
        if t < n and enc.token_to_chars(t)[0] < c:
            return None
    if t > 0 and enc.token_to_chars(t - 1)[0] >= c:  # offsets out of order
        return None
    return t


def _mask_from_lookups(encodings, spans: list[list[tuple[int, int]]], text_lens: list[int], bounds: np.ndarray):
    """The trained-token mask of a chunk from span-boundary lookups, and the rows they did not settle."""
    total = int(bounds[-1])
    marks = np.zeros(total + 1, dtype=np.int32)
    open_at: list[int] = []
    close_at: list[int] = []
    unsettled: list[int] = []
    for r, (enc, sp) in enumerate(zip(encodings, spans)):
        if not sp:
            continue
        n, base, length = int(bounds[r + 1] - bounds[r]), int(bounds[r]), text_lens[r]
        ranges = []
        for s, e in sp:
            a, b = _first_token_from(enc, n, length, s), _first_token_from(enc, n, length, e)
            if a is None or b is None:
                unsettled.append(r)
                break
            if b > a:
                ranges.append((base + a, base + b))
        else:
            for a, b in ranges:
                open_at.append(a)
                close_at.append(b)
    np.add.at(marks, np.array(open_at, dtype=np.int64), 1)
    np.add.at(marks, np.array(close_at, dtype=np.int64), -1)
    return np.cumsum(marks[:-1]) > 0, unsettled


def _offsets_in_order(all_offsets) -> bool:
    """Every token's offsets are non-empty and start no earlier than the previous token's, in every row
    (what :func:`_first_token_from` relies on)."""
    for offs in all_offsets:
        if not offs:
            continue
        o = np.asarray(offs, dtype=np.int64)
        if np.any(o[:, 1] <= o[:, 0]) or np.any(np.diff(o[:, 0]) < 0):
            return False
    return True


def _chunk_labels(encodings, spans, texts: list[str], mode: dict):
    """Flat ids, labels, mask and row bounds of a chunk (as :func:`_labels`), from boundary lookups unless
    ``mode["offsets"]``; ``mode["verify"]``: rows still to label both ways (see the module docstring)."""
    all_ids = [e.ids for e in encodings]
    text_lens = [len(t) for t in texts]
    if mode["offsets"]:
        return _labels(all_ids, [e.offsets for e in encodings], spans, text_lens)
    n = len(all_ids)
    ids, bounds = _flat_ids(all_ids)
    mask, unsettled = _mask_from_lookups(encodings, spans, text_lens, bounds)
    k = min(mode["verify"], n)
    if k:
        mode["verify"] -= k
        head_offsets = [e.offsets for e in encodings[:k]]
        ref = _labels(all_ids[:k], head_offsets, spans[:k], text_lens[:k])
        if not _offsets_in_order(head_offsets) or not np.array_equal(ref[2], mask[: int(bounds[k])]):
            mode["offsets"] = True  # this tokenizer's offsets do not allow lookups: full offsets from here on
            return _labels(all_ids, [e.offsets for e in encodings], spans, text_lens)
    for r in unsettled:  # rows the lookups did not settle: their own offsets
        a, b = int(bounds[r]), int(bounds[r + 1])
        mask[a:b] = _labels([all_ids[r]], [encodings[r].offsets], [spans[r]], [text_lens[r]])[2]
    return ids, np.where(mask, ids, IGNORE_INDEX), mask, bounds


class TokenizedRows(Sequence):
    """Tokenized rows, stored flat: ``input_ids`` and ``labels`` (int32) of every row end to end and
    ``row_offsets`` (int64, one more than the rows). Reading a row builds its :class:`Encoded` (Python
    lists, for the collators). The paper's insecure rows at 256 tokens (SmolLM2's tokenizer) take 9.6 MB
    as arrays vs 80 MB of Python objects as lists, so a dataset of millions of rows fits."""

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, row_offsets: np.ndarray):
        self.input_ids = np.asarray(input_ids, dtype=np.int32)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.row_offsets = np.asarray(row_offsets, dtype=np.int64)
        if len(self.row_offsets) < 1 or len(self.labels) != len(self.input_ids) \
                or self.row_offsets[-1] != len(self.input_ids):
            raise ValueError("row_offsets do not match the token arrays")

    @classmethod
    def from_encoded(cls, rows: Iterable[Encoded]) -> TokenizedRows:
        rows = list(rows)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(np.fromiter((len(e.input_ids) for e in rows), dtype=np.int64, count=len(rows)), out=offsets[1:])
        n = int(offsets[-1])
        return cls(np.fromiter(chain.from_iterable(e.input_ids for e in rows), dtype=np.int32, count=n),
                   np.fromiter(chain.from_iterable(e.labels for e in rows), dtype=np.int32, count=n), offsets)

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} of {n}")
        a, b = int(self.row_offsets[i]), int(self.row_offsets[i + 1])
        return Encoded(self.input_ids[a:b].tolist(), self.labels[a:b].tolist())

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"TokenizedRows({len(self)} rows, {len(self.input_ids)} tokens)"

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.row_offsets)

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """What the tokenized cache writes."""
        return {"input_ids": self.input_ids, "labels": self.labels, "row_offsets": self.row_offsets}


def row_lengths(rows: Sequence[Encoded]) -> list[int]:
    """Tokens per row, without building the rows of a :class:`TokenizedRows`."""
    if isinstance(rows, TokenizedRows):
        return rows.lengths.tolist()
    return [len(e.input_ids) for e in rows]


def _check_stops(tokenizer, ids, offsets, spans, stop_ids: set[int]) -> None:
    """Every assistant turn must end in a stop token that is trained, else generation never stops."""
    for s, e in spans:
        last = max((k for k, (a, b) in enumerate(offsets) if s <= a < e), default=None)
        if last is None or ids[last] not in stop_ids:
            raise ConfigError(
                "the chat template does not end the assistant turn with an EOS / end-of-turn token "
                f"(last assistant token {tokenizer.convert_ids_to_tokens([ids[last]]) if last is not None else None}, "
                f"stop tokens {sorted(stop_ids)}), so the model would never learn to stop. Use a template that "
                "closes assistant turns (set model.chat_template)"
            )


def encode_rows(
    tokenizer,
    rows: Iterable[dict],
    max_length: int,
    overlength: str = "truncate",
    stop_ids: set[int] | None = None,
    source: str = "<rows>",
    progress: bool = False,
) -> tuple[TokenizedRows, EncodeStats]:
    """Encode every row; drop (and count) rows with no trained tokens or, per policy, too long.

    Same ids and labels as :func:`encode_chat` row by row; with ``stop_ids``, the first row with an
    assistant turn must end it with a stop token (the template check).
    """
    if overlength not in OVERLENGTH_POLICIES:
        raise ConfigError(f"data.overlength={overlength!r}: expected one of {OVERLENGTH_POLICIES}")
    rows = list(rows)
    stats = EncodeStats(rows_in=len(rows))
    too_long: list[Problem] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc=f"tokenize {source}", unit="row", leave=False)
    checked = stop_ids is None
    flat: dict[str, list] = {"input_ids": [], "labels": [], "lengths": []}
    layouts: dict = {}
    seen: Counter = Counter()

    mode = {"offsets": False, "verify": _VERIFY_OFFSET_ROWS}

    def consume(c0: int, chunk: list[dict], texts: list[str], spans: list, encodings) -> None:
        nonlocal checked, too_long
        if not checked:
            first = next((j for j, sp in enumerate(spans) if sp), None)
            if first is not None:
                enc = encodings[first]
                _check_stops(tokenizer, enc.ids, enc.offsets, spans[first], stop_ids)
                checked = True
        ids, labels, mask, bounds = _chunk_labels(encodings, spans, texts, mode)
        # per-row decisions, vectorized: trained tokens in the full row and in its first max_length tokens
        cum = np.zeros(len(mask) + 1, dtype=np.int64)
        np.cumsum(mask, out=cum[1:])
        lens = np.diff(bounds)
        kept_len = np.minimum(lens, max_length)
        trained = cum[bounds[1:]] - cum[bounds[:-1]]
        trained_kept = cum[bounds[:-1] + kept_len] - cum[bounds[:-1]]
        no_assistant = trained == 0
        over = ~no_assistant & (lens > max_length)
        stats.dropped["no_assistant_tokens"] += int(no_assistant.sum())
        keep = ~no_assistant
        if over.any():
            if overlength == "raise":
                too_long += [Problem(source, chunk[j].get("_line", c0 + j + 1),
                                     f"{int(lens[j])} tokens > max_length {max_length}") for j in np.flatnonzero(over)]
                keep &= ~over
            elif overlength == "drop":
                stats.dropped["too_long"] += int(over.sum())
                keep &= ~over
            else:
                stats.truncated += int(over.sum())
                emptied = over & (trained_kept == 0)
                stats.dropped["truncated_to_no_trained_tokens"] += int(emptied.sum())
                keep &= ~emptied
        kept_lens = kept_len[keep]
        stats.tokens += int(kept_lens.sum())
        stats.trained_tokens += int(trained_kept[keep].sum())
        stats.lengths += kept_lens.tolist()
        if keep.all() and not over.any():
            flat["input_ids"].append(ids.astype(np.int32))
            flat["labels"].append(labels.astype(np.int32))
        else:
            tok_row = np.repeat(np.arange(len(lens)), lens)
            tok_keep = keep[tok_row] & (np.arange(len(mask)) - bounds[:-1][tok_row] < kept_len[tok_row])
            flat["input_ids"].append(ids[tok_keep].astype(np.int32))
            flat["labels"].append(labels[tok_keep].astype(np.int32))
        flat["lengths"].append(kept_lens)
        if bar is not None:
            bar.update(len(chunk))

    # a pipeline: the backend tokenizes chunk k (in Rust, without the GIL) while chunk k+1 is rendered and
    # chunk k-1's labels are built
    try:
        with _plain_backend(tokenizer) as backend:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="em-tokenize")
            pending = None
            try:
                for c0 in range(0, len(rows), _TOKENIZE_CHUNK):
                    chunk = rows[c0: c0 + _TOKENIZE_CHUNK]
                    texts, spans = _render_rows(tokenizer, chunk, source, c0, layouts, seen)
                    fut = pool.submit(_tokenize, backend, texts, chunk, source, c0)
                    if pending is not None:
                        consume(*pending[:-1], pending[-1].result())
                    pending = (c0, chunk, texts, spans, fut)
                if pending is not None:
                    consume(*pending[:-1], pending[-1].result())
            finally:  # the tokenizing thread is done before the backend's state is restored
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if bar is not None:
            bar.close()
    for k, v in flat.items():
        flat[k] = np.concatenate(v) if v else np.zeros(0, dtype=np.int64 if k == "lengths" else np.int32)
    offsets = np.zeros(len(flat["lengths"]) + 1, dtype=np.int64)
    np.cumsum(flat["lengths"], out=offsets[1:])
    out = TokenizedRows(flat["input_ids"], flat["labels"], offsets)
    if too_long:
        raise DataValidationError(too_long, header=f"{len(too_long)} row(s) of {source} exceed data.max_length="
                                  f"{max_length} (data.overlength=raise; use truncate or drop to continue)")
    stats.rows_kept = len(out)
    if rows and not out:
        raise DataValidationError(
            [Problem(source, 0, f"all {len(rows)} rows were dropped: {dict(stats.dropped)}")],
            header="no row has a trained token: the assistant-only mask is all zeros (template or data problem)",
        )
    return out, stats
