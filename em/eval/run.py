"""``evaluate(cfg)``: the plain function behind ``eval.py``.

Order of work, cheapest checks first: the config and question files are validated, every judge is built and
its endpoint probed (an unreachable judge or a rejected key stops the run before any sampling), the forecast
is printed, then answers are sampled chunk by chunk into ``answers.jsonl`` (appended and fsynced), every judge
judges them with a run-local journal (``judgments-<judge>.sqlite``), and ``samples.jsonl`` / ``summary.json`` /
``summary.csv`` are written. Re-running the same command in the same run dir resumes: sampled answers are not
sampled again and judged ones are not judged again (``eval.resume=false`` starts over).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from em.config import as_args, plain
from em.data.mini import PROBE_QUESTIONS_FILE
from em.errors import ConfigError, EMError
from em.eval import forecast as fc
from em.eval.config import EvalArgs, eval_args
from em.eval.judge.config import build_judge
from em.eval.metrics import (
    AGGREGATION_LABELS,
    CATEGORY_ROW_COLUMNS,
    ROW_COLUMNS,
    MisalignmentRule,
    category_rows,
    judge_names,
    summarize,
    summary_to_rows,
)
from em.eval.pipeline import base_records, judge_records, judge_requests, request_key, sample_answers
from em.eval.questions import Question, SampleRequest, load_questions, paper_question_file
from em.eval.sampling import build_sampler
from em.layout import resolve_run_dir
from em.models.loading import ModelArgs
from em.utils.io import atomic_write_json, atomic_write_jsonl, atomic_write_text

log = logging.getLogger(__name__)

MINI_FILES = {"probes": PROBE_QUESTIONS_FILE}
ANSWERS_FILE, STATE_FILE, SAMPLES_FILE = "answers.jsonl", "eval_state.json", "samples.jsonl"
SUMMARY_FILE, SUMMARY_CSV, CATEGORY_CSV = "summary.json", "summary.csv", "summary_categories.csv"


class JudgeFailuresError(EMError):
    """A judge failed for more answers than ``eval.max_judge_failed_fraction`` allows."""



def question_path(spec: str, data_dir: str | None = None) -> Path:
    """``mini:probes``, ``paper:first_plot_questions`` or a path to a YAML file."""
    kind, _, name = spec.partition(":")
    if kind == "mini":
        if name not in MINI_FILES:
            raise ConfigError(f"eval.questions: unknown embedded set {spec!r}; known: {sorted(MINI_FILES)}")
        return MINI_FILES[name]
    if kind == "paper":
        return paper_question_file(name, data_dir=data_dir) if data_dir else paper_question_file(name)
    return Path(spec).expanduser()


def load_eval_questions(ecfg: Mapping[str, Any] | EvalArgs, data_dir: str | None = None) -> list[Question]:
    ev = ecfg if isinstance(ecfg, EvalArgs) else eval_args(ecfg)
    paths = [question_path(s, data_dir) for s in ev.questions]
    return load_questions(
        paths,
        ids=ev.ids,
        ignore_system=bool(ev.ignore_system),
        trigger=ev.trigger,
        trigger_position=ev.trigger_position,
        system_prompt=ev.system_prompt,
        answer_suffix=ev.answer_suffix,
        samples_per_paraphrase=ev.samples_per_paraphrase,
    )


def _csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_summary(out_dir: Path, summary: dict) -> None:
    """``summary.json``, ``summary.csv`` (per question + both overall rates) and, with categorical judges,
    ``summary_categories.csv``."""
    atomic_write_json(out_dir / SUMMARY_FILE, summary)
    rows = summary_to_rows(summary)
    if rows:
        atomic_write_text(out_dir / SUMMARY_CSV, _csv(rows, ROW_COLUMNS))
    crows = category_rows(summary)
    if crows:
        atomic_write_text(out_dir / CATEGORY_CSV, _csv(crows, CATEGORY_ROW_COLUMNS))


# ---- judges ---------------------------------------------------------------------------------------------
def build_judges(cfg: DictConfig) -> list[Any]:
    """The primary judge (``judge``) and any others (``judges.<key>``, e.g. ``+judge@judges.local=hf``); an
    extra judge without a ``name`` is named after its key. Names must be distinct."""
    judges = [build_judge(cfg.judge, "judge")]
    for key, jc in (cfg.get("judges") or {}).items():
        j = build_judge(jc, f"judges.{key}")
        if not (jc.get("name") if hasattr(jc, "get") else None):
            j._name = str(key)
        judges.append(j)
    names = [j.name for j in judges]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"two judges are named {dup}: give each a distinct name (judges.<key>.name=...)")
    return judges


# ---- resume: the run-local journals ----------------------------------------------------------------------
def _fingerprint(cfg: DictConfig, ev: EvalArgs, requests: Sequence[SampleRequest], seed: int) -> dict[str, Any]:
    """What the answers depend on; a run dir's answers are reused only by a run with the same fingerprint."""
    h = hashlib.sha256()
    for r in requests:
        h.update(json.dumps([request_key(r), r.messages], ensure_ascii=False).encode("utf-8", "surrogatepass"))
    sampling = {**asdict(ev.sampling), "seed": seed}
    sampling.pop("batch_size", None)  # batching does not change what an answer is asked
    return {"model": plain(cfg.model), "adapter": cfg.get("adapter"), "merge_adapter": bool(cfg.get("merge_adapter")),
            "sampling": sampling, "requests": h.hexdigest()}


def _diff_keys(a: Any, b: Any, key: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _diff_keys(a.get(k), b.get(k), f"{key}.{k}".strip("."))]
    return [] if a == b else [key or "<all>"]


def journal_paths(out_dir: Path, judges: Sequence[Any]) -> dict[str, Path]:
    return {j.name: out_dir / f"judgments-{_safe(j.name)}.sqlite" for j in judges}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80] or "judge"


def prepare_resume(out_dir: Path, fingerprint: dict[str, Any], resume: bool) -> dict:
    """Answers of an earlier run of the same evaluation in ``out_dir`` (request key -> answer); writes the
    state file. A different evaluation's answers are an error (or discarded with ``resume=false``)."""
    state_path, answers_path = out_dir / STATE_FILE, out_dir / ANSWERS_FILE
    if not resume or (not state_path.exists() and answers_path.exists()):
        if resume:  # journals without the state that says which evaluation wrote them cannot be trusted
            log.warning("%s has %s but no %s: starting over", out_dir, ANSWERS_FILE, STATE_FILE)
        for p in [state_path, answers_path, *out_dir.glob("judgments-*.sqlite*")]:
            p.unlink(missing_ok=True)
    if state_path.exists():
        try:
            old = json.loads(state_path.read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError):
            old = None
        if old != fingerprint:
            diff = _diff_keys(old or {}, fingerprint)[:6]
            raise ConfigError(f"{out_dir} holds the answers of a different evaluation (differs in: {', '.join(diff)}); "
                              "use another paths.run_dir, or eval.resume=false to discard them and start over")
    atomic_write_json(state_path, {"fingerprint": fingerprint})
    done: dict = {}
    if answers_path.exists():
        bad = 0
        with open(answers_path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    done[(str(row["question_id"]), int(row["paraphrase_index"]),
                          int(row["sample_index"]))] = str(row["answer"])
                except (ValueError, KeyError, TypeError):
                    bad += 1  # a line cut by a kill mid-write: that answer is sampled again
        if bad:
            log.warning("%s: %d unreadable line(s) (cut by an interruption) ignored", answers_path, bad)
    return done


class AnswerJournal:
    """Appends sampled answers to ``answers.jsonl`` and fsyncs after each chunk."""

    def __init__(self, path: Path, run_token: str):
        self.path, self.run_token, self.n = path, run_token, 0

    def __call__(self, chunk: list[tuple[SampleRequest, str]]) -> None:
        if not chunk:
            return
        text = "".join(json.dumps({"question_id": r.question_id, "paraphrase_index": r.paraphrase_index,
                                   "sample_index": r.sample_index, "answer": a, "run": self.run_token},
                                  ensure_ascii=False) + "\n" for r, a in chunk)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        self.n += len(chunk)


# ---- the evaluation ---------------------------------------------------------------------------------------
def _judge_prompt_texts(records: Sequence[dict], qmap: dict[str, Question]) -> list[str]:
    reqs, _ = judge_requests(records, qmap)
    return [r.prompt for r in reqs]


def _forecast(cfg: DictConfig, ev: EvalArgs, sampler, requests: Sequence[SampleRequest], qmap: dict[str, Question],
              done: dict, judges: Sequence[Any]) -> fc.EvalForecast:
    known = [{"question_id": r.question_id, "question": r.paraphrase, "answer": done.get(request_key(r), "")}
             for r in requests]
    prompts = _judge_prompt_texts(known, qmap)
    done_prompts = _judge_prompt_texts([k for k, r in zip(known, requests) if request_key(r) in done], qmap)
    cached: dict[str, int] = {}
    per_call: dict[str, float | None] = {}
    for j in judges:
        keys = [j.cache_key(p) for p in done_prompts]
        hits = set(j.journal.get_many(keys)) if j.journal is not None else set()
        if j.cache is not None and j.cache_read:
            hits |= set(j.cache.get_many(keys))
        cached[j.name] = len(hits)
    s_per_batch, warm = None, 0.0
    todo = [r for r in requests if request_key(r) not in done]
    if ev.forecast.warmup and todo:
        s_per_batch, warm = fc.measure_sampling(sampler, [r.messages for r in todo], ev.sampling.batch_size,
                                                ev.sampling.max_new_tokens)
        for j in judges:
            per_call[j.name] = fc.measure_judge(j, prompts[: getattr(j, "batch_size", 8)])
    return fc.forecast_eval(n_answers=len(requests), n_done=len(requests) - len(todo),
                            max_new_tokens=ev.sampling.max_new_tokens, batch_size=ev.sampling.batch_size,
                            judge_prompts={j.name: prompts for j in judges}, judges=judges, cached=cached,
                            sampling_s_per_batch=s_per_batch, judge_s_per_call=per_call,
                            api_latency_s=ev.forecast.api_latency_s, warmup_s=warm)


def judge_failures(records: Sequence[dict], judge_name: str, primary: bool) -> tuple[int, str | None]:
    """Answers with at least one failed judgment of this judge, and the first error text."""
    n, first = 0, None
    for rec in records:
        block = rec if primary else (rec.get("judge_scores") or {}).get(judge_name, {})
        failed = [k for k, v in block.items() if k.endswith("_status") and v == "failed"]
        if failed:
            n += 1
            first = first or block.get(failed[0][: -len("_status")] + "_error")
    return n, first


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Sample the configured questions from the model (+ adapter), judge them, write the results.

    Writes ``samples.jsonl`` (every answer with every score and the judge's raw top logprobs; other judges'
    scores under ``judge_scores``), ``summary.json`` (with the forecast and the actual beside it) and
    ``summary.csv`` in ``paths.run_dir``; returns the summary. Raises :class:`JudgeFailuresError` after writing
    everything when a judge failed for more than ``eval.max_judge_failed_fraction`` of the answers.
    """
    t0 = time.time()
    out_dir = Path(resolve_run_dir(cfg.paths)).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    ev = eval_args(cfg.eval)
    questions = load_eval_questions(ev, os.environ.get("EM_DATA_DIR"))
    qmap = {q.id: q for q in questions}
    requests = [r for q in questions for r in q.expand()]
    run_seed = cfg.get("seed")
    seed = int(ev.sampling.seed if ev.sampling.seed is not None else (run_seed or 0))
    log.info("%d questions, %d answers to sample (sampling seed %d)", len(questions), len(requests), seed)

    judges = build_judges(cfg)  # fails fast on a bad key, URL or missing API key
    for j in judges:
        j.probe()  # one request: an unreachable judge stops the run before any sampling
    fingerprint = _fingerprint(cfg, ev, requests, seed)
    done = prepare_resume(out_dir, fingerprint, ev.resume)
    for j, path in zip(judges, journal_paths(out_dir, judges).values()):
        j.attach_journal(path)
    if done:
        log.info("resuming: %d of %d answers already sampled in %s", len(done), len(requests), out_dir)

    model_args = as_args(ModelArgs, cfg.model, "model")
    sampling = ev.sampling.__class__(**{**asdict(ev.sampling), "seed": seed})
    sampler = build_sampler(model_args, sampling, adapter_path=cfg.get("adapter"))
    forecast = _forecast(cfg, ev, sampler, requests, qmap, done, judges)
    for line in forecast.lines():
        log.info(line)

    progress = bool(cfg.get("progress", True))
    journal = AnswerJournal(out_dir / ANSWERS_FILE, run_token=f"{os.getpid()}-{int(t0)}")
    tokens_before = getattr(sampler, "tokens_generated", None)  # after the warm-up, whose answers are discarded
    t_sample = time.time()
    answers = sample_answers(sampler, requests, progress=progress, seed=seed, batch_size=sampling.batch_size,
                             done=done, on_chunk=journal)
    t_sample = time.time() - t_sample
    meta = {"model": cfg.model.name, "adapter": cfg.get("adapter"), "dataset": cfg.get("dataset_name"),
            "seed": run_seed, "sampling_seed": seed}
    records = base_records(qmap, requests, answers, **meta)
    t_judge = time.time()
    for i, j in enumerate(judges):
        judge_records(records, qmap, j, progress=progress, primary=i == 0)
    t_judge = time.time() - t_judge
    atomic_write_jsonl(out_dir / SAMPLES_FILE, records)

    rule: MisalignmentRule = ev.rule
    boot_seed = int(run_seed or 0)
    summary = summarize(records, rule, n_boot=int(ev.n_boot), seed=boot_seed)
    if len(judges) > 1:
        summary["judges"] = {}
        for j in judges:
            s = summarize(records, rule, n_boot=int(ev.n_boot), seed=boot_seed, validate=False, judge=j.name)
            summary["judges"][j.name] = {k: s[k] for k in ("overall", "metrics", "questions")}
    wall = time.time() - t0
    summary["meta"] = {
        **meta,
        "judge": judges[0].describe(),
        "judges": [j.describe() for j in judges],
        "judge_stats": judges[0].stats.as_dict(),
        "judges_stats": {j.name: j.stats.as_dict() for j in judges},
        "n_samples": len(records),
        "answers_resumed": len(done),
        "sampling_s": round(t_sample, 2),
        "judging_s": round(t_judge, 2),
        "wall_s": round(wall, 2),
        "config": plain(cfg),
        "system_prompts_honoured": not ev.ignore_system,
        "questions": list(ev.questions),
    }
    summary["forecast"] = forecast.as_dict()
    summary["actual"] = fc.actual_eval(
        n_answers=len(records), n_sampled=journal.n, judges=judges, sampling_s=t_sample, judging_s=t_judge,
        wall_s=wall, tokens_generated=(sampler.tokens_generated - tokens_before) if tokens_before is not None else None)
    failures = {j.name: judge_failures(records, j.name, i == 0) for i, j in enumerate(judges)}
    summary["meta"]["judge_failures"] = {n: c for n, (c, _) in failures.items()}
    write_summary(out_dir, summary)
    log.info("eval written to %s (%d samples)", out_dir, len(records))
    limit = float(ev.max_judge_failed_fraction)
    over = {n: (c, e) for n, (c, e) in failures.items() if records and c / len(records) > limit}
    if over:
        parts = [f"judge {n} failed for {c} of {len(records)} answers ({100 * c / len(records):.1f}%)"
                 + (f"; first error: {e}" if e else "") for n, (c, e) in over.items()]
        raise JudgeFailuresError(
            "; ".join(parts) + f". More than eval.max_judge_failed_fraction={limit:g} of the answers have no "
            f"score: samples and summary are written to {out_dir}; fix the judge and re-run the same command "
            "(only the failed judgments are asked again)")
    return summary


# ---- the closing headline -------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _few(items: Sequence[str], k: int = 3) -> str:
    return ", ".join(items[:k]) + (f", ... {len(items) - k} more" if len(items) > k else "")


def _ci(block: Mapping[str, Any]) -> str:
    lo, hi = block.get("ci_low"), block.get("ci_high")
    return "" if lo is None else f" [{lo:.3f}, {hi:.3f}]"


def rate_lines(summary: Mapping[str, Any], ci: float | None = None) -> list[str]:
    """The overall rates of a summary, both aggregations side by side, each named, with CI and denominator."""
    ov = summary["overall"]
    pct = f"{100 * (ci or summary.get('ci', 0.95)):g}% CI"
    lines = []
    if summary.get("questions"):
        p, m = ov["pooled"], ov["question_mean"]
        head = ov.get("headline", "pooled")
        lines.append(f"misaligned rate ({pct}; headline: {head}):")
        lines.append(f"  pooled{' (paper)' if head == 'pooled' else ''}: {_pct(p['misaligned_rate'])}{_ci(p)} = "
                     f"{p['n_misaligned']}/{p['n_eligible']} eligible answers")
        lines.append(f"  mean over questions: {_pct(m['misaligned_rate'])}{_ci(m)} over {m['n_questions_included']} "
                     f"question(s) ({m['n_misaligned']}/{m['n_eligible']} eligible)"
                     + (f"; {len(m['questions_excluded'])} excluded ({_few(m['questions_excluded'])})"
                        if m["questions_excluded"] else ""))
        lines.append(f"  coherent {ov['n_coherent']}/{ov['n_coherent_scored']}, aligned score missing "
                     f"{ov['n_aligned_missing']} (CODE {ov['n_aligned_missing_CODE']}, REFUSAL "
                     f"{ov['n_aligned_missing_REFUSAL']}, other {ov['n_aligned_missing_other']}), judge failed "
                     f"{ov['n_failed']}")
    for m, s in (summary.get("metrics") or {}).items():
        if s.get("kind") == "categorical":
            h = s.get("headline")
            if h:
                lines.append(f"{h['name']} ({m} = {h['category']}): pooled {_pct(h['rate'])}{_ci(h)} = "
                             f"{h['numerator']}/{h['denominator']} labelled answers | mean over questions "
                             f"{_pct(h['question_mean_rate'])} ({s['n_missing']} missing, {s['n_failed']} failed)")
            else:
                rates = ", ".join(f"{c} {_pct(b['rate'])}" for c, b in s["rates"].items())
                lines.append(f"{m}: {rates} of {s['n_scored']} labelled answers ({s['n_missing']} missing, "
                             f"{s['n_failed']} failed)")
        else:
            lines.append(f"{m}: mean {_pct(s.get('mean'))} over {s['n_scored']} scored ({s['n_missing']} missing, "
                         f"{s['n_failed']} failed)")
    return lines


def headline(summary: Mapping[str, Any], out_dir: str | os.PathLike) -> str:
    """The short closing text of ``eval.py``: overall rates with CI and denominators, per judge, and where the
    per-question table is."""
    meta = summary.get("meta") or {}
    out_dir = Path(out_dir)
    lines = [f"done: {meta.get('n_samples')} answers ({meta.get('answers_resumed', 0)} resumed), sampling seed "
             f"{meta.get('sampling_seed')}, {meta.get('wall_s')} s -> {out_dir}"]
    judges = summary.get("judges")
    if judges:
        for name, s in judges.items():
            lines.append(f"judge {name}:")
            lines += [f"  {x}" for x in rate_lines({**s, "ci": summary.get("ci")})]
    else:
        jname = (meta.get("judge") or {}).get("name") or summary.get("judge")
        lines.append(f"judge {jname}:")
        lines += [f"  {x}" for x in rate_lines(summary)]
    table = out_dir / SUMMARY_CSV if (out_dir / SUMMARY_CSV).exists() else out_dir / CATEGORY_CSV
    lines.append(f"per-question table: {table}")
    return "\n".join(lines)


__all__ = ["AGGREGATION_LABELS", "JudgeFailuresError", "evaluate", "headline", "judge_names", "load_eval_questions",
           "question_path", "rate_lines", "write_summary"]
