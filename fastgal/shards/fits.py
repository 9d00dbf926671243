"""FITS cutouts: written as one primary HDU holding a (bands, H, W) float32 cube in nanomaggies per pixel; read
as that, or as one 2-D HDU per band.

    write_cube("OUT/images/123.fits", cube, "ugriz", pixscale=0.25, objid=123)
    arr, names = read_fits("OUT/images/123.fits", ("g", "r", "i"))     # (3, H, W) float32, bands by name

Reading: a cube's bands are named by BAND0..BANDn-1, else BANDS; one HDU per band by FILTER, BAND or EXTNAME
(BAND_KEYS); unnamed planes are taken in order. Problems raise Unusable(reason, detail) with the shard reject
reasons (cutouts.check_fits turns them into rejects.csv rows).

Header: BANDS = 'ugriz' (the planes' bands, in order), BAND0..BANDn-1 = 'u', 'g', ... (the Legacy Survey
cutout service's convention), BUNIT = 'nanomaggy' (AB mag = 22.5 - 2.5 log10 flux), PIXSCALE (arcsec/px),
NMGYPIX (arcsec: the values are nanomaggies per NMGYPIX x NMGYPIX area, so the flux in one pixel is
value x (PIXSCALE / NMGYPIX)^2; synth writes 0.396, SDSS frame units resampled keeping surface brightness,
as SkyServer's cutouts of any scale are), OBJID (a string: a 19-digit id is not exact as a FITS float).
No DATE or CHECKSUM card, so the same cube gives the same bytes. astropy is an optional extra
(`pip install 'fastgal[fits]'`), imported only here, only when a FITS file is touched.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from fastgal.util import chunks, imap_ordered

FITS_EXTRA = "pip install 'fastgal[fits]'"


def require_astropy(what: str):
    """astropy.io.fits, or a one-line ValueError saying `what` needs it and how to get it."""
    try:
        from astropy.io import fits
    except ImportError:
        raise ValueError(f"{what} needs astropy: {FITS_EXTRA}") from None
    return fits


def write_cube(path, cube: np.ndarray, bands: str, pixscale: float, objid, nmgy_pixel: float | None = None) -> None:
    """Write `cube` ((len(bands), H, W), nanomaggies per nmgy_pixel x nmgy_pixel arcsec, default per pixel)
    as float32 to a new file at `path`."""
    fits = require_astropy("writing FITS")
    cube = np.asarray(cube, np.float32)
    if cube.ndim != 3 or cube.shape[0] != len(bands):
        raise ValueError(f"a cube of {len(bands)} band(s) {bands!r} must be (bands, H, W), got {cube.shape}")
    hdu = fits.PrimaryHDU(cube)
    h = hdu.header
    h["BANDS"] = (bands, "bands of the planes, in order")
    for k, b in enumerate(bands):
        h[f"BAND{k}"] = (b, f"band of plane {k}")
    h["BUNIT"] = ("nanomaggy", "per pixel; AB mag = 22.5 - 2.5 log10(flux)")
    h["PIXSCALE"] = (float(pixscale), "arcsec/pixel")
    h["NMGYPIX"] = (float(pixscale if nmgy_pixel is None else nmgy_pixel), "arcsec: nmgy per NMGYPIX^2 arcsec^2")
    h["OBJID"] = (str(int(objid)), "object id, exact")
    hdu.writeto(path)


# --------------------------------------------------------------------------- reading

BAND_KEYS = ("FILTER", "BAND", "EXTNAME")  # where a one-band HDU names its band, in the order looked at


def _cube_names(header, n: int) -> list[str] | None:
    """A (bands, H, W) cube's band names: BAND0..BANDn-1 (the Legacy Survey cutout service's), else BANDS
    ('ugriz' or 'u,g,r')."""
    names = [header.get(f"BAND{k}") for k in range(n)]
    if all(isinstance(v, str) and v.strip() for v in names):
        return [v.strip() for v in names]
    b = header.get("BANDS")
    if isinstance(b, str):
        b = b.replace(" ", "")
        parts = b.split(",") if "," in b else list(b)
        if len(parts) == n:
            return parts
    return None


def _hdu_name(header) -> str | None:
    for key in BAND_KEYS:
        v = header.get(key)
        if isinstance(v, str) and v.strip() and not (key == "EXTNAME" and v.strip().upper() == "PRIMARY"):
            return v.strip()
    return None


def fits_bands(hdul) -> tuple[list[np.ndarray], list[str] | None]:
    """The planes of an open FITS file and their band names (None where the file does not name them): one
    HDU holding a (bands, H, W) cube, or one 2-D HDU per band (named by FILTER, BAND or EXTNAME)."""
    hdus = [h for h in hdul if getattr(h, "is_image", False) and h.data is not None]
    if len(hdus) == 1 and hdus[0].data.ndim == 3:
        cube = hdus[0].data
        return list(cube), _cube_names(hdus[0].header, len(cube))
    if hdus and all(h.data.ndim == 2 for h in hdus):
        names = [_hdu_name(h.header) for h in hdus]
        return [h.data for h in hdus], names if all(names) and len(set(names)) == len(names) else None
    shapes = [h.data.shape for h in hdus]
    raise Unusable("wrong-bands", f"image HDUs of shapes {shapes}: expected one (bands, H, W) cube or one 2-D HDU per band")


class Unusable(Exception):
    """A cutout that cannot be used: .reason (a shard reject reason) and .detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def read_fits(path: str, bands: tuple[str, ...] | None, asker: str = "--bands") -> tuple[np.ndarray, list[str]]:
    """A FITS cutout as a (bands, H, W) float32 array with the bands in the order asked (all of the file's, in
    its order, for bands=None) and their names. Raises Unusable(reason, detail) with a shard reject reason;
    `asker` is who asked for the bands, as the detail names it (shard's --bands, or predict's model)."""
    fits = require_astropy("FITS cutouts")
    try:
        with fits.open(path, memmap=False, lazy_load_hdus=False) as hdul:
            planes, names = fits_bands(hdul)
    except FileNotFoundError:
        raise Unusable("missing-image", f"{path} not found") from None
    except Unusable:
        raise
    except OSError as e:
        msg = str(e)
        if "Empty or corrupt FITS file" in msg or "No SIMPLE card" in msg:  # what it is, in words a person recognises
            with open(path, "rb") as f:
                head = f.read(16)
            what = "a JPEG" if head.startswith(b"\xff\xd8\xff") else f"starts with {head.decode('ascii', 'replace')!r}"
            raise Unusable("not-fits", f"not a FITS file: {what}") from None
        raise Unusable("corrupt-image", f"{type(e).__name__}: {msg}"[:200]) from None
    except Exception as e:  # a truncated data unit, a header astropy cannot parse, ...
        raise Unusable("corrupt-image", f"{type(e).__name__}: {e}"[:200]) from None
    if len({p.shape for p in planes}) != 1:
        raise Unusable("wrong-bands", f"bands of different sizes {[p.shape for p in planes]}")
    if bands is None:
        order = list(range(len(planes)))
        names = names or [f"band{k}" for k in range(len(planes))]
    elif names is None:  # unnamed planes: taken in order, so their number must be the number asked
        if len(planes) != len(bands):
            fix = f"or ask for {len(planes)}" if asker == "--bands" else f"or give cutouts of {len(bands)} bands"
            raise Unusable("wrong-bands", f"{len(planes)} unnamed band(s), {asker} asks for {len(bands)} "
                                           f"({','.join(bands)}); name them (BAND0.. or FILTER) {fix}")
        order, names = list(range(len(planes))), list(bands)
    else:
        missing = [b for b in bands if b not in names]
        if missing:
            raise Unusable("wrong-bands", f"has bands {','.join(names)}; {asker} asks for {','.join(missing)} too")
        order = [names.index(b) for b in bands]
        names = list(bands)
    return np.stack([np.asarray(planes[k], dtype=np.float32) for k in order]), names


def fits_layout(path: str) -> tuple | None:
    """Header only: ((h, w), band names or None, number of bands) of a FITS cutout; None if unreadable."""
    fits = require_astropy("FITS cutouts")
    try:
        with fits.open(path, memmap=True) as hdul:
            hdus = [h for h in hdul if getattr(h, "is_image", False) and h.header.get("NAXIS", 0) >= 2]
            if len(hdus) == 1 and hdus[0].header["NAXIS"] == 3:
                hd = hdus[0].header
                n = hd["NAXIS3"]
                names = _cube_names(hd, n)
                return (hd["NAXIS2"], hd["NAXIS1"]), tuple(names) if names else None, n
            names = [_hdu_name(h.header) for h in hdus]
            hd = hdus[0].header
            return (hd["NAXIS2"], hd["NAXIS1"]), tuple(names) if all(names) else None, len(hdus)
    except Exception:  # rejected, with its reason, by the full check
        return None


def _layout_chunk(paths: list[str]) -> list[tuple | None]:
    """Header-only pass over FITS cutouts: fits_layout of each."""
    return [fits_layout(p) for p in paths]


def sample_bands(paths, look: int = 16) -> tuple[tuple[str, ...], str] | None:
    """The most common named band list among the first `look` readable files of `paths` (header only), and one
    file that has it: what a folder's files hold, checked before any row is read. None: no readable file names
    its bands (unnamed planes are matched by count, per file)."""
    seen, first, n = Counter(), {}, 0
    for p in paths:
        lay = fits_layout(str(p))
        if lay is None:
            continue
        n += 1
        if lay[1] is not None:
            seen[lay[1]] += 1
            first.setdefault(lay[1], str(p))
        if n >= look:
            break
    if not seen:
        return None
    names = seen.most_common(1)[0][0]
    return names, first[names]


def match_bands(asked: tuple[str, ...], names: tuple[str, ...], file: str, asker: str = "--bands") -> tuple[str, ...]:
    """The bands asked for, spelled as the files name them: a name the files have as it is; else the one name
    equal to it but for case (G for g); else a one-line ValueError naming the band and the bands the files have."""
    out = []
    for b in asked:
        if b in names:
            out.append(b)
            continue
        same = [n for n in names if n.lower() == b.lower()]
        if len(same) == 1:
            out.append(same[0])
            continue
        have = ",".join(names)
        if same:
            raise ValueError(f"{asker} {','.join(asked)}: band {b!r} matches {' and '.join(same)} in {file} but for "
                             f"case; name the one you mean exactly (the files have {have})")
        raise ValueError(f"{asker} {','.join(asked)}: the files have no band {b!r} ({file} has {have}); "
                         f"choose among {have}")
    return tuple(out)


def modal_layout(paths: list[str], pool, workers: int) -> tuple[tuple[int, int] | None, tuple | None, int]:
    """The most common (h, w) among FITS cutouts, and the most common band names (None when unnamed) with their count."""
    sizes, layouts = Counter(), Counter()
    for res in imap_ordered(_layout_chunk, chunks(paths, 256), pool, 4 * workers):
        for r in res:
            if r is not None:
                sizes[r[0]] += 1
                layouts[(r[1], r[2])] += 1
    if not sizes:
        return None, None, 0
    names, n = layouts.most_common(1)[0][0]
    return sizes.most_common(1)[0][0], names, n
