"""The DESI Legacy Imaging Surveys' cutout service: its requests, its FITS answers read and checked, and its files
written the way it writes them (for `fastgal synth --survey legacy` and the tests' local server).

    fastgal download data/legacy --imaging legacy --limit 100                # g, r, z FITS cubes, ls-dr10
    fastgal download data/legacy --imaging legacy --layer ls-dr9-north --catalog my.csv

What the service does (legacysurvey.org/dr10/description "Obtaining Images and Raw Data", the same text in
github.com/legacysurvey/legacysurvey pages/dr10/description.rst, and pages/dr9/description.rst):
  - {viewer}/fits-cutout?ra&dec&layer&pixscale&bands&size answers a FITS file (`cutout.fits` is the same
    endpoint's other name; {viewer}/jpeg-cutout the colour JPEG). size sets width = height (width/height set
    one each). "The maximum size for cutouts (in number of pixels) is currently 512"; bigger asks are not
    refused but served smaller (the viewer clamps, as users report for its JPEGs: kmhess/SoFiA-image-pipeline
    issue #76), so fastgal never asks for more than 512 and checks the size it gets.
  - pixscale: arcsec/pixel; "pixscale=0.262 will return (approximately) the native pixels" (the coadds' 0.262"
    TAN bricks); any other scale is a resampling of the coadd. The documentation gives no pixscale range:
    fastgal keeps to 0.05-2.62"/px (a fifth of a native pixel to ten of them), clamps to it and says so per galaxy.
  - layer: ls-dr10 merges the northern images (BASS g, r + MzLS z, as in DR9) and the southern ones (DECam) "at a
    line corresponding to Dec=32.375"; ls-dr10-south / ls-dr10-north take one side only (DR10 adds DECam i in
    the south; the north has g, r, z only); ls-dr9 (-north/-south) the same for DR9 (g, r, z). SDSS's
    spectroscopic sample (the NGC cap) lies on both sides of 32.375.
  - bands: a string such as griz, gz, g; the answer is one primary HDU holding a (bands, H, W) float32 cube of
    nanomaggies per pixel, with a TAN WCS and the planes named in the header as BAND0, BAND1, ... (the convention
    fastgal's FITS reader already follows, shards/fits.py).
  - not documented, so handled whatever the service does: where a band has no coverage (outside the footprint,
    a layer's side of Dec 32.375 asked for a galaxy on the other, a band a layer lacks) a coadd has no pixels
    to resample, and the plane can come back 0 (or NaN) with a 200 status. Hence fastgal reads every answer in
    full and refuses an all-zero or all-NaN band as `no-coverage` (never a silent zero image), a band absent
    from the cube as `missing-band`, and records the largest fraction of a band's pixels with no data
    (blank_fraction) for frames at the footprint's edge.
  - errors: also undocumented. Any body that is not FITS (an HTML or text page, with status 200 or not) is an
    error page; 5xx/429 are overload. Both are handled like SkyServer's (fastgal.survey.skyserver): one shared
    polite rate limit, urllib3 retries with backoff and Retry-After, and our own retries of what urllib3 cannot
    see (a 200 carrying HTML, a body cut short, a truncated FITS) within the same budget of tries.
Reasons in download-report.csv start with a kind: html-error, truncated, not-fits, missing-band, no-coverage,
wrong-size, HTTP n, timed out, connection dropped, connection refused.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import requests

from fastgal.options import DownloadConfig
from fastgal.survey.render import LEGACY, LEGACY_DEPTH, LEGACY_NATIVE
from fastgal.survey.skyserver import connect_failure, describe, error_message, tries

SERVICE_URL = "https://www.legacysurvey.org/viewer"
FITS_ENDPOINT = "fits-cutout"  # also served as cutout.fits
JPEG_ENDPOINT = "jpeg-cutout"
MIN_SIZE, MAX_SIZE = 64, 512  # 512: the service's documented maximum; 64: fastgal's (as for getjpeg)
MIN_SCALE, MAX_SCALE = 0.05, 10 * LEGACY_NATIVE  # fastgal's bounds: the service documents none
NORTH_DEC = 32.375  # where ls-dr10 / ls-dr9 switch from DECam (south) to BASS/MzLS (north)
LAYERS = {  # layer: bands it serves (south / north of Dec 32.375)
    "ls-dr10": ("griz", "grz"), "ls-dr10-south": ("griz", ""), "ls-dr10-north": ("", "grz"),
    "ls-dr9": ("grz", "grz"), "ls-dr9-south": ("grz", ""), "ls-dr9-north": ("", "grz"),
}
STATUSES = ("ok", "skipped-existing", "no-coverage", "missing-band", "not-found", "failed", "invalid-image",
            "interrupted")
FINAL = ("no-coverage", "missing-band", "not-found")  # what asking again would not change: not asked in a re-run
BLANK_FLAG = 0.5  # note a frame where more than half of a band's pixels have no data (the footprint's edge)


def check_layer(layer: str, bands: str) -> None:
    """A one-line ValueError for a layer the service does not have or bands it never serves."""
    if layer not in LAYERS:
        raise ValueError(f"--layer {layer!r} is not a Legacy Surveys imaging layer; choose one of {', '.join(LAYERS)}")
    have = set("".join(LAYERS[layer]))
    if not bands or any(b not in have for b in bands) or len(set(bands)) != len(bands):
        raise ValueError(f"--bands {bands!r}: {layer} serves {''.join(b for b in 'griz' if b in have)} "
                         "(distinct letters, e.g. grz)")


def coverage_hint(layer: str, dec: float, bands: str, kind: str = "no-coverage") -> str:
    """Why a band may be empty or absent here: the layer's side of Dec 32.375, or a band only the other side has."""
    south, north = LAYERS[layer]
    side = "north" if dec > NORTH_DEC else "south"
    have = north if side == "north" else south
    if not have:
        return (f"; Dec {dec:g} is {side} of {NORTH_DEC} where {layer} has no images: use "
                f"{layer.replace('-south', '').replace('-north', '')}")
    lacking = [b for b in bands if b not in have]
    if lacking:
        return f"; {layer} has no {','.join(lacking)} {side} of Dec {NORTH_DEC}"
    return " (outside the footprint?)" if kind == "no-coverage" else f" ({layer} serves {have} here)"


# ------------------------------------------------------------------------------------ the files


def write_service_cube(path, cube: np.ndarray, bands: str, pixscale: float, ra: float, dec: float,
                       layer: str = "ls-dr10") -> None:
    """A cutout as the service writes one: a primary HDU holding the (bands, H, W) float32 cube (nanomaggies per
    0.262" native pixel area, resampled keeping surface brightness), a TAN WCS centred on (ra, dec), BANDS and
    BAND0.. naming the planes. No DATE card, so the same cube gives the same bytes."""
    from fastgal.shards.fits import require_astropy

    fits = require_astropy("writing FITS")
    cube = np.asarray(cube, np.float32)
    _, h, w = cube.shape
    hdu = fits.PrimaryHDU(cube)
    hd = hdu.header
    for key, val in (("CTYPE1", "RA---TAN"), ("CTYPE2", "DEC--TAN"), ("CRVAL1", float(ra)), ("CRVAL2", float(dec)),
                     ("CRPIX1", (w + 1) / 2), ("CRPIX2", (h + 1) / 2), ("CD1_1", -pixscale / 3600), ("CD1_2", 0.0),
                     ("CD2_1", 0.0), ("CD2_2", pixscale / 3600), ("IMAGEW", float(w)), ("IMAGEH", float(h))):
        hd[key] = val
    hd["BANDS"] = bands
    for k, b in enumerate(bands):
        hd[f"BAND{k}"] = b
    hd["LAYER"] = layer
    hdu.writeto(path)


def legacy_images_note(bands: str) -> str:
    return (f"images/{{objID}}.fits: as the Legacy Surveys' fits-cutout answers: one primary HDU, a ({len(bands)}, H, W) "
            f"float32 cube of bands {bands!r} in nanomaggies per 0.262 arcsec native pixel (resampled to the frame's "
            "pixscale keeping surface brightness), TAN WCS (CRVAL1/2 = ra, dec; CD = pixscale), BANDS, BAND0.., LAYER")


def legacy_bands_model(bands: str) -> dict:
    return {"native_pixel_arcsec": LEGACY_NATIVE, "depth_5sigma": {b: LEGACY_DEPTH[b] for b in bands},
            "sky_sigma_nmgy_per_native_pixel": {b: round(LEGACY.sky[b], 7) for b in bands},
            "psf_fwhm_arcsec": f"max(N({LEGACY.psf[0]}, {LEGACY.psf[1]}), {LEGACY.psf[2]}), one per galaxy, every band",
            "galaxies": "the SDSS-like survey's of the same seed: the same catalog, components, neighbours and draws; "
                        "only the pixel, seeing and sky noise differ (render.LEGACY)"}


# ------------------------------------------------------------------------------------ reading an answer


def _expected_bytes(header) -> int:
    """The whole file's size its primary header promises (header blocks + data padded to 2880)."""
    n = 1
    for k in range(1, int(header.get("NAXIS", 0)) + 1):
        n *= int(header[f"NAXIS{k}"])
    data = n * abs(int(header.get("BITPIX", 8))) // 8
    return len(header.tostring()) + -(-data // 2880) * 2880


def inspect_fits(data: bytes, bands: str, size: int) -> tuple[str, str, float | None]:
    """(kind, detail, blank_fraction) of a fits-cutout answer: kind "" when usable. Kinds: html-error (an HTML or
    text page), not-fits, truncated (fewer bytes than the header promises, or unreadable data), missing-band,
    wrong-size, no-coverage (a band all 0 or all NaN). blank_fraction: the largest fraction of one band's pixels
    that are 0 or not finite."""
    from fastgal.shards.fits import Unusable, fits_bands, require_astropy

    head = data[:2880].lstrip()
    if not data.startswith(b"SIMPLE  ="):
        if head[:1] == b"<" or (head and all(32 <= c < 127 or c in (9, 10, 13) for c in head[:200])):
            text = head.decode("utf-8", "replace")
            return "html-error", f"a text/HTML page, not FITS: {error_message(text)[:160]}", None
        return "not-fits", f"not a FITS file (starts {data[:16]!r})", None
    fits = require_astropy("fastgal download --imaging legacy")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "File may have been truncated": said below, as a report reason
            hdul = fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=False)
        with hdul:
            want = _expected_bytes(hdul[0].header)
            if len(data) < want:
                return "truncated", f"{len(data):,} of the {want:,} bytes its header promises", None
            planes, names = fits_bands(hdul)
            planes = [np.asarray(p, np.float32) for p in planes]
    except Unusable as e:
        return "not-fits", e.detail, None
    except Exception as e:  # a header cut short, data astropy cannot read
        return "truncated", f"unreadable FITS ({type(e).__name__}: {str(e)[:120]})", None
    if names is None:  # unnamed planes: taken in order when their number is the number asked
        if len(planes) != len(bands):
            return "missing-band", f"{len(planes)} unnamed plane(s), asked for {len(bands)} ({bands})", None
        names = list(bands)
    missing = [b for b in bands if b not in names]
    if missing:
        return "missing-band", f"the cube has bands {','.join(names)}, not {','.join(missing)}", None
    shape = planes[0].shape
    if shape != (size, size):
        return "wrong-size", f"{shape[1]}x{shape[0]} px, asked for {size}x{size}", None
    blank = {}
    for b in bands:
        p = planes[names.index(b)]
        empty = ~np.isfinite(p) | (p == 0)
        blank[b] = float(empty.mean())
        if empty.all():
            what = "NaN" if not np.isfinite(p).any() else "0"
            return "no-coverage", f"band {b} has no data (every pixel {what})", 1.0
    return "", "", max(blank.values())


def blank_note(frac: float | None) -> str:
    if frac is not None and frac > BLANK_FLAG:
        return f"mostly blank: {frac:.0%} of a band's pixels have no data (the footprint's edge?)"
    return ""


# ------------------------------------------------------------------------------------ the fetcher


def get_fits(session: requests.Session, url: str, params: dict, cfg: DownloadConfig
             ) -> tuple[str, str, int, bytes | None]:
    """One fits-cutout call after urllib3's retries: (status, reason, tries, bytes). "ok" with the bytes (still to
    be inspected), "cut-short" (worth another try), "failed" (final), "unreachable" (no connection)."""
    from fastgal.survey.skyserver import CONNECT_RETRIES

    try:
        r = session.get(url, params=params, timeout=cfg.timeout, stream=True)
    except requests.RequestException as e:
        if connect_failure(e):
            return "unreachable", describe(e), min(cfg.retries, CONNECT_RETRIES) + 1, None
        return "failed", describe(e), cfg.retries + 1, None
    with r:
        n = tries(r)
        if r.status_code != 200:  # 429/5xx after urllib3's retries, or a 4xx (a bad parameter, no such layer)
            text = ""
            if r.status_code < 500:
                try:
                    text = ": " + error_message(r.text)[:160]
                except requests.RequestException:
                    pass
            return "failed", f"HTTP {r.status_code}{text}", n, None
        try:
            data = r.content
        except requests.RequestException as e:
            return "cut-short", f"truncated: body cut short ({describe(e)})", n, None
        return "ok", "", n, data


def make_downloader(base):
    """The Legacy Surveys' fetcher as a subclass of download.Downloader (passed in: download imports this module)."""

    class LegacyDownloader(base):
        ext = ".fits"

        def __init__(self, cfg, images, stop):
            super().__init__(cfg, images, stop)
            self.url = f"{cfg.legacy_url.rstrip('/')}/{FITS_ENDPOINT}"

        def fetch_jpeg(self, oid: str, params: dict) -> str:
            """--jpeg: the same frame's colour JPEG into OUT/jpeg (the FITS is the product: a JPEG that fails is a
            note in the reason, `jpeg: ...`, and is asked again by a re-run)."""
            from fastgal.shards.cutouts import check_jpeg

            if not self.cfg.jpeg:
                return ""
            dst = self.images.parent / "jpeg" / f"{oid}.jpg"
            if dst.exists() and not check_jpeg(dst.read_bytes(), size=(self.cfg.size,) * 2, require_eoi=True)[0]:
                return ""
            dst.parent.mkdir(exist_ok=True)
            self.limiter.acquire()
            url = self.url.rsplit("/", 1)[0] + f"/{JPEG_ENDPOINT}"
            got, reason, _, data = get_fits(self.sessions.get(), url, params, self.cfg)
            if got != "ok":
                return f"jpeg: {reason}"
            bad, detail, _ = check_jpeg(data, size=(self.cfg.size,) * 2, require_eoi=True)
            if bad:
                return f"jpeg: {bad}: {detail}"
            self._save(dst, data)
            return ""

        def fetch(self, oid: str, ra: str, dec: str, scale: float):
            from fastgal.survey.download import Outcome

            cfg, dst = self.cfg, self.images / f"{oid}.fits"
            replaced = ""
            if dst.exists():
                kind, detail, blank = inspect_fits(dst.read_bytes(), cfg.bands, cfg.size)
                if not kind:
                    params = {"ra": ra, "dec": dec, "layer": cfg.layer, "pixscale": f"{scale:.6g}", "size": cfg.size,
                              "bands": cfg.bands}
                    notes = (blank_note(blank), self.fetch_jpeg(oid, params))
                    return Outcome(oid, "skipped-existing", "; ".join(x for x in notes if x), 0, blank)
                replaced = f"replaced an unusable earlier file ({kind}: {detail})"
            params = {"ra": ra, "dec": dec, "layer": cfg.layer, "pixscale": f"{scale:.6g}", "size": cfg.size,
                      "bands": cfg.bands}
            status, reason, n = "failed", "", 0
            for got, reason, data, n in self.answers(get_fits, params):
                if got == "unreachable":
                    return Outcome(oid, "failed", f"{reason} after {n} tries" if n > 1 else reason, n)
                if got == "failed":
                    return Outcome(oid, "failed", reason + (f" after {n} tries" if n > 1 else ""), n)
                if got == "cut-short":
                    status = "failed"
                    continue
                kind, detail, blank = inspect_fits(data, cfg.bands, cfg.size)
                if not kind:
                    self._save(dst, data)
                    notes = (blank_note(blank), replaced, self.fetch_jpeg(oid, params))
                    return Outcome(oid, "ok", "; ".join(x for x in notes if x), n, blank)
                reason = f"{kind}: {detail}"
                if kind in ("no-coverage", "missing-band"):  # the sky or the layer: asking again changes nothing
                    return Outcome(oid, kind, reason + coverage_hint(cfg.layer, float(dec), cfg.bands, kind), n,
                                   blank)
                if kind == "wrong-size":
                    return Outcome(oid, "invalid-image", reason, n)
                status = "invalid-image"  # html-error, truncated, not-fits: another try, should one be left
            return Outcome(oid, status, f"{reason} (after {n} tries)", n)

    return LegacyDownloader
