"""Accuracy against the floor: a learning curve on the synthetic survey with the CPU preset (#12).

    .venv/bin/python benchmarks/bench_accuracy.py --work /tmp/fg_acc --ns 3000,12000,30000 --save acc.json --plot learning_curve.png

For each N runs `fastgal demo --out WORK/nN --n N` in a fresh process, as a person would: the CPU
preset (xresnet18 at 56 px from a 72 px crop of 112 px cutouts, 8 epochs, bs 64, one-cycle lr 1e-2,
TTA), survey seed 0, 80/20 split. Each run's demo.json gives the validation RMSE (and with the 8-view
TTA), the predict-the-mean baseline, and the survey's two references (floor.py): the observable
reference (a gradient-boosted model given what the renderer makes visible: what the images can
reveal) and the latent floor (scatter about E[Z | mass, SFR], which a cutout cannot reach because it
cannot show distance). Reports RMSE / reference for each N. A finished N is reused (its demo.json).
Prints each command on stderr, a markdown table on stderr and one JSON line on stdout; --save writes it too,
and --plot a PNG of RMSE against N beside both references.
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path


def run_demo(work: Path, n: int, epochs: int | None) -> dict:
    out = work / f"n{n}"
    done = out / "demo.json"
    if not done.is_file():
        cmd = [sys.executable, "-m", "fastgal", "demo", "--out", str(out), "--n", str(n), "--device", "cpu",
               "--overwrite", "--quiet"] + (["--epochs", str(epochs)] if epochs else [])
        print("$ " + shlex.join(cmd), file=sys.stderr)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        print(f"  n={n}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return json.loads(done.read_text())


def row(n: int, m: dict) -> dict:
    t = m["targets"][m["target"]]
    ref, floor = m["survey_reference_rmse"], m["survey_floor_rmse"]
    p = m["preset"]
    return {"n": n, "n_train": m.get("n_train"), "n_valid": m.get("n_valid"), "epochs": p["epochs"],
            "arch": p["arch"], "size": p["size"], "rmse": t["rmse"], "tta_rmse": t.get("tta_rmse"),
            "bias": t["bias"], "nmad": t["nmad"], "outlier_fraction": t.get("outlier_fraction"),
            "baseline_rmse": t["baseline_rmse"], "reference_rmse": ref, "floor_rmse": floor,
            "rmse_over_reference": round(t["rmse"] / ref, 3), "rmse_over_floor": round(t["rmse"] / floor, 3),
            "fit_seconds": m.get("fit_seconds")}


def table(rows: list[dict]) -> str:
    head = ("| N | train / valid | RMSE | TTA RMSE | bias | NMAD | mean baseline | RMSE / observable ref. "
            "| RMSE / latent floor | fit s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        tta = f"{r['tta_rmse']:.4f}" if r["tta_rmse"] is not None else "-"
        lines.append(f"| {r['n']:,} | {r['n_train']} / {r['n_valid']} | {r['rmse']:.4f} | {tta} | {r['bias']:+.4f} "
                     f"| {r['nmad']:.4f} | {r['baseline_rmse']:.4f} | {r['rmse_over_reference']:.3f} "
                     f"({r['reference_rmse']:.4f}) | {r['rmse_over_floor']:.3f} ({r['floor_rmse']:.4f}) "
                     f"| {r['fit_seconds']} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> Path:
    """RMSE (and TTA RMSE) against N on a log axis, with the mean baseline, observable reference and latent floor."""
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, [r["rmse"] for r in rows], "o-", label="validation RMSE")
    if all(r["tta_rmse"] is not None for r in rows):
        ax.plot(ns, [r["tta_rmse"] for r in rows], "s--", label="with 8-view TTA")
    for key, label, style in (("baseline_rmse", "predict the mean", ":"),
                              ("reference_rmse", "observable reference (what the images show)", "-."),
                              ("floor_rmse", "latent floor (knowing mass and SFR)", "--")):
        ax.plot(ns, [r[key] for r in rows], style, color="grey", label=label)
    ax.set_xscale("log")
    ax.set_xticks(ns, [f"{n:,}" for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("galaxies in the survey (80% train)")
    ax.set_ylabel("RMSE of 12+log(O/H) [dex]")
    r0 = rows[0]
    ax.set_title(f"learning curve: {r0['arch']} at {r0['size']} px, {r0['epochs']} epochs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True, help="one demo folder per N goes here (reused if finished)")
    ap.add_argument("--ns", default="3000,12000,30000", help="survey sizes, comma-separated")
    ap.add_argument("--epochs", type=int, default=None, help="override the CPU preset's 8 epochs")
    ap.add_argument("--save", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--plot", type=Path, default=None, help="write the learning curve as a PNG here")
    a = ap.parse_args()
    rows = [row(n, run_demo(a.work, n, a.epochs)) for n in (int(s) for s in a.ns.split(","))]
    print(table(rows), file=sys.stderr)
    line = json.dumps({"rows": rows})
    print(line)
    if a.save:
        a.save.write_text(line + "\n")
    if a.plot:
        print(f"wrote {plot(rows, a.plot)}", file=sys.stderr)


if __name__ == "__main__":
    main()
