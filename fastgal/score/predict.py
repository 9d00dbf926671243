"""A trained model applied to data: a shard split or a folder of cutouts (JPEG, or FITS bands for a model
trained on them) -> a table of predictions.

    fastgal predict runs/r1 shards/synth --split valid --out preds.csv
    fastgal predict runs/r1 data/new/images --out preds.csv --tta

`predict_split` is the one prediction path over shards: `fastgal train` calls it for the validation set
(predictions_valid.csv) and `fastgal predict` for any split, so both compute the same numbers the same
way. The run's model.pt carries everything needed: architecture, target names and scaling, the
training pixel statistics (inputs are normalised with those, never with the new data's), and the crop
geometry. A folder of cutouts goes through the torch loader's decode and transform (geometry.transform_batch)
with the same views. Every input ends up in the output: files that cannot be used get a row with an empty
prediction and the reason.

Columns: id, then per target true_<t> (shards), pred_<t>, sigma_<t> (a gaussian-head model's σ; for a
JPEG folder with --tta the mean over the 8 views of each view's σ), pred_tta_<t> and sigma_tta_<t>
(--tta: the mean and spread of the 8 dihedral views' predictions, for either head).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fastgal.load.decode import decode_batch
from fastgal.load.geometry import (
    CENTRE,
    TTA_VIEWS,
    Geometry,
    transform_batch,
)
from fastgal.load.loader import Loader, thread_budget
from fastgal.load.preprocess import geometry_for
from fastgal.options import PredictConfig
from fastgal.score.diagnostics import target_scores
from fastgal.shards.cutouts import ImageRules, check_image
from fastgal.shards.fits import sample_bands
from fastgal.shards.folder import files_of, kinds, nested_problem, shard_files
from fastgal.shards.read import Shards, Split
from fastgal.shards.stage import local
from fastgal.train.checkpoints import inference, load_checkpoint
from fastgal.train.device import resolve_device
from fastgal.train.heads import split_outputs, view_stats
from fastgal.util import Progress, check_writable, write_bytes_atomic

ESTIMATES = ("pred", "sigma", "pred_tta", "sigma_tta")  # the column prefixes, in the order they are written


def _run(forward, batches, progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(model outputs, targets) over a loader."""
    preds, ys = [], []
    for x, y in batches:
        preds.append(forward(x).cpu())
        ys.append(y.float().cpu())
        if progress is not None:
            progress.update(len(y))
    return torch.cat(preds).numpy(), torch.cat(ys).numpy()


def table(ids, targets: list[str], est: dict, true: np.ndarray | None = None, true_names: list[str] | None = None,
          bad=None, **first) -> pd.DataFrame:
    """The predictions table: id, `first` columns, then per target true_<t>, pred_<t>, sigma_<t>,
    pred_tta_<t>, sigma_tta_<t> (those that exist; NaN in the rows marked `bad`). true_names: the true
    values' targets where they are not the model's (their columns then come first)."""
    cols = {"id": list(ids), **first}
    if true is not None and true_names not in (None, targets):
        cols.update({f"true_{t}": true[:, j] for j, t in enumerate(true_names)})
        true = None
    for j, t in enumerate(targets):
        if true is not None:
            cols[f"true_{t}"] = true[:, j]
        for name in ESTIMATES:
            if est.get(name) is not None:
                col = est[name][:, j].astype(np.float64)
                if bad is not None:
                    col[bad] = np.nan
                cols[f"{name}_{t}"] = col
    return pd.DataFrame(cols)


def predict_split(forward, split: Split, geometry: Geometry, targets: list[str], *, bs: int, device, backend: str = "auto",
                  threads: int = 2, tta: bool = False, progress: Progress | None = None) -> pd.DataFrame:
    """Every sample of a split, in file order: forward (x -> model outputs, see train.checkpoints.inference) on the
    centre view, and with tta on the 8 dihedral views; the table with the true values. progress: counts images."""
    dl = Loader(split, CENTRE, geometry, bs=bs, device=device, backend=backend, threads=threads)
    k = len(targets)
    out, true = _run(forward, dl, progress)
    if len(split.keys) != len(out):
        raise RuntimeError(f"{len(out)} predictions for {len(split.keys)} samples in {split.name}: shards and index disagree")
    est = dict(zip(("pred", "sigma"), split_outputs(out, k)))
    if tta:
        est["pred_tta"], est["sigma_tta"] = view_stats([split_outputs(_run(forward, v, progress)[0], k)[0] for v in dl.tta()])
    return table(split.keys, targets, est, true, true_names=split.shards.targets)


def _predict_shards(cfg: PredictConfig, forward, ckpt, device) -> pd.DataFrame:
    shards = Shards(cfg.input)
    if shards.image_size != list(ckpt["image_size"]) or shards.precrop != ckpt.get("precrop"):
        raise ValueError(f"{cfg.input} holds {shards.image_size} px images (precrop {shards.precrop}) "
                         f"but the model was trained on {ckpt['image_size']} (precrop {ckpt.get('precrop')}); re-shard to match")
    kind = ckpt.get("image_kind", "jpeg")
    if shards.kind != kind or (kind == "float" and shards.bands != list(ckpt["bands"])):
        what = lambda k, b: "JPEGs" if k == "jpeg" else f"FITS bands {','.join(b)}"  # noqa: E731
        raise ValueError(f"{cfg.input} holds {what(shards.kind, shards.bands)} but the model was trained on "
                         f"{what(kind, ckpt.get('bands'))}; shard the cutouts as the model's shards were made")
    shards.check_sha256()  # every tar against the manifest before predicting (once per file: then cached)
    # normalised with the model's training statistics (and stretch), cropped as it was trained
    soft = ckpt.get("softening")
    geo = geometry_for(shards, size=ckpt["size"], crop=ckpt["crop"], mean=ckpt["pixel_mean"], std=ckpt["pixel_std"],
                       stretch="asinh" if soft else "auto" if kind == "jpeg" else "none", softening=soft)
    frames, parts = [], (["train", "valid"] if cfg.split == "all" else [cfg.split])
    views = (1 + len(TTA_VIEWS)) if cfg.tta else 1  # the centre, then with --tta the 8 dihedral views
    total = views * sum(len(shards.split(p)) for p in parts)
    with Progress(total, "predict", quiet=cfg.quiet, unit="img") as progress:
        for part in parts:
            sp = shards.split(part)
            if len(sp):
                df = predict_split(forward, sp, geo, list(ckpt["targets"]), bs=cfg.bs, device=device,
                                   backend=cfg.loader, threads=thread_budget(cfg.workers), tta=cfg.tta, progress=progress)
                df.insert(1, "split", part)
                frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _checked(path: Path, rules: ImageRules) -> tuple[np.ndarray | None, str]:
    """One cutout file checked exactly as `fastgal shard` checks it (cutouts.check_image: a full decode, RGB, the
    survey's size or at least the precrop, not blank, the same reasons; FITS: the model's bands, finite,
    storable): (what a shard would store, as the loaders read it: JPEG bytes, the re-encoded centre for a
    --precrop model, or the (bands, H, W) array in the model's storage dtype; "") or (None, "reason: detail")."""
    c = check_image(0, str(path), rules)
    if c.reason:
        return None, f"{c.reason}: {c.detail}"
    if c.meta is not None:
        return np.frombuffer(c.data, "<f2" if c.meta["dtype"] == "float16" else "<f4").reshape(c.meta["shape"]), ""
    return np.frombuffer(c.data, np.uint8), ""


def _predict_images(cfg: PredictConfig, forward, ckpt, device) -> pd.DataFrame:
    """A folder of cutouts, a batch of files at a time: checked in threads (PIL's decode releases the GIL), then
    decoded and transformed as the torch loader does (decode.decode_batch, geometry.transform_batch) into every
    view (centre, or the 8 dihedral ones for TTA). Unusable files get a row with the reason."""
    # every file gets a row (one that is not a cutout gets its reason), but hidden ones (.DS_Store, editors' files)
    files = sorted(p for p in Path(cfg.input).iterdir() if p.is_file() and not p.name.startswith("."))
    fits = ckpt.get("image_kind") == "float"
    ext = ".fits" if fits else ".jpg"
    if not kinds(cfg.input)[ext]:
        where = nested_problem(cfg.input, f"{{id}}{ext} files")
        if where:
            raise ValueError(where)
    if not files:
        raise ValueError(f"no files in {cfg.input}; give a folder of {ext} cutouts or a shard folder")
    asker = "--bands"
    if fits:  # the model's bands, checked up front against what the files hold (every file is checked again)
        bands = list(ckpt["bands"])
        asker = f"the model (bands {','.join(bands)})"
        seen = sample_bands(files_of(cfg.input, ".fits"))
        if seen is not None and not set(bands) <= set(seen[0]):
            lack = [b for b in bands if b not in seen[0]]
            raise ValueError(f"the model in {cfg.run} was trained on bands {','.join(bands)}; the .fits files in "
                             f"{cfg.input} have {','.join(seen[0])} (e.g. {seen[1]}), without {','.join(lack)}: give it "
                             f"cutouts with bands {','.join(bands)}, or train a model on shards of these bands")
    pre, stored = ckpt.get("precrop"), tuple(ckpt["image_size"])
    # as the model's shards were made: the survey's size, or any size at least the precrop, stored as its centre
    rules = ImageRules(crop=ckpt["crop"], precrop=pre, expect=None if pre else stored, region=ckpt["crop"], stored=stored,
                       bands=tuple(ckpt["bands"]) if fits else None, dtype=ckpt.get("dtype", "float16"), asker=asker)
    geo = Geometry(size=ckpt["size"], crop=pre or ckpt["crop"], precropped=bool(pre), mean=ckpt["pixel_mean"],
                   std=ckpt["pixel_std"], softening=ckpt.get("softening"))
    views = TTA_VIEWS if cfg.tta else [CENTRE]
    k, status = len(ckpt["targets"]), [""] * len(files)
    width = 2 * k if ckpt.get("head") == "gaussian" else k
    outs = np.zeros((len(views), len(files), width), np.float32)  # unusable files' rows stay 0, then NaN in table()
    with ThreadPoolExecutor(min(thread_budget(cfg.workers), 4), thread_name_prefix="fastgal-predict") as pool, \
            Progress(len(files), "predict", quiet=cfg.quiet, unit="file") as progress:
        for start in range(0, len(files), cfg.bs):
            progress.update(min(cfg.bs, len(files) - start))
            idx = range(start, min(start + cfg.bs, len(files)))
            checked = list(pool.map(lambda i: _checked(files[i], rules), idx))
            good = [i for i, (data, why) in zip(idx, checked) if data is not None]
            for i, (_, why) in zip(idx, checked):
                status[i] = why
            if not good:
                continue
            data = [d for d, _ in checked if d is not None]
            imgs = torch.from_numpy(np.stack(data)).to(device) if fits else decode_batch(data, device, pool=pool)
            for v, view in enumerate(views):
                outs[v, good] = forward(transform_batch(imgs, geo, view)).cpu().numpy()
    mu, sigma = split_outputs(outs, k)  # (views, files, k)
    est = {"pred": mu[0], "sigma": None if sigma is None else sigma.mean(0)}
    if cfg.tta:  # the 8 views' mean is the only prediction here: pred_tta_<t> (and sigma: the views' mean σ)
        est = {"pred_tta": None, "sigma": est["sigma"]}
        est["pred_tta"], est["sigma_tta"] = view_stats(list(mu))
    df = table([p.stem for p in files], list(ckpt["targets"]), est, bad=np.array([bool(s) for s in status]),
               file=[str(p) for p in files])
    df["status"] = ["ok" if not s else s.split(":")[0] for s in status]
    df["reason"] = [s.split(": ", 1)[1] if ": " in s else "" for s in status]
    return df


def diagnose(df: pd.DataFrame) -> dict:
    """Where the input knew the truth (shards): per target, n and diagnostics.target_scores, the scores
    `fastgal train` writes to metrics.json under the same keys: rmse, nmad, bias, ... of pred_<t>, tta_rmse
    of pred_tta_<t> (--tta), the calibration of sigma_<t> and of sigma_tta_<t> where the model or --tta
    gave them."""
    out = {}
    for c in [c for c in df.columns if c.startswith("true_")]:
        t = c[5:]
        if f"pred_{t}" not in df:
            continue
        col = {k: df[f"{k}_{t}"].to_numpy() if f"{k}_{t}" in df else None for k in ESTIMATES}
        out[t] = {"n": len(df), **target_scores(df[c].to_numpy(), col["pred"], pred_tta=col["pred_tta"],
                                                 sigma=col["sigma"], sigma_tta=col["sigma_tta"])}
        los = [k for k in df.columns if k.startswith(f"lo_{t}_")]
        if los:  # --interval: the fraction inside and the mean width per level (on shards of the calibration's
            # galaxies, e.g. its run's valid split, these include the calibration part: see metrics.json for held-out)
            y = df[c].to_numpy()
            out[t]["intervals"] = {
                k[len(f"lo_{t}_"):]: {"coverage": float(np.mean((y >= df[k]) & (y <= df["hi" + k[2:]]))),
                                      "mean_width": float(np.mean(df["hi" + k[2:]] - df[k]))} for k in los}
    return out


def predict_table(cfg: PredictConfig, forward, meta: dict, device) -> pd.DataFrame:
    """The table for cfg.input (a shard folder's cfg.split, or a folder of JPEGs): forward (x -> outputs) and
    meta (model.pt's metadata: targets, geometry, pixel statistics) say how to feed the model."""
    cfg = replace(cfg, input=local(cfg.input, quiet=cfg.quiet))  # a shard folder's URL (the API's too): staged, verified
    inp = Path(cfg.input)
    if not inp.is_dir():
        raise ValueError(f"{inp} is not a folder; give a shard folder (with manifest.json) or a folder of .jpg cutouts")
    if not (inp / "manifest.json").exists():
        made = shard_files(inp)
        if made:  # a shard folder whose manifest is gone: never read its tars and rejects.csv as cutouts
            listed = ", ".join(made[:3]) + (f", ... ({len(made)} files)" if len(made) > 3 else "")
            raise ValueError(f"{inp} is a shard folder without its manifest.json (it has {listed}): its `fastgal shard` "
                             f"did not finish or found no usable sample; re-shard it (fastgal shard CATALOG IMAGES {inp} "
                             f"--overwrite)")
    run = _predict_shards if (inp / "manifest.json").exists() else _predict_images
    return run(cfg, forward, meta, device)


def with_intervals(cfg: PredictConfig, df: pd.DataFrame) -> pd.DataFrame:
    """--interval: lo_<t>_<level>, hi_<t>_<level> from the run's calibration.json (score.conformal), computed from
    pred_<t> and sigma_<t> exactly as `fastgal train` computed them for its validation galaxies."""
    from fastgal.score.conformal import add_intervals, load_calibration, parse_levels

    levels = parse_levels(cfg.interval)
    cal = load_calibration(cfg.run)
    mass = None
    if cal["by"] == "mass":  # Mondrian bins of the catalog's stellar mass: only shards carry the catalog rows
        if "split" not in df:
            raise ValueError(f"the intervals of {cfg.run} are calibrated in bins of {cal['mass_col']} (--interval-by "
                             f"mass), which a folder of cutouts lacks; shard the cutouts with their catalog first")
        sh = Shards(cfg.input)
        mass = np.concatenate([sh.split(p).column(cal["mass_col"]) for p in pd.unique(df["split"])])
    return add_intervals(df, cal, levels, by_values=mass)


def predict(cfg: PredictConfig) -> tuple[pd.DataFrame, Path]:
    """`fastgal predict`: the run's model on a shard folder (cfg.split) or a folder of JPEGs; writes the CSV."""
    device = resolve_device(cfg.device)
    model, ckpt = load_checkpoint(cfg.run, device)
    cfg = replace(cfg, input=local(cfg.input, quiet=cfg.quiet))  # a shard folder's URL: staged here first, verified
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / f"predictions_{Path(cfg.input).resolve().name}.csv"
    check_writable(out.parent, "choose a writable --out")  # before any work, not after it
    if cfg.interval is not None:  # a run without its calibration refuses before any work
        from fastgal.score.conformal import load_calibration, parse_levels

        parse_levels(cfg.interval), load_calibration(cfg.run)
        if cfg.tta and not (Path(cfg.input) / "manifest.json").exists():
            raise ValueError("--interval is calibrated on the centre view's pred_<t>, which a folder with --tta does "
                             "not predict (only the 8 views' mean): drop --tta to get intervals")
    df = predict_table(cfg, inference(model, ckpt, device), ckpt, device)  # the training precision and memory format on a GPU
    if cfg.interval is not None:
        df = with_intervals(cfg, df)
    write_bytes_atomic(out, df.to_csv(index=False, float_format="%.5f").encode())
    return df, out
