"""Run by tests/test_train.py: a fastgal command that SIGKILLs itself (or sends itself SIGNAL) right after
training batch BATCH (1-based) of epoch EPOCH (0-based): a pre-emption at a point fixed in advance, not a
race with the clock.

    python tests/kill_after.py 1 2 train SHARDS --out RUN --epochs 3 ...
    python tests/kill_after.py 1 2 SIGTERM train SHARDS --out RUN --epochs 3 ...
"""

import os
import signal
import sys

from fastgal.train import callbacks

EPOCH, BATCH = int(sys.argv[1]), int(sys.argv[2])
SIGNAL = getattr(signal, sys.argv.pop(3)) if sys.argv[3].startswith("SIG") else signal.SIGKILL
_after_batch = callbacks.EpochStats.after_batch


def after_batch(self):
    _after_batch(self)
    if self.training and self.epoch == EPOCH and self.iter + 1 == BATCH:
        os.kill(os.getpid(), SIGNAL)


callbacks.EpochStats.after_batch = after_batch

from fastgal.cli import main  # noqa: E402

sys.argv = ["fastgal", *sys.argv[3:]]
main()
