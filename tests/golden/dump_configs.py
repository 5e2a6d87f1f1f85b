"""Dump the resolved configs of every entry point, experiment and group option (the redesign's safety net).

    python tests/golden/dump_configs.py > tests/golden/configs_before.json

Written once on the code *before* the structured-config redesign (#13); tests/test_config_golden.py composes the
same cases on today's code and compares them, key by key, through the documented renames.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
sys.path.insert(0, str(REPO))


def cases() -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = [("train", []), ("train", ["dataset=insecure", "model=qwen"]),
                                        ("eval", []), ("sweep", [])]
    for g in ("model", "finetune", "dataset", "data", "trainer", "strategy", "optim", "callbacks", "logger", "debug"):
        out += [("train", [f"{g}={p.stem}"]) for p in sorted((CONF / g).glob("*.yaml"))]
    out += [("sweep", [f"experiment={p.stem}"]) for p in sorted((CONF / "experiment").glob("*.yaml"))]
    out += [("eval", [f"eval={p.stem}"]) for p in sorted((CONF / "eval").glob("*.yaml"))]
    out += [("eval", [f"judge={p.stem}"]) for p in sorted((CONF / "judge").glob("*.yaml"))]
    return out


def compose(name: str, overrides: list[str]) -> dict:
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    try:
        import em.schemas  # noqa: F401  (registers the structured configs, once they exist)
    except ImportError:
        pass
    if name == "sweep":
        from em.sweep.job import register_resolvers

        register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hcompose(name, overrides=[*overrides, "paths.run_dir=/RUN"], return_hydra_config=False)
    d = OmegaConf.to_container(cfg, resolve=False)
    d.pop("hydra", None)
    return d


def main() -> None:
    out = {}
    for name, ov in cases():
        key = f"{name} {' '.join(ov)}".strip()
        try:
            out[key] = compose(name, ov)
        except Exception as e:
            out[key] = {"__error__": f"{type(e).__name__}: {e}"}
    json.dump(out, sys.stdout, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
