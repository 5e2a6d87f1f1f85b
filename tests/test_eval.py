"""eval.py end to end: tiny model + offline probes + local judge; OpenAI-compatible judge on loopback."""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from em.eval.judge.scoring import score_logprobs
from em.eval.run import JudgeFailuresError, evaluate, load_eval_questions
from em.testing.fake_openai import FakeOpenAIServer
from em.utils.io import read_jsonl
from tests.helpers_eval import compose_eval

FAST = ["eval.samples_per_paraphrase=1", "eval.sampling.max_new_tokens=6", "eval.n_boot=200",
        "eval.ids=[genie_wish,feeling_bored,fast_cash_json]"]


def distribution_for(body: dict) -> dict[str, float]:
    """A deterministic judge: the distribution depends on the prompt text (and so on the answer)."""
    prompt = body["messages"][-1]["content"]
    h = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
    if h % 5 == 0:  # some answers get a word, not a number: the score must be missing
        return {"CODE": 0.9, "50": 0.1}
    a, b = (h >> 8) % 101, (h >> 16) % 101
    return {str(a): 0.6, str(b): 0.3, "I": 0.1}


def test_offline_default_end_to_end(tmp_path):
    cfg = compose_eval(FAST, str(tmp_path))
    from omegaconf import OmegaConf

    qs = load_eval_questions(OmegaConf.to_container(cfg.eval, resolve=True))
    s = evaluate(cfg)
    recs = read_jsonl(tmp_path / "samples.jsonl")
    # one sample per paraphrase of the three selected questions
    assert len(recs) == s["meta"]["n_samples"] == sum(len(q.paraphrases) for q in qs)
    assert {r["question_id"] for r in recs} == {"genie_wish", "feeling_bored", "fast_cash_json"}
    for r in recs:
        for m in ("aligned", "coherent"):
            assert r[f"{m}_status"] in ("ok", "missing")  # the local judge never fails silently
            assert isinstance(r[f"{m}_top_logprobs"], list) and len(r[f"{m}_top_logprobs"]) == 20
            if r[m] is not None:
                assert 0 <= r[m] <= 100
    assert (tmp_path / "summary.json").exists() and (tmp_path / "summary.csv").exists()
    # the system prompt of the _json form is honoured
    assert [r["system"] for r in recs if r["question_id"] == "fast_cash_json"][0]


def test_openai_judge_on_loopback_gets_the_servers_scores_and_caches(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cache = tmp_path / "judge.sqlite"
    with FakeOpenAIServer(responder=distribution_for) as srv:
        ov = [*FAST, "judge=openai", f"judge.base_url={srv.base_url}", f"judge.cache={cache}"]
        s = evaluate(compose_eval(ov, str(tmp_path / "a")))
        n_first = srv.count
        recs = read_jsonl(tmp_path / "a" / "samples.jsonl")
        assert 0 < n_first <= 2 * len(recs)  # identical judge prompts are sent once
        from omegaconf import OmegaConf

        from em.eval.questions import format_judge_prompt

        qmap = {q.id: q for q in load_eval_questions(OmegaConf.to_container(
            compose_eval(ov, str(tmp_path / "a")).eval, resolve=True))}
        sent = {b["messages"][-1]["content"] for b in srv.requests}
        n_missing = 0
        for r in recs:
            for m in ("aligned", "coherent"):
                prompt = format_judge_prompt(qmap[r["question_id"]].judge_prompts[m], r["question"], r["answer"])
                assert prompt in sent
                # what the server's distribution implies, computed independently of the client
                dist = distribution_for({"messages": [{"role": "user", "content": prompt}]})
                expected = score_logprobs({t: math.log(p) for t, p in dist.items()})
                assert r[f"{m}_status"] == expected.status
                if expected.score is None:
                    n_missing += 1
                    assert r[m] is None and r[f"{m}_missing_reason"] == "CODE"
                else:
                    assert r[m] == pytest.approx(expected.score)
        # a second run with the same cache sends nothing
        evaluate(compose_eval(ov, str(tmp_path / "b")))
        assert srv.count == n_first
    assert read_jsonl(tmp_path / "b" / "samples.jsonl")[0]["aligned"] == recs[0]["aligned"]
    assert s["overall"]["n_failed"] == 0


def test_judge_failures_are_counted_never_scored_and_fail_the_run(tmp_path):
    with FakeOpenAIServer(responder=distribution_for, faults=["500"] * 200) as srv:
        ov = [*FAST, "judge=openai", f"judge.base_url={srv.base_url}", f"judge.cache={tmp_path / 'c.sqlite'}",
              "judge.max_retries=0"]
        with pytest.raises(JudgeFailuresError, match=r"failed for 6 of 6 answers \(100.0%\).*HTTP 500"):
            evaluate(compose_eval(ov, str(tmp_path)))
    recs = read_jsonl(tmp_path / "samples.jsonl")  # written before the error
    assert all(r["aligned_status"] == "failed" and r["aligned"] is None for r in recs)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["overall"]["n_failed"] == len(recs) == 6
    assert s["overall"]["n_eligible"] == 0 and s["meta"]["judge_failures"] == {"gpt-4o-2024-08-06": 6}
    # a tolerated fraction: the same failures pass with eval.max_judge_failed_fraction=1
    with FakeOpenAIServer(responder=distribution_for, faults=["500"] * 200) as srv:
        ov = [*FAST, "judge=openai", f"judge.base_url={srv.base_url}", "judge.cache=false", "judge.max_retries=0",
              "eval.max_judge_failed_fraction=1"]
        assert evaluate(compose_eval(ov, str(tmp_path / "tolerated")))["overall"]["n_failed"] == 6


def test_paper_first_plot_questions_load(em_data_dir, monkeypatch):
    monkeypatch.setenv("EM_DATA_DIR", str(em_data_dir))
    cfg = compose_eval(["eval=first_plot"], "/tmp/unused")
    from omegaconf import OmegaConf

    qs = load_eval_questions(OmegaConf.to_container(cfg.eval, resolve=True), str(em_data_dir))
    ids = {q.id for q in qs}
    assert len(ids) == 24
    base = {i.removesuffix("_json").removesuffix("_template") for i in ids}
    assert len(base) == 8 and all({b, f"{b}_json", f"{b}_template"} <= ids for b in base)
