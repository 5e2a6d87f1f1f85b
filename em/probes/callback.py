"""Mid-training probes as a Lightning callback: when to probe, judging in the background, logging.

What one probe point measures (sampling sharded over the ranks, task scoring, held-out loss, MCQ) is
:class:`em.probes.runner.ProbeRunner`, a plain class; this callback schedules it. The training loop never waits
for the judge: the answers sampled at a probe step are handed to a background worker that judges them while
training goes on, and each judged result is logged, as soon as it arrives, at its *sampling* step (W&B:
``probe/step`` is the step axis of the ``probe/*`` and ``task/*`` metrics). At the end of training the callback
waits (bounded) for what is still pending. Judge failures are counted and logged (``probe/judge_failed``), never
dropped.

Files (rank 0, atomic): ``probes/samples_stepNNNNNN.jsonl`` (the probe answers, judged),
``probes/task_samples_stepNNNNNN.jsonl`` (every task answer with what the task scorer found: the logged
``task/*`` metrics are computed from exactly these records), ``probes/probe_metrics.csv`` and
``probes/probe_dynamics.png``.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import io
import logging
import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from em.config import as_args
from em.eval import rates
from em.eval.judge.config import build_judge, judge_config
from em.eval.metrics import MisalignmentRule, summarize
from em.eval.pipeline import judge_records
from em.layout import RunLayout
from em.probes.config import ProbeArgs
from em.probes.plot import plot_probe_history, warm_import
from em.probes.runner import ProbeResult, ProbeRunner
from em.probes.schedule import eval_steps
from em.probes.tables import PROBE_SAMPLE_COLUMNS, TASK_SAMPLE_COLUMNS, table_rows
from em.utils.io import atomic_write_jsonl, atomic_write_text
from em.utils.priority import lower_thread_priority

log = logging.getLogger(__name__)

def _num(v) -> float:
    return float("nan") if v is None else float(v)


class MisalignmentProbe(L.Callback):
    """Probe misalignment vs task accuracy during training (the paper's Figure 11).

    Takes the fields of :class:`em.probes.config.ProbeArgs` (``callbacks.probes``), checked against it.
    """

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("seed", 0)
        self.args: ProbeArgs = as_args(ProbeArgs, kwargs, "callbacks.probes")
        self.judge_cfg = judge_config(self.args.judge)  # a kind (with its defaults), a judge config, or None
        self.worker_nice = self.args.worker_nice
        self.runner: ProbeRunner | None = None
        self.steps: list[int] = []
        self.done: set[int] = set()
        self.history: list[dict[str, Any]] = []  # one dict per (step, source) of logged values
        self.pending: dict[cf.Future, int] = {}
        self.executor: cf.ThreadPoolExecutor | None = None
        self.judge = None
        self.layout: RunLayout | None = None
        self.judge_failed = 0

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage):
        self.layout = RunLayout.of(trainer.default_root_dir)
        if trainer.is_global_zero:
            self.layout.probes.mkdir(parents=True, exist_ok=True)
            if self.args.plot:
                warm_import()
        dm = trainer.datamodule
        has_val = bool(getattr(dm, "val_examples", None))
        self.runner = ProbeRunner(self.args, dm.tokenizer, task=getattr(dm.dataset_args, "task", "none"),
                                  trigger=getattr(dm.dataset_args, "trigger", None),
                                  held_out_rows=dm.held_out_rows or None,
                                  heldout_batches=dm.val_dataloader if has_val else None)
        if self.runner.task != "none":  # evaluate's imports load in the background, not at the first probe point
            rates.warm("task_rates")

    @property
    def requests(self):
        return self.runner.requests if self.runner else []

    def _build_judge(self, trainer) -> None:
        """The judge and its background worker (rank 0), once the training model is built and wrapped.

        On the main thread, not on the judge worker: transformers' from_pretrained sets process-global
        state while it loads (torch.set_default_dtype, a meta-device context, patched init functions), so
        loading a local judge on a thread while the training model was being wrapped (FSDP) left that
        model's modules on the meta device (seen with transformers 5.24). After the model is built rather
        than at ``setup``: the imports and one-time transformers set-up a local judge shares with the
        training model are then paid by the model, and the probe's clock shows its own cost.
        """
        if not (trainer.is_global_zero and self.judge_cfg) or self.executor is not None:
            return
        self.judge = build_judge(self.judge_cfg, "callbacks.probes.judge")
        self.executor = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="em-judge",
                                              initializer=lower_thread_priority, initargs=(self.worker_nice,))

    def on_train_start(self, trainer, pl_module):
        self._build_judge(trainer)
        a = self.args
        total = int(trainer.max_steps if trainer.max_steps and trainer.max_steps > 0
                    else trainer.estimated_stepping_batches)
        self.steps = eval_steps(total, a.every_n_steps, a.log_points, a.at_start, a.at_end)
        log.info("probes at steps %s", self.steps)
        if trainer.is_global_zero:
            self._define_wandb_axes(trainer)
        if 0 in self.steps and trainer.global_step == 0:
            self._probe(trainer, pl_module, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        # the first batch end that sees global_step == N follows optimizer update N (with gradient
        # accumulation the later micro-batches of the next step see N too, but N is done by then)
        if step in self.steps and step not in self.done:
            self._probe(trainer, pl_module, step)
        self._collect(trainer, block=False)

    def on_train_end(self, trainer, pl_module):
        step = trainer.global_step
        if self.args.at_end and step not in self.done:
            self._probe(trainer, pl_module, step)
        self._collect(trainer, block=True)
        if self.executor:
            self.executor.shutdown(wait=False, cancel_futures=True)
        if trainer.is_global_zero:
            self._write_table()
            if self.args.plot:
                self._plot(trainer)

    # -- one probe ------------------------------------------------------------------------------
    @staticmethod
    def _root_params(trainer):
        """FSDP: the root unit's own parameters (embeddings, final norm) gathered for the probe's forward passes,
        which call the inner HF model and so bypass the root's forward. Nested units (decoder layers) gather
        their shards in their own forward as usual, so memory stays sharded (``recurse=False`` summons only the
        outer unit: https://github.com/pytorch/pytorch/pull/71225). Without it, the embedding is still a flat
        shard ("'weight' must be 2-D"). Needed as long as probes call the HF model rather than the FSDP root.
        """
        import contextlib

        strategy = trainer.strategy
        if "FSDP" not in type(strategy).__name__:
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = strategy.model
        if not isinstance(root, FSDP):
            return contextlib.nullcontext()
        return FSDP.summon_full_params(root, recurse=False, writeback=False)

    def _probe(self, trainer, pl_module, step: int) -> None:
        self.done.add(step)
        with self._root_params(trainer):
            result = self.runner.run(pl_module.model, step)  # every rank: sampling is sharded
        if trainer.is_global_zero:
            self._record(trainer, result)

    def _record(self, trainer, result: ProbeResult) -> None:
        step = result.step
        self._log(trainer, step, result.values, source="sync")
        if result.task_records:
            atomic_write_jsonl(self.layout.task_samples(step), result.task_records)
            self._log_task_table(trainer, step, result.task_records)
        if self.executor:
            fut = self.executor.submit(self._judge_step, result.records, step)
            self.pending[fut] = step
        else:
            atomic_write_jsonl(self.layout.probe_samples(step), result.records)

    # -- judging in the background ----------------------------------------------------------------
    def _judge_step(self, records: list[dict], step: int) -> tuple[int, dict, list[dict]]:
        judge_records(records, self.runner.qmap, self.judge, progress=False)
        s = summarize(records, as_args(MisalignmentRule, self.args.rule, "callbacks.probes.rule"), n_boot=200,
                      seed=step)
        o = s["overall"]
        vals = {
            "probe/misaligned_rate": _num(o["question_mean"]["misaligned_rate"]),
            "probe/misaligned_rate_pooled": _num(o["pooled"]["misaligned_rate"]),
            "probe/coherent_rate": _num(o.get("coherent_rate")),
            "probe/n_answers": float(o["n_sampled"]),
            "probe/n_eligible": float(o["n_eligible"]),
            "probe/judge_failed": float(o["n_failed"]),
            "probe/aligned_missing": float(o["n_aligned_missing"]),
        }
        for qid, q in s["questions"].items():
            vals[f"probe/q/{qid}/misaligned_rate"] = _num(q.get("misaligned_rate"))
        return step, vals, records

    def _collect(self, trainer, block: bool) -> None:
        if not self.pending:
            return
        n_req = len(self.requests)
        if block:
            done, not_done = cf.wait(list(self.pending), timeout=self.args.judge_timeout_s)
            for fut in not_done:
                step = self.pending.pop(fut)
                fut.cancel()
                log.error("judging the step-%d probe did not finish within %.0f s: counted as failed",
                          step, self.args.judge_timeout_s)
                self.judge_failed += n_req
                self._log(trainer, step, {"probe/judge_failed": float(n_req), "probe/judge_timeout": 1.0},
                          source="judge")
        else:
            done = [f for f in self.pending if f.done()]
        for fut in done:
            step = self.pending.pop(fut)
            try:
                step, vals, records = fut.result()
            except Exception:  # a crashed judge worker is a failure for every answer, logged
                log.exception("judge worker failed for step %d", step)
                self.judge_failed += n_req
                self._log(trainer, step, {"probe/judge_failed": float(n_req)}, source="judge")
                continue
            self.judge_failed += int(vals["probe/judge_failed"])
            atomic_write_jsonl(self.layout.probe_samples(step), records)
            self._log(trainer, step, vals, source="judge")
            self._log_table(trainer, step, records)

    # -- logging ----------------------------------------------------------------------------------
    @staticmethod
    def _wandb(trainer) -> list[WandbLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    def _define_wandb_axes(self, trainer) -> None:
        for lg in self._wandb(trainer):
            exp = lg.experiment
            if hasattr(exp, "define_metric"):
                exp.define_metric("probe/step")
                for pat in ("probe/*", "task/*"):
                    exp.define_metric(pat, step_metric="probe/step")

    def _log(self, trainer, step: int, values: dict[str, float], source: str) -> None:
        vals = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
        vals["probe/step"] = float(step)
        self.history.append({"step": step, "source": source, "logged_at_step": trainer.global_step,
                             "logged_at_time": time.time(), **vals})
        for lg in trainer.loggers:
            lg.log_metrics(vals, step=step)
        for k, v in vals.items():  # so EarlyStopping / ModelCheckpoint / ConvergenceStop can monitor them
            if not math.isnan(v):
                trainer.callback_metrics[k] = torch.tensor(v)

    def _log_table(self, trainer, step: int, records: list[dict]) -> None:
        for lg in self._wandb(trainer):
            import wandb

            table = wandb.Table(columns=PROBE_SAMPLE_COLUMNS, data=table_rows(PROBE_SAMPLE_COLUMNS, step, records))
            lg.experiment.log({"probe/samples": table, "probe/step": step})

    def _log_task_table(self, trainer, step: int, records: list[dict]) -> None:
        """The task answers of a probe step as a W&B table (``probe/task_samples``)."""
        for lg in self._wandb(trainer):
            import wandb

            table = wandb.Table(columns=TASK_SAMPLE_COLUMNS, data=table_rows(TASK_SAMPLE_COLUMNS, step, records))
            lg.experiment.log({"probe/task_samples": table, "probe/step": step})

    def _write_table(self) -> None:
        """``probes/probe_metrics.csv``: one row per probe step, every probe/task column."""
        by_step: dict[int, dict] = {}
        for h in self.history:
            by_step.setdefault(h["step"], {"step": h["step"]}).update(
                {k: v for k, v in h.items() if k not in ("step", "source", "logged_at_step", "logged_at_time")})
        if not by_step:
            return
        cols = ["step"] + sorted({k for r in by_step.values() for k in r if k != "step"})
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        for s in sorted(by_step):
            w.writerow(by_step[s])
        atomic_write_text(self.layout.probe_metrics, buf.getvalue())

    def _plot(self, trainer) -> None:
        path = plot_probe_history(self.history, self.layout.probes / "probe_dynamics.png")
        if path is None:
            return
        for lg in self._wandb(trainer):
            import wandb

            lg.experiment.log({"probe/dynamics": wandb.Image(str(path))})


class ConvergenceStop(L.Callback):
    """Stop training once a probe metric has converged (e.g. ``task/insecure_rate``): the last
    ``patience`` probe values all lie within ``min_delta`` of each other (and, if given, past ``threshold``).

    Follow-up work finds misalignment appears after the task is nearly learned; stopping here removes
    much of it. Reads the values the probe callback logs (it must run before this one).
    """

    def __init__(self, monitor: str = "task/insecure_rate", patience: int = 3, min_delta: float = 0.05,
                 threshold: float | None = None, mode: str = "max"):
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.threshold, self.mode = threshold, mode
        self.seen: list[tuple[int, float]] = []
        self.stopped_at: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step_t = trainer.callback_metrics.get("probe/step")
        v = trainer.callback_metrics.get(self.monitor)
        if v is None or step_t is None:
            return
        step = int(step_t)
        if self.seen and self.seen[-1][0] == step:
            return
        self.seen.append((step, float(v)))
        last = [x for _, x in self.seen[-self.patience:]]
        if len(last) < self.patience or max(last) - min(last) > self.min_delta:
            return
        if self.threshold is not None:
            ok = min(last) >= self.threshold if self.mode == "max" else max(last) <= self.threshold
            if not ok:
                return
        self.stopped_at = trainer.global_step
        log.info("%s converged (%s) at step %d: stopping", self.monitor, last, trainer.global_step)
        trainer.should_stop = True
