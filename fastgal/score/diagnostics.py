"""What an astronomer checks in a metallicity regressor beyond one RMSE: bias and scatter in bins of the
true and of the predicted value, outliers, the mass-metallicity relation recovered from the predictions,
and (for a model that predicts sigma) calibration.

    from fastgal.score.diagnostics import summarise, target_scores
    d = summarise(true, pred, mass=catalog["lgm_tot_p50"])   # JSON-ready
    m = target_scores(true, pred, pred_tta=tta, sigma_tta=spread)  # what train and predict report per target

A CNN regressor pulls the extremes toward the mean: bins of the *true* value show it as a bias that
changes sign across the range (positive at low Z, negative at high Z), which the overall bias hides.
Bins of the *predicted* value are what a catalogue user conditions on. A leaf module: numpy and scipy.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import median_abs_deviation

OUTLIER_NMAD = 3.0  # |d - median(d)| > 3 NMAD is an outlier
MZR_DEGREE = 2  # Tremonti+04 fit a 2nd-order polynomial in log M* over the star-forming sample


def nmad(d) -> float:
    """1.4826 * median|d - median(d)|: the standard deviation for Gaussian d, robust to outliers."""
    d = np.asarray(d, np.float64)
    return float(median_abs_deviation(d, scale="normal")) if len(d) else math.nan


def r2(true, pred) -> float:
    """The coefficient of determination, 1 - SS_res / SS_tot (NaN for a constant truth)."""
    true, pred = np.asarray(true, np.float64), np.asarray(pred, np.float64)
    ss_tot = float(np.sum((true - true.mean()) ** 2))
    return float(1 - np.sum((pred - true) ** 2) / ss_tot) if ss_tot > 0 else float("nan")


def scatter(d) -> dict:
    """bias, RMSE, NMAD and the outlier fraction of residuals d."""
    d = np.asarray(d, np.float64)
    s = nmad(d)
    return {"n": int(len(d)), "bias": float(d.mean()), "rmse": float(np.sqrt(np.mean(d**2))), "nmad": s,
            "outlier_fraction": float(np.mean(np.abs(d - np.median(d)) > OUTLIER_NMAD * s)) if s > 0 else 0.0}


def bin_edges(x, n_bins: int = 8, min_count: int = 20) -> np.ndarray:
    """Quantile edges (equal counts), fewer bins when there are few points, so no bin is noise."""
    x = np.asarray(x, np.float64)
    k = int(max(1, min(n_bins, len(x) // min_count)))
    return np.unique(np.quantile(x, np.linspace(0, 1, k + 1)))


def quantile_bins(x, n_bins: int = 8) -> list[tuple[float, float, np.ndarray]]:
    """(lo, hi, mask of x in it) for each non-empty quantile bin of x (the last bin holds its upper edge)."""
    edges = bin_edges(x, n_bins)
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
    return [(float(edges[b]), float(edges[b + 1]), which == b) for b in range(len(edges) - 1) if (which == b).any()]


def binned(true, pred, by: str = "true", n_bins: int = 8) -> list[dict]:
    """scatter() of pred - true in quantile bins of the true or the predicted value."""
    true, pred = np.asarray(true, np.float64), np.asarray(pred, np.float64)
    x = true if by == "true" else pred
    return [{"lo": lo, "hi": hi, "median": float(np.median(x[m])), **scatter(pred[m] - true[m])}
            for lo, hi, m in quantile_bins(x, n_bins)]


def running_band(x, y, n_bins: int = 12) -> dict:
    """Median and 16-84% band of y in quantile bins of x (for the plots)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    edges = bin_edges(x, n_bins)
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
    rows = [(np.median(x[which == b]), *np.percentile(y[which == b], [16, 50, 84]))
            for b in range(len(edges) - 1) if (which == b).any()]
    a = np.array(rows).reshape(-1, 4)
    return {"x": a[:, 0], "p16": a[:, 1], "p50": a[:, 2], "p84": a[:, 3]}


def mzr(mass, metallicity, degree: int = MZR_DEGREE) -> dict:
    """The mass-metallicity relation: a polynomial fit in log M* and the scatter about it."""
    mass, z = np.asarray(mass, np.float64), np.asarray(metallicity, np.float64)
    ok = np.isfinite(mass) & np.isfinite(z)
    coef = np.polyfit(mass[ok], z[ok], degree)
    d = z[ok] - np.polyval(coef, mass[ok])
    return {"coefficients": [float(c) for c in coef], "degree": degree, "n": int(ok.sum()),
            "rmse": float(np.sqrt(np.mean(d**2))), "nmad": nmad(d),
            "mass_range": [float(np.min(mass[ok])), float(np.max(mass[ok]))]}


def calibration(true, pred, sigma) -> dict:
    """Fraction of |pred - true| within 1 and 2 sigma (Gaussian: 0.683 and 0.954), the RMS of the
    standardised residual (1 when sigma is right on average) and its median |z| (Gaussian: 0.674; unlike
    the RMS, a few gross outliers do not move it). Galaxies whose sigma is 0 or not finite (e.g. 8 TTA
    views that agree exactly) are left out and counted in n_no_sigma, so the JSON never holds Infinity."""
    true, pred, sigma = (np.asarray(a, np.float64) for a in (true, pred, sigma))
    ok = np.isfinite(sigma) & (sigma > 0) & np.isfinite(pred - true)
    out = {"n": int(ok.sum()), "n_no_sigma": int((~ok).sum()), "expected": [0.6827, 0.9545]}
    if not ok.any():
        return {**out, "within_1sigma": None, "within_2sigma": None, "rms_z": None, "median_abs_z": None,
                "median_sigma": None}
    z = np.abs(pred[ok] - true[ok]) / sigma[ok]
    return {**out, "within_1sigma": float(np.mean(z <= 1)), "within_2sigma": float(np.mean(z <= 2)),
            "rms_z": float(np.sqrt(np.mean(z**2))), "median_abs_z": float(np.median(z)),
            "median_sigma": float(np.median(sigma[ok]))}


def summarise(true, pred, mass=None, sigma=None, n_bins: int = 8) -> dict:
    """Everything above for one target, JSON-ready. mass: log M* per galaxy (NaN where unknown)."""
    true, pred = np.asarray(true, np.float64), np.asarray(pred, np.float64)
    out = {**scatter(pred - true), "r2": r2(true, pred), "by_true": binned(true, pred, "true", n_bins),
           "by_pred": binned(true, pred, "pred", n_bins)}
    if mass is not None and np.isfinite(np.asarray(mass, np.float64)).sum() > MZR_DEGREE + 2:
        out["mzr"] = {"true": mzr(mass, true), "pred": mzr(mass, pred)}
    if sigma is not None:
        out["calibration"] = calibration(true, pred, sigma)
    return out


def target_scores(true, pred, *, pred_tta=None, sigma=None, sigma_tta=None, mass=None, train_mean=None,
                  n_bins: int = 8) -> dict:
    """One target's scores: the one definition behind `fastgal train`'s metrics.json and `fastgal predict`'s
    diagnostics, under the same keys. rmse, nmad, bias, r2, outlier_fraction, the bins (by_true, by_pred),
    the MZR fits (with mass) and the calibration of sigma: all of the plain (centre-view) prediction;
    baseline_rmse: predicting train_mean for every galaxy; tta_rmse: the RMSE of pred_tta, the mean of the 8
    dihedral views (--tta), and tta_calibration: that of its spread sigma_tta against it."""
    true, pred = np.asarray(true, np.float64), np.asarray(pred, np.float64)
    d = summarise(true, pred, mass=mass, sigma=sigma, n_bins=n_bins)
    m = {k: d[k] for k in ("rmse", "nmad", "bias", "r2", "outlier_fraction")}
    if train_mean is not None:
        m["baseline_rmse"] = float(np.sqrt(np.mean((true - train_mean) ** 2)))
    if pred_tta is not None:
        tta = np.asarray(pred_tta, np.float64)
        m["tta_rmse"] = scatter(tta - true)["rmse"]
        if sigma_tta is not None:
            m["tta_calibration"] = calibration(true, tta, sigma_tta)
    m.update({k: d[k] for k in ("by_true", "by_pred", "mzr", "calibration") if k in d})
    return m
