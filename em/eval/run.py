"""``evaluate(cfg)``: the plain function behind ``eval.py``."""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from em.config import plain, to_dataclass
from em.data.mini import PROBE_QUESTIONS_FILE
from em.layout import resolve_run_dir
from em.errors import ConfigError
from em.eval.sampling import SamplingArgs
from em.utils.io import atomic_write_json, atomic_write_jsonl, atomic_write_text

log = logging.getLogger(__name__)

MINI_FILES = {"probes": PROBE_QUESTIONS_FILE}


def question_path(spec: str, data_dir: str | None = None) -> Path:
    """``mini:probes``, ``paper:first_plot_questions`` or a path to a YAML file."""
    kind, _, name = spec.partition(":")
    if kind == "mini":
        if name not in MINI_FILES:
            raise ConfigError(f"eval.questions: unknown embedded set {spec!r}; known: {sorted(MINI_FILES)}")
        return MINI_FILES[name]
    if kind == "paper":
        from em.eval.questions import paper_question_file

        return paper_question_file(name, data_dir=data_dir) if data_dir else paper_question_file(name)
    return Path(spec).expanduser()


def load_eval_questions(ecfg: dict, data_dir: str | None = None):
    from em.eval.questions import load_questions

    paths = [question_path(s, data_dir) for s in ecfg["questions"]]
    return load_questions(
        paths,
        ids=ecfg.get("ids"),
        ignore_system=bool(ecfg.get("ignore_system", False)),
        trigger=ecfg.get("trigger"),
        trigger_position=ecfg.get("trigger_position", "prefix"),
        system_prompt=ecfg.get("system_prompt"),
        answer_suffix=ecfg.get("answer_suffix"),
        samples_per_paraphrase=ecfg.get("samples_per_paraphrase"),
    )


def write_summary(out_dir: Path, summary: dict) -> None:
    from em.eval.metrics import summary_to_rows

    atomic_write_json(out_dir / "summary.json", summary)
    rows = summary_to_rows(summary)
    if rows:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(out_dir / "summary.csv", buf.getvalue())


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Sample the configured questions from the model (+ adapter), judge them, write the results.

    Writes ``samples.jsonl`` (every answer with every score and the judge's raw top logprobs),
    ``summary.json`` and ``summary.csv`` in ``paths.run_dir``; returns the summary.
    """
    from em.eval.metrics import MisalignmentRule, summarize
    from em.eval.pipeline import base_records, build_judge, judge_records, sample_answers
    from em.eval.sampling import build_sampler
    from em.models.loading import ModelArgs

    t0 = time.time()
    out_dir = Path(resolve_run_dir(cfg.paths)).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    ecfg = OmegaConf.to_container(cfg.eval, resolve=True)
    import os

    questions = load_eval_questions(ecfg, os.environ.get("EM_DATA_DIR"))
    qmap = {q.id: q for q in questions}
    requests = [r for q in questions for r in q.expand()]
    log.info("%d questions, %d answers to sample", len(questions), len(requests))

    judge = build_judge(OmegaConf.to_container(cfg.judge, resolve=True))  # fail fast on a missing API key
    model_args = to_dataclass(ModelArgs, cfg.model, "model")
    sampling = to_dataclass(SamplingArgs, ecfg.get("sampling", {}), "eval.sampling")
    sampler = build_sampler(model_args, sampling, adapter_path=cfg.get("adapter"))
    t_sample = time.time()
    answers = sample_answers(sampler, requests, progress=bool(cfg.get("progress", True)))
    t_sample = time.time() - t_sample
    meta = {"model": cfg.model.name, "adapter": cfg.get("adapter"), "dataset": cfg.get("dataset_name"),
            "seed": cfg.get("seed")}
    records = base_records(qmap, requests, answers, **meta)
    t_judge = time.time()
    judge_records(records, qmap, judge, progress=bool(cfg.get("progress", True)))
    t_judge = time.time() - t_judge
    atomic_write_jsonl(out_dir / "samples.jsonl", records)

    rule = to_dataclass(MisalignmentRule, ecfg.get("rule", {}), "eval.rule")
    summary = summarize(records, rule, n_boot=int(ecfg.get("n_boot", 2000)), seed=int(cfg.get("seed") or 0))
    summary["meta"] = {
        **meta,
        "judge": judge.model_id,
        "judge_stats": judge.stats.as_dict(),
        "n_samples": len(records),
        "sampling_s": round(t_sample, 2),
        "judging_s": round(t_judge, 2),
        "wall_s": round(time.time() - t0, 2),
        "config": plain(cfg),
        "system_prompts_honoured": not ecfg.get("ignore_system", False),
    }
    write_summary(out_dir, summary)
    log.info("eval written to %s (%d samples)", out_dir, len(records))
    return summary
