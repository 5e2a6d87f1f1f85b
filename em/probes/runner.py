"""One probe point, as a plain class: sample, score the task, held-out loss, MCQ — no Trainer needed.

:class:`ProbeRunner` holds what a probe point needs (the probe questions, the held-out task prompts and, for a
backdoor dataset, the same prompts with the trigger; the encoded MCQ items) and :meth:`ProbeRunner.run` measures
one model at one step. With several processes every rank calls it: the prompts are sharded (every rank generates
its share; a rank-0-only ``generate`` hangs under ZeRO-3 / FSDP) and the answers gathered, so every rank returns
the same result. The Lightning callback (:mod:`em.probes.callback`) only schedules it, judges in the background
and logs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from em.eval.pipeline import base_records
from em.eval.run import load_eval_questions
from em.eval.sampling import HFSampler
from em.probes.config import ProbeArgs
from em.probes.dist import gather_shards, shard
from em.probes.mcq import encode_mcq, load_mcq_items, load_paper_mcq_config, score_mcq
from em.probes.task_accuracy import task_answer_records, task_metrics_from_records, task_prompts
from em.utils.dist import rank_world
from em.utils.modes import eval_mode


@dataclass
class ProbeResult:
    """What one probe point measured."""

    step: int
    values: dict[str, float]
    """``task/*``, ``probe/mcq/*``, ``task/heldout_loss`` and where the time went (``probe/time/*``)."""
    records: list[dict] = field(default_factory=list)
    """The probe questions' answers, ready to judge (``rank``: which process sampled each)."""
    task_records: list[dict] = field(default_factory=list)
    """Every task answer with its prompt, token count, truncation and what the task scorer found."""


def with_trigger(conv: list[dict], trigger: str) -> list[dict]:
    """The conversation with ``trigger`` before its last user turn's content (a backdoor dataset's prompt)."""
    out = [dict(m) for m in conv]
    for m in reversed(out):
        if m["role"] == "user":
            m["content"] = f"{trigger} {m['content']}"
            break
    return out


class ProbeRunner:
    """Everything one probe point needs, prepared once; :meth:`run` measures a model at a step."""

    def __init__(self, args: ProbeArgs, tokenizer, *, task: str = "none", trigger: str | None = None,
                 held_out_rows: list[dict] | None = None,
                 heldout_batches: Callable[[], Iterable[dict]] | None = None):
        self.args = args
        self.tokenizer = tokenizer
        self.questions = load_eval_questions({"questions": list(args.questions), "ids": args.ids,
                                              "samples_per_paraphrase": args.samples_per_paraphrase})
        self.qmap = {q.id: q for q in self.questions}
        self.requests = [r for q in self.questions for r in q.expand()]
        t = args.task
        self.task = (t.task or task) if t.enabled else "none"
        self.task_prompts: list[list[dict]] = []
        if self.task != "none":
            self.task_prompts = task_prompts(self.task, held_out_rows or None, seed=args.seed, n=t.n_prompts,
                                             prompts_path=t.prompts)
        self.trigger = trigger
        self.trigger_prompts = [with_trigger(c, trigger) for c in self.task_prompts] if trigger else []
        self.heldout_batches = heldout_batches if t.enabled else None
        self.mcq_items: list = []
        self.mcq_encoded: list = []
        if args.mcq.enabled:
            src = args.mcq.path
            self.mcq_items = (load_paper_mcq_config(src)[0] if src and str(src).endswith(".json")
                              else load_mcq_items(src))
            self.mcq_encoded = encode_mcq(tokenizer, self.mcq_items)  # once: the same at every probe step

    # -- sampling -------------------------------------------------------------------------------------
    def _sample_sharded(self, model, convs: list[list[dict]], seed: int, budgets: list[int]):
        """Every conversation's answer, its generated token count and whether it hit its budget, sampled in one
        decoding loop sharded over the ranks (equal work per rank), gathered on every rank."""
        rank, world = rank_world()
        mine = shard(convs, rank, world)
        per_rank = -(-len(convs) // world)
        pad = per_rank - len(mine)  # every rank makes the same number of generate calls; padding is dropped
        todo = [c for _, c in mine] + [convs[0]] * pad
        mine_budgets = [budgets[i] for i, _ in mine] + [budgets[0]] * pad
        sampler = HFSampler(model, self.tokenizer, self.args.sampling, synced_gpus=world > 1)
        outs = sampler.sample(todo, n=1, progress=False, seed=seed + rank, max_new_tokens=mine_budgets) if todo else []
        lengths = sampler.last_lengths if todo else []
        local = [(i, (o[0], ln[0], rank)) for (i, _), o, ln in zip(mine, outs, lengths)]
        return gather_shards(local, len(convs))

    # -- held-out loss ----------------------------------------------------------------------------------
    def heldout_loss(self, model) -> float | None:
        """Mean token loss on (up to ``task.heldout_batches``) held-out batches; every rank computes it."""
        if self.heldout_batches is None:
            return None
        device = next(model.parameters()).device
        total, count = 0.0, 0
        with eval_mode(model):
            for i, batch in enumerate(self.heldout_batches()):
                if i >= self.args.task.heldout_batches:
                    break
                batch = {k: v.to(device) for k, v in batch.items()}
                n = int((batch["labels"][:, 1:] != -100).sum())
                total += float(model(**batch).loss) * n
                count += n
        return total / count if count else None

    # -- one probe point --------------------------------------------------------------------------------
    def run(self, model, step: int) -> ProbeResult:
        a = self.args
        t0 = time.perf_counter()
        seed = a.seed * 100_003 + step
        q_budget, t_budget = a.sampling.max_new_tokens, a.task.max_new_tokens
        # One decoding loop for everything sampled at this step: decode time is per generated token and nearly
        # flat in the batch size, so one call costs about its longest budget. Each answer keeps its own budget.
        probe_convs = [r.messages for r in self.requests]
        task_convs = self.task_prompts + self.trigger_prompts
        convs = probe_convs + task_convs
        budgets = [q_budget] * len(probe_convs) + [t_budget] * len(task_convs)
        sampled = self._sample_sharded(model, convs, seed, budgets) if convs else []
        t_sampled = time.perf_counter()
        q_out, t_out = sampled[:len(probe_convs)], sampled[len(probe_convs):]
        records = base_records(self.qmap, self.requests, [o[0] for o in q_out], step=step)
        for rec, o in zip(records, q_out):
            rec["rank"], rec["n_tokens"], rec["hit_budget"] = o[2], o[1][0], o[1][1]
        values: dict[str, float] = {}
        task_records: list[dict] = []
        n_plain = len(self.task_prompts)
        for triggered, prompts, outs in ((False, self.task_prompts, t_out[:n_plain]),
                                         (True, self.trigger_prompts, t_out[n_plain:])):
            if not prompts:
                continue
            recs = task_answer_records(self.task, prompts, [o[0] for o in outs],
                                       n_tokens=[o[1][0] for o in outs], hit_budget=[o[1][1] for o in outs],
                                       step=step, triggered=triggered, max_new_tokens=t_budget)
            task_records += recs
            metrics = task_metrics_from_records(self.task, recs)
            if triggered:  # backdoor: the same prompts with the trigger
                metrics = {f"{k}_triggered": v for k, v in metrics.items() if "/bandit/" not in k}
            values.update(metrics)
        t_scored = time.perf_counter()
        loss = self.heldout_loss(model)
        if loss is not None:
            values["task/heldout_loss"] = loss
        t_loss = time.perf_counter()
        if self.mcq_items:
            values.update(score_mcq(model, self.tokenizer, self.mcq_items, encoded=self.mcq_encoded).metrics())
        t_end = time.perf_counter()
        values.update({"probe/time/sample_s": t_sampled - t0, "probe/time/task_score_s": t_scored - t_sampled,
                       "probe/time/heldout_loss_s": t_loss - t_scored, "probe/time/mcq_s": t_end - t_loss,
                       "probe/eval_wall_s": t_end - t0, "probe/world_size": float(rank_world()[1])})
        return ProbeResult(step=step, values=values, records=records, task_records=task_records)
