"""What the JPEG step costs: the same galaxies as gri JPEGs, gri float fluxes and ugriz float fluxes (#20).

    .venv/bin/python benchmarks/bench_bands.py --n 3000 --work /tmp/fg_bands --save bands.json

One synthetic survey (seed 0, 112 px cutouts: the CPU preset's) written twice by `fastgal synth`: as JPEGs
(the Lupton asinh stretch of g, r, i, 8 bits, JPEG q75, as SkyServer serves them) and as FITS cubes of the
calibrated ugriz fluxes those JPEGs were made from (nanomaggies, before any stretch). Sharded alike (crop 72,
the same split), the FITS ones as gri and ugriz, float16, plus gri float32 (what float16 storage costs).
Each trains with the CPU preset (`fastgal demo`'s on a CPU: xresnet18 at 56 px, bs 64, fit_one_cycle(8, 1e-2),
TTA; the floats with the manifest's asinh stretch, softening = each band's sky noise), in a fresh process per
run, as a person runs it. Reports per variant: bytes per sample in the tars, loader img/s (an epoch of the
TRAIN view through the torch loader, best of --repeats rounds that interleave every variant, one process,
same bs and threads; until #29 also the retired per-sample worker path), the
validation RMSE (and with TTA) beside the observable reference for the bands it sees (synth.json), and each
run's fit seconds. Finished steps are reused (their output files), so a killed run resumes.
Commands on stderr, a markdown table on stderr, one JSON line on stdout (--save writes it too).
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = [  # name, survey, shard options
    ("gri JPEG", "jpeg", []),
    ("gri float16", "fits", ["--bands", "g,r,i"]),
    ("gri float32", "fits", ["--bands", "g,r,i", "--dtype", "float32"]),
    ("ugriz float16", "fits", ["--bands", "u,g,r,i,z"]),
]
PRESET = ["--arch", "xresnet18", "--bs", "64", "--size", "56", "--lr", "1e-2", "--tta", "--device", "cpu"]


def sh(cmd: list[str]) -> None:
    print("$ " + shlex.join(cmd), file=sys.stderr)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    print(f"  {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def fastgal(*args) -> list[str]:
    return [sys.executable, "-m", "fastgal", *map(str, args)]


def loader_rates(folders: dict[str, Path], bs: int, repeats: int, threads: int) -> dict[str, dict[str, float]]:
    """img/s of one TRAIN epoch (the preset's geometry and stretch) per variant and backend: after one untimed
    warm-up epoch each, `repeats` rounds that take every variant and backend in turn (so a noisy moment on this
    shared machine hits them alike), the best epoch of each."""
    from fastgal.load.loader import dataloaders

    loaders = {(v, b): dataloaders(f, bs=bs, size=56, backend=b, threads=threads, device="cpu").train
               for v, f in folders.items() for b in ("torch",)}
    for dl in loaders.values():  # warm-up: decode threads, the decoder's first call, the page cache
        for _ in dl:
            pass
    best = {k: 0.0 for k in loaders}
    for r in range(1, repeats + 1):
        for k, dl in loaders.items():
            dl.set_epoch(r)
            t0 = time.perf_counter()
            n = sum(len(x) for x, _ in dl)
            best[k] = max(best[k], n / (time.perf_counter() - t0))
    for dl in loaders.values():
        dl.close()
    return {v: {b: round(best[(v, b)], 1) for b in ("torch",)} for v in folders}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42, help="training seed")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fg_bands"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    ap.add_argument("--save", type=Path)
    a = ap.parse_args()
    w = a.work
    w.mkdir(parents=True, exist_ok=True)
    for kind, extra in (("jpeg", []), ("fits", ["--format", "fits", "--bands", "ugriz"])):
        if not (w / kind / "synth.json").is_file():
            sh(fastgal("synth", w / kind, "--n", a.n, "--seed", 0, "--size", 112, "--overwrite", "--quiet", *extra))
    rows = []
    chosen = [v for v in VARIANTS if not a.only or v[0] in a.only.split(",")]
    for name, kind, opts in chosen:
        slug = name.replace(" ", "_")
        shards, run = w / "shards" / slug, w / "runs" / f"{slug}_s{a.seed}_e{a.epochs}"
        if not (shards / "manifest.json").is_file():
            sh(fastgal("shard", w / kind / "data/master.csv", w / kind / "images", shards, "--crop", 72, "--overwrite",
                       "--quiet", *opts))
        if not (run / "metrics.json").is_file():
            sh(fastgal("train", shards, "--out", run, "--epochs", a.epochs, "--seed", a.seed, "--overwrite", "--quiet", *PRESET))
        man = json.loads((shards / "manifest.json").read_text())
        met = json.loads((run / "metrics.json").read_text())
        syn = json.loads((w / kind / "synth.json").read_text())
        bands = "".join(man["image"].get("bands", ["g", "r", "i"])) if kind == "fits" else "gri"
        ref = _reference(syn, bands)
        samples = man["counts"]["train"] + man["counts"]["valid"]
        nbytes = sum(e["bytes"] for sp in man["shards"].values() for e in sp)
        t = met["targets"][met["target"]]
        rows.append({"variant": name, "bands": bands, "bytes_per_sample": round(nbytes / samples), "shards": str(shards),
                     "rmse": t["rmse"], "tta_rmse": t.get("tta_rmse"),
                     "observable_reference": ref, "rmse_over_reference": round(t["rmse"] / ref, 3),
                     "baseline_rmse": t["baseline_rmse"], "fit_seconds": met["fit_seconds"],
                     "n_train": met["n_train"], "n_valid": met["n_valid"], "epochs": a.epochs, "seed": a.seed})
        print(f"  {name}: RMSE {t['rmse']:.4f} (TTA {t.get('tta_rmse', float('nan')):.4f}), ref {ref:.4f}", file=sys.stderr)
    rates = loader_rates({r["variant"]: Path(r["shards"]) for r in rows}, 64, a.repeats, a.threads)
    for r in rows:
        r["loader_img_s"] = rates[r["variant"]]
    print(table(rows), file=sys.stderr)
    out = json.dumps({"n": a.n, "rows": rows})
    print(out)
    if a.save:
        a.save.write_text(out + "\n")


def _reference(syn: dict, bands: str) -> float:
    """The observable reference for the bands a model sees: synth.json's for its own bands, floor.py's table
    for a subset (the gri shards of a ugriz survey)."""
    from fastgal.survey.floor import OBSERVABLE_REFERENCES

    return OBSERVABLE_REFERENCES.get(bands, syn["floor"]["observable_reference_rmse"])


def table(rows: list[dict]) -> str:
    head = ("| variant | bytes/sample | loader img/s (torch) | RMSE | TTA RMSE | observable ref. "
            "| RMSE / ref. | fit s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lr = r["loader_img_s"]
        lines.append(f"| {r['variant']} | {r['bytes_per_sample']:,} | {lr['torch']:,.0f} "
                     f"| {r['rmse']:.4f} | {r['tta_rmse']:.4f} | {r['observable_reference']:.4f} "
                     f"| {r['rmse_over_reference']:.3f} | {r['fit_seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
