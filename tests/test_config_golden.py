"""The structured-config redesign (#13) changed how configs are written, not what they say.

``tests/golden/configs_before.json`` holds every entry point, experiment and group option composed by the code
*before* the redesign. Each case is composed again here and every value of the old config must be found at the
same key (or its documented new key) in the new one. The intended changes are listed, each with its reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.golden.dump_configs import compose

GOLDEN = json.loads((Path(__file__).parent / "golden" / "configs_before.json").read_text())

RENAMED = {  # old key -> new key
    "checkpoint.every_n_train_steps": "callbacks.checkpoint.every_n_train_steps",
    # #14.2: a question's share of the pooled rate counts only from this many eligible answers on (the authors')
    "eval.rule.min_coherent_per_question": "eval.rule.min_eligible",
}
CHANGED = {  # keys whose value changed on purpose, and why
    "eval.sampling.seed": "#14.3: null = the run's seed (0 for these configs): `seed=1` now reaches sampling",
    "eval.rule.min_coherent_per_question": "#14.2: the authors' code drops a question with < 5 eligible answers",
    "eval.rule.coherent_inclusive": "#14.2: the paper's figures use the authors' rule (coherent >= 50, pooled), "
                                    "cited in conf/eval/first_plot.yaml",
    "judge.kind": "#13/#14: judges are built from their _target_ (conf/judge/*.yaml extend the judge schemas)",
    "judge.backoff_base": "#13.5: retries and back-off are the openai SDK's own",
    "data.group_by_length": "#18: the paper's recipe trains in random order; length buckets are the CPU preset's "
                            "choice (conf/preset/cpu_tiny.yaml) and an option elsewhere",
}
DROPPED = {  # old keys with no counterpart, and why
    "strategy.name": "strategy=auto is now {} (Lightning's choice); every other strategy is a _target_",
    "optim.optimizer": "the optimizer is a _target_ class now (checked below), not a string",
    "callbacks.probes._target_": "the probes entry is typed (ProbeArgs) and switched by callbacks.probes.enabled",
    "callbacks.converge._target_": "as above (ConvergeArgs, callbacks.converge.enabled)",
    "model.tiny": "no model option sets it except model=tiny (checked in test_tiny_is_only_the_model)",
}
# model=tiny used to rewrite the budget of any dataset (#13.2); the CPU budget is now the preset of the
# tiny x mini pairs, so `model=tiny dataset=<a paper file>` trains the paper's recipe.
PAPER_FILES = ("insecure", "secure", "educational", "jailbroken", "backdoor", "evil_numbers")
BUDGET_KEYS = ("optim.lr", "optim.warmup_steps", "data.max_length", "data.global_batch_size",
               "data.micro_batch_size", "trainer.max_steps", "trainer.max_epochs", "callbacks.probes")


def leaves(d, prefix=""):
    """(dotted key, value) of every leaf; lists of dicts are walked by index (``a.0.name``)."""
    items = (d.items() if isinstance(d, dict) else
             enumerate(d) if isinstance(d, list) and d and all(isinstance(x, dict) for x in d) else None)
    if items is None or (isinstance(d, dict) and not d):
        yield prefix, d
        return
    for k, v in items:
        yield from leaves(v, f"{prefix}.{k}" if prefix else str(k))


def get(d, key):
    for part in key.split("."):
        if isinstance(d, list) and part.isdigit() and int(part) < len(d):
            d = d[int(part)]
        elif isinstance(d, dict) and part in d:
            d = d[part]
        else:
            raise KeyError(key)
    return d


def resolved(d: dict) -> dict:
    c = OmegaConf.create(d)
    OmegaConf.resolve(c)
    return OmegaConf.to_container(c)


JUDGE_KEYS = {  # what each judge kind took; the old build_judge dropped other keys merged in by model=tiny
    "openai": {"model", "base_url", "api_key_env", "top_logprobs", "max_concurrency", "timeout_s", "max_retries",
               "backoff_base", "backoff_max", "seed", "cache_namespace", "price_prompt_per_1m",
               "price_completion_per_1m", "scoring", "cache"},
    "tiny": {"tiny", "model_id", "batch_size", "top_k", "device", "dtype", "scoring", "cache"},
}
PAPER_JUDGE = {"model": "gpt-4o-2024-08-06", "base_url": "https://api.openai.com/v1", "api_key_env": "OPENAI_API_KEY",
               "max_concurrency": 16, "cache": True}


def effective_probe_judge(judge):
    """The probe judge as it was built: a kind with its keys (a bare kind = its defaults, the paper's for openai)."""
    if isinstance(judge, str):
        judge = {"kind": judge, **(PAPER_JUDGE if judge == "openai" else {})}
    if not isinstance(judge, dict):
        return judge
    kind = judge.get("kind")
    out = {k: v for k, v in judge.items() if k == "kind" or k in JUDGE_KEYS.get(kind, set(judge))}
    if out.get("tiny") == {"name": "tiny", "kind": "tiny"}:
        out.pop("tiny")  # the default tiny judge model
    if kind == "tiny":  # the probe judge is named by its kind: the tiny judge's own defaults (cached, batch 8)
        out.pop("batch_size", None)
        out.pop("cache", None)
    return out


def normalize(case: str, cfg: dict) -> dict:
    probes = cfg.get("callbacks", {}).get("probes")
    if isinstance(probes, dict) and "judge" in probes:
        probes["judge"] = effective_probe_judge(probes["judge"])
    return cfg


def expected_change(case: str, key: str) -> bool:
    name, _, overrides = case.partition(" ")
    if any(key == k or key.startswith(k + ".") for k in DROPPED) or key in CHANGED or RENAMED.get(key) in CHANGED:
        return True
    if name == "eval" and key.split(".")[0] in ("callbacks", "data", "optim", "trainer"):
        return True  # model=tiny (a global package) wrote training's budget into eval.py's config too
    if overrides == "model=hf" and key in ("model.name_or_path", "model.name"):
        return True  # '???' is now null (the name follows it): the same "set model.name_or_path" error
    if overrides.startswith("dataset=") and overrides.split("=")[1] in PAPER_FILES and name == "train":
        return any(key == k or key.startswith(k + ".") for k in BUDGET_KEYS)
    return False


CASES = sorted(GOLDEN)


REMOVED_OPTIONS = {"train optim=tiny": "the tiny model's CPU budget is conf/preset/cpu_tiny.yaml (case `train`)"}


@pytest.mark.parametrize("case", CASES)
def test_composed_config_keeps_every_value(case, monkeypatch):
    if case in REMOVED_OPTIONS:
        pytest.skip(REMOVED_OPTIONS[case])
    monkeypatch.delenv("EM_DATA_DIR", raising=False)
    name, _, rest = case.partition(" ")
    old = normalize(case, resolved(GOLDEN[case]))
    new = normalize(case, resolved(compose(name, rest.split() if rest else [])))
    diffs = []
    for key, value in leaves(old):
        try:
            nv = get(new, RENAMED.get(key, key))
        except KeyError:
            nv = "<missing>"
        if nv != value and not expected_change(case, key):
            diffs.append(f"{key}: {value!r} -> {nv!r}")
    assert not diffs, f"{case}: " + "; ".join(diffs)


def test_what_changed_on_purpose_is_what_it_says():
    new = resolved(compose("train", ["dataset=insecure"]))
    assert new["optim"]["optimizer"]["_target_"] == "torch.optim.AdamW"
    # model=tiny dataset=insecure means exactly that: the tiny model on the paper's recipe, no CPU budget
    assert new["model"]["kind"] == "tiny"
    assert (new["optim"]["lr"], new["data"]["global_batch_size"], new["trainer"]["max_steps"]) == (1e-5, 16, -1)
    assert resolved(compose("train", ["strategy=auto"]))["strategy"] == {}
