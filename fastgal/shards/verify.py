"""`fastgal info`: a shard folder re-checked in full (every tar's sha256, its index, every sample, the counts),
and what the command prints of it.

    from fastgal.shards.verify import verify
    res = verify("shards/synth")        # {"ok", "problems", "samples", "bytes", "manifest"}
"""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

from fastgal.shards.cutouts import jpeg_problem
from fastgal.shards.index import index_text, split_name
from fastgal.shards.read import load_manifest
from fastgal.util import plural, sha256_file


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


# --------------------------------------------------------------------------- what `fastgal info` prints

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
              *([f"  FITS bands {','.join(m['image']['bands'])} as {m['image']['dtype']}; sky sigma "
                 f"{[float(f'{x:.3g}') for x in ps['sky_sigma']]}; stretch {m['stretch']['name']}"]
                if m["image"].get("kind") == "float" else []),
              "  verified: sha256s, indexes and counts match" if res["ok"] else
              f"  {plural(len(res['problems']), 'problem')}:"]
    if not res["ok"]:
        lines += [f"    {p}" for p in res["problems"][:10]]
        lines += [f"    ... and {len(res['problems']) - 10} more"] if len(res["problems"]) > 10 else []
    return "\n".join(lines)
