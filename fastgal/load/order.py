"""Each training epoch's sample order and augmentation draws, from (seed, epoch) alone; the file order
evaluation reads.

    from fastgal.shards.read import Shards
    from fastgal.load.order import EpochPlan
    train = Shards("shards/synth").split("train")
    plan = EpochPlan(n=len(train), bs=128, order_seed=42, aug_seed=42, shard_id=0, num_shards=1)
    for pos in plan.batches(epoch=3):          # this rank's positions, one full batch at a time
        jpegs, targets = train.batch(pos)      # bytes straight from the tars (memory-mapped)

Why not DALI's own WebDataset reader for training: it reads the tars in their stored order and shuffles
only inside a buffer (4 batches), so consecutive epochs are nearly the same sequence and a batch is drawn
from the same few hundred neighbours every epoch (`fastgal bench --what shuffle` measures it). The DALI
index files hold every sample's byte offsets, so an exact permutation costs nothing but random reads of
a few kB from memory-mapped tars (served from the page cache after the first epoch).

The order is `torch.utils.data.DistributedSampler` with set_epoch and drop_last: one permutation of all
n samples from (order_seed, epoch), the same on every DDP rank, dealt out round-robin, so the ranks'
parts are disjoint, equally long and different every epoch. The augmentation draws (rotation, crop
position, mirror) are per sample from (aug_seed, epoch), aug_seed = seed + rank, so they do not depend
on how many loader threads or workers run, nor on whether the run was interrupted and resumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastgal.recipe import RECIPE


@dataclass(frozen=True)
class Draws:
    """One epoch's augmentation parameters, indexed by sample position (in the split's file order)."""

    angle: np.ndarray  # degrees, counter-clockwise: 90 * k (+ a uniform jitter with probability p_rotate)
    pos_x: np.ndarray  # crop position in [0, 1] of the free margin, DALI's crop_pos_x
    pos_y: np.ndarray
    mirror: np.ndarray  # int32 0/1: horizontal flip


@dataclass(frozen=True)
class EpochPlan:
    n: int  # samples in the split
    bs: int
    order_seed: int  # the same on every rank: they must agree on the permutation they share out
    aug_seed: int  # seed + rank: each rank its own augmentation draws
    shard_id: int = 0
    num_shards: int = 1
    max_rotate: float = RECIPE.max_rotate
    p_rotate: float = RECIPE.p_rotate

    def positions(self, epoch: int) -> np.ndarray:
        """This rank's samples for one epoch, in reading order (n // num_shards of them)."""
        perm = np.random.default_rng([self.order_seed, epoch]).permutation(self.n)
        per = self.n // self.num_shards  # drop the tail, so every rank runs the same number of steps
        return perm[self.shard_id: per * self.num_shards: self.num_shards]

    def batches(self, epoch: int) -> list[np.ndarray]:
        """Full batches only (drop_last): a short batch would be a noisier step than the others."""
        pos = self.positions(epoch)
        k = len(pos) // self.bs
        return [pos[i * self.bs:(i + 1) * self.bs] for i in range(k)]

    def draws(self, epoch: int) -> Draws:
        # a stream of its own ([seed, epoch, 1]), so changing the order's seed never moves the draws
        rng = np.random.default_rng([self.aug_seed, epoch, 1])
        n = self.n
        k = rng.integers(0, 4, n) * 90.0
        jitter = rng.uniform(-self.max_rotate, self.max_rotate, n) * (rng.random(n) < self.p_rotate)
        return Draws(angle=(k + jitter).astype(np.float32), pos_x=rng.random(n, dtype=np.float32),
                     pos_y=rng.random(n, dtype=np.float32), mirror=(rng.random(n) < 0.5).astype(np.int32))


def file_order(n: int, bs: int) -> list[np.ndarray]:
    """Evaluation's batches: every sample once, in file order, the last batch short where n % bs."""
    return [np.arange(i, min(i + bs, n)) for i in range(0, n, bs)]
