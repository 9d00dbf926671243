"""The RESULTS.md tables of issue 32 from the runs benchmarks/conformal.sh trained (their metrics.json "conformal").

    python benchmarks/conformal_table.py /tmp/cfb            # r3000-0, r3000-1, r12000-0, r12000-1

Columns: held-out = the validation galaxies outside the calibration part (they picked the best epoch, nothing
else), one split, with its binomial standard error; new = galaxies of a fresh synthetic survey of the same
design (ROOT/new_<run>.csv, `fastgal predict RUN NEWSHARDS --split all --interval ...`: neither trained on, nor
calibrated on, nor used in any choice), with the run's shipped calibration.json; ±cal = sqrt(level (1 - level) /
n_cal), how far one calibration set's coverage scatters about the level even on infinitely many new galaxies;
resampled = the mean over 500 random calibration/test re-splits of all validation predictions (calibration size
kept), the expected coverage the guarantee is about.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm


def pct(v):
    return "-" if v is None else f"{100 * v:.1f}"


def main(root: Path) -> None:
    runs = sorted((p for p in root.glob("r*-*") if (p / "metrics.json").is_file()),
                  key=lambda p: (int(p.name[1:].split("-")[0]), p.name))
    print("| galaxies | seed | n cal / test | level | held-out coverage ± s.e. | new galaxies (n) ± cal | "
          "resampled coverage (sd) | conformal width | raw ±zσ coverage | raw ±zσ width | new: raw ±zσ | "
          "Mondrian(pred) coverage | Mondrian width | RMSE |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    spread = []
    for run in runs:
        m = json.loads((run / "metrics.json").read_text())
        c = m["conformal"]
        n, seed = run.name[1:].split("-")
        t = m["target"]
        new = root / f"new_{run.name}.csv"
        new = pd.read_csv(new, dtype={"id": str}) if new.is_file() else None
        for lv, row in c["held_out"][t].items():
            cal_sd = math.sqrt(float(lv) * (1 - float(lv)) / c["n_calibration"])
            nw = nraw = "-"
            if new is not None:
                y = new[f"true_{t}"].to_numpy()
                inside = (y >= new[f"lo_{t}_{lv}"]) & (y <= new[f"hi_{t}_{lv}"])
                nw = f"{pct(inside.mean())} ({len(new):,}) ± {pct(cal_sd)}"
                z = norm.ppf(0.5 + float(lv) / 2)
                nraw = pct(float(np.mean(np.abs(y - new[f"pred_{t}"]) <= z * new[f"sigma_{t}"])))
            mg, raw, mo = row["marginal"], row.get("raw_sigma", {}), row["mondrian_pred"]
            rs = c["resampled"][t][lv]
            print(f"| {int(n):,} | {seed} | {c['n_calibration']} / {c['n_test']} | {lv} | {pct(mg['coverage'])} ± "
                  f"{pct(mg['se'])} | {nw} | {pct(rs['coverage'])} ({pct(rs['sd_over_splits'])}) | {mg['mean_width']:.3f} | "
                  f"{pct(raw.get('coverage'))} | {raw.get('mean_width', float('nan')):.3f} | {nraw} | {pct(mo['coverage'])} | "
                  f"{'inf' if mo['mean_width'] is None else format(mo['mean_width'], '.3f')} | {m['rmse']:.4f} |")
            for v in ("marginal", "mondrian_pred", "raw_sigma"):
                if v in row:
                    spread.append((int(n), seed, lv, v, row[v]["by_true"], row[v]["by_pred"]))
    print()
    print("Per-bin coverage (8 quantile bins of the held-out galaxies; min-max over the bins, in %):")
    print()
    print("| galaxies | seed | level | intervals | by true Z: min-max (spread) | by predicted Z: min-max (spread) |")
    print("|---|---|---|---|---|---|")
    for n, seed, lv, v, bt, bp in spread:
        print(f"| {n:,} | {seed} | {lv} | {v} | {pct(bt['min'])}-{pct(bt['max'])} ({pct(bt['spread'])}) | "
              f"{pct(bp['min'])}-{pct(bp['max'])} ({pct(bp['spread'])}) |")
    print()
    print("Per-bin coverage on the 6,000 new galaxies (8 quantile bins of true / of predicted Z, ~750 galaxies a bin; "
          "min-max over the bins, in %):")
    print()
    print("| galaxies | seed | level | conformal by true Z | raw ±zσ by true Z | conformal by predicted Z | raw ±zσ by predicted Z |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        new = root / f"new_{run.name}.csv"
        if not new.is_file():
            continue
        m = json.loads((run / "metrics.json").read_text())
        t, (n, seed) = m["target"], run.name[1:].split("-")
        d = pd.read_csv(new, dtype={"id": str})
        y, mu, sg = d[f"true_{t}"].to_numpy(), d[f"pred_{t}"].to_numpy(), d[f"sigma_{t}"].to_numpy()
        for lv in m["conformal"]["held_out"][t]:
            conf = (y >= d[f"lo_{t}_{lv}"].to_numpy()) & (y <= d[f"hi_{t}_{lv}"].to_numpy())
            raw = np.abs(y - mu) <= norm.ppf(0.5 + float(lv) / 2) * sg
            cells = []
            for x in (y, mu):
                b = np.searchsorted(np.quantile(x, np.linspace(0, 1, 9)[1:-1]), x, side="right")
                for inside in (conf, raw):
                    c = [inside[b == i].mean() for i in range(8)]
                    cells.append((min(c), max(c)))
            order = [cells[0], cells[1], cells[2], cells[3]]
            print(f"| {int(n):,} | {seed} | {lv} | " + " | ".join(f"{pct(a)}-{pct(b)}" for a, b in order) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/cfb"))
