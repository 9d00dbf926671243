"""Fit orchestration and the run folder: the seed recipe on fastgal shards.

    fastgal train shards/synth --out runs/r1 --epochs 7 --lr 1e-2 --bs 128 --lr-find --tta
    fastgal train shards/synth --out runs/r1 --epochs 7 --lr 1e-2 --bs 128 --lr-find --tta --resume   # after a kill

Stages (train() runs them in order): setup (manifest, targets, crop, device, precision, ranks, the
run folder) -> loaders -> learner -> fit (lr_find, fit_one_cycle) -> history -> validation
predictions (+ TTA) -> model.pt -> metrics.json.

Run folder (metrics.json is written last: its presence means the run finished):
    config.json            final settings, versions, device, backend
    history.csv            per epoch: train loss, valid loss, valid RMSE per target, seconds, images/s (on CUDA also
                           peak GPU memory and utilisation: callbacks.DeviceStats)
    loss.png, lr_find.png  (lr_find.png with --lr-find; the suggested lr is printed)
    show_batch.png         a training batch as the model sees it (denormalised)
    model.pt               weights + what predict needs (train.checkpoints.save_checkpoint)
    checkpoint.pth         while training: the state after the last finished epoch, for --resume (removed at the end)
    predictions_valid.csv  id, true_<t>, pred_<t>, sigma_<t> (--head gaussian); pred_tta_<t>, sigma_tta_<t> (--tta)
    pred_vs_true.png       with the 1:1 line and RMSE/NMAD
    coverage.png           where there is a sigma: observed fraction of |error| within k sigma vs a Gaussian's
    metrics.json           RMSE, NMAD, bias, R2, TTA RMSE, predict-the-training-mean RMSE, calibration, timings
    report.html            one self-contained page of all of it, with a gallery of the worst, best and random
                           validation cutouts (score/report.py; `fastgal report RUN` rebuilds it)

Distributed: launched by `torchrun --nproc_per_node=K -m fastgal train ...`, each rank reads its part
of the training shards (load.order.EpochPlan: one permutation per epoch, the same on every rank, dealt out
round-robin) and trains a DistributedDataParallel model (the DDP
callback in callbacks.py); every rank validates on all of the validation set; rank 0 writes the run folder.

Resume: every epoch's order, augmentation draws and global RNG state derive from (seed, epoch) (loaders,
EpochSeed), and EpochCheckpoint saves the state after each epoch, so `--resume` continues with fastai's
fit_one_cycle(start_epoch=k) and ends where an uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.torch_core import set_seed

from fastgal.env import versions
from fastgal.load.loader import dataloaders, thread_budget
from fastgal.load.preprocess import resolve_stretch
from fastgal.options import TrainConfig, to_jsonable
from fastgal.recipe import PRESET_FIELDS, RECIPE
from fastgal.run_folder import (
    CHECKPOINT,
    check_out,
    check_resume,
    default_run_dir,
    prepare_out,
)
from fastgal.score.diagnostics import target_scores
from fastgal.score.plots import (
    coverage_plot,
    loss_curves,
    lr_find_plot,
    mzr_plot,
    pred_vs_true,
    residuals,
)
from fastgal.score.predict import predict_split
from fastgal.score.report import REPORT, write_report
from fastgal.shards.read import Shards
from fastgal.shards.stage import local, redact
from fastgal.train.callbacks import DDP, DeviceStats, EpochSeed, best_epoch_callback
from fastgal.train.checkpoints import (
    EpochCheckpoint,
    image_meta,
    inference,
    read_checkpoint,
    save_checkpoint,
)
from fastgal.train.device import resolve_device, resolve_precision
from fastgal.train.learner import make_learner
from fastgal.train.model import make_model
from fastgal.util import (
    OutLock,
    Progress,
    is_url,
    write_bytes_atomic,
    write_json_atomic,
)

RECIPE_TEXT = (f"xresnet(n_out, sa=True, act_cls=Mish) + ranger + RMSE loss, fit_one_cycle; CropPad {RECIPE.crop} -> "
               f"RandomCrop {RECIPE.size} -> dihedral + rotate {RECIPE.max_rotate:g} deg (p={RECIPE.p_rotate:g}) -> Normalize")


@dataclass
class Setup:
    """What the stages share: resolved from the config and the shards' manifest."""

    cfg: TrainConfig
    shards: Shards  # manifest.json read once; each split's index parsed once (Shards.split)
    targets: list[str]
    target_mean: list[float]
    target_std: list[float]
    crop: int
    device: torch.device
    precision: str
    rank: int
    world: int
    out: Path
    given: TrainConfig  # the config as given, before --preset filled it
    source: str | None = None  # the shards' URL (redacted) when they were staged from one; cfg.shards is the copy

    @property
    def from_preset(self) -> list[str]:  # the settings --preset filled
        return self.given.from_preset()

    @property
    def writer(self) -> bool:  # rank 0 writes the run folder
        return self.rank == 0

    @property
    def monitor(self) -> str:  # the metric best-epoch selection and loss.png follow
        return f"rmse_{self.targets[0]}"


def synth_floor(manifest: dict) -> dict | None:
    """The survey's accuracy references (floor.py) when the shards were made from `fastgal synth` output.
    The observable reference is that of the bands the shards hold (gri for JPEGs): gri shards of a ugriz
    survey are judged against what g, r and i show, not against the survey's five bands."""
    meta = Path(manifest.get("source", {}).get("catalog", "")).parent.parent / "synth.json"
    try:
        floor = json.loads(meta.read_text())["floor"] if meta.is_file() else None
    except (ValueError, KeyError):
        return None
    bands = "".join(manifest.get("image", {}).get("bands") or "gri")
    if floor and floor.get("observable_reference", {}).get("bands", "gri") != bands:
        from fastgal.survey.floor import reference_for
        try:
            ref = reference_for(bands)
        except ValueError:  # bands synth cannot write: no reference to judge them by
            return None
        floor = {**floor, "observable_reference_rmse": ref["rmse"], "observable_reference": ref}
    return floor


# --------------------------------------------------------------------------- stages

def _check_targets(cfg: TrainConfig, shards: Shards) -> list[str]:
    all_targets = shards.targets
    targets = cfg.targets or all_targets
    missing = [t for t in targets if t not in all_targets]
    if missing:
        raise ValueError(f"target {missing[0]!r} is not in {cfg.shards}/manifest.json (it has {', '.join(all_targets)})")
    if targets != all_targets:
        # the shards hold every target in one float32 vector; training on a subset needs new shards
        raise ValueError(f"--target must list the manifest's targets in order ({', '.join(all_targets)}); "
                         "re-shard with only the targets you want")
    return targets


def _init_distributed(cfg: TrainConfig, device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device); joins torchrun's process group when world > 1."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return rank, world, device
    if cfg.lr_find:
        raise ValueError("--lr-find runs in a single process; run it without torchrun first")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    import torch.distributed as dist

    if not dist.is_initialized():  # torchrun sets MASTER_ADDR/PORT, RANK, WORLD_SIZE
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def setup(cfg: TrainConfig, claim: contextlib.ExitStack) -> Setup:
    """Check everything that can be wrong before any work starts; claim the run folder (rank 0, released when
    `claim` closes) and prepare it; check the shards' sha256s against their manifest."""
    source = None
    if is_url(cfg.shards):  # staged to this node's disk, verified (its LOCAL_RANK 0 stages, the others wait for it)
        source = redact(cfg.shards)
        cfg = replace(cfg, shards=local(cfg.shards, quiet=cfg.quiet))
    shards = Shards(cfg.shards)  # one-line ValueError on a bad folder
    targets = _check_targets(cfg, shards)
    crop = shards.crop(cfg.crop)
    resolve_stretch(shards, cfg.stretch, cfg.softening)  # --stretch/--softening against the shards, before any work
    if cfg.interval is not None:  # --interval's settings, before any work
        from fastgal.score.conformal import check_settings

        check_settings(cfg, shards.split("valid"))
    if cfg.compile_mode != "default" and not cfg.compile:
        raise ValueError(f"--compile-mode {cfg.compile_mode} applies to a compiled model: add --compile")
    device = resolve_device(cfg.device)
    given = cfg
    cfg = cfg.resolved(gpu=device.type == "cuda", crop=crop)  # --preset fills what was not given
    if cfg.epochs < 1 or cfg.bs < 1 or cfg.lr <= 0 or cfg.lr_find_iters < 1:
        raise ValueError("--epochs, --bs and --lr-find-iters must be positive and --lr > 0")
    precision = resolve_precision(cfg.precision, device)
    rank, world, device = _init_distributed(cfg, device)
    out = Path(cfg.out) if cfg.out else default_run_dir(cfg.shards)
    if rank == 0:  # the writer (Setup.writer): only it writes, so only it claims the folder
        lock = OutLock(out, "fastgal train", log=Progress(quiet=cfg.quiet).line)
        lock.refuse_if_busy()  # another command's run in the making is not "a run" to resume or overwrite
        check_out(cfg, out)  # the refusals first, before the folder is made or the shards are hashed
    # before the first epoch, once per machine (its local rank 0; the others read the same files): each node of
    # a multi-node run checks the copy it reads; a file's hash is cached until it changes (util.HashCache)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        shards.check_sha256(quiet=cfg.quiet or rank > 0)
    if rank == 0:
        claim.enter_context(lock)
        prepare_out(cfg, out)  # checked again under the claim: another command may have written there meanwhile
    tmean, tstd = shards.target_stats()
    return Setup(cfg=cfg, shards=shards, targets=targets, target_mean=tmean, target_std=tstd, crop=crop, device=device,
                 precision=precision, rank=rank, world=world, out=out, given=given, source=source)


def preset_line(s: Setup) -> str:
    """What --preset did, for stderr: the preset, what it set, what was given, and where the input size came from."""
    given, cfg = s.given, s.cfg
    why = f" (--preset auto on a {'GPU' if s.device.type == 'cuda' else 'CPU'})" if given.preset == "auto" else ""
    shown = [f for f in PRESET_FIELDS if f != "lr_find_iters" or cfg.lr_find]
    filled = [f for f in s.from_preset if f in shown]
    parts = [f"preset {cfg.preset}{why}:"]
    parts.append(", ".join(f"{f} {getattr(cfg, f)}" for f in filled) if filled else "nothing (every setting was given)")
    kept = [f for f in shown if f not in filled]
    if kept:
        parts.append("; given: " + ", ".join(f"--{f.replace('_', '-')} {getattr(cfg, f)}" for f in kept))
    if given.size is None:
        parts.append(f"; input {cfg.size} px from the shards' crop {s.crop}")
    if cfg.preset == "cpu" and given.preset == "auto":
        parts.append("; --preset recipe for the seed's")
    return " ".join(parts).replace(" ;", ";")


def build_loaders(s: Setup):
    """Train loader split across ranks; every rank validates on all of the validation set."""
    set_seed(s.cfg.seed)
    dls = dataloaders(s.shards, bs=s.cfg.bs, size=s.cfg.size, crop=s.crop, device=s.device, backend=s.cfg.loader,
                      threads=thread_budget(s.cfg.workers), seed=s.cfg.seed, rank=s.rank, world=s.world, path=s.out,
                      stretch=s.cfg.stretch, softening=s.cfg.softening)
    if s.cfg.interval is not None:
        _carve_calibration(s, dls)
    return dls


def _carve_calibration(s: Setup, dls) -> None:
    """--interval: validate (and so pick the best epoch) on the validation galaxies outside the calibration part
    (score.conformal.calibration_part: a hash of the id), so the intervals are calibrated on galaxies that
    played no part in training or in any choice."""
    from fastgal.load.loader import Loader
    from fastgal.score.conformal import calibration_part

    v = dls.valid
    keep = ~calibration_part(v.split.keys, s.cfg.calib_pct)
    sub = Loader(v.split.subset(keep, "valid-select"), v.view, v.geometry, bs=v.bs, device=v.device,
                 backend=v.backend, seed=v.seed, threads=v.threads)
    v.close()
    dls.loaders[1] = sub


def _per_rank(value) -> list:
    """value from every rank, in rank order (a collective: every rank must call it)."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def write_config(s: Setup, dls) -> dict:
    c = s.cfg
    # each rank's training seed (seed + rank: its own shuffle and augmentation draws), recorded so a run
    # shows that its ranks did not all draw the same
    seed = dls.train.plan.aug_seed
    seeds = _per_rank(seed) if s.world > 1 else [seed]
    config = {
        **to_jsonable(c), "crop": s.crop, "out": str(s.out), "targets": s.targets, "device": str(s.device),
        "precision": s.precision, "loader_backend": dls.train.backend, "loader_decode": dls.train.decoded_by,
        "loader_threads": thread_budget(c.workers), "world_size": s.world,
        "n_train": len(dls.train.split), "n_valid": len(dls.valid.split),
        "versions": versions(), "gpu": torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else None,
        "recipe": RECIPE_TEXT, "from_preset": s.from_preset, "train_seed_per_rank": seeds,
        "shards_sha256": s.shards.sha256(), "shards_source": s.source,  # the URL they were staged from (redacted)
        "image": {"kind": s.shards.kind, "bands": s.shards.bands, "softening": dls.train.geometry.softening,
                  "pixel_mean": list(dls.train.geometry.mean), "pixel_std": list(dls.train.geometry.std)},
    }
    if c.resume:
        if s.writer:
            check_resume(s.out, config)
        return config  # the interrupted run's config.json and show_batch.png stay
    if s.writer:
        write_json_atomic(s.out / "config.json", config)
        dls.train.show_batch(max_n=16, path=s.out / "show_batch.png", target_names=s.targets)
    return config


def build_learner(s: Setup, dls):
    model = make_model(s.cfg.arch, len(s.targets), s.target_mean, s.target_std, head=s.cfg.head,
                       c_in=dls.train.geometry.channels)
    learn = make_learner(dls, model, targets=s.targets, path=s.out, precision=s.precision,
                         channels_last=_channels_last(s), quiet=s.cfg.quiet or not s.writer, opt=s.cfg.opt,
                         compile=s.cfg.compile and s.cfg.compile_mode, head=s.cfg.head)
    learn.add_cb(EpochSeed(dls.train.plan.aug_seed))
    if s.device.type == "cuda":  # history.csv's peak GPU memory and utilisation columns; a CPU run's stay as they are
        learn.add_cb(DeviceStats(s.device))
    if s.world > 1:
        learn.add_cb(DDP(s.device))
    return learn


def fit(s: Setup, learn) -> tuple[dict, list[dict]]:
    """lr_find (optional) then fit_one_cycle, from the last finished epoch with --resume; returns what
    metrics.json adds about the fit and the history rows of every epoch."""
    state = read_checkpoint(s.out / CHECKPOINT, s.device) if s.cfg.resume else None
    start = state["epoch"] + 1 if state else 0  # fastai's 0-based index of the first epoch to train
    # epochs a person reads count from 1 (the progress lines, history.csv, metrics.json): the first epoch this
    # process trains
    result: dict = {"resumed_from_epoch": start + 1 if state else None}
    if state:
        result["lr_find_suggested"] = state["lr_find_suggested"]
    elif s.cfg.lr_find:
        # fastai stops lr_find when the loss passes 4x its best: meaningless for an NLL that goes negative
        # fastai's LRFinder parks the weights in a temporary folder under path/model_dir: a system temp folder
        # instead, so an interrupted lr_find leaves nothing (85 MB for xresnet34) in the run folder
        log = Progress(quiet=s.cfg.quiet)
        log.line(f"lr_find: {s.cfg.lr_find_iters} iterations of bs {s.cfg.bs} (--lr-find-iters)")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="fastgal-lr-find-") as tmp:
            model_dir, learn.model_dir = learn.model_dir, Path(tmp)
            try:
                sug = learn.lr_find(show_plot=False, num_it=s.cfg.lr_find_iters, stop_div=s.cfg.head == "rmse")
            finally:
                learn.model_dir = model_dir
        result["lr_find_suggested"] = float(sug.valley)
        rec = learn.recorder
        if s.writer:
            lr_find_plot(rec.lrs, [float(v) for v in rec.losses], float(sug.valley), s.out / "lr_find.png",
                         used=s.cfg.lr)
        done = len(rec.losses)
        stopped = " (stopped early: the loss diverged)" if done < s.cfg.lr_find_iters else ""
        log.line(f"lr_find: {done} iterations in {time.perf_counter() - t0:.0f}s{stopped}; suggested lr (valley) "
                 f"{sug.valley:.2e}; training with --lr {s.cfg.lr:g}")
    best = best_epoch_callback(s.monitor)
    ckpt = EpochCheckpoint(s.out / CHECKPOINT, best, {"lr_find_suggested": result.get("lr_find_suggested")},
                           resume=state, writer=s.writer)
    # on every rank: fastai saves on rank 0 only, and its load() after fit is a collective barrier
    learn.fit_one_cycle(s.cfg.epochs, s.cfg.lr, cbs=[best, ckpt], start_epoch=start)
    if s.world > 1:
        import torch.distributed as dist

        # Training is the only collective part: from here rank 0 works alone (history, predictions, scores,
        # model.pt) and the others return. WORLD_SIZE is left as torchrun set it (this used to set it to 1):
        # fastai's to_detach/maybe_gather all_gather whenever WORLD_SIZE > 1, which would now fail, but rank 0
        # no longer calls them: it predicts with score.predict.predict_split (its own loop, not get_preds or
        # validate), and fastai's other readers (Learner.save/load, distrib_barrier) run inside the fit or check
        # RANK and dist.is_initialized(). tests/test_train.py's torchrun test (with --tta) runs this path.
        dist.barrier()
        dist.destroy_process_group()
    return result, ckpt.rows


def write_history(s: Setup, learn, rows: list[dict]) -> pd.DataFrame:
    """history.csv from the epoch checkpoint's rows (every epoch, also those of an interrupted process): epoch
    (counted from 1, as the progress lines and metrics.json count; fastai's Recorder counts from 0), train loss,
    valid loss, per-target RMSE, seconds, images/s; loss.png."""
    hist = pd.DataFrame(rows)
    hist["epoch"] = hist["epoch"].astype(int) + 1
    write_bytes_atomic(s.out / "history.csv", hist.to_csv(index=False).encode())
    rec, n_it = learn.recorder, len(learn.dls.train)
    loss_curves(np.arange(len(rec.losses)), [float(v) for v in rec.losses],
                [(i + 1) * n_it for i in range(len(hist))], hist[s.monitor].values, s.out / "loss.png",
                title=f"{s.cfg.arch}, {s.cfg.epochs} epochs, lr {s.cfg.lr:g}, bs {s.cfg.bs}",
                loss_name="Gaussian NLL" if s.cfg.head == "gaussian" else "RMSE")
    return hist


def predict_valid(s: Setup, learn, dls) -> pd.DataFrame:
    """The validation set's predictions in file order through score.predict.predict_split, the path `fastgal
    predict` takes (computed as training computed: its precision and memory format); writes
    predictions_valid.csv: id, true_<t>, pred_<t>, and sigma_<t>, pred_tta_<t>, sigma_tta_<t> where they exist."""
    forward = inference(learn.model.eval(), {"precision": s.precision, "channels_last": _channels_last(s)}, s.device)
    v = dls.valid  # all of validation (with --interval, dls.valid is the part outside the calibration part)
    df = predict_split(forward, s.shards.split("valid"), v.geometry, s.targets, bs=s.cfg.bs, device=s.device, backend=v.backend,
                       threads=v.threads, tta=s.cfg.tta)
    write_bytes_atomic(s.out / "predictions_valid.csv", df.to_csv(index=False, float_format="%.5f").encode())
    return df


def score(s: Setup, df: pd.DataFrame) -> dict:
    """Per-target metrics and diagnostics (diagnostics.py: bias and scatter in bins, outliers, and the
    mass-metallicity relation when the shards' catalog rows carry --mass-col); the PNGs."""
    mass = s.shards.split("valid").column(s.cfg.mass_col) if s.cfg.mass_col else None
    has_mass = mass is not None and np.isfinite(mass).sum() > 10
    per_target, curves = {}, {}
    for j, t in enumerate(s.targets):
        true, pred = df[f"true_{t}"].to_numpy(), df[f"pred_{t}"].to_numpy()
        sigma, tta, sigma_tta = (df[f"{c}_{t}"].to_numpy() if f"{c}_{t}" in df else None
                                 for c in ("sigma", "pred_tta", "sigma_tta"))
        # the scores `fastgal predict` reports too (one function, the same keys)
        m = target_scores(true, pred, pred_tta=tta, sigma=sigma, sigma_tta=sigma_tta,
                          mass=mass if has_mass and j == 0 else None, train_mean=s.target_mean[j])
        if tta is not None:
            curves[f"{t}: TTA spread"] = np.abs(tta - true) / sigma_tta
        if sigma is not None:
            curves[f"{t}: model sigma"] = np.abs(pred - true) / sigma
        per_target[t] = m
        suffix = "" if j == 0 else f"_{t}"
        pred_vs_true(true, pred, s.out / f"pred_vs_true{suffix}.png", name=t,
                     stats={"RMSE": m["rmse"], "NMAD": m["nmad"], "baseline": m["baseline_rmse"]})
        residuals(true, pred, s.out / f"residuals{suffix}.png", name=t)
        if "mzr" in m:
            mzr_plot(mass, true, pred, m["mzr"], s.out / "mzr.png")
    if curves:
        coverage_plot(curves, s.out / "coverage.png")
    return per_target


def _channels_last(s: Setup) -> bool:
    return s.cfg.channels_last and s.device.type == "cuda"


def save_model(s: Setup, learn, dls) -> None:
    sh, g = s.shards, dls.train.geometry  # the normalisation the model was trained with (the stretched bands')
    save_checkpoint(s.out / "model.pt", learn.model, arch=s.cfg.arch, targets=s.targets, target_mean=s.target_mean,
                    target_std=s.target_std, pixel_mean=list(g.mean), pixel_std=list(g.std), size=s.cfg.size,
                    crop=s.crop, precrop=sh.precrop, image_size=sh.image_size, precision=s.precision,
                    channels_last=_channels_last(s), head=s.cfg.head, **image_meta(sh, g))


def train(cfg: TrainConfig, cbs=()) -> dict:
    """Train on cfg.shards, write the run folder, return metrics.json's content ({} on ranks > 0).
    cbs: fastai callbacks added to the Learner."""
    t_start = time.perf_counter()
    with contextlib.ExitStack() as claim:  # the run folder is this command's until it returns or fails
        return _train(cfg, claim, t_start, cbs)


def _train(cfg: TrainConfig, claim: contextlib.ExitStack, t_start: float, cbs) -> dict:
    s = setup(cfg, claim)
    dls = build_loaders(s)
    config = write_config(s, dls)
    if s.writer:
        Progress(quiet=s.cfg.quiet).line(preset_line(s))  # settings checked, loaders built: what it will train
    learn = build_learner(s, dls)
    learn.add_cbs(list(cbs))
    fitted, rows = fit(s, learn)
    if not s.writer:
        return {}
    hist = write_history(s, learn, rows)
    preds = predict_valid(s, learn, dls)
    per_target = score(s, preds)
    save_model(s, learn, dls)
    conformal = conformal_intervals(s, preds) if s.cfg.interval is not None else None
    t0 = s.targets[0]
    metrics = {
        **{k: v for k, v in per_target[t0].items() if not isinstance(v, (list, dict))}, "target": t0, "targets": per_target, "head": s.cfg.head,
        "floor": synth_floor(s.shards.manifest), "preset": s.cfg.preset, "arch": s.cfg.arch,
        "compile": s.cfg.compile and s.cfg.compile_mode, "epochs": s.cfg.epochs,
        "best_epoch": int(hist["epoch"].iloc[int(np.argmin(hist[s.monitor].values))]),  # counted from 1
        "fit_seconds": round(float(hist["seconds"].sum()), 2),  # every epoch's, whichever process ran it
        "n_train": len(dls.train.split), "n_valid": len(preds),
        **fitted, "wall_seconds": round(time.perf_counter() - t_start, 2),
        "train_images_per_s": round(float(hist["images_per_s"].mean()) * s.world, 2),  # all ranks together
        "world_size": s.world, "steps_per_epoch": len(dls.train),
        "device": str(s.device), "precision": s.precision, "loader_backend": config["loader_backend"],
        "loader_decode": config["loader_decode"],
        **({"conformal": conformal} if conformal else {}),
    }
    write_json_atomic(s.out / "metrics.json", metrics)
    for done in (CHECKPOINT, "best.pth"):  # the run is finished: model.pt holds the best weights
        (s.out / done).unlink(missing_ok=True)
    write_run_report(s)
    return metrics


def conformal_intervals(s: Setup, df: pd.DataFrame) -> dict:
    """--interval: calibration.json beside model.pt, the intervals in predictions_valid.csv (rewritten, with a
    `part` column: calibration or test), interval_coverage.png; returns metrics.json's "conformal" block."""
    from fastgal.score.conformal import conformal_run, parse_levels

    # --interval-by mass: setup's check_settings made sure the rows have it
    mass = s.shards.split("valid").column(s.cfg.mass_col) if s.cfg.interval_by == "mass" else None
    df, block = conformal_run(df, s.out, s.targets, parse_levels(s.cfg.interval), calib_pct=s.cfg.calib_pct,
                              by=s.cfg.interval_by, n_bins=s.cfg.interval_bins, mass=mass, mass_col=s.cfg.mass_col)
    write_bytes_atomic(s.out / "predictions_valid.csv", df.to_csv(index=False, float_format="%.5f").encode())
    return block


def write_run_report(s: Setup) -> None:
    """report.html, last: the run is finished and kept whatever happens here, so a failure is a warning line
    (`fastgal report` rebuilds the page), never a failed run."""
    try:
        write_report(s.out, shards=s.shards)
    except Exception as e:  # noqa: BLE001 - the run is done; the page is a view of it
        Progress().line(f"fastgal: warning: {s.out / REPORT} not written ({type(e).__name__}: {e}); "
                        f"`fastgal report {s.out}` rebuilds it")
