"""The adapter: batches from DALI (or the torch fallback) handed to fastai as if they were its own.

    from fastgal.loaders import make_dls
    dls = make_dls("shards/synth", bs=128, device="cpu")      # fastai DataLoaders
    learn = Learner(dls, model, ...); learn.fit_one_cycle(7, 1e-2)

A loader is a thin pass-through (like timm's PrefetchLoader): it yields exactly what fastai's
Learner reads, `(x, y)` on the learner's device, and exposes what fastai asks of a DataLoader:
`len()` (= batches actually yielded per epoch, which the one-cycle schedule relies on), `bs`, `n`,
`device`/`to()`, `one_batch()`, `new()` (get_preds), `n_inp`, plus `show_batch()`.

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
import random
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
from .manifest import load_manifest, read_index, shard_files, training_crop
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

    # samples this process sees per epoch (DALI splits n into num_shards contiguous parts)
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
        return dl

    def close(self) -> None:
        """Release what iteration built (a DALI pipeline, worker processes); the loader stays usable."""

    def _move(self, x, y):
        nb = self.device.type == "cuda"
        return x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb)

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

    def close(self) -> None:
        self._it, self._clean = None, False

    def _iterator(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        from .pipeline import build

        pipe = build(replace(self.spec, stages={}))
        pipe.build()
        return DALIGenericIterator(
            [pipe], ["x", "y"], reader_name=READER, auto_reset=False,
            last_batch_policy=LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL,
        )

    def __iter__(self):
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
            yield self._move(d["x"], d["y"])
        self._it.reset()
        self._clean = True


class _ShardSamples(torch.utils.data.Dataset):
    """Map-style view of shards through their DALI index files: sample i -> (jpg bytes, targets)."""

    def __init__(self, spec: PipeSpec):
        self.spec = spec
        self.entries = []
        for tar, idx in zip(spec.tars, spec.idxs):
            self.entries += [(tar, *c[spec.image_ext], *c[spec.target_ext]) for _, c in read_index(idx)]
        self._files: dict[str, object] = {}

    def __len__(self):
        return len(self.entries)

    def _read(self, tar, off, size):
        f = self._files.get(tar)
        if f is None:  # one handle per worker process
            f = self._files[tar] = open(tar, "rb")
        f.seek(off)
        return f.read(size)

    def __getitem__(self, i):
        tar, img_off, img_size, y_off, y_size = self.entries[i]
        data = torch.frombuffer(bytearray(self._read(tar, img_off, img_size)), dtype=torch.uint8)
        img = decode_jpeg(data, mode=ImageReadMode.RGB)
        y = torch.from_numpy(np.frombuffer(self._read(tar, y_off, y_size), "<f4").copy())
        return transform(img, self.spec), y


@lru_cache(maxsize=8)
def _norm(mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std as (3, 1, 1) tensors, made once per statistics, not once per image."""
    return (torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), torch.tensor(std, dtype=torch.float32).view(3, 1, 1))


def transform(img: torch.Tensor, spec: PipeSpec) -> torch.Tensor:
    """The pipeline's transforms in torchvision v2 functional ops; CHW uint8 in, CHW float out."""
    if not spec.precropped:
        img = F.center_crop(img, [spec.crop, spec.crop])
    if spec.kind == "train":
        angle = 90.0 * random.randrange(4)
        if random.random() < spec.p_rotate:
            angle += random.uniform(-spec.max_rotate, spec.max_rotate)
        img = F.rotate(img, angle, interpolation=F.InterpolationMode.BILINEAR, fill=0)
        h = img.shape[-1] - spec.size
        img = F.crop(img, round(random.random() * h), round(random.random() * h), spec.size, spec.size)
        if random.random() < 0.5:
            img = F.horizontal_flip(img)
    else:
        img = F.center_crop(img, [spec.size, spec.size])
        if spec.kind == "tta":
            img = torch.rot90(img, k=spec.tta_view % 4, dims=(-2, -1))  # counter-clockwise, like DALI
            if spec.tta_view >= 4:
                img = F.horizontal_flip(img)
    mean, std = _norm(tuple(spec.mean), tuple(spec.std))
    return (img.float() - mean) / std


def _seed_worker(worker_id):
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


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
        if spec.num_shards > 1:  # the same contiguous split DALI makes, so DDP ranks agree
            a, b = n * spec.shard_id // spec.num_shards, n * (spec.shard_id + 1) // spec.num_shards
            ds = torch.utils.data.Subset(ds, range(a, b))
        g = torch.Generator()
        g.manual_seed(spec.seed)
        self._dl = torch.utils.data.DataLoader(
            ds, batch_size=self.bs, shuffle=spec.kind == "train", drop_last=drop_last,
            num_workers=spec.num_threads, worker_init_fn=_seed_worker, generator=g,
            pin_memory=torch.device(device).type == "cuda", **worker_context(device, spec.num_threads),
        )

    def __iter__(self):
        with fork_safe():  # iter() forks the workers (on a CPU)
            it = iter(self._dl)
        n = len(self)
        for i, (x, y) in enumerate(it):
            if i < n:  # see DALILoader: equal step counts across DDP ranks
                yield self._move(x, y)


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
    tars, idxs = shard_files(shards, manifest, split)
    ps = manifest["pixel_stats"]
    if kind == "train":
        seed += shard_id  # each DDP rank its own shuffle and augmentation draws; evaluation stays deterministic
    spec = PipeSpec(
        kind=kind, tars=[str(t) for t in tars], idxs=[str(i) for i in idxs],
        mean=ps["mean"] if mean is None else mean, std=ps["std"] if std is None else std,
        target_ext=manifest["components"]["targets"],
        image_ext=manifest["components"]["image"], batch_size=bs, size=size, crop=region, precropped=bool(precrop),
        device="gpu" if device.type == "cuda" else "cpu", device_id=(device.index or 0) if device.type == "cuda" else None,
        num_threads=num_threads, seed=seed, shard_id=shard_id, num_shards=num_shards,
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
