"""Evaluate a model (+ adapter) on the paper's questions with an LLM judge.

    python eval.py                                          # tiny model, offline probe set, tiny judge
    python eval.py model=qwen adapter=outputs/.../adapter eval=first_plot judge=openai
    python eval.py judge=openai +judge@judges.local=hf judges.local.model_name_or_path=/path   # two judges

Thin wrapper: compose the config, call `em.eval.run.evaluate(cfg)`, print its headline.
"""

import hydra
from omegaconf import DictConfig

import em.eval.config  # registers the eval / judge schemas conf/eval and conf/judge extend
import em.schemas  # noqa: F401  (registers the training schemas: model= is shared)
from em.cli_common import friendly_errors, quiet_third_party
from em.eval.run import evaluate, headline
from em.layout import resolve_run_dir


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@friendly_errors
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    summary = evaluate(cfg)
    print(headline(summary, resolve_run_dir(cfg.paths)))


if __name__ == "__main__":
    main()
