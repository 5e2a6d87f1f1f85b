"""The LLM judge: the paper's 0-100 logprob-weighted scoring (and categorical judges) behind one interface.

* :mod:`~em.eval.judge.config` - the structured configs (one per judge kind) and ``build_judge``;
* :mod:`~em.eval.judge.scoring` - the scoring rules (pure functions);
* :mod:`~em.eval.judge.base` - ``Judge``, ``JudgeRequest``, ``JudgeResult``, statistics;
* :mod:`~em.eval.judge.cache` - the persistent SQLite cache of raw top logprobs;
* :mod:`~em.eval.judge.openai` - any OpenAI-compatible API through the openai SDK (the paper: gpt-4o-2024-08-06);
* :mod:`~em.eval.judge.hf` - a local transformers model (and the offline tiny judge).
"""

from em.eval.judge.base import Judge, JudgeRequest, JudgeResult, JudgeStats, RawAnswer, ScoringConfig
from em.eval.judge.cache import JudgeCache, cache_key, default_cache_path
from em.eval.judge.hf import HFJudge
from em.eval.judge.openai import DEFAULT_MODEL, OpenAIJudge
from em.eval.judge.scoring import (
    CategoryResult,
    ScoreResult,
    parse_score_token,
    score_categories,
    score_distribution,
    score_logprobs,
)

__all__ = [
    "CategoryResult", "DEFAULT_MODEL", "HFJudge", "Judge", "JudgeCache", "JudgeRequest", "JudgeResult", "JudgeStats",
    "OpenAIJudge", "RawAnswer", "ScoreResult", "ScoringConfig", "cache_key", "default_cache_path",
    "parse_score_token", "score_categories", "score_distribution", "score_logprobs",
]
