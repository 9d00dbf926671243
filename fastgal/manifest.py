"""Reading a shard folder: manifest.json, the DALI index files, the shard lists, and `fastgal info`.

    from fastgal.manifest import load_manifest, shard_files
    m = load_manifest("shards/synth")
    tars, idxs = shard_files("shards/synth", m, "train")

shards.py writes what this module reads (and imports its format helpers from here: the flow is
shards -> manifest, never back). A DALI index (the wds2idx `v1.2` format) is a header line
`v1.2 N` and one line per sample: `ext offset size member-name` for each of its components.
"""

from __future__ import annotations

import csv
import json
import re
import tarfile
from pathlib import Path

import numpy as np

from . import __version__
from .util import jpeg_problem, sha256_file

FORMAT = "fastgal-shards"
FORMAT_VERSION = 1
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


def index_keys(idx_paths) -> list[str]:
    """Sample keys in the order a sequential reader (DALI's valid graph) delivers them."""
    return [key for idx in idx_paths for key, _ in read_index(idx)]


def read_column(tars, idxs, column: str, meta_ext: str = "json") -> np.ndarray:
    """One catalog column of every sample, in file order, from the samples' json (the catalog row the
    shards carry): float, NaN where the column is missing, empty or not a number."""
    out = []
    for tar, idx in zip(tars, idxs):
        with open(tar, "rb") as f:
            for _, comp in read_index(idx):
                off, size = comp[meta_ext]
                f.seek(off)
                v = json.loads(f.read(size)).get(column)
                try:
                    out.append(float(v))
                except (TypeError, ValueError):
                    out.append(float("nan"))
    return np.asarray(out, np.float64)


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


def info_summary(out, res: dict) -> dict:
    """`fastgal info --json`: the check (verify's result) and the manifest's summary."""
    m = res["manifest"]
    return {"out": str(out), "ok": res["ok"], "problems": res["problems"], "counts": m["counts"],
            "rejects_by_reason": m["rejects_by_reason"], "targets": m["target_stats"], "image": m["image"],
            "pixel_stats": m["pixel_stats"], "split": m["split"], "shards": {s: len(v) for s, v in m["shards"].items()},
            "bytes": res["bytes"], "source": m["source"], "fastgal_version": m["fastgal_version"]}


def format_info(out, res: dict) -> str:
    """`fastgal info`'s human summary."""
    m, c, ps = res["manifest"], res["manifest"]["counts"], res["manifest"]["pixel_stats"]
    lines = [f"{out}: {m['format']} v{m['format_version']} from {m['source']['catalog']}",
             f"  rows {c['catalog_rows']} = train {c['train']} + valid {c['valid']} + rejected {c['rejected']}"
             f"  ({', '.join(f'{k} {v}' for k, v in m['rejects_by_reason'].items()) or 'no rejects'})",
             f"  shards: {', '.join(f'{s} {len(v)}' for s, v in m['shards'].items())}, {res['bytes'] / 1e6:,.1f} MB"]
    lines += [f"  {t}: mean {st['mean']:.4f} std {st['std']:.4f} range [{st['min']:.3f}, {st['max']:.3f}] (train)"
              for t, st in m["target_stats"].items()]
    lines += [f"  images {m['image']['size']} precrop {m['image']['precrop']}; centre {ps['region']} px mean "
              f"{[round(x, 2) for x in ps['mean']]} std {[round(x, 2) for x in ps['std']]}",
              "  verified: sha256s, indexes and counts match" if res["ok"] else f"  {len(res['problems'])} problem(s)"]
    return "\n".join(lines)


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
    return n
