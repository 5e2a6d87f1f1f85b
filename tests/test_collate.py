"""Length-grouped batching: a permutation, deterministic per seed/epoch, less padding than random."""

from __future__ import annotations

import random

from em.data.collate import LengthGroupedSampler


def padding(order, lengths, bs):
    batches = [order[i:i + bs] for i in range(0, len(order), bs)]
    return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in batches)


def test_length_grouped_sampler():
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(1000)]
    s = LengthGroupedSampler(lengths, batch_size=8, seed=0, mega=10)
    a = list(s)
    assert sorted(a) == list(range(1000))
    assert a == list(LengthGroupedSampler(lengths, batch_size=8, seed=0, mega=10))
    assert a != list(LengthGroupedSampler(lengths, batch_size=8, seed=1, mega=10))
    s.set_epoch(1)
    assert list(s) != a
    shuffled = list(range(1000))
    random.Random(0).shuffle(shuffled)
    assert padding(a, lengths, 8) < 0.5 * padding(shuffled, lengths, 8)
    assert lengths[a[0]] == max(lengths)  # the longest batch first: an OOM shows at step 0
