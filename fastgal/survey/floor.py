"""The two accuracy references of the synthetic survey, named for what they are.

    from fastgal.survey.floor import floor_stats, observable_reference
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
  A survey of other bands (`synth --format fits --bands ugriz`) shows other colours (u-g, i-z; visible_names):
  each band set's reference is measured the same way once, in OBSERVABLE_REFERENCES.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import median_abs_deviation

# generator 2 (original framing); `python -c "from fastgal.survey.synth import make_catalog; from fastgal.survey.floor
# import observable_reference; print(observable_reference(make_catalog(200_000, 12345)))"` -> 0.1012
OBSERVABLE_REFERENCE = {"rmse": 0.1012, "generator_version": 2, "n": 200_000, "seed": 12345,
                        "model": "sklearn HistGradientBoostingRegressor(max_iter=400, learning_rate=0.08), 80/20 split"}
# Every band set synth can write (letters of ugriz), measured the same way on the same draw, with the colours
# the bands show (visible_names: u-g, i-z beside g-r, r-i): `python -c "from fastgal.survey.synth import make_catalog;
# from fastgal.survey.floor import observable_reference as o; c = make_catalog(200_000, 12345); print(o(c, bands='ugriz'))"`
# (each key in turn). "gri" is OBSERVABLE_REFERENCE's. u and z add little (0.1012 -> 0.1009): metallicity follows
# mass, which a frame scaled to the galaxy hides, and u-g's extra view of specific SFR moves it only by the FMR.
OBSERVABLE_REFERENCES = {
    "u": 0.1098, "g": 0.1089, "r": 0.1076, "i": 0.1072, "z": 0.1071, "ug": 0.1071, "ur": 0.103, "ui": 0.1028,
    "uz": 0.103, "gr": 0.1012, "gi": 0.1022, "gz": 0.1031, "ri": 0.1056, "rz": 0.1055, "iz": 0.1065, "ugr": 0.1008,
    "ugi": 0.1018, "ugz": 0.1025, "uri": 0.1025, "urz": 0.1026, "uiz": 0.1027, "gri": 0.1012, "grz": 0.1012, "giz": 0.1022,
    "riz": 0.1052, "ugri": 0.1009, "ugrz": 0.1008, "ugiz": 0.1018, "uriz": 0.1025, "griz": 0.1012, "ugriz": 0.1009,
}
VISIBLE = ["petroMag_r", "g_r", "r_i", "concentration", "bulge_frac", "axis_ratio", "scale"]  # gri
STRUCTURE = ["concentration", "bulge_frac", "axis_ratio", "scale"]


def visible_names(bands: str = "gri") -> list[str]:
    """The features an image of `bands` (letters of ugriz) shows: one magnitude (r's, else the first band's),
    the colours of neighbouring bands present (u_g, g_r, r_i, i_z; g_i when r is missing...), structure.
    visible_names("gri") == VISIBLE."""
    present = [b for b in "ugriz" if b in bands]
    mag = "petroMag_r" if "r" in present else f"mag_{present[0]}"
    return [mag, *[f"{a}_{b}" for a, b in zip(present, present[1:])], *STRUCTURE]


def visible_features(cat: dict, bands: str = "gri") -> np.ndarray:
    """What the renderer lets an image of `bands` show, one column per visible_names(bands)."""
    mags = {"r": cat["petroMag_r"]}
    mags["g"] = mags["r"] + cat["g_r"]
    mags["i"] = mags["r"] - cat["_ri"]
    if "u" in bands:
        mags["u"] = mags["g"] + cat["_ug"]
    if "z" in bands:
        mags["z"] = mags["i"] - cat["_iz"]
    cols = {"r_i": cat["_ri"], "concentration": cat["petroR90_r"] / cat["petroR50_r"], "u_g": cat.get("_ug"),
            "i_z": cat.get("_iz"), **{f"mag_{b}": m for b, m in mags.items()}}

    def col(k):
        if k in cat:
            return cat[k]
        if cols.get(k) is not None:
            return cols[k]
        a, b = k.split("_")  # a colour of bands that are not neighbours in ugriz (r missing: g_i)
        return mags[a] - mags[b]

    return np.column_stack([col(k) for k in visible_names(bands)])


def observable_reference(cat: dict, max_iter: int = 400, seed: int = 0, bands: str = "gri") -> float:
    """Hold-out RMSE of gradient-boosted trees predicting metallicity from visible_features(cat, bands)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    x, y = visible_features(cat, bands), np.asarray(cat["metallicity"])
    k = int(0.8 * len(y))
    model = HistGradientBoostingRegressor(max_iter=max_iter, learning_rate=0.08, random_state=seed).fit(x[:k], y[:k])
    return float(np.sqrt(np.mean((model.predict(x[k:]) - y[k:]) ** 2)))


def reference_for(bands: str = "gri") -> dict:
    """The observable reference of a band set (letters of ugriz, any order): OBSERVABLE_REFERENCE with
    the set's rmse from OBSERVABLE_REFERENCES, its bands and its visible features."""
    key = "".join(b for b in "ugriz" if b in bands)
    if key not in OBSERVABLE_REFERENCES or not set(bands) <= set("ugriz"):
        raise ValueError(f"no observable reference for bands {bands!r}: they must be letters of ugriz")
    return {**OBSERVABLE_REFERENCE, "rmse": OBSERVABLE_REFERENCES[key], "bands": key, "visible": visible_names(key)}


def floor_stats(cat: dict, generator_version: int, sigma_hidden: float, bands: str = "gri",
                imaging: str = "sdss") -> dict:
    """synth.json's accuracy references for the generated sample, the observable one for `bands`."""
    m, rel = cat["metallicity"], cat["metallicity_relation"]
    res = m - rel
    if OBSERVABLE_REFERENCE["generator_version"] != generator_version:
        raise RuntimeError("the generator changed: re-measure floor.OBSERVABLE_REFERENCE (see its comment)")
    ref = reference_for(bands)
    return {
        "observable_reference_rmse": ref["rmse"],
        "floor_rmse": float(np.sqrt(np.mean(res**2))),
        "floor_nmad": float(median_abs_deviation(np.asarray(res, np.float64), scale="normal")),  # the NMAD
        "mean_baseline_rmse": float(np.std(m)),
        "sigma_hidden_latent": sigma_hidden,
        "observable_reference": ref,
        **({"noisy_observable_reference_rmse": NOISY_REFERENCES[f"{imaging}:{bands}"]}
           if f"{imaging}:{bands}" in NOISY_REFERENCES else {}),
        "note": "observable_reference_rmse = what a strong tabular model reaches from the quantities an image "
        "of these bands shows (magnitude, colours, concentration, bulge fraction, axis ratio, pixel scale): the "
        "reference for an image-based model. floor_rmse = the latent floor, RMSE around E[metallicity | stellar "
        "mass, SFR]: only an oracle knowing mass and SFR reaches it (a cutout cannot show distance). "
        "mean_baseline_rmse = predicting the sample mean.",
    }


# What depth can buy, bounded: the observable reference with each survey's photometric noise on the magnitude and
# colours (structure kept exact), measured once like OBSERVABLE_REFERENCES on make_catalog(200_000, 12345):
# `python -c "from fastgal.survey.synth import make_catalog; from fastgal.survey.floor import noisy_reference as o;
# c = make_catalog(200_000, 12345); print(o(c, 'sdss', 'gri'), o(c, 'legacy', 'grz'))"`. Both equal the noise-free
# reference to within its own scatter: galaxies of the SDSS spectroscopic sample (r < 17.77) are so bright that
# even SDSS's sky adds ~0.002-0.01 mag to their integrated colours, against colour spreads of 0.1-0.3 mag.
NOISY_REFERENCES = {"sdss:gri": 0.1013, "legacy:grz": 0.1013}  # noise-free gri and grz: 0.1012


def photometric_errors(cat: dict, imaging: str, bands: str) -> dict:
    """Each band's magnitude error from the survey's sky noise inside the galaxy's R90 aperture (90% of its light):
    sigma_F = sky per native pixel / native pixel (arcsec) x sqrt(pi R90^2); sigma_m = 1.0857 sigma_F / F."""
    from fastgal.survey.render import IMAGING

    im = IMAGING[imaging]
    feats = dict(zip(visible_names("ugriz"), visible_features(cat, "ugriz").T))
    mags = {"r": feats["petroMag_r"], "u": feats["petroMag_r"] + cat["g_r"] + feats["u_g"],
            "g": feats["petroMag_r"] + cat["g_r"], "i": feats["petroMag_r"] - feats["r_i"]}
    mags["z"] = mags["i"] - feats["i_z"]
    area = np.sqrt(np.pi) * np.asarray(cat["petroR90_r"])
    return {b: 1.0857 * im.sky[b] / im.native * area / (0.9 * 10 ** (-0.4 * (mags[b] - 22.5))) for b in bands}


def noisy_reference(cat: dict, imaging: str, bands: str, seed: int = 0) -> float:
    """observable_reference with photometric_errors drawn onto the visible magnitude and colours."""
    rng = np.random.default_rng(seed)
    err = photometric_errors(cat, imaging, bands)
    noise = {b: rng.standard_normal(len(e)) * e for b, e in err.items()}
    noisy = dict(cat)
    r = "r" if "r" in bands else bands[0]
    noisy["petroMag_r"] = cat["petroMag_r"] + noise[r]
    colour = {"g_r": ("g", "r"), "_ri": ("r", "i"), "_iz": ("i", "z"), "_ug": ("u", "g")}
    for key, (a, b) in colour.items():
        if key in cat:
            noisy[key] = cat[key] + noise.get(a, 0) - noise.get(b, 0)
    return observable_reference(noisy, bands=bands)
