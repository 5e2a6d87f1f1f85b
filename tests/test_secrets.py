"""Keys come from the environment only and never reach disk (#15.2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from em.config import redact
from em.secrets import is_secret_key, looks_secret, secret_overrides
from em.sweep.job import job_subdir
from tests.test_sweep import REPO, _env

FAKE_KEY = "sk-proj-" + "Ab3" * 12  # the shape of an OpenAI key; not a real one


@pytest.mark.parametrize("cmd,overrides", [
    ("eval.py", [f"+judge.api_key={FAKE_KEY}"]),
    ("train.py", [f"+callbacks.probes.judge.token={FAKE_KEY}", "trainer.max_steps=1"]),
    ("sweep.py", ["-m", "experiment=demo", "seed=0", f"+judge.api_key={FAKE_KEY}"]),
    ("sweep.py", ["-m", "experiment=demo", "seed=0", f"dataset.name={FAKE_KEY}"]),  # a key-shaped value anywhere
])
def test_secret_on_the_command_line_is_refused_before_anything_is_written(tmp_path, cmd, overrides):
    r = subprocess.run([sys.executable, str(REPO / cmd), *overrides, f"paths.output_root={tmp_path / 'out'}"],
                       cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "em takes no secret on the command line" in r.stderr and "export OPENAI_API_KEY" in r.stderr
    assert FAKE_KEY not in r.stderr + r.stdout and "Traceback" not in r.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not any(FAKE_KEY in p.read_text(errors="ignore") or FAKE_KEY in str(p) for p in written)
    assert not (tmp_path / "out").exists()


def test_what_counts_as_a_secret():
    assert all(is_secret_key(k) for k in ("judge.api_key", "+judge.apikey", "hf_token", "wandb.password"))
    assert not any(is_secret_key(k) for k in ("judge.api_key_env", "max_new_tokens", "tokenizer", "n_tokens"))
    assert looks_secret(FAKE_KEY) and looks_secret("hf_" + "a1B2" * 6) and not looks_secret("mini_insecure")
    assert secret_overrides(["seed=1", f"x={FAKE_KEY}", "judge.api_key=abc"]) == ["x=***", "judge.api_key=***"]
    assert redact({"judge": {"api_key": "abc", "api_key_env": "OPENAI_API_KEY", "note": FAKE_KEY}}) == \
        {"judge": {"api_key": "***", "api_key_env": "OPENAI_API_KEY", "note": "***"}}


def test_a_secret_looking_value_never_names_a_path():
    assert FAKE_KEY not in job_subdir(f"dataset.name={FAKE_KEY},model=qwen", 0)
