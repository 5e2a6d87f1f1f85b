"""The evaluation steps shared by ``eval.py`` and the mid-training probes.

questions -> sampling requests -> answers -> judge requests -> scored sample records -> summary.
"""

from __future__ import annotations

import logging
import zlib
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from typing import Any

from em.eval.judge.base import JudgeRequest, JudgeResult
from em.eval.judge.config import build_judge  # noqa: F401  (re-exported: the probe callback builds its judge here)
from em.eval.metrics import missing_reason
from em.eval.questions import Question, SampleRequest, format_judge_prompt

log = logging.getLogger(__name__)

RequestKey = tuple[str, int, int]
"""(question_id, paraphrase_index, sample_index): identifies one answer of an evaluation."""


def request_key(r: SampleRequest | dict) -> RequestKey:
    if isinstance(r, dict):
        return (str(r["question_id"]), int(r["paraphrase_index"]), int(r["sample_index"]))
    return (r.question_id, r.paraphrase_index, r.sample_index)


def chunk_seed(seed: int, first: RequestKey) -> int:
    """The sampling seed of the chunk that starts with ``first``: fixed by the run seed and the chunk, so a
    resumed run samples the chunks it has not done exactly as an uninterrupted run would."""
    return int(zlib.crc32(f"{int(seed)}|{first[0]}|{first[1]}|{first[2]}".encode()) & 0x7FFFFFFF)


def sampling_chunks(requests: Sequence[SampleRequest],
                    batch_size: int) -> list[tuple[int, list[tuple[int, list[int]]]]]:
    """Deterministic chunks of the requests: ``[(n, [(group_first_index, [request indices]), ...]), ...]``.

    Requests sharing a conversation form a group, sampled together (``n`` answers). Groups of the same ``n``
    are cut into chunks of about ``batch_size`` answers; a chunk is one sampler call and one journal write."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(requests):
        groups[(r.question_id, r.paraphrase_index, repr(r.messages))].append(i)
    by_n: dict[int, list[list[int]]] = defaultdict(list)
    for idxs in groups.values():
        by_n[len(idxs)].append(idxs)
    chunks = []
    for n, gs in by_n.items():
        per = max(1, int(batch_size) // n)
        for start in range(0, len(gs), per):
            chunks.append((n, [(g[0], g) for g in gs[start:start + per]]))
    return chunks


def sample_answers(sampler, requests: Sequence[SampleRequest], progress: bool = True, seed: int | None = None,
                   batch_size: int = 16, done: dict[RequestKey, str] | None = None,
                   on_chunk: Callable[[list[tuple[SampleRequest, str]]], None] | None = None) -> list[str]:
    """One answer per request, in request order.

    Sampled chunk by chunk (:func:`sampling_chunks`), each with its own seed (:func:`chunk_seed`); ``done``
    (request key -> answer) are answers an earlier, interrupted run already sampled: they are kept, not
    resampled; ``on_chunk`` receives each newly sampled chunk's ``(request, answer)`` pairs as soon as it is done
    (the evaluation appends them to its journal)."""
    from tqdm.auto import tqdm

    done = dict(done or {})
    answers: list[str | None] = [done.get(request_key(r)) for r in requests]
    todo = sum(a is None for a in answers)
    bar = tqdm(total=len(requests), initial=len(requests) - todo, desc="sampling", unit="answer",
               disable=not progress or todo == 0, dynamic_ncols=True)
    base = 0 if seed is None else int(seed)
    for _, groups in sampling_chunks(requests, batch_size):
        left = [(first, [i for i in idxs if answers[i] is None]) for first, idxs in groups]
        left = [(first, idxs) for first, idxs in left if idxs]
        if not left:
            continue
        # a partly done group (a kill mid-write) samples only what is missing
        by_count: dict[int, list[tuple[int, list[int]]]] = defaultdict(list)
        for first, idxs in left:
            by_count[len(idxs)].append((first, idxs))
        new: list[tuple[SampleRequest, str]] = []
        for k, part in by_count.items():
            convs = [requests[idxs[0]].messages for _, idxs in part]
            s = chunk_seed(base, request_key(requests[part[0][1][0]]))
            outs = sampler.sample(convs, n=k, progress=False, seed=s)
            for (_, idxs), texts in zip(part, outs):
                for i, text in zip(idxs, texts):
                    answers[i] = text
                    new.append((requests[i], text))
        if on_chunk is not None:
            on_chunk(new)
        bar.update(len(new))
    bar.close()
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


def judge_requests(records: Sequence[dict], questions: dict[str, Question],
                   metrics: Collection[str] | None = None) -> tuple[list[JudgeRequest], list[tuple[int, str]]]:
    """The judge requests of ``records``: one per judge prompt its question declares (all of them, 0-100 and
    categorical; ``metrics`` restricts to those names), with where each result goes ``(record index, metric)``.
    The judge sees the question as written in the file (``question``: no trigger / answer suffix) and the
    answer, as in the paper."""
    reqs, where = [], []
    for i, rec in enumerate(records):
        q = questions[rec["question_id"]]
        for m, tpl in q.judge_prompts.items():
            spec = q.judge_specs.get(m)
            if spec is None or (metrics is not None and m not in metrics):
                continue
            reqs.append(JudgeRequest(prompt=format_judge_prompt(tpl, rec["question"], rec["answer"]), metric=m,
                                     key={"record": i}, categories=spec.categories))
            where.append((i, m))
    return reqs, where


def result_fields(metric: str, res: JudgeResult, categories: Sequence[str] | None) -> dict[str, Any]:
    """The record fields of one judge result (see :mod:`em.eval.metrics` for the record format)."""
    out: dict[str, Any] = {f"{metric}_status": res.status,
                           f"{metric}_top_logprobs": [list(t) for t in (res.top_logprobs or [])]}
    if categories:
        out[metric] = res.label
        out[f"{metric}_categories"] = list(categories)
        out[f"{metric}_probs"] = dict(res.probs or {c: 0.0 for c in categories})
        out[f"{metric}_mass"] = res.numeric_mass
    else:
        out[metric] = res.score
        out[f"{metric}_numeric_mass"] = res.numeric_mass
    if res.error:
        out[f"{metric}_error"] = res.error
    if res.status == "missing":
        top = max(res.top_logprobs, key=lambda t: t[1])[0] if res.top_logprobs else None
        out[f"{metric}_missing_reason"] = missing_reason(top)
    return out


def judge_records(records: list[dict], questions: dict[str, Question], judge, progress: bool = True,
                  metrics: Collection[str] | None = None, primary: bool = True) -> list[dict]:
    """Score every record with every judge prompt its question has; failures stay failures, never 0.

    ``primary``: the judge's fields go to the top level of each record (and ``judge`` names it); otherwise
    into ``record["judge_scores"][judge.name]``. A question without a judge prompt for a metric simply has no
    such field (the metric is *absent* for it, not missing)."""
    reqs, where = judge_requests(records, questions, metrics)
    results = judge.judge(reqs, progress=progress) if reqs else []
    name = getattr(judge, "name", None)
    for (i, m), req, res in zip(where, reqs, results):
        rec = records[i]
        target = rec if primary else rec.setdefault("judge_scores", {}).setdefault(name, {})
        target.update(result_fields(m, res, req.categories))
    for rec in records:
        if primary and name is not None:
            rec["judge"] = name
    return records
