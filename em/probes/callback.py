"""Mid-training probes: misalignment (judged free-form answers + a judge-free multiple-choice probe)
and task accuracy, sampled during training and logged against the step at which they were sampled.

The training loop never waits for the judge: answers are sampled at the probe step (all ranks take
part, prompts sharded), then handed to a background worker that judges them while training goes on.
Each judged result is logged, as soon as it arrives, at its *sampling* step (W&B: ``probe/step`` is the
step axis of the ``probe/*`` metrics). At the end of training the callback waits (bounded) for what is
still pending. Judge failures are counted and logged (``probe/judge_failed``), never dropped.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import io
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from em.probes.dist import gather_shards, rank_world, shard
from em.probes.schedule import eval_steps
from em.utils.io import atomic_write_jsonl, atomic_write_text
from em.eval.judge.config import build_judge, judge_config
from em.utils.modes import eval_mode
from em.utils.priority import lower_thread_priority

log = logging.getLogger(__name__)


def _plain(x):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(x, resolve=True) if isinstance(x, (DictConfig, ListConfig)) else x


def _num(v) -> float:
    return float("nan") if v is None else float(v)


class MisalignmentProbe(L.Callback):
    """Probe misalignment vs task accuracy during training (the paper's Figure 11)."""

    def __init__(
        self,
        questions: list[str] | None = None,
        samples_per_paraphrase: int = 1,
        ids: list[str] | None = None,
        sampling: dict | None = None,
        judge: dict | None = None,
        every_n_steps: int | None = None,
        log_points: int | None = 6,
        at_start: bool = True,
        at_end: bool = True,
        mcq: dict | None = None,
        task: dict | None = None,
        judge_timeout_s: float = 600.0,
        rule: dict | None = None,
        plot: bool = True,
        seed: int = 0,
        dirname: str = "probes",
        worker_nice: int | None = 19,
    ):
        self.questions_spec = list(_plain(questions) or ["mini:probes"])
        self.samples_per_paraphrase = samples_per_paraphrase
        self.ids = _plain(ids)
        self.sampling_cfg = dict(_plain(sampling) or {})
        self.judge_cfg = judge_config(_plain(judge))  # a kind (with its defaults), a judge config, or None
        self.every_n_steps = every_n_steps
        self.log_points = log_points
        self.at_start, self.at_end = at_start, at_end
        self.mcq_cfg = dict(_plain(mcq) or {"enabled": True})
        self.task_cfg = dict(_plain(task) or {"enabled": True})
        self.judge_timeout_s = judge_timeout_s
        self.rule_cfg = dict(_plain(rule) or {})
        self.plot = plot
        self.seed = seed
        self.dirname = dirname
        # The judge worker (and its own torch threads, for a local judge) runs at this nice value: on a
        # shared CPU it then yields to the training threads. None/0: normal priority.
        if worker_nice is not None and (isinstance(worker_nice, bool) or not isinstance(worker_nice, int)
                                        or not 0 <= worker_nice <= 19):
            from em.errors import ConfigError

            raise ConfigError(f"callbacks.probes.worker_nice={worker_nice!r}: expected an integer 0..19 or null")
        self.worker_nice = worker_nice
        self.steps: list[int] = []
        self.done: set[int] = set()
        self.history: list[dict[str, Any]] = []  # one dict per (step, source) of logged values
        self.pending: dict[cf.Future, int] = {}
        self.executor: cf.ThreadPoolExecutor | None = None
        self.judge = None
        self.out_dir: Path | None = None
        self.judge_failed = 0
        self.eval_wall_s = 0.0  # time inside probe steps (sampling, task scoring, held-out loss, MCQ)
        self.time_on_path = {"setup_s": 0.0, "poll_and_log_s": 0.0, "final_judge_wait_s": 0.0,
                             "write_and_plot_s": 0.0}

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage):
        t0 = time.perf_counter()
        try:
            self._setup(trainer)
        finally:
            self.time_on_path["setup_s"] += time.perf_counter() - t0

    def _setup(self, trainer):
        from em.eval.run import load_eval_questions

        ecfg = {"questions": self.questions_spec, "ids": self.ids,
                "samples_per_paraphrase": self.samples_per_paraphrase}
        self.questions = load_eval_questions(ecfg)
        self.qmap = {q.id: q for q in self.questions}
        self.requests = [r for q in self.questions for r in q.expand()]
        self.out_dir = Path(trainer.default_root_dir) / self.dirname
        if trainer.is_global_zero:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.plot:
                from em.probes.plot import warm_import

                warm_import()
        dm = trainer.datamodule
        self.tokenizer = dm.tokenizer
        self.task_name = self.task_cfg.get("task") or getattr(dm.dataset_args, "task", "none")
        self.trigger = getattr(dm.dataset_args, "trigger", None)
        self.task_prompts: list[list[dict]] = []
        if self.task_cfg.get("enabled", True) and self.task_name != "none":
            from em.probes.task_accuracy import task_prompts

            self.task_prompts = task_prompts(self.task_name, dm.held_out_rows or None, seed=self.seed,
                                             n=self.task_cfg.get("n_prompts", 16),
                                             prompts_path=self.task_cfg.get("prompts"))
        # backdoor: the same prompts with the trigger, sampled alongside (task/*_triggered)
        self.trigger_prompts = [self._with_trigger(c) for c in self.task_prompts] if self.trigger else []
        self.mcq_items, self.mcq_encoded = [], []
        if self.mcq_cfg.get("enabled", True):
            from em.probes.mcq import encode_mcq, load_mcq_items, load_paper_mcq_config

            src = self.mcq_cfg.get("path")
            self.mcq_items = (load_paper_mcq_config(src)[0] if src and str(src).endswith(".json")
                              else load_mcq_items(src))
            self.mcq_encoded = encode_mcq(self.tokenizer, self.mcq_items)  # once: the same at every probe step

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
        t0 = time.perf_counter()
        try:
            self._build_judge(trainer)
        finally:
            self.time_on_path["setup_s"] += time.perf_counter() - t0
        total = int(trainer.max_steps if trainer.max_steps and trainer.max_steps > 0
                    else trainer.estimated_stepping_batches)
        self.steps = eval_steps(total, self.every_n_steps, self.log_points, self.at_start, self.at_end)
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
        t0 = time.perf_counter()
        self._collect(trainer, block=False)
        self.time_on_path["poll_and_log_s"] += time.perf_counter() - t0

    def on_train_end(self, trainer, pl_module):
        step = trainer.global_step
        if self.at_end and step not in self.done:
            self._probe(trainer, pl_module, step)
        t0 = time.perf_counter()
        self._collect(trainer, block=True)
        if self.executor:
            self.executor.shutdown(wait=False, cancel_futures=True)
        t1 = time.perf_counter()
        self.time_on_path["final_judge_wait_s"] += t1 - t0
        if trainer.is_global_zero:
            self._write_table()
            if self.plot:
                self._plot(trainer)
            self.time_on_path["write_and_plot_s"] += time.perf_counter() - t1
            self._write_timing()

    def _write_timing(self) -> None:
        """``probes/probe_timing.json``: the time the callback held the training loop, by phase."""
        import json

        t = {k: round(v, 4) for k, v in self.time_on_path.items()}
        t["probe_steps_s"] = round(self.eval_wall_s, 4)
        t["total_on_path_s"] = round(sum(self.time_on_path.values()) + self.eval_wall_s, 4)
        t["n_probe_steps"] = len(self.done)
        atomic_write_text(self.out_dir / "probe_timing.json", json.dumps(t, indent=2) + "\n")

    # -- one probe ------------------------------------------------------------------------------
    def _sampler(self, pl_module):
        from em.eval.sampling import HFSampler, SamplingArgs

        # token budgets are given per prompt at each call (_sample_sharded)
        args = SamplingArgs(**{**{"max_new_tokens": 48, "batch_size": 16}, **self.sampling_cfg})
        return HFSampler(pl_module.model, self.tokenizer, args, synced_gpus=rank_world()[1] > 1)

    def _sample_sharded(self, sampler, convs: list[list[dict]], seed: int, budgets: list[int]) -> list[str]:
        rank, world = rank_world()
        mine = shard(convs, rank, world)
        # equal work on every rank (same number of generate calls), padding with a repeat that is dropped
        per_rank = -(-len(convs) // world)
        pad = per_rank - len(mine)
        todo = [c for _, c in mine] + [convs[0]] * pad
        mine_budgets = [budgets[i] for i, _ in mine] + [budgets[0]] * pad
        outs = (sampler.sample(todo, n=1, progress=False, seed=seed + rank, max_new_tokens=mine_budgets)[:len(mine)]
                if todo else [])
        # every rank records which prompts it answered: sharding is visible in the samples files
        self.answered_by = gather_shards([(i, rank) for i, _ in mine], len(convs))
        return gather_shards([(i, o[0]) for (i, _), o in zip(mine, outs)], len(convs))

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
        with self._root_params(trainer):
            self._probe_inner(trainer, pl_module, step)

    def _probe_inner(self, trainer, pl_module, step: int) -> None:
        from em.eval.pipeline import base_records

        t0 = time.perf_counter()
        self.done.add(step)
        seed = self.seed * 100_003 + step
        max_new = int(self.sampling_cfg.get("max_new_tokens", 48))
        tmax = int(self.task_cfg.get("max_new_tokens", max_new))
        # One decoding loop for everything sampled at this step (probe questions, task prompts and, for a
        # backdoor, the task prompts with the trigger): decode time is per generated token, nearly flat in
        # the batch size, so one call costs about what its longest budget costs. Each answer keeps its own
        # budget (cut after the shared loop, which leaves its distribution unchanged).
        probe_convs = [r.messages for r in self.requests]
        task_convs, trig_convs = self.task_prompts, self.trigger_prompts
        convs = probe_convs + task_convs + trig_convs
        budgets = [max_new] * len(probe_convs) + [tmax] * (len(task_convs) + len(trig_convs))
        all_answers = self._sample_sharded(self._sampler(pl_module), convs, seed, budgets) if convs else []
        t_sampled = time.perf_counter()
        answered_by = list(self.answered_by)[:len(probe_convs)] if convs else []
        answers = all_answers[:len(probe_convs)]
        task_answers = all_answers[len(probe_convs):len(probe_convs) + len(task_convs)]
        trig_answers = all_answers[len(probe_convs) + len(task_convs):]
        values: dict[str, float] = {}
        if self.task_prompts:
            from em.probes.task_accuracy import task_metrics

            values.update(task_metrics(self.task_name, task_convs, task_answers))
            if self.trigger:  # backdoor: the same prompts with the trigger
                values.update({f"{k}_triggered": v for k, v in task_metrics(self.task_name, trig_convs, trig_answers).items()
                               if k.startswith("task/") and "/bandit/" not in k})
        t_scored = time.perf_counter()
        if self.task_cfg.get("enabled", True) and getattr(trainer.datamodule, "val_examples", None):
            values["task/heldout_loss"] = self._heldout_loss(trainer, pl_module)
        t_loss = time.perf_counter()
        if self.mcq_items:
            from em.probes.mcq import score_mcq

            values.update(score_mcq(pl_module.model, self.tokenizer, self.mcq_items, encoded=self.mcq_encoded).metrics())
        wall = time.perf_counter() - t0
        # where a probe step's time goes (sampling / static analysis / held-out loss / MCQ forward)
        values.update({"probe/time/sample_s": t_sampled - t0, "probe/time/task_score_s": t_scored - t_sampled,
                       "probe/time/heldout_loss_s": t_loss - t_scored, "probe/time/mcq_s": t0 + wall - t_loss})
        self.eval_wall_s += wall
        values["probe/eval_wall_s"] = wall
        if not trainer.is_global_zero:
            return
        self._log(trainer, step, values, source="sync")
        records = base_records(self.qmap, self.requests, answers, step=step)
        for rec, rank in zip(records, answered_by):
            rec["rank"] = rank
        values_world = rank_world()[1]
        self._log(trainer, step, {"probe/world_size": float(values_world)}, source="sync")
        if self.executor:
            fut = self.executor.submit(self._judge_step, records, step)
            self.pending[fut] = step
        else:
            atomic_write_jsonl(self.out_dir / f"samples_step{step:06d}.jsonl", records)

    def _heldout_loss(self, trainer, pl_module) -> float:
        """Mean token loss on (up to ``task.heldout_batches``) held-out batches; every rank computes it."""

        dm = trainer.datamodule
        n_batches = int(self.task_cfg.get("heldout_batches", 4))
        device = next(pl_module.model.parameters()).device
        total, count = 0.0, 0
        with eval_mode(pl_module.model):
            for i, batch in enumerate(dm.val_dataloader()):
                if i >= n_batches:
                    break
                batch = {k: v.to(device) for k, v in batch.items()}
                n = int((batch["labels"][:, 1:] != -100).sum())
                total += float(pl_module.model(**batch).loss) * n
                count += n
        return total / max(count, 1)

    def _with_trigger(self, conv: list[dict]) -> list[dict]:
        out = [dict(m) for m in conv]
        for m in reversed(out):
            if m["role"] == "user":
                m["content"] = f"{self.trigger} {m['content']}"
                break
        return out

    # -- judging in the background ----------------------------------------------------------------
    def _judge_step(self, records: list[dict], step: int) -> tuple[int, dict, list[dict]]:
        from em.eval.metrics import MisalignmentRule, summarize
        from em.eval.pipeline import judge_records

        judge_records(records, self.qmap, self.judge, progress=False)
        s = summarize(records, MisalignmentRule(**self.rule_cfg), n_boot=200, seed=step)
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
        if block:
            done, not_done = cf.wait(list(self.pending), timeout=self.judge_timeout_s)
            for fut in not_done:
                step = self.pending.pop(fut)
                fut.cancel()
                log.error("judging the step-%d probe did not finish within %.0f s: counted as failed",
                          step, self.judge_timeout_s)
                self.judge_failed += len(self.requests)
                self._log(trainer, step, {"probe/judge_failed": float(len(self.requests)),
                                          "probe/judge_timeout": 1.0}, source="judge")
        else:
            done = [f for f in self.pending if f.done()]
        for fut in done:
            step = self.pending.pop(fut)
            try:
                step, vals, records = fut.result()
            except Exception:  # a crashed judge worker is a failure for every answer, logged
                log.exception("judge worker failed for step %d", step)
                self.judge_failed += len(self.requests)
                self._log(trainer, step, {"probe/judge_failed": float(len(self.requests))}, source="judge")
                continue
            self.judge_failed += int(vals["probe/judge_failed"])
            atomic_write_jsonl(self.out_dir / f"samples_step{step:06d}.jsonl", records)
            self._log(trainer, step, vals, source="judge")
            self._log_table(trainer, step, records)

    # -- logging ----------------------------------------------------------------------------------
    def _define_wandb_axes(self, trainer) -> None:
        for lg in trainer.loggers:
            exp = getattr(lg, "experiment", None)
            if lg.__class__.__name__ == "WandbLogger" and hasattr(exp, "define_metric"):
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
        for lg in trainer.loggers:
            if lg.__class__.__name__ == "WandbLogger":
                import wandb

                cols = ["step", "question_id", "answer", "aligned", "coherent", "aligned_status"]
                table = wandb.Table(columns=cols, data=[[step] + [r.get(c) for c in cols[1:]] for r in records])
                lg.experiment.log({"probe/samples": table, "probe/step": step})

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
        atomic_write_text(self.out_dir / "probe_metrics.csv", buf.getvalue())

    def _plot(self, trainer) -> None:
        from em.probes.plot import plot_probe_history

        path = plot_probe_history(self.history, self.out_dir / "probe_dynamics.png")
        if path is None:
            return
        for lg in trainer.loggers:
            if lg.__class__.__name__ == "WandbLogger":
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
