"""Each training epoch's sample order and augmentation draws, from (seed, epoch) alone, and the
random-access reader both loader backends feed from.

    from fastgal.order import EpochPlan, ShardIndex
    index = ShardIndex(["shards/synth/train-000000.tar"], ["shards/synth/train-000000.idx"])
    plan = EpochPlan(n=len(index), bs=128, order_seed=42, aug_seed=42, shard_id=0, num_shards=1)
    for pos in plan.batches(epoch=3):          # this rank's positions, one full batch at a time
        jpegs, targets = index.batch(pos)      # bytes straight from the tars (memory-mapped)

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

import mmap
from dataclasses import dataclass

import numpy as np
import torch

from .manifest import read_index


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
    max_rotate: float = 10.0
    p_rotate: float = 0.75

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


class ShardIndex:
    """Random access to one split's samples through its DALI index files: position -> (JPEG bytes, targets).

    The tars are memory-mapped once per process (opened lazily, dropped when pickled to a worker), so a
    sample is a slice of the page cache: no system call per read, and nothing is copied until a decoder
    takes the bytes.
    """

    def __init__(self, tars, idxs, image_ext: str = "jpg", target_ext: str = "target.f32"):
        self.tars = [str(t) for t in tars]
        rows = []
        for t, idx in enumerate(idxs):
            rows += [(t, *c[image_ext], *c[target_ext]) for _, c in read_index(idx)]
        a = np.asarray(rows, dtype=np.int64).reshape(-1, 5)
        self.tar, self.img_off, self.img_size, self.y_off, self.y_size = a.T
        self.ntargets = int(self.y_size[0]) // 4 if len(a) else 0
        self._maps: dict[int, mmap.mmap] = {}

    def __len__(self) -> int:
        return len(self.tar)

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}  # a worker maps the files itself

    def _map(self, t: int) -> mmap.mmap:
        m = self._maps.get(t)
        if m is None:
            with open(self.tars[t], "rb") as f:
                m = self._maps[t] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return m

    def jpeg(self, i: int) -> np.ndarray:
        return np.frombuffer(self._map(int(self.tar[i])), np.uint8, int(self.img_size[i]), int(self.img_off[i]))

    def targets(self, i: int) -> np.ndarray:
        return np.frombuffer(self._map(int(self.tar[i])), "<f4", self.ntargets, int(self.y_off[i]))

    def batch(self, pos) -> tuple[list[np.ndarray], np.ndarray]:
        """(a JPEG byte array per sample, targets as a (len(pos), ntargets) float32 array)."""
        return [self.jpeg(i) for i in pos], np.stack([self.targets(i) for i in pos])


class EpochSource:
    """One epoch of batches for DALI's external_source: (jpegs, targets, angle, pos_x, pos_y, mirror[, pos])."""

    def __init__(self, index: ShardIndex, plan: EpochPlan, epoch: int, with_pos: bool = False):
        self.index, self.plan, self.epoch, self.with_pos = index, plan, epoch, with_pos

    def __iter__(self):
        d = self.plan.draws(self.epoch)
        for pos in self.plan.batches(self.epoch):
            jpegs, y = self.index.batch(pos)
            out = (jpegs, y, d.angle[pos], d.pos_x[pos], d.pos_y[pos], d.mirror[pos])
            yield out + ((pos.astype(np.int64),) if self.with_pos else ())


class EpochBatches(torch.utils.data.Sampler):
    """The torch fallback's batch sampler: EpochPlan's batches for the loader's epoch, each key carrying
    its sample's draws, so workers need no random state of their own."""

    def __init__(self, loader):  # a loaders.TorchLoader: its plan and epoch at the time of iter()
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        plan, epoch = self.loader.plan, self.loader.epoch
        d = plan.draws(epoch)
        for pos in plan.batches(epoch):
            yield [(int(i), float(d.angle[i]), float(d.pos_x[i]), float(d.pos_y[i]), int(d.mirror[i])) for i in pos]
