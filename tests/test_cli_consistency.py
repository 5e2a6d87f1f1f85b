"""One name for a thing in every command (#16.13)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from em.data.sources import load_spec

REPO = Path(__file__).resolve().parents[1]


def _em(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "em", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_python_dash_m_em_is_the_em_command():
    r = _em("--help")
    assert r.returncode == 0 and "usage: em <command>" in r.stdout


def test_mini_sets_have_the_names_training_uses():
    r = _em("data", "list")
    assert r.returncode == 0, r.stderr
    for kind in ("insecure", "secure", "educational", "evil_numbers"):
        assert f"mini_{kind}" in r.stdout
    info = _em("data", "info", "mini_insecure")
    assert info.returncode == 0 and "rows:" in info.stdout, info.stderr
    # dataset=mini_insecure trains on exactly these rows
    assert load_spec("mini_insecure")[0] == load_spec("mini:insecure")[0]
