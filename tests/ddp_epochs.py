"""Run by tests/test_train.py under torchrun (gloo): each rank builds its training loader exactly as
`fastgal train` does (train.setup + train.build_loaders), reads EPOCHS epochs and records which samples
it read in each (its plan's positions, checked against the targets the loader delivered).

    torchrun --nproc_per_node 2 tests/ddp_epochs.py SHARDS OUT EPOCHS   # writes OUT/rank{R}.json
"""

import json
import sys
from pathlib import Path

import numpy as np

from fastgal.config import TrainConfig
from fastgal.train import build_loaders, setup

shards, out, epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
s = setup(TrainConfig(shards=shards, out=out / "run", bs=16, size=56, device="cpu", workers=1, overwrite=True))
dl = build_loaders(s).train
seen = []
for _ in range(epochs):
    pos = dl.batches()
    for (_, y), p in zip(dl, pos):
        assert np.array_equal(y.numpy(), dl.split.batch(p)[1]), "the loader did not deliver its plan's samples"
    seen.append(np.concatenate(pos).tolist())
(out / f"rank{s.rank}.json").write_text(json.dumps(
    {"n": dl.n, "bs": dl.bs, "steps": len(dl), "seed": dl.plan.aug_seed, "epochs": seen}))
