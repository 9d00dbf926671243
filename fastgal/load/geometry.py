"""What a model sees of a cutout: the crop geometry, the views (training draws, centre, the 8 dihedral TTA
views) and their one torch implementation. The DALI graph (dali.py) implements the same, from here.

    from fastgal.load.geometry import Geometry, TRAIN, CENTRE, dihedral, transform_batch
    g = Geometry(size=112, crop=144, precropped=False, mean=[...], std=[...])
    x = transform_batch(imgs_uint8_nchw, g, 3)        # TTA view 3: turned 270 degrees, not mirrored
    x = transform_batch(imgs_uint8_nchw, g, TRAIN, (angle, pos_x, pos_y, mirror))   # float NCHW, normalised

A view is TRAIN (a sample's augmentation draws: rotate by 90*k + jitter with dark fill, random crop,
mirror; fastgal.load.order makes them), CENTRE (the centre crop: validation, prediction) or an int 0..7, a
dihedral TTA view: `dihedral(v)` = (quarter turns counter-clockwise, mirror). The eight views and their
order are defined here only.

Every view is the DALI graph's order of stages: the centre `crop` region (recipe.centre_offset, the one
rule for centred crops), turned (TRAIN: by its angle; a TTA view: by quarter turns), the `size` crop (TRAIN:
at the drawn position; otherwise centred), then mirrored. `transform_batch` does it for a whole batch on
the batch's device: a TRAIN view as one 2x3 affine map per sample, applied with one affine_grid +
grid_sample; the other views by integer slicing, rot90 and flip, which are exact. The torch loader, predict
on a folder of cutouts and the benchmarks all call it; a single image is a batch of one.

Images are 8-bit RGB (JPEG shards) or float fluxes in any number of bands (FITS shards): the same crops,
rotation (bilinear, zero fill: dark sky in either) and mirror; uint8 results are rounded to whole grey
levels as DALI's uint8 rotate rounds them, floats are not. Then, for floats, the stretch (`Geometry.softening`:
asinh(flux / softening) per band, or none), and the per-channel normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as NF

from fastgal.recipe import centre_offset

TRAIN, CENTRE = "train", "centre"
View = Union[str, int]  # TRAIN | CENTRE | 0..7
TTA_VIEWS = tuple(range(8))


def dihedral(view: int) -> tuple[int, bool]:
    """TTA view 0..7 -> (quarter turns counter-clockwise, horizontal mirror after the turn)."""
    if not (isinstance(view, int) and 0 <= view < 8):
        raise ValueError(f"a TTA view is 0..7, got {view!r}")
    return view % 4, view >= 4


def check_view(view: View) -> View:
    if view in (TRAIN, CENTRE):
        return view
    dihedral(view)
    return view


@dataclass(frozen=True)
class Geometry:
    """The crops and the normalisation: centre `crop` (CropPad; skipped where the shards are pre-cropped
    to it), then a `size` crop (random for training, central otherwise), then (x - mean) / std per channel
    in 0-255 units."""

    size: int  # the crop the model sees
    crop: int  # the centre region crops are drawn from
    precropped: bool  # the stored images are that region already (`fastgal shard --precrop`)
    mean: Sequence[float]  # per channel, of what is normalised (the stretched values where there is a stretch)
    std: Sequence[float]
    softening: Sequence[float] | None = None  # float bands: asinh(x / softening) per band before normalising

    @property
    def channels(self) -> int:
        return len(self.mean)


@lru_cache(maxsize=8)
def _norm(mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std as (C, 1, 1) tensors, made once per statistics, not once per image."""
    return (torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))


def norm_tensors(g: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm(tuple(map(float, g.mean)), tuple(map(float, g.std)))


@lru_cache(maxsize=8)
def _inv(soft: tuple) -> torch.Tensor:
    return 1.0 / torch.tensor(soft, dtype=torch.float32).view(-1, 1, 1)


def stretch_tensor(g: Geometry) -> torch.Tensor | None:
    """1 / softening as a (C, 1, 1) tensor, or None where there is no stretch."""
    return None if g.softening is None else _inv(tuple(map(float, g.softening)))


def finish(x: torch.Tensor, g: Geometry, mean: torch.Tensor, std: torch.Tensor, inv: torch.Tensor | None) -> torch.Tensor:
    """The stretch (floats with a softening) and the normalisation of a float tensor, in place."""
    if inv is not None:
        x = x.mul_(inv).asinh_()
    return x.sub_(mean).div_(std)


def region(imgs: torch.Tensor, g: Geometry) -> torch.Tensor:
    """The centre `crop` region of a (N, C, H, W) batch (a view, no copy), or the batch if pre-cropped."""
    if g.precropped:
        return imgs
    t, l = centre_offset(imgs.shape[-2], g.crop), centre_offset(imgs.shape[-1], g.crop)
    return imgs[..., t:t + g.crop, l:l + g.crop]


def train_affine(g: Geometry, angle, pos_x, pos_y, mirror) -> torch.Tensor:
    """(N, 2, 3) float64 affine_grid matrices of the TRAIN view (align_corners=False): each maps the model's
    size x size output, in [-1, 1] coordinates, to where it samples the crop x crop region.

    Composed from the graph's stages, read backwards from an output pixel (pixel units, origin at the
    region's centre): mirror (x -> -x), then the crop at (ox, oy) = round(pos * (crop - size)) shifts by
    (ox, oy) + (size - crop) / 2, then the rotation by `angle` degrees counter-clockwise (on screen, y down)
    is undone: source = [[cos, -sin], [sin, cos]] @ p. Divided by crop / 2 to land in [-1, 1].
    """
    def col(v, dtype=torch.float64):
        return torch.as_tensor(np.asarray(v), dtype=dtype)

    s, c = g.size, g.crop
    a = torch.deg2rad(col(angle))
    cos, sin = torch.cos(a), torch.sin(a)
    m = 1.0 - 2.0 * col(mirror)  # -1 where mirrored
    tx = torch.round(col(pos_x, torch.float32).double() * (c - s)) + (s - c) / 2  # the crop at round(pos * (c - s))
    ty = torch.round(col(pos_y, torch.float32).double() * (c - s)) + (s - c) / 2
    h = s / 2
    theta = torch.stack([torch.stack([cos * m * h, -sin * h, cos * tx - sin * ty], -1),
                         torch.stack([sin * m * h, cos * h, sin * tx + cos * ty], -1)], -2)
    return theta / (c / 2)


def transform_batch(imgs: torch.Tensor, g: Geometry, view: View, draws=None, *, mean=None, std=None, inv=None) -> torch.Tensor:
    """One view of a (N, C, H, W) uint8 (or float) batch, on the batch's device; float (N, C, size, size) out,
    stretched (float bands with a softening) and normalised.

    TRAIN: draws = (angle, pos_x, pos_y, mirror), one per sample (fastgal.load.order's, as DALI gets them); one
    bilinear grid_sample over the centre region with zero fill (dark sky) outside it, rounded to whole grey
    levels as DALI's uint8 rotate rounds them (floats are not rounded). Other views are
    exact (no resample). mean/std/inv: (C, 1, 1) tensors on the batch's device, to skip the copy per batch
    (norm_tensors(g) and stretch_tensor(g) otherwise).
    """
    if mean is None:
        mean, std = (t.to(imgs.device) for t in norm_tensors(g))
        inv = None if g.softening is None else stretch_tensor(g).to(imgs.device)
    src = region(imgs, g)
    if view == TRAIN:
        theta = train_affine(g, *draws).to(device=imgs.device, dtype=torch.float32)
        n = len(src)
        grid = NF.affine_grid(theta, [n, src.shape[1], g.size, g.size], align_corners=False)
        x = NF.grid_sample(src.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if imgs.dtype == torch.uint8:
            x = x.round_()
    else:  # DALI's order: turn the region, crop its centre, mirror the crop (all exact: views, no resample)
        turns, mirror = (0, False) if view == CENTRE else dihedral(view)
        x = torch.rot90(src, k=turns, dims=(-2, -1)) if turns else src  # counter-clockwise, like DALI's rotate
        t, l = centre_offset(x.shape[-2], g.size), centre_offset(x.shape[-1], g.size)
        x = x[..., t:t + g.size, l:l + g.size]
        if mirror:
            x = x.flip(-1)
        x = x.float() if x.dtype != torch.float32 else x.clone()
    return finish(x, g, mean, std, inv)
