"""Reading a shard folder back: manifest.json, the DALI index files, a split's samples, and `fastgal info`'s check.

    from fastgal.manifest import Shards
    sh = Shards("shards/synth")              # manifest.json, read and checked once
    valid = sh.split("valid")                # its index files, parsed once: keys, offsets, random access

shards.py writes what this module reads (and imports its format helpers from here: the flow is
shards -> manifest, never back). A DALI index (the wds2idx `v1.2` format) is a header line
`v1.2 N` and one line per sample: `ext offset size member-name` for each of its components.
"""

from __future__ import annotations

import csv
import hashlib
import json
import mmap
import re
import tarfile
from pathlib import Path

import numpy as np

from . import __version__
from .util import jpeg_problem, sha256_file

FORMAT = "fastgal-shards"
FORMAT_VERSION = 1  # JPEG shards
FLOAT_FORMAT_VERSION = 2  # shards of FITS bands (raw float arrays): a fastgal that reads only JPEG shards refuses them
READS = (FORMAT_VERSION, FLOAT_FORMAT_VERSION)
INDEX_VERSION = "v1.2"  # DALI's wds2idx format

_SHARD_FILE = re.compile(r"^((train|valid)-\d{6}\.(tar|idx)|manifest\.json|rejects\.csv)$")


def is_shard_file(name: str) -> bool:
    """Whether a file name is one `fastgal shard` writes (and replaces with --overwrite)."""
    return bool(_SHARD_FILE.match(name))


# --------------------------------------------------------------------------- index files

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


def read_index(idx_path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """A DALI index, in sample order: [(key, {ext: (offset, size)})]. Lines are `ext offset size
    filename` repeated per component; the key is the filename before its first dot."""
    out = []
    for line in Path(idx_path).read_text().splitlines()[1:]:
        parts = line.split()
        comps = {parts[j]: (int(parts[j + 1]), int(parts[j + 2])) for j in range(0, len(parts), 4)}
        out.append((split_name(parts[3])[0], comps))
    return out


def index_count(idx_path) -> int:
    head = Path(idx_path).read_text().split("\n", 1)[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION:
        raise ValueError(f"{idx_path} is not a DALI {INDEX_VERSION} index")
    return int(head[1])


# --------------------------------------------------------------------------- the manifest

def load_manifest(folder) -> dict:
    """manifest.json of a finished shard folder, checked against the files beside it.

    Raises ValueError (one line naming the file and the fix) when there is no manifest, it is
    not ours or of another format version, or a shard/index it lists is missing or the wrong size.
    """
    folder = Path(folder)
    mpath = folder / "manifest.json"
    redo = f"re-run `fastgal shard CATALOG IMAGES {folder} --overwrite`"
    if not mpath.is_file():
        if folder.is_dir() and any(is_shard_file(p.name) for p in folder.iterdir()):
            raise ValueError(f"{folder} has shard files but no manifest.json (an unfinished run); {redo}")
        if (folder / "synth.json").is_file() or (folder / "images").is_dir():  # a survey, not shards: shard it elsewhere
            raise ValueError(f"{folder} is a survey (cutouts and a catalog), not shards; make them with `fastgal shard "
                             f"{folder / 'data' / 'master.csv'} {folder / 'images'} shards/{folder.name}` and pass shards/{folder.name}")
        raise ValueError(f"no manifest.json in {folder}; make shards there with `fastgal shard CATALOG IMAGES {folder}`")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{mpath} is not valid JSON ({e}); {redo}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{mpath} is not a fastgal shard manifest (format {m.get('format') if isinstance(m, dict) else None!r}); {redo}")
    if m.get("format_version") not in READS:
        raise ValueError(f"{mpath} has format_version {m.get('format_version')!r} but this fastgal "
                         f"({__version__}) reads {' and '.join(map(str, READS))}; {redo} or use the matching fastgal")
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
    made = manifest["image"]["precrop"] or manifest["image"]["crop"]
    if asked is not None and asked != made:
        raise ValueError(f"--crop {asked} but the shards were made for a {made} px crop region (their pixel statistics "
                         f"are over it); drop --crop, or re-shard with `fastgal shard ... --crop {asked}`")
    return made


class Shards:
    """A finished shard folder, its manifest read and checked once; `split(name)` parses that split's
    index files once and hands out the same Split to everything that asks.

    Example:
        shards = fastgal.Shards("shards/synth")
        shards.targets, shards.image_size, shards.pixel_mean, len(shards.split("train"))
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)  # one-line ValueError on a bad folder
        fmt = self.manifest.get("index_format")
        if fmt != INDEX_VERSION:
            raise ValueError(f"{self.folder}: index files of format {fmt!r}, this fastgal reads {INDEX_VERSION}; "
                             "re-shard with `fastgal shard ... --overwrite`")
        self._splits: dict[str, Split] = {}

    @property
    def targets(self) -> list[str]:
        return list(self.manifest["targets"])

    @property
    def precrop(self) -> int | None:
        return self.manifest["image"]["precrop"]

    @property
    def image_size(self) -> list[int]:
        return list(self.manifest["image"]["size"])

    @property
    def kind(self) -> str:
        """'jpeg' (8-bit RGB JPEGs) or 'float' (FITS bands stored as raw float arrays)."""
        return self.manifest["image"].get("kind", "jpeg")

    @property
    def bands(self) -> list[str]:
        """The image's channels: the FITS bands in order, or R, G, B for JPEG shards."""
        return list(self.manifest["image"].get("bands") or ["R", "G", "B"])

    @property
    def channels(self) -> int:
        return len(self.bands)

    @property
    def stretch(self) -> dict | None:
        """The stretch float shards declare for the loaders ({"name": "asinh", "softening": [...]}); None for JPEGs."""
        return self.manifest.get("stretch")

    @property
    def pixel_mean(self) -> list[float]:
        return list(self.manifest["pixel_stats"]["mean"])

    @property
    def pixel_std(self) -> list[float]:
        return list(self.manifest["pixel_stats"]["std"])

    def crop(self, asked: int | None = None) -> int:
        return training_crop(self.manifest, asked)

    def target_stats(self) -> tuple[list[float], list[float]]:
        """(mean, std) of each target over the training split (std 1 where it is 0)."""
        ts = self.manifest["target_stats"]
        return [ts[t]["mean"] for t in self.targets], [ts[t]["std"] or 1.0 for t in self.targets]

    def sha256(self) -> str:
        """One hash over every shard's sha256 (train, then valid): which data a run saw."""
        return hashlib.sha256("".join(e["sha256"] for sp in ("train", "valid")
                                      for e in self.manifest["shards"][sp]).encode()).hexdigest()

    def split(self, name: str) -> "Split":
        if name not in self._splits:
            if name not in self.manifest["shards"]:
                raise ValueError(f"no split {name!r} in {self.folder / 'manifest.json'} (has {sorted(self.manifest['shards'])})")
            self._splits[name] = Split(self, name)
        return self._splits[name]


class Split:
    """One split of a shard folder: its tars and the parsed DALI index (every sample's key and the byte
    offsets of its image, targets and json), read once. Random access by position (file order) goes
    through memory-mapped tars, mapped lazily once per process and dropped when pickled to a worker, so a
    sample is a slice of the page cache: no system call per read, nothing copied until a decoder takes it.

    Example:
        sp = Shards("shards/synth").split("valid")
        jpegs, y = sp.batch(range(8)); sp.keys[:3]; sp.all_targets(); sp.column("lgm_tot_p50")
    """

    def __init__(self, shards: Shards, name: str):
        self.shards, self.name = shards, name
        m = shards.manifest
        entries = m["shards"][name]
        self.tars = [str(shards.folder / e["file"]) for e in entries]
        self.idxs = [str(shards.folder / e["index"]) for e in entries]
        comp = m["components"]
        self.image_ext, self.target_ext, self.meta_ext = comp["image"], comp["targets"], comp["meta"]
        keys, rows = [], []
        for t, idx in enumerate(self.idxs):
            for key, c in read_index(idx):
                keys.append(key)
                rows.append((t, *c[self.image_ext], *c[self.target_ext], *c[self.meta_ext]))
        self.keys: list[str] = keys
        a = np.asarray(rows, dtype=np.int64).reshape(-1, 7)
        self.tar, self.img_off, self.img_size, self.y_off, self.y_size, self.meta_off, self.meta_size = a.T
        self.ntargets = len(m["targets"])
        image = m["image"]
        self.kind = image.get("kind", "jpeg")
        if self.kind == "float":  # every sample's (bands, H, W) little-endian array
            side = image["precrop"] or None
            h, w = (side, side) if side else image["size"]
            self.shape = (len(image["bands"]), h, w)
            self.dtype = np.dtype("<f2" if image["dtype"] == "float16" else "<f4")
            nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
            if len(a) and int(self.img_size[0]) != nbytes:
                raise ValueError(f"{self.idxs[0]}: images of {int(self.img_size[0])} bytes, the manifest says "
                                 f"{self.shape} {image['dtype']} ({nbytes}); re-shard with `fastgal shard ... --overwrite`")
        if len(a) and int(self.y_size[0]) != 4 * self.ntargets:
            raise ValueError(f"{self.idxs[0]}: targets of {int(self.y_size[0])} bytes, the manifest lists "
                             f"{self.ntargets} float32 target(s); re-shard with `fastgal shard ... --overwrite`")
        self._maps: dict[int, mmap.mmap] = {}
        self._columns: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}  # a worker maps the files itself

    def _map(self, t: int) -> mmap.mmap:
        m = self._maps.get(t)
        if m is None:
            with open(self.tars[t], "rb") as f:
                m = self._maps[t] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return m

    def jpeg(self, i: int) -> np.ndarray:
        return np.frombuffer(self._map(int(self.tar[i])), np.uint8, int(self.img_size[i]), int(self.img_off[i]))

    def image(self, i: int) -> np.ndarray:
        """Sample i's image as stored: JPEG bytes (1-D uint8), or the (bands, H, W) float array of FITS shards
        (a read-only view of the mapped tar: nothing is copied until a loader takes it)."""
        if self.kind == "jpeg":
            return self.jpeg(i)
        n = int(np.prod(self.shape))
        return np.frombuffer(self._map(int(self.tar[i])), self.dtype, n, int(self.img_off[i])).reshape(self.shape)

    def target(self, i: int) -> np.ndarray:
        return np.frombuffer(self._map(int(self.tar[i])), "<f4", self.ntargets, int(self.y_off[i]))

    def batch(self, pos) -> tuple[list[np.ndarray], np.ndarray]:
        """(an image per sample, as Split.image gives it: JPEG bytes or a float array; targets as a
        (len(pos), ntargets) float32 array)."""
        return [self.image(i) for i in pos], np.stack([self.target(i) for i in pos])

    def all_targets(self) -> np.ndarray:
        """Every sample's targets, (n, ntargets) float32, in file order."""
        return self.batch(range(len(self)))[1] if len(self) else np.zeros((0, self.ntargets), np.float32)

    def column(self, name: str) -> np.ndarray:
        """One catalog column of every sample, in file order, from the samples' json (the catalog row the
        shards carry), read through the parsed index: float, NaN where missing, empty or not a number."""
        if name not in self._columns:
            out = np.full(len(self), np.nan)
            for i in range(len(self)):
                raw = self._map(int(self.tar[i]))[int(self.meta_off[i]):int(self.meta_off[i] + self.meta_size[i])]
                try:
                    out[i] = float(json.loads(raw).get(name))
                except (TypeError, ValueError):
                    pass
            self._columns[name] = out
        return self._columns[name]


# --------------------------------------------------------------------------- fastgal info

def verify(folder) -> dict:
    """Re-check a shard folder in full: sha256 of every tar, its index against its contents,
    every sample's components, keys unique across splits, counts against the manifest and
    rejects.csv. Returns {"ok", "problems", "samples", "bytes", "manifest"}; raises ValueError
    only when load_manifest does."""
    folder = Path(folder)
    m = load_manifest(folder)
    problems = []
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
                n = _check_tar(tar, m, seen, split, problems)
            except (tarfile.TarError, ValueError, OSError) as ex:
                problems.append(f"{tar.name}: unreadable ({ex})")
                continue
            if n != e["samples"]:
                problems.append(f"{tar.name}: {n} samples, the manifest says {e['samples']}")
            counts[split] += n
    problems += _count_problems(folder, m["counts"], counts)
    return {"ok": not problems, "problems": problems, "samples": counts, "bytes": total_bytes, "manifest": m}


def _count_problems(folder: Path, c: dict, counts: dict) -> list[str]:
    """The samples found and rejects.csv against the manifest's counts."""
    problems = []
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
    return problems


def _tar_samples(tf: tarfile.TarFile):
    """(key, {".ext": bytes}) per sample of an open tar: consecutive members with one basename."""
    cur, parts = None, {}
    for mem in tf:
        if not mem.isreg():
            continue
        base, ext = split_name(mem.name)
        if base != cur:
            if cur is not None:
                yield cur, parts
            cur, parts = base, {}
        parts["." + ext] = tf.extractfile(mem).read()
    if cur is not None:
        yield cur, parts


def _check_tar(tar: Path, m: dict, seen: dict, split: str, problems: list) -> int:
    """Walk one tar, checking each sample against the manifest. Returns the sample count."""
    need = {f".{c}" for c in m["components"].values()}
    ntargets, id_col = len(m["targets"]), m["id_col"]
    n = 0
    with tarfile.open(tar, "r:") as tf:
        for key, parts in _tar_samples(tf):
            n += 1
            if set(parts) != need:
                problems.append(f"{tar.name}: sample {key} has {sorted(parts)}, expected {sorted(need)}")
            if key in seen:
                problems.append(f"{tar.name}: id {key} also in {seen[key]}")
            seen[key] = f"{split}/{tar.name}"
            t = parts.get(".target.f32")
            if t is not None and len(t) != 4 * ntargets:
                problems.append(f"{tar.name}: {key}.target.f32 has {len(t)} bytes, expected {4 * ntargets}")
            j = parts.get(".json")
            if j is not None and str(json.loads(j).get(id_col)) != key:
                problems.append(f"{tar.name}: {key}.json has a different {id_col}")
            jpg = parts.get(".jpg")
            if jpg is not None and jpeg_problem(jpg):
                problems.append(f"{tar.name}: {key}.jpg is not a JPEG")
            flux = parts.get("." + m["components"]["image"]) if m["image"].get("kind") == "float" else None
            if flux is not None:
                im = m["image"]
                h, w = (im["precrop"],) * 2 if im["precrop"] else im["size"]
                want = len(im["bands"]) * h * w * (2 if im["dtype"] == "float16" else 4)
                if len(flux) != want:
                    problems.append(f"{tar.name}: {key}.{m['components']['image']} has {len(flux)} bytes, expected {want}")
    return n
