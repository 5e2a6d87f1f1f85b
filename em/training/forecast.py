"""What a training run will do before it does it: optimizer steps, rows and tokens to train, and its wall time.

Wall time comes from a recorded throughput: every finished run appends its trained tokens per second (per model,
accelerator, precision and number of processes) to ``$EM_CACHE/throughput.jsonl``; a forecast uses the median of
the last few records of the same setting, and says when there is none. Forecast and actual go into the run's
train summary (and a sweep job's results.json), so forecasts can be checked.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning as L

from em.utils.fmt import duration
from em.utils.io import em_cache_dir

THROUGHPUT_FILE = "throughput.jsonl"


def setting_key(model: str, accelerator: str, precision: str, world: int) -> str:
    return f"{model}|{accelerator}|{precision}|{world}"


def record_throughput(key: str, tokens_per_s: float, steps: int) -> None:
    """Append one run's training throughput (best effort: a full disk must not fail a finished run)."""
    try:
        p = em_cache_dir() / THROUGHPUT_FILE
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "tokens_per_s": tokens_per_s, "steps": steps, "time": time.time()}) + "\n")
    except OSError:
        pass


def recorded_throughput(key: str, last: int = 5) -> float | None:
    """Median trained tokens/s of the last ``last`` runs of this setting, or None."""
    p = em_cache_dir() / THROUGHPUT_FILE
    if not p.exists():
        return None
    vals = []
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("key") == key and r.get("tokens_per_s"):
            vals.append(float(r["tokens_per_s"]))
    return statistics.median(vals[-last:]) if vals else None


@dataclass
class TrainForecast:
    """The forecast (or, filled in after the run, the actual) of one training run."""

    steps: int | None
    """Optimizer steps."""
    global_batch: int
    micro_batch: int
    accumulation: int
    world: int
    rows: int | None
    """Training rows (after the held-out split)."""
    samples: int | None
    """Rows seen: steps x global batch."""
    tokens: int | None
    """Tokens through the model: samples x mean tokens per row."""
    tokens_note: str = ""
    tokens_per_s: float | None = None
    est_wall_s: float | None = None
    wall_note: str = ""
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        steps = "?" if self.steps is None else f"{self.steps:,}"
        out = [f"forecast: {steps} optimizer steps (global batch {self.global_batch} = micro {self.micro_batch} x "
               f"accumulation {self.accumulation} x {self.world} process(es))"
               + (f" over {self.rows:,} training rows" if self.rows is not None else "")]
        if self.tokens is not None:
            out.append(f"  tokens to train: ~{self.tokens:,} ({self.tokens_note})")
        out.append(f"  estimated wall time: {'~' + duration(self.est_wall_s) if self.est_wall_s else 'unknown'}"
                   f" ({self.wall_note})")
        out += [f"  note: {n}" for n in self.notes]
        return out


def optimizer_steps(rows: int | None, global_batch: int, max_steps: int, max_epochs: int | None) -> int | None:
    """Steps a run takes: ``max_steps`` when set, else the epochs' steps (the last partial batch counts)."""
    epoch_steps = math.ceil(rows / global_batch) if rows else None
    by_epochs = epoch_steps * max_epochs if epoch_steps is not None and max_epochs else None
    if max_steps and max_steps > 0:
        return max_steps if by_epochs is None else min(max_steps, by_epochs)
    return by_epochs


def forecast_training(*, rows: int | None, mean_tokens: float | None, tokens_note: str, global_batch: int,
                      micro_batch: int, accumulation: int, world: int, max_steps: int, max_epochs: int | None,
                      throughput_key: str) -> TrainForecast:
    steps = optimizer_steps(rows, global_batch, max_steps, max_epochs)
    samples = steps * global_batch if steps is not None else None
    tokens = int(round(samples * mean_tokens)) if samples is not None and mean_tokens else None
    tps = recorded_throughput(throughput_key)
    if tps and tokens:
        wall, note = tokens / tps, f"at {tps:,.0f} tokens/s recorded for this setting"
    else:
        wall, note = None, "no throughput recorded yet for this model / accelerator / precision / processes"
    return TrainForecast(steps=steps, global_batch=global_batch, micro_batch=micro_batch, accumulation=accumulation,
                         world=world, rows=rows, samples=samples, tokens=tokens, tokens_note=tokens_note,
                         tokens_per_s=tps, est_wall_s=wall, wall_note=note)


class FitClock(L.Callback):
    """The step a fit starts from (after a resume) and the fit loop's own duration: the run's *actual*."""

    def __init__(self) -> None:
        self.start_step = 0
        self.t0: float | None = None
        self.seconds = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step, self.t0 = trainer.global_step, time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.t0 is not None:
            self.seconds = time.perf_counter() - self.t0
