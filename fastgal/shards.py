"""catalog + JPEGs -> WebDataset tar shards + DALI indexes + manifest.json + rejects.csv.

    fastgal synth /tmp/s --n 500 && fastgal shard /tmp/s/data/master.csv /tmp/s/images /tmp/s/shards
    fastgal info /tmp/s/shards

Stages:
  read_catalog -> check_rows    every row: exact id, no duplicate, finite numeric targets (catalog.py)
  split -> order                fastai RandomSplitter(valid_pct, seed) over the rows that passed;
                                then a seeded shuffle per split, because DALI reads tars in order
                                and shuffles only inside a buffer (a sorted catalog would bias batches)
  modal_size                    the survey's cutout size, from JPEG headers only
  _check_image (workers)        every image fully decoded, in parallel, in write order and a few
                                chunks ahead of the writer, so decoding and writing overlap
  _SplitWriter                  webdataset TarWriter, USTAR with fixed headers; DALI's wds2idx index
  manifest                      counts, split, sha256s, target and pixel statistics; written last

Layout of OUT (the contract the DALI pipeline reads):
  train-000000.tar/.idx ...  valid-000000.tar/.idx ...  manifest.json  rejects.csv (row,id,reason,detail)
  sample: __key__ = id, jpg = original bytes (or the --precrop centre crop, JPEG q95),
          target.f32 = little-endian float32 per target (manifest order), json = the catalog row.

Error policy: a row that cannot be used never stops the run; it goes to rejects.csv with a reason
(REASONS below). Problems with the inputs as a whole (no catalog, no such column, ids saved as
floats, no images folder, zero usable samples) raise ValueError with a one-line fix. Before
success we check rows = samples + rejects, each row exactly once. Files are made in a hidden temp
folder and moved into OUT with manifest.json last, so a folder without manifest.json is unfinished.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass
from itertools import islice
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from . import __version__
from .catalog import SPLIT_METHOD, check_rows, json_value, random_split, read_catalog
from .config import ShardConfig
from .util import Progress, default_workers, sha256_file, write_json_atomic

FORMAT = "fastgal-shards"
FORMAT_VERSION = 1
COMPONENTS = {"image": "jpg", "targets": "target.f32", "meta": "json"}
PRECROP_QUALITY = 95
TAR_MTIME = 0  # fixed header fields make the tars byte-reproducible
TAR_USER = "fastgal"
BLANK_MAX = 10  # a frame whose brightest pixel is <= this (0-255) is all dark: nothing to learn from
FLAT_STD = 1.0  # ... and one whose every channel has std below this is a flat placeholder
INDEX_VERSION = "v1.2"  # DALI's wds2idx format

# Every reason a row can be rejected for. Greyscale and CMYK JPEGs are rejected (not-rgb), not
# converted: the gri colours carry most of the metallicity signal, so a colourless cutout is not
# a cutout of the kind the model is trained on, and a silent conversion would hide a bad download.
REASONS = {
    "bad-id": "the id is empty, float-formatted or has characters a tar member name cannot carry",
    "duplicate-id": "the id appears on more than one row",
    "missing-target": "a target cell is empty",
    "non-numeric-target": "a target cell is not a number",
    "non-finite-target": "a target is NaN or infinite (as float32)",
    "missing-image": "no IMAGES/{id}.jpg",
    "not-jpeg": "the file is not a JPEG (e.g. an HTML error page saved as .jpg)",
    "corrupt-image": "the JPEG is truncated or does not decode",
    "not-rgb": "greyscale or CMYK JPEG (rejected, not converted)",
    "too-small": "smaller than the crop the pipeline takes (--precrop or 144 px)",
    "wrong-size": "a different size from the survey's usual cutout size (without --precrop)",
    "blank-image": "an all-dark or flat frame",
}


# --------------------------------------------------------------------------- validation (workers)

def _check_image(path: str, crop: int, precrop: int | None, size: tuple[int, int] | None, region: int):
    """Decode one image fully. Returns (reason, detail, data, stats): data = the bytes to store,
    stats = per-channel sums and sums of squares (exact ints) over the centre region x region
    of the stored image, as the pipeline will decode it."""
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG must fail, whatever a library set
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return "missing-image", f"{path} not found", None, None
    except OSError as e:
        return "missing-image", f"{path}: {e.strerror or e}", None, None
    if len(data) == 0:
        return "corrupt-image", "empty file", None, None
    if not data.startswith(b"\xff\xd8\xff"):
        head = data[:16].decode("ascii", "replace").strip()
        return "not-jpeg", f"starts with {head!r}", None, None
    try:
        im = Image.open(io.BytesIO(data))
        if im.format != "JPEG":
            return "not-jpeg", f"PIL reads it as {im.format}", None, None
        im.load()  # the full decode: verify() alone passes truncated JPEGs
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken data
        return "corrupt-image", f"{type(e).__name__}: {e}"[:200], None, None
    w, h = im.size
    if im.mode != "RGB":
        return "not-rgb", f"mode {im.mode}", None, None
    need = precrop or crop
    if min(h, w) < need:
        return "too-small", f"{w}x{h} px < {need} px crop", None, None
    if size is not None and (h, w) != size:
        return "wrong-size", f"{w}x{h} px; most images are {size[1]}x{size[0]}", None, None
    hist = np.asarray(im.histogram(), np.int64).reshape(3, 256)
    levels = np.arange(256, dtype=np.int64)
    npix = h * w
    mean = hist @ levels / npix
    std = np.sqrt(np.maximum(hist @ (levels * levels) / npix - mean * mean, 0))
    vmax = int(np.max(np.nonzero(hist.sum(0))[0]))
    if vmax <= BLANK_MAX:
        return "blank-image", f"all dark (brightest pixel {vmax})", None, None
    if np.all(std < FLAT_STD):
        return "blank-image", f"flat frame (channel std {std.max():.2f})", None, None
    if precrop:
        data = _precrop_bytes(im, precrop)
        im = Image.open(io.BytesIO(data))
        im.load()
    sw, sh = im.size
    top, left = (sh - region) // 2, (sw - region) // 2
    hc = np.asarray(im.crop((left, top, left + region, top + region)).histogram(), np.int64).reshape(3, 256)
    stats = tuple(int(x) for x in hc @ levels) + tuple(int(x) for x in hc @ (levels * levels))
    return None, "", data, stats


def _precrop_bytes(im, px: int) -> bytes:
    """The centre px x px crop of a loaded PIL image, as JPEG q95 (deterministic for the same input)."""
    w, h = im.size
    top, left = (h - px) // 2, (w - px) // 2
    buf = io.BytesIO()
    im.crop((left, top, left + px, top + px)).save(buf, format="JPEG", quality=PRECROP_QUALITY)
    return buf.getvalue()


def _check_chunk(args):
    items, crop, precrop, size, region = args
    return [(pos, *_check_image(path, crop, precrop, size, region)) for pos, path in items]


def _size_chunk(items):
    """Header-only pass: [(pos, path)] -> [(h, w) or None]. Reads the JPEG's frame header, no decode."""
    from PIL import Image

    out = []
    for _pos, path in items:
        try:
            with Image.open(path) as im:
                out.append((im.size[1], im.size[0]) if im.format == "JPEG" else None)
        except Exception:  # unreadable files are rejected, with their reason, by the full check
            out.append(None)
    return out


def _pool(workers: int):
    if workers <= 1:
        return None
    return get_context("fork" if hasattr(os, "fork") else "spawn").Pool(workers)


def _ordered(fn, tasks, pool, window: int):
    """fn over tasks, results in task order; at most `window` tasks in flight, so workers decode
    ahead of the writer without piling every image of the survey up in memory."""
    if pool is None:
        for t in tasks:
            yield fn(t)
        return
    it = iter(tasks)
    pending = deque(pool.apply_async(fn, (t,)) for t in islice(it, window))
    while pending:
        res = pending.popleft().get()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.apply_async(fn, (nxt,)))
        yield res


def _chunks(seq, k: int):
    return [seq[a:a + k] for a in range(0, len(seq), k)]


def modal_size(items: list[tuple[int, str]], pool, workers: int) -> tuple[int, int] | None:
    """The most common (h, w) among the images (ties: the first in catalog order)."""
    sizes = Counter()
    for res in _ordered(_size_chunk, _chunks(items, 256), pool, 4 * workers):
        sizes.update(s for s in res if s is not None)
    return sizes.most_common(1)[0][0] if sizes else None


# --------------------------------------------------------------------------- tars and indexes

def split_name(name: str) -> tuple[str, str]:
    """Member name -> (basename, extension) at the first dot after the last slash, as DALI does."""
    dot = name.find(".", name.rfind("/") + 1)
    return name[:dot], name[dot + 1:]


def index_text(tar_path) -> str:
    """The DALI index of a tar, computed with Python's tarfile: the same bytes wds2idx writes."""
    bundles: list[list[tuple]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tf:
        for m in tf:
            if not m.isreg():
                continue
            base, ext = split_name(m.name)
            if not base or base.endswith("/"):
                continue
            comp = (ext, m.offset_data, m.size, m.name)
            if base != last:
                bundles.append([comp])
                last = base
            else:
                bundles[-1].append(comp)
    if not bundles:
        raise ValueError(f"{tar_path} holds no samples; an empty tar cannot be indexed")
    lines = [" ".join(" ".join(map(str, c)) for c in b) for b in bundles]
    return f"{INDEX_VERSION} {len(bundles)}\n" + "".join(line + "\n" for line in lines)


def make_index(tar_path, idx_path) -> None:
    """Write the DALI index beside a tar: DALI's own wds2idx when importable, else index_text()."""
    try:
        from wds2idx import IndexCreator  # ships with nvidia-dali (Linux)
    except ImportError:  # macOS has no DALI wheels: same format from our own reader
        Path(idx_path).write_text(index_text(tar_path))
        return
    with IndexCreator(str(tar_path), str(idx_path), verbose=False) as ic:
        ic.create_index()


def _tar_writer(f):
    from webdataset import TarWriter

    # encoder=False: we hand over bytes; USTAR (TarWriter's default) with short ASCII names needs
    # no PAX headers, which DALI's reader does not parse; fixed mtime/owner make it reproducible.
    tw = TarWriter(f, user=TAR_USER, group=TAR_USER, mode=0o444, encoder=False, mtime=TAR_MTIME)
    tw.tarstream.format = tarfile.USTAR_FORMAT  # TarWriter 1.0.2 ignores its format=; a field that
    return tw                                   # does not fit USTAR now raises instead of adding PAX


def read_index(idx_path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """A DALI index, in sample order: [(key, {ext: (offset, size)})]. Lines are `ext offset size
    filename` repeated per component; the key is the filename before its first dot."""
    out = []
    for line in Path(idx_path).read_text().splitlines()[1:]:
        parts = line.split()
        comps = {parts[j]: (int(parts[j + 1]), int(parts[j + 2])) for j in range(0, len(parts), 4)}
        out.append((split_name(parts[3])[0], comps))
    return out


def index_keys(idx_paths) -> list[str]:
    """Sample keys in the order a sequential reader (DALI's valid graph) delivers them."""
    return [key for idx in idx_paths for key, _ in read_index(idx)]


def index_count(idx_path) -> int:
    head = Path(idx_path).read_text().split("\n", 1)[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION:
        raise ValueError(f"{idx_path} is not a DALI {INDEX_VERSION} index")
    return int(head[1])


# --------------------------------------------------------------------------- the command

@dataclass
class ShardResult:
    out: Path
    manifest: dict
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.manifest["counts"]["catalog_rows"] / max(self.seconds, 1e-9)


_OURS = re.compile(r"^((train|valid)-\d{6}\.(tar|idx)|manifest\.json|rejects\.csv)$")


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an OUT that already holds shards unless overwrite; refuse an unwritable one."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; pass a folder path for the shards")
    if out.exists() and not overwrite:
        if (out / "manifest.json").exists():
            raise ValueError(f"{out} already holds finished shards (manifest.json); pass --overwrite to replace them, or choose another folder")
        if any(_OURS.match(p.name) for p in out.iterdir()):
            raise ValueError(f"{out} holds shard files from an unfinished run; pass --overwrite to replace them, or choose another folder")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{parent} is not writable; choose a folder you can write to")


def _check_config(cfg: ShardConfig) -> None:
    if not 0 <= cfg.valid_pct < 1:
        raise ValueError(f"--valid-pct must be in [0, 1), got {cfg.valid_pct}")
    if cfg.shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1 sample, got {cfg.shard_size}")
    if cfg.precrop is not None and cfg.precrop < 16:
        raise ValueError(f"--precrop must be at least 16 pixels, got {cfg.precrop}")
    if cfg.crop < 1:
        raise ValueError(f"crop must be positive, got {cfg.crop}")
    if cfg.workers < 0:
        raise ValueError(f"--workers must be 0 (all cores) or more, got {cfg.workers}")
    if len(set(cfg.targets)) != len(cfg.targets):
        raise ValueError(f"--target repeats a column: {cfg.targets}; name each target once")
    if not Path(cfg.images).is_dir():
        raise ValueError(f"images folder {cfg.images} not found; pass the folder that holds {{id}}.jpg")


def shard(cfg: ShardConfig) -> ShardResult:
    """Run every stage; returns the manifest. Raises ValueError for user errors."""
    t0 = time.perf_counter()
    _check_config(cfg)
    out, images, catalog = Path(cfg.out), Path(cfg.images), Path(cfg.catalog)
    targets = list(cfg.targets)
    df = read_catalog(catalog, cfg.id_col, targets)
    check_out(out, cfg.overwrite)
    workers = cfg.workers or default_workers()
    n = len(df)
    ids = df[cfg.id_col].tolist()

    # rows: ids, duplicates, targets (cheap, in this process)
    y, rejects = check_rows(df, cfg.id_col, targets)
    cand = [p for p in range(n) if p not in rejects]

    # split over the rows that passed (fastai semantics), then a seeded write order per split.
    # Done before the images are decoded so that decoding (workers) and writing (here) overlap;
    # an image rejected later just leaves its split, so one bad file never reshuffles the rest.
    cand_arr = np.asarray(cand, np.int64)
    tr, va = random_split(len(cand_arr), cfg.valid_pct, cfg.seed)
    order = {}
    for k, (name, sel) in enumerate((("train", tr), ("valid", va))):
        rows = np.sort(cand_arr[sel])
        order[name] = rows[np.random.default_rng([cfg.seed, k]).permutation(len(rows))].tolist()

    pool = _pool(workers)
    tmp = None
    try:
        paths = {p: str(images / f"{ids[p]}.jpg") for p in cand}
        # one cutout size per survey: the pipeline crops a fixed region and the manifest records one size
        if cfg.precrop:
            size = (cfg.precrop, cfg.precrop)
            expect = None
        else:
            size = expect = modal_size(sorted(paths.items()), pool, workers)
        region = min(cfg.crop, *size) if size else cfg.crop

        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".shard-", dir=out))
        written: dict[str, list[int]] = {}
        entries: dict[str, list[dict]] = {}
        sums = [0] * 6  # per-channel sums, sums of squares over the training images' centre region
        records = df.to_numpy(dtype=object)
        columns = list(df.columns)
        id_j = columns.index(cfg.id_col)
        with Progress(len(cand), "shard", cfg.quiet, unit="img") as prog:
            for name, rows in order.items():
                tasks = [([(p, paths[p]) for p in part], cfg.crop, cfg.precrop, expect, region)
                         for part in _chunks(rows, 32)]
                writer = _SplitWriter(tmp, name, cfg.shard_size)
                for res in _ordered(_check_chunk, tasks, pool, 4 * workers):
                    for pos, reason, detail, data, stats in res:
                        if reason:
                            rejects[pos] = (reason, detail)
                            continue
                        rec = records[pos]
                        meta = {c: (ids[pos] if j == id_j else json_value(rec[j])) for j, c in enumerate(columns)}
                        writer.write({
                            "__key__": ids[pos],
                            "jpg": data,
                            "target.f32": np.asarray(y[pos], "<f4").tobytes(),
                            "json": json.dumps(meta, separators=(",", ":"), allow_nan=False).encode(),
                        }, pos)
                        if name == "train":
                            for i in range(6):
                                sums[i] += stats[i]
                    prog.update(len(res))
                entries[name], written[name] = writer.close()
        if pool is not None:
            pool.close()

        write_rejects(tmp / "rejects.csv", rejects, ids)
        if not written["train"]:
            by = Counter(r for r, _ in rejects.values())
            where = ""
            if not (out / "manifest.json").exists():  # never mix a failed run into a finished folder
                os.replace(tmp / "rejects.csv", out / "rejects.csv")
                where = f"; see {out / 'rejects.csv'}"
            what = (f"all {n} rows of {catalog} were rejected" if not written["valid"] else
                    f"{len(rejects)} of {n} rows of {catalog} were rejected, none left for training")
            raise ValueError(f"no usable samples: {what} "
                             f"({', '.join(f'{k} {v}' for k, v in by.most_common())}){where}")

        # nothing lost: every catalog row is a sample or a reject, exactly once
        placed = written["train"] + written["valid"] + list(rejects)
        if len(placed) != n or set(placed) != set(range(n)):
            raise RuntimeError(f"internal error: {n} catalog rows but {len(placed)} placed "
                               f"({len(set(placed))} distinct); please report this")

        tr_rows = written["train"]
        ytr = y[tr_rows]
        target_stats = {t: {"mean": float(ytr[:, j].mean()), "std": float(ytr[:, j].std()),
                            "min": float(ytr[:, j].min()), "max": float(ytr[:, j].max())}
                        for j, t in enumerate(targets)}
        npix = len(tr_rows) * region * region
        mean = [s / npix for s in sums[:3]]
        std = [math.sqrt(max(ss / npix - m * m, 0.0)) for ss, m in zip(sums[3:], mean)]
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fastgal_version": __version__,
            "source": {"catalog": str(catalog.resolve()), "catalog_sha256": sha256_file(catalog),
                       "images": str(images.resolve())},
            "id_col": cfg.id_col,
            "targets": targets,
            "target_stats": target_stats,
            "components": dict(COMPONENTS),
            "split": {"valid_pct": cfg.valid_pct, "seed": cfg.seed, "method": SPLIT_METHOD},
            "order_seed": cfg.seed,
            "counts": {"catalog_rows": n, "train": len(written["train"]), "valid": len(written["valid"]),
                       "rejected": len(rejects)},
            "rejects_by_reason": dict(sorted(Counter(r for r, _ in rejects.values()).items())),
            "shards": entries,
            # the training reader seeks every sample through the .idx files (fastgal.order): their format
            "index_format": INDEX_VERSION,
            "image": {"size": list(size), "precrop": cfg.precrop, "channels": 3},
            "pixel_stats": {"region": region, "mean": mean, "std": std},
        }
        c = manifest["counts"]
        if c["train"] + c["valid"] + c["rejected"] != c["catalog_rows"]:
            raise RuntimeError("internal error: counts do not add up; please report this")
        _install(tmp, out)
        write_json_atomic(out / "manifest.json", manifest)  # last: its presence means "finished"
        os.chmod(out / "manifest.json", 0o644)
    finally:
        if pool is not None:
            pool.terminate()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return ShardResult(out=out, manifest=manifest, seconds=time.perf_counter() - t0)


def write_rejects(path: Path, rejects: dict, ids: list[str]) -> None:
    """rejects.csv: row (1-based data row, header excluded), id, reason, detail; in catalog order."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "id", "reason", "detail"])
        for pos in sorted(rejects):
            reason, detail = rejects[pos]
            w.writerow([pos + 1, ids[pos], reason, detail])


class _SplitWriter:
    """Writes one split's samples into name-000000.tar, name-000001.tar, ... of shard_size samples,
    indexing and hashing each tar as it is closed."""

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


def _install(tmp: Path, out: Path) -> None:
    """Replace OUT's shard files with tmp's. The old manifest goes first, so at no moment does a
    mix of old and new files look finished; files that are not ours are left alone."""
    (out / "manifest.json").unlink(missing_ok=True)
    for p in out.iterdir():
        if _OURS.match(p.name) and p.is_file():
            p.unlink()
    for p in sorted(tmp.iterdir()):
        os.replace(p, out / p.name)


# --------------------------------------------------------------------------- reading it back

def load_manifest(folder) -> dict:
    """manifest.json of a finished shard folder, checked against the files beside it.

    Raises ValueError (one line naming the file and the fix) when there is no manifest, it is
    not ours or of another format version, or a shard/index it lists is missing or the wrong size.
    """
    folder = Path(folder)
    mpath = folder / "manifest.json"
    redo = f"re-run `fastgal shard CATALOG IMAGES {folder} --overwrite`"
    if not mpath.is_file():
        if folder.is_dir() and any(_OURS.match(p.name) for p in folder.iterdir()):
            raise ValueError(f"{folder} has shard files but no manifest.json (an unfinished run); {redo}")
        raise ValueError(f"no manifest.json in {folder}; make shards there with `fastgal shard CATALOG IMAGES {folder}`")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{mpath} is not valid JSON ({e}); {redo}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{mpath} is not a fastgal shard manifest (format {m.get('format') if isinstance(m, dict) else None!r}); {redo}")
    if m.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{mpath} has format_version {m.get('format_version')!r} but this fastgal "
                         f"({__version__}) reads {FORMAT_VERSION}; {redo} or use the matching fastgal")
    for split, entries in m.get("shards", {}).items():
        for e in entries:
            for key in ("file", "index"):
                p = folder / e[key]
                if not p.is_file():
                    raise ValueError(f"{p} is missing (listed in {mpath}); {redo}")
            tar = folder / e["file"]
            if tar.stat().st_size != e["bytes"]:
                raise ValueError(f"{tar} is {tar.stat().st_size} bytes, {mpath} says {e['bytes']}; "
                                 f"the shard was changed or truncated; {redo}")
    return m


def training_crop(manifest: dict, asked: int | None = None) -> int:
    """The centre region training crops are drawn from: the one the shards were made for (their
    pixel statistics are over it). `asked` (a --crop) must agree: other statistics would be wrong."""
    made = manifest["image"].get("crop") or manifest["pixel_stats"]["region"]
    if manifest["image"].get("precrop"):
        made = manifest["image"]["precrop"]
    if asked is not None and asked != made:
        raise ValueError(f"--crop {asked} but the shards were made for a {made} px crop region (their pixel statistics "
                         f"are over it); drop --crop, or re-shard with `fastgal shard ... --crop {asked}`")
    return made


def shard_files(folder, manifest: dict, split: str) -> tuple[list[str], list[str]]:
    """(tar paths, index paths) of one split, in manifest order, as strings for DALI."""
    if split not in manifest["shards"]:
        raise ValueError(f"no split {split!r} in {Path(folder) / 'manifest.json'} (has {sorted(manifest['shards'])})")
    folder = Path(folder)
    entries = manifest["shards"][split]
    return [str(folder / e["file"]) for e in entries], [str(folder / e["index"]) for e in entries]


def verify(folder) -> dict:
    """Re-check a shard folder in full: sha256 of every tar, its index against its contents,
    every sample's components, keys unique across splits, counts against the manifest and
    rejects.csv. Returns {"ok", "problems", "samples", "bytes", "manifest"}; raises ValueError
    only when load_manifest does."""
    folder = Path(folder)
    m = load_manifest(folder)
    problems = []
    ntargets = len(m["targets"])
    need = {f".{c}" for c in m["components"].values()}
    seen: dict[str, str] = {}
    counts = {}
    total_bytes = 0
    for split, entries in m["shards"].items():
        counts[split] = 0
        for e in entries:
            tar, idx = folder / e["file"], folder / e["index"]
            total_bytes += tar.stat().st_size
            if sha256_file(tar) != e["sha256"]:
                problems.append(f"{tar.name}: sha256 differs from the manifest (changed or corrupted)")
            try:
                if idx.read_text() != index_text(tar):
                    problems.append(f"{idx.name}: does not match the contents of {tar.name}")
                n = _check_tar(tar, need, ntargets, m["id_col"], seen, split, problems)
            except (tarfile.TarError, ValueError, OSError) as ex:
                problems.append(f"{tar.name}: unreadable ({ex})")
                continue
            if n != e["samples"]:
                problems.append(f"{tar.name}: {n} samples, the manifest says {e['samples']}")
            counts[split] += n
    c = m["counts"]
    for split in ("train", "valid"):
        if counts.get(split, 0) != c.get(split):
            problems.append(f"{split}: {counts.get(split, 0)} samples in the shards, the manifest says {c.get(split)}")
    rej = folder / "rejects.csv"
    if not rej.is_file():
        problems.append("rejects.csv is missing")
    else:
        with open(rej, newline="") as f:
            nrej = sum(1 for _ in csv.DictReader(f))
        if nrej != c["rejected"]:
            problems.append(f"rejects.csv has {nrej} rows, the manifest says {c['rejected']}")
    if c["train"] + c["valid"] + c["rejected"] != c["catalog_rows"]:
        problems.append("counts do not add up: train + valid + rejected != catalog_rows")
    return {"ok": not problems, "problems": problems, "samples": counts, "bytes": total_bytes, "manifest": m}


def _check_tar(tar: Path, need: set, ntargets: int, id_col: str, seen: dict, split: str, problems: list) -> int:
    """Walk one tar: group members into samples, check each. Returns the sample count."""
    n = 0
    with tarfile.open(tar, "r:") as tf:
        cur, parts = None, {}

        def done():
            if cur is None:
                return 0
            if set(parts) != need:
                problems.append(f"{tar.name}: sample {cur} has {sorted(parts)}, expected {sorted(need)}")
            if cur in seen:
                problems.append(f"{tar.name}: id {cur} also in {seen[cur]}")
            seen[cur] = f"{split}/{tar.name}"
            t = parts.get(".target.f32")
            if t is not None and len(t) != 4 * ntargets:
                problems.append(f"{tar.name}: {cur}.target.f32 has {len(t)} bytes, expected {4 * ntargets}")
            j = parts.get(".json")
            if j is not None and str(json.loads(j).get(id_col)) != cur:
                problems.append(f"{tar.name}: {cur}.json has a different {id_col}")
            jpg = parts.get(".jpg")
            if jpg is not None and not jpg.startswith(b"\xff\xd8\xff"):
                problems.append(f"{tar.name}: {cur}.jpg is not a JPEG")
            return 1

        for mem in tf:
            if not mem.isreg():
                continue
            base, ext = split_name(mem.name)
            if base != cur:
                n += done()
                cur, parts = base, {}
            parts["." + ext] = tf.extractfile(mem).read()
        n += done()
    return n
