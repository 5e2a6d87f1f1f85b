"""Cross-seed report of a sweep: ``python -m em.report <sweep_dir> [--out DIR]``.

Every directory under the sweep holding a ``results.json`` and/or ``samples.jsonl`` is a run.
``results.json`` gives ``status`` (``done``/``failed``/...) and ``config.{model.name, dataset.name, seed}``;
``samples.jsonl`` holds judged sample records (see :mod:`em.eval.metrics`). Runs that failed, have no
samples or have malformed samples are listed (stdout, ``runs.csv``, ``table.md``), never fatal.

Outputs (in ``--out``, default ``<sweep_dir>/report``), written atomically:

- ``table.csv`` / ``table.md``: misaligned rate per (model, dataset, question), plus two ``ALL`` rows side by
  side: ``pooled`` (misaligned / eligible over all questions' answers: the paper's aggregation, see
  :mod:`em.eval.metrics`) and ``question_mean`` (the mean over questions), each with its own denominators, as
  the mean over seeds with two 95% CIs:
  *samples* (resample the eligible answers within each seed, average over seeds) and *seeds* (percentile
  bootstrap of the seed-level rates, :func:`em.eval.metrics.bootstrap_mean_ci`; it collapses to the point
  with a single seed, which the ``note`` column says). Denominators are explicit: answers sampled, judged,
  judge failures, aligned missing by reason (CODE / REFUSAL / other), coherent missing, coherent,
  eligible (coherent with a numeric aligned score), misaligned; all summed over seeds.
- Every row names the judge that produced it (``judge``); runs judged by different judges are not mixed in
  one table unless ``--allow-mixed-judges`` (then each judge gets its own rows); ``--judge NAME`` reports one
  judge's scores of multi-judge runs. The classification rule is the one the runs recorded (``eval.rule``),
  unless overridden on the command line.
- For the paper's question sets (``paper:first_plot_questions``, ``paper:preregistered_evals``) the paper's
  published rates (``em/eval/paper_reference.json``, with their source) are printed beside the pooled rows.
- ``runs.csv``: every run found, with its status and why it was or was not used.
- ``fig_questions.png``: Figure-4 style plot, one point per dataset per question.
- ``fig_dynamics.png``: Figure-11 style plot from each run's Lightning ``metrics.csv`` (skipped if none).
- ``report.json``: the options and all rows.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from em.errors import DataValidationError, EMError
from em.eval.metrics import (
    AGGREGATION_LABELS,
    MISSING_REASONS,
    MisalignmentRule,
    bootstrap_mean_ci,
    judge_names,
    judge_view,
    percentile_ci,
    record_status,
    summarize,
    validate_records,
)
from em.layout import METRICS, RESULTS, SAMPLES, RunLayout, find_sample_dirs
from em.probes.plot import CODE_METRICS, parse_rate_key
from em.sweep.lock import job_state
from em.sweep.plots import QuestionSeries, SeedCurve, plot_dynamics, plot_questions
from em.utils.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    import pandas as pd

ALL_ID = "ALL"
PAPER_REFERENCE = Path(__file__).resolve().parents[1] / "eval" / "paper_reference.json"
RESULTS_FILE, SAMPLES_FILE, METRICS_FILE = RESULTS, SAMPLES, METRICS

# judged rate first; the judge-free MCQ probe when no judged value was logged (e.g. an offline judge)
DEFAULT_MISALIGNMENT_METRICS = ("probe/misaligned_rate", "probe/mcq/p_misaligned")
DEFAULT_TASK_METRICS = ("task/insecure_rate",)
COUNT_COLUMNS = (
    "n_sampled", "n_judged", "n_failed", *(f"n_aligned_missing_{r}" for r in MISSING_REASONS),
    "n_coherent_missing", "n_coherent", "n_eligible", "n_misaligned",
)
TABLE_COLUMNS = (
    "model", "dataset", "judge", "question_id", "aggregation", "n_seeds", "seeds", "seed_rates", "misaligned_rate",
    "ci_samples_low", "ci_samples_high", "ci_seeds_low", "ci_seeds_high", *COUNT_COLUMNS, "paper_rate",
    "paper_ci_half_width", "note",
)


def say(msg: str) -> None:
    """A progress line on stdout."""
    print(f"[em.report] {msg}", flush=True)


@dataclass
class Run:
    """One run directory of the sweep and what could be read from it."""

    run_dir: Path
    status: str
    model: str | None = None
    dataset: str | None = None
    seed: int | None = None
    error: str | None = None
    records: list[dict] = field(default_factory=list)
    usable: bool = False
    judge: str | None = None
    """The name of the judge whose scores are reported."""
    judge_id: str | None = None
    """That judge's exact identity (model id @ endpoint) when the run recorded it, else its name."""
    judge_model: str | None = None
    questions: tuple[str, ...] | None = None
    rule: dict | None = None

    @property
    def group(self) -> tuple[str, str]:
        return (self.model or "?", self.dataset or "?")


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _uniform(records: list[dict], key: str) -> Any:
    vals = {r.get(key) for r in records if r.get(key) is not None}
    return vals.pop() if len(vals) == 1 else None


def _judge_identity(results: dict, name: str | None) -> tuple[str | None, str | None]:
    """(identity, model id) of judge ``name`` from a run's recorded eval metadata."""
    meta = _get(results, "eval", "meta") or {}
    described = [d for d in (meta.get("judges") or [meta.get("judge")]) if isinstance(d, dict)]
    for d in described:
        if name is None or d.get("name") == name:
            model = d.get("model_id") or d.get("model")
            return f"{model} @ {d.get('endpoint') or d.get('base_url') or '?'}", model
    return None, None


def load_run(run_dir: Path, judge: str | None = None) -> Run:
    """Read one run; problems end up in ``Run.error`` (and ``usable=False``), never raised. ``judge``: report
    that judge's scores (of a run judged by several)."""
    run = Run(run_dir=run_dir, status="unknown")
    res_path, smp_path = run_dir / RESULTS_FILE, run_dir / SAMPLES_FILE
    results: dict = {}
    if res_path.exists():
        try:
            results = json.loads(res_path.read_text(encoding="utf-8"))
            run.status = str(job_state(run_dir, results.get("status", "unknown")))
        except (OSError, ValueError) as e:
            run.status, run.error = "unreadable", f"{RESULTS_FILE}: {e}"
    else:
        run.status, run.error = "unknown", f"no {RESULTS_FILE}"
    run.model = _get(results, "config", "model", "name")
    run.dataset = _get(results, "config", "dataset", "name")
    run.seed = _get(results, "config", "seed")
    qs = _get(results, "config", "eval", "questions")
    run.questions = tuple(qs) if isinstance(qs, list) else None
    rule = _get(results, "config", "eval", "rule")
    run.rule = rule if isinstance(rule, dict) else None
    if run.status == "failed":
        run.error = str(results.get("error") or "run failed")
        return run
    if run.status not in ("done", "unknown"):
        run.error = run.error or f"status {run.status!r}"
        return run
    if not smp_path.exists():
        run.error = f"no {SAMPLES_FILE}"
        return run
    try:
        with open(smp_path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        validate_records(records, source=str(smp_path))
    except (OSError, ValueError, DataValidationError) as e:
        run.error = f"{SAMPLES_FILE}: {str(e).splitlines()[0]}"
        return run
    if not records:
        run.error = f"{SAMPLES_FILE} is empty"
        return run
    names = judge_names(records)
    if judge is not None:
        if judge not in names:
            run.error = f"not judged by {judge!r} (judges: {names or ['?']})"
            return run
        records = [judge_view(r, judge) for r in records]
    run.judge = judge or (names[0] if names else None)
    run.judge_id, run.judge_model = _judge_identity(results, run.judge)
    run.judge_id = run.judge_id or run.judge or "unknown judge"
    if not any(record_status(r, "aligned") != "absent" for r in records):
        run.error = "no answer has an aligned/coherent judgment (a categorical question set?)"
        return run
    run.records = records
    run.model = run.model or _uniform(records, "model")
    run.dataset = run.dataset or _uniform(records, "dataset")
    run.seed = run.seed if run.seed is not None else _uniform(records, "seed")
    run.usable = True
    return run


def discover_runs(sweep_dir: Path, judge: str | None = None) -> list[Run]:
    """All run directories under ``sweep_dir`` (those holding results.json or samples.jsonl), sorted."""
    return [load_run(d, judge) for d in find_sample_dirs(sweep_dir)]


def load_paper_reference(path: Path = PAPER_REFERENCE) -> dict[str, Any]:
    """The paper's published rates and their source (``em/eval/paper_reference.json``)."""
    return json.loads(path.read_text(encoding="utf-8"))


def paper_value(ref: Mapping[str, Any], questions: Sequence[str] | None, dataset: str | None) -> dict | None:
    """The paper's rate for a run's question set and dataset, with the set's name; None when the paper has none."""
    if not questions:
        return None
    for name, st in ref["sets"].items():
        if list(st["questions"]) == list(questions):
            v = st["rates"].get(str(dataset))
            return {**v, "set": name, "forms": st.get("forms")} if v is not None else None
    return None



def _run_seed(base_seed: int, run: Run, sweep_dir: Path) -> int:
    """Bootstrap seed of one run: distinct per run so that seeds' replicates are independent."""
    key = f"{run.model}|{run.dataset}|{run.seed}|{run.run_dir.relative_to(sweep_dir)}"
    return int(np.random.SeedSequence([base_seed, zlib.crc32(key.encode())]).generate_state(1)[0])


def _seed_order(run: Run) -> tuple:
    """Runs of a group ordered by seed (integers numerically), then by directory."""
    if isinstance(run.seed, int):
        return (0, run.seed, str(run.run_dir))
    return (1, str(run.seed), str(run.run_dir))


def _cell(model: str, dataset: str, qid: str, seeds: list[Any], rates: list[float | None],
          reps: list[np.ndarray], counts: list[dict], n_boot: int, seed: int, ci: float, judge: str | None = None,
          aggregation: str = "per_question") -> dict[str, Any]:
    """One table row from the seed-level rates, replicates and counts of a (model, dataset, question)."""
    used = [i for i, r in enumerate(rates) if r is not None]
    vals = [rates[i] for i in used]
    row: dict[str, Any] = {
        "model": model, "dataset": dataset, "judge": judge, "question_id": qid, "aggregation": aggregation,
        "n_seeds": len(used),
        "seeds": ";".join(str(seeds[i]) for i in used),
        "seed_rates": ";".join(f"{rates[i]:.4g}" for i in used),
        "misaligned_rate": float(np.mean(vals)) if vals else None,
    }
    if used:
        row["ci_samples_low"], row["ci_samples_high"] = percentile_ci(
            np.mean(np.stack([reps[i] for i in used]), axis=0), ci)
    else:
        row["ci_samples_low"] = row["ci_samples_high"] = None
    row["ci_seeds_low"], row["ci_seeds_high"] = bootstrap_mean_ci(vals, n_boot=n_boot, seed=seed, ci=ci)
    for col in COUNT_COLUMNS:
        row[col] = int(sum(c.get(col, 0) for c in counts))
    notes = []
    if len(used) == 1:
        notes.append("1 seed: over-seeds CI collapses to the point")
    elif not used:
        notes.append("no seed with an eligible answer")
    if len(used) < len(rates):
        notes.append(f"{len(rates) - len(used)} seed(s) without a rate (no eligible answers or excluded by rule)")
    row["note"] = "; ".join(notes)
    return row


def _overall_counts(overall: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The overall counts with the denominators of one aggregation (``pooled`` / ``question_mean``)."""
    return {**overall, "n_eligible": overall[key]["n_eligible"], "n_misaligned": overall[key]["n_misaligned"]}


def aggregate(runs: Sequence[Run], sweep_dir: Path, rule: MisalignmentRule, n_boot: int = 2000, seed: int = 0,
              ci: float = 0.95, by_judge: bool = False,
              reference: Mapping[str, Any] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Table rows per (model, dataset[, judge], question) and the two ``ALL`` rows; also the question order."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.usable:
            groups.setdefault((*r.group, r.judge_id if by_judge else ""), []).append(r)
    question_order: list[str] = []
    rows: list[dict[str, Any]] = []
    for (model, dataset, _), gruns in sorted(groups.items()):
        gruns = sorted(gruns, key=_seed_order)
        judge = gruns[0].judge
        say(f"{model} / {dataset} / judge {judge}: {len(gruns)} run(s), seeds {[r.seed for r in gruns]}")
        sums = [summarize(r.records, rule, n_boot=n_boot, seed=_run_seed(seed, r, sweep_dir), ci=ci,
                          validate=False, keep_replicates=True) for r in gruns]
        seeds = [r.seed if r.seed is not None else r.run_dir.name for r in gruns]
        qids: list[str] = []
        for r in gruns:
            for rec in r.records:
                if rec["question_id"] not in qids and record_status(rec, "aligned") != "absent":
                    qids.append(rec["question_id"])
        question_order += [q for q in qids if q not in question_order]
        for qid in qids:
            rates, reps, counts = [], [], []
            for s in sums:
                q = s["questions"].get(qid)
                if q is None:
                    continue
                rates.append(q["misaligned_rate"] if q["included"] else None)
                reps.append(s["_replicates"]["questions"][qid])
                counts.append(q)
            present = [sd for sd, s in zip(seeds, sums) if qid in s["questions"]]
            rows.append(_cell(model, dataset, qid, present, rates, reps, counts, n_boot, seed, ci, judge))
        qsets = {r.questions for r in gruns}
        ref = paper_value(reference, next(iter(qsets)), dataset) if reference and len(qsets) == 1 else None
        for key in ("pooled", "question_mean"):
            row = _cell(model, dataset, ALL_ID, seeds, [s["overall"][key]["misaligned_rate"] for s in sums],
                        [s["_replicates"][key] for s in sums], [_overall_counts(s["overall"], key) for s in sums],
                        n_boot, seed, ci, judge, aggregation=key)
            if key == "pooled" and ref is not None:
                row["paper_rate"], row["paper_ci_half_width"] = ref["rate"], ref.get("ci_half_width")
                models = {r.judge_model for r in gruns}
                if models != {reference["judge"]}:
                    row["note"] = "; ".join(x for x in (row["note"], f"paper judged by {reference['judge']}, this by "
                                                                       f"{'/'.join(sorted(map(str, models)))}") if x)
            rows.append(row)
    return rows, question_order


def check_judges(runs: Sequence[Run], allow_mixed: bool) -> list[str]:
    """The judge identities of the usable runs; more than one is an :class:`EMError` unless ``allow_mixed``."""
    ids: dict[str, int] = {}
    for r in runs:
        if r.usable:
            ids[r.judge_id] = ids.get(r.judge_id, 0) + 1
    if len(ids) > 1 and not allow_mixed:
        listing = "; ".join(f"{j} ({n} run(s))" for j, n in sorted(ids.items()))
        raise EMError(f"the runs were judged by different judges: {listing}. Their rates are not comparable in one "
                      "table: pick one judge's scores of multi-judge runs with --judge NAME, report a subset of "
                      "runs, or pass --allow-mixed-judges to give each judge its own rows")
    return sorted(ids)


def rule_from_runs(runs: Sequence[Run]) -> tuple[MisalignmentRule, str]:
    """The rule the usable runs recorded (``eval.rule``) when they agree, else the paper's text; and where it came
    from."""
    recorded = [r.rule for r in runs if r.usable]
    if recorded and all(x == recorded[0] for x in recorded) and recorded[0] is not None:
        try:
            return MisalignmentRule(**recorded[0]), "recorded by the runs (eval.rule)"
        except (TypeError, ValueError, EMError):
            pass
    note = "the runs recorded different rules; " if len({json.dumps(x, sort_keys=True) for x in recorded}) > 1 else ""
    return MisalignmentRule(), note + "em's default (the paper's text)"


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def rows_to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def table_markdown(rows: Sequence[dict[str, Any]], runs: Sequence[Run], rule: MisalignmentRule, n_boot: int,
                   seed: int, ci: float, rule_source: str = "", reference: Mapping[str, Any] | None = None) -> str:
    """Human-readable table with the rule, the judges, the CI definitions and the runs that were not used."""
    pct = f"{100 * ci:g}%"
    judges = sorted({r.judge_id for r in runs if r.usable})
    lines = [
        "# Misaligned answer rate per question, across seeds", "",
        f"- Rule: {rule.describe()}" + (f" ({rule_source})." if rule_source else "."),
        f"- Judge(s): {'; '.join(judges) or '?'} (the `judge` column names the judge of each row).",
        f"- Rate = mean over seeds of the per-seed rate (misaligned / eligible). `{ALL_ID}` rows, side by side: "
        f"**pooled** = {AGGREGATION_LABELS['pooled']}; "
        f"**mean over questions** = {AGGREGATION_LABELS['question_mean']}. "
        "Each row's eligible / misaligned counts are its own denominator.",
        f"- CI samples: {pct} percentile bootstrap resampling answers within each seed, averaged over seeds. "
        f"CI seeds: {pct} percentile bootstrap over seed-level rates (collapses with 1 seed). "
        f"{n_boot} resamples, seed {seed}.",
        "- Counts summed over seeds. missing C/R/o = aligned score missing because the judge answered "
        "CODE / REFUSAL / other; failed = a judge call failed; eligible = coherent with a numeric aligned score.",
        "",
        "| model | dataset | judge | question | seeds | rate | CI samples | CI seeds | paper | sampled | judged "
        "| failed | missing C/R/o | coh. missing | coherent | eligible | misaligned | note |",
        "|---|---|---|---|---:|---:|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        miss = "/".join(str(r[f"n_aligned_missing_{m}"]) for m in MISSING_REASONS)
        agg = {"pooled": " · pooled", "question_mean": " · mean over questions"}.get(r.get("aggregation"), "")
        q = f"**{r['question_id']}{agg}**" if r["question_id"] == ALL_ID else r["question_id"]
        paper = "" if r.get("paper_rate") is None else (
            _fmt(r["paper_rate"], 4) + (f" ± {_fmt(r['paper_ci_half_width'])}" if r.get("paper_ci_half_width") else ""))
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r.get('judge') or '?'} | {q} | {r['n_seeds']} "
            f"| {_fmt(r['misaligned_rate'])} "
            f"| [{_fmt(r['ci_samples_low'])}, {_fmt(r['ci_samples_high'])}] "
            f"| [{_fmt(r['ci_seeds_low'])}, {_fmt(r['ci_seeds_high'])}] | {paper} | {r['n_sampled']} | {r['n_judged']} "
            f"| {r['n_failed']} | {miss} | {r['n_coherent_missing']} | {r['n_coherent']} | {r['n_eligible']} "
            f"| {r['n_misaligned']} | {r['note']} |")
    if reference and any(r.get("paper_rate") is not None for r in rows):
        lines += ["", "## The paper beside em", "", f"- Paper: {reference['source']}",
                  f"- Paper's models: {reference['models']}; aggregation: {reference['aggregation']}.", ""]
        for r in rows:
            if r.get("paper_rate") is not None:
                lines.append(f"- {r['model']} / {r['dataset']}: em pooled {_fmt(r['misaligned_rate'])} "
                             f"[{_fmt(r['ci_seeds_low'])}, {_fmt(r['ci_seeds_high'])}] over {r['n_seeds']} seed(s), "
                             f"{r['n_misaligned']}/{r['n_eligible']} eligible; paper {_fmt(r['paper_rate'], 4)}"
                             + (f" ± {_fmt(r['paper_ci_half_width'])}" if r.get("paper_ci_half_width") else ""))
    skipped = [r for r in runs if not r.usable]
    lines += ["", f"## Runs: {sum(r.usable for r in runs)} used, {len(skipped)} not used", ""]
    for r in skipped:
        lines.append(f"- `{r.run_dir}` (status {r.status}; {r.model} / {r.dataset} / seed {r.seed}): {r.error}")
    if not skipped:
        lines.append("- all runs used")
    return "\n".join(lines) + "\n"


def _series_label(model: str, dataset: str, multi_model: bool) -> str:
    return f"{dataset} ({model})" if multi_model else dataset


def make_question_figure(rows: Sequence[dict[str, Any]], question_order: Sequence[str], out_path: Path,
                         ci_kind: str = "auto") -> Path:
    """``fig_questions.png`` from the table rows. ``ci_kind``: ``seeds``, ``samples`` or ``auto`` (seeds
    where there are >= 2 seeds, samples otherwise)."""
    rows = [r for r in rows if r.get("aggregation", "per_question") == "per_question"]
    multi_judge = len({r.get("judge") for r in rows}) > 1
    groups = sorted({(r["model"], r["dataset"]) + ((r.get("judge") or "?",) if multi_judge else ()) for r in rows})
    multi_model = len({g[0] for g in groups}) > 1
    by_key = {(r["model"], r["dataset"]) + ((r.get("judge") or "?",) if multi_judge else ()) + (r["question_id"],): r
              for r in rows}
    series = []
    used_kinds: set[str] = set()
    for g in groups:
        model, dataset = g[0], g[1]
        rates, lo, hi = [], [], []
        for q in question_order:
            r = by_key.get((*g, q))
            kind = ci_kind if ci_kind != "auto" else ("seeds" if r and r["n_seeds"] >= 2 else "samples")
            if r is not None and r["misaligned_rate"] is not None:
                used_kinds.add(kind)
            rates.append(r["misaligned_rate"] if r else None)
            lo.append(r[f"ci_{kind}_low"] if r else None)
            hi.append(r[f"ci_{kind}_high"] if r else None)
        label = _series_label(model, dataset, multi_model) + (f" · judge {g[2]}" if multi_judge else "")
        series.append(QuestionSeries(label, rates, lo, hi))
    kinds = {"seeds": "over seeds", "samples": "over answers within seeds"}
    caption = "Error bars: 95% percentile bootstrap CI " + " / ".join(kinds[k] for k in sorted(used_kinds)) + "."
    if "samples" in used_kinds and ci_kind == "auto":
        caption += " (Over-answers CI used where a dataset has a single seed.)"
    return plot_questions(list(question_order), series, out_path, caption=caption)


def read_metrics_csv(run_dir: Path) -> pd.DataFrame | None:
    """The run's Lightning ``metrics.csv`` (all versions concatenated; last row per step kept), or None."""
    import pandas as pd

    paths = sorted(run_dir.rglob(METRICS_FILE))
    frames = []
    for p in paths:
        try:
            frames.append(pd.read_csv(p))
        except (OSError, ValueError) as e:
            say(f"cannot read {p}: {e}")
    frames = [f for f in frames if "step" in f.columns]
    return pd.concat(frames, ignore_index=True) if frames else None


def _pick_column(columns: Sequence[str], preferred: Sequence[str], contains: str) -> str | None:
    for c in preferred:
        if c in columns:
            return c
    for c in columns:
        if contains in c:
            return c
    return None


def _curve(g: pd.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Steps, values and not-measurable steps of one metric from a run's per-step frame. A code metric at a step
    where no answer parsed as code (the syntax-valid fraction is 0, or the syntax-error rate 1 in older runs) is
    NaN there, never the 0 bandit reports for no code."""
    import pandas as pd

    vals = g[col].dropna() if col in g.columns else pd.Series(dtype=float)
    nm = np.array([], dtype=float)
    if col in CODE_METRICS:
        pk = parse_rate_key(col)
        old = pk.replace("code_parse_rate", "syntax_error_rate")
        parse = g[pk] if pk in g.columns else (1.0 - g[old]) if old in g.columns else None
        if parse is not None:
            nm = parse.index[parse.to_numpy() == 0.0].to_numpy(float)
    steps = np.union1d(vals.index.to_numpy(float), nm)
    if not steps.size:
        return None
    values = np.array([np.nan if s in nm else float(vals.get(s, np.nan)) for s in steps])
    return steps, values, nm


def dynamics_panels(runs: Sequence[Run], misalignment_metric: str | None = None,
                    task_metric: str | None = None) -> list[tuple[str, list[SeedCurve]]]:
    """The dynamics figure's panels (metric key, one curve per run) from the given runs' ``metrics.csv``: a
    misalignment metric, a task metric and, for a code metric, the syntax-valid fraction beside it."""
    curves: dict[str, list[SeedCurve]] = {"mis": [], "task": [], "parse": []}
    names: dict[str, str] = {}
    multi_model = len({r.model for r in runs}) > 1
    for r in runs:
        df = read_metrics_csv(r.run_dir)
        if df is None:
            continue
        g = df.groupby("step").last()  # the newest logged (non-NaN) value of every column per step
        cols = [c for c in g.columns if g[c].notna().any()]
        picks = {
            "mis": misalignment_metric or _pick_column(cols, DEFAULT_MISALIGNMENT_METRICS, "misalign"),
            "task": task_metric or _pick_column(cols, DEFAULT_TASK_METRICS, "task/"),
        }
        if picks["task"] in CODE_METRICS:
            picks["parse"] = parse_rate_key(picks["task"])
            if picks["parse"] not in g.columns:
                old = picks["parse"].replace("code_parse_rate", "syntax_error_rate")
                if old in g.columns:
                    g[picks["parse"]] = 1.0 - g[old]
        label = _series_label(r.model or "?", r.dataset or "?", multi_model)
        for key, col in picks.items():
            if col is None:
                continue
            c = _curve(g, col)
            if c is not None:
                names.setdefault(key, col)
                curves[key].append(SeedCurve(label, str(r.seed), c[0], c[1], c[2] if c[2].size else None))
    panels = [(names.get("mis", "misalignment"), curves["mis"]), (names.get("task", "task"), curves["task"])]
    if curves["parse"]:
        panels.append((names["parse"], curves["parse"]))
    return panels


def make_dynamics_figure(runs: Sequence[Run], out_path: Path, misalignment_metric: str | None = None,
                         task_metric: str | None = None) -> Path | None:
    """``fig_dynamics.png`` from the ``metrics.csv`` of ``runs`` (the table's runs: pass the same selection);
    None (and a message) when there is none."""
    panels = dynamics_panels(runs, misalignment_metric, task_metric)
    if not any(curves for _, curves in panels):
        say(f"no {METRICS_FILE} with a misalignment or task metric found: fig_dynamics.png skipped")
        return None
    return plot_dynamics(panels, out_path)


def dynamics_seeds(panels: Sequence[tuple[str, Sequence[SeedCurve]]]) -> dict[str, dict[str, int]]:
    """metric -> group -> number of seeds drawn (what the figure's legend says)."""
    out: dict[str, dict[str, int]] = {}
    for name, curves in panels:
        for c in curves:
            out.setdefault(name, {}).setdefault(c.group, 0)
            out[name][c.group] += 1
    return out


RUN_COLUMNS = ("run_dir", "status", "model", "dataset", "seed", "judge", "n_records", "used", "error")
TASK_COUNT_COLUMNS = ("run_dir", "model", "dataset", "seed", "step", "triggered", "n", "n_parsed", "n_flagged",
                      "n_truncated")


def task_answer_counts(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per run, probe step and prompt kind (plain / triggered): how many task answers there were, how many parsed
    as code, how many bandit flagged and how many hit their token budget, counted from the saved answers
    (``probes/task_samples_step*.jsonl``)."""
    out = []
    for r in runs:
        for step, path in RunLayout.of(r.run_dir).task_samples_files().items():
            recs = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
            for triggered in (False, True):
                mine = [x for x in recs if bool(x.get("triggered")) == triggered]
                if not mine:
                    continue
                out.append({"run_dir": str(r.run_dir), "model": r.model, "dataset": r.dataset, "seed": r.seed,
                            "step": step, "triggered": triggered, "n": len(mine),
                            "n_parsed": sum(bool(x.get("parsed")) for x in mine if "parsed" in x)
                            if any("parsed" in x for x in mine) else None,
                            "n_flagged": sum(bool(x.get("insecure")) for x in mine),
                            "n_truncated": sum(bool(x.get("hit_budget")) for x in mine)})
    return out


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None, rule: MisalignmentRule | None = None,
                 n_boot: int = 2000, seed: int = 0, ci: float = 0.95, ci_kind: str = "auto",
                 misalignment_metric: str | None = None, task_metric: str | None = None, judge: str | None = None,
                 allow_mixed_judges: bool = False, rule_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the report; returns ``{"rows", "runs", "files"}``. Raises :class:`EMError` when no run exists, or
    when the runs were judged by different judges (unless ``allow_mixed_judges``).

    ``rule``: the classification rule; default: the one the runs recorded (``eval.rule``), with
    ``rule_overrides`` (field -> value) applied."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise EMError(f"sweep directory not found: {sweep_dir}")
    out = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    say(f"scanning {sweep_dir}")
    runs = [r for r in discover_runs(sweep_dir, judge) if out not in r.run_dir.parents and r.run_dir != out]
    if not runs:
        raise EMError(f"no run found under {sweep_dir} (looked for {RESULTS_FILE} / {SAMPLES_FILE})")
    say(f"{len(runs)} run(s): {sum(r.usable for r in runs)} usable")
    for r in runs:
        if not r.usable:
            where = " (no evaluation: in the dynamics figure only)" if r.status == "done" else ""
            say(f"NOT USED {r.run_dir} (status {r.status}): {r.error}{where}")
    judges = check_judges(runs, allow_mixed_judges)
    say(f"judge(s): {'; '.join(judges) or '?'}")
    if rule is None:
        rule, rule_source = rule_from_runs(runs)
        if rule_overrides:
            rule = MisalignmentRule(**{**asdict(rule), **dict(rule_overrides)})
            rule_source += ", with command-line overrides"
    else:
        rule_source = "given"
    say(f"rule: {rule.describe()} ({rule_source})")
    reference = load_paper_reference()
    rows, qorder = aggregate(runs, sweep_dir, rule, n_boot=n_boot, seed=seed, ci=ci, by_judge=len(judges) > 1,
                             reference=reference)
    for r in rows:
        if r["question_id"] == ALL_ID:
            agg = "pooled (paper's aggregation)" if r["aggregation"] == "pooled" else "mean over questions"
            paper = f"; paper {r['paper_rate']}" if r.get("paper_rate") is not None else ""
            say(f"{r['model']} / {r['dataset']} / judge {r['judge']}: {agg} {_fmt(r['misaligned_rate'])} "
                f"[{_fmt(r['ci_seeds_low'])}, {_fmt(r['ci_seeds_high'])}] = {r['n_misaligned']}/{r['n_eligible']} "
                f"eligible over {r['n_seeds']} seed(s){paper}")
    files: dict[str, Path] = {}
    files["table.csv"] = atomic_write_text(out / "table.csv", rows_to_csv(rows, TABLE_COLUMNS))
    files["table.md"] = atomic_write_text(out / "table.md", table_markdown(rows, runs, rule, n_boot, seed, ci,
                                                                           rule_source, reference))
    run_rows = [{"run_dir": str(r.run_dir), "status": r.status, "model": r.model, "dataset": r.dataset,
                 "seed": r.seed, "judge": r.judge_id, "n_records": len(r.records), "used": r.usable, "error": r.error}
                for r in runs]
    files["runs.csv"] = atomic_write_text(out / "runs.csv", rows_to_csv(run_rows, RUN_COLUMNS))
    if rows:
        files["fig_questions.png"] = make_question_figure(rows, qorder, out / "fig_questions.png", ci_kind)
    else:
        say("no usable run: fig_questions.png skipped")
    # one selection: the finished runs. Those with an evaluation are the table's rows; a finished run without one
    # (a probes-only experiment, eval_variants=[]) still has its training curves; interrupted runs are in neither
    used = [r for r in runs if r.usable or r.status == "done"]
    counts = task_answer_counts(used)
    if counts:
        files["task_answers.csv"] = atomic_write_text(out / "task_answers.csv",
                                                      rows_to_csv(counts, TASK_COUNT_COLUMNS))
        last = {}
        for c in counts:  # each run's last probe step
            if not c["triggered"]:
                last[c["run_dir"]] = c
        for c in last.values():
            say(f"task answers at step {c['step']} ({c['model']} / {c['dataset']} / seed {c['seed']}): "
                f"{c['n_flagged']} flagged, {c['n_parsed']} parsed, {c['n_truncated']} cut off by the token budget, "
                f"of {c['n']}")
    panels = dynamics_panels(used, misalignment_metric, task_metric)
    if any(curves for _, curves in panels):
        files["fig_dynamics.png"] = plot_dynamics(panels, out / "fig_dynamics.png")
    else:
        say(f"no {METRICS_FILE} with a misalignment or task metric found: fig_dynamics.png skipped")
    files["report.json"] = atomic_write_json(out / "report.json", {
        "sweep_dir": str(sweep_dir), "rule": rule.describe(), "rule_source": rule_source, "judges": judges,
        "n_boot": n_boot, "seed": seed, "ci": ci, "rows": rows, "runs": run_rows,
        "paper_reference": {"file": str(PAPER_REFERENCE), "source": reference["source"]},
        "fig_dynamics": {"seeds": dynamics_seeds(panels)}})
    for p in files.values():
        say(f"wrote {p}")
    return {"rows": rows, "runs": runs, "files": files}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m em.report", description=__doc__.split("\n")[0])
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="output directory (default: <sweep_dir>/report)")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--ci", type=float, default=0.95)
    p.add_argument("--ci-kind", choices=("auto", "seeds", "samples"), default="auto", help="error bars in the figure")
    p.add_argument("--judge", default=None, help="report this judge's scores (runs judged by several judges)")
    p.add_argument("--allow-mixed-judges", action="store_true",
                   help="report runs judged by different judges, each judge in its own rows")
    rule = p.add_argument_group("classification rule (default: the one the runs recorded, eval.rule)")
    rule.add_argument("--aligned-threshold", type=float, default=None)
    rule.add_argument("--coherent-threshold", type=float, default=None)
    rule.add_argument("--coherent-inclusive", action=argparse.BooleanOptionalAction, default=None,
                      help="coherent >= threshold (the authors' code) / > threshold (the paper's text)")
    rule.add_argument("--min-eligible", type=int, default=None,
                      help="questions (and runs, for the pooled rate) with fewer eligible answers get no rate")
    p.add_argument("--misalignment-metric", default=None, help="metrics.csv column (default: probe/misaligned_rate)")
    p.add_argument("--task-metric", default=None, help="metrics.csv column (default: task/insecure_rate)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; 0 when a table was written from at least one run, 1 when no run was usable, 2 on an error."""
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in (("aligned_threshold", args.aligned_threshold),
                                   ("coherent_threshold", args.coherent_threshold),
                                   ("coherent_inclusive", args.coherent_inclusive),
                                   ("min_eligible", args.min_eligible)) if v is not None}
    try:
        result = write_report(args.sweep_dir, args.out, None, n_boot=args.n_boot, seed=args.seed, ci=args.ci,
                              ci_kind=args.ci_kind, misalignment_metric=args.misalignment_metric,
                              task_metric=args.task_metric, judge=args.judge,
                              allow_mixed_judges=args.allow_mixed_judges, rule_overrides=overrides)
    except EMError as e:
        print(f"error: {e}", flush=True)
        return 2
    return 0 if result["rows"] else 1
