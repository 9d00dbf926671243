"""fastgal.geometry: the views and their torch implementation (the DALI graph is held to it in test_loaders)."""

from __future__ import annotations

import pytest
import torch

from fastgal.geometry import CENTRE, TRAIN, Geometry, check_view, dihedral, transform

# nothing here depends on whether DALI is installed: the no-DALI pass of `make test` leaves it out
pytestmark = pytest.mark.dali_agnostic

G = Geometry(size=4, crop=6, precropped=False, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])


def _img():
    return torch.arange(3 * 8 * 8, dtype=torch.uint8).view(3, 8, 8)


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
