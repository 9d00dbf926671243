"""fastgal.load.order: each epoch's permutation and draws from (seed, epoch) alone, shared out like DistributedSampler."""

from __future__ import annotations

import numpy as np

from fastgal.load.order import EpochPlan, file_order
from fastgal.recipe import RECIPE


def test_ranks_share_one_permutation_in_disjoint_equal_parts():
    plans = [EpochPlan(n=103, bs=8, order_seed=5, aug_seed=5 + r, shard_id=r, num_shards=3) for r in range(3)]
    for epoch in (0, 1):
        parts = [p.positions(epoch) for p in plans]
        assert [len(p) for p in parts] == [103 // 3] * 3  # the tail is dropped, so every rank runs the same steps
        allp = np.concatenate(parts)
        assert len(set(allp.tolist())) == len(allp) and set(allp.tolist()) <= set(range(103))
        whole = np.random.default_rng([5, epoch]).permutation(103)
        assert np.array_equal(parts[1], whole[1:102:3])  # DistributedSampler's round-robin deal
        assert all(len(b) == 8 for b in plans[0].batches(epoch)) and len(plans[0].batches(epoch)) == 34 // 8
    assert not np.array_equal(plans[0].positions(0), plans[0].positions(1))


def test_draws_are_per_sample_from_seed_and_epoch():
    a, b = EpochPlan(50, 8, 1, 7), EpochPlan(50, 8, 2, 7)
    da, db = a.draws(3), b.draws(3)
    for f in ("angle", "pos_x", "pos_y", "mirror"):  # the order's seed never moves the draws
        assert np.array_equal(getattr(da, f), getattr(db, f))
    assert not np.array_equal(a.draws(4).angle, da.angle)
    turns = np.round(da.angle / 90) * 90
    jitter = da.angle - turns
    assert set(np.unique(turns % 360)) <= {0, 90, 180, 270} and np.abs(jitter).max() <= RECIPE.max_rotate
    big = EpochPlan(20000, 8, 1, 7).draws(0)
    jittered = np.abs(big.angle - np.round(big.angle / 90) * 90) > 0
    assert abs(jittered.mean() - RECIPE.p_rotate) < 0.02  # fastai's p_affine
    assert abs(big.mirror.mean() - 0.5) < 0.02 and 0 <= big.pos_x.min() and big.pos_x.max() <= 1


def test_file_order_reads_everything_once_with_a_short_last_batch():
    b = file_order(10, 4)
    assert [x.tolist() for x in b] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and file_order(0, 4) == []
