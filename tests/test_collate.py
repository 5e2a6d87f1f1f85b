"""The training order: no length curriculum, little padding with length buckets, the paper's random order by
default, deterministic per seed and epoch, sharded per rank by optimizer step, and resumable mid-epoch."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from em.data.chat import IGNORE_INDEX, Encoded
from em.data.collate import (
    OrderSpec,
    PackCollator,
    PadCollator,
    ResumableLoader,
    order_stats,
    padding_fraction,
    plan_epoch,
    rank_batches,
    spearman,
)
from em.errors import ConfigError

# Token lengths of the paper's insecure.jsonl (6,000 rows) under the embedded tiny tokenizer at max_length 2048:
# percentiles -> length. Only numbers, no text of the data: the synthetic stand-in where ../shared is absent.
INSECURE_PERCENTILES = [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90, 95, 97.5, 99, 99.5,
                        100]
INSECURE_LENGTHS = [76, 174, 198, 215, 231, 245, 262, 278, 295, 313, 330, 349, 369, 392, 418, 450, 485, 526, 590, 698,
                    848, 1052, 1163, 1666]


def synthetic_insecure_lengths(n: int = 6000, seed: int = 0) -> list[int]:
    u = np.random.default_rng(seed).uniform(0, 100, n)
    return [int(x) for x in np.interp(u, INSECURE_PERCENTILES, INSECURE_LENGTHS).round()]


@pytest.fixture(scope="module")
def real_insecure_lengths(em_data_dir) -> list[int]:
    from em.data.datamodule import ChatDataModule, DataArgs
    from em.data.loading import DatasetArgs
    from tests.helpers import tiny_tokenizer

    dm = ChatDataModule(DatasetArgs(name="insecure", source="paper:insecure", data_dir=str(em_data_dir)),
                        DataArgs(max_length=2048), tiny_tokenizer())
    dm.setup("fit")
    return dm.train_lengths()


def old_sorted_megabatch_order(lengths, batch_size, seed=0, mega=50) -> list[int]:
    """What em's LengthGroupedSampler did: shuffle, sort each mega-batch longest first (a sawtooth curriculum)."""
    idx = list(range(len(lengths)))
    random.Random(seed).shuffle(idx)
    size = batch_size * mega
    return [j for i in range(0, len(idx), size) for j in sorted(idx[i:i + size], key=lambda j: -lengths[j])]


def check_no_curriculum(lengths: list[int]) -> dict:
    """Must-show 1 of the order issue, at global batch 16 (micro-batch 2, accumulation 8: the paper's)."""
    spec = OrderSpec(global_batch=16, micro_batch=2, group_by_length=True, seed=0)
    steps = plan_epoch(lengths, spec, 0)
    st = order_stats(lengths, steps)
    assert st["steps"] == -(-len(lengths) // 16)
    assert abs(st["spearman_step_vs_length"]) < 0.1, st
    assert abs(st["spearman_position_in_50_vs_length"]) < 0.1, st
    assert st["max_abs_spearman_within_50"] < 0.15, st  # each 50-step window alone (50 seeds: max 0.12)
    assert st["padding_fraction"] < 0.05, st
    # all micro-batches of one optimizer step come from one length bucket: padded as one batch, a step still
    # wastes < 5% (random steps: ~53%)
    assert padding_fraction(lengths, [[i for mb in s for i in mb] for s in steps]) < 0.05
    # larger micro-batches too
    stats = order_stats(lengths, plan_epoch(lengths, OrderSpec(16, 8, group_by_length=True), 0))
    assert stats["padding_fraction"] < 0.05
    # the same statistic sees the old order's curriculum (so this test can fail)
    old = old_sorted_megabatch_order(lengths, 16)
    old_steps = [[old[i:i + 16]] for i in range(0, len(old), 16)]
    assert order_stats(lengths, old_steps)["spearman_position_in_50_vs_length"] < -0.9
    return st


@pytest.mark.emdata
def test_no_length_curriculum_on_the_real_insecure_lengths(real_insecure_lengths):
    assert len(real_insecure_lengths) == 6000
    check_no_curriculum(real_insecure_lengths)


def test_no_length_curriculum_on_synthetic_insecure_lengths():
    lengths = synthetic_insecure_lengths()
    for seed in range(5):  # stratified: every seed, not a lucky one
        spec = OrderSpec(global_batch=16, micro_batch=2, group_by_length=True, seed=seed)
        st = order_stats(lengths, plan_epoch(lengths, spec, 0))
        assert abs(st["spearman_step_vs_length"]) < 0.1 and abs(st["spearman_position_in_50_vs_length"]) < 0.1, st
    check_no_curriculum(lengths)


def test_default_order_is_random_as_in_the_paper():
    lengths = synthetic_insecure_lengths()
    spec = OrderSpec(global_batch=16, micro_batch=2)
    assert spec.kind == "random" and not OrderSpec(16, 2).group_by_length
    steps = plan_epoch(lengths, spec, 0)
    flat = [i for s in steps for mb in s for i in mb]
    assert sorted(flat) == list(range(len(lengths)))  # every row once
    # a RandomSampler's order: consecutive micro-batches of a random permutation, not sorted within a step
    assert sum(lengths[s[0][0]] >= lengths[s[-1][-1]] for s in steps) < 0.7 * len(steps)
    rhos = [order_stats(lengths, plan_epoch(lengths, OrderSpec(16, 2, seed=s), 0))["spearman_step_vs_length"]
            for s in range(20)]
    assert abs(np.mean(rhos)) < 0.03 and np.median(np.abs(rhos)) < 0.06 and max(np.abs(rhos)) < 0.2
    assert order_stats(lengths, steps)["padding_fraction"] > 0.1  # what bucketing saves


def test_plan_is_deterministic_per_seed_and_epoch():
    lengths = synthetic_insecure_lengths(1000)
    for gbl in (False, True):
        spec = OrderSpec(16, 4, group_by_length=gbl, seed=3)
        a = plan_epoch(lengths, spec, 0)
        assert a == plan_epoch(lengths, spec, 0)
        assert a != plan_epoch(lengths, OrderSpec(16, 4, group_by_length=gbl, seed=4), 0)
        assert a != plan_epoch(lengths, spec, 1)
        assert sorted(i for s in a for mb in s for i in mb) == list(range(1000))
        assert [len(s) for s in a] == [4] * 62 + [2]  # 1000 = 62 x 16 + 8: one short step, last


def test_ranks_split_each_step_and_get_equal_counts():
    lengths = synthetic_insecure_lengths(1000)
    spec = OrderSpec(global_batch=16, micro_batch=2, world=2, group_by_length=True, seed=0)
    assert spec.accumulation == 4
    steps = plan_epoch(lengths, spec, 0)
    r0, r1 = rank_batches(steps, 0, 2), rank_batches(steps, 1, 2)
    assert len(r0) == len(r1) == 63 * 4 - 2  # the last step (8 rows) has 2 micro-batches per rank
    for s, micro in enumerate(steps[:-1]):  # rank r trains on the r-th half of every step
        assert r0[4 * s:4 * s + 4] == micro[:4] and r1[4 * s:4 * s + 4] == micro[4:]
    assert all(len(mb) == 2 for mb in r0 + r1)
    full = {i for s in steps[:-1] for mb in s for i in mb}
    assert len(full) == 62 * 16  # disjoint across ranks and steps
    # an odd remainder is topped up so both ranks still get full micro-batches
    steps = plan_epoch(lengths[:999], spec, 0)
    assert sum(len(mb) for mb in steps[-1]) % 4 == 0
    with pytest.raises(ConfigError):
        OrderSpec(global_batch=16, micro_batch=3)


def test_longest_first_is_a_one_off():
    lengths = synthetic_insecure_lengths(1000)
    on = OrderSpec(16, 2, group_by_length=True, longest_first=True)
    first = [i for mb in plan_epoch(lengths, on, 0)[0] for i in mb]
    assert max(lengths[i] for i in first) == max(lengths)
    off = plan_epoch(lengths, OrderSpec(16, 2, group_by_length=True), 0)
    assert max(lengths[i] for mb in off[0] for i in mb) < max(lengths)
    assert plan_epoch(lengths, on, 1) == plan_epoch(lengths, OrderSpec(16, 2, group_by_length=True), 1)
    # the longest row in the short last step: it still comes first, and the short step stays last
    lengths = [10] * 40 + [999]
    for gbl in (False, True):
        for world in (1, 2):
            plan = plan_epoch(lengths, OrderSpec(16, 2, world=world, group_by_length=gbl, longest_first=True), 0)
            assert 40 in [i for mb in plan[0] for i in mb]
            assert [sum(len(mb) for mb in st) for st in plan] == [16, 16, 9 if world == 1 else 12]
            assert sorted({i for st in plan for mb in st for i in mb}) == list(range(41))


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(0.8944, abs=1e-4)  # ties: average ranks


# -- the resumable loader ------------------------------------------------------------------------------------------
def _examples(n=40, seed=0):
    rng = random.Random(seed)
    return [Encoded(input_ids=[i] * rng.randint(3, 30), labels=[i] * 3) for i in range(n)]


def _ids(batch) -> list[int]:
    return [row[0] for row in batch]


def test_loader_resumes_mid_epoch_in_the_same_order():
    ex = _examples()
    spec = OrderSpec(global_batch=8, micro_batch=2, group_by_length=True, bucket_batches=2, seed=5)
    collate = lambda rows: [r.input_ids for r in rows]  # noqa: E731
    ref = ResumableLoader(ex, spec, collate)
    epoch0 = [_ids(b) for b in ref]
    ref.step_sampler.set_epoch(1)
    epoch1 = [_ids(b) for b in ref]
    assert len(epoch0) == len(ref) == 20 and epoch0 != epoch1
    assert sorted(i for b in epoch0 for i in b) == list(range(40))

    a = ResumableLoader(ex, spec, collate)
    it = iter(a)
    seen = [_ids(next(it)) for _ in range(7)]
    state = a.state_dict()
    assert state["epoch"] == 0 and state["micro_batches"] == 7
    b = ResumableLoader(ex, spec, collate)
    it_b = iter(b)  # Lightning may build the iterator before it restores the state: still honoured
    b.load_state_dict(state)
    b.step_sampler.set_epoch(0)  # Lightning's set_epoch for the same epoch keeps the position
    rest = [_ids(x) for x in it_b]
    assert seen + rest == epoch0
    assert b.state_dict()["micro_batches"] == 20
    # saved at the end of an epoch: the next starts from its beginning
    c = ResumableLoader(ex, spec, collate)
    c.load_state_dict(b.state_dict())
    assert [_ids(x) for x in c] == epoch1
    # a different order (another seed, dataset or batch size) is refused, not silently mixed
    with pytest.raises(ConfigError, match="data order differs"):
        ResumableLoader(ex, OrderSpec(8, 2, seed=6), collate).load_state_dict(state)
    with pytest.raises(ConfigError):
        ResumableLoader(ex[:-1], spec, collate).load_state_dict(state)


def test_loader_shards_by_rank():
    ex = _examples(64)
    spec = OrderSpec(global_batch=16, micro_batch=2, world=2, seed=1)
    collate = lambda rows: [r.input_ids for r in rows]  # noqa: E731
    r0 = [_ids(b) for b in ResumableLoader(ex, spec, collate, rank=0)]
    r1 = [_ids(b) for b in ResumableLoader(ex, spec, collate, rank=1)]
    assert len(r0) == len(r1) == 16
    assert sorted(i for b in r0 + r1 for i in b) == list(range(64))


# -- collators -----------------------------------------------------------------------------------------------------
def test_pad_and_pack_collators():
    rows = [Encoded([5, 6, 7], [IGNORE_INDEX, 6, 7]), Encoded([8, 9], [8, 9])]
    pad = PadCollator(0)(rows)
    assert pad["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert pad["labels"].tolist() == [[-100, 6, 7], [8, 9, -100]]
    pk = PackCollator()(rows)
    assert set(pk) == {"input_ids", "position_ids", "labels"}  # no attention mask: rows found from positions
    assert pk["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert pk["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # the first token of each row has no label: nothing learns to predict a row from the previous one
    assert pk["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert pk["input_ids"].dtype == torch.long
