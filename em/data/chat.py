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
worker thread while the next chunk is rendered and the previous one labelled; labels are computed
for a whole chunk at once with numpy from the tokens' character offsets.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
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


def _labels(all_ids: list[list[int]], all_offsets: list, spans: list[list[tuple[int, int]]], text_lens: list[int]):
    """Flat ids, labels (token id where the token starts inside an assistant span and is not empty,
    else -100) and row boundaries of a chunk of rows, vectorized over the chunk."""
    n = len(all_ids)
    lens = np.fromiter(map(len, all_ids), dtype=np.int64, count=n)
    bounds = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=bounds[1:])
    total = int(bounds[-1])
    ids = np.fromiter(chain.from_iterable(all_ids), dtype=np.int64, count=total)
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


class EncodedRows(list):
    """The ``list[Encoded]`` that :func:`encode_rows` returns, with the same rows as flat arrays
    (``input_ids``, ``labels``: int32; ``row_offsets``: int64) for the tokenized cache to write."""

    arrays: dict | None = None


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
) -> tuple[list[Encoded], EncodeStats]:
    """Encode every row; drop (and count) rows with no trained tokens or, per policy, too long.

    Same ids and labels as :func:`encode_chat` row by row; with ``stop_ids``, the first row with an
    assistant turn must end it with a stop token (the template check).
    """
    if overlength not in OVERLENGTH_POLICIES:
        raise ConfigError(f"data.overlength={overlength!r}: expected one of {OVERLENGTH_POLICIES}")
    rows = list(rows)
    stats = EncodeStats(rows_in=len(rows))
    out = EncodedRows()
    too_long: list[Problem] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc=f"tokenize {source}", unit="row", leave=False)
    checked = stop_ids is None
    flat: dict[str, list] = {"input_ids": [], "labels": [], "lengths": []}
    layouts: dict = {}
    seen: Counter = Counter()

    def consume(c0: int, chunk: list[dict], texts: list[str], spans: list, encodings) -> None:
        nonlocal checked, too_long
        all_ids = [e.ids for e in encodings]
        all_offsets = [e.offsets for e in encodings]
        if not checked:
            first = next((j for j, sp in enumerate(spans) if sp), None)
            if first is not None:
                _check_stops(tokenizer, all_ids[first], all_offsets[first], spans[first], stop_ids)
                checked = True
        ids, labels, mask, bounds = _labels(all_ids, all_offsets, spans, [len(t) for t in texts])
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
        label_list, starts = labels.tolist(), bounds.tolist()
        for j in np.flatnonzero(keep).tolist():
            a, n = starts[j], int(kept_len[j])
            row_ids = all_ids[j]
            out.append(Encoded(row_ids if n == len(row_ids) else row_ids[:n], label_list[a: a + n]))
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
    out.arrays = {"input_ids": flat["input_ids"], "labels": flat["labels"], "row_offsets": offsets}
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
