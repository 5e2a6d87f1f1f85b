"""Batching: right-padding collator and a length-grouped sampler."""

from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from em.data.chat import IGNORE_INDEX, Encoded


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


class LengthGroupedSampler(Sampler[int]):
    """Shuffle, then sort within mega-batches of ``batch_size * mega`` by length (less padding).

    Deterministic given ``seed`` and the epoch (``set_epoch``); the longest batch comes first so an
    out-of-memory shows up at step 0, not hours in.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega: int = 50):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega = mega
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        idx = list(range(len(self.lengths)))
        rng.shuffle(idx)
        size = self.batch_size * self.mega
        groups = [sorted(idx[i: i + size], key=lambda j: -self.lengths[j]) for i in range(0, len(idx), size)]
        if groups and groups[0]:
            longest = max(range(len(groups)), key=lambda g: self.lengths[groups[g][0]] if groups[g] else -1)
            groups[0], groups[longest] = groups[longest], groups[0]
        return iter([j for g in groups for j in g])
