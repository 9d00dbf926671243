"""catalog + cutouts (JPEGs, or FITS bands) -> WebDataset tar shards + DALI indexes + manifest.json + rejects.csv.

    fastgal synth /tmp/s --n 500 && fastgal shard /tmp/s/data/master.csv /tmp/s/images /tmp/s/shards
    fastgal info /tmp/s/shards
    fastgal synth /tmp/f --n 500 --format fits --bands ugriz && fastgal shard /tmp/f/data/master.csv /tmp/f/images /tmp/f/shards

shard() runs the stages in order: check the options; read the catalog and check every row (exact
id, no duplicate, finite targets); the split and write order (catalog.split_order); the survey's
cutout size from JPEG headers; every image fully decoded and checked by workers (cutouts.py), in
write order and a few chunks ahead of the tar writer; statistics and the manifest.

Layout of OUT (the contract the DALI pipeline reads; read.py reads it back):
  train-000000.tar/.idx ...  valid-000000.tar/.idx ...  manifest.json  rejects.csv (row,id,reason,detail)
  sample: __key__ = id, jpg = original bytes (or the --precrop centre crop, JPEG q95),
          target.f32 = little-endian float32 per target (manifest order), json = the catalog row.
  FITS cutouts: flux.f16 (or flux.f32 with --dtype float32) = the bands asked for (--bands, in that order)
          as a raw little-endian (bands, H, W) array in the file's units, instead of jpg; the json also
          holds "__image__": {shape, dtype, bands, masked}. The manifest records the bands, dtype, shape,
          per-band statistics over the crop region and the stretch the loaders apply by default.

Error policy: a row that cannot be used never stops the run; it goes to rejects.csv with a reason
(REASONS below). Problems with the inputs as a whole (no catalog, no such column, ids saved as
floats, no images folder, .jpg and .fits mixed, cutouts in sub-folders, a --bands name the files lack,
zero usable samples) raise ValueError with a one-line fix, all but the last before any row is read. Before
success we check rows = samples + rejects, each row exactly once. Files are made in a hidden temp
folder (OUT/.shard-*; a killed run's is removed by the next) and moved into OUT with manifest.json
last, so a folder without manifest.json is unfinished.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fastgal import __version__
from fastgal.options import ShardConfig
from fastgal.shards.catalog import (
    SPLIT_METHOD,
    check_rows,
    json_value,
    read_catalog,
    split_order,
)
from fastgal.shards.cutouts import ImageRules, check_chunk, modal_size
from fastgal.shards.fits import match_bands, modal_layout, sample_bands
from fastgal.shards.folder import files_of, kinds, misnamed_problem, nested_problem
from fastgal.shards.index import INDEX_VERSION, index_count, is_shard_file, make_index
from fastgal.shards.read import FLOAT_FORMAT_VERSION, FORMAT, FORMAT_VERSION
from fastgal.util import (
    HashCache,
    Progress,
    check_out,
    chunks,
    claim_out,
    default_workers,
    imap_ordered,
    sha256_file,
    temp_dir,
    worker_pool,
    write_json_atomic,
)

COMPONENTS = {"image": "jpg", "targets": "target.f32", "meta": "json"}
FLUX_EXT = {"float16": "flux.f16", "float32": "flux.f32"}  # FITS cutouts' image component, by --dtype
TAR_MTIME = 0  # fixed header fields make the tars byte-reproducible
TAR_USER = "fastgal"
TMP_PREFIX = ".shard-"

# Every reason a row can be rejected for. Greyscale and CMYK JPEGs are rejected (not-rgb), not
# converted: the gri colours carry most of the metallicity signal, so a colourless cutout is not
# a cutout of the kind the model is trained on, and a silent conversion would hide a bad download.
REASONS = {
    "bad-id": "the id is empty, float-formatted or has characters a tar member name cannot carry",
    "duplicate-id": "the id appears on more than one row",
    "missing-target": "a target cell is empty",
    "non-numeric-target": "a target cell is not a number",
    "non-finite-target": "a target is NaN or infinite (as float32)",
    "missing-image": "no IMAGES/{id}.jpg (or {id}.fits for FITS cutouts)",
    "not-jpeg": "the file is not a JPEG (e.g. an HTML error page saved as .jpg)",
    "corrupt-image": "the JPEG is truncated or does not decode",
    "not-rgb": "greyscale or CMYK JPEG (rejected, not converted)",
    "too-small": "smaller than the crop the pipeline takes (--precrop or 144 px)",
    "wrong-size": "a different size from the survey's usual cutout size (without --precrop)",
    "blank-image": "an all-dark or flat frame (FITS: a band all zero or constant)",
    # FITS cutouts (cutouts.check_fits)
    "not-fits": "the file is not a FITS file",
    "wrong-bands": "the bands asked for (--bands) are not all in the file, or its HDUs are not one cube or 2-D bands",
    "non-finite": "NaN or infinite pixels in the centre crop region (outside it they are set to 0)",
    "out-of-range": "a flux beyond float16's range (shard with --dtype float32)",
}
FITS_ONLY = {"not-fits", "wrong-bands", "non-finite", "out-of-range"}
JPEG_ONLY = {"not-jpeg", "not-rgb"}


# --------------------------------------------------------------------------- tars and indexes

def _tar_writer(f):
    from webdataset import TarWriter

    # encoder=False: we hand over bytes; USTAR (TarWriter's default) with short ASCII names needs
    # no PAX headers, which DALI's reader does not parse; fixed mtime/owner make it reproducible.
    tw = TarWriter(f, user=TAR_USER, group=TAR_USER, mode=0o444, encoder=False, mtime=TAR_MTIME)
    tw.tarstream.format = tarfile.USTAR_FORMAT  # TarWriter 1.0.2 ignores its format=; a field that
    return tw                                   # does not fit USTAR now raises instead of adding PAX


class _SplitWriter:
    """Writes one split's samples into name-000000.tar, name-000001.tar, ... of shard_size samples,
    indexing and hashing each tar as it is closed. A context manager: leaving it on an error (a full
    disk, Ctrl-C) drops the open tar unfinished (abort)."""

    def __init__(self, folder: Path, name: str, shard_size: int):
        self.folder, self.name, self.shard_size = folder, name, shard_size
        self.entries: list[dict] = []
        self.rows: list[int] = []
        self._f = self._tw = None
        self._count = 0

    def write(self, sample: dict, pos: int) -> None:
        if self._tw is None:
            self._f = open(self.folder / f"{self.name}-{len(self.entries):06d}.tar", "wb")
            self._tw = _tar_writer(self._f)
        self._tw.write(sample)
        self.rows.append(pos)
        self._count += 1
        if self._count == self.shard_size:
            self._finish()

    def _finish(self) -> None:
        self._tw.close()
        self._f.close()
        tar = Path(self._f.name)
        idx = tar.with_suffix(".idx")
        make_index(tar, idx)
        k = index_count(idx)
        if k != self._count:  # the index is read back from the tar itself: a real count
            raise RuntimeError(f"internal error: {tar.name} should hold {self._count} samples, its index says {k}")
        self.entries.append({"file": tar.name, "index": idx.name, "samples": self._count,
                             "bytes": tar.stat().st_size, "sha256": sha256_file(tar)})
        self._f = self._tw = None
        self._count = 0

    def close(self) -> tuple[list[dict], list[int]]:
        if self._tw is not None:
            self._finish()
        return self.entries, self.rows

    def abort(self) -> None:
        """Close the open tar, if any, unfinished and ignoring errors: on a full disk its end blocks cannot be
        written either, and a tar stream left open would try again when garbage-collected, after the error
        was reported ("Exception ignored ... write to closed file"). The temp folder goes with the run."""
        tw, f = self._tw, self._f
        self._f = self._tw = None
        for close in (tw.close, f.close) if tw is not None else ():
            with contextlib.suppress(Exception):  # the first error is the one to report
                close()

    def __enter__(self) -> "_SplitWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()


def write_rejects(path: Path, rejects: dict, ids: list[str]) -> None:
    """rejects.csv: row (1-based data row, header excluded), id, reason, detail; in catalog order."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "id", "reason", "detail"])
        for pos in sorted(rejects):
            reason, detail = rejects[pos]
            w.writerow([pos + 1, ids[pos], reason, detail])


# --------------------------------------------------------------------------- the stages

@dataclass
class ShardResult:
    out: Path
    manifest: dict
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.manifest["counts"]["catalog_rows"] / max(self.seconds, 1e-9)


@dataclass
class _Rows:
    """The catalog after the row checks; `rejects` grows as images are checked."""

    records: np.ndarray  # every cell as text, [rows, columns]
    columns: list[str]
    id_col: str
    ids: list[str]
    y: np.ndarray  # targets, float64 [rows, targets]; NaN on rejected rows
    rejects: dict[int, tuple[str, str]]  # row position -> (reason, detail)
    images: Path
    ext: str = ".jpg"  # the cutouts' file extension: .jpg or .fits
    image_ext: str = "jpg"  # the image component in the tar: jpg, flux.f16 or flux.f32

    def __len__(self) -> int:
        return len(self.ids)

    def candidates(self) -> list[int]:
        """Rows that passed the row checks, in catalog order."""
        return [p for p in range(len(self)) if p not in self.rejects]

    def path(self, pos: int) -> str:
        return str(self.images / f"{self.ids[pos]}{self.ext}")

    def sample(self, pos: int, image: bytes, image_meta: dict | None = None) -> dict:
        """The WebDataset sample of a row: id as the key and as a string in the json."""
        cells = zip(self.columns, self.records[pos])
        meta = {c: (self.ids[pos] if c == self.id_col else json_value(v)) for c, v in cells}
        if image_meta is not None:
            meta["__image__"] = image_meta
        return {"__key__": self.ids[pos], self.image_ext: image, "target.f32": np.asarray(self.y[pos], "<f4").tobytes(),
                "json": json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()}


@dataclass
class _Written:
    entries: dict[str, list[dict]]  # per split: the manifest's shard entries
    rows: dict[str, list[int]]  # per split: the catalog positions written, in write order
    sums: list  # the training images' per-channel sums and sums of squares over the centre region
    robust: list  # FITS: each training cutout's per-band medians and 1.4826 x MADs over the centre region


def _check_config(cfg: ShardConfig) -> None:
    if not 0 <= cfg.valid_pct < 1:
        raise ValueError(f"--valid-pct must be in [0, 1), got {cfg.valid_pct}")
    if cfg.shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1 sample, got {cfg.shard_size}")
    if cfg.precrop is not None and cfg.precrop < 16:
        raise ValueError(f"--precrop must be at least 16 pixels, got {cfg.precrop}")
    if cfg.precrop is not None and cfg.precrop < cfg.crop:
        raise ValueError(f"--precrop {cfg.precrop} is smaller than --crop {cfg.crop}, the centre region training draws "
                         f"its crops from; pass --precrop {cfg.crop} (or more), or a --crop of {cfg.precrop} or less")
    if cfg.crop < 1:
        raise ValueError(f"crop must be positive, got {cfg.crop}")
    if cfg.workers < 0:
        raise ValueError(f"--workers must be 0 (all cores) or more, got {cfg.workers}")
    if len(set(cfg.targets)) != len(cfg.targets):
        raise ValueError(f"--target repeats a column: {cfg.targets}; name each target once")
    if not Path(cfg.images).is_dir():
        raise ValueError(f"images folder {cfg.images} not found; pass the folder that holds {{id}}.jpg (or {{id}}.fits)")
    if cfg.dtype not in FLUX_EXT:
        raise ValueError(f"--dtype must be one of {', '.join(FLUX_EXT)}, got {cfg.dtype!r}")
    parse_bands(cfg.bands)


def parse_bands(text: str | None) -> tuple[str, ...] | None:
    """--bands: 'g,r,i' (names of any length) or 'gri' (one letter each); None: not given."""
    if text is None:
        return None
    parts = [b.strip() for b in text.split(",")] if "," in text else list(text.strip())
    if not parts or not all(parts) or any(" " in b for b in parts):
        raise ValueError(f"--bands {text!r}: give band names in order, e.g. --bands g,r,i or --bands ugriz")
    if len(set(parts)) != len(parts):
        raise ValueError(f"--bands {text!r} repeats a band; name each once")
    return tuple(parts)


def _check_images(cfg: ShardConfig) -> ShardConfig:
    """The images folder as a whole, before any row is read: one kind of cutout (not .jpg and .fits mixed
    without --bands), at its top level (not in sub-folders), and --bands named as the files name them (checked
    against the first readable .fits files; a band asked in another case, G for g, becomes the files' name when
    only one matches). Returns cfg with --bands spelled as the files spell them."""
    images = Path(cfg.images)
    k = kinds(images)
    jpg, fits = k[".jpg"], k[".fits"]
    if jpg and fits and cfg.bands is None:
        raise ValueError(f"{images} holds both {jpg} .jpg and {fits} .fits cutouts; shard one kind: pass --bands "
                         f"(e.g. --bands g,r,i) to shard the .fits files' bands, or put the .jpg and .fits files in "
                         f"separate folders")
    # cutouts named {id}.jpeg or .JPG, or only in sub-folders, would each become a missing-image reject
    where = misnamed_problem(images) or (None if jpg or fits else nested_problem(images, "{id}.jpg (or {id}.fits) files"))
    if where:
        raise ValueError(where)
    if cfg.bands is not None and fits:
        asked = parse_bands(cfg.bands)
        seen = sample_bands(files_of(images, ".fits"))
        if seen is not None:
            named = match_bands(asked, *seen)
            if named != asked:
                Progress(quiet=cfg.quiet).line(f"--bands {cfg.bands} read as {','.join(named)}, the files' band names")
                cfg = replace(cfg, bands=",".join(named))
    return cfg


def cutout_kind(cfg: ShardConfig) -> str:
    """'fits' when --bands is given or the images folder holds .fits cutouts and no .jpg ones, else 'jpeg'."""
    if cfg.bands is not None:
        return "fits"
    seen = set()
    with os.scandir(cfg.images) as it:
        for e in it:
            seen.add(os.path.splitext(e.name)[1].lower())
            if ".jpg" in seen:
                return "jpeg"
    return "fits" if ".fits" in seen else "jpeg"


def _read_rows(cfg: ShardConfig) -> _Rows:
    """The catalog, and the cheap per-row checks (ids, duplicates, targets), in this process."""
    df = read_catalog(cfg.catalog, cfg.id_col, cfg.targets)
    y, rejects = check_rows(df, cfg.id_col, cfg.targets)
    fits = cutout_kind(cfg) == "fits"
    return _Rows(records=df.to_numpy(dtype=object), columns=list(df.columns), id_col=cfg.id_col,
                 ids=df[cfg.id_col].tolist(), y=y, rejects=rejects, images=Path(cfg.images),
                 ext=".fits" if fits else ".jpg", image_ext=FLUX_EXT[cfg.dtype] if fits else COMPONENTS["image"])


def _check_out(out: Path, cfg: ShardConfig) -> None:
    # rejects.csv alone is the report of a run that wrote no shards: the corrected command replaces it
    check_out(out, overwrite=cfg.overwrite, finished="manifest.json", what="shard folder",
              unfinished=lambda name: is_shard_file(name) and name != "rejects.csv")


def _prepare_out(out: Path, cfg: ShardConfig, stack: contextlib.ExitStack) -> None:
    """Refuse an OUT we may not write (before any work), then claim it for this command (util.claim_out)."""
    claim_out(out, "fastgal shard", lambda: _check_out(out, cfg), stack, quiet=cfg.quiet, tmp_prefix=TMP_PREFIX)


def _survey_rules(cfg: ShardConfig, rows: _Rows, paths: list[str], pool, workers: int) -> ImageRules:
    """One cutout size per survey: the pipeline crops a fixed region and the manifest records one size.
    FITS cutouts: also one band list, --bands or else the most common in the files' headers."""
    bands = None
    if rows.ext == ".fits":
        size, names, n = modal_layout(paths, pool, workers)
        bands = parse_bands(cfg.bands) or names or tuple(f"band{k}" for k in range(n))
        if not n and cfg.bands is None:
            bands = ("?",)  # no readable FITS file: every row is rejected with its reason
    else:
        size = None if cfg.precrop else modal_size(paths, pool, workers)
    expect = None if cfg.precrop else size
    stored = (cfg.precrop, cfg.precrop) if cfg.precrop else expect
    return ImageRules(cfg.crop, cfg.precrop, expect, min(cfg.crop, *stored) if stored else cfg.crop, stored,
                      bands=bands, dtype=cfg.dtype)


def _write_splits(tmp: Path, rows: _Rows, order: dict, rules: ImageRules, cfg: ShardConfig, pool, workers: int) -> _Written:
    """Check every image (workers, in write order) and write the good ones into each split's tars."""
    nb = len(rules.bands) if rules.bands else 3
    done = _Written(entries={}, rows={}, sums=[0] * (2 * nb), robust=[])
    with Progress(sum(map(len, order.values())), "shard", cfg.quiet, unit="img") as prog:
        for name, positions in order.items():
            tasks = [([(p, rows.path(p)) for p in part], rules) for part in chunks(positions, 32)]
            with _SplitWriter(tmp, name, cfg.shard_size) as writer:
                for res in imap_ordered(check_chunk, tasks, pool, 4 * workers):
                    for c in res:
                        if c.reason:
                            rows.rejects[c.pos] = (c.reason, c.detail)
                            continue
                        writer.write(rows.sample(c.pos, c.data, c.meta), c.pos)
                        if name == "train":
                            done.sums = [a + b for a, b in zip(done.sums, c.sums)]
                            if c.robust is not None:
                                done.robust.append(c.robust)
                    prog.update(len(res))
                done.entries[name], done.rows[name] = writer.close()
    return done


def _check_placed(rows: _Rows, done: _Written, tmp: Path, cfg: ShardConfig) -> None:
    """Something to train on, and every catalog row a sample or a reject, exactly once."""
    n, out = len(rows), Path(cfg.out)
    if not done.rows["train"]:
        by = Counter(r for r, _ in rows.rejects.values())
        where = ""
        if not (out / "manifest.json").exists():  # never mix a failed run into a finished folder
            os.replace(tmp / "rejects.csv", out / "rejects.csv")
            where = f"; see {out / 'rejects.csv'}"
        what = (f"all {n} rows of {cfg.catalog} were rejected" if not done.rows["valid"] else
                f"{len(rows.rejects)} of {n} rows of {cfg.catalog} were rejected, none left for training")
        fix = ""
        if by.most_common(1)[0][0] == "too-small":
            opt = f"--precrop {cfg.precrop}" if cfg.precrop else f"--crop {cfg.crop}"
            fix = f"; the cutouts are smaller than {opt}: pass a {opt.split()[0]} no larger than their side"
        elif by.most_common(1)[0][0] == "missing-image":
            other = ".jpg" if rows.ext == ".fits" else ".fits"
            if any(Path(rows.path(p)).with_suffix(other).is_file() for p in range(min(n, 50))):
                fix = (f"; {cfg.images} holds {{id}}{other} cutouts: " +
                       ("drop --bands to shard them as JPEGs" if other == ".jpg" else "pass --bands to shard their bands"))
        raise ValueError(f"no usable samples: {what} "
                         f"({', '.join(f'{k} {v}' for k, v in by.most_common())}){where}{fix}")
    placed = done.rows["train"] + done.rows["valid"] + list(rows.rejects)
    if len(placed) != n or set(placed) != set(range(n)):
        raise RuntimeError(f"internal error: {n} catalog rows but {len(placed)} placed "
                           f"({len(set(placed))} distinct); please report this")


def _statistics(rows: _Rows, done: _Written, targets: list[str], region: int) -> tuple[dict, dict]:
    """(target_stats, pixel_stats) over the training split. FITS: also per band the median of the cutouts'
    medians and of their robust sigmas (1.4826 x MAD: the sky noise where the galaxy fills little of the region)."""
    ytr = rows.y[done.rows["train"]]
    target_stats = {t: {"mean": float(ytr[:, j].mean()), "std": float(ytr[:, j].std()),
                        "min": float(ytr[:, j].min()), "max": float(ytr[:, j].max())}
                    for j, t in enumerate(targets)}
    npix = len(done.rows["train"]) * region * region
    c = len(done.sums) // 2
    mean = [s / npix for s in done.sums[:c]]
    std = [math.sqrt(max(ss / npix - m * m, 0.0)) for ss, m in zip(done.sums[c:], mean)]
    stats = {"region": region, "mean": mean, "std": std}
    if done.robust:
        r = np.asarray(done.robust, np.float64)
        stats.update(median=np.median(r[:, :c], 0).tolist(), mad_sigma=np.median(r[:, c:2 * c], 0).tolist(),
                     sky_sigma=np.median(r[:, 2 * c:], 0).tolist(),
                     robust="per band, the median over training cutouts of: the centre region's median and 1.4826 x "
                            "MAD (mad_sigma); the sky noise, 1.4826 x MAD outside the region (sky_sigma)")
    return target_stats, stats


def _manifest(cfg: ShardConfig, rows: _Rows, done: _Written, rules: ImageRules) -> dict:
    catalog, targets = Path(cfg.catalog), list(cfg.targets)
    target_stats, pixel_stats = _statistics(rows, done, targets, rules.region)
    fits = rules.bands is not None
    image = {"size": list(rules.stored), "precrop": cfg.precrop, "channels": len(rules.bands) if fits else 3, "crop": cfg.crop}
    if fits:
        image.update(kind="float", bands=list(rules.bands), dtype=cfg.dtype, layout="CHW", byte_order="little")
    extra = {}
    if fits:  # what the loaders apply before normalising, unless `fastgal train --stretch` says otherwise
        extra["stretch"] = {"name": "asinh", "softening": pixel_stats["sky_sigma"],
                            "about": "asinh(flux / softening) per band, softening = the band's sky noise "
                                     "(pixel_stats.sky_sigma): linear within the noise, logarithmic for the galaxy, "
                                     "as Lupton et al. (1999)'s asinh magnitudes soften at about the sky's sigma"}
    return {
        "format": FORMAT,
        "format_version": FLOAT_FORMAT_VERSION if fits else FORMAT_VERSION,
        "fastgal_version": __version__,
        "source": {"catalog": str(catalog.resolve()), "catalog_sha256": sha256_file(catalog),
                   "images": str(Path(cfg.images).resolve())},
        "id_col": cfg.id_col,
        "targets": targets,
        "target_stats": target_stats,
        "components": {**COMPONENTS, "image": rows.image_ext},
        "split": {"valid_pct": cfg.valid_pct, "seed": cfg.seed, "method": SPLIT_METHOD},
        "order_seed": cfg.seed,
        "counts": {"catalog_rows": len(rows), "train": len(done.rows["train"]), "valid": len(done.rows["valid"]),
                   "rejected": len(rows.rejects)},
        "rejects_by_reason": dict(sorted(Counter(r for r, _ in rows.rejects.values()).items())),
        "shards": done.entries,
        # the training reader seeks every sample through the .idx files (fastgal.load.order): their format
        "index_format": INDEX_VERSION,
        "image": image,
        "pixel_stats": pixel_stats,
        **extra,
    }


def _install(tmp: Path, out: Path, manifest: dict) -> None:
    """Replace OUT's shard files with tmp's, then write manifest.json. The old manifest goes first,
    so at no moment does a mix of old and new files look finished; files not ours are left alone."""
    (out / "manifest.json").unlink(missing_ok=True)
    for p in out.iterdir():
        if is_shard_file(p.name) and p.is_file():
            p.unlink()
    for p in sorted(tmp.iterdir()):
        os.replace(p, out / p.name)
    write_json_atomic(out / "manifest.json", manifest)  # last: its presence means "finished"
    # the sha256s just computed of the bytes written, for `fastgal train`'s check (Shards.check_sha256): the tars
    # as they now are (after the rename) need no hashing until they change
    cache = HashCache()
    for e in (e for sp in manifest["shards"].values() for e in sp):
        cache.put(out / e["file"], e["sha256"])
    cache.save()


def shard(cfg: ShardConfig) -> ShardResult:
    """Run every stage; returns the manifest. Raises ValueError for user errors."""
    t0 = time.perf_counter()
    _check_config(cfg)
    cfg = _check_images(cfg)
    rows = _read_rows(cfg)
    out = Path(cfg.out)
    with contextlib.ExitStack() as claim:  # OUT is this command's until it returns or fails
        _prepare_out(out, cfg, claim)
        # fixed before any image is decoded: a rejected image just leaves its split, reshuffling nothing
        order = split_order(rows.candidates(), cfg.valid_pct, cfg.seed)
        workers = cfg.workers or default_workers()
        with worker_pool(workers) as pool:
            rules = _survey_rules(cfg, rows, [rows.path(p) for p in rows.candidates()], pool, workers)
            tmp = temp_dir(out, TMP_PREFIX)
            try:
                done = _write_splits(tmp, rows, order, rules, cfg, pool, workers)
                write_rejects(tmp / "rejects.csv", rows.rejects, rows.ids)
                _check_placed(rows, done, tmp, cfg)
                manifest = _manifest(cfg, rows, done, rules)
                _install(tmp, out, manifest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return ShardResult(out=out, manifest=manifest, seconds=time.perf_counter() - t0)
