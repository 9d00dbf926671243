"""The two accuracy references of the synthetic survey, named for what they are.

    from fastgal.floor import floor_stats, observable_reference
    floor_stats(cat, 2, 0.066)  # synth.json's "floor": latent floor, observable reference, mean baseline
    observable_reference(cat)   # re-measure the observable reference on a catalog (make_catalog(n, seed))

- latent floor: the RMSE of metallicity around E[metallicity | stellar mass, SFR]. Only an oracle that
  knows mass and SFR reaches it. A cutout cannot show distance (its frame is scaled to the galaxy), so
  mass is only partly readable from an image: no image-based predictor should be expected to reach it.
- observable reference: the RMSE a strong tabular model (gradient-boosted trees) reaches from the
  quantities the renderer makes visible - apparent r magnitude, observed g-r and r-i, concentration
  R90/R50, bulge fraction, axis ratio, pixel scale. It needs no rendering, only a large latent draw, so
  it is measured once per generator version (OBSERVABLE_REFERENCE, from observable_reference() on
  make_catalog(200_000, 12345)) and recorded in every synth.json. This is what a CNN's RMSE is judged against.
"""

from __future__ import annotations

import numpy as np

from .diagnostics import nmad

# generator 2 (original framing); `python -c "from fastgal.synth import make_catalog; from fastgal.floor
# import observable_reference; print(observable_reference(make_catalog(200_000, 12345)))"` -> 0.1012
OBSERVABLE_REFERENCE = {"rmse": 0.1012, "generator_version": 2, "n": 200_000, "seed": 12345,
                        "model": "sklearn HistGradientBoostingRegressor(max_iter=400, learning_rate=0.08), 80/20 split"}
VISIBLE = ["petroMag_r", "g_r", "r_i", "concentration", "bulge_frac", "axis_ratio", "scale"]


def visible_features(cat: dict) -> np.ndarray:
    """What the renderer lets an image show, one column per VISIBLE name."""
    cols = {"r_i": cat["_ri"], "concentration": cat["petroR90_r"] / cat["petroR50_r"]}
    return np.column_stack([cols[k] if k in cols else cat[k] for k in VISIBLE])


def observable_reference(cat: dict, max_iter: int = 400, seed: int = 0) -> float:
    """Hold-out RMSE of gradient-boosted trees predicting metallicity from visible_features(cat)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    x, y = visible_features(cat), np.asarray(cat["metallicity"])
    k = int(0.8 * len(y))
    model = HistGradientBoostingRegressor(max_iter=max_iter, learning_rate=0.08, random_state=seed).fit(x[:k], y[:k])
    return float(np.sqrt(np.mean((model.predict(x[k:]) - y[k:]) ** 2)))


def floor_stats(cat: dict, generator_version: int, sigma_hidden: float) -> dict:
    """synth.json's accuracy references for the generated sample."""
    m, rel = cat["metallicity"], cat["metallicity_relation"]
    res = m - rel
    if OBSERVABLE_REFERENCE["generator_version"] != generator_version:
        raise RuntimeError("the generator changed: re-measure floor.OBSERVABLE_REFERENCE (see its comment)")
    return {
        "observable_reference_rmse": OBSERVABLE_REFERENCE["rmse"],
        "floor_rmse": float(np.sqrt(np.mean(res**2))),
        "floor_nmad": nmad(res),
        "mean_baseline_rmse": float(np.std(m)),
        "sigma_hidden_latent": sigma_hidden,
        "observable_reference": OBSERVABLE_REFERENCE,
        "note": "observable_reference_rmse = what a strong tabular model reaches from the quantities an image "
        "shows (magnitude, colours, concentration, bulge fraction, axis ratio, pixel scale): the reference for "
        "an image-based model. floor_rmse = the latent floor, RMSE around E[metallicity | stellar mass, SFR]: "
        "only an oracle knowing mass and SFR reaches it (a cutout cannot show distance). "
        "mean_baseline_rmse = predicting the sample mean.",
    }
