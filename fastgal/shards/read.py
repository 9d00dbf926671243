"""Reading a shard folder back: manifest.json and a split's samples (keys, offsets, random access).

    from fastgal.shards.read import Shards
    sh = Shards("shards/synth")              # manifest.json, read and checked once
    valid = sh.split("valid")                # its index files, parsed once: keys, offsets, random access

write.py writes what this module reads (and imports its format constants from here: the flow is
write -> read, never back); index.py parses the DALI index files, verify.py re-checks everything.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from pathlib import Path

import numpy as np

from fastgal import __version__
from fastgal.shards.index import INDEX_VERSION, is_shard_file, read_index
from fastgal.util import HashCache, OutLock, Progress

FORMAT = "fastgal-shards"
FORMAT_VERSION = 1  # JPEG shards
FLOAT_FORMAT_VERSION = 2  # shards of FITS bands (raw float arrays): a fastgal that reads only JPEG shards refuses them
READS = (FORMAT_VERSION, FLOAT_FORMAT_VERSION)


# --------------------------------------------------------------------------- the manifest

def load_manifest(folder) -> dict:
    """manifest.json of a finished shard folder, checked against the files beside it.

    Raises ValueError (one line naming the file and the fix) when there is no manifest, it is
    not ours or of another format version, or a shard/index it lists is missing or the wrong size.
    """
    folder = Path(folder)
    mpath = folder / "manifest.json"
    redo = f"re-run `fastgal shard CATALOG IMAGES {folder} --overwrite`"
    busy = OutLock(folder, "").busy() if folder.is_dir() else None
    if busy:  # `fastgal shard` (--overwrite) at work: what is there now is not yet, or no longer, a finished folder
        raise ValueError(f"{folder} is being written by {busy}; wait for it to finish")
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
        self._checked = False

    def check_sha256(self, quiet: bool = False) -> None:
        """Every tar's sha256 against the manifest (sizes were checked on reading it), once per Shards and,
        through util.HashCache, once per file: a file unchanged since it was hashed (or written by `fastgal
        shard`, which records what it wrote) is not read again. A mismatch raises ValueError, one line
        naming the tar and the fix. Run before training or predicting on shards."""
        if self._checked:
            return
        entries = [e for sp in self.manifest["shards"].values() for e in sp]
        cache = HashCache()
        todo = [e for e in entries if cache.get(self.folder / e["file"]) is None]
        nbytes = sum(e["bytes"] for e in todo)
        log = Progress(len(todo), "sha256", quiet, unit="tar")
        if nbytes > 1 << 30:  # a whole line where it takes a while (~1 GB/s); tiny folders pass in silence
            log.line(f"checking the sha256 of {len(todo)} shard(s) ({nbytes / 1e9:,.1f} GB) against "
                     f"{self.folder / 'manifest.json'}; once per file (cached in {cache.path})")
        try:
            for e in entries:
                tar = self.folder / e["file"]
                if cache.sha256(tar) != e["sha256"]:
                    raise ValueError(f"{tar} does not match {self.folder / 'manifest.json'} (sha256 differs: changed or "
                                     f"corrupted since it was written); re-shard with `fastgal shard ... --overwrite`, "
                                     f"or run `fastgal info {self.folder}` to see every problem")
                log.update()
        finally:
            log.close()
            cache.save()  # a mismatch too: the next run refuses without hashing again
        self._checked = True

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
        side = image["precrop"] or None
        self.stored: tuple[int, int] = (side, side) if side else tuple(image["size"])  # every sample's (h, w)
        if self.kind == "float":  # every sample's (bands, H, W) little-endian array
            self.shape = (len(image["bands"]), *self.stored)
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

    def subset(self, keep, name: str | None = None) -> "Split":
        """The samples where `keep` (a bool mask over file order) is true, in file order, as a Split of their own
        (the same tars, the index rows selected): e.g. a validation split without its conformal calibration part."""
        import copy

        keep = np.asarray(keep, bool)
        if keep.shape != (len(self),):
            raise ValueError(f"a mask of {keep.shape} for {len(self)} samples of {self.name}")
        sub = copy.copy(self)
        sub.name = name or self.name
        sub.keys = [k for k, m in zip(self.keys, keep) if m]
        for a in ("tar", "img_off", "img_size", "y_off", "y_size", "meta_off", "meta_size"):
            setattr(sub, a, getattr(self, a)[keep])
        sub._maps, sub._columns = {}, {}
        return sub

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

    def row(self, i: int) -> dict:
        """Sample i's catalog row as the shards carry it (its json; the id a string)."""
        raw = self._map(int(self.tar[i]))[int(self.meta_off[i]):int(self.meta_off[i] + self.meta_size[i])]
        return json.loads(raw)

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


