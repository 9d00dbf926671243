"""`fastgal bench --what shuffle`: how well each training loader shuffles, epoch after epoch.

    fastgal bench shards/synth --what shuffle --epochs 2 --ranks 2 --json

Reads --epochs full epochs of sample positions (places in the split's file order) from each training
loader, built the way `fastgal train` builds it (load.loader.dataloaders: same backend, batch size, threads,
seed):
  dali, torch        what training uses: the loader's plan (fastgal.load.order), an exact permutation per epoch;
                     the positions are the plan's, checked against the targets the loader delivered
  dali-stream...     DALI's WebDataset reader with its shuffle buffer (the reader training used before), built
                     here (the training path has no such reader): as is, with shuffle_after_epoch (a new tar
                     order every epoch), and with a 16k buffer (at most a rank's share of the data); positions
                     from each sample's source_info
and reports, per pair of consecutive epochs:
  spearman           rank correlation of a sample's place in epoch e and in epoch e+1 (0: unrelated)
  cobatch_ratio      P(two samples share a batch in e+1 | they shared one in e), divided by the same
                     probability for a uniform random permutation (1: no memory of the last epoch)
and per epoch: time to the first batch, images/s, steps per rank; with --ranks K > 1 (K loaders with
shard_id 0..K-1, as K DDP processes would build them): samples seen by more than one rank, the share of
the data covered, and how much of each rank's set is new from one epoch to the next.
"""

from __future__ import annotations

import gc
import time

import numpy as np

from fastgal.load.geometry import TRAIN
from fastgal.recipe import RECIPE

# DALI's WebDataset reader in the settings one could try instead of the index reader
STREAM_VARIANTS = {
    "dali-stream": dict(reader="stream"),  # the buffer of 4 batches training used before
    "dali-stream+epoch": dict(reader="stream", shuffle_after_epoch=True),
    "dali-stream+epoch+fill16k": dict(reader="stream", shuffle_after_epoch=True, shuffle_buffer=16384),
}


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x), np.float64)
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def _common(a: list[np.ndarray], b: list[np.ndarray]):
    """For the samples read in both epochs: (place in a, place in b, batch in a, batch in b)."""
    ia, ib = np.concatenate(a), np.concatenate(b)
    ba = np.repeat(np.arange(len(a)), [len(x) for x in a])
    bb = np.repeat(np.arange(len(b)), [len(x) for x in b])
    _, pa, pb = np.intersect1d(ia, ib, return_indices=True)
    return pa, pb, ba[pa], bb[pb]


def spearman(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Rank correlation between the places the samples of both epochs have in each (batches in order)."""
    pa, pb, _, _ = _common(a, b)
    if len(pa) < 3:
        return float("nan")
    return float(np.corrcoef(_ranks(pa), _ranks(pb))[0, 1])


def _pairs(*labels: np.ndarray) -> float:
    """Ordered pairs of samples that share every given label: sum of c * (c - 1) over the groups."""
    code = labels[0].astype(np.int64)
    for lab in labels[1:]:
        code = code * (int(lab.max()) + 1) + lab
    _, c = np.unique(code, return_counts=True)
    return float(np.sum(c * (c - 1.0)))


def cobatch_ratio(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """P(same batch in b | same batch in a) / P(same batch in b) for a uniformly random pair.

    For a uniform random permutation b the two are equal (ratio 1) whatever a was; b = a gives
    (M - 1) / (bs - 1) for M samples in full batches."""
    _, _, la, lb = _common(a, b)
    m = len(la)
    if m < 2:  # no samples in common (a DDP rank's stream reader moved on to another part)
        return float("nan")
    together_a, chance = _pairs(la), _pairs(lb) / (m * (m - 1.0))
    if together_a == 0 or chance == 0:
        return float("nan")
    return float(_pairs(la, lb) / together_a / chance)


def read_epochs(dl, epochs: int) -> tuple[list[list[np.ndarray]], list[float], list[float]]:
    """(positions batch by batch, seconds to the first batch, images/s) for each of `epochs` full passes."""
    out, first, rate = [], [], []
    for _ in range(epochs):
        batches, t0, t_first = [], time.perf_counter(), None
        for _x, _y, pos in dl:
            if t_first is None:
                t_first = time.perf_counter() - t0
            batches.append(np.asarray(pos).astype(np.int64).ravel())
        dt = time.perf_counter() - t0
        out.append(batches)
        first.append(round(t_first if t_first is not None else float("nan"), 4))
        rate.append(round(sum(len(b) for b in batches) / dt, 1))
    return out, first, rate


def measure(per_rank: list, n: int, epochs: int) -> dict:
    """The section's figures for one backend; per_rank: read_epochs' result for each simulated rank."""
    seqs = [p[0] for p in per_rank]  # rank -> epoch -> batches
    res = {
        "time_to_first_batch_s": per_rank[0][1],  # epoch 0 includes building the pipeline / starting workers
        "images_per_s": per_rank[0][2],
        "steps_per_rank": [[len(s[e]) for s in seqs] for e in range(epochs)],
        "spearman": [], "cobatch_ratio": [],
    }
    for e in range(epochs - 1):  # mean over the ranks; None where no rank read a sample twice
        for key, f in (("spearman", spearman), ("cobatch_ratio", cobatch_ratio)):
            vals = [v for v in (f(s[e], s[e + 1]) for s in seqs) if not np.isnan(v)]
            res[key].append(round(float(np.mean(vals)), 4) if vals else None)
    if len(per_rank) > 1:
        sets = [[np.concatenate(s[e]) for s in seqs] for e in range(epochs)]  # epoch -> rank -> samples
        res["samples_on_several_ranks"] = [int(sum(map(len, r)) - len(np.unique(np.concatenate(r)))) for r in sets]
        res["coverage"] = [round(len(np.unique(np.concatenate(r))) / n, 4) for r in sets]
        res["rank_set_new_fraction"] = [
            [round(1 - len(np.intersect1d(sets[e][k], sets[e + 1][k])) / max(1, len(sets[e + 1][k])), 4)
             for k in range(len(per_rank))] for e in range(epochs - 1)]
    return res


def shuffle_section(make, backends: list[str], n: int, epochs: int, ranks: int, log=None) -> dict:
    """make(backend, shard_id, num_shards, **spec) -> a training loader in measurement mode."""
    results = {}
    for name in backends:
        spec = dict(STREAM_VARIANTS.get(name, {}))
        if spec.get("shuffle_buffer"):  # a buffer never holds more than a rank's part of the data, and DALI's
            # reader maps ~1 MB of address space per sample of buffer (15 GiB at 16k): no more than is needed
            spec["shuffle_buffer"] = min(spec["shuffle_buffer"], -(-n // ranks))
        backend = "dali" if name.startswith("dali") else name
        per_rank = []
        for r in range(ranks):  # one rank at a time, each released before the next is built: while a large
            # buffer is mapped, fork() (the torch backend's workers) can fail with ENOMEM on a 24 GiB machine
            dl = make(backend, r, ranks, **spec)
            per_rank.append(read_epochs(dl, epochs))
            dl.close()
            del dl
            gc.collect()  # drop the Python side now; DALI may still free the buffers later (hence the cap above)
        results[name] = {"reader": spec.get("reader", "index"), **measure(per_rank, n, epochs)}
        if "shuffle_buffer" in spec:
            results[name]["shuffle_buffer"] = spec["shuffle_buffer"]
        if log:
            r = results[name]
            log(f"  shuffle {name}: spearman {r['spearman']}, co-batch x chance {r['cobatch_ratio']}")
    return {"epochs": epochs, "ranks": ranks, "n_train": n, "results": results}


class _WithPositions:
    """A training Loader's batches with the positions its plan read, (x, y, positions); the targets it
    delivered are checked against the split's at those positions, so the figures are what was read."""

    def __init__(self, dl):
        self.dl = dl

    def __iter__(self):
        batches = self.dl.batches()
        for (_x, y), pos in zip(self.dl, batches):
            if not np.array_equal(y.cpu().numpy(), self.dl.split.batch(pos)[1]):
                raise RuntimeError(f"the {self.dl.backend} loader did not deliver its plan's samples")
            yield _x, y, pos

    def close(self):
        self.dl.close()


class _Stream:
    """DALI's WebDataset reader over a split (buffer shuffle; draws from DALI's generators), feeding the
    training graph's augmentation, as the training loader was before the index reader; (x, y, positions)."""

    def __init__(self, split, geometry, *, bs, threads, seed, rank, world, shuffle_buffer=0, shuffle_after_epoch=False):
        import nvidia.dali.types as dtypes
        from nvidia.dali import fn
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        from fastgal.load.dali import PipeSpec, augment, pipeline

        self.split, self.steps = split, (len(split) // world) // bs  # the index reader's equal steps per rank
        spec = PipeSpec(view=TRAIN, geometry=geometry, batch_size=bs, num_threads=threads, seed=seed + rank,
                        stored=split.stored)
        self.pipe = pipeline(spec)
        with self.pipe:
            jpg, y = fn.readers.webdataset(
                paths=list(split.tars), index_paths=list(split.idxs), ext=[split.image_ext, split.target_ext],
                dtypes=[dtypes.UINT8, dtypes.FLOAT], missing_component_behavior="error", name="Reader",
                random_shuffle=True, initial_fill=shuffle_buffer or 4 * bs, shuffle_after_epoch=shuffle_after_epoch,
                shard_id=rank, num_shards=world, seed=seed + rank)
            info = fn.pad(fn.get_property(jpg, key="source_info"), fill_value=0)  # "tar:offset:key.jpg", padded
            r = RECIPE.max_rotate
            angle = (fn.random.uniform(values=[0.0, 90.0, 180.0, 270.0])
                     + fn.random.uniform(range=(-r, r)) * fn.random.coin_flip(probability=RECIPE.p_rotate))
            x, y = augment(spec, jpg, y, angle, fn.random.uniform(range=(0.0, 1.0)), fn.random.uniform(range=(0.0, 1.0)),
                           fn.random.coin_flip(probability=0.5))
            self.pipe.set_outputs(x, y, info)
        self.pipe.build()
        self._it = DALIGenericIterator([self.pipe], ["x", "y", "info"], reader_name="Reader", auto_reset=False,
                                       last_batch_policy=LastBatchPolicy.DROP)
        self._keys = {k: i for i, k in enumerate(split.keys)}

    def __iter__(self):
        for i, b in enumerate(self._it):
            if i < self.steps:  # a rank with one sample more than the others: skip its extra batch
                d = b[0]
                names = (bytes(row).rstrip(b"\0").decode().rsplit(":", 1)[1] for row in d["info"].numpy().astype(np.uint8))
                yield d["x"], d["y"], np.array([self._keys[nm.split(".", 1)[0]] for nm in names])
        self._it.reset()

    def close(self):
        self._it = self.pipe = None


def shuffle_bench(cfg, shards, crop: int, device, threads: int, log) -> dict:
    """The shuffle section over the training loaders `fastgal train` builds (shards: a shards.read.Shards)."""
    from fastgal.load.loader import dali_available, dataloaders

    if cfg.epochs < 2 or cfg.ranks < 1:
        raise ValueError("--epochs must be >= 2 (the shuffle section compares consecutive epochs) and --ranks >= 1")

    def make(backend, shard_id, num_shards, **spec):
        dls = dataloaders(shards, bs=cfg.bs, size=cfg.size, crop=crop, device=device, backend=backend, threads=threads,
                          seed=cfg.seed, rank=shard_id, world=num_shards)
        if spec.pop("reader", "index") == "index":
            return _WithPositions(dls.train)
        t = dls.train
        return _Stream(t.split, t.geometry, bs=cfg.bs, threads=threads, seed=cfg.seed, rank=shard_id, world=num_shards,
                       **spec)

    skipped = {} if dali_available() else {"dali": "NVIDIA DALI is not importable here"}
    streams = list(STREAM_VARIANTS) if dali_available() else []
    if streams and shards.kind == "float":  # _Stream hands the reader's bytes to DALI's image decoder
        skipped.update({n: "the stream reader decodes JPEGs; these shards hold FITS bands" for n in streams})
        streams = []
    # torch first: its workers fork before any DALI reader has mapped its buffers into this process
    names = ["torch"] + (["dali", *streams] if dali_available() else [])
    res = shuffle_section(make, names, len(shards.split("train")), cfg.epochs, cfg.ranks, log)
    res["skipped"] = skipped
    return res


def shuffle_table(sh: dict) -> list[str]:
    """The section's lines in `fastgal bench`'s human summary."""
    lines = ["", f"shuffle: {sh['epochs']} epochs, {sh['ranks']} rank(s); per consecutive epochs: Spearman of places, "
                 "co-batch recurrence x chance (uniform: 0 and 1)",
             f"  {'loader':<27}{'Spearman':>10}{'co-batch':>10}{'1st batch s':>13}{'images/s':>10}"]

    def worst(vals, key=None):  # None: no sample read in two consecutive epochs by the same rank
        vals = [v for v in vals if v is not None]
        return max(vals, key=key) if vals else float("nan")

    for name, r in sh["results"].items():
        lines.append(f"  {name:<27}{worst(r['spearman'], abs):>10.4f}{worst(r['cobatch_ratio']):>10.2f}"
                     f"{r['time_to_first_batch_s'][0]:>13.3f}{min(r['images_per_s']):>10,.0f}")
        if "rank_set_new_fraction" in r:
            lines.append(f"  {'':<27}ranks: steps {r['steps_per_rank']}, on several ranks "
                         f"{r['samples_on_several_ranks']}, new per epoch {r['rank_set_new_fraction']}")
    for name, why in sh.get("skipped", {}).items():
        lines.append(f"  {name:<27}skipped ({why})")
    return lines
