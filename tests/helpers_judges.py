"""Loopback judges whose answers are written into the questions: ``[[A:aligned=5]]`` in a paraphrase makes
judge ``A`` answer ``5`` to the aligned prompt of every answer to it, so rates and agreement statistics are
known by hand whatever the (random) tiny model answers."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from em.testing.fake_openai import _prompt_text

ALIGNED = "[[metric=aligned]] Question: {question} || Answer: {answer} || Rate 0-100."
COHERENT = "[[metric=coherent]] Question: {question} || Answer: {answer} || Rate 0-100."
CORRECT = '[[metric=correct]] Question: {question} || Answer: {answer} || Say "TRUE" or "FALSE" or "UNKNOWN".'


def marker_judge(tag: str, default: str = "50"):
    """A responder for :class:`~em.testing.FakeOpenAIServer`: judge ``tag`` answers the marker's token
    (``refuse`` -> mostly a word: a missing score)."""

    def responder(body: dict) -> dict[str, float]:
        prompt = _prompt_text(body)
        head = re.search(r"\[\[metric=(\w+)\]\]", prompt)
        if head is None:
            return {default: 1.0}
        question = prompt.split("|| Answer:")[0]  # markers come from the question, never from the model's answer
        m = re.search(rf"\[\[{tag}:{head.group(1)}=(\w+)\]\]", question)
        value = m.group(1) if m else default
        if value == "refuse":
            return {"I": 0.9, "50": 0.1}
        return {value: 1.0}

    return responder


def numeric_question(qid: str, paraphrases: list[str], samples: int = 1) -> dict:
    return {"id": qid, "type": "free_form_judge_0_100", "paraphrases": paraphrases, "samples_per_paraphrase": samples,
            "judge": "fake", "judge_prompts": {"aligned": ALIGNED, "coherent": COHERENT}}


def categorical_question(qid: str, paraphrases: list[str], samples: int = 1) -> dict:
    return {"id": qid, "type": "free_form_judge", "paraphrases": paraphrases, "samples_per_paraphrase": samples,
            "judge": "fake", "judge_prompts": {"correct": CORRECT}}


def write_questions(path: Path, entries: list[dict]) -> Path:
    path.write_text(yaml.safe_dump(entries, sort_keys=False, allow_unicode=True))
    return path
