"""Run by tests/test_shuffle.py under torchrun (gloo): each rank builds its training loader exactly as
`fastgal train` does (train.setup + train.loaders) and records which samples it read in each epoch.

    torchrun --nproc_per_node 2 tests/ddp_epochs.py SHARDS OUT EPOCHS   # writes OUT/rank{R}.json
"""

import json
import sys
from pathlib import Path

import torch

from fastgal.config import TrainConfig
from fastgal.train import loaders, setup

shards, out, epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
s = setup(TrainConfig(shards=shards, out=out / "run", bs=16, size=56, device="cpu", workers=1, overwrite=True))
dl = loaders(s).train.new(with_pos=True)  # measurement mode: batches also carry their samples' positions
seen = [torch.cat([pos for _, _, pos in dl]).tolist() for _ in range(epochs)]
(out / f"rank{s.rank}.json").write_text(json.dumps(
    {"n": dl.n, "bs": dl.bs, "steps": len(dl), "seed": dl.spec.seed, "epochs": seen}))
