"""The adapter: batches from DALI (or the torch fallback) handed to fastai as if they were its own.

    from fastgal.loaders import make_dls
    dls = make_dls("shards/synth", bs=128, device="cpu")      # fastai DataLoaders
    learn = Learner(dls, model, ...); learn.fit_one_cycle(7, 1e-2)

A loader is a thin pass-through (like timm's PrefetchLoader): it yields exactly what fastai's
Learner reads, `(x, y)` on the learner's device, and exposes what fastai asks of a DataLoader:
`len()` (= batches actually yielded per epoch, which the one-cycle schedule relies on), `bs`, `n`,
`device`/`to()`, `one_batch()`, `new()` (get_preds), `n_inp`, plus `show_batch()`.

Training epochs (both backends): an exact permutation per epoch from (seed, epoch), shared out to DDP
ranks like DistributedSampler, with per-sample augmentation draws from (seed + rank, epoch)
(fastgal.order). The loader reads epoch 0, 1, 2, ... on successive complete passes; `set_epoch(e)`
pins the next one (train sets it from fastai's epoch, so a resumed run reads what it would have).
Validation and TTA read in file order. `new(with_pos=True)` (measurement mode, bench --what shuffle)
yields `(x, y, positions)`, positions being the samples' places in the split's file order.

Backends, chosen by `backend`:
  "dali"  - fastgal.pipeline graphs through DALI's PyTorch iterator (CPU or GPU placement).
  "torch" - a fallback for machines without DALI (e.g. macOS): the same shards read by random access
            through the DALI index files, decoded with torchvision and augmented with torchvision v2
            functional ops with the same semantics (crop 144, rotate 90k + +-10 deg at p=0.75 with
            dark fill, random crop 112, mirror, normalise). A map-style dataset gives exact
            once-per-epoch semantics with any number of workers.
  "auto"  - DALI on a GPU, torch on a CPU (pick_backend says why).
"""

from __future__ import annotations

import gc
import math
import os
from contextlib import contextmanager
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from fastai.data.core import DataLoaders
from torchvision.io import ImageReadMode, decode_jpeg

from .pipeline import READER, PipeSpec
from .config import RECIPE
from .manifest import INDEX_VERSION, index_keys, load_manifest, shard_files, training_crop
from .order import EpochBatches, EpochPlan, EpochSource, ShardIndex
from .util import default_workers


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401  (the iterator fastgal uses)
    except Exception:
        return False
    return True


@contextmanager
def fork_safe():
    """Collect, then freeze the GC while loader workers fork.

    Workers are forked copies of this process. A DALI Pipeline that is garbage but not yet collected
    is copied into each worker; when the worker's GC finalises it, Pipeline.__del__ waits on a lock held
    by a DALI thread that does not exist there, and the worker hangs forever. Collecting first, then
    freezing what is left (workers never collect inherited frozen objects), removes that hazard; the
    parent unfreezes afterwards and collects as usual.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _Adapter:
    """What fastgal's loaders share: the fastai-facing surface."""

    n_inp = 1

    def __init__(self, spec: PipeSpec, n: int, device, drop_last: bool):
        self.spec, self.n, self.drop_last = spec, n, drop_last
        self.device = torch.device(device)
        self.bs = spec.batch_size
        self.epoch = 0  # the training epoch the next complete pass reads

    def set_epoch(self, epoch: int) -> None:
        """Read epoch `epoch`'s order and draws next (DistributedSampler.set_epoch's role)."""
        self.epoch = int(epoch)

    @property
    def exact(self) -> bool:
        """True where fastgal.order decides the order: training through the index reader (always for torch)."""
        return self.spec.kind == "train" and (self.spec.reader == "index" or isinstance(self, TorchLoader))

    @property
    def plan(self) -> EpochPlan:
        sp = self.spec
        return EpochPlan(n=self.n, bs=self.bs, order_seed=sp.order_seed, aug_seed=sp.seed, shard_id=sp.shard_id,
                         num_shards=sp.num_shards, max_rotate=sp.max_rotate, p_rotate=sp.p_rotate)

    # samples this process sees per epoch (the stream reader splits n into num_shards contiguous parts)
    @property
    def n_local(self) -> int:
        k, i = self.spec.num_shards, self.spec.shard_id
        return self.n * (i + 1) // k - self.n * i // k

    def __len__(self) -> int:
        if self.drop_last:
            # every DDP rank must run the same number of steps (else the gradient all-reduce hangs):
            # use the smallest rank's share, n // num_shards
            return (self.n // self.spec.num_shards) // self.bs
        return math.ceil(self.n_local / self.bs)

    @property
    def shuffle(self) -> bool:
        return self.spec.kind == "train"

    def to(self, device):
        self.device = torch.device(device)
        return self

    def one_batch(self):
        for b in self:
            return b
        raise ValueError("the loader yields no batch: fewer samples than the batch size with drop_last")

    def new(self, shuffle: bool | None = None, drop_last: bool | None = None, kind: str | None = None, **kwargs):
        """A loader over the same shards; shuffle=False gives the deterministic eval graph."""
        if kind is None:
            kind = "valid" if shuffle is False and self.spec.kind == "train" else self.spec.kind
        spec = replace(self.spec, kind=kind, stages={}, **kwargs)
        dl = type(self)(spec, self.n, self.device, drop_last=self.drop_last if drop_last is None else drop_last)
        dl.epoch = self.epoch
        return dl

    def close(self) -> None:
        """Release what iteration built (a DALI pipeline, worker processes); the loader stays usable."""

    def _move(self, x, y, *pos):
        nb = self.device.type == "cuda"
        return (x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb), *pos)

    def show_batch(self, max_n: int = 16, path: str | Path | None = None, target_names=None, ncols: int = 4):
        """Denormalised images of one batch with their targets, as a PNG at `path` (plots.image_grid)."""
        from .plots import image_grid

        x, y = self.one_batch()
        x, y = x[:max_n].float().cpu(), y[:max_n].float().cpu()
        mean, std = _norm(tuple(self.spec.mean), tuple(self.spec.std))
        imgs = ((x * std + mean) / 255).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        names = target_names or [f"y{i}" for i in range(y.shape[1])]
        labels = [", ".join(f"{nm} {v:.2f}" for nm, v in zip(names, t.tolist())) for t in y]
        return image_grid(list(imgs), labels, path, ncols=ncols)


class DALILoader(_Adapter):
    """DALI pipeline + DALIGenericIterator behind the fastai DataLoader surface."""

    def __init__(self, spec: PipeSpec, n: int, device, drop_last: bool):
        super().__init__(spec, n, device, drop_last)
        self._it = None
        self._clean = False  # True when the iterator sits at an epoch boundary
        self._index = None  # the index reader's ShardIndex, parsed on first use
        self._keys = None  # measurement mode on the stream reader: key -> position

    def close(self) -> None:
        self._it, self._clean = None, False

    def _iterator(self, source=None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        from .pipeline import build

        pipe = build(replace(self.spec, stages={}), source)
        pipe.build()
        names = ["x", "y"] + ["pos"] * self.spec.with_pos
        # the index reader ends its epoch by StopIteration from its source; the stream reader by its size
        return DALIGenericIterator(
            [pipe], names, reader_name=None if source else READER, auto_reset=False,
            last_batch_policy=LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL,
        )

    def __iter__(self):
        if self.exact:
            yield from self._exact_epoch()
            return
        # DALI ignores reset() mid-epoch (lr_find cancels fit mid-epoch, one_batch() stops after one):
        # a half-read iterator is thrown away and a fresh pipeline starts the next epoch cleanly.
        if self._it is None or not self._clean:
            self._it = self._iterator()
        self._clean = False
        n = len(self)
        for i, batch in enumerate(self._it):
            if i >= n:  # a rank with one sample more than the others: skip its extra batch
                continue
            d = batch[0]
            yield self._move(d["x"], d["y"], *([self._positions(d["pos"])] if self.spec.with_pos else []))
        self._it.reset()
        self._clean = True

    def _exact_epoch(self):
        """One epoch of the index reader: a pipeline built for it (its source is this epoch's batches),
        so nothing prefetched for one epoch can leak into another, whatever stopped the last one."""
        if self._index is None:
            self._index = ShardIndex(self.spec.tars, self.spec.idxs, self.spec.image_ext, self.spec.target_ext)
        self._it = None  # release the previous epoch's pipeline before building the next
        self._it = self._iterator(EpochSource(self._index, self.plan, self.epoch, self.spec.with_pos))
        for batch in self._it:
            d = batch[0]
            yield self._move(d["x"], d["y"], *([d["pos"]] if self.spec.with_pos else []))
        self._it = None
        self.epoch += 1

    def _positions(self, info: torch.Tensor) -> torch.Tensor:
        """Stream reader's source_info ("tar:offset:key.jpg", zero-padded bytes) -> positions in file order."""
        if self._keys is None:
            self._keys = {k: i for i, k in enumerate(index_keys(self.spec.idxs))}
        names = (bytes(r).rstrip(b"\0").decode().rsplit(":", 1)[1] for r in info.numpy().astype(np.uint8))
        return torch.tensor([self._keys[nm.split(".", 1)[0]] for nm in names])


class _ShardSamples(torch.utils.data.Dataset):
    """Map-style view of a split through its index files. Key: a position (file order: valid, tta), or
    (position, angle, pos_x, pos_y, mirror) for training, the draws coming from EpochBatches."""

    def __init__(self, spec: PipeSpec):
        self.spec = spec
        self.index = ShardIndex(spec.tars, spec.idxs, spec.image_ext, spec.target_ext)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, key):
        i, *draw = key if isinstance(key, tuple) else (key,)
        img = decode_jpeg(torch.from_numpy(self.index.jpeg(i).copy()), mode=ImageReadMode.RGB)
        y = torch.from_numpy(self.index.targets(i).copy())
        out = (transform(img, self.spec, draw or None), y)
        return out + (i,) if self.spec.with_pos else out


@lru_cache(maxsize=8)
def _norm(mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std as (3, 1, 1) tensors, made once per statistics, not once per image."""
    return (torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), torch.tensor(std, dtype=torch.float32).view(3, 1, 1))


def transform(img: torch.Tensor, spec: PipeSpec, draw=None) -> torch.Tensor:
    """The pipeline's transforms in torchvision v2 functional ops; CHW uint8 in, CHW float out.
    draw: a training sample's (angle, pos_x, pos_y, mirror), fastgal.order's draws, as DALI gets them."""
    if not spec.precropped:
        img = F.center_crop(img, [spec.crop, spec.crop])
    if spec.kind == "train":
        angle, pos_x, pos_y, mirror = draw
        img = F.rotate(img, angle, interpolation=F.InterpolationMode.BILINEAR, fill=0)
        h = img.shape[-1] - spec.size
        img = F.crop(img, round(pos_y * h), round(pos_x * h), spec.size, spec.size)
        if mirror:
            img = F.horizontal_flip(img)
    else:
        img = F.center_crop(img, [spec.size, spec.size])
        if spec.kind == "tta":
            img = torch.rot90(img, k=spec.tta_view % 4, dims=(-2, -1))  # counter-clockwise, like DALI
            if spec.tta_view >= 4:
                img = F.horizontal_flip(img)
    mean, std = _norm(tuple(spec.mean), tuple(spec.std))
    return (img.float() - mean) / std


def worker_context(device, num_workers: int) -> dict:
    """How the torch fallback starts its workers. On a CPU: fork (cheap; fork_safe guards DALI's
    leftovers). Once CUDA is up, a forked child inherits a CUDA context it cannot use and recent torch
    crashes there, so on CUDA the workers start from a clean forkserver (spawn where there is no fork)
    and persist across epochs, paying that start-up once."""
    if num_workers == 0 or torch.device(device).type != "cuda":
        return {}
    import multiprocessing as mp

    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    return {"multiprocessing_context": mp.get_context(method), "persistent_workers": True}


class TorchLoader(_Adapter):
    """The fallback backend: a torch DataLoader over _ShardSamples with the same surface."""

    def __init__(self, spec: PipeSpec, n: int, device, drop_last: bool):
        super().__init__(spec, n, device, drop_last)
        ds = _ShardSamples(spec)
        if spec.kind == "train":
            batching = {"batch_sampler": EpochBatches(self)}
        else:
            if spec.num_shards > 1:  # the same contiguous split DALI's stream reader makes
                a, b = n * spec.shard_id // spec.num_shards, n * (spec.shard_id + 1) // spec.num_shards
                ds = torch.utils.data.Subset(ds, range(a, b))
            batching = {"batch_size": self.bs, "drop_last": drop_last}
        g = torch.Generator()
        g.manual_seed(spec.seed)  # iter() draws a worker seed from it: never from torch's global generator
        self._dl = torch.utils.data.DataLoader(
            ds, num_workers=spec.num_threads, generator=g, **batching,
            pin_memory=torch.device(device).type == "cuda", **worker_context(device, spec.num_threads),
        )

    def __iter__(self):
        with fork_safe():  # iter() forks the workers (on a CPU)
            it = iter(self._dl)
        n = len(self)
        for i, b in enumerate(it):
            if i < n:  # see DALILoader: equal step counts across DDP ranks
                yield self._move(*b)
        if self.exact:
            self.epoch += 1


def pick_backend(backend: str, device) -> str:
    """--loader auto: DALI on a GPU (decode and augment there: what fastgal is for); on a CPU the torch
    fallback, which `fastgal bench` measures faster there (2 cores: 2.1x vs DALI's 1.3x fastai's PIL
    DataBlock, benchmarks/RESULTS.md), and the only choice where DALI is not installed."""
    if backend == "auto":
        return "dali" if torch.device(device).type == "cuda" and dali_available() else "torch"
    if backend == "dali" and not dali_available():
        raise ValueError("--loader dali needs NVIDIA DALI (pip install nvidia-dali-cuda120, Linux only); use --loader torch")
    if backend not in ("dali", "torch"):
        raise ValueError(f"unknown loader backend {backend!r}; use auto, dali or torch")
    return backend


def loader_for(
    shards, manifest: dict, split: str, *, kind: str, bs: int, size: int, crop: int, device, backend: str = "auto",
    num_threads: int = 2, seed: int = 42, shard_id: int = 0, num_shards: int = 1, drop_last: bool = False,
    mean=None, std=None,
) -> _Adapter:
    """One loader over one split of a shard folder. mean/std default to the manifest's pixel stats;
    a trained model passes its own (predict), so new data is normalised like its training data."""
    device = torch.device(device)
    cls = DALILoader if pick_backend(backend, device) == "dali" else TorchLoader
    precrop = manifest["image"].get("precrop")
    region = precrop or crop
    img_side = min(manifest["image"]["size"])
    if size > region or region > img_side:
        raise ValueError(f"crop sizes do not fit: image {img_side}px, region {region}px, model input {size}px")
    if manifest.get("index_format", INDEX_VERSION) != INDEX_VERSION:  # absent: shards from before it was recorded
        raise ValueError(f"{shards}: index files of format {manifest['index_format']!r}, this fastgal reads "
                         f"{INDEX_VERSION}; re-shard with `fastgal shard ... --overwrite`")
    tars, idxs = shard_files(shards, manifest, split)
    ps = manifest["pixel_stats"]
    order_seed = seed  # the same on every rank: they share one permutation out
    if kind == "train":
        seed += shard_id  # each DDP rank its own augmentation draws; evaluation stays deterministic
    spec = PipeSpec(
        kind=kind, tars=[str(t) for t in tars], idxs=[str(i) for i in idxs],
        mean=ps["mean"] if mean is None else mean, std=ps["std"] if std is None else std,
        target_ext=manifest["components"]["targets"],
        image_ext=manifest["components"]["image"], batch_size=bs, size=size, crop=region, precropped=bool(precrop),
        device="gpu" if device.type == "cuda" else "cpu", device_id=(device.index or 0) if device.type == "cuda" else None,
        num_threads=num_threads, seed=seed, order_seed=order_seed, shard_id=shard_id, num_shards=num_shards,
    )
    return cls(spec, manifest["counts"][split], device, drop_last=drop_last)


def make_dls(
    shards, *, bs: int = RECIPE.bs, size: int = RECIPE.size, crop: int | None = None, device="cpu", backend: str = "auto",
    num_threads: int = 2, seed: int = 42, shard_id: int = 0, num_shards: int = 1, path=None,
    manifest: dict | None = None, shard_valid: bool = True,
) -> DataLoaders:
    """fastai DataLoaders (train, valid) over a shard folder, normalised with its manifest's stats;
    crops drawn from the region the shards were made for unless `crop` says otherwise.

    shard_valid=False (DDP): every rank validates on all of the validation set, so every rank's
    metrics are exact and equal; training is always split across ranks.
    """
    shards = Path(shards)
    manifest = manifest or load_manifest(shards)
    crop = training_crop(manifest) if crop is None else crop
    common = dict(bs=bs, size=size, crop=crop, device=device, backend=backend, num_threads=num_threads, seed=seed)
    train = loader_for(shards, manifest, "train", kind="train", drop_last=True, shard_id=shard_id,
                       num_shards=num_shards, **common)
    valid = loader_for(shards, manifest, "valid", kind="valid", **common,
                       **(dict(shard_id=shard_id, num_shards=num_shards) if shard_valid else {}))
    if len(train) == 0:
        raise ValueError(f"{shards}: {manifest['counts']['train']} training samples is fewer than one batch of {bs}; lower --bs")
    dls = DataLoaders(train, valid, path=path or shards, device=torch.device(device))
    dls.manifest = manifest
    dls.targets = list(manifest["targets"])
    return dls


def tta_loaders(valid_dl: _Adapter):
    """The 8 dihedral views of the validation set, each deterministic and in file order, made one at
    a time: a view's pipeline (and its threads and buffers) is released before the next is built."""
    for v in range(8):
        dl = valid_dl.new(kind="tta", tta_view=v, drop_last=False)
        yield dl
        dl.close()


def thread_budget(workers: int = 0) -> int:
    """Loader threads per process: --workers, or this machine's cores shared by the processes torchrun
    started on it (LOCAL_WORLD_SIZE), so K ranks do not each start a thread per core."""
    if workers:
        return workers
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    return max(1, default_workers() // max(1, local))
