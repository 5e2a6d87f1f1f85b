"""The judge interface: requests in, scores (or an explicit "missing"/"failed") out.

A :class:`Judge` backend only has to produce raw top logprobs for prompts (``_query``); this base
class does the rest identically for every backend: cache look-up, de-duplication of identical
prompts, the scoring rules (:mod:`em.eval.judge.scoring`: the paper's 0-100 rule, or categories for a
categorical judge prompt), caching of successful answers, statistics and the progress bar. A failed judge
call becomes a result with ``status="failed"`` and the error text - never a score.

Caches: the shared on-disk cache (``cache``: True / a path / ``"refresh"`` = do not read it, ask again and
overwrite / False) and an optional run-local *journal* (:meth:`Judge.attach_journal`) that an evaluation
keeps in its run directory so that a re-run resumes without re-asking what it already judged, whatever
the shared cache setting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from tqdm.auto import tqdm

from em.errors import ConfigError, EMError
from em.eval.judge.cache import JudgeCache, cache_key
from em.eval.judge.scoring import PAPER_MIN_MASS, MassRule, score_categories, score_logprobs

log = logging.getLogger(__name__)

Status = Literal["ok", "missing", "failed"]
CacheSpec = JudgeCache | str | os.PathLike | bool | None
REFRESH = "refresh"


@dataclass
class JudgeRequest:
    """One judge query. ``prompt`` is the fully formatted judge prompt; ``metric`` names what it
    measures ("aligned", "coherent", ...); ``key`` is free bookkeeping for the caller (question
    id, sample index, ...) and does not influence the answer or the cache."""

    prompt: str
    metric: str
    key: dict[str, Any] = field(default_factory=dict)
    categories: tuple[str, ...] | None = None
    """None: a 0-100 judge prompt (the paper's logprob rule); else the answer categories of a categorical
    judge prompt (e.g. ``("TRUE", "FALSE", "UNKNOWN")``), scored by :func:`~em.eval.judge.scoring.score_categories`."""


@dataclass
class JudgeResult:
    """The judge's verdict on one request.

    ``status``: "ok" (``score`` is a float in [0, 100]), "missing" (the judge answered, but with
    numeric mass below the threshold: ``score`` is None) or "failed" (no answer was obtained:
    ``score`` is None and ``error`` says why). ``top_logprobs`` are the raw ``(token, logprob)``
    pairs the score was computed from; ``attempts`` counts backend calls (0 for a cache hit).
    For a categorical request ``score`` is None, ``label`` the most probable category, ``probs`` every
    category's probability and ``numeric_mass`` the mass on category tokens.
    """

    score: float | None
    status: Status
    numeric_mass: float | None
    top_logprobs: list[tuple[str, float]] | None
    error: str | None = None
    cached: bool = False
    attempts: int = 0
    label: str | None = None
    probs: dict[str, float] | None = None


@dataclass(frozen=True)
class ScoringConfig:
    """Parameters of :func:`~em.eval.judge.scoring.score_logprobs` (defaults: the paper)."""

    min_mass: float = PAPER_MIN_MASS
    mass_rule: MassRule = "lt"
    strip_whitespace: bool = True


@dataclass
class JudgeStats:
    """Cumulative counters of one judge object (``Judge.reset_stats()`` zeroes them).

    ``requests``: results produced; ``sent``: backend calls (HTTP requests including retries, or
    sequences run through the local model); ``cache_hits``; ``deduplicated``: requests answered by
    an identical prompt in the same call; ``retries``; ``failures`` and ``missing``: results with
    that status; token counts as reported by the backend; ``cost_usd`` from the per-1M-token prices.
    """

    requests: int = 0
    sent: int = 0
    cache_hits: int = 0
    deduplicated: int = 0
    retries: int = 0
    failures: int = 0
    missing: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    price_prompt_per_1m: float = 0.0
    price_completion_per_1m: float = 0.0

    @property
    def cost_usd(self) -> float:
        """Estimated spend: tokens times the configured prices."""
        return (self.prompt_tokens * self.price_prompt_per_1m
                + self.completion_tokens * self.price_completion_per_1m) / 1e6

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cost_usd": self.cost_usd}


@dataclass
class RawAnswer:
    """What a backend returns for one prompt: top logprobs, or an error."""

    top_logprobs: list[tuple[str, float]] | None
    error: str | None = None
    attempts: int = 1


OnResult = Callable[[int, RawAnswer], None]


def _open_cache(cache: CacheSpec) -> tuple[JudgeCache | None, bool]:
    """``(cache, read)``: the shared cache to write to and whether to read from it."""
    if isinstance(cache, str) and cache.strip().lower() == REFRESH:
        return JudgeCache(), False
    if isinstance(cache, str) and cache.strip().lower() in ("true", "false", "none", "null", ""):
        cache = cache.strip().lower() == "true"
    if cache is True:
        return JudgeCache(), True
    if cache is False or cache is None:
        return None, False
    if isinstance(cache, JudgeCache):
        return cache, True
    return JudgeCache(cache), True


def _scoring(scoring: ScoringConfig | Mapping[str, Any] | None) -> ScoringConfig:
    if scoring is None:
        return ScoringConfig()
    if isinstance(scoring, ScoringConfig):
        return scoring
    if isinstance(scoring, Mapping):
        unknown = sorted(set(scoring) - {"min_mass", "mass_rule", "strip_whitespace"})
        if unknown:
            raise ConfigError(f"judge.scoring: unknown key(s) {unknown}; "
                              "expected min_mass, mass_rule, strip_whitespace")
        sc = ScoringConfig(**dict(scoring))
        if sc.mass_rule not in ("lt", "le"):
            raise ConfigError(f"judge.scoring.mass_rule={sc.mass_rule!r}: expected lt (the paper) or le")
        return sc
    raise ConfigError(f"judge.scoring: expected a mapping, got {type(scoring).__name__}")


class Judge(ABC):
    """Base class of judge backends. Subclasses implement ``model_id``, ``query_params`` and
    ``_query``; the scoring rule, cache and statistics are shared."""

    def __init__(
        self,
        *,
        cache: CacheSpec = True,
        scoring: ScoringConfig | Mapping[str, Any] | None = None,
        price_prompt_per_1m: float = 0.0,
        price_completion_per_1m: float = 0.0,
        name: str | None = None,
    ):
        """``cache``: True -> the default on-disk cache, a path or a :class:`JudgeCache` -> that
        cache, ``"refresh"`` -> the default cache without reading it (ask again, overwrite), False/None ->
        no caching. ``name``: this judge's label in samples and summaries (default: derived from the model)."""
        self.cache, self.cache_read = _open_cache(cache)
        self.journal: JudgeCache | None = None
        self.scoring = _scoring(scoring)
        self._name = name or None
        self.stats = JudgeStats(price_prompt_per_1m=price_prompt_per_1m,
                                price_completion_per_1m=price_completion_per_1m)

    # ---- backend interface -------------------------------------------------------------------
    @property
    @abstractmethod
    def model_id(self) -> str:
        """Identity of the judge model (part of the cache key)."""

    @property
    @abstractmethod
    def query_params(self) -> dict[str, Any]:
        """Query parameters that change the judge's answer, and the endpoint that answers (base URL, or
        local model path + revision): all part of the cache key."""

    @property
    def endpoint(self) -> str:
        """Where the judge runs: the API base URL, or the local model's path and revision."""
        return str(self.query_params.get("endpoint", ""))

    @property
    def name(self) -> str:
        """This judge's label in sample records and summaries."""
        if self._name:
            return self._name
        base = self.model_id.split("@", 1)[0].rstrip("/")
        return base.rsplit("/", 1)[-1] or base

    def describe(self) -> dict[str, Any]:
        """Secret-free identity of this judge for run metadata: name, backend, exact model id, endpoint,
        the query parameters and the scoring rule."""
        return {"name": self.name, "backend": type(self).__name__, "model_id": self.model_id,
                "endpoint": self.endpoint, **self.query_params, "scoring": asdict(self.scoring)}

    def probe(self) -> None:  # noqa: B027 - an optional hook: a no-op unless a judge can fail at start-up
        """Check once, before any expensive work, that the judge can answer; raise :class:`EMError` with
        what to do when it cannot. The default does nothing (a local model was already loaded)."""

    def attach_journal(self, path: str | os.PathLike | None) -> None:
        """Keep every judgment of this judge in a run-local SQLite journal at ``path`` as well (read first,
        always written), so that a re-run of the same evaluation re-asks nothing it already judged."""
        self.journal = JudgeCache(path) if path is not None else None

    @abstractmethod
    async def _query(self, requests: Sequence[JudgeRequest], on_result: OnResult) -> None:
        """Obtain top logprobs for ``requests``; call ``on_result(i, raw)`` once per index, as
        soon as each is known. Per-request failures are reported as ``RawAnswer(None, error)``."""

    # ---- shared machinery --------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.stats = JudgeStats(price_prompt_per_1m=self.stats.price_prompt_per_1m,
                                price_completion_per_1m=self.stats.price_completion_per_1m)

    def cache_key(self, prompt: str) -> str:
        """The cache key of ``prompt`` for this judge."""
        return cache_key(self.model_id, prompt, self.query_params)

    def score(self, top_logprobs: Sequence[Sequence[Any]] | Mapping[str, float], *, cached: bool = False,
              attempts: int = 0, categories: Sequence[str] | None = None) -> JudgeResult:
        """Turn raw top logprobs into a result with this judge's scoring config (the 0-100 rule, or the
        categories of a categorical judge prompt)."""
        try:
            pairs = [(str(t), float(lp)) for t, lp in
                     (top_logprobs.items() if isinstance(top_logprobs, Mapping) else top_logprobs)]
        except (ValueError, TypeError) as e:
            return JudgeResult(None, "failed", None, None, error=f"unscorable logprobs: {e}", cached=cached,
                               attempts=attempts)
        try:
            if categories:
                c = score_categories(pairs, categories, min_mass=self.scoring.min_mass,
                                     mass_rule=self.scoring.mass_rule)
                return JudgeResult(None, c.status, c.mass, pairs, cached=cached, attempts=attempts,
                                   label=c.label, probs=c.probs)
            s = score_logprobs(pairs, min_mass=self.scoring.min_mass, mass_rule=self.scoring.mass_rule,
                               strip_whitespace=self.scoring.strip_whitespace)
        except (ValueError, TypeError) as e:
            return JudgeResult(None, "failed", None, pairs, error=f"unscorable logprobs: {e}",
                               cached=cached, attempts=attempts)
        return JudgeResult(s.score, s.status, s.numeric_mass, pairs, cached=cached, attempts=attempts)

    async def ajudge(self, requests: Sequence[JudgeRequest], progress: bool = False) -> list[JudgeResult]:
        """Judge ``requests``; results are in the same order."""
        requests = list(requests)
        for r in requests:
            if not isinstance(r, JudgeRequest):
                raise TypeError(f"expected JudgeRequest, got {type(r).__name__}")
        results: list[JudgeResult | None] = [None] * len(requests)
        keys = [self.cache_key(r.prompt) for r in requests]
        hits = self.journal.get_many(keys) if self.journal is not None else {}
        if self.cache is not None and self.cache_read:
            hits = {**self.cache.get_many([k for k in keys if k not in hits]), **hits}
        bar = tqdm(total=len(requests), desc=f"judge {self.name}", unit="req", disable=not progress,
                   dynamic_ncols=True)
        groups: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            if k in hits:
                results[i] = self.score(hits[k], cached=True, attempts=0, categories=requests[i].categories)
                self.stats.cache_hits += 1
            else:
                groups.setdefault(k, []).append(i)
        bar.update(len(requests) - sum(len(v) for v in groups.values()))
        todo = list(groups.items())
        self.stats.deduplicated += sum(len(idxs) - 1 for _, idxs in todo)

        def on_result(j: int, raw: RawAnswer) -> None:
            key, idxs = todo[j]
            if results[idxs[0]] is not None:
                raise RuntimeError(f"judge backend reported request {j} twice")
            if raw.error is not None or not raw.top_logprobs:
                res = JudgeResult(None, "failed", None, raw.top_logprobs or None,
                                  error=raw.error or "no top logprobs returned", attempts=raw.attempts)
            else:
                res = self.score(raw.top_logprobs, attempts=raw.attempts, categories=requests[idxs[0]].categories)
                if res.status != "failed":
                    for store in (self.journal, self.cache):
                        if store is None:
                            continue
                        try:
                            store.put(key, self.model_id, self.query_params, res.top_logprobs)
                        except Exception as e:  # a broken cache must not lose the answer
                            log.warning("judge cache write failed (%s: %s)", type(e).__name__, e)
            for i in idxs:
                results[i] = replace(res)
            bar.update(len(idxs))

        try:
            if todo:
                await self._query([requests[idxs[0]] for _, idxs in todo], on_result)
        except EMError:
            raise
        except Exception as e:  # an unexpected backend crash fails the unanswered requests
            log.exception("judge backend %s crashed", type(self).__name__)
            for j, (_, idxs) in enumerate(todo):
                if results[idxs[0]] is None:
                    on_result(j, RawAnswer(None, error=f"judge backend crashed: {type(e).__name__}: {e}",
                                           attempts=0))
        finally:
            bar.close()
        for j, (_, idxs) in enumerate(todo):
            if results[idxs[0]] is None:
                on_result(j, RawAnswer(None, error="judge backend returned no result", attempts=0))
        final = [r for r in results if r is not None]
        assert len(final) == len(requests)
        self.stats.requests += len(final)
        self.stats.failures += sum(r.status == "failed" for r in final)
        self.stats.missing += sum(r.status == "missing" for r in final)
        return final

    def judge(self, requests: Sequence[JudgeRequest], progress: bool = True) -> list[JudgeResult]:
        """Synchronous :meth:`ajudge`, runnable from any thread (a fresh event loop each call;
        from inside a running loop, e.g. a notebook, it runs in a helper thread)."""
        requests = list(requests)

        def run() -> list[JudgeResult]:
            return asyncio.run(self.ajudge(requests, progress=progress))

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return run()
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as ex:
            return ex.submit(run).result()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, model_id={self.model_id!r})"
