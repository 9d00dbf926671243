"""The seed recipe's model and Learner: xresnet34(n_out, sa=True, act_cls=Mish), ranger, RMSE loss.

    from fastgal.learner import make_learner, save_checkpoint, load_checkpoint
    learn = make_learner(dls, arch="xresnet34", targets=["metallicity"], target_mean=[8.9], target_std=[0.2], path="runs/r1")
    learn.fit_one_cycle(7, 1e-2)
    save_checkpoint("runs/r1/model.pt", learn.model, arch="xresnet34", ...); model, meta = load_checkpoint("runs/r1")

Everything is stock fastai, extended with callbacks rather than a custom loop. One addition to
the seed: the network ends in a fixed `Denormalize` layer (out * std + mean of the training
targets), so it starts predicting the mean instead of 0 for a ~8.9 dex target. The loss and the
metrics are still the seed's RMSE in the targets' own units (dex). head="gaussian" (heads.py) adds a
log σ per target and trains on the Gaussian NLL; the metrics stay the RMSE of the means.

The training step does less host work than stock fastai's, with the same results (what bounds a
GPU at this model size): `--opt ranger` is fastai's ranger over flat buffers (ranger.py), and the
Learner is loop.py's FastgalLearner with a DeviceRecorder (the loss read from the device every
SYNC_EVERY steps). `make_learner(..., stock=True)` builds stock fastai's (the bench's peer).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import *  # noqa: F401,F403  (patches fit_one_cycle, lr_find onto Learner)
from fastai.callback.tracker import SaveModelCallback, TrackerCallback
from fastai.learner import Learner
from fastai.metrics import AccumMetric
from fastai.vision.models import xresnet
from torch import nn

from . import heads
from .loop import SYNC_EVERY, DeviceAccumMetric, DeviceRecorder, FastgalLearner
from .ranger import optimizer

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


def make_model(arch: str, n_out: int, mean, std, head: str = "rmse") -> nn.Module:
    """n_out targets; head "gaussian" doubles the body's outputs into a mean and a log σ each (heads.py)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    body = ARCHS[arch](n_out=heads.n_outputs(head, n_out), sa=True, act_cls=nn.Mish)
    if head == "gaussian":
        return nn.Sequential(body, heads.GaussianHead(Denormalize(mean, std), std))
    return nn.Sequential(body, Denormalize(mean, std))


def _col_rmse(j):
    def f(pred, targ):
        return torch.sqrt(((pred[:, j].float() - targ[:, j].float()) ** 2).mean())

    return f


def target_metrics(targets: list[str], on_device: bool = True):
    """Exact per-target RMSE over the whole validation set (not a mean of batch RMSEs).

    on_device=False: fastai's AccumMetric, which reads every batch back to the CPU."""
    cls = DeviceAccumMetric if on_device else AccumMetric
    return [cls(_col_rmse(j), flatten=False, name=f"rmse_{t}") for j, t in enumerate(targets)]



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

    def before_fit(self):
        self._loss, self._loss_src = None, None

    def after_batch(self):
        if self.quiet or not self.tty or not self.training:
            return
        # The recorder refreshes learn.smooth_loss (a CPU tensor) when it reads the device, every
        # SYNC_EVERY batches; format it only when it changed, never forcing a read of its own.
        sl = getattr(self.learn, "smooth_loss", None)
        if sl is not self._loss_src and getattr(self.learn.recorder, "reads", 1):
            self._loss_src, self._loss = sl, float(sl)
        loss = f"  loss {self._loss:.4f}" if self._loss is not None else ""
        sys.stderr.write(f"\r\x1b[K  epoch {self.epoch + 1}/{self.n_epoch}  batch {self.iter + 1}/{self.n_iter}{loss}")
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
                 channels_last: bool = False, quiet: bool = False, opt: str = "ranger", compile: bool = False,
                 model: nn.Module | None = None, stock: bool = False, sync_every: int = SYNC_EVERY, head: str = "rmse") -> Learner:
    """The seed's Learner with fastgal's callbacks (epoch timings, progress, AMP). It writes no files:
    train adds the best-epoch weights and the epoch checkpoint (which holds the history rows).

    opt: 'ranger' (fastgal's flat-buffer Ranger) or 'fastai-ranger' (fastai's own).
    compile: torch.compile the model in place (nn.Module.compile: state_dict keys are unchanged).
    model: instead of make_model's (bench --what step passes a thin one). stock=True: fastai's own Learner,
    Recorder and AccumMetric, which read the loss/predictions back to the CPU every batch (the peer
    of `fastgal bench --what step`). head "gaussian": Gaussian NLL loss; the metrics stay the RMSE of
    the means (columns 0..k-1).
    """
    opt_func = optimizer(opt)
    if model is None:
        model = make_model(arch, len(targets), target_mean, target_std, head=head)
    if compile:
        model.compile()
    # fastai exposes each callback by name: learn.epoch_stats, learn.stderr_progress, ...
    cbs = [EpochStats(), StderrProgress(quiet)]
    loss = heads.gaussian_nll if head == "gaussian" else rmse_loss
    learn = (Learner if stock else FastgalLearner)(
        dls, model, loss_func=loss, opt_func=opt_func, metrics=target_metrics(targets, on_device=not stock),
        path=path, model_dir=".", cbs=cbs,
    )
    if not stock:
        learn.remove_cb(learn.recorder)
        learn.add_cb(DeviceRecorder(every=sync_every))
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
        from fastai.learner import save_model

        from .util import atomic_path

        with atomic_path(self.path / self.model_dir / f"{name}.pth") as tmp:
            save_model(tmp, self.model, None, with_opt=False)


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


class EpochCheckpoint(Callback):
    """After every trained epoch, the run so far in one file, written atomically: the weights, the optimizer
    state (fastai's Optimizer.state_dict: ranger's moments, Lookahead's slow weights and step count), the
    fp16 GradScaler, the epoch, and what the epochs logged (history rows, per-batch losses, the smoothed
    loss, the best value so far). The one-cycle schedule needs no state of its own: fastai computes the
    lr and momentum of every batch from the position in the fit (epoch / n_epoch + batch / n_iter).

    resume: such a checkpoint, read back, for fit_one_cycle(..., start_epoch=its epoch + 1). fastai's
    SkipToEpoch cancels the epochs before that; this callback restores the model, the optimizer and
    what those epochs had logged. `meta` is saved with every checkpoint (settings, lr_find's result).
    """

    order = 65  # after the Recorder (50), BestEpoch and EpochStats (60) have finished with an epoch

    def __init__(self, path, tracker: TrackerCallback, meta: dict, resume: dict | None = None, writer: bool = True):
        self.file, self.tracker, self.meta, self.resume, self.writer = path, tracker, meta, resume, writer
        self.rows: list[dict] = []

    def before_fit(self):
        self.active = not (hasattr(self.learn, "lr_finder") or hasattr(self.learn, "gather_preds"))
        if not self.active:
            return
        self.rows = []
        st = self.resume
        if st is None:
            return
        from fastai.torch_core import get_model

        get_model(self.model).load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        scaler = getattr(self.learn, "scaler", None)
        if scaler is not None and st["scaler"] is not None:
            scaler.load_state_dict(st["scaler"])
        rec = self.recorder
        rec.losses, rec.lrs, rec.iters = list(map(torch.tensor, st["losses"])), list(st["lrs"]), list(st["iters"])
        rec.smooth_loss.count, rec.smooth_loss.val = st["smooth_loss"]
        self.tracker.best = st["best"]
        self.rows = list(st["rows"])

    def before_epoch(self):
        self.trained = False

    def before_train(self):
        self.trained = True

    def after_epoch(self):
        if not (self.active and self.trained):  # a skipped epoch (resume) or lr_find's
            return
        rec = self.recorder
        row = {k: v for k, v in zip(rec.metric_names, rec.log) if k != "time"}
        stats = self.learn.epoch_stats.rows[-1]
        self.rows.append({**row, "seconds": stats["seconds"], "images_per_s": stats["images_per_s"]})
        if self.writer:
            self._save()

    def _save(self):
        from fastai.torch_core import get_model

        from .util import atomic_path

        scaler = getattr(self.learn, "scaler", None)
        rec = self.recorder
        state = {**self.meta, "epoch": self.epoch, "rows": self.rows,
                 "model": get_model(self.model).state_dict(), "opt": self.opt.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "losses": [float(v) for v in rec.losses], "lrs": list(rec.lrs), "iters": list(rec.iters),
                 "smooth_loss": (rec.smooth_loss.count, rec.smooth_loss.val), "best": float(self.tracker.best)}
        with atomic_path(self.file) as tmp:
            torch.save(state, tmp)


def read_checkpoint(path, device) -> dict | None:
    """An EpochCheckpoint's content (tensors on `device`), or None where there is none yet."""
    from pathlib import Path

    if not Path(path).is_file():
        return None
    return torch.load(path, map_location=device, weights_only=False)  # our own file: optimizer state holds fastai Ls


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
    ckpt.setdefault("head", "rmse")  # model.pt files from before --head
    model = make_model(ckpt["arch"], len(ckpt["targets"]), ckpt["target_mean"], ckpt["target_std"], head=ckpt["head"])
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
    """x -> float32 model outputs, computed the way training computed them (inference_settings): (B, k)
    predictions, or for a gaussian head (B, 2k) means then log σ; heads.split(out, k) gives (means, σ)."""
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
