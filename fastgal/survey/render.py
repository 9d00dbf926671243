"""One galaxy's pixels, the image model of `fastgal synth`: from a catalog row to calibrated fluxes (render_fluxes)
and to a SkyServer-like JPEG cutout (render: the Lupton stretch of exactly those g, r, i planes; encode_jpeg).

    from fastgal.survey.render import render, render_fluxes
    cube = render_fluxes(row, 224, np.random.default_rng([seed, i, 1]), "ugriz", np.random.default_rng([seed, i, 2]))
    rgb = render(row, 224, np.random.default_rng([seed, i, 1]))     # (224, 224, 3) uint8, the same g, r, i

A row holds what the catalog (synth.make_catalog) decided about a galaxy: magnitude and colours, bulge
fraction, sizes, axis ratios, position angle, specific SFR and the cutout's pixel scale. Here they become an
exponential disk (with spiral arms when star-forming) plus a de Vaucouleurs bulge, redder than the disk,
softened by an SDSS-like PSF, with occasional stars and background galaxies, and sky noise resampled to the
cutout's pixel as SkyServer resamples: white when binned, smooth when upsampled. Each image takes its draws
from the generator it is given, so the survey's bytes do not depend on how rows are shared out to workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from PIL import Image
from scipy.special import gammaln

from fastgal.recipe import NATIVE_SCALE

BANDS = "ugriz"  # the bands render_fluxes can make, in wavelength order
SKY_SIGMA = np.array([0.0045, 0.0060, 0.0095], np.float32)  # g, r, i noise per native pixel, nmgy
# u and z sky noise from SDSS's relative depths (95% point-source completeness u 22.0, g 22.2, r 22.2,
# i 21.3, z 20.5; the DR7 paper, Abazajian+09): per-pixel noise scales as 10^(-0.4 m_lim) at a similar
# PSF, so u = g's x 10^(0.4 (22.2 - 22.0)) = 1.20 x g's, and z = r's x 10^(0.4 (22.2 - 20.5)) = 4.8 x r's
# (z's CCDs are less sensitive and its sky brighter). Anchored to the nearest of the existing g, r.
SKY_SIGMA_UZ = np.array([0.0045 * 1.202, 0.0060 * 4.786], np.float32)  # u, z noise per native pixel, nmgy
SKY_SIGMA_BANDS = dict(zip(BANDS, [float(SKY_SIGMA_UZ[0]), *map(float, SKY_SIGMA), float(SKY_SIGMA_UZ[1])]))
# bulges are redder than disks (the bulge's share of each band's flux, as for g and i below): stronger in u
BULGE_UZ = {"u": 0.45, "z": 0.12}  # bulge_col = 1 - 0.45 (1 - B/T) in u, 1 + 0.12 (1 - B/T) in z
ARM_UZ = {"u": 1.6, "z": 0.7}  # spiral arms are young and blue: brightest in u (g 1.3, r 1.0, i 0.8)
# neighbours' u - g and i - z from their g - r (`col`) with no draws: stars along the SDSS stellar locus,
# background galaxies (already k-corrected, col ~0.9) like the red half of the catalog
NEIGHBOUR_COLOURS = {"star": {"u_g": (0.6, 1.5), "i_z": (0.0, 0.3)}, "galaxy": {"u_g": (0.7, 1.0), "i_z": (0.1, 0.2)},
                     "relation": "colour = a + b (g-r)"}


@dataclass(frozen=True)
class Imaging:
    """What a survey's camera makes of a galaxy: its native pixel (arcsec), its seeing (PSF FWHM, arcsec: one
    draw per galaxy, max(N(mean, sd), floor)) and its sky noise per band (nmgy per native pixel). The galaxy
    (catalog, components, neighbours, every draw) is the same whatever the imaging."""

    name: str
    native: float
    psf: tuple[float, float, float]  # FWHM mean, sd, floor
    sky: dict


SDSS = Imaging("sdss", NATIVE_SCALE, (1.4, 0.2, 0.9), SKY_SIGMA_BANDS)
# The DESI Legacy Imaging Surveys (DR9/DR10, DECaLS south; BASS/MzLS north of Dec 32.375): 0.262" pixels
# (legacysurvey.org/dr10/description: "pixel scale of 0.262"/pix"); the dedicated surveys' 5-sigma depth goals
# g 24.0, r 23.4, z 22.5 (Dey et al. 2019), DR10's i ~23.3, against SDSS's 95% completeness g 22.2, r 22.2,
# i 21.3, z 20.5 (the same numbers SKY_SIGMA_UZ anchors u and z to); median seeing ~1.2" (DECam g 1.3, r 1.2,
# z 1.1) against SDSS's 1.4". A point-source depth is ~ noise per unit area x PSF width, so the noise per unit
# area is SDSS's x 10^(-0.4 (m_legacy - m_sdss)) x (1.4 / 1.2), and per 0.262" pixel that x 0.262 / 0.396.
LEGACY_DEPTH = {"g": 24.0, "r": 23.4, "i": 23.3, "z": 22.5}
SDSS_DEPTH = {"u": 22.0, "g": 22.2, "r": 22.2, "i": 21.3, "z": 20.5}
LEGACY_NATIVE = 0.262
LEGACY_PSF = (1.2, 0.15, 0.8)
LEGACY = Imaging("legacy", LEGACY_NATIVE, LEGACY_PSF, {
    b: SKY_SIGMA_BANDS[b] * LEGACY_NATIVE / NATIVE_SCALE * 10 ** (-0.4 * (LEGACY_DEPTH[b] - SDSS_DEPTH[b]))
    * SDSS.psf[0] / LEGACY_PSF[0] for b in LEGACY_DEPTH})
IMAGING = {"sdss": SDSS, "legacy": LEGACY}
RGB_SCALE = np.array([1.0, 1.15, 1.9], np.float32)  # i->R, r->G, g->B channel weights
LUPTON_Q, LUPTON_STRETCH = 8.0, 0.45


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


def render_fluxes(row: dict, size: int, rng: np.random.Generator, bands: str = "gri",
                  rng_uz: np.random.Generator | None = None, imaging: Imaging = SDSS) -> np.ndarray:
    """One galaxy as calibrated fluxes: a (len(bands), size, size) float32 cube in nanomaggies per native
    (0.396") pixel area, i.e. SDSS frame units resampled to this cutout's pixel keeping surface brightness,
    as SkyServer resamples for its cutouts (flux in a pixel = value x (pixscale / 0.396)^2), after PSF,
    neighbours and sky noise; planes in the order of `bands` (a subset of "ugriz").

    g, r and i take every draw from `rng`, in the same order whatever `bands` asks, so they are the
    planes the JPEG stretches (render). u and z take no draw from `rng`: their sky noise comes from
    `rng_uz` (the survey seeds it (seed, row, 2)), their colours from the catalog (_ug, _iz).
    """
    uz = "u" in bands or "z" in bands
    if uz and rng_uz is None:
        raise ValueError("u and z need their own noise stream: pass rng_uz")
    s = float(row["scale"]) * 224 / size  # keep the angular span when size != 224
    c = (size - 1) / 2 + rng.uniform(-0.5, 0.5, 2)
    yy, xx = _grid(size)
    dx, dy = xx - np.float32(c[0]), yy - np.float32(c[1])
    psf = max(rng.normal(imaging.psf[0], imaging.psf[1]), imaging.psf[2]) / 2.355 / s  # PSF sigma in pixels
    pa = math.radians(float(row["pos_angle"]))
    cp, sp = np.float32(math.cos(pa)), np.float32(math.sin(pa))
    xr = dx * cp + dy * sp
    yr = -dx * sp + dy * cp
    to_native = (imaging.native / s) ** 2  # flux per output pixel -> per native pixel area

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

    def planes(img, flux, bulge_col, disk_col, arm_band):
        for k in range(len(img)):
            d = disk * np.float32(flux[k] * (1 - bt) * disk_col[k])
            if arm is not None:
                d = d * (1 + np.float32(arm_band[k]) * arm)
            img[k] = (d + bulge * np.float32(flux[k] * bt * bulge_col[k])) * np.float32(to_native)

    img = np.empty((3, size, size), np.float32)
    planes(img, flux, bulge_col, disk_col, (1.3, 1.0, 0.8))  # arms are blue: strongest in g
    img_uz = None
    if uz:  # u and z: the same components, their own colours (u = g + (u-g), z = i - (i-z))
        flux_uz = 10 ** (-0.4 * (np.array([mag_r + gr + float(row["_ug"]), mag_r - ri - float(row["_iz"])]) - 22.5))
        bulge_uz = np.array([1 - BULGE_UZ["u"] * (1 - bt), 1 + BULGE_UZ["z"] * (1 - bt)])
        img_uz = np.empty((2, size, size), np.float32)
        planes(img_uz, flux_uz, bulge_uz, (1 - bt * bulge_uz) / max(1 - bt, 1e-3), (ARM_UZ["u"], ARM_UZ["z"]))

    _add_neighbours(img, rng, s, psf, to_native, img_uz)
    _add_sky_noise(img, rng, s, SKY_SIGMA if imaging is SDSS else
                   np.array([imaging.sky[b] for b in "gri"], np.float32), imaging.native)
    if not uz:
        return img if bands == "gri" else img[["gri".index(b) for b in bands]]
    _add_sky_noise(img_uz, rng_uz, s, SKY_SIGMA_UZ if imaging is SDSS else
                   np.array([imaging.sky.get(b, np.nan) for b in "uz"], np.float32), imaging.native)
    by_band = {"u": img_uz[0], "g": img[0], "r": img[1], "i": img[2], "z": img_uz[1]}
    return np.stack([by_band[b] for b in bands])


def render(row: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """One galaxy as a (size, size, 3) uint8 RGB array, SkyServer getjpeg style: the Lupton stretch of
    exactly the g, r, i planes render_fluxes makes from the same draws."""
    return _lupton_rgb(render_fluxes(row, size, rng))


def _add_neighbours(img, rng, s, psf, to_native, img_uz=None):
    """Photobombers: stars and small background galaxies, rendered in local windows. img_uz (u, z
    planes, or None) gets their fluxes from NEIGHBOUR_COLOURS without a draw of its own."""
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
        # window out to where the profile drops below 1/1000 of the sky noise (no hard edges); set by
        # g, r, i so their planes do not depend on u and z (z is at most a few times brighter than the
        # brightest of them, and its sky noise ~5x r's, so its window is as safe)
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
        if img_uz is not None:
            nc = NEIGHBOUR_COLOURS["star" if star else "galaxy"]
            ug, iz = nc["u_g"][0] + nc["u_g"][1] * col, nc["i_z"][0] + nc["i_z"][1] * col
            f_uz = 10 ** (-0.4 * (np.array([mag + col + ug, mag - 0.4 * col - iz]) - 22.5))
            for k in range(2):
                img_uz[k, ya:yb, xa:xb] += prof * np.float32(f_uz[k] * to_native)


def _add_sky_noise(img, rng, s, sky_sigma, native: float = NATIVE_SCALE):
    """Sky noise as SkyServer resamples it: white when binned, smooth when upsampled. sky_sigma: one
    noise per plane of img, in nmgy per native pixel."""
    size = img.shape[1]
    if s >= native:
        sig = sky_sigma * np.float32(native / s)
        img += rng.standard_normal(img.shape, dtype=np.float32) * sig[:, None, None]
        return
    nc = max(int(math.ceil(size * s / native)) + 1, 2)
    for k in range(len(img)):
        coarse = rng.standard_normal((nc, nc), dtype=np.float32) * sky_sigma[k]
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
