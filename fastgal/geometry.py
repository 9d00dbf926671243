"""What a model sees of a cutout: the crop geometry, the views (training draws, centre, the 8 dihedral TTA
views) and their torch implementation. The DALI graphs (pipeline.py) implement the same, from here.

    from fastgal.geometry import Geometry, TRAIN, CENTRE, dihedral, transform
    g = Geometry(size=112, crop=144, precropped=False, mean=[...], std=[...])
    x = transform(img_uint8_chw, g, view=3)          # TTA view 3: turned 270 degrees, not mirrored

A view is TRAIN (a sample's augmentation draws: rotate by 90*k + jitter with dark fill, random crop,
mirror; fastgal.order makes them), CENTRE (the centre crop: validation, prediction) or an int 0..7, a
dihedral TTA view: `dihedral(v)` = (quarter turns counter-clockwise, mirror). The eight views and their
order are defined here only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence, Union

import torch
import torchvision.transforms.v2.functional as F

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
    mean: Sequence[float]
    std: Sequence[float]


@lru_cache(maxsize=8)
def _norm(mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std as (3, 1, 1) tensors, made once per statistics, not once per image."""
    return (torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))


def norm_tensors(g: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm(tuple(map(float, g.mean)), tuple(map(float, g.std)))


def transform(img: torch.Tensor, g: Geometry, view: View, draw=None) -> torch.Tensor:
    """One view of a decoded image in torchvision v2 functional ops; CHW uint8 in, CHW float out.
    draw: for TRAIN, the sample's (angle, pos_x, pos_y, mirror) from fastgal.order, as DALI gets them."""
    if not g.precropped:
        img = F.center_crop(img, [g.crop, g.crop])
    if view == TRAIN:
        angle, pos_x, pos_y, mirror = draw
        img = F.rotate(img, angle, interpolation=F.InterpolationMode.BILINEAR, fill=0)
        h = img.shape[-1] - g.size
        img = F.crop(img, round(pos_y * h), round(pos_x * h), g.size, g.size)
        if mirror:
            img = F.horizontal_flip(img)
    else:
        img = F.center_crop(img, [g.size, g.size])
        if view != CENTRE:
            turns, mirror = dihedral(view)
            img = torch.rot90(img, k=turns, dims=(-2, -1))  # counter-clockwise, like DALI's rotate
            if mirror:
                img = F.horizontal_flip(img)
    mean, std = norm_tensors(g)
    return (img.float() - mean) / std
