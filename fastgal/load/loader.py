"""One loader: a Split read in a plan's order, through a backend that turns JPEG bytes (or the raw float bands
of FITS shards) into a view, handed to fastai as its own DataLoader.

    from fastgal.load.loader import dataloaders
    dls = dataloaders("shards/synth", bs=128, device="cpu")        # fastai DataLoaders (train, valid)
    learn = Learner(dls, model, ...); learn.fit_one_cycle(7, 1e-2)
    tta = [dls.valid.view(v) for v in range(8)]                    # the 8 dihedral views, file order

A Loader is a thin pass-through (like timm's PrefetchLoader): it yields exactly what fastai's Learner
reads, `(x, y)` on the learner's device, and exposes what fastai asks of a DataLoader: `len()` (= batches
actually yielded per pass, which the one-cycle schedule relies on), `bs`, `n`, `device`/`to()`,
`one_batch()`, `new()` (get_preds), `n_inp`, plus `set_epoch()`, `view()` and `show_batch()`.

The plan follows from the view (geometry.py): TRAIN reads an exact permutation per epoch from (seed,
epoch), shared out to DDP ranks like DistributedSampler, with per-sample augmentation draws from
(seed + rank, epoch) (fastgal.load.order); full batches only, so every rank runs the same number of steps.
It reads epoch 0, 1, 2, ... on successive complete passes; `set_epoch(e)` pins the next one (train sets
it from fastai's epoch, so a resumed run reads what it would have). Every other view (centre, TTA) reads
every sample once in file order, on every rank.

Backends choose only how bytes become tensors:
  "dali"  - fastgal.load.dali's graph fed by external_source (CPU or GPU placement).
  "torch" - per batch, torch only: the batch's JPEGs decoded in one call (nvJPEG on a GPU, libjpeg-turbo on a
            CPU: fastgal.load.decode) and its view applied by geometry.transform_batch (a TRAIN view as one
            affine_grid + grid_sample), on the loader's device, in a background thread that prepares batch k+1
            while batch k trains (on its own CUDA stream on a GPU). The GPU path for boxes without DALI, the CPU
            path everywhere, and DALI's peer. ("batched", its name before it became the only torch path, is
            still accepted.)
  "auto"  - pick_backend: DALI on a GPU where installed, else torch.
Float shards (FITS bands) take the same backends and draws: nothing to decode, the (bands, H, W) arrays are
read from the tars as they are (float16 goes to the GPU as float16), then the same geometry, the stretch
(asinh per band, preprocess.geometry_for) and the normalisation.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from fastai.data.core import DataLoaders

from fastgal.load.decode import decode_batch, decoder
from fastgal.load.geometry import (
    CENTRE,
    TRAIN,
    Geometry,
    View,
    check_view,
    norm_tensors,
    stretch_tensor,
    transform_batch,
)
from fastgal.load.order import EpochPlan, file_order
from fastgal.load.preprocess import geometry_for
from fastgal.recipe import RECIPE
from fastgal.shards.read import Shards, Split
from fastgal.shards.stage import local
from fastgal.util import default_workers


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401  (the iterator fastgal uses)
    except Exception:
        return False
    return True


def pick_backend(backend: str, device) -> str:
    """--loader auto: on a GPU, DALI where installed (decode and augment there: what fastgal is built around),
    else torch (nvJPEG + one resample); on a CPU torch (every path is model-bound there: benchmarks/RESULTS.md).
    "batched" is the torch backend's former name."""
    if backend == "batched":
        return "torch"
    if backend == "auto":
        return "dali" if torch.device(device).type == "cuda" and dali_available() else "torch"
    if backend == "dali" and not dali_available():
        raise ValueError("--loader dali needs NVIDIA DALI (pip install nvidia-dali-cuda120, Linux only); use --loader torch")
    return backend


def thread_budget(workers: int = 0) -> int:
    """Loader threads per process: --workers, or this machine's cores shared by the processes torchrun
    started on it (LOCAL_WORLD_SIZE), so K ranks do not each start a thread per core."""
    if workers:
        return workers
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    return max(1, default_workers() // max(1, local))


class Loader:
    """One split, one view, one backend: see the module docstring."""

    n_inp = 1  # fastai: one input (the images), the rest of a batch is targets

    def __init__(self, split: Split, view: View, geometry: Geometry, *, bs: int, device="cpu", backend: str = "auto",
                 seed: int = 42, rank: int = 0, world: int = 1, threads: int = 2, _impl=None):
        self.split, self.view, self.geometry = split, check_view(view), geometry
        self.bs, self.device, self.n = bs, torch.device(device), len(split)
        self.backend = pick_backend(backend, self.device)
        self.seed, self.rank, self.world, self.threads = seed, rank, world, threads
        self.shuffle = self.drop_last = view == TRAIN
        # the same permutation on every rank (order_seed), each rank its own draws (seed + rank)
        self.plan = EpochPlan(self.n, bs, order_seed=seed, aug_seed=seed + rank, shard_id=rank,
                              num_shards=world) if view == TRAIN else None
        self.epoch = 0  # the training epoch the next complete pass reads
        # view_of() passes its loader's backend: the views of one split share its decode threads and buffers
        self._impl = _impl or {"dali": _Dali, "torch": _Torch}[self.backend](self)

    @property
    def c(self) -> int:
        """fastai's number of model outputs for regression (what `dls.c` reads): one per target."""
        return self.split.ntargets

    @property
    def decoded_by(self) -> str:
        """Where JPEGs are decoded and by what, e.g. "GPU (nvJPEG, torchvision)": the run's config and the GPU
        check's headline name it beside the backend."""
        gpu = self.device.type == "cuda"
        if self.split.kind == "float":
            return f"no decode (raw {self.split.dtype.name} bands{', to the GPU' if gpu else ''})"
        lib = "DALI" if self.backend == "dali" else decoder()[0]
        return f"{'GPU (nvJPEG' if gpu else 'CPU (libjpeg-turbo'}, {lib})"

    def set_epoch(self, epoch: int) -> None:
        """Read epoch `epoch`'s order and draws next (DistributedSampler.set_epoch's role)."""
        self.epoch = int(epoch)

    def batches(self) -> list[np.ndarray]:
        """The positions (in the split's file order) of each batch of the next pass."""
        return self.plan.batches(self.epoch) if self.plan else file_order(self.n, self.bs)

    def __len__(self) -> int:
        if self.plan:  # the smallest rank's share, n // world: every DDP rank must run the same number of steps
            return (self.n // self.world) // self.bs
        return math.ceil(self.n / self.bs)

    def __iter__(self):
        draws = self.plan.draws(self.epoch) if self.plan else None
        nb = self.device.type == "cuda"
        for x, y in self._impl.run(self.view, self.batches(), draws):
            yield x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb)
        if self.plan:
            self.epoch += 1

    def to(self, device):
        device = torch.device(device)
        if device != self.device:  # the backend decodes and augments on its device: rebuild it there
            self._impl.close()
            self.device = device
            self._impl = self._impl.__class__(self)
        return self

    def one_batch(self):
        for b in self:
            return b
        raise ValueError("the loader yields no batch: fewer samples than the batch size")

    def view_of(self, view: View) -> "Loader":
        """The same split in another view, through this loader's backend (one set of decode threads or DALI
        settings for the 8 TTA views; the view travels with each pass)."""
        return Loader(self.split, view, self.geometry, bs=self.bs, device=self.device, backend=self.backend,
                      seed=self.seed, rank=self.rank, world=self.world, threads=self.threads, _impl=self._impl)

    def tta(self):
        """The 8 dihedral views, each in file order, made one at a time: a view's pipeline (and its
        threads and buffers) is released before the next is built."""
        for v in range(8):
            dl = self.view_of(v)
            yield dl
            dl.close()

    def new(self, shuffle: bool | None = None, drop_last: bool | None = None, **kwargs):
        """fastai's get_preds(ds_idx) asks for new(shuffle=False, drop_last=False): a training loader gives the
        centre view (every sample once, in file order); any other loader the same view again."""
        return self.view_of(CENTRE if shuffle is False and self.view == TRAIN else self.view)

    def close(self) -> None:
        """Release what iteration built (a DALI pipeline, decode threads); the loader stays usable."""
        self._impl.close()

    def show_batch(self, max_n: int = 16, path: str | Path | None = None, target_names=None, ncols: int = 4):
        """Denormalised images of one batch with their targets, as a PNG at `path` (plots.image_grid)."""
        from fastgal.load.show import band_pick, colour_composite, image_grid

        x, y = self.one_batch()
        x, y = x[:max_n].float().cpu(), y[:max_n].float().cpu()
        mean, std = norm_tensors(self.geometry)
        x = x * std + mean
        title = ""
        if self.split.kind == "float":  # i, r, g as R, G, B where the shards have them; as stretched, scaled together
            bands = self.split.shards.bands
            title = band_pick(bands)[1] + f" (of {','.join(bands)}; each image scaled to its 0.5-99.5% range)"
            imgs = np.stack([colour_composite(im, bands) for im in x.numpy()])
        else:
            imgs = (x / 255).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        names = target_names or [f"y{i}" for i in range(y.shape[1])]
        labels = [", ".join(f"{nm} {v:.2f}" for nm, v in zip(names, t.tolist())) for t in y]
        return image_grid(list(imgs), labels, path, ncols=ncols, title=title)


class _Dali:
    """The DALI backend: a pipeline per pass, fed by external_source, so nothing prefetched for one pass can
    leak into another, whatever stopped the last one (lr_find cancels mid-epoch, one_batch() stops after one)."""

    def __init__(self, dl: Loader):
        from fastgal.load.dali import PipeSpec

        cuda = dl.device.type == "cuda"
        self.dl, self._it = dl, None
        self.spec = PipeSpec(view=dl.view, geometry=dl.geometry, batch_size=dl.bs, device="gpu" if cuda else "cpu",
                             device_id=(dl.device.index or 0) if cuda else None, num_threads=dl.threads, seed=dl.seed,
                             image="jpeg" if dl.split.kind == "jpeg" else dl.split.dtype.name, stored=dl.split.stored)

    def close(self) -> None:
        self._it = None

    def run(self, view, batches, draws):
        from dataclasses import replace

        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        from fastgal.load.dali import build

        split = self.dl.split

        def source():
            for pos in batches:
                jpegs, y = split.batch(pos)
                yield (jpegs, y) if draws is None else (
                    jpegs, y, draws.angle[pos], draws.pos_x[pos], draws.pos_y[pos], draws.mirror[pos])

        self._it = None  # release the previous pass's pipeline before building the next
        seed = self.spec.seed + (self.dl.rank if view == TRAIN else 0)
        pipe = build(replace(self.spec, view=view, seed=seed, stages={}), source())
        pipe.build()
        self._it = DALIGenericIterator([pipe], ["x", "y"], auto_reset=False, last_batch_policy=LastBatchPolicy.PARTIAL)
        for b in self._it:
            yield b[0]["x"], b[0]["y"]
        self._it = None


class _Torch:
    """The torch backend: a whole batch decoded in one call and resampled once, on the loader's device.

    A producer thread prepares up to `PREFETCH` batches ahead (decode and resample release the GIL; on a
    GPU they run on the thread's own CUDA stream, and the consumer's stream waits on an event recorded
    after each batch, so the data work overlaps the training step without a host sync)."""

    PREFETCH = 2
    _END = object()

    def __init__(self, dl: Loader):
        self.dl = dl
        self.cuda = dl.device.type == "cuda"
        # the CUDA index, resolved here: the producer thread must select it (set_device wants an index)
        self.index = (dl.device.index if dl.device.index is not None else torch.cuda.current_device()) if self.cuda else None
        mean, std = norm_tensors(dl.geometry)
        self.mean, self.std = mean.to(dl.device), std.to(dl.device)
        inv = stretch_tensor(dl.geometry)
        self.inv = None if inv is None else inv.to(dl.device)
        self._pool = None  # the CPU decode threads, made on first use

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # idle between batches: returns at once
            self._pool = None

    def make(self, view, pos, draws):
        """One batch: (x on the loader's device, y on the CPU)."""
        dl = self.dl
        images, y = dl.split.batch(pos)
        if dl.split.kind == "float":  # no decode: the arrays as stored (float16 crosses to a GPU at half the bytes)
            imgs = torch.from_numpy(np.stack(images)).to(dl.device, non_blocking=self.cuda)
        else:
            if self._pool is None and not self.cuda and dl.threads > 1:
                self._pool = ThreadPoolExecutor(dl.threads, thread_name_prefix="fastgal-decode")
            imgs = decode_batch(images, dl.device, pool=self._pool)
        d = None if draws is None else (draws.angle[pos], draws.pos_x[pos], draws.pos_y[pos], draws.mirror[pos])
        return transform_batch(imgs, dl.geometry, view, d, mean=self.mean, std=self.std, inv=self.inv), torch.from_numpy(y)

    def run(self, view, batches, draws):
        q: queue.Queue = queue.Queue(maxsize=self.PREFETCH)
        stop = threading.Event()
        device = torch.device("cuda", self.index) if self.cuda else self.dl.device

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def produce():
            try:
                if self.cuda:
                    torch.cuda.set_device(self.index)  # the current device is per thread
                stream = torch.cuda.Stream(device) if self.cuda else None
                with torch.cuda.stream(stream) if self.cuda else nullcontext():
                    for pos in batches:
                        if stop.is_set():
                            return
                        x, y = self.make(view, pos, draws)
                        event = None
                        if self.cuda:
                            y = y.to(device, non_blocking=True)
                            event = torch.cuda.Event()
                            event.record(stream)
                        if not put((x, y, event)):
                            return
                put(self._END)
            except BaseException as e:  # handed to the consumer, which raises it where the user sees it
                put(e)

        worker = threading.Thread(target=produce, name="fastgal-loader", daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if item is self._END:
                    break
                if isinstance(item, BaseException):
                    raise item
                x, y, event = item
                if event is not None:
                    current = torch.cuda.current_stream(device)
                    current.wait_event(event)
                    x.record_stream(current)  # the allocator must not reuse x's memory before this stream is done
                    y.record_stream(current)
                yield x, y
        finally:
            stop.set()
            worker.join()


def dataloaders(shards, *, bs: int = RECIPE.bs, size: int = RECIPE.size, crop: int | None = None, device="cpu",
                backend: str = "auto", threads: int = 2, seed: int = 42, rank: int = 0, world: int = 1,
                path=None, stretch: str = "auto", softening=None) -> DataLoaders:
    """fastai DataLoaders over a shard folder (a path or a Shards): train (TRAIN view, this rank's part of
    each epoch's permutation) and valid (centre view, all of it, file order, on every rank, so every
    rank's metrics are exact and equal), normalised with the shards' pixel statistics. `size` is the model's
    input, `crop` the region crops come from (the shards' own by default), `backend` one of --loader's;
    for shards of FITS bands, `stretch` ("auto": the manifest's asinh, "asinh", "none") and `softening`.
    Also carries `dls.shards` (the Shards) and `dls.targets` (their names). Given a path, the tars' sha256s are
    checked against the manifest first (Shards.check_sha256: once per file, then cached); a Shards is its
    maker's to check (`fastgal train` does, on one process per machine).

    Example:
        dls = fastgal.dataloaders("shards/synth", bs=128, device="cuda")
        xb, yb = dls.one_batch(); dls.show_batch(max_n=8)
    """
    if not isinstance(shards, Shards):
        shards = Shards(local(shards))  # a URL (https://, s3://...): staged to this machine first (shards/stage.py)
        shards.check_sha256()
    geo = geometry_for(shards, size=size, crop=crop, stretch=stretch, softening=softening)
    common = dict(bs=bs, device=device, backend=backend, threads=threads, seed=seed)
    train = Loader(shards.split("train"), TRAIN, geo, rank=rank, world=world, **common)
    if len(train) == 0:
        raise ValueError(f"{shards.folder}: {len(train.split)} training samples is fewer than one batch of {bs}"
                         f"{f' per rank ({world} ranks)' if world > 1 else ''}; lower --bs")
    valid = Loader(shards.split("valid"), CENTRE, geo, **common)
    dls = DataLoaders(train, valid, path=path or shards.folder, device=torch.device(device))
    dls.shards = shards
    dls.targets = shards.targets
    return dls
