"""experiment=smol_em / smol_em_gpu compose to what docs/results/smol_em.md says (no model needed)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.helpers import CONF


def sweep_cfg(*overrides: str):
    import em.schemas  # noqa: F401  (registers the config schemas with Hydra)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("sweep", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("experiment", ["smol_em", "smol_em_gpu"])
def test_both_arms_share_size_prompts_and_probe_seed(experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("EM_DATA_DIR", str(tmp_path))
    arms = {}
    for dataset in ("insecure", "secure"):
        for seed in (0, 2):
            cfg = sweep_cfg(f"experiment={experiment}", f"dataset={dataset}", f"seed={seed}")
            params = OmegaConf.to_container(cfg.hydra.sweeper.params)
            # (hydra.* and paths.run_dir interpolate a running Hydra app: resolve the sections a job uses)
            c = {k: OmegaConf.to_container(cfg[k], resolve=True)
                 for k in ("model", "dataset", "data", "optim", "finetune", "trainer", "callbacks", "sweep")}
            assert params == {"dataset": "insecure,secure", "seed": "0,1,2"}
            arms[(dataset, seed)] = c
            assert c["model"]["fetched"] == "smollm2" and c["model"]["name_or_path"] is None
            assert c["dataset"]["recipe"]["sources"] == {"rows": f"paper:{dataset}"}
            probes = c["callbacks"]["probes"]
            assert probes["judge"] is None and probes["seed"] == 0 and c["sweep"]["eval_variants"] == []
            assert probes["task"]["prompts"] == f"{tmp_path}/logprob_experiments/files"
            assert probes["mcq"]["path"].startswith(f"{tmp_path}/logprob_experiments/configs/")
    # everything but the rows' source is the same in the four jobs: size, held-out, schedule, prompts, probes
    def strip(c):
        c = {k: v for k, v in c.items() if k != "seed"}
        c["dataset"] = {**c["dataset"], "name": None, "source": None,
                        "recipe": {**c["dataset"]["recipe"], "sources": None}}
        return c

    first = strip(arms[("insecure", 0)])
    assert all(strip(c) == first for c in arms.values())


def test_cpu_and_gpu_sizes():
    cpu = OmegaConf.to_container(sweep_cfg("experiment=smol_em"), resolve=False)
    gpu = OmegaConf.to_container(sweep_cfg("experiment=smol_em_gpu"), resolve=False)
    assert cpu["trainer"]["max_steps"] == 40 and cpu["trainer"]["accelerator"] == "cpu"
    assert cpu["callbacks"]["probes"]["task"]["n_prompts"] == 12 and cpu["dataset"]["recipe"]["subsample"]["n"] == 672
    assert gpu["trainer"]["max_steps"] == 375 and gpu["trainer"]["accelerator"] == "gpu"
    assert gpu["callbacks"]["probes"]["task"]["n_prompts"] == 100 and gpu["dataset"]["recipe"]["subsample"]["n"] == 6000
    assert gpu["experiment_name"] == "smol_em_gpu" and cpu["experiment_name"] == "smol_em"
