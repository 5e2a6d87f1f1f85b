"""Sweep model x dataset x seed (x anything): every job trains, then evaluates, into a stable run dir.

    python sweep.py -m experiment=demo seed=0,1,2
    python sweep.py -m model=qwen,mistral dataset=insecure,secure,educational,jailbroken seed=0,1,2 \
        eval=first_plot judge=openai hydra/launcher=slurm trainer.devices=1
    python -m em.report outputs/sweeps/<experiment_name>

Re-running the same command skips jobs already done, resumes interrupted ones from their checkpoint and
retries failed ones; a job that fails is recorded in its results.json and the others go on. Thin wrapper:
compose the config (conf/sweep.yaml), call `em.sweep.job.run_job(cfg)`; the end-of-sweep summary is a
Hydra callback (em.sweep.summary.SweepSummary).
"""

import hydra
from omegaconf import DictConfig

import em.schemas  # noqa: F401  (the config schemas, registered with Hydra)
from em.cli_common import friendly_errors, quiet_third_party
from em.sweep.job import run_job  # importing it registers ${em.num_gpus:}, ${em.job_subdir:...} (resolvers)


@hydra.main(version_base="1.3", config_path="conf", config_name="sweep")
@friendly_errors
def main(cfg: DictConfig) -> dict:
    quiet_third_party()
    return run_job(cfg)


if __name__ == "__main__":
    main()
