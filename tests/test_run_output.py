"""What a person sees on `python train.py`: em's own lines, one progress bar over the run's steps, the summary
(#13, #16.8, #16.9)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_train_prints_no_line_twice_and_no_third_party_noise(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EM_CACHE": os.environ["EM_CACHE"], "COLUMNS": "120"}
    r = subprocess.run([sys.executable, "train.py", "trainer.max_steps=3", f"paths.run_dir={tmp_path / 'run'}"],
                       cwd=REPO, capture_output=True, timeout=600, env=env)  # bytes: keep the bars' \r
    out = (r.stdout + r.stderr).decode()
    assert r.returncode == 0, out[-3000:]
    # progress-bar redraws are separated by \r; the lines a reader sees are the last redraw of each line
    lines = [ln.split("\r")[-1].strip() for ln in out.split("\n")]
    lines = [ln for ln in lines if ln]
    dup = {ln for ln in lines if lines.count(ln) > 1}
    assert not dup, f"printed twice: {dup}"
    third_party = [ln for ln in lines if re.search(r"\]\[(?!em\.)[\w.]+\]\[(ERROR|WARNING)\]", ln)
                   or "site-packages" in ln or "Warning:" in ln]
    assert not third_party, third_party
    assert not any(s in out for s in ("Tip:", "litlogger", "GPU available", "Could not load", "will be deleted",
                                      "Loading weights")), out[-3000:]
    # one bar over the run's optimizer steps (not an epoch's micro-batches), then the closing summary
    bars = [ln for ln in lines if ln.startswith("train:")]
    assert len(bars) == 1 and "3/3" in bars[0], bars
    assert r.stdout.decode().strip().splitlines()[-1].startswith("done: 3 steps")
    log = (tmp_path / "run" / "train.log").read_text()  # Hydra's log file of the run, in the run dir
    assert "ERROR" not in log and "probes at steps" in log
