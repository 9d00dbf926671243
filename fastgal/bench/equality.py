"""`fastgal bench --what equality`: do the loader backends hand the model the same pixels?

    fastgal bench shards/synth --what equality --device cuda --bs 128 --batches 8 --json

The torch loader (decode and augment per batch with torch alone) against DALI's graph
over the same shards, through fastgal.load.loader.dataloaders with one seed, so both read the same samples in
the same order with the same augmentation draws (fastgal.load.order). Graphs: the centre view (validation),
the 8 dihedral TTA views, and the training view. Contracts, in 0-255 units (normalised tensors times the
normalisation std):
  same device (torch vs dali on the CPU; on CUDA also on the GPU)
      centre and TTA views: exact (no value differs by more than EXACT, float32's rounding of normalisation)
      training view: within one grey level (the rotation's bilinear sums are computed per backend)
  across devices (on CUDA: torch on the GPU vs on the CPU, nvJPEG vs libjpeg-turbo)
      p99 |delta| <= DECODER_P99 and signed per-channel means within DECODER_MEAN (a colour shift is a
      metallicity bias)
Targets must be identical everywhere. Each comparison reports max |delta|, p99, the fraction of values that
differ (by more than EXACT) and the signed per-channel means; `problems` lists what broke a contract. Where
DALI is not importable its comparisons are skipped with that reason (on a CPU nothing is left to compare).
"""

from __future__ import annotations

import torch

EXACT = 0.01  # grey levels: float32's rounding of (x - mean) / std, times std; a larger |delta| is a different value
TRAIN_MAX = 1.0  # grey levels, the training view's bilinear rotation
DECODER_P99, DECODER_MEAN = 2.0, 0.25  # grey levels, nvJPEG against libjpeg-turbo


class Pair:
    """Streaming comparison of two loaders' batches: max |delta|, a |delta| histogram (p99), the values that
    differ, signed per-channel means and target equality, in 0-255 units."""

    BIN = 0.01

    def __init__(self, std):
        self.std = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        self.hist = torch.zeros(int(256 / self.BIN), dtype=torch.float64)
        self.max, self.differ, self.values, self.images = 0.0, 0, 0, 0
        self.sum = torch.zeros(len(std), dtype=torch.float64)
        self.targets_equal, self.shape_problem = True, None

    def add(self, a, b) -> None:
        (xa, ya), (xb, yb) = a, b
        if xa.shape != xb.shape:
            self.shape_problem = f"shapes {tuple(xa.shape)} vs {tuple(xb.shape)}"
            return
        d = (xa.double().cpu() - xb.double().cpu()) * self.std
        ad = d.abs()
        self.max = max(self.max, float(ad.max()))
        self.hist += ad.clamp(max=255.99).float().histc(bins=len(self.hist), min=0, max=256).double()
        self.differ += int((ad > EXACT).sum())
        self.values += ad.numel()
        self.sum += d.sum(dim=(0, 2, 3))
        self.images += len(xa)
        self.targets_equal &= bool((ya.cpu() == yb.cpu()).all())

    def summary(self, rule: str) -> dict:
        cdf = self.hist.cumsum(0) / max(float(self.hist.sum()), 1.0)
        p99 = min((int((cdf < 0.99).sum()) + 1) * self.BIN, self.max)
        means = [round(float(v), 4) for v in self.sum / max(self.values // len(self.sum), 1)]
        problems = [self.shape_problem] if self.shape_problem else []
        if rule == "exact" and self.max > EXACT:
            problems.append(f"not exact: max |delta| {self.max:.3f}, {self.differ} of {self.values} values differ")
        if rule == "grey" and self.max > TRAIN_MAX + EXACT:
            problems.append(f"max |delta| {self.max:.3f} > {TRAIN_MAX} grey level")
        if rule == "decoders":
            problems += [f"p99 |delta| {p99:.2f} > {DECODER_P99}"] if p99 > DECODER_P99 else []
            problems += [f"per-channel mean delta {means} beyond +-{DECODER_MEAN}"] if max(map(abs, means)) > DECODER_MEAN else []
        problems += ["targets differ"] if not self.targets_equal else []
        problems += ["no batches compared"] if not self.images else []
        return {"rule": rule, "images": self.images, "max_abs": round(self.max, 4), "p99_abs": round(p99, 3),
                "fraction_differing": round(self.differ / max(self.values, 1), 6), "mean_signed": means,
                "targets_identical": self.targets_equal, "problems": problems}


def _compare(graph: str, loaders: dict, pairs: list, batches: int, std, on_device: dict) -> dict:
    """Every pair over the first `batches` batches of its loaders, read side by side (one iterator each,
    closed after: the DALI backend builds a pipeline per pass)."""
    stats = {(a, b): Pair(std) for a, b, _ in pairs}
    its = {n: iter(dl) for n, dl in loaders.items()}
    try:
        for _ in range(batches):
            got = {n: next(it, None) for n, it in its.items()}
            if any(v is None for v in got.values()):
                break
            for n, (x, _y) in got.items():
                on_device[n] = on_device.get(n, True) and x.device.type == ("cuda" if n.endswith("_gpu") else "cpu")
            for (a, b), pr in stats.items():
                pr.add(got[a], got[b])
    finally:
        for it in its.values():
            it.close()
    rules = {(a, b): ("grey" if graph == "train" and kind == "same" else "exact" if kind == "same" else "decoders")
             for a, b, kind in pairs}
    return {f"{graph}: {a} vs {b}": pr.summary(rules[a, b]) for (a, b), pr in stats.items()}


def equality_bench(shards, *, bs: int, size: int, crop: int, batches: int, device: torch.device, threads: int,
                   seed: int, log) -> dict:
    """The equality section's result (see the module docstring)."""
    from fastgal.load.loader import dali_available, dataloaders

    cuda = device.type == "cuda"
    pairs, skipped = [], {}
    if dali_available():
        pairs.append(("torch_cpu", "dali_cpu", "same"))
        if cuda:
            pairs.append(("torch_gpu", "dali_gpu", "same"))
    else:
        skipped["dali"] = "NVIDIA DALI is not importable here: no torch vs dali comparison"
    if cuda:
        pairs.append(("torch_gpu", "torch_cpu", "devices"))
    res = {"bs": bs, "batches_per_graph": batches, "skipped": skipped,
           "tolerances": {"exact": EXACT, "train_max": TRAIN_MAX, "decoders_p99": DECODER_P99,
                          "decoders_mean": DECODER_MEAN}, "comparisons": {}}
    if not pairs:
        res.update(ok=None, problems=[])
        return res
    names = sorted({n for a, b, _ in pairs for n in (a, b)})
    dls = {n: dataloaders(shards, bs=bs, size=size, crop=crop, device="cuda" if n.endswith("_gpu") else "cpu",
                          backend=n.split("_")[0], threads=threads, seed=seed) for n in names}
    std, on_device, comps = list(dls[names[0]].valid.geometry.std), {}, res["comparisons"]
    try:
        log(f"  equality: {', '.join(f'{a} vs {b}' for a, b, _ in pairs)} over {batches} batch(es) of {bs} per view")
        comps.update(_compare("centre", {n: d.valid for n, d in dls.items()}, pairs, batches, std, on_device))
        for v in range(8):
            comps.update(_compare(f"tta {v}", {n: d.valid.view_of(v) for n, d in dls.items()}, pairs, batches, std,
                                  on_device))
        comps.update(_compare("train", {n: d.train for n, d in dls.items()}, pairs, batches, std, on_device))
    finally:
        for d in dls.values():
            d.train.close()
            d.valid.close()
    res["outputs_on_their_device"] = on_device
    res["problems"] = [f"{k}: {p}" for k, c in comps.items() for p in c["problems"]]
    res["problems"] += [f"{n} did not hand over {'CUDA' if n.endswith('_gpu') else 'CPU'} tensors"
                        for n, ok in on_device.items() if not ok]
    res["ok"] = not res["problems"]
    worst = max(comps.values(), key=lambda c: c["max_abs"])
    log(f"  equality: {len(comps)} comparisons, {'ok' if res['ok'] else 'PROBLEMS'}; worst max |delta| {worst['max_abs']}")
    return res


def equality_table(res: dict) -> list[str]:
    lines = ["", f"equality: torch vs dali, the same samples and draws; {res['batches_per_graph']} batch(es) "
                 f"of {res['bs']} per view; 0-255 units"]
    if res["comparisons"]:
        lines.append(f"  {'comparison':<40}{'rule':<10}{'max':>8}{'p99':>8}{'differ':>10}  problems")
        for k, c in res["comparisons"].items():
            lines.append(f"  {k:<40}{c['rule']:<10}{c['max_abs']:>8.3f}{c['p99_abs']:>8.2f}"
                         f"{c['fraction_differing']:>10.4%}  {'; '.join(c['problems']) or '-'}")
    lines += [f"  {name} skipped ({why})" for name, why in res["skipped"].items()]
    if res["ok"] is not None:
        lines.append(f"  {'ok' if res['ok'] else 'PROBLEMS: ' + '; '.join(res['problems'][:3])}")
    return lines
