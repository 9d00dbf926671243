"""The seed recipe's model and Learner: xresnet34(n_out, sa=True, act_cls=Mish), ranger, RMSE loss.

    from fastgal.learner import make_learner, save_checkpoint, load_checkpoint
    learn = make_learner(dls, arch="xresnet34", targets=["metallicity"], target_mean=[8.9], target_std=[0.2], path="runs/r1")
    learn.fit_one_cycle(7, 1e-2)
    save_checkpoint("runs/r1/model.pt", learn.model, arch="xresnet34", ...); model, meta = load_checkpoint("runs/r1")

Everything is stock fastai, extended with callbacks rather than a custom loop. One addition to
the seed: the network ends in a fixed `Denormalize` layer (out * std + mean of the training
targets), so it starts predicting the mean instead of 0 for a ~8.9 dex target. The loss and the
metrics are still the seed's RMSE in the targets' own units (dex).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import CSVLogger, ProgressCallback
from fastai.callback.schedule import *  # noqa: F401,F403  (patches fit_one_cycle, lr_find onto Learner)
from fastai.callback.tracker import SaveModelCallback, TrackerCallback
from fastai.learner import Learner
from fastai.metrics import AccumMetric
from fastai.optimizer import ranger
from fastai.vision.models import xresnet
from torch import nn

MODEL_FORMAT = 1  # model.pt's layout; load_checkpoint refuses any other

ARCHS = {name: getattr(xresnet, name) for name in ("xresnet18", "xresnet34", "xresnet50", "xresnet18_deep", "xresnet34_deep")}


def resolve_device(name: str) -> torch.device:
    """--device auto|cpu|cuda[:k] -> a torch device; a one-line error when CUDA is asked for but absent."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        from .env import warn_if_gpu_unused

        warn_if_gpu_unused(device)  # one line on stderr when an NVIDIA device is there but unusable
        return device
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA GPU is visible to torch; use --device cpu or auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")


def resolve_precision(name: str, device: torch.device) -> str:
    """--precision auto -> bf16 on GPUs that have it, else fp16; fp32 on a CPU (where AMP does not pay)."""
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"--precision must be auto, bf16, fp16 or fp32, got {name!r}")
    if name != "fp32" and device.type != "cuda":
        raise ValueError(f"--precision {name} needs a GPU; use fp32 (or auto) on the CPU")
    return name


def rmse_loss(pred, targ):
    """The seed's loss: root of the mean squared error over the batch (all targets)."""
    return torch.sqrt(nn.functional.mse_loss(pred.float(), targ.float()))


class Denormalize(nn.Module):
    """A fixed affine output layer: standardised network output -> target units."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x):
        return x.float() * self.std + self.mean


def make_model(arch: str, n_out: int, mean, std) -> nn.Module:
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    body = ARCHS[arch](n_out=n_out, sa=True, act_cls=nn.Mish)
    return nn.Sequential(body, Denormalize(mean, std))


def _col_rmse(j):
    def f(pred, targ):
        return torch.sqrt(((pred[:, j].float() - targ[:, j].float()) ** 2).mean())

    return f


def target_metrics(targets: list[str]):
    """Exact per-target RMSE over the whole validation set (not a mean of batch RMSEs)."""
    return [AccumMetric(_col_rmse(j), flatten=False, name=f"rmse_{t}") for j, t in enumerate(targets)]


class EpochStats(Callback):
    """Seconds and training images/s per epoch, for history.csv and metrics.json."""

    order = 60

    def before_fit(self):
        self.rows = []

    def before_epoch(self):
        self.t0, self.seen, self.t_train = time.perf_counter(), 0, None

    def after_batch(self):
        if self.training:
            self.seen += len(self.yb[0])

    def before_validate(self):
        self.t_train = time.perf_counter() - self.t0

    def after_epoch(self):
        if self.t_train is None or not self.seen:  # get_preds/validate run an epoch with no training
            return
        dt = time.perf_counter() - self.t0
        self.rows.append({"epoch": self.epoch, "seconds": round(dt, 3),
                          "images_per_s": round(self.seen / max(self.t_train, 1e-9), 2)})


class StderrProgress(Callback):
    """One line per epoch on stderr (and a batch counter on a TTY); fastprogress would write to stdout."""

    order = 70

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()

    def before_epoch(self):
        self.trained = False

    def before_train(self):
        self.trained = True

    def after_batch(self):
        if self.quiet or not self.tty or not self.training:
            return
        sys.stderr.write(f"\r\x1b[K  epoch {self.epoch + 1}/{self.n_epoch}  batch {self.iter + 1}/{self.n_iter}  loss {self.smooth_loss:.4f}")
        sys.stderr.flush()

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
        sys.stderr.write(("\r\x1b[K" if self.tty else "") + "  ".join(parts) + "\n")
        sys.stderr.flush()


def make_learner(dls, *, arch: str, targets: list[str], target_mean, target_std, path, precision: str = "fp32",
                 channels_last: bool = False, quiet: bool = False, history: str = "history_raw.csv",
                 writer: bool = True) -> Learner:
    """The seed's Learner with fastgal's callbacks (CSV log, best-epoch weights, progress, AMP).

    writer=False (DDP ranks other than 0) leaves out the callbacks that write files.
    """
    model = make_model(arch, len(targets), target_mean, target_std)
    # fastai exposes each callback by name: learn.epoch_stats, learn.stderr_progress, ...
    cbs = [EpochStats(), StderrProgress(quiet)] + ([CSVLogger(fname=history)] if writer else [])
    learn = Learner(
        dls, model, loss_func=rmse_loss, opt_func=ranger, metrics=target_metrics(targets), path=path,
        model_dir=".", cbs=cbs,
    )
    learn.remove_cb(ProgressCallback)  # its bars go to stdout; StderrProgress replaces them
    learn.logger = lambda *a, **k: None  # the Recorder's table; we print our own summary
    if precision == "bf16":
        learn.add_cb(MixedPrecision(amp_mode="bf16"))
    elif precision == "fp16":
        learn.add_cb(MixedPrecision(amp_mode="fp16"))
    if channels_last:
        from fastai.callback.channelslast import ChannelsLast

        learn.add_cb(ChannelsLast())
    return learn


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
    """SaveModelCallback without its print to stdout (stdout carries results only)."""

    def after_epoch(self):
        TrackerCallback.after_epoch(self)  # sets self.new_best
        if self.new_best:
            self._save(self.fname)


def best_epoch_callback(monitor: str) -> SaveModelCallback:
    """Keep the weights of the epoch with the lowest validation RMSE and reload them after fit."""
    return BestEpoch(monitor=monitor, comp=np.less, fname="best", with_opt=False)  # lower RMSE is better


# --------------------------------------------------------------------------- model.pt

def save_checkpoint(path, model: nn.Module, **meta) -> None:
    """model.pt: the weights and everything prediction needs to rebuild and feed the model (arch, targets,
    target mean/std, pixel mean/std, size/crop/precrop/image_size), written atomically."""
    from . import __version__
    from .util import atomic_path

    ckpt = {"format_version": MODEL_FORMAT, "fastgal_version": __version__, **meta,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load_checkpoint(run, device="cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode on device, metadata) from a run folder or a model.pt path."""
    from pathlib import Path

    path = Path(run) / "model.pt" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise ValueError(f"no model.pt in {run}; point at a finished `fastgal train` run folder")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path} does not load as a fastgal model ({type(e).__name__}); re-run `fastgal train`") from None
    version = ckpt.get("format_version") if isinstance(ckpt, dict) else None
    if version != MODEL_FORMAT:
        raise ValueError(f"{path} is not a fastgal model (format {version}); this fastgal reads format {MODEL_FORMAT}")
    model = make_model(ckpt["arch"], len(ckpt["targets"]), ckpt["target_mean"], ckpt["target_std"])
    model.load_state_dict(ckpt["state_dict"])
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model.to(device).eval(), meta


def inference_settings(meta: dict, device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, channels_last) for predicting with a model as it was trained: on CUDA its
    training precision and memory format (bf16/fp16 autocast, as MixedPrecision ran it); fp32 on a CPU."""
    if torch.device(device).type != "cuda":
        return None, False
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(meta.get("precision", "fp32"))
    return dtype, bool(meta.get("channels_last", False))


def inference(model: nn.Module, meta: dict, device):
    """x -> float32 predictions, computed the way training computed them (inference_settings)."""
    dtype, channels_last = inference_settings(meta, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def forward(x):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
            return model(x).float()

    return forward
