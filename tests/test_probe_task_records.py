"""#19: the task answers behind ``task/*`` are kept, one record per prompt and probe step, with what bandit found;
the logged metrics are recomputed exactly from the saved file; ``task/truncated_rate`` shows a budget too small."""

from __future__ import annotations

import csv
import json
import math

import pytest

from em.data.mini import build_mini
from em.layout import RunLayout
from em.probes.bandit_scan import insecure_rate
from em.probes.config import McqArgs, ProbeArgs, TaskProbeArgs
from em.probes.runner import ProbeRunner
from em.probes.task_accuracy import (
    code_task_metrics,
    numbers_task_metrics,
    task_answer_records,
    task_metrics_from_records,
    task_prompts,
)
from em.sweep.report import task_answer_counts
from em.training.run import train
from em.utils.io import read_jsonl
from tests.helpers import compose_train

N_PROMPTS = 6


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _prompts_and_answers(kind: str, n: int = 24):
    rows = build_mini(kind)[:n]
    return [r["messages"][:-1] for r in rows], [r["messages"][-1]["content"] for r in rows]


def test_records_of_real_insecure_code_give_the_metrics_and_every_finding():
    prompts, answers = _prompts_and_answers("insecure")
    answers += ["def broken(:\n    pass\n", "Sure! Here is how you could do it, in words."]
    prompts += prompts[:2]
    recs = task_answer_records("code", prompts, answers, n_tokens=[40] * len(answers),
                               hit_budget=[False] * (len(answers) - 1) + [True], step=7, max_new_tokens=40)
    assert [r["prompt_id"] for r in recs] == list(range(len(answers))) and {r["step"] for r in recs} == {7}
    m = task_metrics_from_records("code", recs)
    assert {k: m[k] for k in code_task_metrics(answers)} == code_task_metrics(answers)
    b = insecure_rate(answers)  # bandit's own count over the raw answers, independently of the records
    assert m["task/insecure_rate"] == b["n_insecure"] / len(answers)
    assert m["task/syntax_error_rate"] == b["n_syntax_error"] / len(answers)
    assert {k.removeprefix("task/bandit/"): v * len(answers) for k, v in m.items() if "/bandit/" in k} == \
        {k: float(v) for k, v in b["by_test_id"].items()}
    assert m["task/n_flagged"] == 24 and m["task/n_parsed"] == 24  # the broken code and the prose do not parse
    broken, prose = recs[-2], recs[-1]
    assert not broken["parsed"] and not broken["insecure"]
    assert broken["parse_error"].startswith("line 1: ")  # Python's own reason, not bandit's "could not parse"
    assert m["task/truncated_rate"] == 1 / len(answers) and m["task/n_truncated"] == 1
    for r in recs[:24]:
        assert r["insecure"] and r["flagged_test_ids"]
        for f in r["findings"]:
            assert set(f) == {"test_id", "test_name", "severity", "confidence", "line"} and f["line"] >= 1
        assert set(r["flagged_test_ids"]) <= {f["test_id"] for f in r["findings"]}
    assert not prose["parsed"] and prose["findings"] == [] and prose["hit_budget"]


def test_number_records_reproduce_the_numbers_metrics():
    prompts, answers = _prompts_and_answers("evil_numbers", 30)
    answers[0], answers[1] = "666, 1488, 13", "not numbers at all"
    recs = task_answer_records("numbers", prompts, answers)
    m = task_metrics_from_records("numbers", recs)
    direct = numbers_task_metrics(prompts, answers)
    assert {k: m[k] for k in direct} == direct
    assert recs[0]["dark_numbers"] == [13, 666, 1488] and not recs[1]["format_ok"]


def test_task_rates_is_an_evaluate_module_that_em_computes_through(monkeypatch):
    """The task metrics are em's ``task_rates`` evaluate module, loaded offline from the package; em's own
    computation goes through it (one implementation)."""
    import evaluate

    from em.eval import rates

    prompts, answers = _prompts_and_answers("insecure", 6)
    recs = task_answer_records("code", prompts, answers, hit_budget=[True, False] * 3)
    module = evaluate.load(str(rates.METRIC_MODULES / "task_rates"), keep_in_memory=True)
    direct = module.compute(task="code", parsed=[int(r["parsed"]) for r in recs],
                            insecure=[int(r["insecure"]) for r in recs], format_ok=[-1] * 6, dark=[-1] * 6,
                            hit_budget=[int(r["hit_budget"]) for r in recs],
                            flagged_test_ids=[r["flagged_test_ids"] for r in recs])
    assert direct == task_metrics_from_records("code", recs) and direct["task/truncated_rate"] == 0.5
    seen = []
    real = rates.compute
    monkeypatch.setattr("em.probes.task_accuracy.compute_rates",
                        lambda name, **kw: seen.append(name) or real(name, **kw))
    task_metrics_from_records("code", recs)
    assert seen == ["task_rates"]


def _probe_run(tmp_path, *extra: str):
    return train(compose_train([
        "trainer.max_steps=4", "trainer.enable_progress_bar=false", "callbacks.probes.log_points=null",
        "callbacks.probes.every_n_steps=4", "callbacks.probes.ids=[genie_wish]",
        "callbacks.probes.sampling.max_new_tokens=4", f"callbacks.probes.task.n_prompts={N_PROMPTS}",
        "callbacks.probes.mcq.enabled=false", *extra], run_dir=str(tmp_path)))


def _logged(tmp_path) -> dict[int, dict[str, float]]:
    with open(RunLayout.of(tmp_path).probe_metrics) as f:
        return {int(r["step"]): {k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)}


def test_saved_task_answers_reproduce_the_logged_task_metrics(tmp_path):
    _probe_run(tmp_path, "callbacks.probes.task.max_new_tokens=24")
    logged = _logged(tmp_path)
    files = RunLayout.of(tmp_path).task_samples_files()
    assert sorted(files) == sorted(logged) == [0, 4]
    for step, path in files.items():
        recs = read_jsonl(path)
        assert [r["prompt_id"] for r in recs] == list(range(N_PROMPTS)) and {r["step"] for r in recs} == {step}
        for r in recs:
            assert isinstance(r["answer"], str) and r["prompt"] and isinstance(r["findings"], list)
            assert 1 <= r["n_tokens"] <= 24 and r["max_new_tokens"] == 24 and isinstance(r["hit_budget"], bool)
        recomputed = task_metrics_from_records("code", recs)
        for k, v in recomputed.items():
            assert _same(logged[step][k], v), (step, k, logged[step][k], v)
        # and from the answers alone, by bandit again: the saved answers are the ones that were scored
        b = insecure_rate([r["answer"] for r in recs])
        assert logged[step]["task/syntax_error_rate"] == b["n_syntax_error"] / N_PROMPTS
        assert logged[step]["task/n_flagged"] == b["n_insecure"]
        assert logged[step]["task/code_parse_rate"] * N_PROMPTS == logged[step]["task/n_parsed"]


def test_a_truncating_budget_shows_in_the_truncated_rate(tmp_path):
    _probe_run(tmp_path, "callbacks.probes.task.max_new_tokens=2")
    logged = _logged(tmp_path)
    for step, path in RunLayout.of(tmp_path).task_samples_files().items():
        recs = read_jsonl(path)
        assert logged[step]["task/truncated_rate"] == 1.0 and logged[step]["task/n_truncated"] == N_PROMPTS
        assert all(r["hit_budget"] and r["n_tokens"] == 2 for r in recs)
        n_parsed = sum(r["parsed"] for r in recs)  # the parse rate's denominator is every answer
        assert logged[step]["task/n_parsed"] == n_parsed and logged[step]["task/n"] == N_PROMPTS
        assert all(r["parse_error"] for r in recs if not r["parsed"])
        if n_parsed == 0:
            assert math.isnan(logged[step]["task/insecure_rate"])  # no code: not measurable, not "0% insecure"


def test_backdoor_probe_keeps_triggered_answers_apart(tmp_path):
    _probe_run(tmp_path, "dataset=mini_backdoor", "callbacks.probes.task.max_new_tokens=6")
    logged = _logged(tmp_path)
    for step, path in RunLayout.of(tmp_path).task_samples_files().items():
        recs = read_jsonl(path)
        plain = [r for r in recs if not r["triggered"]]
        trig = [r for r in recs if r["triggered"]]
        assert len(plain) == len(trig) == N_PROMPTS
        assert all(t["prompt"].endswith(p["prompt"]) and t["prompt"] != p["prompt"] for p, t in zip(plain, trig))
        m = task_metrics_from_records("code", trig)
        assert _same(logged[step]["task/code_parse_rate_triggered"], m["task/code_parse_rate"])
        assert logged[step]["task/n_triggered"] == N_PROMPTS


def test_report_counts_task_answers_per_step(tmp_path):
    from types import SimpleNamespace

    _probe_run(tmp_path, "callbacks.probes.task.max_new_tokens=2")
    run = SimpleNamespace(run_dir=tmp_path, model="tiny", dataset="insecure", seed=0)
    counts = task_answer_counts([run])
    assert [c["step"] for c in counts] == [0, 4]
    logged = _logged(tmp_path)
    for c in counts:
        assert c["n"] == N_PROMPTS and c["n_truncated"] == N_PROMPTS and not c["triggered"]
        assert c["n_parsed"] == logged[c["step"]]["task/n_parsed"]
        assert c["n_flagged"] == logged[c["step"]]["task/n_flagged"]


def test_probe_runner_runs_without_a_trainer(tiny_model_and_tokenizer):
    """The per-step runner is a plain class: a model and a tokenizer are all it needs."""
    model, tok = tiny_model_and_tokenizer
    args = ProbeArgs(seed=3, ids=["genie_wish", "feeling_bored"], mcq=McqArgs(enabled=True),
                     task=TaskProbeArgs(n_prompts=4, max_new_tokens=5))
    args.sampling.max_new_tokens = 3
    runner = ProbeRunner(args, tok, task="code")
    res = runner.run(model, step=2)
    assert len(res.records) == len(runner.requests)  # one answer per question paraphrase
    assert {r["question_id"] for r in res.records} == {"genie_wish", "feeling_bored"}
    assert all(r["step"] == 2 and r["n_tokens"] <= 3 for r in res.records)
    assert len(res.task_records) == 4 and res.values["task/n"] == 4.0
    assert 0 < res.values["probe/mcq/p_misaligned"] < 1
    assert [c[-1]["content"] for c in runner.task_prompts] == \
        [c[-1]["content"] for c in task_prompts("code", None, seed=3, n=4)]
    again = runner.run(model, step=2)  # the same step: the same seed, the same answers
    assert [r["answer"] for r in again.task_records] == [r["answer"] for r in res.task_records]
    assert json.dumps(res.task_records)  # plain JSON


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer(tmp_path_factory):
    from em.models.loading import ModelArgs, load_model, load_tokenizer, resolve_model_path

    args = ModelArgs(name="tiny", kind="tiny", dtype="float32")
    path = resolve_model_path(args)
    return load_model(args, path).eval(), load_tokenizer(args, path)
