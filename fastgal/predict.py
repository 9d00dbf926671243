"""A trained run applied to new data: shards or a folder of JPEG cutouts -> a catalog of predictions.

    fastgal predict runs/r1 shards/synth --split valid --out preds.csv
    fastgal predict runs/r1 data/new/images --out preds.csv --tta

The run's model.pt carries everything needed: architecture, target names and scaling, the
training pixel statistics (inputs are normalised with those, never with the new data's), and
the crop geometry. Shards go through the same DALI valid/tta graphs as training; a JPEG folder
goes through the torch path with the same centre crops. Every input ends up in the output:
JPEGs that cannot be used get a row with an empty prediction and the reason.

Uncertainties: a gaussian-head model adds sigma_<t>, its σ for the prediction beside it (for a JPEG
folder with --tta, the mean over the 8 views of the σ each view got). --tta adds sigma_tta_<t>, the
spread of the 8 views' predictions, for either head. On shards (which know the truth) diagnose()
reports the calibration of each.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from .config import PredictConfig
from .diagnostics import calibration, summarise
from .heads import split, view_stats
from .learner import inference, load_checkpoint, resolve_device
from .loaders import loader_for, thread_budget, transform, tta_loaders, worker_context
from .pipeline import PipeSpec
from .manifest import index_keys, load_manifest
from .util import jpeg_problem, write_bytes_atomic


def _run(forward, batches) -> tuple[np.ndarray, np.ndarray]:
    """(model outputs, targets) over a loader."""
    preds, ys = [], []
    for x, y in batches:
        preds.append(forward(x).cpu())
        ys.append(y.float().cpu())
    return torch.cat(preds).numpy(), torch.cat(ys).numpy()


def predict_shards(cfg: PredictConfig, forward, ckpt, device) -> pd.DataFrame:
    manifest = load_manifest(cfg.input)
    if list(manifest["image"]["size"]) != list(ckpt["image_size"]) or manifest["image"].get("precrop") != ckpt.get("precrop"):
        raise ValueError(f"{cfg.input} holds {manifest['image']['size']} px images (precrop {manifest['image'].get('precrop')}) "
                         f"but the model was trained on {ckpt['image_size']} (precrop {ckpt.get('precrop')}); re-shard to match")
    splits = ["train", "valid"] if cfg.split == "all" else [cfg.split]
    frames, k = [], len(ckpt["targets"])
    for part in splits:
        if manifest["counts"][part] == 0:
            continue
        # the eval graph over this split, normalised with the model's training statistics
        dl = loader_for(cfg.input, manifest, part, kind="valid", bs=cfg.bs, size=ckpt["size"], crop=ckpt["crop"],
                        device=device, backend=cfg.loader, num_threads=thread_budget(cfg.workers),
                        mean=ckpt["pixel_mean"], std=ckpt["pixel_std"])
        out, ys = _run(forward, dl)
        df = pd.DataFrame({"id": index_keys(dl.spec.idxs), "split": part})
        for j, t in enumerate(manifest["targets"]):
            df[f"true_{t}"] = ys[:, j]
        cols = dict(zip(("pred", "sigma"), split(out, k)))
        if cfg.tta:
            cols["pred_tta"], cols["sigma_tta"] = view_stats([split(_run(forward, v)[0], k)[0] for v in tta_loaders(dl)])
        _add_columns(df, cols, ckpt["targets"])
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _add_columns(df: pd.DataFrame, cols: dict, targets: list[str], bad=None) -> None:
    """{"pred": (N, k), "sigma": ... or None, ...} -> df columns pred_<t>, sigma_<t>, ... (NaN where bad)."""
    for name, a in cols.items():
        if a is None:
            continue
        for j, t in enumerate(targets):
            col = a[:, j].astype(np.float64)
            if bad is not None:
                col[bad] = np.nan
            df[f"{name}_{t}"] = col


class _Files(torch.utils.data.Dataset):
    """JPEG files -> (views, index, why): each file is decoded once and transformed into every view
    (1, or the 8 dihedral ones for TTA); unusable files give zeros and the reason."""

    def __init__(self, files, specs: list[PipeSpec], image_size):
        self.files, self.specs, self.image_size = files, specs, list(image_size)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        s = self.specs[0].size
        zeros = torch.zeros(len(self.specs), 3, s, s)
        try:
            data = Path(self.files[i]).read_bytes()
            bad = jpeg_problem(data, require_eoi=True)  # a download cut short is not a cutout
            if bad:
                return zeros, i, f"{bad[0]}: {bad[1]}"
            img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except Exception as e:  # corrupt/truncated data: report it, keep going
            return zeros, i, f"corrupt-image: {str(e).splitlines()[0][:80]}"
        if list(img.shape[1:]) != self.image_size:
            return zeros, i, f"wrong-size: {img.shape[2]}x{img.shape[1]}, model expects {self.image_size[1]}x{self.image_size[0]}"
        return torch.stack([transform(img, sp) for sp in self.specs]), i, ""


def predict_images(cfg: PredictConfig, forward, ckpt, device) -> pd.DataFrame:
    files = sorted(p for p in Path(cfg.input).iterdir() if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise ValueError(f"no .jpg files in {cfg.input}; give a folder of cutouts or a shard folder")
    base = PipeSpec(kind="valid", tars=[], idxs=[], mean=ckpt["pixel_mean"], std=ckpt["pixel_std"],
                    size=ckpt["size"], crop=ckpt.get("precrop") or ckpt["crop"])
    specs = [replace(base, kind="tta", tta_view=v) for v in range(8)] if cfg.tta else [base]
    workers = min(thread_budget(cfg.workers), 4)
    dl = torch.utils.data.DataLoader(_Files(files, specs, ckpt["image_size"]), batch_size=cfg.bs, num_workers=workers,
                                     **worker_context(device, workers))
    k, status = len(ckpt["targets"]), [""] * len(files)
    parts: dict[str, list] = {"pred": [], "sigma": [], "sigma_tta": []}
    for x, idx, why in dl:
        b, v = x.shape[:2]
        mu, sigma = split(forward(x.flatten(0, 1).to(device)).view(b, v, -1), k)  # (b, views, k)
        parts["pred"].append(mu.mean(1))  # mean over views
        parts["sigma"].append(sigma.mean(1) if sigma is not None else None)
        parts["sigma_tta"].append(mu.std(1) if cfg.tta else None)
        for i, w in zip(idx.tolist(), why):
            status[i] = w
    # with --tta the 8 views' mean is the only prediction here: pred_tta_<t>
    cols = {("pred_tta" if n == "pred" and cfg.tta else n): np.concatenate(a) if a[0] is not None else None
            for n, a in parts.items()}
    df = pd.DataFrame({"id": [p.stem for p in files], "file": [str(p) for p in files]})
    _add_columns(df, cols, ckpt["targets"], bad=np.array([bool(s) for s in status]))
    df["status"] = ["ok" if not s else s.split(":")[0] for s in status]
    df["reason"] = [s.split(": ", 1)[1] if ": " in s else "" for s in status]
    return df


def diagnose(df: pd.DataFrame) -> dict:
    """Where the input knew the truth (shards): diagnostics.summarise per target, of the TTA prediction
    when there is one; the calibration of sigma_<t> (against pred_<t>) and of sigma_tta_<t> (against
    pred_tta_<t>) where the model or --tta gave them."""
    out = {}
    for c in [c for c in df.columns if c.startswith("true_")]:
        t = c[5:]
        p = f"pred_tta_{t}" if f"pred_tta_{t}" in df else f"pred_{t}"
        if p not in df:
            continue
        true = df[c].to_numpy()
        out[t] = {"prediction": p, **summarise(true, df[p].to_numpy())}
        for key, pc, sc in (("calibration", f"pred_{t}", f"sigma_{t}"), ("tta_calibration", f"pred_tta_{t}", f"sigma_tta_{t}")):
            if pc in df and sc in df:
                out[t][key] = calibration(true, df[pc].to_numpy(), df[sc].to_numpy())
    return out


def predict(cfg: PredictConfig) -> tuple[pd.DataFrame, Path]:
    if cfg.split not in ("valid", "train", "all"):
        raise ValueError(f"--split must be valid, train or all, got {cfg.split!r}")
    device = resolve_device(cfg.device)
    model, ckpt = load_checkpoint(cfg.run, device)
    forward = inference(model, ckpt, device)  # the training precision and memory format on a GPU
    inp = Path(cfg.input)
    if not inp.is_dir():
        raise ValueError(f"{inp} is not a folder; give a shard folder (with manifest.json) or a folder of .jpg cutouts")
    df = predict_shards(cfg, forward, ckpt, device) if (inp / "manifest.json").exists() else predict_images(cfg, forward, ckpt, device)
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / f"predictions_{inp.resolve().name}.csv"
    write_bytes_atomic(out, df.to_csv(index=False, float_format="%.5f").encode())
    return df, out
