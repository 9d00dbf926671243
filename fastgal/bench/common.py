"""What `fastgal bench` and its sections share: the peer's name, the device sync every timing needs, and
a loader of synthetic batches. It imports neither main.py nor a section, so each section depends on
these pieces, never on main.py (which imports the sections)."""

from __future__ import annotations

import gc
from contextlib import contextmanager

import torch

PEER = "fastai"  # the baseline name in the JSON and the table


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous: time what has finished


class SyntheticLoader:
    """One batch of the right shape, already on the device, yielded over and over: no data path at all."""

    n_inp = 1

    def __init__(self, x, y, n_batches: int):
        self.x, self.y, self.n_batches = x, y, n_batches
        self.bs, self.n, self.device = len(x), len(x) * n_batches, x.device

    def __len__(self):
        return self.n_batches

    def __iter__(self):
        for _ in range(self.n_batches):
            yield self.x, self.y

    def to(self, device):
        self.device = torch.device(device)
        self.x, self.y = self.x.to(self.device), self.y.to(self.device)
        return self

    def one_batch(self):
        return self.x, self.y

    def new(self, *a, **k):
        return self


@contextmanager
def fork_safe():
    """Collect, then freeze the GC while the fastai peer's DataLoader forks its workers.

    Workers are forked copies of this process. A DALI Pipeline that is garbage but not yet collected (the DALI
    loader timed just before) is copied into each worker; when the worker's GC finalises it, Pipeline.__del__
    waits on a lock held by a DALI thread that does not exist there, and the worker hangs forever. Collecting
    first, then freezing what is left (workers never collect inherited frozen objects), removes that hazard;
    the parent unfreezes afterwards and collects as usual.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
