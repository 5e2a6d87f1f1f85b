"""Preview a launch: every job's run dir, launch parameters, start-up checks and forecast; nothing runs (#16.4-6)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from em.sweep.plan import expand, format_plan, main, plan_job
from tests.test_sweep import REPO, _env

# the body of docs/scaling.md's sbatch script (train.py on 2 nodes x 8 GPUs)
MULTI_NODE = ["dataset=insecure", "model=qwen", "strategy=deepspeed_zero3", "trainer.num_nodes=2", "trainer.devices=8",
              "callbacks.checkpoint.every_n_train_steps=50", "paths.run_dir=outputs/train/em-qwen-zero3-1234"]


def test_the_documented_multi_node_command_passes_the_start_up_checks(em_data_dir, monkeypatch):
    monkeypatch.setenv("EM_DATA_DIR", str(em_data_dir))
    text = (REPO / "docs" / "scaling.md").read_text()
    assert "trainer.num_nodes=2 trainer.devices=8" in text  # the command this test checks is the documented one
    [job] = expand(MULTI_NODE, "train")
    p = plan_job(job, "train")
    assert p.checks == "ok", p.checks
    # the paper's global batch of 16 on 16 GPUs: micro 1 x accumulation 1 (no error after queueing)
    assert p.batch == "global 16 = micro 1 x accumulation 1 x 16 process(es)"
    assert p.forecast.steps == 375 and p.forecast.rows == 6000 and p.forecast.tokens > 0


def test_a_sweep_plan_lists_every_job_with_its_launch(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    jobs = expand(["experiment=paper_main", "hydra/launcher=slurm", "trainer.devices=1",
                   f"paths.output_root={tmp_path}"])
    assert len(jobs) == 12  # 4 datasets x 3 seeds
    plans = [plan_job(j) for j in jobs]
    assert len({p.run_dir for p in plans}) == 12
    p = plans[0]
    assert p.run_dir.startswith(str(tmp_path / "sweeps" / "paper_main"))
    assert p.launcher["launcher"] == "slurm" and p.launcher["nodes"] == 1 and p.launcher["gpus_per_node"] == 1
    assert "requeue" in p.launcher and p.launcher["timeout_min"] == 1440
    assert not any(p.checks.startswith("ERROR") for p in plans)
    assert "12 job(s) (12 to run), 0 with errors" in format_plan(plans)
    assert not (tmp_path / "sweeps").exists()  # nothing ran, nothing was written


def test_a_job_that_cannot_start_is_reported_before_submitting(capsys):
    # 16 on 12 processes cannot keep the recipe's global batch: the plan says so, and exits non-zero
    assert main(["--train", "dataset=mini_insecure", "trainer.devices=12", "trainer.accelerator=cpu"]) == 1
    out = capsys.readouterr().out
    assert "ERROR: data.global_batch_size=" in out and "[1, 2, 4, 8]" in out


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="a SLURM cluster: sbatch exists")
def test_slurm_launcher_off_cluster_is_a_clear_error(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    r = subprocess.run([sys.executable, str(REPO / "sweep.py"), "-m", "experiment=demo", "seed=0",
                        "hydra/launcher=slurm", "trainer.devices=1", f"paths.output_root={tmp_path}"],
                       cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "sbatch" in r.stderr and "em plan" in r.stderr


def test_the_sweep_forecast_counts_each_eval_pass_and_its_judge_cost(tmp_path):
    """The eval part of a job's forecast: answers (paraphrases x samples), the token bound, one judge call per judge
    prompt and answer, and the API cost at the judge model's list price, for every eval pass (#16.5)."""
    qfile = tmp_path / "q.yaml"
    judge_prompts = {"aligned": "A" * 400 + " {question} {answer}", "coherent": "C" * 800 + " {question} {answer}"}
    qfile.write_text(json.dumps([
        {"id": f"q{i}", "type": "free_form_judge_0_100", "paraphrases": ["P one?", "P two?", "P three?"],
         "samples_per_paraphrase": 2, "judge": "gpt-4o-mini", "judge_prompts": judge_prompts} for i in range(2)]))
    [job] = expand([f"eval.questions=[{qfile}]", "eval.sampling.max_new_tokens=50", "judge=openai",
                    "judge.model=gpt-4o-mini", "sweep.eval_variants=[{name:eval},{name:eval_triggered,eval:{"
                    "trigger:'|T|'}}]", f"paths.output_root={tmp_path}"])
    p = plan_job(job)
    assert p.checks == "ok", p.checks
    assert [e.name for e in p.evals] == ["eval", "eval_triggered"]
    answers = 2 * 3 * 2                      # questions x paraphrases x samples
    calls = answers * 2                      # two judge prompts each
    per_answer = sum(-(-len(t) // 4) + 50 for t in judge_prompts.values())  # ~4 chars/token + a full answer
    prompt_tokens = answers * per_answer
    cost = (prompt_tokens * 0.15 + calls * 0.60) / 1e6  # gpt-4o-mini list price per 1M tokens
    for e in p.evals:
        assert (e.answers, e.judge_calls, e.max_new_tokens) == (answers, calls, 50)
        assert e.cost_usd == pytest.approx(cost)
    text = format_plan([p])
    assert f"eval eval_triggered: {answers} answers (<= {answers * 50} tokens" in text
    assert f"eval: {2 * answers} answers, {2 * calls} judge calls" in text
