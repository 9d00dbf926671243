"""A trained run applied to new data: shards or a folder of JPEG cutouts -> a catalog of predictions.

    fastgal predict runs/r1 shards/synth --split valid --out preds.csv
    fastgal predict runs/r1 data/new/images --out preds.csv --tta

The run's model.pt carries everything needed: architecture, target names and scaling, the
training pixel statistics (inputs are normalised with those, never with the new data's), and
the crop geometry. Shards go through the same DALI valid/tta graphs as training; a JPEG folder
goes through the torch path with the same centre crops. Every input ends up in the output:
JPEGs that cannot be used get a row with an empty prediction and the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .config import PredictConfig
from .learner import make_model
from .loaders import _loader_cls, transform
from .pipeline import PipeSpec
from .shards import load_manifest, shard_files
from .train import MODEL_FORMAT, resolve_device
from .util import default_workers, write_bytes_atomic


def load_run(run: Path, device) -> tuple[torch.nn.Module, dict]:
    path = Path(run) / "model.pt" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise ValueError(f"no model.pt in {run}; point at a finished `fastgal train` run folder")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != MODEL_FORMAT:
        raise ValueError(f"{path} is not a fastgal model (format {ckpt.get('format_version') if isinstance(ckpt, dict) else None}); "
                         f"this fastgal reads format {MODEL_FORMAT}")
    model = make_model(ckpt["arch"], len(ckpt["targets"]), ckpt["target_mean"], ckpt["target_std"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt


@torch.no_grad()
def _run(model, batches, device) -> np.ndarray:
    out = []
    for x, *_ in batches:
        out.append(model(x.to(device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def _spec(ckpt: dict, kind: str, tars, idxs, precropped: bool, bs: int, device, threads: int, manifest=None) -> PipeSpec:
    return PipeSpec(
        kind=kind, tars=tars, idxs=idxs, mean=ckpt["pixel_mean"], std=ckpt["pixel_std"],
        n_targets=len(manifest["targets"]) if manifest else len(ckpt["targets"]),
        target_ext=manifest["components"]["targets"] if manifest else "target.f32",
        batch_size=bs, size=ckpt["size"], crop=ckpt.get("precrop") or ckpt["crop"], precropped=precropped,
        device="gpu" if device.type == "cuda" else "cpu", device_id=(device.index or 0) if device.type == "cuda" else None,
        num_threads=threads,
    )


def predict_shards(cfg: PredictConfig, model, ckpt, device) -> pd.DataFrame:
    from .train import valid_ids

    manifest = load_manifest(cfg.input)
    if list(manifest["image"]["size"]) != list(ckpt["image_size"]) or manifest["image"].get("precrop") != ckpt.get("precrop"):
        raise ValueError(f"{cfg.input} holds {manifest['image']['size']} px images (precrop {manifest['image'].get('precrop')}) "
                         f"but the model was trained on {ckpt['image_size']} (precrop {ckpt.get('precrop')}); re-shard to match")
    splits = ["train", "valid"] if cfg.split == "all" else [cfg.split]
    cls = _loader_cls(cfg.loader)
    threads = cfg.workers or default_workers()
    pre = bool(manifest["image"].get("precrop"))
    frames = []
    for split in splits:
        tars, idxs = shard_files(cfg.input, manifest, split)
        n = manifest["counts"][split]
        if n == 0:
            continue
        dl = cls(_spec(ckpt, "valid", tars, idxs, pre, cfg.bs, device, threads, manifest), n, device, drop_last=False)
        xs_pred, ys = [], []
        with torch.no_grad():
            for x, y in dl:
                xs_pred.append(model(x).float().cpu())
                ys.append(y.float().cpu())
        pred, ys = torch.cat(xs_pred).numpy(), torch.cat(ys).numpy()
        df = pd.DataFrame({"id": valid_ids(dl), "split": split})
        for j, t in enumerate(manifest["targets"]):
            df[f"true_{t}"] = ys[:, j]
        for j, t in enumerate(ckpt["targets"]):
            df[f"pred_{t}"] = pred[:, j]
        if cfg.tta:
            views = []
            for v in range(8):
                spec = _spec(ckpt, "tta", tars, idxs, pre, cfg.bs, device, threads, manifest)
                spec.tta_view = v
                views.append(_run(model, cls(spec, n, device, drop_last=False), device))
            tta = np.mean(views, axis=0)
            for j, t in enumerate(ckpt["targets"]):
                df[f"pred_tta_{t}"] = tta[:, j]
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


class _Files(torch.utils.data.Dataset):
    """JPEG files -> (tensor, index); unusable files give a zero tensor and are reported."""

    def __init__(self, files, spec: PipeSpec, image_size):
        self.files, self.spec, self.image_size = files, spec, list(image_size)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from torchvision.io import ImageReadMode, decode_jpeg

        shape = (3, self.spec.size, self.spec.size)
        try:
            data = Path(self.files[i]).read_bytes()
            if not data.startswith(b"\xff\xd8"):
                return torch.zeros(shape), i, "not-jpeg"
            img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except Exception as e:  # corrupt/truncated data: report it, keep going
            return torch.zeros(shape), i, f"corrupt-image: {str(e).splitlines()[0][:80]}"
        if list(img.shape[1:]) != self.image_size:
            return torch.zeros(shape), i, f"wrong-size: {img.shape[2]}x{img.shape[1]}, model expects {self.image_size[1]}x{self.image_size[0]}"
        return transform(img, self.spec), i, ""


def predict_images(cfg: PredictConfig, model, ckpt, device) -> pd.DataFrame:
    files = sorted(p for p in Path(cfg.input).iterdir() if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise ValueError(f"no .jpg files in {cfg.input}; give a folder of cutouts or a shard folder")
    views = range(8) if cfg.tta else [None]
    threads = cfg.workers or default_workers()
    preds, status = [], [""] * len(files)
    for v in views:
        spec = _spec(ckpt, "valid" if v is None else "tta", [], [], False, cfg.bs, torch.device("cpu"), threads)
        if v is not None:
            spec.tta_view = v
        dl = torch.utils.data.DataLoader(_Files(files, spec, ckpt["image_size"]), batch_size=cfg.bs, num_workers=min(threads, 4))
        out = []
        with torch.no_grad():
            for x, idx, why in dl:
                out.append(model(x.to(device)).float().cpu())
                for k, w in zip(idx.tolist(), why):
                    status[k] = w
        preds.append(torch.cat(out).numpy())
    pred = np.mean(preds, axis=0)
    df = pd.DataFrame({"id": [p.stem for p in files], "file": [str(p) for p in files]})
    bad = np.array([bool(s) for s in status])
    for j, t in enumerate(ckpt["targets"]):
        col = pred[:, j].astype(np.float64)
        col[bad] = np.nan
        df[f"pred{'_tta' if cfg.tta else ''}_{t}"] = col
    df["status"] = ["ok" if not s else s.split(":")[0] for s in status]
    df["reason"] = [s.split(": ", 1)[1] if ": " in s else "" for s in status]
    return df


def predict(cfg: PredictConfig) -> tuple[pd.DataFrame, Path]:
    if cfg.split not in ("valid", "train", "all"):
        raise ValueError(f"--split must be valid, train or all, got {cfg.split!r}")
    device = resolve_device(cfg.device)
    model, ckpt = load_run(cfg.run, device)
    inp = Path(cfg.input)
    if not inp.is_dir():
        raise ValueError(f"{inp} is not a folder; give a shard folder (with manifest.json) or a folder of .jpg cutouts")
    df = predict_shards(cfg, model, ckpt, device) if (inp / "manifest.json").exists() else predict_images(cfg, model, ckpt, device)
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / f"predictions_{inp.resolve().name}.csv"
    write_bytes_atomic(out, df.to_csv(index=False, float_format="%.5f").encode())
    return df, out
