"""Fit orchestration and the run folder: the seed recipe on fastgal shards.

    fastgal train shards/synth --out runs/r1 --epochs 7 --lr 1e-2 --bs 128 --lr-find --tta

Run folder (metrics.json is written last: its presence means the run finished):
    config.json            final settings, versions, device, backend
    history.csv            per epoch: train loss, valid loss, valid RMSE per target, seconds, images/s
    loss.png, lr_find.png  (lr_find.png with --lr-find; the suggested lr is printed)
    show_batch.png         a training batch as the model sees it (denormalised)
    model.pt               weights + what predict needs (arch, targets, target/pixel stats, crops, format)
    predictions_valid.csv  id, true_<t>, pred_<t> (and pred_tta_<t> with --tta)
    pred_vs_true.png       with the 1:1 line and RMSE/NMAD
    metrics.json           RMSE, NMAD, bias, R2, TTA RMSE, predict-the-training-mean RMSE, timings

Distributed: launched by `torchrun --nproc_per_node=K -m fastgal train ...`, each rank reads its part
of the training shards (DALI shard_id/num_shards) and trains a DistributedDataParallel model (the DDP
callback in learner.py); every rank validates on all of the validation set; rank 0 writes the run folder.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import __version__
from .config import TrainConfig, to_jsonable
from .util import default_workers, write_bytes_atomic, write_json_atomic

MODEL_FORMAT = 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA GPU is visible to torch; use --device cpu or auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"--precision must be auto, bf16, fp16 or fp32, got {name!r}")
    if name != "fp32" and device.type != "cuda":
        raise ValueError(f"--precision {name} needs a GPU; use fp32 (or auto) on the CPU")
    return name


def regression_metrics(true: np.ndarray, pred: np.ndarray) -> dict:
    d = pred - true
    ss_res = float(np.sum(d**2))
    ss_tot = float(np.sum((true - true.mean()) ** 2))
    return {
        "rmse": float(np.sqrt(np.mean(d**2))),
        "nmad": float(1.4826 * np.median(np.abs(d - np.median(d)))),
        "bias": float(np.mean(d)),
        "r2": float(1 - ss_res / ss_tot) if ss_tot > 0 else float("nan"),
    }


def synth_floor(manifest: dict) -> dict | None:
    """The survey's accuracy floor when the shards were made from `fastgal synth` output."""
    cat = Path(manifest.get("source", {}).get("catalog", ""))
    meta = cat.parent.parent / "synth.json"
    if meta.is_file():
        try:
            return json.loads(meta.read_text())["floor"]
        except (ValueError, KeyError):
            return None
    return None


def _distributed() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def default_run_dir(shards: Path) -> Path:
    return Path("runs") / f"{Path(shards).resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(cfg: TrainConfig) -> dict:
    """Train on cfg.shards, write the run folder, return metrics.json's content."""
    from fastai.torch_core import set_seed

    from .learner import best_epoch_callback, make_learner
    from .loaders import make_dls, tta_loaders
    from .plots import loss_curves, lr_find_plot, pred_vs_true
    from .shards import index_keys, load_manifest, training_crop

    t_start = time.perf_counter()
    manifest = load_manifest(Path(cfg.shards))  # one-line ValueError on a bad folder
    all_targets = list(manifest["targets"])
    targets = cfg.targets or all_targets
    missing = [t for t in targets if t not in all_targets]
    if missing:
        raise ValueError(f"target {missing[0]!r} is not in {cfg.shards}/manifest.json (it has {', '.join(all_targets)})")
    if targets != all_targets:
        # the shards hold every target in one float32 vector; training on a subset needs new shards
        raise ValueError(f"--target must list the manifest's targets in order ({', '.join(all_targets)}); "
                         "re-shard with only the targets you want")
    if cfg.epochs < 1 or cfg.bs < 1 or cfg.lr <= 0:
        raise ValueError("--epochs and --bs must be positive and --lr > 0")
    crop = training_crop(manifest, cfg.crop)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    rank, world = _distributed()
    if world > 1:
        if cfg.lr_find:
            raise ValueError("--lr-find runs in a single process; run it without torchrun first")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        import torch.distributed as dist

        if not dist.is_initialized():  # torchrun sets MASTER_ADDR/PORT, RANK, WORLD_SIZE
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    out = Path(cfg.out) if cfg.out else default_run_dir(cfg.shards)
    if rank == 0:
        if (out / "config.json").exists() and not cfg.overwrite:
            raise ValueError(f"{out} already holds a run; pass --overwrite or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").unlink(missing_ok=True)  # a stale "finished" marker must not survive a re-run

    set_seed(cfg.seed)
    threads = cfg.workers or default_workers()
    dls = make_dls(cfg.shards, bs=cfg.bs, size=cfg.size, crop=crop, device=device, backend=cfg.loader,
                   num_threads=threads, seed=cfg.seed, shard_id=rank, num_shards=world, path=out, manifest=manifest,
                   shard_valid=False)
    backend = type(dls.train).__name__
    tstats = manifest["target_stats"]
    mean = [tstats[t]["mean"] for t in targets]
    std = [tstats[t]["std"] or 1.0 for t in targets]

    config = {
        **to_jsonable(cfg), "crop": crop, "out": str(out), "targets": targets, "device": str(device), "precision": precision,
        "loader_backend": backend, "loader_threads": threads, "world_size": world,
        "n_train": manifest["counts"]["train"], "n_valid": manifest["counts"]["valid"],
        "versions": _versions(), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "recipe": "xresnet(n_out, sa=True, act_cls=Mish) + ranger + RMSE loss, fit_one_cycle; "
                  "CropPad 144 -> RandomCrop 112 -> dihedral + rotate 10 deg (p=0.75) -> Normalize",
    }
    if rank == 0:
        write_json_atomic(out / "config.json", config)
        dls.train.show_batch(max_n=16, path=out / "show_batch.png", target_names=targets)

    learn = make_learner(dls, arch=cfg.arch, targets=targets, target_mean=mean, target_std=std, path=out,
                         precision=precision, channels_last=cfg.channels_last and device.type == "cuda",
                         quiet=cfg.quiet or rank != 0, writer=rank == 0)
    monitor = f"rmse_{targets[0]}"
    result: dict = {}
    # on every rank: fastai saves on rank 0 only, and its load() after fit is a collective barrier
    fit_cbs = [best_epoch_callback(monitor)]
    if world > 1:
        from .learner import DDP

        learn.add_cb(DDP(device))
    if cfg.lr_find:
        sug = learn.lr_find(show_plot=False, num_it=cfg.lr_find_iters)
        result["lr_find_suggested"] = float(sug.valley)
        if rank == 0:
            rec = learn.recorder
            lr_find_plot(rec.lrs, [float(v) for v in rec.losses], float(sug.valley), out / "lr_find.png")
        if not cfg.quiet:
            print(f"lr_find: suggested lr (valley) {sug.valley:.2e}; training with --lr {cfg.lr:g}", file=sys.stderr)
    t_fit = time.perf_counter()
    learn.fit_one_cycle(cfg.epochs, cfg.lr, cbs=fit_cbs)
    fit_seconds = time.perf_counter() - t_fit
    if world > 1:
        import torch.distributed as dist

        # Training is the only collective part. Rank 0 predicts and writes the run folder alone;
        # fastai decides whether to all_gather predictions from WORLD_SIZE, so say so there too.
        dist.barrier()
        dist.destroy_process_group()
        os.environ["WORLD_SIZE"] = "1"
    if rank != 0:
        return {}

    rec = learn.recorder
    # history.csv: fastai's CSVLogger rows + our per-epoch seconds and images/s
    raw = out / "history_raw.csv"
    hist = pd.read_csv(raw)
    raw.unlink(missing_ok=True)
    hist = hist[[c for c in hist.columns if c != "time"]]
    hist["epoch"] = range(len(hist))
    es = pd.DataFrame(learn.epoch_stats.rows[-len(hist):])
    hist["seconds"], hist["images_per_s"] = es["seconds"].values, es["images_per_s"].values
    write_bytes_atomic(out / "history.csv", hist.to_csv(index=False).encode())
    n_it = len(dls.train)
    loss_curves(np.arange(len(rec.losses)), [float(v) for v in rec.losses],
                [(i + 1) * n_it for i in range(len(hist))], hist[monitor].values, out / "loss.png",
                title=f"{cfg.arch}, {cfg.epochs} epochs, lr {cfg.lr:g}, bs {cfg.bs}")

    # predictions on the validation set in file order (+ the 8 dihedral views with --tta)
    vdl = dls.valid.new(shuffle=False, drop_last=False)
    preds, targs = learn.get_preds(dl=vdl)
    preds, targs = preds.float().numpy(), targs.float().numpy()
    ids = index_keys(vdl.spec.idxs)
    if len(ids) != len(preds):
        raise RuntimeError(f"{len(preds)} predictions for {len(ids)} validation ids: shards and index disagree")
    table = {"id": ids}
    tta_preds = None
    if cfg.tta:
        views = [learn.get_preds(dl=d)[0].float().numpy() for d in tta_loaders(dls.valid)]
        tta_preds = np.mean(views, axis=0)
    for j, t in enumerate(targets):
        table[f"true_{t}"] = targs[:, j]
        table[f"pred_{t}"] = preds[:, j]
        if tta_preds is not None:
            table[f"pred_tta_{t}"] = tta_preds[:, j]
    write_bytes_atomic(out / "predictions_valid.csv", pd.DataFrame(table).to_csv(index=False, float_format="%.5f").encode())

    per_target = {}
    for j, t in enumerate(targets):
        m = regression_metrics(targs[:, j], preds[:, j])
        m["baseline_rmse"] = float(np.sqrt(np.mean((targs[:, j] - mean[j]) ** 2)))  # predict the training mean
        if tta_preds is not None:
            m["tta_rmse"] = float(np.sqrt(np.mean((tta_preds[:, j] - targs[:, j]) ** 2)))
        per_target[t] = m
        pred_vs_true(targs[:, j], preds[:, j], out / ("pred_vs_true.png" if j == 0 else f"pred_vs_true_{t}.png"), name=t,
                     stats={"RMSE": m["rmse"], "NMAD": m["nmad"], "baseline": m["baseline_rmse"]})

    weights = {
        "format_version": MODEL_FORMAT, "fastgal_version": __version__, "arch": cfg.arch, "targets": targets,
        "target_mean": mean, "target_std": std, "pixel_mean": manifest["pixel_stats"]["mean"],
        "pixel_std": manifest["pixel_stats"]["std"], "size": cfg.size, "crop": crop,
        "precrop": manifest["image"].get("precrop"), "image_size": manifest["image"]["size"],
        "state_dict": {k: v.detach().cpu() for k, v in learn.model.state_dict().items()},
    }
    _save_torch_atomic(weights, out / "model.pt")
    (out / "best.pth").unlink(missing_ok=True)  # SaveModelCallback's copy; model.pt holds the same weights

    t0 = targets[0]
    best = int(np.argmin(hist[monitor].values))
    metrics = {
        **per_target[t0], "target": t0, "targets": per_target,
        "floor": synth_floor(manifest), "epochs": cfg.epochs, "best_epoch": best,
        "n_train": manifest["counts"]["train"], "n_valid": len(ids),
        "fit_seconds": round(fit_seconds, 2), "wall_seconds": round(time.perf_counter() - t_start, 2),
        "train_images_per_s": round(float(hist["images_per_s"].mean()) * world, 2),  # all ranks together
        "world_size": world, "steps_per_epoch": len(dls.train),
        "device": str(device), "precision": precision, "loader_backend": backend, **result,
    }
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def _save_torch_atomic(obj, path: Path) -> None:
    from .util import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _versions() -> dict:
    v = {"fastgal": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for mod in ("fastai", "nvidia.dali", "webdataset", "torchvision", "numpy"):
        try:
            v[mod] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception:
            v[mod] = None
    return v

