"""Evaluate a model (+ adapter) on the paper's questions with an LLM judge.

    python eval.py                                          # tiny model, offline probe set, tiny judge
    python eval.py model=qwen adapter=outputs/.../adapter eval=first_plot judge=openai

Thin wrapper: compose the config, call `em.eval.run.evaluate(cfg)`.
"""

import hydra
from omegaconf import DictConfig

import em.schemas  # noqa: F401  (the config schemas, registered with Hydra)
from em.cli_common import friendly_errors, quiet_third_party


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@friendly_errors
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    from em.eval.run import evaluate

    s = evaluate(cfg)
    o = s.get("overall", {})
    print(f"done: {s['meta']['n_samples']} samples in {s['meta']['wall_s']} s -> {cfg.paths.run_dir}")
    print(f"overall: {o}")


if __name__ == "__main__":
    main()
