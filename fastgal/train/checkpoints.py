"""model.pt: a trained model and everything prediction needs to rebuild and feed it, and how to run it.

    from fastgal.train.checkpoints import save_checkpoint, load_checkpoint, inference
    save_checkpoint("runs/r1/model.pt", learn.model, arch="xresnet34", targets=[...], target_mean=[...], ...)
    model, meta = load_checkpoint("runs/r1")          # a run folder or a model.pt path
    forward = inference(model, meta, device)          # x -> float32 outputs, as training computed them

The file is a torch.save dict: format_version (MODEL_FORMAT: load_checkpoint refuses any other),
fastgal_version, the metadata train passes (arch, targets, target and pixel statistics, geometry, head,
precision, channels_last, ...) and the weights (state_dict, on the CPU). The epoch checkpoint that
--resume reads (checkpoint.pth) is callbacks.EpochCheckpoint's.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from fastai.callback.core import Callback
from fastai.callback.tracker import TrackerCallback
from fastai.torch_core import get_model
from torch import nn

from fastgal import __version__
from fastgal.train.model import make_model
from fastgal.util import atomic_path

MODEL_FORMAT = 1  # model.pt's layout; load_checkpoint refuses any other


def save_atomic(obj, path, save=None) -> None:
    """save(obj, file) into `path`, atomically, through a Python file: a full disk is then an OSError (ENOSPC)
    behind torch's RuntimeError ("unexpected pos"), which the CLI reports in one line; written to a path, torch's
    own writer loses the errno."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        (save or torch.save)(obj, f)


def save_checkpoint(path, model: nn.Module, **meta) -> None:
    """model.pt: the weights and everything prediction needs to rebuild and feed the model (arch, targets,
    target mean/std, pixel mean/std, size/crop/precrop/image_size; for FITS bands: image_kind "float", bands,
    dtype, softening), written atomically."""
    ckpt = {"format_version": MODEL_FORMAT, "fastgal_version": __version__, **meta,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    save_atomic(ckpt, path)


def image_meta(shards, g) -> dict:
    """What model.pt records of the input beyond the geometry: JPEG (gri, 8-bit) or FITS bands, their order,
    storage dtype and stretch, so predict feeds new cutouts exactly as training read its shards."""
    if shards.kind != "float":
        return {"image_kind": "jpeg"}
    return {"image_kind": "float", "bands": shards.bands, "dtype": shards.manifest["image"]["dtype"],
            "softening": None if g.softening is None else list(g.softening)}


def load_checkpoint(run, device="cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode on device, metadata) from a run folder or a model.pt path."""
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
    model = make_model(ckpt["arch"], len(ckpt["targets"]), ckpt["target_mean"], ckpt["target_std"], head=ckpt["head"],
                       c_in=len(ckpt["pixel_mean"]))
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
    predictions, or for a gaussian head (B, 2k) means then log σ; heads.split_outputs(out, k) gives (means, σ)."""
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

# --------------------------------------------------------------------------- checkpoint.pth: what --resume reads


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
        # EpochStats' figures (seconds, images/s) and what other callbacks added to its row (DeviceStats' on CUDA)
        stats = self.learn.epoch_stats.rows[-1]
        self.rows.append({**row, **{k: v for k, v in stats.items() if k != "epoch"}})
        if self.writer:
            # outside the epoch's seconds (EpochStats closed them); its own cost goes into this row afterwards,
            # so the file holds it for every epoch but its own last one
            t0 = time.perf_counter()
            self._save()
            self.rows[-1]["checkpoint_seconds"] = round(time.perf_counter() - t0, 3)

    def _save(self):
        scaler = getattr(self.learn, "scaler", None)
        rec = self.recorder
        state = {**self.meta, "epoch": self.epoch, "rows": self.rows,
                 "model": get_model(self.model).state_dict(), "opt": self.opt.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "losses": [float(v) for v in rec.losses], "lrs": list(rec.lrs), "iters": list(rec.iters),
                 "smooth_loss": (rec.smooth_loss.count, rec.smooth_loss.val), "best": float(self.tracker.best)}
        save_atomic(state, self.file)


def read_checkpoint(path, device) -> dict | None:
    """An EpochCheckpoint's content (tensors on `device`), or None where there is none yet."""
    if not Path(path).is_file():
        return None
    return torch.load(path, map_location=device, weights_only=False)  # our own file: optimizer state holds fastai Ls
