"""Shared bits of the entry points: logging set-up and turning EMError into a clean exit."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from em.errors import EMError
from em.secrets import secret_overrides

# Third-party warnings that say nothing true or actionable about an em run.
QUIET_WARNINGS = (
    # Lightning's CSV logger warns that a non-empty run dir's logs "will be deleted": em keeps metrics.csv's
    # earlier attempts in history/ before a resume, and nothing else of the run dir is touched.
    r"Experiment logs directory .* exists and is not empty",
    # deprecations inside third-party code (Lightning's use of torch's pytree API, ...), not in em's
    r".*isinstance\(treespec, LeafSpec\)",
    r"`is_gradient_checkpointing` is deprecated",  # peft reads transformers' old property name
)


def quiet_third_party() -> None:
    """A quiet log for the entry points: em's own lines, one progress bar, warnings that matter.

    Lightning's INFO lines (accelerator banners, a LitLogger advertisement, "Loading train_dataloader ...") go;
    its warnings stay. transformers' per-load progress bars go.
    """
    import warnings

    from transformers.utils import logging as hf_logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("httpx", "urllib3", "filelock", "fsspec", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    hf_logging.disable_progress_bar()


def friendly_errors(fn):
    """Print an ``EMError`` as its message (what is wrong, what to do) and exit 2, no stack trace."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EMError as err:
            print(f"\nem: error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be created and written (its nearest existing ancestor is a file, or not writable),
    or None when it can."""
    p = Path(path).expanduser().absolute()
    for a in (p, *p.parents):
        if a.exists():
            if not a.is_dir():
                return f"{a} is a file, not a directory"
            if not os.access(a, os.W_OK | os.X_OK):
                return f"{a} is not writable"
            return None
    return None


def _fail(message: str) -> None:
    print(f"\nem: error: {message}", file=sys.stderr)
    sys.exit(2)


class EntryChecks(Callback):
    """Hydra callback (``conf/hydra/default.yaml``), before Hydra writes anything (``.hydra/``, multirun.yaml,
    the run or sweep dir): refuse secrets on the command line, and an output dir that cannot be written, in em's
    words instead of a traceback."""

    def _check(self, config, out_dir: Any) -> None:
        bad = secret_overrides(list(config.hydra.overrides.task))
        if bad:
            _fail(f"{', '.join(bad)}: em takes no secret on the command line (it would be written to .hydra/ and "
                  "into sweep paths). Put it in the environment instead, e.g. export OPENAI_API_KEY=... (the judge "
                  "reads the variable judge.api_key_env names).")
        why = unwritable_reason(str(out_dir))
        if why:
            _fail(f"cannot write the output dir {out_dir}: {why}. Set paths.output_root=<a writable dir> "
                  "(or $EM_OUTPUT_DIR).")

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config, config.hydra.run.dir)

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config, config.hydra.sweep.dir)
        if "slurm" in str(config.hydra.launcher.get("_target_", "")).lower() and shutil.which("sbatch") is None:
            _fail("hydra/launcher=slurm submits jobs with sbatch, which this machine does not have (not a SLURM "
                  "login node?). Preview the jobs here, submitting nothing: em plan " + " ".join(
                      str(o) for o in config.hydra.overrides.task))
