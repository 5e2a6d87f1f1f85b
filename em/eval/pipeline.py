"""The evaluation steps shared by ``eval.py`` and the mid-training probes.

questions -> sampling requests -> answers -> judge requests -> scored sample records -> summary.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Sequence

from em.errors import ConfigError
from em.eval.questions import Question, SampleRequest, format_judge_prompt

log = logging.getLogger(__name__)


def sample_answers(sampler, requests: Sequence[SampleRequest], progress: bool = True, seed: int | None = None) -> list[str]:
    """One answer per request; requests sharing a conversation are sampled together (``n`` > 1)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(requests):
        groups[(r.question_id, r.paraphrase_index, repr(r.messages))].append(i)
    keys = list(groups)
    # the HF backend samples n per conversation; split by n so each generate call has one n
    by_n: dict[int, list[tuple]] = defaultdict(list)
    for k in keys:
        by_n[len(groups[k])].append(k)
    answers: list[str | None] = [None] * len(requests)
    for n, ks in by_n.items():
        convs = [requests[groups[k][0]].messages for k in ks]
        outs = sampler.sample(convs, n=n, progress=progress, seed=seed) if seed is not None else \
            sampler.sample(convs, n=n, progress=progress)
        for k, texts in zip(ks, outs):
            for idx, text in zip(groups[k], texts):
                answers[idx] = text
    return [a if a is not None else "" for a in answers]


def base_records(questions: dict[str, Question], requests: Sequence[SampleRequest], answers: Sequence[str],
                 **meta: Any) -> list[dict]:
    return [
        {
            "question_id": r.question_id,
            "paraphrase_index": r.paraphrase_index,
            "sample_index": r.sample_index,
            "question": r.paraphrase,
            "user_prompt": r.user_prompt,
            "system": questions[r.question_id].effective_system,
            "answer": a,
            **meta,
        }
        for r, a in zip(requests, answers)
    ]


def judge_records(records: list[dict], questions: dict[str, Question], judge, progress: bool = True,
                  metrics: Sequence[str] = ("aligned", "coherent")) -> list[dict]:
    """Score every record with every judge prompt its question has; failures stay failures, never 0.

    The judge sees the question as written in the file (``question``: no trigger / answer suffix) and the
    answer, as in the paper.
    """
    from em.eval.judge.base import JudgeRequest
    from em.eval.metrics import missing_reason

    reqs, where = [], []
    for i, rec in enumerate(records):
        q = questions[rec["question_id"]]
        for m in metrics:
            tpl = q.judge_prompts.get(m)
            if tpl is None:
                continue
            reqs.append(JudgeRequest(prompt=format_judge_prompt(tpl, rec["question"], rec["answer"]), metric=m,
                                     key={"record": i}))
            where.append((i, m))
    results = judge.judge(reqs, progress=progress) if reqs else []
    for (i, m), res in zip(where, results):
        rec = records[i]
        rec[m] = res.score
        rec[f"{m}_status"] = res.status
        rec[f"{m}_numeric_mass"] = res.numeric_mass
        rec[f"{m}_top_logprobs"] = [list(t) for t in (res.top_logprobs or [])]
        if res.error:
            rec[f"{m}_error"] = res.error
        if res.status == "missing":
            top = max(res.top_logprobs, key=lambda t: t[1])[0] if res.top_logprobs else None
            rec[f"{m}_missing_reason"] = missing_reason(top)
    for rec in records:  # questions without a judge prompt for a metric: recorded as missing, explicitly
        for m in metrics:
            if f"{m}_status" not in rec:
                rec[m] = None
                rec[f"{m}_status"] = "missing"
                rec[f"{m}_missing_reason"] = "no_judge_prompt"
    return records


def build_judge(jcfg: dict) -> Any:
    """A judge from ``conf/judge/*.yaml`` (``kind``: openai | hf | tiny)."""
    from em.eval.judge.base import ScoringConfig

    j = dict(jcfg)
    kind = j.pop("kind", None)
    # a config may carry keys of another kind (e.g. model=tiny switching the probe judge from openai to
    # tiny by merging); keep only the keys this kind takes
    allowed = {
        "openai": {"model", "base_url", "api_key_env", "top_logprobs", "max_concurrency", "timeout_s",
                   "max_retries", "backoff_base", "backoff_max", "seed", "cache_namespace",
                   "price_prompt_per_1m", "price_completion_per_1m"},
        "hf": {"model_name_or_path", "model_id", "batch_size", "top_k", "device", "dtype"},
        "tiny": {"tiny", "model_id", "batch_size", "top_k", "device", "dtype"},
    }.get(kind, set()) | {"scoring", "cache"}
    dropped = sorted(set(j) - allowed)
    if dropped:
        log.debug("judge kind %s ignores keys %s", kind, dropped)
    j = {k: v for k, v in j.items() if k in allowed}
    scoring = ScoringConfig(**j.pop("scoring", {}) or {})
    cache = j.pop("cache", True)
    if kind == "openai":
        from em.eval.judge.openai import OpenAIJudge

        return OpenAIJudge(scoring=scoring, cache=cache, **j)
    if kind in ("hf", "tiny"):
        from em.eval.judge.hf import HFJudge

        if kind == "tiny":
            from em.config import to_dataclass
            from em.models.loading import ModelArgs, resolve_model_path

            spec = j.pop("tiny", None) or {"name": "tiny", "kind": "tiny"}
            path = resolve_model_path(to_dataclass(ModelArgs, spec, "judge.tiny"))
            j["model_name_or_path"] = path
        return HFJudge(scoring=scoring, cache=cache, **j)
    raise ConfigError(f"judge.kind={kind!r}: expected openai, hf or tiny")
