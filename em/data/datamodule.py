"""Lightning DataModule: rows -> (cached) encoded examples -> batches in a resumable order (padded or packed)."""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import lightning as L
from torch.utils.data import DataLoader

from em.data import tokenized_cache
from em.data.builders import split
from em.data.chat import OVERLENGTH_POLICIES, EncodeStats, encode_rows, row_lengths
from em.data.collate import OrderSpec, PackCollator, PadCollator, ResumableLoader, order_stats, plan_epoch
from em.data.loading import DatasetArgs, load_rows
from em.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DataArgs:
    """Batching and preparation knobs (``data:`` in the config)."""

    max_length: int = 2048
    overlength: str = "truncate"
    """``drop`` / ``truncate`` / ``raise`` for rows longer than ``max_length``."""
    global_batch_size: int = 16
    """The knob: examples per optimizer step across all devices; accumulation is derived."""
    micro_batch_size: int = 2
    """Examples per device per forward pass."""
    group_by_length: bool = False
    """Training order. ``false`` (default; the paper's semantics, its trainer's ``RandomSampler``): a random
    permutation per epoch. ``true``: length buckets: global batches of rows of similar length (little padding:
    ~2% at micro-batch 8 on the paper's insecure rows, vs ~45% in random order), taken in a shuffled order
    stratified by length, so no stretch of the run sees longer or shorter batches (no length curriculum). It
    changes which rows share a step, so it is an option, not the default. See ``em.data.collate``."""
    bucket_batches: int = 50
    """With ``group_by_length``: global batches per length-sorted bucket (more: less padding, fewer distinct
    batch compositions across epochs)."""
    longest_first: bool = False
    """Make the global batch holding the longest row the run's first step (epoch 0 only), so an out-of-memory
    shows at step 0 rather than hours in. That one step leaves the random order; every other step is unchanged."""
    packing: bool = False
    """Padding-free batches: each micro-batch's rows are concatenated into one row with per-row position ids
    and no attention across rows (same rows per step, same loss; no pad tokens). For GPUs with flash-attention
    (varlen kernels); on CPU sdpa builds a dense block-diagonal mask, and length buckets already leave ~2% padding."""
    num_workers: int = 0
    cache_tokenized: bool = True

    def __post_init__(self) -> None:
        for k in ("max_length", "global_batch_size", "micro_batch_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"data.{k}={getattr(self, k)}: expected 1 or more")
        if self.overlength not in OVERLENGTH_POLICIES:
            raise ConfigError(f"data.overlength={self.overlength!r}: expected one of {OVERLENGTH_POLICIES}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers}: expected 0 or more")


def describe_order(order: dict) -> str:
    """One log line: the order, its padding and rank correlations of step vs batch length."""
    r = lambda x: "n/a" if x is None else f"{x:+.3f}"  # noqa: E731
    return (f"{order['order']}{' (packed)' if order['packing'] else ''}, {order['steps']} steps x "
            f"{order['global_batch']} rows; padding {100 * order['padding_fraction']:.1f}%; Spearman(step, mean "
            f"length) {r(order['spearman_step_vs_length'])}, (position in 50-step window, mean length) "
            f"{r(order['spearman_position_in_50_vs_length'])}")


class ChatDataModule(L.LightningDataModule):
    def __init__(self, dataset: DatasetArgs, data: DataArgs, tokenizer, seed: int | None = 0, stop_ids=None):
        super().__init__()
        self.dataset_args = dataset
        self.args = data
        self.tokenizer = tokenizer
        self.seed = 0 if seed is None else seed
        self.stop_ids = stop_ids
        self.train_rows: list[dict] | None = None
        self.held_out_rows: list[dict] = []
        self.provenance: dict = {}
        self.train_examples = None
        self.val_examples = None
        self.train_stats: EncodeStats | None = None
        self._loaders: list[weakref.ref] = []  # every train loader built (Lightning may build several)
        self._order_state: dict | None = None  # loaded from a checkpoint, for loaders not built yet

    # -- rows ---------------------------------------------------------------------------------
    def load(self) -> None:
        """Load, build and split rows (idempotent). Held-out rows never appear in training."""
        if self.train_rows is not None:
            return
        rows, self.provenance = load_rows(self.dataset_args)
        n_held = self.dataset_args.held_out
        if n_held:
            n = int(round(n_held * len(rows))) if isinstance(n_held, float) and n_held < 1 else int(n_held)
            train, held = split(rows, held_out=n, seed=self.seed)[:2]
        else:
            train, held = rows, []
        self.train_rows, self.held_out_rows = train, held

    def _encode(self, rows, name):
        a = self.args
        key = None
        if a.cache_tokenized:
            key = tokenized_cache.cache_key(tokenized_cache.rows_fingerprint(rows),
                                            tokenized_cache.tokenizer_fingerprint(self.tokenizer),
                                            a.max_length, a.overlength, self.stop_ids)
            hit = tokenized_cache.load(key, vocab_size=len(self.tokenizer))
            if hit is not None:
                return hit
        result = encode_rows(self.tokenizer, rows, a.max_length, a.overlength, self.stop_ids,
                             source=f"{self.dataset_args.name}/{name}", progress=len(rows) > 500)
        if key:
            try:
                tokenized_cache.save(key, result)
            except OSError as e:  # a full or read-only cache costs a re-tokenization next time, not the run
                log.warning("could not write the tokenized cache (%s); continuing without it", e)
        return result

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples is not None:
            return
        self.load()
        self.train_examples, self.train_stats = self._encode(self.train_rows, "train")
        log.info("dataset %s (train): %s", self.dataset_args.name, self.train_stats.describe())
        if self.held_out_rows:
            self.val_examples, _ = self._encode(self.held_out_rows, "held_out")

    # -- loaders ------------------------------------------------------------------------------
    def _collator(self):
        return PackCollator() if self.args.packing else PadCollator(self.tokenizer.pad_token_id)

    def order_spec(self, world: int = 1) -> OrderSpec:
        a = self.args
        return OrderSpec(global_batch=a.global_batch_size, micro_batch=a.micro_batch_size, world=world,
                         group_by_length=a.group_by_length, bucket_batches=a.bucket_batches,
                         longest_first=a.longest_first, seed=self.seed)

    def train_lengths(self) -> list[int]:
        return row_lengths(self.train_examples)

    def order_summary(self, world: int = 1, max_steps: int = -1, max_epochs: int | None = 1) -> dict:
        """The run's actual order (optimizer steps up to ``max_steps`` / ``max_epochs``) and its statistics
        (:func:`em.data.collate.order_stats`): for ``data_stats.json``, the log and the train summary."""
        spec = self.order_spec(world)
        lengths = self.train_lengths()
        steps: list = []
        epoch = 0
        limit = max_steps if max_steps and max_steps > 0 else float("inf")
        epochs = max_epochs if max_epochs not in (None, -1) else (1 if limit == float("inf") else 10**9)
        while len(steps) < limit and epoch < max(int(epochs), 1):
            plan = plan_epoch(lengths, spec, epoch)
            if not plan:
                break
            steps.extend(plan)
            epoch += 1
        if limit != float("inf"):
            steps = steps[:int(limit)]
        stats = order_stats(lengths, steps)
        return {"order": spec.kind, "group_by_length": spec.group_by_length, "packing": self.args.packing,
                "longest_first": spec.longest_first, "bucket_batches": spec.bucket_batches if spec.group_by_length
                else None, "global_batch": spec.global_batch, "micro_batch": spec.micro_batch,
                "accumulation": spec.accumulation, "world": world, "epochs": epoch, **stats,
                "padding_fraction_unpacked": stats["padding_fraction"],
                "padding_fraction": 0.0 if self.args.packing else stats["padding_fraction"]}

    def train_dataloader(self):
        a = self.args
        trainer = getattr(self, "trainer", None)
        world = int(trainer.world_size) if trainer is not None else 1
        rank = int(trainer.global_rank) if trainer is not None else 0
        loader = ResumableLoader(self.train_examples, self.order_spec(world), self._collator(), rank=rank,
                                 num_workers=a.num_workers)
        if self._order_state is not None and not any(ld.last_use for ld in self._live_loaders()):
            loader.load_state_dict(self._order_state)
        self._loaders.append(weakref.ref(loader))
        return loader

    def _live_loaders(self) -> list[ResumableLoader]:
        return [ld for ld in (r() for r in self._loaders) if ld is not None]

    # -- resumable order: Lightning saves and restores this with every checkpoint -----------------------------
    def state_dict(self) -> dict:
        live = self._live_loaders()
        if not live:
            return {}
        in_use = max(live, key=lambda ld: ld.last_use)  # the one training iterates (others: e.g. DeepSpeed's probe)
        return {"train_loader": in_use.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Before the loaders exist (most strategies) or after (DeepSpeed restores after its setup): both work."""
        self._order_state = (state or {}).get("train_loader")
        if self._order_state is not None:
            for ld in self._live_loaders():
                ld.load_state_dict(self._order_state)

    def val_dataloader(self):
        if not self.val_examples:
            return []
        return DataLoader(self.val_examples, batch_size=self.args.micro_batch_size, shuffle=False,
                          collate_fn=self._collator(), num_workers=self.args.num_workers)
