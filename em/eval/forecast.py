"""What an evaluation will do before it does it: answers, tokens, judge calls, cost and time.

:func:`forecast_eval` counts what is left to do (answers already in a resumed run's journal and judgments
already cached are not counted again), prices the judge calls at the judge's configured or list price, and
estimates the wall time from a short measured warm-up (:func:`measure_sampling`, :func:`measure_judge`) or,
for an API judge, from an assumed latency. :func:`actual_eval` is the same record filled in after the run, so
``summary.json`` (and a sweep job's ``results.json``) hold both and forecasts can be checked. A sweep forecast
reuses :func:`forecast_eval` per job.

Token counts are estimates: prompts are counted at ~4 characters per token; answers at their token budget
(``max_new_tokens``, an upper bound: answers stop earlier at end-of-turn).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from em.utils.fmt import duration

CHARS_PER_TOKEN = 4.0


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate (~4 characters per token, at least 1)."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


@dataclass
class JudgeForecast:
    """One judge's share: calls left to make, estimated tokens, cost at its price, and time."""

    name: str
    model: str
    calls: int
    calls_cached: int
    prompt_tokens: int
    completion_tokens: int
    price_prompt_per_1m: float
    price_completion_per_1m: float
    cost_usd: float
    price_note: str
    est_s: float | None
    time_note: str


@dataclass
class EvalForecast:
    answers: int
    answers_done: int
    answers_to_sample: int
    max_new_tokens: int
    tokens_to_generate: int
    """Upper bound: answers left x max_new_tokens."""
    sampling_batches: int
    sampling_s_per_batch: float | None
    est_sampling_s: float | None
    judges: list[JudgeForecast] = field(default_factory=list)
    est_judging_s: float | None = None
    est_wall_s: float | None = None
    warmup_s: float | None = None
    """Time the measurement itself took (already spent)."""
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The forecast as a few human lines."""
        out = [f"forecast: {self.answers_to_sample} answers to sample ({self.answers_done} of {self.answers} already "
               f"done), <= {self.tokens_to_generate:,} tokens to generate ({self.max_new_tokens} max each)"]
        if self.est_sampling_s is not None:
            out.append(f"  sampling: ~{duration(self.est_sampling_s)} ({self.sampling_batches} batches x "
                       f"{self.sampling_s_per_batch:.2f} s measured per batch at the full token budget; an upper "
                       "bound, answers usually stop earlier)")
        for j in self.judges:
            cost = f"${j.cost_usd:,.2f} at {j.price_note}" if j.price_note else f"${j.cost_usd:,.2f}"
            t = f", ~{duration(j.est_s)} ({j.time_note})" if j.est_s is not None else ""
            out.append(f"  judge {j.name} ({j.model}): {j.calls} calls ({j.calls_cached} cached), ~{j.prompt_tokens:,} "
                       f"prompt + {j.completion_tokens:,} completion tokens, {cost}{t}")
        if self.est_wall_s is not None:
            out.append(f"  estimated wall time: ~{duration(self.est_wall_s)}")
        out += [f"  note: {n}" for n in self.notes]
        return out


def measure_sampling(sampler, conversations: Sequence[list[dict]], batch_size: int, max_new_tokens: int,
                     steps: tuple[int, int] = (2, 6)) -> tuple[float | None, float]:
    """Seconds one batch of ``batch_size`` answers takes at the full token budget, from two short timed
    generations (``steps`` new tokens) on real prompts: per-step cost from their difference, prefill from the
    first. Returns ``(seconds per batch, seconds spent measuring)``; None when there is nothing to measure.
    The answers are discarded (they never enter the evaluation)."""
    convs = list(conversations)[:batch_size]
    if not convs:
        return None, 0.0
    t_start = time.perf_counter()
    times = []
    for k in steps:
        t0 = time.perf_counter()
        sampler.sample(convs, n=1, progress=False, seed=0, max_new_tokens=[k] * len(convs))
        times.append(time.perf_counter() - t0)
    per_step = max(0.0, (times[1] - times[0]) / (steps[1] - steps[0]))
    prefill = max(0.0, times[0] - steps[0] * per_step)
    scale = batch_size / len(convs) if len(convs) < batch_size else 1.0
    return (prefill + per_step * max_new_tokens) * scale, time.perf_counter() - t_start


def measure_judge(judge, prompts: Sequence[str]) -> float | None:
    """Seconds per judge call of a local (forward-pass) judge, from one timed batch; None for API judges."""
    forward = getattr(judge, "next_token_top_logprobs", None)
    if forward is None or not prompts:
        return None
    batch = list(prompts)[: max(1, int(getattr(judge, "batch_size", 8)))]
    t0 = time.perf_counter()
    forward(batch)
    return (time.perf_counter() - t0) / len(batch)


def forecast_eval(*, n_answers: int, n_done: int, max_new_tokens: int, batch_size: int,
                  judge_prompts: Mapping[str, Sequence[str]], judges: Sequence[Any], cached: Mapping[str, int],
                  sampling_s_per_batch: float | None = None, judge_s_per_call: Mapping[str, float | None] | None = None,
                  api_latency_s: float = 1.0, warmup_s: float | None = None) -> EvalForecast:
    """The forecast of one evaluation.

    ``judge_prompts``: per judge name, the judge prompts it will be asked (their text with the answer not yet
    known: an answer of ``max_new_tokens`` tokens is assumed); ``cached``: per judge name, how many of them are
    already in its cache/journal; ``judge_s_per_call``: measured seconds per call of local judges."""
    left = max(0, n_answers - n_done)
    batches = math.ceil(left / max(1, batch_size)) if left else 0
    est_sampling = sampling_s_per_batch * batches if sampling_s_per_batch is not None else None
    fc = EvalForecast(answers=n_answers, answers_done=n_done, answers_to_sample=left, max_new_tokens=max_new_tokens,
                      tokens_to_generate=left * max_new_tokens, sampling_batches=batches,
                      sampling_s_per_batch=sampling_s_per_batch, est_sampling_s=est_sampling, warmup_s=warmup_s)
    total_judge = 0.0
    for judge in judges:
        prompts = list(judge_prompts.get(judge.name, []))
        n_cached = int(cached.get(judge.name, 0))
        calls = max(0, len(prompts) - n_cached)
        per_call_prompt = (sum(estimate_tokens(p) for p in prompts) / len(prompts) + max_new_tokens) if prompts else 0
        ptok, ctok = int(round(per_call_prompt * calls)), calls
        pp = float(getattr(judge.stats, "price_prompt_per_1m", 0.0) or 0.0)
        pc = float(getattr(judge.stats, "price_completion_per_1m", 0.0) or 0.0)
        model = str(getattr(judge, "model_id", judge.name))
        if getattr(judge, "base_url", None) is None:
            note = "a local model (no API cost)"
        elif pp or pc:
            note = f"{model} price ${pp:g} / ${pc:g} per 1M prompt / completion tokens"
        else:
            note = "unknown price: set judge.price_prompt_per_1m / price_completion_per_1m"
        per_call = (judge_s_per_call or {}).get(judge.name)
        if per_call is not None:
            est, tnote = per_call * calls, f"{per_call * 1000:.0f} ms per call measured"
        elif getattr(judge, "base_url", None) is not None:
            conc = max(1, int(getattr(judge, "max_concurrency", 1)))
            est, tnote = api_latency_s * calls / conc, f"assuming {api_latency_s:g} s per call, {conc} in flight"
        else:
            est, tnote = None, "not measured"
        total_judge += est or 0.0
        fc.judges.append(JudgeForecast(name=judge.name, model=model, calls=calls, calls_cached=n_cached,
                                       prompt_tokens=ptok, completion_tokens=ctok, price_prompt_per_1m=pp,
                                       price_completion_per_1m=pc, cost_usd=(ptok * pp + ctok * pc) / 1e6,
                                       price_note=note, est_s=est, time_note=tnote))
    fc.est_judging_s = total_judge if fc.judges else None
    if est_sampling is not None:
        fc.est_wall_s = est_sampling + (fc.est_judging_s or 0.0)
    return fc


def actual_eval(*, n_answers: int, n_sampled: int, tokens_generated: int | None, judges: Sequence[Any],
                sampling_s: float, judging_s: float, wall_s: float) -> dict[str, Any]:
    """What the evaluation actually did, in the forecast's terms (beside it in ``summary.json``)."""
    return {
        "answers": n_answers, "answers_sampled": n_sampled, "tokens_generated": tokens_generated,
        "judges": [{"name": j.name, "calls_sent": j.stats.sent, "cache_hits": j.stats.cache_hits,
                    "prompt_tokens": j.stats.prompt_tokens, "completion_tokens": j.stats.completion_tokens,
                    "cost_usd": j.stats.cost_usd} for j in judges],
        "sampling_s": round(sampling_s, 2), "judging_s": round(judging_s, 2), "wall_s": round(wall_s, 2),
    }
