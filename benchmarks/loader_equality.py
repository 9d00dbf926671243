"""How equal the data paths are: the same epoch, with the same draws, through every loader backend on the CPU.

    .venv/bin/python benchmarks/loader_equality.py WORK/shards --batches 8 --bs 128     # numbers in RESULTS.md

For the training view (epoch 0) and the evaluation views (centre and the 8 TTA views), each pair of
backends (DALI's CPU graph where installed, `batched` on the CPU, `torch`'s workers) over the first
--batches batches: max and p99 of |delta| in 0-255 units (the normalised tensors times the normalisation
std), the share of pixels that differ at all, the signed per-channel mean delta (a colour shift is a
metallicity bias) and whether the targets match sample for sample (same order). One JSON document on stdout.
"""

import argparse
import itertools
import json

import torch

from fastgal.load.loader import dali_available, dataloaders


def figures(a, b, std) -> dict:
    d = (a - b) * std
    ad = d.abs().flatten().double()
    return {"max": round(float(ad.max()), 4), "p99": round(float(ad.quantile(0.99)), 4),
            "differ": round(float((ad > 1e-3).double().mean()), 6), "mean_signed_rgb": [round(float(v), 5) for v in d.mean((0, 2, 3))]}


def first(dl, k):
    xs, ys = zip(*itertools.islice(iter(dl), k))
    return torch.cat(xs), torch.cat(ys)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shards")
    ap.add_argument("--bs", type=int, default=128)
    ap.add_argument("--batches", type=int, default=8)
    a = ap.parse_args()
    names = (["dali"] if dali_available() else []) + ["batched", "torch"]
    dls = {n: dataloaders(a.shards, bs=a.bs, backend=n, threads=2) for n in names}
    std = torch.tensor(dls["batched"].valid.geometry.std).view(1, 3, 1, 1)
    out = {"shards": a.shards, "bs": a.bs, "batches": a.batches, "backends": names, "views": {}}
    views = {"train (epoch 0)": lambda d: d.train, "centre": lambda d: d.valid,
             **{f"tta {v}": (lambda v: lambda d: d.valid.view_of(v))(v) for v in range(8)}}
    for view, pick in views.items():
        got = {n: first(pick(d), a.batches) for n, d in dls.items()}
        out["views"][view] = {f"{p} vs {q}": {**figures(got[p][0], got[q][0], std),
                                              "targets_identical": bool(torch.equal(got[p][1], got[q][1]))}
                              for p, q in itertools.combinations(names, 2)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
