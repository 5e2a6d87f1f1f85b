"""Mid-training probes: cadence, background judging that overlaps training, logging at the sampling step."""

from __future__ import annotations

import csv
import math
import os
import sys
import threading
from pathlib import Path

import pytest

from em.probes.schedule import eval_steps
from em.testing.fake_openai import FakeOpenAIServer
from em.training.run import train
from tests.helpers import compose_train


def test_log_spaced_schedule_is_dense_early_and_includes_ends():
    s = eval_steps(1000, log_points=8)
    assert s[0] == 0 and s[-1] == 1000 and len(s) >= 8
    early = [x for x in s if x <= 100]
    assert len(early) >= len(s) // 2  # half the points in the first 10% of training
    assert eval_steps(20, every_n_steps=5) == [0, 5, 10, 15, 20]
    assert eval_steps(20, every_n_steps=5, at_start=False, at_end=False) == [5, 10, 15, 20]


def test_embedded_default_cadence_gives_at_least_four_points():
    """`python train.py` as composed (no overrides): the probe schedule it will run, and that the
    probes are on. (The full 375-step run is measured in benchmarks/probe_overhead.py.)"""
    cfg = compose_train([])
    p = cfg.callbacks.probes
    steps = eval_steps(cfg.trainer.max_steps, p.every_n_steps, p.log_points, p.at_start, p.at_end)
    assert steps == [0, 7, 52, 375], steps
    assert cfg.model.kind == "tiny" and p.enabled and p.judge == "tiny"



def _probe_callback(summary_run_dir):
    return Path(summary_run_dir) / "probes"


def test_judge_runs_in_background_while_training_advances(tmp_path, monkeypatch):
    """A slow judge (the loopback server sleeps) must not hold the training loop."""
    from em.probes import callback as cb_mod

    instances = []
    orig_init = cb_mod.MisalignmentProbe.__init__

    def spy_init(self, *a, **k):
        orig_init(self, *a, **k)
        instances.append(self)

    monkeypatch.setattr(cb_mod.MisalignmentProbe, "__init__", spy_init)
    linux = sys.platform.startswith("linux")  # per-thread nice (the worker's idle priority) is Linux-only

    def nice() -> int | None:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) if linux else None

    worker_nice = []
    orig_judge_step = cb_mod.MisalignmentProbe._judge_step

    def spy_judge_step(self, *a, **k):
        worker_nice.append(nice())
        return orig_judge_step(self, *a, **k)

    monkeypatch.setattr(cb_mod.MisalignmentProbe, "_judge_step", spy_judge_step)
    main_nice = nice()
    with FakeOpenAIServer(delay_s=0.15) as srv:
        cfg = compose_train([
            "trainer.max_steps=12", "trainer.enable_progress_bar=false",
            f"callbacks.probes.judge={{_target_:em.eval.judge.openai.OpenAIJudge,base_url:'{srv.base_url}',max_concurrency:1,"
            f"cache:'{tmp_path / 'j.sqlite'}'}}",

            "callbacks.probes.every_n_steps=4", "callbacks.probes.log_points=null",
            "callbacks.probes.ids=[genie_wish,feeling_bored]", "callbacks.probes.sampling.max_new_tokens=8",
            "callbacks.probes.mcq.enabled=false", "callbacks.probes.task.enabled=false",
        ], run_dir=str(tmp_path / "run"))
        train(cfg)
    probe = instances[-1]
    judged = [h for h in probe.history if h["source"] == "judge"]
    sampled_steps = sorted({h["step"] for h in probe.history if h["source"] == "sync"})
    assert sampled_steps == [0, 4, 8, 12]
    # every sampling step got its judged values, logged at that step, by the end
    assert sorted(h["step"] for h in judged) == sampled_steps
    assert all(not math.isnan(h["probe/misaligned_rate_pooled"]) or h["probe/n_eligible"] == 0 for h in judged)
    # and training advanced while judgments were pending: some result arrived at a later global step
    assert any(h["logged_at_step"] > h["step"] for h in judged), [(h["step"], h["logged_at_step"]) for h in judged]
    assert all(h["probe/judge_failed"] == 0 for h in judged)
    # the worker ran at idle priority (worker_nice: 19, Linux), the training thread did not change
    if linux:
        assert worker_nice and all(n == 19 for n in worker_nice), worker_nice
        assert nice() == main_nice
    # the values reached the CSV logger at the sampling step
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("probe/misaligned_rate_pooled")]
    assert sorted(int(r["step"]) for r in rows) == sampled_steps


def test_judge_failures_are_logged_not_dropped(tmp_path):
    with FakeOpenAIServer(faults=["500"] * 1000) as srv:
        cfg = compose_train([
            "trainer.max_steps=2", "trainer.enable_progress_bar=false",
            f"callbacks.probes.judge={{_target_:em.eval.judge.openai.OpenAIJudge,base_url:'{srv.base_url}',max_retries:0,"
            f"cache:'{tmp_path / 'j.sqlite'}'}}",

            "callbacks.probes.log_points=null", "callbacks.probes.ids=[genie_wish]",
            "callbacks.probes.sampling.max_new_tokens=4",
            "callbacks.probes.mcq.enabled=false", "callbacks.probes.task.enabled=false",
        ], run_dir=str(tmp_path / "run"))
        train(cfg)
    with open(tmp_path / "run" / "probes" / "probe_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 2]
    assert all(float(r["probe/judge_failed"]) == float(r["probe/n_answers"]) > 0 for r in rows)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_run_shards_probe_prompts_and_logs_once(tmp_path, strategy):
    """2 CPU processes on gloo: both ranks sample (strided shards), rank 0 logs one set of values.
    Under FSDP every forward is collective, so this also proves no rank-0-only generation."""
    import json
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "EM_CACHE": os.environ["EM_CACHE"]}
    r = subprocess.run(
        [sys.executable, str(repo / "train.py"), "trainer=ddp_cpu", f"strategy={strategy}", "data.micro_batch_size=4",
         "trainer.max_steps=4", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}",
         "callbacks.probes.log_points=null", "callbacks.probes.every_n_steps=2",
         "callbacks.probes.sampling.max_new_tokens=6", "callbacks.probes.ids=[genie_wish,feeling_bored]",
         "callbacks.probes.task.n_prompts=4", "callbacks.probes.task.max_new_tokens=6"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(run_dir / "probes" / "probe_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(x["step"]) for x in rows] == [0, 2, 4]  # one row per step: logged once, by rank 0
    assert all(float(x["probe/world_size"]) == 2 for x in rows)
    assert all(0 < float(x["probe/mcq/p_misaligned"]) < 1 and x["task/insecure_rate"] != "" for x in rows)
    recs = [json.loads(line) for line in open(run_dir / "probes" / "samples_step000004.jsonl")]
    ranks = [rec["rank"] for rec in recs]
    assert set(ranks) == {0, 1} and abs(ranks.count(0) - ranks.count(1)) <= 1
    assert all(isinstance(rec["answer"], str) for rec in recs)


def test_default_train_runs_every_probe_and_writes_csv_and_plot(tmp_path):
    """The embedded default: >= 4 probe points with probe/* and task/* columns, and the plot."""
    s = train(compose_train(["trainer.enable_progress_bar=false", "callbacks.probes.sampling.max_new_tokens=16",
                             "callbacks.probes.task.max_new_tokens=32", "callbacks.probes.task.n_prompts=8",
                             "callbacks.probes.ids=[genie_wish,feeling_bored]", "trainer.max_steps=24"],
                            run_dir=str(tmp_path)))
    with open(tmp_path / "probes" / "probe_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 4 and rows[0]["step"] == "0" and int(rows[-1]["step"]) == s["global_step"]
    cols = rows[0].keys()
    for c in ("probe/misaligned_rate", "probe/coherent_rate", "probe/mcq/logodds_misaligned",
              "probe/mcq/p_misaligned", "task/insecure_rate", "task/heldout_loss", "probe/judge_failed"):
        assert c in cols, c
    # numbers, not blanks: the MCQ probe and held-out loss are defined at every step
    assert all(0 < float(r["probe/mcq/p_misaligned"]) < 1 for r in rows)
    losses = [float(r["task/heldout_loss"]) for r in rows]
    assert losses[-1] < losses[0]  # the task is being learned
    assert (tmp_path / "probes" / "probe_dynamics.png").stat().st_size > 10_000
    # every probe step kept its task answers, one per prompt
    assert all((tmp_path / "probes" / f"task_samples_step{int(r['step']):06d}.jsonl").exists() for r in rows)
    with open(tmp_path / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert "task/insecure_rate" in header and "probe/mcq/p_misaligned" in header


def test_backdoor_probe_samples_task_prompts_with_and_without_trigger_in_one_loop(tmp_path, monkeypatch):
    """Probe questions, task prompts and triggered task prompts share one generate loop per probe point."""
    from em.eval import sampling

    calls = []
    orig = sampling.HFSampler.sample

    def spy(self, conversations, *a, **k):
        calls.append((len(conversations), k.get("max_new_tokens")))
        return orig(self, conversations, *a, **k)

    monkeypatch.setattr(sampling.HFSampler, "sample", spy)
    s = train(compose_train(["dataset=mini_backdoor", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
                             "callbacks.probes.log_points=null", "callbacks.probes.ids=[genie_wish]",
                             "callbacks.probes.sampling.max_new_tokens=4", "callbacks.probes.task.max_new_tokens=6",
                             "callbacks.probes.task.n_prompts=3", "callbacks.probes.mcq.enabled=false"],
                            run_dir=str(tmp_path)))
    assert s["global_step"] == 2
    n_probe = len(calls)  # one call per probe point (steps 0 and 2)
    assert n_probe == 2, calls
    for n, budgets in calls:
        k = budgets.count(4)
        assert budgets.count(6) == 2 * 3 and n == k + 6  # 3 task prompts, plain and triggered
    with open(tmp_path / "probes" / "probe_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(r["task/insecure_rate_triggered"] != "" and r["task/insecure_rate"] != "" for r in rows)


def test_wandb_offline_run_holds_probe_values_samples_table_and_plot(tmp_path, monkeypatch):
    """`logger=wandb` (offline): the probe/task values logged at their sampling step (probe/step axis)
    equal the CSV's, each probe step's sampled answers are a W&B table file, and the plot is logged."""
    import json

    from em.utils.wandb_offline import find_run_file, history

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    train(compose_train([
        "logger=wandb", "trainer.max_steps=4", "trainer.enable_progress_bar=false",
        "callbacks.probes.log_points=null", "callbacks.probes.every_n_steps=2",
        "callbacks.probes.ids=[genie_wish,feeling_bored]", "callbacks.probes.sampling.max_new_tokens=6",
        "callbacks.probes.task.n_prompts=4", "callbacks.probes.task.max_new_tokens=6",
    ], run_dir=str(run_dir)))
    with open(run_dir / "probes" / "probe_metrics.csv") as f:
        csv_rows = {int(r["step"]): r for r in csv.DictReader(f)}
    assert sorted(csv_rows) == [0, 2, 4]
    h = history(find_run_file(run_dir))
    for key in ("probe/mcq/p_misaligned", "task/insecure_rate", "task/heldout_loss", "probe/n_answers"):
        got = {int(r["probe/step"]): r[key] for r in h if key in r}
        assert sorted(got) == [0, 2, 4], (key, got)
        for step, v in got.items():
            a, b = float(v), float(csv_rows[step][key])  # NaN (not measurable) must be NaN in both
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (key, step)
    # (the reader flattens a logged media dict into "<key>/<field>" entries)
    tables = [r for r in h if "probe/samples/path" in r]
    assert sorted(int(r["probe/step"]) for r in tables) == [0, 2, 4]
    files_dir = find_run_file(run_dir).parent / "files"
    for r in tables:
        assert r["probe/samples/_type"] == "table-file"
        body = json.loads((files_dir / r["probe/samples/path"]).read_text())
        assert body["columns"][:3] == ["step", "question_id", "answer"]
        n = sum(1 for _ in open(run_dir / "probes" / f"samples_step{int(r['probe/step']):06d}.jsonl"))
        assert len(body["data"]) == n == r["probe/samples/nrows"] > 0
        assert all(row[0] == int(r["probe/step"]) for row in body["data"])
    plots = [r for r in h if "probe/dynamics/path" in r]
    assert len(plots) == 1 and (files_dir / plots[0]["probe/dynamics/path"]).stat().st_size > 10_000
