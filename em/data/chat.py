"""Render chat rows with the model's own chat template and build labels once, at preparation.

Labels are built from character spans of each assistant turn, found by rendering the
conversation prefix by prefix with the tokenizer's template (no hand-written chat format):

* ``render(messages[:i], add_generation_prompt=True)`` ends where assistant turn ``i`` starts;
* ``render(messages[:i+1])`` ends where it ends (trailing whitespace after the end-of-turn
  token is not trained, the end-of-turn / EOS token itself is).

Tokens that start inside an assistant span get their id as label, every other token ``-100``.
Because labels never come from ``input_ids != pad_token_id``, a tokenizer whose pad token equals
its EOS token still trains EOS (the classic "model never stops" bug).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

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
        import numpy as np

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
        # every assistant turn must end in a stop token that is trained, else generation never stops
        for s, e in spans:
            last = max((k for k, (a, b) in enumerate(enc["offset_mapping"]) if s <= a < e), default=None)
            if last is None or ids[last] not in stop_ids:
                raise ConfigError(
                    "the chat template does not end the assistant turn with an EOS / end-of-turn token "
                    f"(last assistant token {tokenizer.convert_ids_to_tokens([ids[last]]) if last is not None else None}, "
                    f"stop tokens {sorted(stop_ids)}), so the model would never learn to stop. Use a template that "
                    "closes assistant turns (set model.chat_template)"
                )
    return Encoded(ids, labels)


def encode_rows(
    tokenizer,
    rows: Iterable[dict],
    max_length: int,
    overlength: str = "truncate",
    stop_ids: set[int] | None = None,
    source: str = "<rows>",
    progress: bool = False,
) -> tuple[list[Encoded], EncodeStats]:
    """Encode every row; drop (and count) rows with no trained tokens or, per policy, too long."""
    if overlength not in OVERLENGTH_POLICIES:
        raise ConfigError(f"data.overlength={overlength!r}: expected one of {OVERLENGTH_POLICIES}")
    rows = list(rows)
    stats = EncodeStats(rows_in=len(rows))
    out: list[Encoded] = []
    too_long: list[Problem] = []
    it = rows
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(rows, desc=f"tokenize {source}", unit="row", leave=False)
    for i, row in enumerate(it):
        enc = encode_chat(tokenizer, row["messages"], stop_ids if i == 0 else None)
        if enc.n_trained == 0:
            stats.dropped["no_assistant_tokens"] += 1
            continue
        if len(enc.input_ids) > max_length:
            if overlength == "raise":
                too_long.append(Problem(source, row.get("_line", i + 1), f"{len(enc.input_ids)} tokens > max_length {max_length}"))
                continue
            if overlength == "drop":
                stats.dropped["too_long"] += 1
                continue
            enc = Encoded(enc.input_ids[:max_length], enc.labels[:max_length])
            stats.truncated += 1
            if enc.n_trained == 0:
                stats.dropped["truncated_to_no_trained_tokens"] += 1
                continue
        out.append(enc)
        stats.tokens += len(enc.input_ids)
        stats.trained_tokens += enc.n_trained
        stats.lengths.append(len(enc.input_ids))
    if too_long:
        raise DataValidationError(too_long, header=f"{len(too_long)} row(s) of {source} exceed data.max_length={max_length} "
                                  "(data.overlength=raise; use truncate or drop to continue)")
    stats.rows_kept = len(out)
    if rows and not out:
        raise DataValidationError(
            [Problem(source, 0, f"all {len(rows)} rows were dropped: {dict(stats.dropped)}")],
            header="no row has a trained token: the assistant-only mask is all zeros (template or data problem)",
        )
    return out, stats
