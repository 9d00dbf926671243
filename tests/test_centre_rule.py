"""One centre rule (recipe.centre_offset: fastai's CropPad, (side - crop) // 2) on every path, tested where it
matters: an odd side - crop (75 px cutouts, region 72: offset 1, where DALI's own centre and Python's round
would say 2) and an odd crop - size (72 -> 55: offset 8, not 9). Shard's --precrop and its statistics, the FITS
region, the torch and DALI loaders and predict on a folder all place the crops alike.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from fastgal.load.geometry import CENTRE
from fastgal.load.loader import Loader
from fastgal.load.preprocess import geometry_for
from fastgal.shards.read import Shards

SIDE, CROP, SIZE = 75, 72, 55
R0 = (SIDE - CROP) // 2  # 1
C0 = R0 + (CROP - SIZE) // 2  # 1 + 8


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    run_cli("synth", root / "s", "--n", 40, "--seed", 5, "--size", SIDE, "--quiet")
    run_cli("shard", root / "s/data/master.csv", root / "s/images", root / "sh", "--crop", CROP, "--valid-pct", 0.5,
            "--quiet")
    run_cli("shard", root / "s/data/master.csv", root / "s/images", root / "pre", "--crop", CROP, "--precrop", CROP,
            "--valid-pct", 0.5, "--quiet")
    return root


def _raw(folder, backend):
    sh = Shards(folder)
    geo = geometry_for(sh, size=SIZE, crop=CROP, mean=[0.0] * 3, std=[1.0] * 3)
    dl = Loader(sh.split("valid"), CENTRE, geo, bs=8, backend=backend)
    return torch.cat([x for x, _ in dl]), sh.split("valid")


def _pil(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=pytest.mark.dali)])
def test_the_loaders_centre_an_odd_region_and_an_odd_crop_by_the_rule(odd, backend):
    x, split = _raw(odd / "sh", backend)
    want = np.stack([_pil(split.jpeg(i).tobytes())[C0:C0 + SIZE, C0:C0 + SIZE] for i in range(len(split))])
    assert torch.equal(x, torch.from_numpy(want).permute(0, 3, 1, 2).float())


def test_precrop_and_the_statistics_take_the_same_region(odd):
    split = Shards(odd / "pre").split("valid")
    key = split.keys[0]
    im = Image.open(odd / "s/images" / f"{key}.jpg").convert("RGB")
    buf = io.BytesIO()
    im.crop((R0, R0, R0 + CROP, R0 + CROP)).save(buf, format="JPEG", quality=95)
    assert split.jpeg(0).tobytes() == buf.getvalue()  # the stored region is the one at offset 1, re-encoded
    x, _ = _raw(odd / "pre", "torch")  # and the loaders crop it as they crop the full cutout's region
    full, _ = _raw(odd / "sh", "torch")
    assert (x - full).abs().mean() < 2.0  # the same pixels up to the q95 re-encoding (one pixel off: ~10 levels)
    m = json.loads((odd / "sh/manifest.json").read_text())
    ims = [np.asarray(Image.open(odd / "s/images" / f"{k}.jpg").convert("RGB"), np.float64)[R0:R0 + CROP, R0:R0 + CROP]
           for k in Shards(odd / "sh").split("train").keys]  # the statistics are the training split's
    assert np.allclose(m["pixel_stats"]["mean"], np.mean(ims, axis=(0, 1, 2)), atol=1e-6)


def test_the_fits_region_and_its_loader_take_the_rule(tmp_path):
    pytest.importorskip("astropy")
    from astropy.io import fits

    run_cli("synth", tmp_path / "f", "--n", 24, "--seed", 5, "--size", SIDE, "--format", "fits", "--bands", "gri",
            "--quiet")
    run_cli("shard", tmp_path / "f/data/master.csv", tmp_path / "f/images", tmp_path / "sh", "--crop", CROP,
            "--valid-pct", 0.5, "--dtype", "float32", "--quiet")
    sh = Shards(tmp_path / "sh")
    split = sh.split("valid")
    cubes = np.stack([fits.getdata(tmp_path / "f/images" / f"{k}.fits").astype(np.float32) for k in split.keys])
    geo = geometry_for(sh, size=SIZE, crop=CROP, mean=[0.0] * 3, std=[1.0] * 3, stretch="none")
    x = torch.cat([x for x, _ in Loader(split, CENTRE, geo, bs=8, backend="torch")])
    assert torch.equal(x, torch.from_numpy(cubes[:, :, C0:C0 + SIZE, C0:C0 + SIZE]))
    train = np.stack([fits.getdata(tmp_path / "f/images" / f"{k}.fits") for k in sh.split("train").keys])
    region = train[:, :, R0:R0 + CROP, R0:R0 + CROP].astype(np.float32).astype(np.float64)  # the training split's
    assert np.allclose(sh.pixel_mean, region.mean(axis=(0, 2, 3)), rtol=1e-5)


def test_predict_on_a_folder_crops_as_the_shards_do(odd, tmp_path):
    run_cli("train", odd / "sh", "--out", tmp_path / "r", "--epochs", 1, "--bs", 8, "--arch", "xresnet18", "--size",
            SIZE, "--quiet")
    run_cli("predict", tmp_path / "r", odd / "sh", "--split", "valid", "--out", tmp_path / "a.csv")
    run_cli("predict", tmp_path / "r", odd / "s/images", "--out", tmp_path / "b.csv")
    import pandas as pd

    a = pd.read_csv(tmp_path / "a.csv", dtype={"id": str}).set_index("id")
    b = pd.read_csv(tmp_path / "b.csv", dtype={"id": str}).set_index("id").loc[a.index]
    assert np.allclose(a["pred_metallicity"], b["pred_metallicity"], atol=2e-5)
