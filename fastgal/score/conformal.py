"""Calibrated intervals for every galaxy: split conformal prediction on top of any head.

    fastgal train shards/synth --head gaussian --interval 0.68,0.9,0.95     # calibration.json beside model.pt
    fastgal predict runs/r1 data/new/images --interval 0.68,0.9,0.95         # lo_<t>_<level>, hi_<t>_<level>

    from fastgal.score.conformal import calibrate, intervals, evaluate
    cal = calibrate(ids, true, pred, sigma, targets=["metallicity"])     # the calibration part's galaxies
    lo, hi = intervals(cal, "metallicity", pred, sigma, level=0.9)

Split conformal (Vovk et al.; Lei et al. 2018): on n galaxies the model never trained on, and that did not
choose its best epoch, take the scores s_i = |y_i - mu_i| / d_i, where d_i is the galaxy's difficulty: the
gaussian head's sigma where the model has one ("normalized"), else 1 (the "absolute" residual: standard
split conformal, the same width for every galaxy). For a new galaxy, mu +- q d with q the
ceil((n + 1) level)-th smallest score covers its true value with probability >= level (and < level + 1/(n+1))
whenever the calibration and new galaxies are exchangeable: a guarantee that holds whatever the model, in a
finite sample, over draws of the calibration set. The TTA spread is not offered as d: it measured 6.5% of
galaxies within 1 sigma (it sees only what the dihedral views disagree on) and needs 8 forward passes.

Mondrian (by="pred" or "mass"): the same in bins of the predicted value (or the catalog's stellar mass),
quantile bins of the calibration galaxies, one q per bin: coverage then holds within each bin, not only
on average over galaxies (the model's worst-predicted extremes are where a global q under-covers).

The calibration part: validation galaxies whose id hashes below `calib_pct` (blake2b of the id string, salted):
stable under any row order, re-shard or subset, and independent of the shard split's own seed. `fastgal
train --interval` validates (picks the best epoch) on the rest, so the calibration part is neither trained on
nor used in any choice; metrics.json reports coverage on that rest (held out from the calibration).

Why numpy and not crepes or MAPIE: the whole method is a sort and an index, and the calibration must travel
with the run as plain numbers (calibration.json: every calibration score, so `fastgal predict` can give any
level) rather than a pickled object of a third-party class that a later version may not load. The
tests check the finite-sample guarantee on exchangeable draws.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

CALIBRATION = "calibration.json"
FORMAT = "fastgal-conformal"
FORMAT_VERSION = 1
SALT = b"fastgal-calibration:"
BYS = ("none", "pred", "mass")


# --------------------------------------------------------------------------- levels, parts, columns

def parse_levels(text) -> list[float]:
    """'0.68,0.9,0.95' (or a list) -> [0.68, 0.9, 0.95]; ValueError naming the bad one."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        try:
            v = float(item)
        except (TypeError, ValueError):
            v = math.nan
        if not 0 < v < 1:
            raise ValueError(f"--interval {item!r}: each level is a coverage between 0 and 1, e.g. 0.68,0.9,0.95")
        out.append(v)
    if not out:
        raise ValueError("--interval: give at least one level, e.g. 0.68,0.9,0.95")
    return sorted(set(out))


def level_name(level: float) -> str:
    return f"{level:g}"


def columns(target: str, level: float) -> tuple[str, str]:
    """The predictions table's interval columns: lo_<t>_<level>, hi_<t>_<level>."""
    return f"lo_{target}_{level_name(level)}", f"hi_{target}_{level_name(level)}"


def calibration_part(ids, calib_pct: float) -> np.ndarray:
    """True for the galaxies of the calibration part: the salted blake2b hash of the id (as a string), read as
    a number in [0, 1), below calib_pct. The same galaxy is in the same part whatever else is in the split."""
    u = [int.from_bytes(hashlib.blake2b(SALT + str(i).encode(), digest_size=8).digest(), "little") / 2**64
         for i in ids]
    return np.asarray(u, np.float64) < calib_pct


def check_settings(cfg, valid) -> None:
    """`fastgal train --interval`'s settings against the validation split (read.Split), before any work: the
    levels, --calib-pct and --interval-bins, both parts large enough, and --interval-by mass's column."""
    parse_levels(cfg.interval)
    if not 0 < cfg.calib_pct < 1 or cfg.interval_bins < 1:
        raise ValueError("--calib-pct must be between 0 and 1 and --interval-bins at least 1")
    n_cal = int(calibration_part(valid.keys, cfg.calib_pct).sum())
    if min(n_cal, len(valid) - n_cal) < 10:
        raise ValueError(f"--interval: --calib-pct {cfg.calib_pct:g} of the {len(valid)} validation galaxies leaves "
                         f"{n_cal} to calibrate and {len(valid) - n_cal} to validate; 10 of each at least "
                         "(hundreds for useful intervals): more galaxies, a larger --valid-pct, or another --calib-pct")
    if cfg.interval_by == "mass" and not (cfg.mass_col and np.isfinite(valid.column(cfg.mass_col)).any()):
        raise ValueError(f"--interval-by mass: the shards' rows have no {cfg.mass_col!r} (--mass-col); "
                         "use --interval-by pred or none")


# --------------------------------------------------------------------------- the method

def conformal_quantile(sorted_scores, level: float) -> float:
    """The ceil((n + 1) level)-th smallest of n scores (inf where that exceeds n: too few to promise `level`)."""
    n = len(sorted_scores)
    k = math.ceil((n + 1) * level - 1e-9)  # the 1e-9: (n+1)*level computed as 90.00000000001 must stay 90
    return math.inf if k > n or n == 0 else float(sorted_scores[k - 1])


def scores(true, pred, scale=None) -> np.ndarray:
    d = np.abs(np.asarray(true, np.float64) - np.asarray(pred, np.float64))
    return d if scale is None else d / np.asarray(scale, np.float64)


def bin_of(x, edges) -> np.ndarray:
    """Which of len(edges) + 1 bins each x falls in (edges: the interior ones; outside the calibration range
    goes to the end bins)."""
    return np.searchsorted(np.asarray(edges, np.float64), np.asarray(x, np.float64), side="right")


def calibrate(ids, true, pred, sigma=None, *, targets: list[str], by: str = "none", by_values=None, n_bins: int = 4,
              calib_pct: float | None = None, levels=None) -> dict:
    """The calibration (JSON-ready) from the calibration galaxies' true values, predictions and sigma ((n, k)
    arrays, or (n,) for one target). by: "none" (one q for all), "pred" (Mondrian bins of each target's
    predicted value) or "mass" (bins of by_values, e.g. the catalog's log stellar mass)."""
    true, pred = np.atleast_2d(np.asarray(true, np.float64).T).T, np.atleast_2d(np.asarray(pred, np.float64).T).T
    sigma = None if sigma is None else np.atleast_2d(np.asarray(sigma, np.float64).T).T
    if by not in BYS:
        raise ValueError(f"--interval-by {by!r}: one of {', '.join(BYS)}")
    if by == "mass" and by_values is None:
        raise ValueError("--interval-by mass needs the catalog's stellar mass (--mass-col) in the shards' rows")
    out = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": "absolute" if sigma is None else "normalized",
           "by": by, "n_bins": n_bins if by != "none" else 1, "n": len(true), "calib_pct": calib_pct,
           "levels": list(levels or []), "id_hash": "blake2b-64 of 'fastgal-calibration:' + id, / 2**64 < calib_pct",
           "ids": [str(i) for i in ids], "targets": {}}
    for j, t in enumerate(targets):
        s = scores(true[:, j], pred[:, j], None if sigma is None else sigma[:, j])
        entry = {"scores": np.round(np.sort(s), 7).tolist()}
        if by != "none":
            x = pred[:, j] if by == "pred" else np.asarray(by_values, np.float64)
            ok = np.isfinite(x)
            edges = np.unique(np.quantile(x[ok], np.linspace(0, 1, n_bins + 1)[1:-1])) if ok.any() else np.array([])
            b = bin_of(x, edges)
            entry["edges"] = edges.tolist()
            entry["bin_scores"] = [np.round(np.sort(s[ok & (b == i)]), 7).tolist() for i in range(len(edges) + 1)]
        out["targets"][t] = entry
    return out


def quantiles(cal: dict, target: str, level: float) -> np.ndarray:
    """q for each bin (one value for by="none")."""
    e = cal["targets"][target]
    if cal["by"] == "none":
        return np.array([conformal_quantile(e["scores"], level)])
    return np.array([conformal_quantile(s, level) for s in e["bin_scores"]])


def intervals(cal: dict, target: str, pred, sigma=None, level: float = 0.9, by_values=None) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) for each galaxy: pred -+ q d (d: sigma for a normalized calibration, else 1)."""
    pred = np.asarray(pred, np.float64)
    if cal["method"] == "normalized":
        if sigma is None:
            raise ValueError("this calibration is of |error| / sigma: the predictions need the model's sigma_<t>")
        d = np.asarray(sigma, np.float64)
    else:
        d = np.ones_like(pred)
    q = quantiles(cal, target, level)
    if cal["by"] == "none":
        qi = np.full(len(pred), q[0])
    else:
        x = pred if cal["by"] == "pred" else np.asarray(by_values, np.float64)
        qi = q[bin_of(x, cal["targets"][target]["edges"])]
        qi[~np.isfinite(x)] = np.nan  # no mass, no Mondrian bin: no interval (never a guessed one)
    return pred - qi * d, pred + qi * d


def add_intervals(df, cal: dict, levels, by_values=None):
    """The predictions table with lo_<t>_<level>, hi_<t>_<level> after each target's columns; NaN where the row
    has no prediction (an unusable file). Needs pred_<t> (the centre view the calibration was made on)."""
    import pandas as pd

    cols = {}
    for t in cal["targets"]:
        if f"pred_{t}" not in df:
            raise ValueError(f"--interval is calibrated on the centre view's pred_{t}, which this table lacks "
                             "(a folder with --tta predicts the views' mean only): drop --tta to get intervals")
        sigma = df[f"sigma_{t}"].to_numpy() if cal["method"] == "normalized" and f"sigma_{t}" in df else None
        for level in levels:
            lo, hi = intervals(cal, t, df[f"pred_{t}"].to_numpy(), sigma, level, by_values)
            cols.update(dict(zip(columns(t, level), (lo, hi))))
    return pd.concat([df.drop(columns=[c for c in cols if c in df]), pd.DataFrame(cols, index=df.index)], axis=1)


# --------------------------------------------------------------------------- coverage, honestly

def _coverage(true, lo, hi) -> dict:
    """Coverage, its binomial standard error, the mean width (None where some interval is infinite: too few
    calibration galaxies in its bin to promise the level; n_infinite counts them)."""
    n = len(true)
    if not n:
        return {"coverage": None, "se": None, "mean_width": None, "n_infinite": 0}
    inside = (true >= lo) & (true <= hi)
    c, w = float(np.mean(inside)), hi - lo
    inf = int((~np.isfinite(w)).sum())
    return {"coverage": c, "se": math.sqrt(c * (1 - c) / n), "mean_width": None if inf else float(np.mean(w)),
            "n_infinite": inf}


def _per_bin(true, lo, hi, x, n_bins=8) -> dict:
    from fastgal.score.diagnostics import quantile_bins

    if not len(x):
        return {"bins": [], "min": None, "max": None, "spread": None, "std": None}
    rows = [{"lo": a, "hi": b, "n": int(m.sum()),
             **{k: v for k, v in _coverage(true[m], lo[m], hi[m]).items() if k != "se"}}
            for a, b, m in quantile_bins(x, n_bins)]
    cov = [r["coverage"] for r in rows]
    return {"bins": rows, "min": min(cov), "max": max(cov), "spread": max(cov) - min(cov),
            "std": float(np.std(cov))}


def raw_sigma_intervals(pred, sigma, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The Gaussian head's own interval: pred -+ z sigma, z the standard normal's (1 + level) / 2 quantile."""
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + level / 2))
    return pred - z * sigma, pred + z * sigma


def evaluate(cal_ids, true, pred, sigma, test, levels, *, targets: list[str], by_values=None, n_bins: int = 4) -> dict:
    """Coverage on the held-out galaxies (mask `test`) of intervals calibrated on the others in the arrays
    (mask ~test: all arrays cover the whole validation set): per target and level, for the marginal
    calibration, the Mondrian one by predicted value (and by mass where by_values), and the raw sigma
    intervals: coverage with its binomial standard error, mean width, and per bin of the true and of the
    predicted value (min, max, spread of the bins' coverage)."""
    true, pred = (np.atleast_2d(np.asarray(a, np.float64).T).T for a in (true, pred))
    sigma = None if sigma is None else np.atleast_2d(np.asarray(sigma, np.float64).T).T
    test = np.asarray(test, bool)
    cal_m = ~test
    variants = {"marginal": ("none", None), "mondrian_pred": ("pred", None)}
    if by_values is not None and np.isfinite(by_values).sum() > 4 * n_bins:
        variants["mondrian_mass"] = ("mass", np.asarray(by_values, np.float64))
    cals = {v: calibrate(np.asarray(cal_ids)[cal_m], true[cal_m], pred[cal_m], None if sigma is None else sigma[cal_m],
                         targets=targets, by=by, by_values=None if bv is None else bv[cal_m], n_bins=n_bins)
            for v, (by, bv) in variants.items()}
    out = {}
    for j, t in enumerate(targets):
        y, mu = true[test, j], pred[test, j]
        s = None if sigma is None else sigma[test, j]
        per = {}
        for level in levels:
            row = {}
            for v, (by, bv) in variants.items():
                lo, hi = intervals(cals[v], t, mu, s, level, None if bv is None else bv[test])
                ok = ~np.isnan(lo)  # NaN: no mass to bin by; an infinite interval is counted (it covers)
                row[v] = {**_coverage(y[ok], lo[ok], hi[ok]), "by_true": _per_bin(y[ok], lo[ok], hi[ok], y[ok]),
                          "by_pred": _per_bin(y[ok], lo[ok], hi[ok], mu[ok])}
            if s is not None:
                lo, hi = raw_sigma_intervals(mu, s, level)
                row["raw_sigma"] = {**_coverage(y, lo, hi), "by_true": _per_bin(y, lo, hi, y),
                                    "by_pred": _per_bin(y, lo, hi, mu)}
            per[level_name(level)] = row
        out[t] = per
    return out


def resampled_coverage(true, pred, sigma, levels, n_cal: int, repeats: int = 500, seed: int = 0) -> dict:
    """The expected coverage of split conformal (marginal) over `repeats` random calibration/test splits of
    the same held-out predictions (n_cal calibrate, the rest test): what the guarantee is about (a single
    split's coverage scatters by ~sqrt(level (1 - level) / n_test) around it). Per level: mean coverage, its
    standard deviation across splits, mean width; raw sigma's coverage for comparison (no split needed)."""
    true, pred = np.asarray(true, np.float64), np.asarray(pred, np.float64)
    s_all = scores(true, pred, sigma)
    d = np.ones_like(pred) if sigma is None else np.asarray(sigma, np.float64)
    rng = np.random.default_rng(seed)
    n = len(true)
    cov = {lv: [] for lv in levels}
    width = {lv: [] for lv in levels}
    for _ in range(repeats):
        p = rng.permutation(n)
        c, te = np.sort(s_all[p[:n_cal]]), p[n_cal:]
        for lv in levels:
            q = conformal_quantile(c, lv)
            cov[lv].append(np.mean(s_all[te] <= q))
            width[lv].append(np.mean(2 * q * d[te]))
    out = {}
    for lv in levels:
        row = {"coverage": float(np.mean(cov[lv])), "sd_over_splits": float(np.std(cov[lv])),
               "mean_width": float(np.mean(width[lv])), "n_cal": n_cal, "n_test": n - n_cal, "repeats": repeats}
        if sigma is not None:
            lo, hi = raw_sigma_intervals(pred, d, lv)
            row["raw_sigma"] = _coverage(true, lo, hi)
        out[level_name(lv)] = row
    return out


def coverage_curve(true, pred, sigma, test, grid) -> dict:
    """Empirical coverage on the test galaxies at each nominal level in `grid`: conformal (calibrated on ~test,
    marginal) and, with sigma, raw -+ z sigma. For interval_coverage.png."""
    true, pred, test = np.asarray(true, np.float64), np.asarray(pred, np.float64), np.asarray(test, bool)
    s = scores(true, pred, sigma)
    c = np.sort(s[~test])
    out = {"conformal": [float(np.mean(s[test] <= conformal_quantile(c, lv))) for lv in grid]}
    if sigma is not None:
        sg = np.asarray(sigma, np.float64)
        out["raw sigma (+-z sigma)"] = [_coverage(true[test], *raw_sigma_intervals(pred[test], sg[test], lv))["coverage"]
                                        for lv in grid]
    return out


# --------------------------------------------------------------------------- the file beside model.pt

def model_sha256(run) -> str:
    h = hashlib.sha256()
    with open(Path(run) / "model.pt", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_calibration(run) -> dict:
    """calibration.json of a run folder (or beside a model.pt path), checked against the model it was made
    for; ValueError (one line, the fix) where there is none or it belongs to other weights."""
    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    path = folder / CALIBRATION
    if not path.is_file():
        raise ValueError(f"{folder} has no {CALIBRATION}: the run was trained without --interval; train it again "
                         "with --interval 0.68,0.9,0.95 (which keeps a calibration part of validation out of the "
                         "epoch choice)")
    try:
        cal = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); train the run again with --interval") from None
    if cal.get("format") != FORMAT or cal.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a fastgal calibration of format {FORMAT_VERSION}; train again with --interval")
    if cal.get("model_sha256") and (folder / "model.pt").is_file() and cal["model_sha256"] != model_sha256(folder):
        raise ValueError(f"{path} was made for other weights than {folder / 'model.pt'} (sha256 differs); "
                         "train the run again with --interval")
    return cal


# --------------------------------------------------------------------------- what `fastgal train --interval` writes

PLOT = "interval_coverage.png"


def conformal_run(df, out, targets: list[str], levels, *, calib_pct: float, by: str = "none", n_bins: int = 4,
                  mass=None, mass_col: str | None = None, repeats: int = 500):
    """A finished run's validation predictions (df: id, true_<t>, pred_<t>[, sigma_<t>], every validation
    galaxy) -> (df with a `part` column and the interval columns, metrics.json's "conformal" block); writes
    out/calibration.json (for `fastgal predict --interval`, tied to out/model.pt by its sha256) and
    out/interval_coverage.png. Calibrates on the part whose id hashes below calib_pct; reports coverage on the
    rest, and the expected coverage over `repeats` random re-splits of all of validation."""
    from fastgal.score.plots import interval_coverage_plot
    from fastgal.util import write_json_atomic

    out = Path(out)
    ids = df["id"].astype(str).to_numpy()
    calm = calibration_part(ids, calib_pct)
    if calm.sum() < 10 or (~calm).sum() < 10:
        raise ValueError(f"--calib-pct {calib_pct:g} leaves {int(calm.sum())} calibration and {int((~calm).sum())} "
                         f"held-out validation galaxies; --interval needs 10 of each (hundreds for useful intervals): more galaxies or another --calib-pct")
    has_sigma = all(f"sigma_{t}" in df for t in targets)
    true = df[[f"true_{t}" for t in targets]].to_numpy(np.float64)
    pred = df[[f"pred_{t}" for t in targets]].to_numpy(np.float64)
    sigma = df[[f"sigma_{t}" for t in targets]].to_numpy(np.float64) if has_sigma else None
    mass = None if mass is None else np.asarray(mass, np.float64)
    cal = calibrate(ids[calm], true[calm], pred[calm], None if sigma is None else sigma[calm], targets=targets, by=by,
                    by_values=None if mass is None else mass[calm], n_bins=n_bins, calib_pct=calib_pct, levels=levels)
    cal["mass_col"] = mass_col if by == "mass" else None
    cal["model_sha256"] = model_sha256(out) if (out / "model.pt").is_file() else None
    write_json_atomic(out / CALIBRATION, cal)
    df = add_intervals(df, cal, levels, by_values=mass)
    df.insert(1, "part", np.where(calm, "calibration", "test"))
    test = ~calm
    block = {"levels": list(levels), "method": cal["method"], "by": by, "calib_pct": calib_pct,
             "written": {"none": "marginal", "pred": "mondrian_pred", "mass": "mondrian_mass"}[by],
             "n_calibration": int(calm.sum()), "n_test": int(test.sum()),
             "held_out": evaluate(ids, true, pred, sigma, test, levels, targets=targets, by_values=mass, n_bins=n_bins),
             "resampled": {t: resampled_coverage(true[:, j], pred[:, j], None if sigma is None else sigma[:, j], levels,
                                                 n_cal=int(calm.sum()), repeats=repeats)
                           for j, t in enumerate(targets)}}
    grid = np.round(np.arange(0.05, 0.991, 0.01), 3)
    t0 = targets[0]
    curves = coverage_curve(true[:, 0], pred[:, 0], None if sigma is None else sigma[:, 0], test, grid)
    interval_coverage_plot(grid, curves, out / PLOT, levels=levels, name=t0, n_test=int(test.sum()))
    return df, block
