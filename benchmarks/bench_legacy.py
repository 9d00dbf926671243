"""What depth buys: the same synthetic galaxies as SDSS gri JPEGs, SDSS gri FITS and Legacy Surveys grz FITS (#31).

    nice -n 10 .venv/bin/python benchmarks/bench_legacy.py --n 3000 --work /tmp/fg_legacy --save legacy3k.json
    nice -n 10 .venv/bin/python benchmarks/bench_legacy.py --n 3000 --work /tmp/fg_legacy --seed 43
    .venv/bin/python benchmarks/bench_legacy.py --n 3000 --work /tmp/fg_legacy --combine 42,43   # trains nothing

Three surveys of one catalog (seed 0, 112 px cutouts: the CPU preset's), written by `fastgal synth`: SDSS-like
JPEGs (the Lupton stretch of g, r, i, as SkyServer's getjpeg serves them), SDSS-like FITS (the calibrated g, r, i
fluxes those JPEGs were made from) and `--survey legacy` (the same galaxies through the Legacy Surveys' camera:
0.262" pixels, 1.2-2 mag deeper sky, 1.2" seeing; g, r, z as the viewer's fits-cutout serves them). Each is
sharded alike (crop 72; ids hash to the same train/valid split) and trained with `fastgal train --preset cpu`
(xresnet18 at 56 px, bs 64, 8 epochs, one-cycle; TTA), seed 42, in a fresh process. Reports each run's validation
RMSE beside its survey's observable reference (synth.json) and, for each pair, the RMSE difference with a paired
bootstrap 95% interval over the same validation galaxies (predictions_valid.csv). Finished steps are reused.
Commands on stderr, a markdown table on stderr, one JSON line on stdout (--save writes it too).
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

VARIANTS = [  # name, synth options, shard options
    ("SDSS gri JPEG", [], []),
    ("SDSS gri FITS", ["--format", "fits", "--bands", "gri"], ["--bands", "g,r,i"]),
    ("Legacy grz FITS", ["--survey", "legacy", "--bands", "grz"], ["--bands", "g,r,z"]),
]


def sh(cmd: list[str]) -> None:
    print("$ " + shlex.join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    print(f"  {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def fastgal(*args) -> list[str]:
    return [sys.executable, "-m", "fastgal", *map(str, args)]


def paired(a: pd.Series, b: pd.Series, truth: pd.Series, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """RMSE(b) - RMSE(a) on the same galaxies, and its paired bootstrap 95% interval."""
    ea, eb = (a - truth).to_numpy() ** 2, (b - truth).to_numpy() ** 2
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ea), (reps, len(ea)))
    d = np.sqrt(eb[idx].mean(1)) - np.sqrt(ea[idx].mean(1))
    return float(np.sqrt(eb.mean()) - np.sqrt(ea.mean())), float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=42, help="training seed")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fg_legacy"))
    ap.add_argument("--epochs", type=int, default=None, help="override the preset's 8 (a smoke test)")
    ap.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    ap.add_argument("--save", type=Path)
    ap.add_argument("--combine", default="", help="seeds whose finished runs to compare averaged (e.g. 42,43); "
                                                   "trains nothing")
    a = ap.parse_args()
    w = a.work / f"n{a.n}"
    if a.combine:
        return combine(w, [int(x) for x in a.combine.split(",")])
    w.mkdir(parents=True, exist_ok=True)
    rows, preds = [], {}
    for name, synth_opts, shard_opts in [v for v in VARIANTS if not a.only or v[0] in a.only.split(",")]:
        slug = name.replace(" ", "_")
        survey, shards, run = w / "survey" / slug, w / "shards" / slug, w / "runs" / f"{slug}_s{a.seed}"
        if not (survey / "synth.json").is_file():
            sh(fastgal("synth", survey, "--n", a.n, "--seed", 0, "--size", 112, "--overwrite", "--quiet", *synth_opts))
        if not (shards / "manifest.json").is_file():
            sh(fastgal("shard", survey / "data/master.csv", survey / "images", shards, "--crop", 72, "--overwrite",
                       "--quiet", *shard_opts))
        if not (run / "metrics.json").is_file():
            sh(fastgal("train", shards, "--out", run, "--preset", "cpu", "--device", "cpu", "--seed", a.seed, "--tta",
                       "--overwrite", "--quiet", *(["--epochs", a.epochs] if a.epochs else [])))
        met = json.loads((run / "metrics.json").read_text())
        syn = json.loads((survey / "synth.json").read_text())
        t = met["targets"][met["target"]]
        ref = syn["floor"]["observable_reference_rmse"]
        preds[name] = pd.read_csv(run / "predictions_valid.csv", dtype={"id": str}).set_index("id").sort_index()
        rows.append({"variant": name, "survey": str(survey), "run": str(run), "rmse": t["rmse"],
                     "tta_rmse": t.get("tta_rmse"), "nmad": t.get("nmad"), "bias": t.get("bias"),
                     "observable_reference": ref, "noisy_reference": syn["floor"].get("noisy_observable_reference_rmse"),
                     "rmse_over_reference": round(t["rmse"] / ref, 3), "baseline_rmse": t["baseline_rmse"],
                     "floor_rmse": syn["floor"]["floor_rmse"], "fit_seconds": met.get("fit_seconds"),
                     "n_train": met.get("n_train"), "n_valid": met.get("n_valid")})
        print(f"  {name}: RMSE {t['rmse']:.4f} (TTA {t.get('tta_rmse') or float('nan'):.4f}), ref {ref:.4f}",
              file=sys.stderr, flush=True)
    pairs = []
    names = list(preds)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            px, py = preds[x], preds[y]
            common = px.index.intersection(py.index)
            truth = px.loc[common, "true_metallicity"]
            for col in ("pred_metallicity", "pred_tta_metallicity"):
                if col in px and col in py:
                    d, lo, hi = paired(px.loc[common, col], py.loc[common, col], truth)
                    pairs.append({"a": x, "b": y, "pred": col, "n": len(common), "b_minus_a": d, "lo": lo, "hi": hi,
                                  "corr_err": float(np.corrcoef(px.loc[common, col] - truth,
                                                                py.loc[common, col] - truth)[0, 1])})
    print(table(rows, pairs), file=sys.stderr)
    out = json.dumps({"n": a.n, "seed": a.seed, "rows": rows, "pairs": pairs})
    print(out)
    if a.save:
        a.save.write_text(out + "\n")


def combine(w: Path, seeds: list[int]) -> None:
    """Each variant's TTA predictions averaged over `seeds` (finished runs), the seed-to-seed difference of each
    variant and the paired differences of the averages, on the same validation galaxies."""
    preds = {}
    for name, _, _ in VARIANTS:
        slug = name.replace(" ", "_")
        preds[name] = [pd.read_csv(w / "runs" / f"{slug}_s{s}" / "predictions_valid.csv", dtype={"id": str})
                       .set_index("id").sort_index() for s in seeds]
    truth = preds[VARIANTS[0][0]][0]["true_metallicity"]
    col = "pred_tta_metallicity"
    avg = {n: sum(p[col] for p in ps) / len(ps) for n, ps in preds.items()}
    out = {"seeds": seeds, "variants": {}, "pairs": []}
    for n, ps in preds.items():
        d, lo, hi = paired(ps[0][col], ps[-1][col], truth)
        rmse = float(np.sqrt(((avg[n] - truth) ** 2).mean()))
        out["variants"][n] = {"averaged_tta_rmse": rmse, "last_minus_first_seed": [d, lo, hi]}
        print(f"{n}: averaged TTA RMSE {rmse:.4f}; seed {seeds[-1]} - {seeds[0]} {d:+.4f} [{lo:+.4f}, {hi:+.4f}]",
              file=sys.stderr)
    names = list(avg)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            d, lo, hi = paired(avg[x], avg[y], truth)
            out["pairs"].append({"a": x, "b": y, "b_minus_a": d, "lo": lo, "hi": hi})
            print(f"averaged {y} - {x}: {d:+.4f} [{lo:+.4f}, {hi:+.4f}]", file=sys.stderr)
    print(json.dumps(out))


def table(rows: list[dict], pairs: list[dict]) -> str:
    head = "| variant | RMSE | TTA RMSE | NMAD | bias | observable ref. | RMSE / ref. | fit s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        tta = f"{r['tta_rmse']:.4f}" if r["tta_rmse"] is not None else "-"
        lines.append(f"| {r['variant']} | {r['rmse']:.4f} | {tta} | {r['nmad']:.4f} | {r['bias']:+.4f} "
                     f"| {r['observable_reference']:.4f} | {r['rmse_over_reference']:.3f} | {r['fit_seconds']} |")
    lines += ["", "| B − A (same validation galaxies) | predictions | RMSE diff. | paired bootstrap 95% | error corr. |",
              "|---|---|---|---|---|"]
    for p in pairs:
        lines.append(f"| {p['b']} − {p['a']} | {p['pred'].replace('_metallicity', '')} | {p['b_minus_a']:+.4f} "
                     f"| [{p['lo']:+.4f}, {p['hi']:+.4f}] | {p['corr_err']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
