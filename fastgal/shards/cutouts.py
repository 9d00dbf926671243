"""One cutout checked as `fastgal shard` stores it: decoded in full, the survey's size, not blank, pre-cropped
where asked, and its pixel sums over the centre region (for the manifest's statistics). Runs in pool workers.
A cutout is a JPEG (`{id}.jpg`, 8-bit gri) or a FITS file of calibrated bands (`{id}.fits`, see read_fits).

    from fastgal.shards.cutouts import ImageRules, check_image
    c = check_image(0, "data/synth/images/1237....jpg", ImageRules(crop=144, precrop=None, expect=(224, 224),
                                                                     region=144, stored=(224, 224)))
    c.reason or c.data          # a shards.REASONS key, or the bytes to store

Greyscale and CMYK JPEGs are rejected (not-rgb), not converted: the gri colours carry most of the metallicity
signal, so a colourless cutout is not a cutout of the kind the model is trained on.

FITS cutouts (ImageRules.bands set): the bands asked for, in that order, as float32; stored as a raw
little-endian float16 (or float32) (bands, H, W) array. Mask policy: a NaN or infinite pixel inside the
centre region rejects the cutout (non-finite); outside it (a cutout at a survey's edge) it is set to 0, the
sky-subtracted dark sky the rotation fills with, and counted in the sample's json (`masked`).
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fastgal.recipe import centre_offset
from fastgal.shards.fits import Unusable, read_fits
from fastgal.util import chunks, imap_ordered

PRECROP_QUALITY = 95
BLANK_MAX = 10  # a frame whose brightest pixel is <= this (0-255) is all dark: nothing to learn from
FLAT_STD = 1.0  # ... and one whose every channel has std below this is a flat placeholder


@dataclass(frozen=True)
class ImageRules:
    """What every image is checked against and measured over."""

    crop: int  # the training crop region: a smaller image is rejected
    precrop: int | None  # store the centre precrop x precrop instead of the original bytes
    expect: tuple[int, int] | None  # the survey's (h, w); None: any size (with --precrop)
    region: int  # the centre region the pixel statistics are over
    stored: tuple[int, int] | None  # (h, w) of the images as stored in the tars
    bands: tuple[str, ...] | None = None  # FITS cutouts: the bands read, in order; None: JPEG cutouts
    dtype: str = "float16"  # FITS cutouts: how the fluxes are stored
    asker: str = "--bands"  # FITS cutouts: who asked for the bands, as a wrong-bands detail names it

    @property
    def ext(self) -> str:
        return ".jpg" if self.bands is None else ".fits"


class Checked(NamedTuple):
    """One catalog row's image: the bytes to store and its pixel sums, or why it is rejected."""

    pos: int  # the row's position in the catalog
    reason: str | None = None  # a shards.REASONS key, or None for a usable image
    detail: str = ""
    data: bytes | None = None
    sums: tuple[int, ...] | None = None  # per-channel sums, then sums of squares, over the centre region
    robust: tuple[float, ...] | None = None  # FITS: per band the region's median, its 1.4826 x MAD, the sky's sigma
    meta: dict | None = None  # FITS: what the sample's json records of the image (shape, dtype, bands, masked)


def _moments(im) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel sums and sums of squares of a loaded RGB image (exact ints, from its histogram)."""
    hist = np.asarray(im.histogram(), np.int64).reshape(3, 256)
    levels = np.arange(256, dtype=np.int64)
    return hist @ levels, hist @ (levels * levels)


def _blank(im) -> str | None:
    """Why a decoded frame is blank (all dark, or flat), or None."""
    vmax = max(hi for _, hi in im.getextrema())
    if vmax <= BLANK_MAX:
        return f"all dark (brightest pixel {vmax})"
    s, ss = _moments(im)
    mean = s / (im.size[0] * im.size[1])
    std = np.sqrt(np.maximum(ss / (im.size[0] * im.size[1]) - mean * mean, 0))
    return f"flat frame (channel std {std.max():.2f})" if np.all(std < FLAT_STD) else None


def _centre(im, px: int):
    """The centre px x px crop of a PIL image (recipe.centre_offset)."""
    w, h = im.size
    top, left = centre_offset(h, px), centre_offset(w, px)
    return im.crop((left, top, left + px, top + px))


def check_image(pos: int, path: str, geo: ImageRules) -> Checked:
    """Read and fully decode one image (check_jpeg below, or read_fits), then the survey's own checks: size, blank."""
    if geo.bands is not None:
        return check_fits(pos, path, geo)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return Checked(pos, "missing-image", f"{path} not found")
    except OSError as e:
        return Checked(pos, "missing-image", f"{path}: {e.strerror or e}")
    reason, detail, im = check_jpeg(data)
    if reason:
        return Checked(pos, reason, detail)
    w, h = im.size
    need = geo.precrop or geo.crop
    if min(h, w) < need:
        opt = "--precrop" if geo.precrop else "--crop"
        return Checked(pos, "too-small", f"{w}x{h} px, under the {need} px centre region ({opt} {need})")
    if geo.expect is not None and (h, w) != geo.expect:
        return Checked(pos, "wrong-size", f"{w}x{h} px; most images are {geo.expect[1]}x{geo.expect[0]}")
    blank = _blank(im)
    if blank:
        return Checked(pos, "blank-image", blank)
    if geo.precrop:  # JPEG q95 of the centre: deterministic for the same input
        buf = io.BytesIO()
        _centre(im, geo.precrop).save(buf, format="JPEG", quality=PRECROP_QUALITY)
        data = buf.getvalue()
        _, _, im = check_jpeg(data)  # the statistics are over the stored image, as the pipeline decodes it
    s, ss = _moments(_centre(im, geo.region))
    return Checked(pos, data=data, sums=tuple(int(x) for x in (*s, *ss)))


# --------------------------------------------------------------------------- FITS cutouts

FLOAT16_MAX = 65504.0
def _region_slice(side_h: int, side_w: int, px: int) -> tuple[slice, slice]:
    """The centre px x px region (recipe.centre_offset, as every centred crop in fastgal)."""
    t, l = centre_offset(side_h, px), centre_offset(side_w, px)
    return slice(t, t + px), slice(l, l + px)


def check_fits(pos: int, path: str, geo: ImageRules) -> Checked:
    """A FITS cutout: readable, the bands asked for, the survey's size, finite in the centre region, not blank
    (a band all zero or constant), storable in geo.dtype; the bytes to store and the region's statistics."""
    try:
        arr, names = read_fits(path, geo.bands, geo.asker)
    except Unusable as e:
        return Checked(pos, e.reason, e.detail)
    _, h, w = arr.shape
    need = geo.precrop or geo.crop
    if min(h, w) < need:
        opt = "--precrop" if geo.precrop else "--crop"
        return Checked(pos, "too-small", f"{w}x{h} px, under the {need} px centre region ({opt} {need})")
    if geo.expect is not None and (h, w) != tuple(geo.expect):
        return Checked(pos, "wrong-size", f"{w}x{h} px; most cutouts are {geo.expect[1]}x{geo.expect[0]}")
    if geo.precrop:
        arr = np.ascontiguousarray(arr[(slice(None), *_region_slice(h, w, geo.precrop))])
        h = w = geo.precrop
    bad = ~np.isfinite(arr)
    masked = 0
    if bad.any():
        ys, xs = _region_slice(h, w, geo.crop)
        inner = bad[:, ys, xs]
        if inner.any():
            k = int(inner.any(axis=(1, 2)).argmax())
            return Checked(pos, "non-finite", f"{int(inner.sum())} NaN/inf pixel(s) in the centre {geo.crop} px region "
                                              f"(band {names[k]}); pixels outside it are set to 0")
        masked = int(bad.sum())
        arr = np.where(bad, np.float32(0), arr)
    flat = [names[k] for k in range(len(arr)) if float(arr[k].max()) == float(arr[k].min())]
    if flat:
        return Checked(pos, "blank-image", f"band {flat[0]} is constant ({float(arr[names.index(flat[0])].flat[0]):g})")
    peak = float(np.abs(arr).max())
    if geo.dtype == "float16" and peak > FLOAT16_MAX:
        return Checked(pos, "out-of-range", f"|flux| up to {peak:.3g}, beyond float16's {FLOAT16_MAX:g}; "
                                            "shard with --dtype float32")
    stored = arr.astype("<f2" if geo.dtype == "float16" else "<f4")
    # the statistics are over the stored values, as the loaders read them
    ys, xs = _region_slice(h, w, geo.region)
    reg = stored[:, ys, xs].astype(np.float64).reshape(len(arr), -1)
    med = np.median(reg, axis=1)
    mad = 1.4826 * np.median(np.abs(reg - med[:, None]), axis=1)
    meta = {"shape": list(stored.shape), "dtype": geo.dtype, "bands": names, "masked": masked}
    return Checked(pos, data=stored.tobytes(), sums=(*reg.sum(1).tolist(), *(reg * reg).sum(1).tolist()),
                   robust=(*med.tolist(), *mad.tolist(), *sky_sigma(stored, geo.region).tolist()), meta=meta)


def sky_sigma(arr: np.ndarray, region: int) -> np.ndarray:
    """Per band, the sky noise: 1.4826 x MAD of the pixels outside the centre region (the frame around the
    galaxy; photobombers are outliers the MAD ignores), or of the outer eighth on each side where the cutout
    is no larger than the region."""
    c, h, w = arr.shape
    ys, xs = _region_slice(h, w, region)
    mask = np.ones((h, w), bool)
    if region < min(h, w):
        mask[ys, xs] = False
    else:
        e = max(min(h, w) // 8, 1)
        mask[e:h - e, e:w - e] = False
    sky = arr[:, mask].astype(np.float64)
    med = np.median(sky, axis=1)
    return 1.4826 * np.median(np.abs(sky - med[:, None]), axis=1)


def check_chunk(args) -> list[Checked]:
    """check_image over a chunk of (position, path) pairs: the unit of work a pool worker takes."""
    items, geo = args
    return [check_image(pos, path, geo) for pos, path in items]


def _size_chunk(paths: list[str]) -> list[tuple[int, int] | None]:
    """Header-only pass: (h, w) of each JPEG from its frame header, no decode; None if unreadable."""
    from PIL import Image

    out = []
    for path in paths:
        try:
            with Image.open(path) as im:
                out.append((im.size[1], im.size[0]) if im.format == "JPEG" else None)
        except Exception:  # unreadable files are rejected, with their reason, by the full check
            out.append(None)
    return out


def modal_size(paths: list[str], pool, workers: int) -> tuple[int, int] | None:
    """The most common (h, w) among the images (ties: the first in catalog order)."""
    sizes = Counter()
    for res in imap_ordered(_size_chunk, chunks(paths, 256), pool, 4 * workers):
        sizes.update(s for s in res if s is not None)
    return sizes.most_common(1)[0][0] if sizes else None

# --------------------------------------------------------------------------- the one JPEG check

def jpeg_problem(data: bytes, require_eoi: bool = False) -> tuple[str, str] | None:
    """The cheap test, no decode: (reason, detail) when `data` cannot be a JPEG, else None.
    require_eoi: also demand the end-of-image marker (a download cut short lacks it)."""
    if len(data) == 0:
        return "corrupt-image", "empty file"
    if not data.startswith(b"\xff\xd8\xff"):
        head = data[:16].decode("ascii", "replace").strip()
        return "not-jpeg", f"starts with {head!r}"
    if require_eoi and not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return "corrupt-image", f"truncated JPEG (no end-of-image marker; {len(data)} bytes)"
    return None


def check_jpeg(data: bytes, *, size: tuple[int, int] | None = None, require_eoi: bool = False):
    """The one JPEG check: (reason, detail, image). A full decode with PIL (load(), not verify(),
    which passes truncated files); the image must be an RGB JPEG, of `size` (h, w) when given.
    reason is None for a good image, which is returned loaded; else image is None. Reasons are
    the shard rejects' vocabulary: not-jpeg, corrupt-image, not-rgb, wrong-size."""
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG must fail, whatever a library set
    bad = jpeg_problem(data, require_eoi)
    if bad:
        return (*bad, None)
    try:
        im = Image.open(io.BytesIO(data))
        if im.format != "JPEG":
            return "not-jpeg", f"PIL reads it as {im.format}", None
        im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return "corrupt-image", f"{type(e).__name__}: {e}"[:200], None
    if im.mode != "RGB":
        return "not-rgb", f"mode {im.mode}", None
    w, h = im.size
    if size is not None and (h, w) != tuple(size):
        return "wrong-size", f"{w}x{h} px, expected {size[1]}x{size[0]}", None
    return None, "", im
