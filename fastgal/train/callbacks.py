"""fastgal's fastai callbacks: epoch timings and progress, the GPU's memory and utilisation per epoch, data
parallelism, the best epoch, the epoch's seed, and the epoch checkpoint (checkpoint.pth: what --resume reads back).

    from fastgal.train.callbacks import EpochCheckpoint, EpochSeed, best_epoch_callback, read_checkpoint
    learn.add_cb(EpochSeed(seed))                                   # every epoch's draws from (seed, epoch)
    best = best_epoch_callback("rmse_metallicity")                  # best.pth, reloaded after fit
    ckpt = EpochCheckpoint(run / "checkpoint.pth", best, meta, resume=read_checkpoint(run / "checkpoint.pth", device))

make_learner (learner.py) adds EpochStats and StderrProgress to every Learner (fastai names them
learn.epoch_stats and learn.stderr_progress); train adds the others (DeviceStats on CUDA only).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.tracker import SaveModelCallback, TrackerCallback
from fastai.learner import save_model

from fastgal.train.checkpoints import save_atomic
from fastgal.util import Progress


class EpochStats(Callback):
    """Seconds, training and validation images/s per epoch, for history.csv and metrics.json. On a GPU it
    waits for the device twice an epoch (when training ends, when validation ends), so the figures are the
    device's, not the host's queue; never inside the batch loop."""

    order = 60

    def before_fit(self):
        self.rows = []
        dev = getattr(self.dls, "device", None)
        self.on_cuda = dev is not None and torch.device(dev).type == "cuda"

    def _now(self) -> float:
        if self.on_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def before_epoch(self):
        self.t0, self.seen, self.seen_valid, self.t_train = self._now(), 0, 0, None

    def after_batch(self):
        if self.training:
            self.seen += len(self.yb[0])
        else:
            self.seen_valid += len(self.yb[0])

    def before_validate(self):
        self.t_train = self._now() - self.t0

    def after_epoch(self):
        if self.t_train is None or not self.seen:  # get_preds/validate run an epoch with no training
            return
        dt = self._now() - self.t0
        valid = dt - self.t_train
        self.rows.append({"epoch": self.epoch, "seconds": round(dt, 3),
                          "images_per_s": round(self.seen / max(self.t_train, 1e-9), 2),
                          "valid_images_per_s": round(self.seen_valid / max(valid, 1e-9), 2) if self.seen_valid else None})


class GpuUtilisation:
    """The GPU's utilisation (%, the share of time a kernel ran, as nvidia-smi reports it), sampled every
    `every` seconds by a daemon thread: through NVML (nvidia-ml-py, `import pynvml`) where it imports and
    initialises, else `nvidia-smi`, else not at all (`source` None). mean(t0, t1) averages the samples taken
    between two time.monotonic() readings."""

    def __init__(self, device: torch.device, every: float = 0.2):
        self.every, self.samples, self.source = every, [], None
        self.ident = _nvml_ident(device)
        self._read = self._nvml() or self._smi()
        self._stop = threading.Event()
        if self._read is not None:
            threading.Thread(target=self._run, name="fastgal-gpu-utilisation", daemon=True).start()

    def _nvml(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            h = (pynvml.nvmlDeviceGetHandleByUUID(self.ident) if self.ident.startswith("GPU-")
                 else pynvml.nvmlDeviceGetHandleByIndex(int(self.ident)))
        except Exception:  # not installed, no driver library, another GPU naming: try nvidia-smi
            return None
        self.source = "nvml"
        return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)

    def _smi(self):
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return None
        self.source = "nvidia-smi"
        cmd = [exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", self.ident]
        return lambda: float(subprocess.run(cmd, capture_output=True, text=True, timeout=2).stdout.split()[0])

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self._read()))
            except Exception:  # the tool went away or answered nonsense: no more samples, the fit goes on
                return
            self._stop.wait(self.every)

    def mean(self, t0: float, t1: float) -> float | None:
        got = [u for t, u in list(self.samples) if t0 <= t <= t1]
        return round(sum(got) / len(got), 1) if got else None

    def close(self) -> None:
        self._stop.set()


def _nvml_ident(device: torch.device) -> str:
    """How NVML and nvidia-smi name torch's `device`: its UUID ("GPU-..."), or failing that the index among
    all GPUs (CUDA_VISIBLE_DEVICES renumbers torch's)."""
    index = device.index if device.index is not None else (torch.cuda.current_device() if torch.cuda.is_available() else 0)
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    except Exception:
        pass
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


class DeviceStats(Callback):
    """Per trained epoch on a CUDA device, two history.csv columns beside EpochStats' figures: the peak GPU
    memory torch's allocator held (peak_gpu_memory_gib, torch.cuda.max_memory_allocated) and the mean GPU
    utilisation over the epoch (gpu_utilisation_pct: NVML, else nvidia-smi, else empty). `fastgal train`
    adds it only on CUDA, so a CPU run's history.csv keeps its columns; on any other device it does nothing."""

    order = 62  # after EpochStats (60) closed the epoch's figures, before EpochCheckpoint (65) copies its row

    def __init__(self, device, every: float = 0.2):
        self.device, self.every, self.util = torch.device(device), every, None

    def before_fit(self):
        self.active = (self.device.type == "cuda" and not hasattr(self.learn, "lr_finder")
                       and not hasattr(self.learn, "gather_preds"))
        if self.active and self.util is None:
            self.util = GpuUtilisation(self.device, self.every)

    def before_epoch(self):
        if self.active:
            self.n_rows, self.t0 = len(self.learn.epoch_stats.rows), time.monotonic()
            torch.cuda.reset_peak_memory_stats(self.device)

    def after_epoch(self):
        rows = self.learn.epoch_stats.rows
        if not self.active or len(rows) == self.n_rows:  # an epoch without training (resume skips it)
            return
        rows[-1]["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        rows[-1]["gpu_utilisation_pct"] = self.util.mean(self.t0, time.monotonic())

    def after_fit(self):
        if self.util is not None and self.active:
            self.util.close()
            self.util = None


class StderrProgress(Callback):
    """One line per epoch on stderr, whether or not it is a terminal (a batch job's log gets one line per
    epoch), and on a terminal a redrawn batch counter (lr_find's: `lr_find: iteration i/N`), written by
    util.Progress; fastprogress would write to stdout. Epochs count from 1."""

    order = 70

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.out = Progress(quiet=quiet)  # its status line: the batch counter; its lines: the epochs

    def before_epoch(self):
        self.trained = False

    def before_train(self):
        self.trained = True

    def before_fit(self):
        self._loss, self._loss_src = None, None
        finder = getattr(self.learn, "lr_finder", None)  # lr_find runs a fit of num_it batches, not of epochs
        self.lr_find_its = finder.num_it if finder is not None else None

    def after_batch(self):
        if not self.out.enabled or not self.training:  # enabled: not quiet, and stderr is a terminal
            return
        # The recorder refreshes learn.smooth_loss (a CPU tensor) when it reads the device, every
        # SYNC_EVERY batches; format it only when it changed, never forcing a read of its own.
        sl = getattr(self.learn, "smooth_loss", None)
        if sl is not self._loss_src and getattr(self.learn.recorder, "reads", 1):
            self._loss_src, self._loss = sl, float(sl)
        loss = f"  loss {self._loss:.4f}" if self._loss is not None else ""
        if self.lr_find_its:
            self.out.status(f"  lr_find: iteration {self.learn.train_iter}/{self.lr_find_its}{loss}")
        else:
            self.out.status(f"  epoch {self.epoch + 1}/{self.n_epoch}  batch {self.iter + 1}/{self.n_iter}{loss}")

    def after_epoch(self):
        if self.quiet or not self.trained or hasattr(self.learn, "lr_finder"):  # lr_find runs fit too
            return
        rec = self.learn.recorder
        vals = dict(zip(rec.metric_names, [self.epoch] + list(rec.log[1:])))
        stats = self.learn.epoch_stats.rows[-1] if self.learn.epoch_stats.rows else {}
        parts = [f"epoch {self.epoch + 1}/{self.n_epoch}"]
        parts += [f"{k} {v:.4f}" for k, v in vals.items() if k not in ("epoch", "time") and isinstance(v, float)]
        if stats:
            parts += [f"{stats['seconds']:.1f}s", f"{stats['images_per_s']:.0f} img/s"]
        self.out.line("  ".join(parts))  # on a terminal it replaces the batch counter


class DDP(Callback):
    """Data-parallel training under torchrun: wrap the model in DistributedDataParallel for fit.

    fastai's own DistributedTrainer also re-wraps the DataLoaders for a fastai Dataset; fastgal's
    loaders are already split per rank by DALI's shard_id/num_shards, so only the model is wrapped.
    """

    order = 11  # after TrainEvalCallback moved the model to its device

    def __init__(self, device):
        self.device = device

    def before_fit(self):
        from torch.nn.parallel import DistributedDataParallel

        # get_preds/validate also fire before_fit; they run on rank 0 alone, unwrapped
        self.wrapped = not hasattr(self.learn, "gather_preds")
        if self.wrapped:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.learn.model = DistributedDataParallel(self.learn.model, device_ids=ids)

    def after_fit(self):
        if self.wrapped:
            self.learn.model = self.learn.model.module


class BestEpoch(SaveModelCallback):
    """SaveModelCallback without its print to stdout (stdout carries results only), writing atomically,
    and passing over the epochs a resumed fit skips (EpochCheckpoint restores `best` for them)."""

    def before_epoch(self):
        self.skipped = False

    def after_cancel_epoch(self):  # fit(start_epoch=k) cancels the epochs before k
        self.skipped = True

    def after_epoch(self):
        if self.skipped:
            return
        TrackerCallback.after_epoch(self)  # sets self.new_best
        if self.new_best:
            self._save(self.fname)

    def _save(self, name):
        save_atomic(self.model, self.path / self.model_dir / f"{name}.pth",
                    save=lambda model, f: save_model(f, model, None, with_opt=False))


def best_epoch_callback(monitor: str) -> SaveModelCallback:
    """Keep the weights of the epoch with the lowest validation RMSE and reload them after fit."""
    return BestEpoch(monitor=monitor, comp=np.less, fname="best", with_opt=False)  # lower RMSE is better


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class EpochSeed(Callback):
    """Every epoch's randomness from (seed, epoch): the training loader reads epoch `epoch`'s order and
    augmentation draws (set_epoch), and torch's global generator (anything in the model that draws) is
    re-seeded, so an epoch is the same whether the run got there in one go or was resumed."""

    order = 5  # before fastai's SkipToEpoch (70) cancels a skipped epoch: harmless there, needed after it

    def __init__(self, seed: int):
        self.seed = seed

    def before_epoch(self):
        self.dls.train.set_epoch(self.epoch)
        torch.manual_seed(epoch_seed(self.seed, self.epoch))


