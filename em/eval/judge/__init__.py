"""The LLM judge: the paper's 0-100 logprob-weighted scoring behind one interface.

* :mod:`~em.eval.judge.scoring` - the scoring rule (pure functions);
* :mod:`~em.eval.judge.base` - ``Judge``, ``JudgeRequest``, ``JudgeResult``, statistics;
* :mod:`~em.eval.judge.cache` - the persistent SQLite cache of raw top logprobs;
* :mod:`~em.eval.judge.openai` - any OpenAI-compatible API (the paper: gpt-4o-2024-08-06);
* :mod:`~em.eval.judge.hf` - a local transformers model.
"""

from em.eval.judge.base import Judge, JudgeRequest, JudgeResult, JudgeStats, RawAnswer, ScoringConfig
from em.eval.judge.cache import JudgeCache, cache_key, default_cache_path
from em.eval.judge.hf import HFJudge
from em.eval.judge.openai import DEFAULT_MODEL, OpenAIJudge
from em.eval.judge.scoring import ScoreResult, parse_score_token, score_distribution, score_logprobs

__all__ = [
    "DEFAULT_MODEL", "HFJudge", "Judge", "JudgeCache", "JudgeRequest", "JudgeResult", "JudgeStats",
    "OpenAIJudge", "RawAnswer", "ScoreResult", "ScoringConfig", "cache_key", "default_cache_path",
    "parse_score_token", "score_distribution", "score_logprobs",
]
