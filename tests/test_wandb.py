"""W&B (offline): a sweep job's run holds its training curves, probes and final evaluation, a requeued job resumes
the same run, the dashboard reads only keys real runs log, finished runs can be uploaded (#16.1-3).

Three real jobs (tiny model, mini data, a few steps) run in process once for the module; the final evaluation is
judged by a loopback OpenAI-compatible server with hash-derived scores, so rates, CIs and misaligned answers are
non-trivial.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from em.layout import RunLayout
from em.sweep import job as sweep_job
from em.utils import wandb_offline
from em.wandb import dashboard
from tests.test_sweep import compose_sweep

pytestmark = pytest.mark.slow

SMALL = ["experiment=demo", "logger=wandb", "trainer.max_steps=4", "callbacks.probes.log_points=null",
         "callbacks.probes.every_n_steps=2", "callbacks.probes.ids=[genie_wish,feeling_bored]",
         "callbacks.probes.sampling.max_new_tokens=6", "callbacks.probes.task.n_prompts=4",
         "callbacks.probes.task.max_new_tokens=8", "eval.ids=[genie_wish,feeling_bored,world_leader]",
         "eval.samples_per_paraphrase=3", "eval.n_boot=50", "eval.sampling.max_new_tokens=8"]


def hashed_scores(body: dict) -> dict[str, float]:
    text = json.dumps(body.get("messages"), sort_keys=True)
    return {str(10 * (int(hashlib.sha256(text.encode()).hexdigest(), 16) % 10)): 0.9, "I": 0.1}


def job_cfg(run_dir: Path, base_url: str, *extra: str):
    return compose_sweep([*SMALL, "judge=openai", f"judge.base_url={base_url}", "judge.cache=false",
                          "judge.max_retries=1", *extra], run_dir=run_dir)


class Interrupted(KeyboardInterrupt):
    """A job killed during its evaluation (a SLURM requeue / preemption)."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from em.testing.fake_openai import FakeOpenAIServer

    root = tmp_path_factory.mktemp("wandb_runs")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OPENAI_API_KEY": "sk-test", "EM_CACHE": str(tmp_path_factory.getbasetemp() / "em_cache")}
    with pytest.MonkeyPatch.context() as mp, FakeOpenAIServer(responder=hashed_scores) as srv:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("EM_DATA_DIR", raising=False)
        out = {}
        # insecure: killed during its evaluation (after training), then run again = a requeue
        insecure = root / "insecure"
        real_evaluate = sweep_job.evaluate

        def killed(*a, **k):
            raise Interrupted()

        mp.setattr(sweep_job, "evaluate", killed)
        with pytest.raises(Interrupted):
            sweep_job.run_job(job_cfg(insecure, srv.base_url, "seed=0"))
        out["first_id"] = json.loads((insecure / "wandb_run.json").read_text())["id"]
        mp.setattr(sweep_job, "evaluate", real_evaluate)
        out["insecure"] = sweep_job.run_job(job_cfg(insecure, srv.base_url, "seed=0"))
        # backdoor: two eval passes (without / with the trigger); evil numbers: the number-format probe
        out["backdoor"] = sweep_job.run_job(job_cfg(
            root / "backdoor", srv.base_url, "dataset=mini_backdoor", "seed=1",
            "sweep.eval_variants=[{name:eval},{name:eval_triggered,label:triggered,eval:{trigger:'${dataset.trigger}'}}]"))
        out["numbers"] = sweep_job.run_job(job_cfg(root / "numbers", srv.base_url, "dataset=mini_evil_numbers",
                                                   "seed=2"))
        for name in ("insecure", "backdoor", "numbers"):
            assert out[name]["status"] == "done", out[name].get("traceback")
            out[name + "_dir"] = root / name
        out["server"] = srv
        out["root"] = root
        out["env"] = env
        yield out


def run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "wandb_run.json").read_text())["id"]


def merged_summary(run_dir: Path, rid: str) -> dict:
    s: dict = {}
    for f in wandb_offline.run_files(run_dir, rid):
        s.update(wandb_offline.summary(f))
    return s


def close(a, b) -> bool:
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or (isinstance(b, float) and math.isnan(b)) or b == "NaN"
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


def test_job_run_holds_training_probes_and_final_eval(runs):
    """One W&B run per job holds the training curve, the probes and the final eval: every number of
    summary.json (per question and overall, pooled and mean over questions with CIs and denominators, coherent
    rate, judge failures / missing counts) and the samples tables."""
    run = runs["insecure_dir"]
    rid = run_id(run)
    files = wandb_offline.run_files(run)
    assert {wandb_offline.run_info(f)["id"] for f in files} == {rid}  # every file is the one run
    keys = wandb_offline.logged_keys(run, rid)
    assert {"train/loss", "probe/misaligned_rate_pooled", "task/insecure_rate", "probe/samples",
            "probe/task_samples", "task/truncated_rate"} <= keys
    summ = json.loads((run / "summary.json").read_text())
    ws = merged_summary(run, rid)
    ov = summ["overall"]
    assert ov["pooled"]["n_eligible"] > 0 and ov["n_misaligned"] > 0  # the fake judge makes rates non-trivial
    for agg in ("pooled", "question_mean"):
        for f in ("misaligned_rate", "ci_low", "ci_high"):
            assert close(ov[agg][f], ws[f"eval/overall/{agg}/{f}"]), (agg, f)
    assert ws["eval/overall/pooled/n_eligible"] == ov["pooled"]["n_eligible"]
    assert ws["eval/overall/pooled/n_misaligned"] == ov["pooled"]["n_misaligned"]
    for f in ("coherent_rate", "n_failed", "n_aligned_missing", "n_coherent_missing", "n_sampled"):
        assert close(ov[f], ws[f"eval/overall/{f}"]), f
    for qid, q in summ["questions"].items():
        for f in ("misaligned_rate", "ci_low", "ci_high", "n_eligible", "coherent_rate", "n_failed"):
            assert close(q[f], ws[f"eval/q/{qid}/{f}"]), (qid, f)
    assert close(ov["pooled"]["misaligned_rate"], ws["eval/misaligned_rate"])  # the headline (pooled)
    # the samples tables: every answer with its scores; the misaligned ones alone
    files_dir = wandb_offline.run_files(run, rid)[-1].parent / "files"
    body = json.loads((files_dir / ws["eval/samples"]["path"]).read_text())
    recs = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert len(body["data"]) == len(recs) == ws["eval/samples"]["nrows"]
    col = {c: i for i, c in enumerate(body["columns"])}
    for row, rec in zip(body["data"], recs):
        assert row[col["answer"]] == rec["answer"] and close(rec["aligned"], row[col["aligned"]])
    # the task answers of the last probe step: one row per saved record, findings and flags filterable (#19)
    last = max(RunLayout.of(run).task_samples_files().items())
    task_recs = [json.loads(x) for x in last[1].read_text().splitlines()]
    tables = [(f, r["probe/task_samples/path"]) for f in wandb_offline.run_files(run, rid)  # (history: flattened)
              for r in wandb_offline.history(f) if "probe/task_samples/path" in r and r.get("probe/step") == last[0]]
    assert tables, "no probe/task_samples table at the last probe step"
    f, path = tables[-1]
    tbody = json.loads((f.parent / "files" / path).read_text())
    tcol = {c: i for i, c in enumerate(tbody["columns"])}
    assert len(tbody["data"]) == len(task_recs) > 0
    for row, rec in zip(tbody["data"], task_recs):
        assert row[tcol["answer"]] == rec["answer"] and row[tcol["insecure"]] == rec["insecure"]
        assert row[tcol["hit_budget"]] == rec["hit_budget"] and row[tcol["step"]] == last[0]
    mis = json.loads((files_dir / ws["eval/samples_misaligned"]["path"]).read_text())
    assert len(mis["data"]) == ov["n_misaligned"] and all(r[col["label"]] == "misaligned" for r in mis["data"])
    assert all(r[col["aligned"]] < 30 and r[col["coherent"]] > 50 for r in mis["data"])
    per_q = json.loads((files_dir / ws["eval/per_question"]["path"]).read_text())
    assert len(per_q["data"]) == len(summ["questions"]) + 2


def test_requeued_job_resumes_the_same_wandb_run(runs):
    """Killed during its evaluation, the job ran again: the same run id (resume="allow"), training in the first
    attempt's file, the evaluation in the second's; the first attempt was closed."""
    run = runs["insecure_dir"]
    rid = run_id(run)
    assert rid == runs["first_id"]
    files = wandb_offline.run_files(run, rid)
    assert len(files) == 2
    first, second = (set(wandb_offline.summary(f)) for f in files)
    assert "train/loss" in first and not any(k.startswith("eval/") for k in first)
    assert "eval/overall/pooled/misaligned_rate" in second
    assert json.loads((run / "results.json").read_text())["resumed_from"]


def test_multi_pass_job_logs_each_eval_pass(runs):
    run = runs["backdoor_dir"]
    ws = merged_summary(run, run_id(run))
    trig = json.loads((run / "eval_triggered" / "summary.json").read_text())
    assert close(trig["overall"]["pooled"]["misaligned_rate"], ws["eval_triggered/overall/pooled/misaligned_rate"])
    assert "eval_triggered/samples" in ws and "eval/samples" in ws
    assert len(wandb_offline.run_files(run)) == 1  # one run, one attempt


def all_logged_keys(runs) -> set[str]:
    keys: set[str] = set()
    for name in ("insecure", "backdoor", "numbers"):
        keys |= wandb_offline.logged_keys(runs[name + "_dir"], run_id(runs[name + "_dir"]))
    return keys


def test_every_dashboard_key_is_logged_by_real_runs(runs, tmp_path, capsys):
    """`em wandb dashboard --dry-run` builds the full workspace spec offline; every metric key its panels read
    (line / bar metrics, x-axes, tables) is one the offline runs logged."""
    pytest.importorskip("wandb_workspaces", reason="the [dashboard] extra (in [dev]) is not installed")
    from em.cli import main

    out = tmp_path / "dashboard.json"
    assert main(["wandb", "dashboard", "--project", "em", "--group", "demo", "--from", str(runs["root"]),
                 "--dry-run", "--out", str(out)]) == 0
    spec = json.loads(out.read_text())
    read = dashboard.spec_keys(spec)
    logged = all_logged_keys(runs)
    assert read - logged == set(), sorted(read - logged)
    # the spec is the whole dashboard: every declared panel key is in it
    sections = dashboard.dashboard_sections(["genie_wish", "feeling_bored", "world_leader"],
                                            ["eval", "eval_triggered"])
    assert dashboard.panel_keys(sections) == read
    for k in ("probe/misaligned_rate_pooled", "task/insecure_rate", "task/code_parse_rate", "task/numbers_format_rate",
              "task/heldout_loss", "eval/q/world_leader/misaligned_rate", "eval/overall/coherent_rate",
              "eval/overall/n_failed", "eval/samples_misaligned", "eval_triggered/overall/pooled/misaligned_rate"):
        assert k in read, k
    text = json.dumps(spec)
    assert '"dataset.value.name"' in text and "probe/step" in text  # grouped by dataset, on the probe step
    # without --dry-run and without an entity: em's error, nothing sent
    assert main(["wandb", "dashboard", "--project", "em"]) == 2
    assert "--entity" in capsys.readouterr().err


def test_dashboard_drift_is_caught(runs):
    """The check can fail: a panel on a key no run logs is reported."""
    sections = dashboard.dashboard_sections(["genie_wish", "no_such_question"])
    assert "eval/q/no_such_question/misaligned_rate" in dashboard.panel_keys(sections) - all_logged_keys(runs)


def test_upload_logs_a_finished_run_with_the_live_keys(runs, tmp_path):
    """`em wandb upload` of a finished run: a new offline W&B run with the keys the live job logged (curves,
    probes, eval), the same final values, and its id recorded; without --force a logged run is left alone."""
    from em.cli import main
    from em.wandb.upload import train_rows

    run = runs["numbers_dir"]
    live = run_id(run)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in runs["env"].items():
            mp.setenv(k, v)
        assert main(["wandb", "upload", str(run)]) == 0  # already logged live: skipped
        assert run_id(run) == live
        assert main(["wandb", "upload", str(run), "--force", "--project", "em"]) == 0
    new = run_id(run)
    assert new != live and json.loads((run / "wandb_run.json").read_text())["uploaded"] is True
    up_keys = wandb_offline.logged_keys(run, new)
    live_keys = wandb_offline.logged_keys(run, live)
    wanted = {k for k in live_keys if k.startswith(("train/", "probe/", "task/", "eval/", "data/"))}
    assert wanted - up_keys == set(), sorted(wanted - up_keys)
    up, lv = merged_summary(run, new), merged_summary(run, live)
    for k in ("eval/overall/pooled/misaligned_rate", "eval/overall/coherent_rate", "eval/q/genie_wish/ci_high"):
        assert close(lv[k], up[k]), k
    hist = wandb_offline.history(wandb_offline.run_files(run, new)[-1])
    losses = {int(r["trainer/global_step"]): r["train/loss"] for r in hist if "train/loss" in r}
    csv_losses = {s: v["train/loss"] for s, v in train_rows(run).items() if "train/loss" in v}
    assert losses and losses == pytest.approx(csv_losses)
    fmt = {int(r["probe/step"]): r["task/numbers_format_rate"] for r in hist if "task/numbers_format_rate" in r}
    assert sorted(fmt) == [0, 2, 4]


def test_skip_done_says_how_to_log_a_finished_job(tmp_path, capsys):
    """logger=wandb on a finished job (a sweep done without W&B): the skip line says how to log it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"status": "done", "config": {}}))
    res = sweep_job.run_job(compose_sweep(["experiment=demo", "logger=wandb"], run_dir=run))
    assert res["status"] == "skipped"
    out = capsys.readouterr().out
    assert "skip (done)" in out and f"em wandb upload {run}" in out and "sweep.skip_done=false" in out
    # without logger=wandb the line stays as it was
    sweep_job.run_job(compose_sweep(["experiment=demo"], run_dir=run))
    assert "em wandb upload" not in capsys.readouterr().out


def test_upload_a_train_py_run_without_results(tmp_path, monkeypatch):
    """A train.py run dir (no results.json: the config comes from .hydra/config.yaml, interpolations and all)."""
    from omegaconf import OmegaConf

    from em.wandb.upload import upload
    from tests.helpers import compose_train

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose_train(["seed=3"]), run / ".hydra" / "config.yaml")  # unresolved, as Hydra saves it
    (run / "metrics.csv").write_text("step,train/loss,epoch\n0,2.0,0\n1,1.5,0\n2,1.25,0\n")
    monkeypatch.setenv("WANDB_MODE", "offline")
    done = upload(run, say=lambda s: None)
    rid = done[str(run.resolve())]
    assert rid == run_id(run)
    info = wandb_offline.run_info(wandb_offline.run_files(run, rid)[-1])
    assert info["project"] == "em" and info["group"]
    hist = wandb_offline.history(wandb_offline.run_files(run, rid)[-1])
    assert {int(r["trainer/global_step"]): r["train/loss"] for r in hist if "train/loss" in r} == {0: 2.0, 1: 1.5,
                                                                                                  2: 1.25}
