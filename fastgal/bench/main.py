"""`fastgal bench`: training-speed claims as ratios against a peer measured in the same run.

    fastgal synth /tmp/bench_s --n 3000 --seed 1 --quiet
    fastgal shard /tmp/bench_s/data/master.csv /tmp/bench_s/images /tmp/bench_sh --quiet
    fastgal bench /tmp/bench_sh --what loaders --bs 64 --batches 20 --json

Seven sections; loaders, model, e2e, shuffle, decode and equality read the same shards, batch size and geometry:
  loaders  images/s of the training loaders alone: DALI (on --device: the GPU graph on cuda), torch (per
           batch on --device: one decode call, nvJPEG on cuda, and one resample), and the peer the project claims to beat, fastai's PIL DataBlock pipeline reading the original JPEGs the way the seed
           recipe did (CropPad 144 -> RandomCrop 112 item tfms, dihedral + rotate batch tfms, Normalize).
           Ratios are against that peer ("fastai"), or against the torch fallback when the JPEGs are gone.
  model    forward + backward + optimiser step of the learner's model through the same fastai fit loop,
           on one synthetic batch reused on the device: the rate the data path has to feed. With --compile,
           the eager model too, then the compiled one (--compile-mode; reduce-overhead = CUDA graphs on a GPU):
           their ratio and the first step's seconds (tracing, compiling, recording).
  e2e      a short fit (a set number of batches, validation skipped) of the real Learner with each loader;
           images/s, the ratio to the peer, and data_bound_fraction = e2e images/s / model images/s, printed as
           "e2e / model" (1.0: the data path keeps up with the model; 0.3: the model waits 70% of the time; a
           ratio of two timings, so noise can put it above 1; the JSON key keeps its old name).
  shuffle  --epochs full epochs of each training loader's sample order: epoch-to-epoch rank correlation,
           co-batch recurrence vs chance, time to the first batch, DDP ranks' sets (shuffle.py).
  step     the host cost of a training step, fastgal's Learner against stock fastai's: ms, aten ops and
           would-be device syncs per phase (step.py; needs no shards).
  decode   images/s of the JPEG decoders alone: fastgal's batched torch decode (CPU; nvJPEG on cuda) and
           DALI's (CPU; mixed on cuda), and on cuda nvJPEG's pixels against libjpeg-turbo's (decode.py).
  equality the torch loader against DALI on the same samples and draws: centre and TTA views
           exact, training views within one grey level; on cuda also GPU against CPU (equality.py).

On FITS shards (float bands) the model, e2e and step sections build the network and the synthetic batches
with the shards' channel count (one per band); what cannot read float bands (the fastai peer's PIL
pipeline, the shuffle section's DALI stream reader) is listed as skipped, with the reason.

Every figure is the best of --repeats windows of --batches batches, each after --warmup untimed ones
(worker start-up, pipeline build, autotune). Compare the ratios of one run, not figures across runs.
bench observes: nothing in the package imports it.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fastgal.bench.common import PEER, SyntheticLoader, fork_safe, sync
from fastgal.options import BenchConfig, to_jsonable
from fastgal.recipe import RECIPE, input_size

SECTIONS = ("loaders", "model", "e2e", "step", "shuffle", "decode", "equality")


def parse_what(what: str) -> list[str]:
    """'loaders,e2e' -> ['loaders', 'e2e'] in canonical order; 'all' -> every section."""
    parts = {p.strip() for p in what.split(",") if p.strip()}
    if not parts or "all" in parts:
        return list(SECTIONS)
    bad = sorted(parts - set(SECTIONS))
    if bad:
        raise ValueError(f"--what {bad[0]!r} is not a section; use {', '.join(SECTIONS)} or all (comma-separated)")
    return [s for s in SECTIONS if s in parts]


def _cycle(dl):
    """Batches across epoch boundaries, so a window may be longer than one epoch (restarts included)."""
    while True:
        n = 0
        for b in dl:
            n += 1
            yield b
        if n == 0:
            raise ValueError("the loader yields no batch: fewer training samples than --bs")


def time_loader(dl, *, batches: int, warmup: int, repeats: int, device: torch.device, log=None, name=""):
    """Best-of-repeats images/s of iterating dl; each repeat starts a fresh iterator and drops `warmup` batches."""
    rates = []
    for r in range(repeats):
        with fork_safe():
            it = _cycle(dl)
            for _ in range(warmup):
                next(it)
            sync(device)
            n, t0 = 0, time.perf_counter()
            for _ in range(batches):
                x, _y = next(it)
                n += len(x)
            sync(device)
            rates.append(n / (time.perf_counter() - t0))
            it.close()  # drop the half-read epoch (the DALI backend builds a pipeline per pass)
        if log:
            log(f"  loaders {name}: repeat {r + 1}/{repeats} {rates[-1]:,.1f} images/s")
    return rates


def _window_callback(batches: int, warmup: int, device: torch.device):
    """A fastai callback that times `batches` training batches after `warmup`, then cancels the fit."""
    from fastai.callback.core import Callback, CancelFitException, CancelValidException

    class TimeWindow(Callback):
        order = 100  # after the optimiser step and every other callback's after_batch

        def _start(self):
            sync(device)
            self.t0 = time.perf_counter()

        def before_fit(self):
            self.seen, self.n_img, self.t0, self.seconds = 0, 0, None, None
            if warmup == 0:
                self._start()

        def after_batch(self):
            if not self.training:
                return
            self.seen += 1
            if self.seen <= warmup:
                if self.seen == warmup:
                    self._start()
                return
            self.n_img += len(self.yb[0])
            if self.seen == warmup + batches:
                sync(device)
                self.seconds = time.perf_counter() - self.t0
                raise CancelFitException()

        def before_validate(self):
            raise CancelValidException()  # a speed window, not a training run: skip validation

    return TimeWindow()


def time_fit(learn, *, batches: int, warmup: int, repeats: int, device: torch.device, log=None, name="", section="e2e"):
    """Best-of-repeats training images/s of learn.fit over `batches` batches after `warmup` (n_epoch as needed)."""
    rates = []
    for r in range(repeats):
        cb = _window_callback(batches, warmup, device)
        per_epoch = max(1, len(learn.dls.train))
        with fork_safe():
            learn.fit(-(-(warmup + batches) // per_epoch) + 1, cbs=[cb])
        if cb.seconds is None:
            raise RuntimeError(f"{section} {name}: the fit stopped before {warmup + batches} batches")
        rates.append(cb.n_img / cb.seconds)
        if log:
            log(f"  {section} {name}: repeat {r + 1}/{repeats} {rates[-1]:,.1f} images/s")
    return rates


class _Targets:
    """get_y for the fastai DataBlock: a row's targets as float32 (a picklable callable for workers)."""

    def __init__(self, cols):
        self.cols = list(cols)

    def __call__(self, row):
        return np.asarray([row[c] for c in self.cols], dtype=np.float32)


def fastai_source(cfg: BenchConfig, shards) -> tuple[Path | None, Path | None, str | None]:
    """(images folder, catalog, None) for the peer pipeline, or (None, None, why it cannot run)."""
    if shards.kind == "float":  # fastai's DataBlock opens JPEGs with PIL: it has no way into FITS bands
        return None, None, "the shards hold FITS bands, which fastai's PIL pipeline cannot read"
    src = shards.manifest.get("source", {})
    images = Path(cfg.images) if cfg.images else Path(src.get("images", ""))
    catalog = Path(cfg.catalog) if cfg.catalog else Path(src.get("catalog", ""))
    if cfg.images and not images.is_dir():
        raise ValueError(f"--images {images} is not a folder")
    if cfg.catalog and not catalog.is_file():
        raise ValueError(f"--catalog {catalog} is not a file")
    if not str(images) or not images.is_dir():
        return None, None, f"the shards' source images ({images}) are gone; pass --images DIR --catalog CSV"
    if not str(catalog) or not catalog.is_file():
        return None, None, f"the shards' source catalog ({catalog}) is gone; pass --catalog CSV"
    return images, catalog, None


def fastai_dls(shards, images: Path, catalog: Path, *, bs: int, size: int, crop: int,
               device: torch.device, workers: int, seed: int):
    """The seed recipe's data path: fastai DataBlock over the original JPEGs, PIL item tfms, batch tfms on device.

    The same training samples as the shards (their ids), the same targets and normalisation stats.
    Zoom, warp and lighting are off so the augmentation does what fastgal's pipeline does (dihedral +
    rotate +-10 deg at p=0.75 with zero fill): the peer does no extra work, which keeps the ratio honest.
    """
    import pandas as pd
    from fastai.data.block import DataBlock, RegressionBlock
    from fastai.data.transforms import ColReader, ColSplitter, Normalize
    from fastai.vision.augment import CropPad, RandomCrop, aug_transforms
    from fastai.vision.data import ImageBlock

    from fastgal.shards.catalog import separator

    id_col, targets = shards.manifest["id_col"], shards.targets
    cat = pd.read_csv(catalog, dtype={id_col: str}, usecols=[id_col, *targets], sep=separator(catalog),
                      encoding="utf-8-sig")
    cat = cat.drop_duplicates(id_col).set_index(id_col)
    tr, va = shards.split("train").keys, shards.split("valid").keys
    missing = [i for i in tr + va if i not in cat.index]
    if missing:
        raise ValueError(f"{catalog} lacks {len(missing)} of the shards' ids (e.g. {missing[0]}); pass the catalog the shards were made from")
    df = cat.loc[tr + va, targets].reset_index().rename(columns={id_col: "_id"})
    df["is_valid"] = [False] * len(tr) + [True] * len(va)
    mean, std = torch.tensor(shards.pixel_mean) / 255, torch.tensor(shards.pixel_std) / 255
    dblock = DataBlock(
        blocks=(ImageBlock, RegressionBlock(n_out=len(targets))),
        get_x=ColReader("_id", pref=f"{images}{os.sep}", suff=".jpg"), get_y=_Targets(targets),
        splitter=ColSplitter("is_valid"),
        item_tfms=[CropPad(crop), RandomCrop(size)],
        batch_tfms=[*aug_transforms(do_flip=True, flip_vert=True, max_rotate=RECIPE.max_rotate, p_affine=RECIPE.p_rotate, max_zoom=1.0,
                                    max_lighting=0.0, max_warp=0.0, pad_mode="zeros"),
                    Normalize.from_stats(mean, std)],
    )
    return dblock.dataloaders(df, bs=bs, num_workers=workers, device=device, seed=seed)


@contextmanager
def _quiet_fastai():
    """fastai's DataBlock warns about Python-level things (n_inp, pickling) irrelevant to a timing run."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _stats(rates: list[float]) -> dict:
    return {"images_per_s": round(max(rates), 2), "repeats": [round(r, 2) for r in rates]}


def _ratios(results: dict, base: str) -> dict:
    b = results[base]["images_per_s"]
    return {k: round(v["images_per_s"] / b, 4) for k, v in results.items()}


def bench(cfg: BenchConfig) -> dict:
    """Run the requested sections; return the JSON-ready result (see the module docstring)."""
    from fastgal.load.loader import dali_available, dataloaders
    from fastgal.shards.read import Shards
    from fastgal.train.device import resolve_device, resolve_precision
    from fastgal.train.learner import make_learner
    from fastgal.train.model import make_model
    from fastgal.util import Progress, default_workers, is_url

    what = parse_what(cfg.what)
    if min(cfg.batches, cfg.bs, cfg.repeats) < 1 or cfg.warmup < 0:
        raise ValueError("--batches, --bs and --repeats must be >= 1 and --warmup >= 0")
    if cfg.compile_mode != "default" and not cfg.compile:
        raise ValueError(f"--compile-mode {cfg.compile_mode} applies to a compiled model: add --compile")
    if is_url(cfg.shards):  # staged to this machine first, verified (shards/stage.py)
        from fastgal.shards.stage import local

        cfg = replace(cfg, shards=local(cfg.shards, quiet=cfg.quiet))
    step_only = what == ["step"] and not (Path(cfg.shards) / "manifest.json").is_file()  # the step section needs no shards
    shards = None if step_only else Shards(cfg.shards)  # one-line ValueError on a bad folder
    crop = shards.crop(cfg.crop) if shards else None
    if cfg.size is None:  # as `fastgal train` sizes the model's input: the recipe's ratio of the crop (144 -> 112)
        cfg = replace(cfg, size=input_size(crop) if crop else RECIPE.size)
    device = resolve_device(cfg.device)
    precision = resolve_precision("auto", device)
    threads = cfg.workers or default_workers()
    log = Progress(quiet=cfg.quiet).line  # progress lines on stderr (a log too); stdout carries the results
    torch.manual_seed(cfg.seed)

    if shards:
        targets, channels = shards.targets, shards.channels  # channels: 3 for JPEG shards, one per FITS band
        tmean, tstd = shards.target_stats()
    else:  # the step section alone, without shards: the recipe's one target at a typical scale, RGB
        targets, tmean, tstd, channels = [RECIPE.target], [8.9], [0.2], 3
    window = dict(batches=cfg.batches, warmup=cfg.warmup, repeats=cfg.repeats, device=device, log=log)

    backends: dict[str, object] = {}  # name -> DataLoaders (built once, shared by loaders and e2e)
    skipped: dict[str, str] = {}

    def get_backends():
        if backends or skipped:
            return backends
        common = dict(bs=cfg.bs, size=cfg.size, crop=crop, device=device, threads=threads, seed=cfg.seed)
        images, catalog, why = fastai_source(cfg, shards)
        if why:
            skipped[PEER] = why
        else:
            log(f"building the fastai DataBlock over {images}")
            with _quiet_fastai():
                backends[PEER] = fastai_dls(shards, images, catalog, bs=cfg.bs, size=cfg.size,
                                            crop=crop, device=device,
                                            workers=threads, seed=cfg.seed)
        if dali_available():
            backends["dali"] = dataloaders(shards, backend="dali", **common)
        else:
            skipped["dali"] = "NVIDIA DALI is not importable here"
        backends["torch"] = dataloaders(shards, backend="torch", **common)
        return backends

    out: dict = {
        "shards": str(cfg.shards), "sections": what,
        "config": {**to_jsonable(cfg), "crop": crop, "workers": threads, "precision": precision, "device": str(device)},
        "machine": _machine(device),
        "n_train": len(shards.split("train")) if shards else None,
        "note": "best of repeats; compare ratios within one run, not absolute figures across machines or runs",
    }

    if "loaders" in what:
        res = {}
        with _quiet_fastai():
            for name, dls in get_backends().items():
                res[name] = _stats(time_loader(dls.train, name=name, **window))
        base = PEER if PEER in res else "torch"
        out["loaders"] = {"baseline": base, "results": res, "ratio_vs_baseline": _ratios(res, base),
                          "skipped": dict(skipped)}

    if "shuffle" in what:
        from fastgal.bench.shuffle import shuffle_bench

        out["shuffle"] = shuffle_bench(cfg, shards, crop, device, threads, log)

    if "model" in what or "e2e" in what:
        from fastai.data.core import DataLoaders

        with tempfile.TemporaryDirectory(prefix="fastgal-bench-") as tmp:
            def learner(dls, compile=cfg.compile and cfg.compile_mode):
                learn = make_learner(dls, make_model(cfg.arch, len(targets), tmean, tstd, c_in=channels), targets=targets,
                                     path=Path(tmp), precision=precision, channels_last=device.type == "cuda",
                                     quiet=True, opt=cfg.opt, compile=compile)
                learn.metrics = []  # validation is skipped anyway
                return learn

            # e2e needs the model figure for its data-bound fraction, so it always runs the model section
            x = torch.randn(cfg.bs, channels, cfg.size, cfg.size, device=device)
            y = torch.tensor(tmean, device=device).repeat(cfg.bs, 1) + 0.1 * torch.randn(cfg.bs, len(targets), device=device)
            syn = DataLoaders(SyntheticLoader(x, y, cfg.warmup + cfg.batches), SyntheticLoader(x, y, 1),
                              path=tmp, device=device)
            model = {"arch": cfg.arch, "precision": precision, "batch_shape": list(x.shape)}
            if cfg.compile:  # the same model eager and compiled, in this run: their ratio is the claim
                eager = _stats(time_fit(learner(syn, compile=False), name=f"{cfg.arch} eager", section="model", **window))
                learn = learner(syn)
                t0 = time.perf_counter()  # tracing and compiling (and with reduce-overhead recording a CUDA graph)
                time_fit(learn, batches=1, warmup=0, repeats=1, device=device)
                first = time.perf_counter() - t0
                log(f"  model {cfg.arch} compiled ({cfg.compile_mode}): first step {first:.1f} s")
                rates = time_fit(learn, name=f"{cfg.arch} compiled ({cfg.compile_mode})", section="model", **window)
                model["compiled"] = {"mode": cfg.compile_mode, "first_step_seconds": round(first, 2), "eager": eager,
                                     "x_eager": round(max(rates) / eager["images_per_s"], 3),
                                     "cuda_graphs": cfg.compile_mode == "reduce-overhead" and device.type == "cuda"}
            else:
                rates = time_fit(learner(syn), name=cfg.arch, section="model", **window)
            out["model"] = {**model, **_stats(rates)}
            if "e2e" in what:
                res = {}
                with _quiet_fastai():
                    for name, dls in get_backends().items():
                        res[name] = _stats(time_fit(learner(dls), name=name, **window))
                base = PEER if PEER in res else "torch"
                m = out["model"]["images_per_s"]
                out["e2e"] = {"baseline": base, "results": res, "ratio_vs_baseline": _ratios(res, base),
                              "data_bound_fraction": {k: round(v["images_per_s"] / m, 4) for k, v in res.items()},
                              "skipped": dict(skipped)}

    if "decode" in what:
        from fastgal.bench.decode import decode_bench

        out["decode"] = decode_bench(shards, bs=cfg.bs, batches=cfg.batches, warmup=cfg.warmup, repeats=cfg.repeats,
                                     device=device, threads=threads, log=log)

    if "equality" in what:
        from fastgal.bench.equality import equality_bench

        out["equality"] = equality_bench(shards, bs=cfg.bs, size=cfg.size, crop=crop, batches=cfg.batches,
                                         device=device, threads=threads, seed=cfg.seed, log=log)

    if "step" in what:
        from fastgal.bench.step import bench_step

        out["step"] = bench_step(cfg, device=device, precision=precision, targets=targets, tmean=tmean, tstd=tstd,
                                 channels=channels, log=log)
    return out


def _machine(device: torch.device) -> dict:
    from fastgal.env import versions

    v = versions()
    m = {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
         "platform": platform.platform(), "python": v["python"], "torch": v["torch"],
         "fastgal": v["fastgal"], "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
         "dali": v["nvidia.dali"]}
    try:
        m["load_avg_1min"] = round(os.getloadavg()[0], 2)  # other jobs on the machine skew absolute figures
    except OSError:
        pass
    return m


def format_table(res: dict) -> str:
    """The human summary printed on stdout."""
    c = res["config"]
    hw = res["machine"]["gpu"] or f"{res['machine']['usable_cpus']} CPUs"
    lines = [] if res["n_train"] is None else [  # None: the step section alone, without shards
        f"fastgal bench {res['shards']}: {res['n_train']} train samples, bs {c['bs']}, crop {c['crop']} -> "
        f"{c['size']} px, {c['workers']} loader threads"]
    lines.append(f"{c['device']} ({hw}); best of {c['repeats']} windows of {c['batches']} batches after {c['warmup']} "
                 f"warm-up; load average {res['machine'].get('load_avg_1min', '?')} at the end")

    def block(title, sec, extra=None):
        base = sec["baseline"]
        head = f"  {'backend':<15}{'images/s':>11}{f'x {base}':>12}"
        if extra:
            head += f"{extra[0]:>22}"
        lines.extend(["", title, head])
        for name, r in sec["results"].items():
            tag = name + (" (peer)" if name == PEER else "")
            row = f"  {tag:<15}{r['images_per_s']:>11,.1f}{sec['ratio_vs_baseline'][name]:>12.2f}"
            if extra:
                row += f"{extra[1][name]:>22.2f}"
            lines.append(row)
        for name, why in sec.get("skipped", {}).items():
            lines.append(f"  {name:<15}{'skipped':>11}  ({why})")

    if "loaders" in res:
        block("loaders: training batches alone (decode + augment + normalise)", res["loaders"])
    if "model" in res:
        m = res["model"]
        lines += ["", f"model: {m['arch']} forward + backward + step on synthetic {tuple(m['batch_shape'])} batches, "
                      f"{m['precision']}", f"  {m['images_per_s']:,.1f} images/s (the most any data path can feed)"]
        if "compiled" in m:
            k = m["compiled"]
            lines.append(f"  compiled ({k['mode']}{', CUDA graphs' if k['cuda_graphs'] else ''}): {k['x_eager']:.2f}x "
                         f"the eager model's {k['eager']['images_per_s']:,.1f} images/s; first step (compiling) "
                         f"{k['first_step_seconds']:.1f} s")
    if "e2e" in res:
        e = res["e2e"]
        # a ratio of two timings, not a fraction: it reads above 1 where the loader keeps up (JSON: data_bound_fraction)
        block(f"e2e: Learner.fit ({res['config']['arch']}) with each loader; e2e / model = the ratio of their images/s "
              f"(1: the loader keeps up with the model)", e, ("e2e / model", e["data_bound_fraction"]))
        if any(v > 1 for v in e["data_bound_fraction"].values()):
            lines.append("  (a ratio above 1 is the two measurements' noise: that loader keeps up with the model)")
    if "step" in res:
        from fastgal.bench.step import step_table

        lines += step_table(res["step"])
    if "shuffle" in res:
        from fastgal.bench.shuffle import shuffle_table

        lines += shuffle_table(res["shuffle"])
    if "decode" in res:
        from fastgal.bench.decode import decode_table

        lines += decode_table(res["decode"])
    if "equality" in res:
        from fastgal.bench.equality import equality_table

        lines += equality_table(res["equality"])
    return "\n".join(lines)
