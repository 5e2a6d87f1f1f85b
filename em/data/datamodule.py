"""Lightning DataModule: rows -> (cached) encoded examples -> length-grouped padded batches."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L
from torch.utils.data import DataLoader, RandomSampler

from em.data import tokenized_cache
from em.data.chat import OVERLENGTH_POLICIES, EncodeStats, encode_rows
from em.data.collate import LengthGroupedSampler, PadCollator
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
    group_by_length: bool = True
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

    # -- rows ---------------------------------------------------------------------------------
    def load(self) -> None:
        """Load, build and split rows (idempotent). Held-out rows never appear in training."""
        if self.train_rows is not None:
            return
        rows, self.provenance = load_rows(self.dataset_args)
        n_held = self.dataset_args.held_out
        if n_held:
            from em.data.builders import split

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
        return PadCollator(self.tokenizer.pad_token_id)

    def train_dataloader(self):
        a = self.args
        if a.group_by_length:
            sampler = LengthGroupedSampler([len(e.input_ids) for e in self.train_examples], a.micro_batch_size, self.seed)
        else:
            import torch

            sampler = RandomSampler(self.train_examples, generator=torch.Generator().manual_seed(self.seed))
        return DataLoader(self.train_examples, batch_size=a.micro_batch_size, sampler=sampler,
                          collate_fn=self._collator(), num_workers=a.num_workers)

    def val_dataloader(self):
        if not self.val_examples:
            return []
        return DataLoader(self.val_examples, batch_size=self.args.micro_batch_size, shuffle=False,
                          collate_fn=self._collator(), num_workers=self.args.num_workers)
