"""The main job: synth -> shard -> train -> report, on the embedded synthetic survey.

    fastgal demo --out runs/demo          # what `make demo` runs

On a GPU it runs the seed's full recipe; on a CPU a half-resolution preset that finishes in a
few minutes on 2 cores and still shows learning: validation RMSE well below predicting the mean,
printed beside the survey's observable reference (what the images show) and its latent floor.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from fastgal.options import DemoConfig, ShardConfig, SynthConfig, TrainConfig
from fastgal.run import train
from fastgal.shards.write import shard
from fastgal.survey.synth import synth
from fastgal.train.device import resolve_device
from fastgal.util import LOCK_NAME, OutLock, check_writable, write_json_atomic


def demo(cfg: DemoConfig, log=print) -> dict:
    device = resolve_device(cfg.device)
    p = cfg.preset(gpu=device.type == "cuda")
    out = Path(cfg.out)
    check_writable(out, "choose another --out")  # before any work
    lock = OutLock(out, "fastgal demo", log=None if cfg.quiet else log)
    lock.refuse_if_busy()  # another demo's work in progress is not "an earlier demo" to replace
    with contextlib.ExitStack() as claim:  # OUT is this command's until it returns or fails (its stages lock theirs)
        if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()) and not cfg.overwrite:
            raise ValueError(f"{out} is not empty; pass --overwrite to replace the earlier demo")
        claim.enter_context(lock)
        if cfg.overwrite:
            for name in ("survey", "shards", "run"):
                shutil.rmtree(out / name, ignore_errors=True)
        return _stages(cfg, out, p, device, log)


def _stages(cfg: DemoConfig, out: Path, p: dict, device, log) -> dict:
    log(f"[1/3] synth: {p['n']} galaxies, {p['image']} px cutouts -> {out / 'survey'}")
    s = synth(SynthConfig(out=out / "survey", n=p["n"], seed=cfg.seed, size=p["image"], quiet=cfg.quiet))
    log(f"      {s.images_per_s:,.0f} images/s; observable reference RMSE {s.floor['observable_reference_rmse']:.4f} dex, "
        f"latent floor {s.floor['floor_rmse']:.4f} dex")
    log(f"[2/3] shard -> {out / 'shards'}")
    r = shard(ShardConfig(catalog=out / "survey" / "data" / "master.csv", images=out / "survey" / "images",
                          out=out / "shards", crop=p["crop"], quiet=cfg.quiet))
    c = r.manifest["counts"]
    log(f"      {c['train']} train / {c['valid']} valid / {c['rejected']} rejected")
    log(f"[3/3] train: {p['arch']} (sa, Mish), {p['epochs']} epochs, bs {p['bs']}, crop {p['crop']} -> {p['size']}, "
        f"on {device.type}")
    # the preset fills arch, bs, lr (and epochs unless --epochs); the input size follows the crop: p's values
    m = train(TrainConfig(shards=out / "shards", out=out / "run", preset=p["preset"], epochs=cfg.epochs, crop=p["crop"],
                          tta=p["tta"], seed=cfg.seed, device=str(device), loader=cfg.loader, overwrite=True,
                          quiet=cfg.quiet))
    m["demo"] = p
    m["survey_floor_rmse"] = s.floor["floor_rmse"]
    m["survey_reference_rmse"] = s.floor["observable_reference_rmse"]
    write_json_atomic(out / "demo.json", m)  # what the demo ran and what it got, in one file
    return m
