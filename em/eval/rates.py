"""em's rates as Hugging Face ``evaluate`` metric modules shipped inside the em package.

``em/eval/metric_modules/<name>/<name>.py`` are ordinary ``evaluate`` modules (``misaligned_rate``: the
misaligned / coherent rates and every denominator; ``category_rate``: a categorical judge's label rates, e.g.
the lie rate; ``task_rates``: the probes' task accuracy, e.g. the insecure-code and parse rates). They load
offline from the installed package::

    evaluate.load(str(METRIC_MODULES / "misaligned_rate"), keep_in_memory=True)

and em's own summaries (:func:`em.eval.metrics.summarize`, the probes, ``em report``, ``em.judges compare``)
compute through them, so a rate has one implementation whether it is computed by em or by a user's own
``evaluate`` pipeline.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

METRIC_MODULES = Path(__file__).parent / "metric_modules"
MODULE_NAMES = ("misaligned_rate", "category_rate", "task_rates")

_lock = threading.Lock()


@functools.cache
def load_metric(name: str) -> Any:
    """One of em's metric modules, loaded offline with ``evaluate.load(<local path>)``."""
    if name not in MODULE_NAMES:
        raise ValueError(f"unknown em metric module {name!r}; known: {MODULE_NAMES}")
    # evaluate pulls in datasets/pyarrow/pandas (~5 s on a loaded CPU box): imported when a rate is first
    # computed, not by every module that imports em.eval.metrics
    import evaluate

    return evaluate.load(str(METRIC_MODULES / name), keep_in_memory=True)


def warm(*names: str) -> threading.Thread:
    """Load modules on a daemon thread (``evaluate``'s imports take seconds on a loaded CPU), so that the first
    :func:`compute` on the training path finds them loaded (or waits only for the rest of the load)."""

    def load() -> None:
        with _lock:
            for name in names:
                load_metric(name)

    t = threading.Thread(target=load, name="em-metric-import", daemon=True)
    t.start()
    return t


def compute(name: str, **kwargs: Any) -> dict[str, Any]:
    """``load_metric(name).compute(**kwargs)``; one computation at a time (a module instance has state)."""
    with _lock:
        out = load_metric(name).compute(**kwargs)
    return out if out is not None else {}
