"""Batching: the training order (random, or length-bucketed in shuffled order), its statistics, and the
collators (right-padding, or padding-free packing).

The order is a *plan* of optimizer steps, built per epoch from the rows' lengths, the seed and the epoch
number alone (so a resumed run rebuilds exactly the plan it was following):

* **random** (``group_by_length=false``, the paper's semantics): a random permutation cut into global batches,
  as a ``RandomSampler`` would give; the micro-batches of a step are consecutive rows of it.
* **length buckets** (``group_by_length=true``): a random permutation cut into buckets of ``bucket_batches``
  global batches; each bucket is sorted by length and cut into global batches (so a batch holds rows of
  similar length: little padding); then the *order of the batches* is shuffled, stratified by length: the
  batches are split into :data:`LENGTH_STRATA` length quantiles and every round of ``LENGTH_STRATA``
  consecutive steps takes one batch of each quantile, in random order. No position in the run sees longer or
  shorter batches than any other (no length curriculum), at any scale from ~10 steps up.

One **optimizer step** is one global batch (``global_batch_size`` rows); it is split into ``micro_batch_size``
micro-batches, contiguous in the batch (bucketed batches are sorted, so its micro-batches stay similar in
length), and rank ``r`` of ``W`` takes the ``r``-th ``W``-th of them. All micro-batches of a step therefore come
from one bucket, and the order statistics (:func:`order_stats`) are measured per optimizer step.

Only the last step of an epoch may be smaller (the rows left over); with several ranks it is topped up with
rows from the start of the epoch's permutation (as ``DistributedSampler`` does) so every rank gets the same
number of full micro-batches.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from em.data.chat import IGNORE_INDEX, Encoded, row_lengths
from em.errors import ConfigError

LENGTH_STRATA = 10
"""Length quantiles of the stratified batch shuffle: every ``LENGTH_STRATA`` consecutive steps hold one batch of
each (10 divides the 50-step windows at which em's probes look, so each window holds five of each)."""

WINDOW = 50
"""Steps per window of the order statistics (the resolution at which probes measure training dynamics)."""


# -- the plan ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OrderSpec:
    """What determines the training order (besides the rows' lengths)."""

    global_batch: int
    micro_batch: int
    world: int = 1
    group_by_length: bool = False
    bucket_batches: int = 50
    longest_first: bool = False
    seed: int = 0

    def __post_init__(self):
        for name in ("global_batch", "micro_batch", "world", "bucket_batches"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be a positive integer")
        if self.global_batch % (self.micro_batch * self.world):
            raise ConfigError(f"data.global_batch_size={self.global_batch} is not a multiple of micro_batch_size "
                              f"({self.micro_batch}) x devices x nodes ({self.world})")

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.micro_batch * self.world)

    @property
    def kind(self) -> str:
        return "length_buckets" if self.group_by_length else "random"


def _rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), stream])


def _stratified_order(means: np.ndarray, rng: np.random.Generator, strata: int = LENGTH_STRATA) -> list[int]:
    """A random order of ``len(means)`` batches in which each round of ``strata`` consecutive positions holds one
    batch of each length quantile (the last rounds may lack some quantiles when the count does not divide)."""
    if len(means) <= 1:
        return list(range(len(means)))
    by_len = np.argsort(means, kind="stable")
    groups = [list(rng.permutation(g)) for g in np.array_split(by_len, min(strata, len(means)))]
    out: list[int] = []
    while any(groups):
        rnd = [g.pop() for g in groups if g]
        out.extend(int(rnd[i]) for i in rng.permutation(len(rnd)))
    return out


def _longest_first(batches: list[np.ndarray], lens: np.ndarray, g: int, keep_sorted: bool) -> None:
    """One-off: the step holding the longest row moves first, so an out-of-memory shows at step 0. A short last
    step stays last (only the last step may be short): if it holds the longest row, that row changes places
    with the shortest row of the first step instead."""
    top = max(range(len(batches)), key=lambda i: (int(lens[batches[i]].max()), -i))
    if len(batches[top]) == g or top == 0:
        batches[0], batches[top] = batches[top], batches[0]
        return
    first, last = batches[0].copy(), batches[top].copy()
    i, j = int(np.argmin(lens[first])), int(np.argmax(lens[last]))
    first[i], last[j] = last[j], first[i]
    if keep_sorted:
        first, last = (b[np.argsort(-lens[b], kind="stable")] for b in (first, last))
    batches[0], batches[top] = first, last


def plan_epoch(lengths: Sequence[int], spec: OrderSpec, epoch: int) -> list[list[list[int]]]:
    """The optimizer steps of one epoch: ``steps[s]`` = the micro-batches (row indices) of step ``s``, all ranks,
    rank ``r`` holding the ``r``-th ``1/world`` of them (see :func:`rank_batches`). Deterministic in
    ``(lengths, spec, epoch)``."""
    lens = np.asarray(lengths, dtype=np.int64)
    n = len(lens)
    if n == 0:
        return []
    rng = _rng(spec.seed, epoch)
    perm = rng.permutation(n)
    g = spec.global_batch
    if spec.group_by_length:
        batches: list[np.ndarray] = []
        size = g * spec.bucket_batches
        for start in range(0, n, size):
            bucket = perm[start:start + size]
            bucket = bucket[np.argsort(-lens[bucket], kind="stable")]  # longest first within a bucket
            batches.extend(bucket[i:i + g] for i in range(0, len(bucket), g))
        full = [b for b in batches if len(b) == g]
        rest = [b for b in batches if len(b) < g]  # at most one: the last bucket's remainder
        order = _stratified_order(np.array([lens[b].mean() for b in full]), rng)
        batches = [full[i] for i in order] + rest
    else:
        batches = [perm[i:i + g] for i in range(0, n, g)]  # a RandomSampler's order; the remainder last
    if spec.longest_first and epoch == 0 and len(batches) > 1:
        _longest_first(batches, lens, g, spec.group_by_length)
    unit = spec.micro_batch * spec.world
    last = batches[-1]
    if spec.world > 1 and len(last) % unit:
        need = unit - len(last) % unit  # top up from the start of the permutation, as DistributedSampler does
        extra = np.resize(perm, need)
        batches[-1] = np.concatenate([last, extra])
        if spec.group_by_length:
            batches[-1] = batches[-1][np.argsort(-lens[batches[-1]], kind="stable")]
    m = spec.micro_batch
    return [[[int(i) for i in b[j:j + m]] for j in range(0, len(b), m)] for b in batches]


def rank_batches(steps: Sequence[Sequence[list[int]]], rank: int, world: int) -> list[list[int]]:
    """The micro-batches rank ``rank`` of ``world`` trains on, in order."""
    out: list[list[int]] = []
    for micro in steps:
        k = len(micro) // world if world > 1 else len(micro)
        out.extend(micro[rank * k:(rank + 1) * k] if world > 1 else micro)
    return out


# -- statistics -------------------------------------------------------------------------------------------------
def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan when either side is constant."""

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
        sums = np.zeros(len(counts))
        np.add.at(sums, inv, r)
        return (sums / counts)[inv]

    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def padding_fraction(lengths: Sequence[int], micro_batches: Sequence[Sequence[int]]) -> float:
    """Pad positions / computed positions when each micro-batch is right-padded to its longest row."""
    lens = np.asarray(lengths)
    pad = total = 0
    for mb in micro_batches:
        if len(mb):
            ls = lens[list(mb)]
            total += len(ls) * int(ls.max())
            pad += len(ls) * int(ls.max()) - int(ls.sum())
    return pad / total if total else 0.0


def order_stats(lengths: Sequence[int], steps: Sequence[Sequence[Sequence[int]]], window: int = WINDOW) -> dict:
    """Statistics of a run's order, per optimizer step (mean row length of the step's rows): the Spearman
    correlation of step index vs mean length over all ``steps``, of the position within its ``window``-step
    window (``step % window``, pooled over windows) vs mean length, the largest |correlation| inside one full
    window, and the padding fraction of the micro-batches (right-padded; 0 with packing)."""
    lens = np.asarray(lengths)
    means = np.array([lens[[i for mb in st for i in mb]].mean() for st in steps]) if len(steps) else np.array([])
    idx = np.arange(len(means))
    per_window = [spearman(np.arange(window), means[s:s + window]) for s in range(0, len(means) - window + 1, window)]
    per_window = [abs(r) for r in per_window if not math.isnan(r)]
    finite = lambda r: None if math.isnan(r) else r  # noqa: E731 - JSON has no NaN
    return {
        "steps": len(means),
        "spearman_step_vs_length": finite(spearman(idx, means)),
        f"spearman_position_in_{window}_vs_length": finite(spearman(idx % window, means)),
        f"max_abs_spearman_within_{window}": max(per_window) if per_window else None,
        "padding_fraction": padding_fraction(lengths, [mb for st in steps for mb in st]),
        "mean_length_first_steps": [round(float(x), 1) for x in means[:10]],
    }


# -- the sampler and the loader ---------------------------------------------------------------------------------
class StepSampler(DistributedSampler):
    """This rank's share of the plan of :func:`plan_epoch`: ``batches(epoch)`` are its micro-batches (row indices).

    A ``DistributedSampler`` so that Lightning does not wrap it in one of its own (it shards by itself).
    ``set_epoch`` picks the epoch; the first ``start`` micro-batches of that epoch are skipped (a resumed run).
    Iterating it yields the rows of the remaining micro-batches, in order.
    """

    def __init__(self, lengths: Sequence[int], spec: OrderSpec, rank: int = 0):
        super().__init__(range(len(lengths)), num_replicas=spec.world, rank=rank, shuffle=False, seed=spec.seed)
        self.lengths = [int(x) for x in lengths]
        self.spec = spec
        self.start = 0
        self._plans: dict[int, list[list[int]]] = {}

    def batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            self._plans = {epoch: rank_batches(plan_epoch(self.lengths, self.spec, epoch), self.rank, self.spec.world)}
        return self._plans[epoch]

    def remaining(self) -> list[list[int]]:
        return self.batches(self.epoch)[self.start:]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0  # a new epoch starts at its beginning
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches(self.epoch))

    def __iter__(self) -> Iterator[int]:
        return iter([i for b in self.remaining() for i in b])

    def fingerprint(self) -> str:
        """Identifies the order: the rows' lengths and the spec (a resume must follow the same one)."""
        h = hashlib.sha256(np.asarray(self.lengths, dtype=np.int64).tobytes())
        h.update(repr(self.spec).encode())
        return h.hexdigest()[:16]


class StepBatchSampler(BatchSampler):
    """The micro-batches of a :class:`StepSampler` (``batch_size`` = the micro-batch size, for tools that read
    it, e.g. Lightning's DeepSpeed strategy)."""

    def __init__(self, sampler: StepSampler):
        super().__init__(sampler, batch_size=sampler.spec.micro_batch, drop_last=False)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.sampler.remaining())

    def __len__(self) -> int:
        return len(self.sampler.batches(self.sampler.epoch))


_uses = itertools.count(1)


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`StepBatchSampler` that knows where it is: ``state_dict()`` holds the epoch and
    the micro-batches this rank has yielded in it; ``load_state_dict()`` makes the next iteration continue there.

    Its ``sampler`` is the :class:`StepSampler` (a ``DistributedSampler``: Lightning leaves the loader as it is and
    calls its ``set_epoch``). It satisfies Lightning's ``_Stateful`` protocol (so Lightning stores its state with
    the fit loop); em's datamodule also stores it itself, because Lightning skips restoring loader states whose
    loader was built before the checkpoint was restored (Lightning-AI/pytorch-lightning#20550, which
    ``estimated_stepping_batches`` triggers). Counts are exact: Lightning does not prefetch from a loader with
    a length.
    """

    def __init__(self, examples: Sequence[Encoded], spec: OrderSpec, collate_fn, rank: int = 0,
                 num_workers: int = 0):
        self._steps = StepSampler(row_lengths(examples), spec, rank)
        # a private generator keeps the global RNG (dropout) untouched when an iterator is created
        super().__init__(examples, batch_sampler=StepBatchSampler(self._steps), collate_fn=collate_fn,
                         num_workers=num_workers, generator=torch.Generator().manual_seed(spec.seed))
        self.yielded = 0
        self.iter_epoch: int | None = None  # the epoch of the iterator that counts ``yielded``
        self.last_use = 0  # when its last iterator started (the datamodule saves the loader in use)

    @property
    def sampler(self) -> StepSampler:
        return self._steps

    @sampler.setter
    def sampler(self, value) -> None:  # DataLoader.__init__ sets a default one; the batch sampler decides
        pass

    @property
    def step_sampler(self) -> StepSampler:
        return self._steps

    def state_dict(self) -> dict:
        s = self._steps
        done = self.yielded if self.iter_epoch == s.epoch else s.start  # its iterator may not have started yet
        return {"epoch": int(s.epoch), "micro_batches": int(done), "fingerprint": s.fingerprint(),
                "world": s.spec.world, "rank": s.rank, "order": s.spec.kind}

    def load_state_dict(self, state: dict) -> None:
        s = self._steps
        if state.get("fingerprint") != s.fingerprint():
            raise ConfigError(
                "the checkpoint's data order differs from this run's (another dataset, max_length, seed, batch "
                "sizes, number of devices or data.group_by_length / bucket_batches / longest_first): resume with "
                "the settings it was saved with, or start a new run")
        epoch, done = int(state["epoch"]), int(state["micro_batches"])
        if done >= len(s.batches(epoch)):  # saved at the end of an epoch: the next one starts afresh
            epoch, done = epoch + 1, 0
        s.epoch, s.start = epoch, done
        self.yielded, self.iter_epoch = done, None

    def __iter__(self):
        return _CountingIter(self)


class _CountingIter:
    """Counts yielded micro-batches; creates the real iterator on first use, so a state loaded after ``iter()``
    (Lightning builds the iterator before restoring some states) still applies."""

    def __init__(self, loader: ResumableLoader):
        self.loader = loader
        self.it = None

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return len(self.loader)

    def __next__(self):
        ld = self.loader
        if self.it is None:
            ld.yielded, ld.iter_epoch, ld.last_use = ld.step_sampler.start, ld.step_sampler.epoch, next(_uses)
            self.it = DataLoader.__iter__(ld)
        batch = next(self.it)  # StopIteration ends the epoch with yielded == len
        ld.yielded += 1
        return batch


# -- collators ----------------------------------------------------------------------------------------------------
class PadCollator:
    """Right-pads ``input_ids`` with the pad id and ``labels`` with -100, by length (not by token value)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, batch: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        n = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, e in enumerate(batch):
            k = len(e.input_ids)
            ids[i, :k] = torch.tensor(e.input_ids)
            labels[i, :k] = torch.tensor(e.labels)
            mask[i, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PackCollator:
    """Padding-free packing: the micro-batch's rows concatenated into one row of shape ``[1, total tokens]``.

    ``position_ids`` restart at 0 for every row and there is no ``attention_mask``: transformers then detects the
    packed rows from the position ids and attends only within each row (a block-diagonal causal mask for
    sdpa / eager, varlen kernels for flash-attention). The first label of every row is -100, so no token is
    trained to predict the first token of the next row (in a padded batch no token predicts it either).
    """

    def __call__(self, batch: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for e in batch:
            ids.extend(e.input_ids)
            labels.append(IGNORE_INDEX)
            labels.extend(e.labels[1:])
            pos.extend(range(len(e.input_ids)))
        as_row = lambda v: torch.tensor(v, dtype=torch.long).unsqueeze(0)  # noqa: E731
        return {"input_ids": as_row(ids), "position_ids": as_row(pos), "labels": as_row(labels)}
