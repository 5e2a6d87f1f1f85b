"""Sharding work across ranks and gathering results: every rank generates (no rank-0-only generate,
which hangs under ZeRO-3 / FSDP where each forward needs every rank)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from em.utils.dist import rank_world

T = TypeVar("T")


def shard(items: Sequence[T], rank: int, world: int) -> list[tuple[int, T]]:
    """(index, item) pairs of this rank: a strided split, so ranks get near-equal, mixed work."""
    return [(i, items[i]) for i in range(rank, len(items), world)]


def gather_shards(local: list[tuple[int, Any]], n: int) -> list[Any]:
    """All ranks' (index, value) pairs back into one list of length ``n`` (on every rank)."""
    import torch.distributed as dist

    rank, world = rank_world()
    if world == 1:
        parts = [local]
    else:
        parts = [None] * world
        dist.all_gather_object(parts, local)
    out: list[Any] = [None] * n
    for part in parts:
        for i, v in part:
            out[i] = v
    return out
