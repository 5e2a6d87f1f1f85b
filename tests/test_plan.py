"""Preview a launch: every job's run dir, launch parameters, start-up checks and forecast; nothing runs (#16.4-6)."""

from __future__ import annotations

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
