"""Finetune a model: `python train.py [dataset=insecure] [model=qwen] [finetune=full] ...`.

Thin wrapper: compose the config (conf/train.yaml), check it (em.schemas), call `em.training.run.train(cfg)`.
"""

import hydra
from omegaconf import DictConfig

from em.cli_common import friendly_errors, quiet_third_party
from em.schemas import check_config
from em.training.run import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@friendly_errors
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    check_config(cfg, "train")
    summary = train(cfg)
    print(f"done: {summary['global_step']} steps in {summary['wall_s']} s; adapter: {summary['adapter_dir']}; "
          f"metrics: {summary['metrics_csv']}")


if __name__ == "__main__":
    main()
