"""Compose eval configs for tests."""

from __future__ import annotations

import em.eval.config  # noqa: F401  (registers the schemas conf/eval and conf/judge extend)
from tests.helpers import CONF


def compose_eval(overrides: list[str], run_dir: str):
    from hydra import compose, initialize_config_dir

    import em.schemas  # noqa: F401  (registers the config schemas with Hydra)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("eval", overrides=[*overrides, f"paths.run_dir={run_dir}", "progress=false"])
