"""The embedded synthetic SDSS-like survey: gri cutouts with known metallicities and a known floor.

    fastgal synth data/synth --n 2000 --seed 1

writes, in the seed's layout,
    OUT/data/master.csv      objID (19-digit, exact), ra, dec, metallicity, latent truth columns
    OUT/images/{objID}.jpg   224x224 RGB JPEGs made like SkyServer getjpeg cutouts
    OUT/synth.json           generator version, parameters, seed and the accuracy references (floor.py)

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
     Lupton et al. (2004) asinh stretch of g, r, i onto B, G, R.

Each image is drawn from its own RNG stream seeded by (seed, row), so the output is
byte-identical whatever the number of workers.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.interpolate import PchipInterpolator
from scipy.special import gammaln

from . import __version__
from .config import FRAMES, NATIVE_SCALE, SynthConfig, to_jsonable
from .floor import floor_stats
from .util import (Progress, check_out, default_workers, imap_ordered, remove_stale, temp_dir, worker_pool,
                   write_bytes_atomic, write_json_atomic)

GENERATOR_VERSION = 2  # 2: framed by the original study's rule (R90_SPAN), 1 framed 4 x petroR90_r

# MPA-JHU oh_p50 of the reference sample (~140k SDSS DR star-forming galaxies): quantiles
# 1% 8.286, 5% 8.492, 25% 8.809, 50% 8.956, 75% 9.054, 95% 9.134, 99% 9.190; range 7.85-9.47.
# The 0.1%/99.9% knots are chosen so the curve's mean/std come out at 8.906/0.200 as measured.
REF_P = np.array([0.0, 0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999, 1.0])
REF_Q = np.array([7.85, 8.15, 8.286, 8.492, 8.809, 8.956, 9.054, 9.134, 9.190, 9.25, 9.47])
_Q_REF = PchipInterpolator(REF_P, REF_Q)

SIGMA_HIDDEN = 0.066  # dex in the latent (Tremonti) scale; gives a floor RMSE ~0.08 dex
FMR_ALPHA = 0.12  # metallicity drop per dex of SFR above the main sequence (Mannucci+10-like)
R90_SPAN = FRAMES["original"]  # the original study's framing (config.FRAMES), as `fastgal download` asks for
FRAMING = {"frame": "original", "frame_r90": R90_SPAN, "scale": "frame_r90 * petroR90_r / 224 arcsec/px, "
           "clipped to [0.05, 1.5]; an image of another --size spans the same sky"}
MAG_LIMIT = 17.77  # SDSS main galaxy sample
SKY_SIGMA = np.array([0.0045, 0.0060, 0.0095], np.float32)  # g, r, i noise per native pixel, nmgy
RGB_SCALE = np.array([1.0, 1.15, 1.9], np.float32)  # i->R, r->G, g->B channel weights
LUPTON_Q, LUPTON_STRETCH = 8.0, 0.45

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

    return {
        "objID": objid, "ra": ra, "dec": dec, "z": z, "metallicity": metallicity,
        "metallicity_relation": relation, "lgm_tot_p50": logm, "sfr_tot_p50": logsfr, "delta_ms": dms,
        "petroMag_r": mag_r, "g_r": gr, "petroR50_r": r50, "petroR90_r": r90, "bulge_frac": bt,
        "axis_ratio": axis_ratio, "pos_angle": pa, "scale": scale,
        # image-only parameters (not in the CSV)
        "_ri": ri, "_re_d": re_d, "_re_b": re_b, "_q_disk": q_disk, "_q_bulge": q_bulge,
        "_ssfr": ssfr, "_dms": dms,
    }


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


# --------------------------------------------------------------------------- rendering


def _sersic_norm(n_s: float, b: float) -> float:
    """Integral of exp(-b (r/re)^(1/n)) over the plane, for re = 1 and axis ratio 1."""
    return 2 * math.pi * n_s * math.exp(gammaln(2 * n_s)) / b ** (2 * n_s)


_NORM_EXP = _sersic_norm(1.0, 1.678)
_NORM_DEV = _sersic_norm(4.0, 7.669)


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int):
    if size not in _GRIDS:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        _GRIDS[size] = (yy, xx)
    return _GRIDS[size]


def render(row: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """One galaxy as a (size, size, 3) uint8 RGB array, SkyServer getjpeg style."""
    s = float(row["scale"]) * 224 / size  # keep the angular span when size != 224
    c = (size - 1) / 2 + rng.uniform(-0.5, 0.5, 2)
    yy, xx = _grid(size)
    dx, dy = xx - np.float32(c[0]), yy - np.float32(c[1])
    psf = max(rng.normal(1.4, 0.2), 0.9) / 2.355 / s  # PSF sigma in pixels
    pa = math.radians(float(row["pos_angle"]))
    cp, sp = np.float32(math.cos(pa)), np.float32(math.sin(pa))
    xr = dx * cp + dy * sp
    yr = -dx * sp + dy * cp
    to_native = (NATIVE_SCALE / s) ** 2  # flux per output pixel -> per native pixel area

    # total fluxes in nmgy per band (g, r, i) from r and the colours
    mag_r, gr, ri = float(row["petroMag_r"]), float(row["g_r"]), float(row["_ri"])
    flux = 10 ** (-0.4 * (np.array([mag_r + gr, mag_r, mag_r - ri]) - 22.5))
    bt = float(row["bulge_frac"])
    # bulges are redder than disks: shift colour between the components, keeping the total
    bulge_col = np.array([1 - 0.25 * (1 - bt), 1.0, 1 + 0.08 * (1 - bt)])
    disk_col = (1 - bt * bulge_col) / max(1 - bt, 1e-3)

    # disk: exponential, PSF-softened radius, with m=2 logarithmic spiral arms when star-forming
    re_d = float(row["_re_d"]) / s
    qd = float(row["_q_disk"])
    rd = np.sqrt(xr * xr + (yr / qd) ** 2 + np.float32(psf * psf))
    disk = np.exp(-1.678 * rd / re_d) / (_NORM_EXP * re_d * re_d * qd)
    arm_amp = 0.6 / (1 + math.exp(-(float(row["_ssfr"]) + 10.3) / 0.25)) * (1 - bt)
    if arm_amp > 0.05:
        phi = np.arctan2(yr / qd, xr)
        pitch = math.radians(rng.uniform(12, 30))
        arm = np.cos(2 * (phi - np.log(rd / re_d + 0.3) / math.tan(pitch)) + rng.uniform(0, 2 * math.pi))
        arm *= np.float32(arm_amp) * (1 - np.exp(-rd / re_d))  # arms fade into the centre
    else:
        arm = None
    # bulge: de Vaucouleurs
    re_b = max(float(row["_re_b"]) / s, 0.5)
    qb = float(row["_q_bulge"])
    rb = np.sqrt(xr * xr + (yr / qb) ** 2 + np.float32(psf * psf))
    bulge = np.exp(-7.669 * np.sqrt(np.sqrt(rb / re_b))) / (_NORM_DEV * re_b * re_b * qb)

    img = np.empty((3, size, size), np.float32)
    arm_band = (1.3, 1.0, 0.8)  # arms are blue: strongest in g
    for k in range(3):
        d = disk * np.float32(flux[k] * (1 - bt) * disk_col[k])
        if arm is not None:
            d = d * (1 + np.float32(arm_band[k]) * arm)
        img[k] = (d + bulge * np.float32(flux[k] * bt * bulge_col[k])) * np.float32(to_native)

    _add_neighbours(img, rng, s, psf, to_native)
    _add_sky_noise(img, rng, s)
    return _lupton_rgb(img)


def _add_neighbours(img, rng, s, psf, to_native):
    """Photobombers: stars and small background galaxies, rendered in local windows."""
    size = img.shape[1]
    for _ in range(rng.poisson(0.7)):
        x0, y0 = rng.uniform(0, size, 2)
        if math.hypot(x0 - size / 2, y0 - size / 2) < 0.12 * size:
            continue  # keep the target galaxy itself unobstructed
        star = rng.random() < 0.55
        mag = rng.uniform(14.5, 21.5) if star else rng.uniform(17.5, 21.5)
        col = rng.normal(0.6, 0.35) if star else rng.normal(0.9, 0.2)
        f = 10 ** (-0.4 * (np.array([mag + col, mag, mag - 0.4 * col]) - 22.5))
        sig = psf if star else math.hypot(psf, rng.uniform(0.6, 2.0) / s)
        # window out to where the profile drops below 1/1000 of the sky noise (no hard edges)
        peak = float(f.max()) * to_native / (2 * math.pi * sig * sig)
        h = int(min(sig * math.sqrt(2 * math.log(max(peak / 5e-6, 1.0))) + 2, size))
        xa, xb = max(int(x0) - h, 0), min(int(x0) + h + 1, size)
        ya, yb = max(int(y0) - h, 0), min(int(y0) + h + 1, size)
        if xa >= xb or ya >= yb:
            continue
        yy, xx = np.mgrid[ya:yb, xa:xb].astype(np.float32)
        prof = np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / np.float32(2 * sig * sig)) / np.float32(2 * math.pi * sig * sig)
        for k in range(3):
            img[k, ya:yb, xa:xb] += prof * np.float32(f[k] * to_native)


def _add_sky_noise(img, rng, s):
    """Sky noise as SkyServer resamples it: white when binned, smooth when upsampled."""
    size = img.shape[1]
    if s >= NATIVE_SCALE:
        sig = SKY_SIGMA * np.float32(NATIVE_SCALE / s)
        img += rng.standard_normal(img.shape, dtype=np.float32) * sig[:, None, None]
        return
    nc = max(int(math.ceil(size * s / NATIVE_SCALE)) + 1, 2)
    for k in range(3):
        coarse = rng.standard_normal((nc, nc), dtype=np.float32) * SKY_SIGMA[k]
        img[k] += np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))


def _lupton_rgb(img: np.ndarray) -> np.ndarray:
    """Lupton et al. (2004) asinh stretch: g, r, i -> B, G, R, colour-preserving clipping."""
    # planar arithmetic throughout: reductions over a trailing axis of 3 are slow in numpy
    r, g, b = img[2] * RGB_SCALE[0], img[1] * RGB_SCALE[1], img[0] * RGB_SCALE[2]
    inten = np.maximum((r + g + b) * np.float32(1 / 3), np.float32(1e-9))
    fac = np.arcsinh(inten * np.float32(LUPTON_Q / LUPTON_STRETCH)) / (inten * np.float32(LUPTON_Q))
    mx = np.maximum(np.maximum(r, g), b) * fac
    fac *= np.float32(255) / np.maximum(mx, np.float32(1))  # scale saturated pixels, keep colour
    out = np.empty(r.shape + (3,), np.uint8)
    for k, ch in enumerate((r, g, b)):
        out[..., k] = np.clip(ch * fac + np.float32(0.5), 0, 255)
    return out


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------- the command

_IMG_KEYS = ["scale", "pos_angle", "petroMag_r", "g_r", "_ri", "bulge_frac", "_re_d", "_q_disk", "_ssfr", "_re_b", "_q_bulge"]


def _render_chunk(args):
    """Worker: render rows [start, stop) and write their JPEGs. Returns the count."""
    start, params, seed, size, quality, img_dir = args
    ids = params["objID"]
    for j in range(len(ids)):
        row = {k: params[k][j] for k in _IMG_KEYS}
        rng = np.random.default_rng([seed, start + j, 1])
        data = encode_jpeg(render(row, size, rng), quality)
        with open(os.path.join(img_dir, f"{ids[j]}.jpg"), "wb") as f:
            f.write(data)
    return len(ids)


@dataclass
class SynthResult:
    out: Path
    n: int
    seconds: float
    floor: dict

    @property
    def images_per_s(self) -> float:
        return self.n / max(self.seconds, 1e-9)


TMP_PREFIX = ".synth-"


def _prepare_out(out: Path, cfg: SynthConfig) -> None:
    """Refuse an OUT we may not write (before any work); clear what a killed run left in it."""
    check_out(out, overwrite=cfg.overwrite, finished="synth.json", what="survey",
              unfinished=lambda name: name in ("images", "data"))
    if not cfg.overwrite and any(not p.name.startswith(TMP_PREFIX) for p in out.glob("*")):
        raise ValueError(f"{out} is not empty; pass --overwrite to replace its survey, or choose another folder")
    gone = [p.name for p in remove_stale(out, TMP_PREFIX)]
    if gone:
        Progress(quiet=cfg.quiet).line(f"removed {len(gone)} temporary folder(s) left in {out} by an interrupted run: {', '.join(gone)}")


def synth(cfg: SynthConfig) -> SynthResult:
    """Generate the survey into cfg.out (atomically: a temp folder, then renames)."""
    if cfg.n <= 0:
        raise ValueError(f"--n must be a positive number of galaxies, got {cfg.n}")
    if cfg.size < 64:
        raise ValueError(f"--size must be at least 64 pixels, got {cfg.size}")
    out = Path(cfg.out)
    _prepare_out(out, cfg)
    workers = cfg.workers or default_workers()

    prog = Progress(cfg.n, "synth", cfg.quiet, unit="img")
    cat = make_catalog(cfg.n, cfg.seed)
    tmp = temp_dir(out, TMP_PREFIX)
    try:
        img_dir = tmp / "images"
        img_dir.mkdir()
        chunk = 64
        params = {k: cat[k] for k in _IMG_KEYS + ["objID"]}
        tasks = [
            (a, {k: v[a:a + chunk] for k, v in params.items()}, cfg.seed, cfg.size, cfg.jpeg_quality, str(img_dir))
            for a in range(0, cfg.n, chunk)
        ]
        with worker_pool(workers) as pool:  # each chunk writes its own files: any order gives the same bytes
            for k in imap_ordered(_render_chunk, tasks, pool, 4 * workers):
                prog.update(k)
        prog.close()

        (tmp / "data").mkdir()
        write_catalog_csv(tmp / "data" / "master.csv", cat)
        floor = floor_stats(cat, GENERATOR_VERSION, SIGMA_HIDDEN)
        meta = {
            "generator": "fastgal.synth",
            "generator_version": GENERATOR_VERSION,
            "fastgal_version": __version__,
            "params": {k: v for k, v in to_jsonable(cfg).items() if k not in ("out", "workers", "overwrite", "quiet")},
            "n": cfg.n,
            "seed": cfg.seed,
            "target": "metallicity",
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
    return SynthResult(out=out, n=cfg.n, seconds=prog.elapsed, floor=floor)


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
