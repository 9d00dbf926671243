"""fastgal.load.geometry: the views and their one torch implementation, transform_batch (the DALI graph is held to
it in test_loaders)."""

from __future__ import annotations

import pytest
import torch

from fastgal.load.geometry import (
    CENTRE,
    TRAIN,
    Geometry,
    check_view,
    dihedral,
    transform_batch,
)
from fastgal.recipe import centre_offset

G = Geometry(size=4, crop=6, precropped=False, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])


def _img():
    return torch.arange(3 * 8 * 8, dtype=torch.uint8).view(3, 8, 8)


def transform(img, g, view, draw=None):
    """One image through transform_batch, as a batch of one."""
    return transform_batch(img[None], g, view, None if draw is None else tuple([v] for v in draw))[0]


def test_the_eight_views_are_the_dihedral_group():
    assert [dihedral(v) for v in range(8)] == [(k % 4, k >= 4) for k in range(8)]
    centre = transform(_img(), G, CENTRE)
    assert torch.equal(centre, _img()[:, 2:6, 2:6].float())  # centre 6 of 8, then centre 4 of 6
    outs = {tuple(transform(_img(), G, v).flatten().tolist()) for v in range(8)}
    assert len(outs) == 8  # eight different views of an asymmetric image
    assert torch.equal(transform(_img(), G, 5), torch.rot90(centre, 1, (-2, -1)).flip(-1))
    for bad in (8, -1, "valid"):
        with pytest.raises(ValueError):
            check_view(bad)


def test_a_training_draw_without_rotation_is_a_crop_and_a_mirror():
    x = transform(_img(), G, TRAIN, (0.0, 0.0, 1.0, 1))  # no turn, crop at the left-bottom corner, mirrored
    want = _img()[:, 1:7, 1:7][:, 2:6, 0:4].flip(-1).float()
    assert torch.equal(x, want)
    turned = transform(_img(), G, TRAIN, (90.0, 0.5, 0.5, 0))
    assert torch.equal(turned, torch.rot90(transform(_img(), G, CENTRE), 1, (-2, -1)))


def test_normalisation_and_precropped_images():
    g = Geometry(size=4, crop=8, precropped=True, mean=[10.0, 20.0, 30.0], std=[2.0, 4.0, 8.0])
    x = transform(_img(), g, CENTRE)
    raw = _img()[:, 2:6, 2:6].float()
    assert torch.allclose(x, (raw - torch.tensor([10.0, 20.0, 30.0]).view(3, 1, 1)) / torch.tensor([2.0, 4.0, 8.0]).view(3, 1, 1))


# --- the batched form (transform_batch): one affine map per sample, one grid_sample per batch ---------------

def _marked(n: int, side: int, row: int, col: int) -> torch.Tensor:
    """A dark (n, 3, side, side) uint8 batch with one bright pixel at (row, col)."""
    x = torch.zeros(n, 3, side, side, dtype=torch.uint8)
    x[:, :, row, col] = 200
    return x


def _where(x: torch.Tensor) -> tuple[int, int]:
    """(row, col) of the brightest pixel of a (3, H, W) image (channel 0)."""
    i = int(x[0].flatten().argmax())
    return divmod(i, x.shape[-1])


def _forward(g: Geometry, row: int, col: int, angle: float, pos_x: float, pos_y: float, mirror: int, side: int):
    """Where the graph's stages send pixel (row, col) of a side x side image, written stage by stage:
    centre crop -> rotate counter-clockwise about the region's centre -> crop at round(pos * margin) -> mirror."""
    import math

    off = round((side - g.crop) / 2)
    x, y = col + 0.5 - off - g.crop / 2, row + 0.5 - off - g.crop / 2  # pixel centre, from the region's centre
    a = math.radians(angle)
    xr, yr = x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)  # CCW on screen (y down)
    m = g.crop - g.size
    c, r = xr + g.crop / 2 - round(pos_x * m) - 0.5, yr + g.crop / 2 - round(pos_y * m) - 0.5
    if mirror:
        c = g.size - 1 - c
    return r, c


@pytest.mark.parametrize("angle,pos_x,pos_y,mirror", [
    (0.0, 0.5, 0.5, 0), (90.0, 0.0, 1.0, 0), (180.0, 1.0, 0.25, 1), (270.0, 0.3, 0.7, 1), (30.0, 0.5, 0.5, 0),
    (-7.5, 0.9, 0.1, 1), (97.0, 0.2, 0.6, 1)])
def test_a_marked_pixel_lands_where_the_stages_send_it(angle, pos_x, pos_y, mirror):
    from fastgal.load.geometry import transform_batch

    g = Geometry(size=24, crop=36, precropped=False, mean=[0.0] * 3, std=[1.0] * 3)
    side, row, col = 48, 20, 27  # off-centre, so a wrong turn, shift or mirror moves it
    x = transform_batch(_marked(2, side, row, col), g, TRAIN, ([angle] * 2, [pos_x] * 2, [pos_y] * 2, [mirror] * 2))
    r, c = _forward(g, row, col, angle, pos_x, pos_y, mirror, side)
    got = _where(x[0])
    assert abs(got[0] - r) <= 0.5 and abs(got[1] - c) <= 0.5, (got, (r, c))
    if angle % 90 == 0:  # quarter turns are exact: the pixel keeps its value, nothing else lights up
        assert float(x[0, 0].max()) == 200 and int((x[0, 0] > 0).sum()) == 1
    assert torch.equal(x[0], x[1])  # the same draw, the same output


def test_the_centre_rule_is_fastais_and_every_view_follows_dalis_stage_order():
    """recipe.centre_offset is fastai's CropPad centre, (side - crop) // 2, also where side - crop is odd; each view
    is the region turned, its centre cropped, then mirrored (DALI's order), written here stage by stage in numpy."""
    import numpy as np

    assert [centre_offset(s, 8) for s in (8, 9, 10, 11, 13)] == [0, 0, 1, 1, 2]
    g = Geometry(size=5, crop=8, precropped=False, mean=[0.0] * 3, std=[1.0] * 3)  # 11 -> 8: odd; 8 -> 5: odd
    img = torch.arange(3 * 11 * 11, dtype=torch.uint8).view(3, 11, 11)
    region = img.numpy()[:, 1:9, 1:9]  # (11 - 8) // 2 = 1
    for v in [CENTRE, *range(8)]:
        turns, mirror = (0, False) if v == CENTRE else dihedral(v)
        want = np.rot90(region, turns, axes=(1, 2))[:, 1:6, 1:6]  # (8 - 5) // 2 = 1, in the turned region
        want = want[:, :, ::-1] if mirror else want
        assert np.array_equal(transform(img, g, v).numpy(), want.astype(np.float32)), v
