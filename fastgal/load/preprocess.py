"""What a shard folder's images go through before the model, decided once per run: the crop region (checked
against the shards), the stretch of FITS bands, and the normalisation's statistics.

    from fastgal.load.preprocess import geometry_for
    geo = geometry_for(Shards("shards/fits"), size=56)            # region 72, asinh at the sky noise, stretched stats
    geo = geometry_for(shards, size=56, mean=m, std=s)             # a trained model's own statistics (predict)

JPEG shards are normalised with the manifest's pixel statistics (their stretch was SkyServer's). Float shards get
asinh(flux / softening) per band first (`--stretch auto|asinh|none`, `--softening`), and since the manifest holds
the raw fluxes' statistics, the stretched values' are measured here on STRETCH_SAMPLE training cutouts. The
Loader backends (loader.py) and the DALI graph (dali.py) apply the resulting Geometry; nothing here touches
a batch.
"""

from __future__ import annotations

import numpy as np

from fastgal.load.geometry import Geometry
from fastgal.recipe import centre_offset, input_size
from fastgal.shards.read import Shards, Split

STRETCHES = ("auto", "asinh", "none")
STRETCH_SAMPLE = 512  # training cutouts the stretched statistics are measured on


def resolve_stretch(shards: Shards, stretch: str = "auto", softening=None) -> list[float] | None:
    """The asinh softening per band (None: no stretch) for float shards: auto = what the manifest declares;
    asinh = with `softening` or the manifest's; none = the fluxes as they are."""
    if stretch not in STRETCHES:
        raise ValueError(f"--stretch must be one of {', '.join(STRETCHES)}, got {stretch!r}")
    if shards.kind != "float":
        if stretch == "asinh" or softening:
            raise ValueError(f"--stretch and --softening apply to shards of FITS bands; {shards.folder} holds JPEGs "
                             "(their stretch was applied by SkyServer)")
        return None
    if stretch == "none":
        return None
    declared = (shards.stretch or {}).get("softening")
    soft = list(map(float, softening)) if softening else declared
    if soft is None or len(soft) != shards.channels or not all(v > 0 for v in soft):
        raise ValueError(f"--softening needs one positive value per band ({','.join(shards.bands)}), got {soft}; "
                         "or leave it out to use the manifest's (each band's sky noise)")
    return soft


def stretched_stats(split: Split, crop: int, precropped: bool, softening) -> tuple[list[float], list[float]]:
    """Per-band mean and std of asinh(flux / softening) over the centre crop region of up to STRETCH_SAMPLE
    training cutouts spread evenly over the split: the normalisation after the stretch (the manifest has the
    raw fluxes' statistics; a stretch chosen at training time needs its own, measured once here)."""
    n = len(split)
    pos = np.unique(np.linspace(0, n - 1, min(n, STRETCH_SAMPLE)).round().astype(int))
    inv = 1.0 / np.asarray(softening, np.float64)[:, None, None]
    s = ss = 0.0
    for i in pos:
        a = split.image(int(i)).astype(np.float64)
        if not precropped:
            t, l = centre_offset(a.shape[1], crop), centre_offset(a.shape[2], crop)
            a = a[:, t:t + crop, l:l + crop]
        v = np.arcsinh(a * inv)
        s, ss = s + v.sum((1, 2)), ss + (v * v).sum((1, 2))
    npix = len(pos) * crop * crop
    mean = s / npix
    return mean.tolist(), np.sqrt(np.maximum(ss / npix - mean * mean, 0)).tolist()


def geometry_for(shards: Shards, *, size: int, crop: int | None = None, mean=None, std=None, stretch: str = "auto",
                 softening=None) -> Geometry:
    """The geometry of a shard folder's images: crops drawn from the region the shards were made for
    (checked against `crop`), normalised with their pixel statistics unless mean/std say otherwise (a
    trained model passes its own, so new data is normalised like its training data). Float shards: the
    stretch (resolve_stretch) before the normalisation, whose statistics are then the stretched values'."""
    region = shards.precrop or shards.crop(crop)
    side = min(shards.image_size)
    if size > region or region > side:
        fix = (f"pass a --crop of {side} or less" if region > side else
               f"pass --size {input_size(region)} (7/9 of the region, the default) or another size up to {region}")
        raise ValueError(f"crop sizes do not fit: image {side}px, region {region}px, model input {size}px; {fix}")
    soft = resolve_stretch(shards, stretch, softening)
    if mean is None:
        if soft is None:
            mean, std = shards.pixel_mean, shards.pixel_std
        else:
            mean, std = stretched_stats(shards.split("train"), region, bool(shards.precrop), soft)
    return Geometry(size=size, crop=region, precropped=bool(shards.precrop), mean=list(mean), std=list(std),
                    softening=soft)
