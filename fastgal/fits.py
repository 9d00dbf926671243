"""FITS cutouts: one primary HDU holding a (bands, H, W) float32 cube in nanomaggies per pixel.

    write_cube("OUT/images/123.fits", cube, "ugriz", pixscale=0.25, objid=123)

Header: BANDS = 'ugriz' (the planes' bands, in order), BAND0..BANDn-1 = 'u', 'g', ... (the Legacy Survey
cutout service's convention), BUNIT = 'nanomaggy' (AB mag = 22.5 - 2.5 log10 flux), PIXSCALE (arcsec/px),
NMGYPIX (arcsec: the values are nanomaggies per NMGYPIX x NMGYPIX area, so the flux in one pixel is
value x (PIXSCALE / NMGYPIX)^2; synth writes 0.396, SDSS frame units resampled keeping surface brightness,
as SkyServer's cutouts of any scale are), OBJID (a string: a 19-digit id is not exact as a FITS float).
No DATE or CHECKSUM card, so the same cube gives the same bytes. astropy is an optional extra
(`pip install 'fastgal[fits]'`), imported only here, only when a FITS file is touched.
"""

from __future__ import annotations

import numpy as np

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
