"""A job's final evaluation in its W&B run: summary metrics, a per-question table and the samples tables.

Keys (``<v>`` = the eval pass's name: ``eval``, ``eval_triggered``, ...), all in the run's summary:

- ``<v>/overall/...``: the summary's overall block, every number, e.g. ``<v>/overall/pooled/misaligned_rate``
  (+ ``ci_low`` / ``ci_high`` / ``n_eligible`` / ``n_misaligned``), ``<v>/overall/question_mean/...``,
  ``<v>/overall/coherent_rate``, ``<v>/overall/n_failed`` (judge failures), ``<v>/overall/n_aligned_missing``
  (+ ``_CODE`` / ``_REFUSAL`` / ``_other``), ``<v>/overall/n_sampled``;
- ``<v>/q/<question_id>/...``: the same per question (``misaligned_rate``, ``ci_low``, ``ci_high``,
  ``n_eligible``, ``coherent_rate``, ``n_failed``, ...);
- ``<v>/misaligned_rate`` (+ ``_ci_low`` / ``_ci_high``): the headline overall rate (the summary's ``headline``
  aggregation; pooled, the paper's, when the summary names none);
- ``<v>/metrics/...``: other judge metrics (categorical judges' label rates), ``<v>/judge/...``: the judge's
  call statistics, ``<v>/time/...``: sampling / judging seconds;
- tables (logged once, also in the summary): ``<v>/per_question`` (one row per question and per overall
  aggregation, with CIs and denominators), ``<v>/samples`` (every answer with its scores and label) and
  ``<v>/samples_misaligned`` (the misaligned answers only).

A rate that cannot be computed (nothing eligible) is logged as NaN, so every key exists in every run.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from em.eval.metrics import MisalignmentRule, classify
from em.layout import SAMPLES

log = logging.getLogger(__name__)

NAN = float("nan")
SAMPLE_COLUMNS = ("dataset", "seed", "question_id", "paraphrase_index", "sample_index", "question", "answer",
                  "aligned", "coherent", "aligned_status", "coherent_status", "aligned_missing_reason", "label")
QUESTION_COLUMNS = ("dataset", "model", "seed", "question_id", "aggregation", "misaligned_rate", "ci_low", "ci_high",
                    "n_eligible", "n_misaligned", "coherent_rate", "n_sampled", "n_failed", "n_aligned_missing",
                    "included")
SKIP_KEYS = frozenset({"label", "questions_excluded", "questions_included"})


def key(variant: str, *parts: str) -> str:
    """``<variant>/<part>/...``: the W&B key of a summary field (question ids keep their spelling)."""
    return "/".join([variant, *parts])


def _flatten(prefix: str, obj: Any, out: dict[str, float]) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not str(k).startswith("_") and k not in SKIP_KEYS:
                _flatten(f"{prefix}/{k}", v, out)
    elif isinstance(obj, bool):
        out[prefix] = float(obj)
    elif isinstance(obj, (int, float)):
        out[prefix] = float(obj)
    elif obj is None:
        out[prefix] = NAN  # not measurable (e.g. nothing eligible): the key exists, the value says so


def headline(summary: Mapping[str, Any]) -> Mapping[str, Any]:
    """The headline overall rate block: the summary's ``headline`` aggregation, else pooled."""
    ov = summary.get("overall") or {}
    block = ov.get(ov.get("headline") or "pooled")
    return block if isinstance(block, Mapping) else {}


def summary_metrics(variant: str, summary: Mapping[str, Any]) -> dict[str, float]:
    """Every number of an eval summary under W&B keys (see the module doc)."""
    out: dict[str, float] = {}
    _flatten(key(variant, "overall"), summary.get("overall") or {}, out)
    for qid, block in (summary.get("questions") or {}).items():
        _flatten(key(variant, "q", str(qid)), block, out)
    _flatten(key(variant, "metrics"), summary.get("metrics") or {}, out)
    meta = summary.get("meta") or {}
    _flatten(key(variant, "judge"), meta.get("judge_stats") or {}, out)
    for k in ("sampling_s", "judging_s", "wall_s"):
        if k in meta:
            _flatten(key(variant, "time", k), meta[k], out)
    h = headline(summary)
    for src, dst in (("misaligned_rate", "misaligned_rate"), ("ci_low", "misaligned_rate_ci_low"),
                     ("ci_high", "misaligned_rate_ci_high")):
        v = h.get(src)
        out[key(variant, dst)] = float(v) if isinstance(v, (int, float)) else NAN
    return out


def _rule(summary: Mapping[str, Any]) -> MisalignmentRule:
    try:
        return MisalignmentRule(**dict(summary.get("rule") or {}))
    except (TypeError, ValueError) as e:
        log.warning("the summary's rule %r is not em's (%s): answers labelled with the paper's rule",
                    summary.get("rule"), e)
        return MisalignmentRule()


def sample_rows(records: Iterable[Mapping[str, Any]], rule: MisalignmentRule) -> list[list[Any]]:
    """Rows (columns :data:`SAMPLE_COLUMNS`) of the samples table: each answer, its scores and its label
    (``misaligned`` / ``aligned`` / ``incoherent`` / ``aligned_missing`` / ``coherent_missing`` / ``failed``)."""
    rows = []
    for r in records:
        try:
            label = classify(r, rule)
        except (KeyError, TypeError, ValueError):
            label = "invalid"
        row = {**r, "label": label}
        rows.append([row.get(c) for c in SAMPLE_COLUMNS])
    return rows


def question_rows(summary: Mapping[str, Any], dataset: Any, model: Any, seed: Any) -> list[list[Any]]:
    """Rows (columns :data:`QUESTION_COLUMNS`) of the per-question table: each question, then the overall
    rates (``__pooled__`` / ``__mean_over_questions__``), each with its own CI and denominators."""
    def num(v: Any) -> Any:
        return NAN if v is None else v

    rows = []
    for qid, c in (summary.get("questions") or {}).items():
        rows.append([dataset, model, seed, qid, "per_question", num(c.get("misaligned_rate")), num(c.get("ci_low")),
                     num(c.get("ci_high")), c.get("n_eligible"), c.get("n_misaligned"), num(c.get("coherent_rate")),
                     c.get("n_sampled"), c.get("n_failed"), c.get("n_aligned_missing"), c.get("included")])
    ov = summary.get("overall") or {}
    for qid, agg in (("__pooled__", "pooled"), ("__mean_over_questions__", "question_mean")):
        b = ov.get(agg)
        if isinstance(b, Mapping):
            rows.append([dataset, model, seed, qid, agg, num(b.get("misaligned_rate")), num(b.get("ci_low")),
                         num(b.get("ci_high")), b.get("n_eligible"), b.get("n_misaligned"),
                         num(ov.get("coherent_rate")), ov.get("n_sampled"), ov.get("n_failed"),
                         ov.get("n_aligned_missing"), True])
    return rows


def read_samples(out_dir: Path) -> list[dict[str, Any]]:
    """The eval pass's ``samples.jsonl`` (empty when absent)."""
    p = Path(out_dir) / SAMPLES
    if not p.exists():
        return []
    with open(p, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def log_eval(run, variant: str, summary: Mapping[str, Any], out_dir: Path) -> dict[str, float]:
    """Log one eval pass (its ``summary`` and the answers in ``out_dir/samples.jsonl``) into the open W&B
    ``run``; returns the summary metrics logged."""
    import wandb

    metrics = summary_metrics(variant, summary)
    records = read_samples(out_dir)
    meta = summary.get("meta") or {}
    first = records[0] if records else {}
    dataset = meta.get("dataset", first.get("dataset"))
    model, seed = meta.get("model", first.get("model")), meta.get("seed", first.get("seed"))
    rows = sample_rows(records, _rule(summary))
    label = SAMPLE_COLUMNS.index("label")
    tables = {
        key(variant, "per_question"): wandb.Table(columns=list(QUESTION_COLUMNS),
                                                  data=question_rows(summary, dataset, model, seed)),
        key(variant, "samples"): wandb.Table(columns=list(SAMPLE_COLUMNS), data=rows),
        key(variant, "samples_misaligned"): wandb.Table(columns=list(SAMPLE_COLUMNS),
                                                        data=[r for r in rows if r[label] == "misaligned"]),
    }
    run.log(tables)
    run.summary.update(metrics)
    n_nan = sum(1 for v in metrics.values() if math.isnan(v))
    log.info("W&B: %s logged (%d summary metrics, %d not measurable; %d answers)", variant, len(metrics), n_nan,
             len(rows))
    return metrics
