"""The embedded synthetic SDSS-like survey: cutouts with known metallicities and a known floor.

    fastgal synth data/synth --n 2000 --seed 1
    fastgal synth data/synth-fits --n 2000 --seed 1 --format fits --bands ugriz

writes, in the seed's layout,
    OUT/data/master.csv      objID (19-digit, exact), ra, dec, metallicity, latent truth columns
    OUT/images/{objID}.jpg   224x224 RGB JPEGs made like SkyServer getjpeg cutouts, or with --format fits
    OUT/images/{objID}.fits  the same galaxies as calibrated fluxes: a (bands, H, W) float32 cube in
                             nanomaggies per 0.396" SDSS pixel area, resampled to the cutout's PIXSCALE
                             (fits.write_cube: header BANDS, BAND0.., BUNIT, PIXSCALE, NMGYPIX, OBJID)
    OUT/synth.json           generator version, parameters, seed, format, bands and what sets each band
                             (sky noise, colours), and the accuracy references for those bands (floor.py)

The physics, in order (all vectorised over the catalog, one RNG stream):
  1. log stellar mass, redshift (volume-weighted under an r < 17.77 flux limit, like SDSS's
     main galaxy sample), star formation on the main sequence with scatter and a quenched tail.
  2. latent metallicity u = Tremonti+04 mass-metallicity relation - 0.12 * (SFR offset from the
     main sequence)  (the fundamental metallicity relation) + sigma_hidden * N(0,1), where the
     last term is the scatter that no image can reveal.
  3. metallicity = Q_ref(F_u(u)): a fixed monotone map that calibrates u onto the quantiles of
     MPA-JHU oh_p50 for the reference sample. Monotone, so the MZR/FMR ordering is kept.
  4. the latent floor: RMSE of metallicity around E[metallicity | mass, SFR] (Gauss-Hermite over the
     hidden scatter): the best a predictor that knows mass and SFR can do. An image shows less (no
     distance), so floor.py also records the observable reference, what the visible quantities allow.
  5. what a CNN can see: colour from specific SFR (+ redshift k-correction), bulge fraction and
     concentration from mass and quenching, size-mass relation, surface brightness with
     cosmological dimming, spiral arms in star-forming disks, random inclination and position
     angle; SDSS-like PSF, sky noise resampled to the cutout's pixel scale, photobombers, and the
     Lupton et al. (2004) asinh stretch of g, r, i onto B, G, R (render.py: render_fluxes -> render).
  6. u and z (--format fits): u-g from specific SFR, mass and redshift, i-z from g-r and redshift (UG, IZ),
     drawn from a separate stream (seed, 2), and u/z sky noise from (seed, row, 2): asking for u or z
     changes no g, r, i pixel, and the FITS g, r, i planes are exactly what the JPEG of the same seed stretches.

Each image is drawn from its own RNG stream seeded by (seed, row), so the output is
byte-identical whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.interpolate import PchipInterpolator

from fastgal import __version__
from fastgal.options import SynthConfig, to_jsonable
from fastgal.recipe import FRAMES, NATIVE_SCALE
from fastgal.survey.floor import floor_stats
from fastgal.survey.legacy import legacy_bands_model, legacy_images_note
from fastgal.survey.render import (
    ARM_UZ,
    BANDS,
    BULGE_UZ,
    LEGACY,
    NEIGHBOUR_COLOURS,
    SKY_SIGMA_BANDS,
    encode_jpeg,
    render,
    render_fluxes,
)
from fastgal.util import (
    LOCK_NAME,
    Progress,
    check_out,
    claim_out,
    default_workers,
    imap_ordered,
    temp_dir,
    worker_pool,
    write_bytes_atomic,
    write_json_atomic,
)

GENERATOR_VERSION = 2  # 2: framed by the original study's rule (R90_SPAN), 1 framed 4 x petroR90_r

# MPA-JHU oh_p50 of the reference sample (~140k SDSS DR star-forming galaxies): quantiles
# 1% 8.286, 5% 8.492, 25% 8.809, 50% 8.956, 75% 9.054, 95% 9.134, 99% 9.190; range 7.85-9.47.
# The 0.1%/99.9% knots are chosen so the curve's mean/std come out at 8.906/0.200 as measured.
REF_P = np.array([0.0, 0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999, 1.0])
REF_Q = np.array([7.85, 8.15, 8.286, 8.492, 8.809, 8.956, 9.054, 9.134, 9.190, 9.25, 9.47])
_Q_REF = PchipInterpolator(REF_P, REF_Q)

SIGMA_HIDDEN = 0.066  # dex in the latent (Tremonti) scale; gives a floor RMSE ~0.08 dex
FMR_ALPHA = 0.12  # metallicity drop per dex of SFR above the main sequence (Mannucci+10-like)
R90_SPAN = FRAMES["original"]  # the original study's framing (recipe.FRAMES), as `fastgal download` asks for
FRAMING = {"frame": "original", "frame_r90": R90_SPAN, "scale": "frame_r90 * petroR90_r / 224 arcsec/px, "
           "clipped to [0.05, 1.5]; an image of another --size spans the same sky"}
MAG_LIMIT = 17.77  # SDSS main galaxy sample
# u - g and i - z, drawn from their own stream (seed, 2) so the gri survey is unchanged by them.
# u - g: the u band sits below the 4000 A break and sees stars a few 100 Myr old, so it follows recent star
# formation more directly than g - r: a sigmoid in log sSFR at g - r's centre but 1.5x as wide (0.45 dex,
# so it keeps rising through the blue cloud, where g - r flattens), blue 1.0 to red 1.75 at rest (a main-
# sequence galaxy ~1.2, a quenched one ~1.6, as SDSS's blue cloud and red sequence), a little
# mass (stellar metallicity) dependence, and a k-correction that grows with redness (the break moves
# into g with redshift): rest + (kcorr_blue + (kcorr_red - kcorr_blue) f_q) z; observed red sequence
# ~1.9 at z 0.1 as in SDSS. i - z: small and mildly red, from g - r at rest and redshift.
UG = {"blue": 1.0, "red": 1.75, "ssfr_mid": -10.6, "ssfr_width": 0.45, "mass_slope": 0.05,
      "kcorr_blue": 0.8, "kcorr_red": 2.0, "scatter": 0.05,
      "relation": "u-g = blue + (red - blue) f_q + mass_slope (logM - 10) + (kcorr_blue + (kcorr_red - kcorr_blue) f_q) z "
                  "+ N(0, scatter), f_q = 1 / (1 + exp((log sSFR - ssfr_mid) / ssfr_width))"}
IZ = {"zero": 0.05, "gr_slope": 0.3, "kcorr": 0.3, "scatter": 0.03,
      "relation": "i-z = zero + gr_slope (g-r)_rest + kcorr z + N(0, scatter)"}

# Columns written to master.csv, in order. Truth columns are what the generator knows.
COLUMNS = [
    "objID", "ra", "dec", "z", "metallicity", "metallicity_relation", "lgm_tot_p50", "sfr_tot_p50",
    "delta_ms", "petroMag_r", "g_r", "petroR50_r", "petroR90_r", "bulge_frac", "axis_ratio",
    "pos_angle", "scale",
]


def _tremonti(logm):
    """Tremonti et al. (2004) mass-metallicity relation."""
    return -1.492 + 1.847 * logm - 0.08026 * logm**2


def _comoving_mpc(z):
    """Flat LCDM (H0=70, Om=0.3) comoving distance, by a fine cumulative trapezoid."""
    zg = np.linspace(0, 1.0, 2001)
    ez = np.sqrt(0.3 * (1 + zg) ** 3 + 0.7)
    dc = np.concatenate([[0], np.cumsum(0.5 * (1 / ez[1:] + 1 / ez[:-1]) * np.diff(zg))]) * 299792.458 / 70
    return np.interp(z, zg, dc)


def _latent_population(rng, n):
    """Mass, SFR offset and latent metallicity for n galaxies (before the flux limit's redshifts)."""
    logm = np.clip(rng.normal(10.05, 0.55, n), 8.3, 11.8)
    quenched = rng.random(n) < 0.12
    dms = np.where(quenched, rng.normal(-0.9, 0.35, n), rng.normal(0.0, 0.28, n))
    u = _tremonti(logm) - FMR_ALPHA * dms
    return logm, dms, u


def _calibration():
    """F_u: the CDF of the latent u (with hidden scatter) over a fixed large population."""
    rng = np.random.default_rng(20041001)
    _, _, u0 = _latent_population(rng, 400_000)
    u = np.sort(u0 + SIGMA_HIDDEN * rng.standard_normal(u0.size))
    p = (np.arange(u.size) + 0.5) / u.size
    return u[::100], p[::100]  # 4000-point table is plenty for a smooth monotone CDF


_CAL_U, _CAL_P = _calibration()


def calibrate(u):
    """The monotone map from the latent scale onto the reference oh_p50 distribution."""
    return _Q_REF(np.interp(u, _CAL_U, _CAL_P, left=0.0, right=1.0))


def make_catalog(n: int, seed: int) -> dict[str, np.ndarray]:
    """Draw the survey's catalog: truths, photometry and cutout geometry, all vectorised."""
    rng = np.random.default_rng([seed, 0])
    logm, dms, u0 = _latent_population(rng, n)
    hidden = SIGMA_HIDDEN * rng.standard_normal(n)
    metallicity = calibrate(u0 + hidden)
    # E[metallicity | mass, SFR]: Gauss-Hermite over the hidden scatter
    x, w = np.polynomial.hermite_e.hermegauss(32)
    relation = (calibrate(u0[:, None] + SIGMA_HIDDEN * x[None, :]) * w).sum(1) / w.sum()

    logsfr_ms = 0.76 * (logm - 10.0) - 0.15
    logsfr = logsfr_ms + dms
    ssfr = logsfr - logm
    # rest-frame g-r from specific SFR (blue cloud -> red sequence), a little mass dependence
    gr_rest = 0.38 + 0.42 / (1 + np.exp((ssfr + 10.6) / 0.3)) + 0.06 * (logm - 10) + rng.normal(0, 0.03, n)
    # Bell+03 mass-to-light -> absolute r magnitude
    ml = -0.306 + 1.097 * gr_rest
    abs_r = 4.65 - 2.5 * (logm - ml)
    # redshift: volume-weighted below z_max where the galaxy hits the flux limit
    zg = np.linspace(0.005, 0.6, 1200)
    dm_grid = 5 * np.log10(_comoving_mpc(zg) * (1 + zg) * 1e5) + 1.1 * zg  # + a rough k-correction
    zmax = np.clip(np.interp(MAG_LIMIT - abs_r, dm_grid, zg), 0.025, 0.30)
    zmin = 0.02
    z = (zmin**3 + rng.random(n) * (zmax**3 - zmin**3)) ** (1 / 3)
    dc = _comoving_mpc(z)
    mag_r = abs_r + 5 * np.log10(dc * (1 + z) * 1e5) + 1.1 * z
    gr = gr_rest + 0.9 * z  # observed colour reddens with redshift
    ri = 0.12 + 0.32 * gr_rest + 0.35 * z + rng.normal(0, 0.02, n)

    # structure: bulge fraction rises with mass and quenching; size-mass relation
    bt = np.clip(1 / (1 + np.exp(-(1.6 * (logm - 10.4) - 1.8 * dms))) * 0.85 + rng.normal(0, 0.05, n), 0.0, 0.9)
    re_disk_kpc = 10 ** (0.2 * (logm - 10) + 0.58 + rng.normal(0, 0.14, n))
    re_bulge_kpc = 10 ** (0.55 * (logm - 10) - 0.05 + rng.normal(0, 0.12, n))
    kpc_per_arcsec = dc / (1 + z) * 1000 * math.pi / (180 * 3600)
    re_d = re_disk_kpc / kpc_per_arcsec
    re_b = re_bulge_kpc / kpc_per_arcsec
    r50 = (1 - bt) * re_d + bt * re_b
    r90 = r50 * (2.3 + 1.2 * bt)  # concentration: ~2.3 for a disk, ~3.5 for a de Vaucouleurs
    cos_i = rng.random(n)
    q_disk = np.sqrt(cos_i**2 * (1 - 0.15**2) + 0.15**2)
    q_bulge = rng.uniform(0.65, 1.0, n)
    axis_ratio = (1 - bt) * q_disk + bt * q_bulge
    pa = rng.uniform(0, 180, n)
    scale = np.clip(R90_SPAN * r90 / 224, 0.05, 1.5)  # arcsec/pixel, for a 224 px cutout

    # positions on the sky in SDSS's northern cap; SDSS-style objIDs (skyVersion 2, rerun 301)
    ra = rng.uniform(120, 250, n)
    dec = np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-2)), np.sin(np.radians(65)), n)))
    objid = make_objids(n, seed)
    ug, iz = _uz_colours(np.random.default_rng([seed, 2]), ssfr, logm, gr_rest, z)

    return {
        "objID": objid, "ra": ra, "dec": dec, "z": z, "metallicity": metallicity,
        "metallicity_relation": relation, "lgm_tot_p50": logm, "sfr_tot_p50": logsfr, "delta_ms": dms,
        "petroMag_r": mag_r, "g_r": gr, "petroR50_r": r50, "petroR90_r": r90, "bulge_frac": bt,
        "axis_ratio": axis_ratio, "pos_angle": pa, "scale": scale,
        # image-only parameters (not in the CSV)
        "_ri": ri, "_re_d": re_d, "_re_b": re_b, "_q_disk": q_disk, "_q_bulge": q_bulge,
        "_ssfr": ssfr, "_dms": dms, "_ug": ug, "_iz": iz,
    }


def _uz_colours(rng, ssfr, logm, gr_rest, z):
    """Observed u - g and i - z (UG, IZ), from their own RNG stream: the gri catalog does not change."""
    n = len(z)
    f_q = 1 / (1 + np.exp((ssfr - UG["ssfr_mid"]) / UG["ssfr_width"]))
    ug = (UG["blue"] + (UG["red"] - UG["blue"]) * f_q + UG["mass_slope"] * (logm - 10)
          + (UG["kcorr_blue"] + (UG["kcorr_red"] - UG["kcorr_blue"]) * f_q) * z + rng.normal(0, UG["scatter"], n))
    iz = IZ["zero"] + IZ["gr_slope"] * gr_rest + IZ["kcorr"] * z + rng.normal(0, IZ["scatter"], n)
    return ug, iz


def make_objids(n: int, seed: int) -> np.ndarray:
    """Unique 19-digit ids with SDSS's bit layout: skyVersion|rerun|run|camcol|field|obj.

    Bijective in the row index, so ids never collide; the seed moves the run numbers so
    surveys with different seeds do not share ids.
    """
    i = np.arange(n, dtype=np.int64)
    obj = i % 600 + 1
    q = i // 600
    field = q % 700 + 11
    q2 = q // 700
    camcol = q2 % 6 + 1
    run = 94 + (seed % 4000) * 16 + q2 // 6
    if run.max() >= 1 << 16:
        raise ValueError("n too large for the objID layout")
    return (
        (np.int64(2) << 59) | (np.int64(301) << 48) | (run.astype(np.int64) << 32)
        | (camcol.astype(np.int64) << 29) | (field.astype(np.int64) << 16) | obj.astype(np.int64)
    )


# --------------------------------------------------------------------------- the command

_IMG_KEYS = ["scale", "pos_angle", "petroMag_r", "g_r", "_ri", "bulge_frac", "_re_d", "_q_disk", "_ssfr", "_re_b", "_q_bulge",
             "_ug", "_iz"]


def _render_chunk(args):
    """Worker: render rows [start, stop) and write their JPEGs or FITS cubes. Returns the count."""
    start, params, seed, size, quality, img_dir, fmt, bands, survey = args
    ids = params["objID"]
    for j in range(len(ids)):
        row = {k: params[k][j] for k in _IMG_KEYS}
        rng = np.random.default_rng([seed, start + j, 1])
        if fmt == "jpeg":
            data = encode_jpeg(render(row, size, rng), quality)
            with open(os.path.join(img_dir, f"{ids[j]}.jpg"), "wb") as f:
                f.write(data)
            continue
        from fastgal.shards.fits import write_cube

        rng_uz = np.random.default_rng([seed, start + j, 2]) if ("u" in bands or "z" in bands) else None
        if survey == "legacy":  # the same galaxy and draws, through the Legacy Surveys' camera and sky
            from fastgal.survey.legacy import write_service_cube

            cube = render_fluxes(row, size, rng, bands, rng_uz, imaging=LEGACY)
            write_service_cube(os.path.join(img_dir, f"{ids[j]}.fits"), cube, bands, float(row["scale"]) * 224 / size,
                               float(params["ra"][j]), float(params["dec"][j]))
            continue
        cube = render_fluxes(row, size, rng, bands, rng_uz)
        # SDSS frame units (nmgy per native pixel), resampled keeping surface brightness: the JPEG's input
        write_cube(os.path.join(img_dir, f"{ids[j]}.fits"), cube, bands, float(row["scale"]) * 224 / size, ids[j],
                   nmgy_pixel=NATIVE_SCALE)
    return len(ids)


def check_bands(fmt: str, bands: str, survey: str = "sdss") -> str:
    """The band string --format takes: 'gri' for jpeg; for fits distinct letters of ugriz in that order
    (commas allowed: g,r,i); for --survey legacy letters of griz (the Legacy Surveys have no u). 'auto': gri,
    grz for legacy. A one-line ValueError otherwise."""
    if bands == "auto":
        bands = "grz" if survey == "legacy" else "gri"
    b = bands.replace(",", "").strip()
    if survey == "legacy":
        if fmt != "fits":
            raise ValueError("--survey legacy writes FITS as the Legacy Surveys' cutout service serves them: "
                             "pass --format fits (or leave --format out)")
        if "u" in b:
            raise ValueError(f"--survey legacy: the Legacy Surveys image g, r, i (DR10 south), z, not u; got --bands {bands!r}")
    if fmt == "jpeg":
        if b != "gri":
            raise ValueError(f"--format jpeg writes g, r, i as RGB: --bands must be gri, got {bands!r} "
                             "(use --format fits for other bands)")
        return b
    if fmt != "fits":
        raise ValueError(f"--format must be jpeg or fits, got {fmt!r}")
    pos = [BANDS.find(c) for c in b]
    if not b or -1 in pos or pos != sorted(set(pos)):
        raise ValueError(f"--bands must be distinct letters of ugriz in that order (e.g. ugriz, gri, griz), got {bands!r}")
    return b


@dataclass
class SynthResult:
    out: Path
    n: int
    seconds: float
    floor: dict
    bands: str = "gri"

    @property
    def images_per_s(self) -> float:
        return self.n / max(self.seconds, 1e-9)


TMP_PREFIX = ".synth-"


def _check_out(out: Path, cfg: SynthConfig) -> None:
    check_out(out, overwrite=cfg.overwrite, finished="synth.json", what="survey",
              unfinished=lambda name: name in ("images", "data"))
    if not cfg.overwrite and any(not p.name.startswith(TMP_PREFIX) and not p.name.startswith(LOCK_NAME) for p in out.glob("*")):
        raise ValueError(f"{out} is not empty; pass --overwrite to replace its survey, or choose another folder")


def _prepare_out(out: Path, cfg: SynthConfig, stack: contextlib.ExitStack) -> None:
    """Refuse an OUT we may not write (before any work), then claim it for this command (util.claim_out)."""
    claim_out(out, "fastgal synth", lambda: _check_out(out, cfg), stack, quiet=cfg.quiet, tmp_prefix=TMP_PREFIX)


def synth(cfg: SynthConfig) -> SynthResult:
    """Generate the survey into cfg.out (atomically: a temp folder, then renames)."""
    if cfg.n <= 0:
        raise ValueError(f"--n must be a positive number of galaxies, got {cfg.n}")
    if cfg.size < 64:
        raise ValueError(f"--size must be at least 64 pixels, got {cfg.size}")
    fmt = "fits" if cfg.survey == "legacy" else cfg.format
    if cfg.survey not in ("sdss", "legacy"):
        raise ValueError(f"--survey must be sdss or legacy, got {cfg.survey!r}")
    bands = check_bands(fmt, cfg.bands, cfg.survey)
    if fmt == "fits":
        from fastgal.shards.fits import require_astropy

        require_astropy("fastgal synth --format fits")  # before any work, in this process
    out = Path(cfg.out)
    with contextlib.ExitStack() as claim:  # OUT is this command's until it returns or fails
        _prepare_out(out, cfg, claim)
        return _synth(replace(cfg, format=fmt), out, bands)


def _synth(cfg: SynthConfig, out: Path, bands: str) -> SynthResult:
    workers = cfg.workers or default_workers()

    prog = Progress(cfg.n, "synth", cfg.quiet, unit="img")
    cat = make_catalog(cfg.n, cfg.seed)
    tmp = temp_dir(out, TMP_PREFIX)
    try:
        img_dir = tmp / "images"
        img_dir.mkdir()
        chunk = 64
        params = {k: cat[k] for k in _IMG_KEYS + ["objID", "ra", "dec"]}
        tasks = [
            (a, {k: v[a:a + chunk] for k, v in params.items()}, cfg.seed, cfg.size, cfg.jpeg_quality, str(img_dir),
             cfg.format, bands, cfg.survey)
            for a in range(0, cfg.n, chunk)
        ]
        with worker_pool(workers) as pool:  # each chunk writes its own files: any order gives the same bytes
            for k in imap_ordered(_render_chunk, tasks, pool, 4 * workers):
                prog.update(k)
        prog.close()

        (tmp / "data").mkdir()
        write_catalog_csv(tmp / "data" / "master.csv", cat)
        floor = floor_stats(cat, GENERATOR_VERSION, SIGMA_HIDDEN, bands, cfg.survey)
        meta = {
            "generator": "fastgal.survey.synth",
            "generator_version": GENERATOR_VERSION,
            "fastgal_version": __version__,
            "params": {**{k: v for k, v in to_jsonable(cfg).items() if k not in ("out", "workers", "overwrite", "quiet")},
                       "bands": bands},
            "n": cfg.n,
            "seed": cfg.seed,
            "target": "metallicity",
            "format": cfg.format,
            "bands": bands,
            "survey": cfg.survey,
            "images": _images_note(cfg.format, bands) if cfg.survey == "sdss" else legacy_images_note(bands),
            "bands_model": _bands_model(bands) if cfg.survey == "sdss" else legacy_bands_model(bands),
            "framing": FRAMING,
            "floor": floor,
            "metallicity_quantiles": {f"{p:g}": float(np.quantile(cat["metallicity"], p)) for p in (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)},
            "metallicity_mean": float(np.mean(cat["metallicity"])),
            "metallicity_std": float(np.std(cat["metallicity"])),
            "reference_quantiles": dict(zip(["0", "0.001", "0.01", "0.05", "0.25", "0.5", "0.75", "0.95", "0.99", "0.999", "1"], REF_Q.tolist())),
            "columns": COLUMNS,
        }
        # swap the finished survey in; synth.json last, so its presence means "complete"
        (out / "synth.json").unlink(missing_ok=True)
        for name in ("images", "data"):
            dst = out / name
            if dst.exists():
                shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
            os.replace(tmp / name, dst)
        write_json_atomic(out / "synth.json", meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return SynthResult(out=out, n=cfg.n, seconds=prog.elapsed, floor=floor, bands=bands)


def _images_note(fmt: str, bands: str) -> str:
    if fmt == "jpeg":
        return "images/{objID}.jpg: RGB = Lupton asinh stretch of i, r, g (SkyServer getjpeg style), JPEG quality 75"
    return (f"images/{{objID}}.fits: one primary HDU, a ({len(bands)}, H, W) float32 cube of bands {bands!r} in "
            "nanomaggies per 0.396 arcsec SDSS pixel (SDSS frame units resampled to PIXSCALE keeping surface "
            "brightness, like SkyServer's cutouts; flux in a pixel = value x (PIXSCALE / 0.396)^2); header BANDS, "
            "BAND0.., BUNIT, PIXSCALE, NMGYPIX, OBJID; g, r, i are the planes the JPEG survey of the same seed stretches")


def _bands_model(bands: str) -> dict:
    """What sets each written band: sky noise per native pixel and the colour relations (UG, IZ...)."""
    out = {"sky_sigma_nmgy_per_native_pixel": {b: round(SKY_SIGMA_BANDS[b], 7) for b in bands},
           "sky_noise": "per output pixel: sky_sigma x 0.396 / pixscale when binned (white), sky_sigma on a "
                        "bilinearly upsampled native grid when the pixel is finer than SDSS's",
           "psf_fwhm_arcsec": "max(N(1.4, 0.2), 0.9), one per galaxy, every band",
           "colours": {"g-r": "(g-r)_rest + 0.9 z (master.csv g_r), (g-r)_rest = 0.38 + 0.42 / (1 + exp((log sSFR "
                               "+ 10.6) / 0.3)) + 0.06 (logM - 10) + N(0, 0.03)",
                       "r-i": "0.12 + 0.32 (g-r)_rest + 0.35 z + N(0, 0.02)"}}
    if "u" in bands:
        out["colours"]["u-g"] = UG
    if "z" in bands:
        out["colours"]["i-z"] = IZ
    if "u" in bands or "z" in bands:
        out["bulge_colour_uz"] = {**BULGE_UZ, "relation": "bulge's flux factor: u 1 - u (1 - B/T), z 1 + z (1 - B/T) "
                                                            "(g 1 - 0.25 (1 - B/T), i 1 + 0.08 (1 - B/T)); the disk keeps the total"}
        out["arm_amplitude_uz"] = ARM_UZ
        out["neighbour_colours_uz"] = NEIGHBOUR_COLOURS
        out["streams"] = "u-g, i-z: rng (seed, 2) over the catalog; u, z sky noise: rng (seed, row, 2); g, r, i unchanged"
    return out


def write_catalog_csv(path: Path, cat: dict[str, np.ndarray]) -> None:
    """master.csv with exact integer objIDs and fixed decimal places (byte-reproducible)."""
    fmt = {"ra": 7, "dec": 7, "z": 5, "scale": 5, "pos_angle": 2}
    lines = [",".join(COLUMNS)]
    cols = []
    for c in COLUMNS:
        v = cat[c]
        if c == "objID":
            cols.append([str(int(x)) for x in v])
        else:
            d = fmt.get(c, 4)
            cols.append([f"{x:.{d}f}" for x in v])
    lines += [",".join(r) for r in zip(*cols)]
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode())
