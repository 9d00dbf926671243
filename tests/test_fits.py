"""FITS cutouts end to end: the reader and its reject reasons, float shards, the loaders' geometry on float bands
(the same draws as for JPEGs), the stretch, an N-band model, and predict on a folder of FITS files."""

from __future__ import annotations

import csv
import json
import shutil
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli
from PIL import Image

from fastgal.load.geometry import CENTRE, TRAIN
from fastgal.load.loader import Loader, dataloaders
from fastgal.load.preprocess import geometry_for
from fastgal.shards.read import Shards
from fastgal.shards.write import FITS_ONLY, JPEG_ONLY, REASONS

fits = pytest.importorskip("astropy.io.fits")


def _cube(rng, side=64, bands="ugriz", amp=1.0, noise=0.01):
    """A galaxy-like blob over sky noise, (bands, side, side) float32 nanomaggies."""
    yy, xx = np.mgrid[0:side, 0:side]
    blob = np.exp(-((yy - side / 2) ** 2 + (xx - side / 2) ** 2) / (2 * (side / 10) ** 2))
    colours = np.linspace(1.0, 3.0, len(bands))
    return (amp * colours[:, None, None] * blob + rng.normal(0, noise, (len(bands), side, side))).astype(np.float32)


def _write(path, cube, bands="ugriz", named=True):
    hdu = fits.PrimaryHDU(cube)
    if named:
        for k, b in enumerate(bands):
            hdu.header[f"BAND{k}"] = b
    hdu.writeto(path)


def _catalog(path, ids, y=None):
    rng = np.random.default_rng(1)
    y = rng.normal(8.9, 0.2, len(ids)) if y is None else y
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["objID", "metallicity"])
        w.writerows([[i, f"{v:.4f}"] for i, v in zip(ids, y)])


def _rejects(out):
    with open(out / "rejects.csv", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def _tar_members(folder):
    out = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                out[m.name] = tf.extractfile(m).read()
    return out


# --------------------------------------------------------------------------- reading and rejecting

def test_each_fits_reject_reason_and_the_mask_policy(tmp_path):
    rng = np.random.default_rng(0)
    imgs = tmp_path / "images"
    imgs.mkdir()
    ids = [str(1237645945580748800 + i) for i in range(24)]
    good = ids[:10]
    for i in good:
        _write(imgs / f"{i}.fits", _cube(rng))
    # one HDU per band, named by FILTER, in another order: read by name
    hdul = fits.HDUList([fits.PrimaryHDU()] + [fits.ImageHDU(p, header=fits.Header([("FILTER", b)]))
                                               for b, p in zip("zirgu", _cube(rng)[::-1])])
    hdul.writeto(imgs / f"{ids[10]}.fits")
    masked = _cube(rng)
    masked[:, 0, 0] = np.nan  # outside the centre 48 px region: set to 0 and counted
    _write(imgs / f"{ids[11]}.fits", masked)
    expect = {}
    expect[ids[12]] = "missing-image"
    (imgs / f"{ids[13]}.fits").write_text("<html>Service Unavailable</html>" * 100)
    expect[ids[13]] = "not-fits"
    _write(imgs / f"{ids[14]}.fits", _cube(rng))
    data = (imgs / f"{ids[14]}.fits").read_bytes()
    (imgs / f"{ids[14]}.fits").write_bytes(data[:len(data) // 2])  # a download cut short
    expect[ids[14]] = "corrupt-image"
    _write(imgs / f"{ids[15]}.fits", _cube(rng, bands="ugr"), bands="ugr")
    expect[ids[15]] = "wrong-bands"
    bad = _cube(rng)
    bad[3, 32, 32] = np.inf  # band i
    _write(imgs / f"{ids[16]}.fits", bad)
    expect[ids[16]] = "non-finite"
    flat = _cube(rng)
    flat[3] = 0.0
    _write(imgs / f"{ids[17]}.fits", flat)
    expect[ids[17]] = "blank-image"
    _write(imgs / f"{ids[18]}.fits", _cube(rng, amp=1e6))
    expect[ids[18]] = "out-of-range"
    _write(imgs / f"{ids[19]}.fits", _cube(rng, side=40))
    expect[ids[19]] = "too-small"
    _write(imgs / f"{ids[20]}.fits", _cube(rng, side=80))
    expect[ids[20]] = "wrong-size"
    _write(imgs / f"{ids[21]}.fits", _cube(rng, bands="gri"), named=False)  # unnamed: 3 planes for 3 bands asked
    _write(imgs / f"{ids[22]}.fits", _cube(rng, bands="gr"), named=False)
    expect[ids[22]] = "wrong-bands"
    Image.new("RGB", (64, 64), (30, 60, 90)).save(imgs / f"{ids[23]}.jpg")  # not the .fits the row needs
    expect[ids[23]] = "missing-image"
    _catalog(tmp_path / "cat.csv", ids)

    out = tmp_path / "sh"
    res = run_cli("shard", tmp_path / "cat.csv", imgs, out, "--crop", 48, "--bands", "g,r,i", "--valid-pct", 0.25,
                  "--json", "--workers", 2)
    m = json.loads((out / "manifest.json").read_text())
    rej = _rejects(out)
    assert {i: r["reason"] for i, r in rej.items()} == expect
    # every reason a FITS cutout can have but the catalog-row ones, and none that only a JPEG can have
    assert {r["reason"] for r in rej.values()} == set(REASONS) - JPEG_ONLY - {
        "bad-id", "duplicate-id", "missing-target", "non-numeric-target", "non-finite-target"}
    assert FITS_ONLY <= {r["reason"] for r in rej.values()}
    assert "--dtype float32" in rej[ids[18]]["detail"] and "--crop 48" in rej[ids[19]]["detail"]
    assert "asks for i" in rej[ids[15]]["detail"] and "band i" in rej[ids[16]]["detail"]
    c = m["counts"]
    assert c["train"] + c["valid"] + c["rejected"] == c["catalog_rows"] == len(ids) and json.loads(res.output)

    assert m["format_version"] == 2 and m["components"]["image"] == "flux.f16"
    want = {"kind": "float", "bands": ["g", "r", "i"], "dtype": "float16", "size": [64, 64], "channels": 3}
    assert {k: m["image"][k] for k in want} == want
    sky = m["pixel_stats"]["sky_sigma"]
    assert np.allclose(sky, 0.01, rtol=0.1)  # the noise the cutouts were made with, not the galaxy's spread
    assert m["stretch"]["name"] == "asinh" and m["stretch"]["softening"] == sky

    members = _tar_members(out)
    # the bands asked for, in that order, as little-endian float16 (bands, H, W); the FILTER-named file by name
    for i in (good[0], ids[10], ids[21]):
        arr = np.frombuffer(members[f"{i}.flux.f16"], "<f2").reshape(3, 64, 64)
        with fits.open(imgs / f"{i}.fits") as h:
            if i == ids[10]:
                want = np.stack([next(x.data for x in h[1:] if x.header["FILTER"] == b) for b in "gri"])
            elif i == ids[21]:
                want = h[0].data
            else:
                want = h[0].data[1:4]
        assert np.array_equal(arr, want.astype("<f2")), i
        meta = json.loads(members[f"{i}.json"])["__image__"]
        assert meta == {"shape": [3, 64, 64], "dtype": "float16", "bands": ["g", "r", "i"], "masked": 0}
    assert json.loads(members[f"{ids[11]}.json"])["__image__"]["masked"] == 3
    assert np.frombuffer(members[f"{ids[11]}.flux.f16"], "<f2")[0] == 0  # the NaN corner is dark sky now
    info = run_cli("info", out)
    assert "verified" in info.output and "FITS bands g,r,i as float16" in info.output


def test_float32_storage_and_user_errors(tmp_path):
    rng = np.random.default_rng(3)
    imgs = tmp_path / "images"
    imgs.mkdir()
    ids = [str(1237645945580748800 + i) for i in range(8)]
    cubes = [_cube(rng, amp=1e6 if k == 0 else 1.0) for k in range(8)]
    for i, c in zip(ids, cubes):
        _write(imgs / f"{i}.fits", c)
    _catalog(tmp_path / "cat.csv", ids)
    out = tmp_path / "sh"
    run_cli("shard", tmp_path / "cat.csv", imgs, out, "--crop", 48, "--dtype", "float32", "--valid-pct", 0.25, "--quiet")
    m = json.loads((out / "manifest.json").read_text())
    assert m["image"]["bands"] == list("ugriz") and m["components"]["image"] == "flux.f32" and m["counts"]["rejected"] == 0
    arr = np.frombuffer(_tar_members(out)[f"{ids[0]}.flux.f32"], "<f4").reshape(5, 64, 64)
    assert np.array_equal(arr, cubes[0])  # exact, and the bright one fits
    for args, words in ((["--bands", "g,g"], "repeats a band"), (["--bands", "g,,r"], "band names in order")):
        res = run_cli("shard", tmp_path / "cat.csv", imgs, tmp_path / "x", *args, ok=False)
        assert res.exit_code != 0 and words in res.output and len(res.output.strip().splitlines()) == 1
    # a band no file has: refused before any row is read, naming it and the files' bands (issue 33; it used to
    # reject every row `wrong-bands`)
    res = run_cli("shard", tmp_path / "cat.csv", imgs, tmp_path / "y", "--bands", "g,r,W1", "--crop", 48, ok=False)
    assert res.exit_code != 0 and "the files have no band 'W1'" in res.output and "choose among u,g,r,i,z" in res.output


def test_bands_on_a_jpeg_folder_says_what_the_folder_holds(tmp_path):
    ids = [str(1237645945580748800 + i) for i in range(6)]
    (tmp_path / "images").mkdir()
    for i in ids:
        Image.new("RGB", (64, 64), (30, 60, 90)).save(tmp_path / "images" / f"{i}.jpg")
    _catalog(tmp_path / "cat.csv", ids)
    res = run_cli("shard", tmp_path / "cat.csv", tmp_path / "images", tmp_path / "sh", "--bands", "g,r,i", "--crop", 48,
                  ok=False)
    assert res.exit_code != 0 and "missing-image 6" in res.output and "drop --bands to shard them as JPEGs" in res.output


def test_without_astropy_the_error_says_how_to_get_it(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_astropy(name, *a, **k):
        if name.startswith("astropy"):
            raise ImportError("No module named 'astropy'")
        return real(name, *a, **k)

    imgs = tmp_path / "images"
    imgs.mkdir()
    _write(imgs / "1237645945580748800.fits", _cube(np.random.default_rng(0)))
    _catalog(tmp_path / "cat.csv", ["1237645945580748800"])
    monkeypatch.setattr(builtins, "__import__", no_astropy)
    res = run_cli("shard", tmp_path / "cat.csv", imgs, tmp_path / "sh", "--crop", 48, "--workers", 1, ok=False)
    assert res.exit_code != 0 and "pip install 'fastgal[fits]'" in res.output


# --------------------------------------------------------------------------- geometry: float twins of JPEGs

@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """40 JPEG cutouts with a bright marked block at a random place, and their float twins: FITS files of the
    JPEGs' own decoded pixels (so the two hold the same values), sharded alike."""
    root = tmp_path_factory.mktemp("twins")
    rng = np.random.default_rng(5)
    ids = [str(1237645945580748800 + i) for i in range(40)]
    (root / "jpg").mkdir()
    (root / "fits").mkdir()
    for i in ids:
        img = np.zeros((64, 64, 3), np.uint8)
        img[..., :] = rng.integers(5, 25, (64, 64, 3))
        r, c = rng.integers(14, 46, 2)
        img[r - 1:r + 2, c - 1:c + 2] = (250, 200, 150)
        Image.fromarray(img).save(root / "jpg" / f"{i}.jpg", quality=100)
        px = np.asarray(Image.open(root / "jpg" / f"{i}.jpg").convert("RGB"))
        _write(root / "fits" / f"{i}.fits", px.transpose(2, 0, 1).astype(np.float32), bands="RGB")
    _catalog(root / "cat.csv", ids)
    for kind in ("jpg", "fits"):
        run_cli("shard", root / "cat.csv", root / kind, root / f"sh_{kind}", "--crop", 48, "--valid-pct", 0.2, "--quiet")
    return root


def _epoch(folder, backend, view=TRAIN, epoch=2):
    sh = Shards(folder)
    geo = geometry_for(sh, size=32, mean=[0.0] * 3, std=[1.0] * 3, stretch="none")
    dl = Loader(sh.split("train" if view == TRAIN else "valid"), view, geo, bs=8, backend=backend, threads=1, seed=7)
    dl.set_epoch(epoch)
    return torch.cat([x for x, _ in dl]), torch.cat([y for _, y in dl])


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=pytest.mark.dali)])
def test_a_float_twin_lands_where_its_jpeg_lands(twins, backend):
    sj, sf = Shards(twins / "sh_jpg"), Shards(twins / "sh_fits")
    assert sj.kind == "jpeg" and sf.kind == "float" and sf.split("train").keys == sj.split("train").keys
    for view in (TRAIN, CENTRE, 6):
        xj, yj = _epoch(twins / "sh_jpg", backend, view)
        xf, yf = _epoch(twins / "sh_fits", backend, view)
        assert torch.equal(yj, yf)
        # the same draws move the same pixels: the float result differs from the uint8 one only by the uint8
        # path's rounding to whole grey levels (training), and not at all for the exact views
        tol = 0.5 + 1e-3 if view == TRAIN else 0
        assert (xj - xf).abs().max().item() <= tol, view
        # the marked block lands in the same place in both: its brightness-weighted centre, to a tenth of a pixel
        cj, cf = _mark_centre(xj), _mark_centre(xf)
        assert (cj - cf).abs().max().item() < 0.1, view
        assert cj.min() >= 0 and cj.max() <= 31  # and on the model's input, in all but a rare corner crop


def _mark_centre(x):
    """Per image, the (row, col) centre of the pixels brighter than the sky (the marked block)."""
    w = (x.sum(1) - 200).clamp_min(0)  # the sky is <= 75 over the channels, the block ~600
    rows = torch.arange(w.shape[1], dtype=torch.float32)[:, None]
    cols = torch.arange(w.shape[2], dtype=torch.float32)[None, :]
    tot = w.sum((1, 2)).clamp_min(1e-9)
    return torch.stack([(w * rows).sum((1, 2)) / tot, (w * cols).sum((1, 2)) / tot], 1)


@pytest.mark.dali
def test_float_backends_agree(twins):
    """torch (one grid_sample) and DALI (rotate) give the same float training batches."""
    xb, _ = _epoch(twins / "sh_fits", "torch")
    xd, _ = _epoch(twins / "sh_fits", "dali")
    assert (xb - xd).abs().max().item() < 0.05  # 0-255 units: float rounding of two bilinear samplers


# --------------------------------------------------------------------------- the stretch

def test_stretch_choices(twins, tmp_path):
    sh = Shards(twins / "sh_fits")
    auto = dataloaders(sh, bs=8, size=32, threads=1)
    g = auto.train.geometry
    assert g.softening == sh.stretch["softening"] and g.channels == 3
    x, _ = auto.train.one_batch()
    assert abs(x.mean().item()) < 0.5 and 0.3 < x.std().item() < 3  # stretched, then normalised
    none = dataloaders(sh, bs=8, size=32, threads=1, stretch="none").train.geometry
    assert none.softening is None and none.mean == sh.pixel_mean
    mine = dataloaders(sh, bs=8, size=32, threads=1, stretch="asinh", softening=[1.0, 2.0, 3.0]).train.geometry
    assert mine.softening == [1.0, 2.0, 3.0] and mine.mean != g.mean
    res = run_cli("train", twins / "sh_fits", "--out", tmp_path / "r", "--softening", 1, "--softening", 2, ok=False)
    assert res.exit_code != 0 and "one positive value per band (R,G,B)" in res.output
    res = run_cli("train", twins / "sh_jpg", "--out", tmp_path / "r2", "--stretch", "asinh", ok=False)
    assert res.exit_code != 0 and "holds JPEGs" in res.output
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()  # refused before anything was written


# --------------------------------------------------------------------------- a survey of FITS bands, trained and predicted

@pytest.fixture(scope="module")
def fits_run(fits_survey):
    root = fits_survey  # conftest's session survey of FITS bands and its shards
    run_cli("train", root / "sh", "--out", root / "r", "--epochs", 1, "--bs", 16, "--arch", "xresnet18", "--size", 56,
            "--quiet")
    return root


@pytest.mark.slow
def test_train_and_predict_on_fits_bands(fits_run, tmp_path):
    root = fits_run
    m = json.loads((root / "sh/manifest.json").read_text())
    assert m["image"]["bands"] == list("ugriz") and m["counts"]["rejected"] == 0
    ckpt = torch.load(root / "r/model.pt", weights_only=False)
    assert ckpt["image_kind"] == "float" and ckpt["bands"] == list("ugriz") and len(ckpt["softening"]) == 5
    first = next(v for k, v in ckpt["state_dict"].items() if v.ndim == 4)
    assert first.shape[1] == 5  # the first convolution takes the five bands
    cfg = json.loads((root / "r/config.json").read_text())
    assert cfg["image"]["bands"] == list("ugriz") and cfg["loader_decode"].startswith("no decode")
    valid = pd.read_csv(root / "r/predictions_valid.csv", dtype={"id": str}).set_index("id")

    # the shards' valid split through `fastgal predict`: what training wrote
    run_cli("predict", root / "r", root / "sh", "--out", tmp_path / "p.csv")
    again = pd.read_csv(tmp_path / "p.csv", dtype={"id": str}).set_index("id")
    assert np.allclose(again["pred_metallicity"], valid["pred_metallicity"], atol=2e-5)

    # the raw FITS files: the same numbers for the same galaxies (read, stored as float16, stretched alike)
    res = run_cli("predict", root / "r", root / "s/images", "--out", tmp_path / "f.csv")
    files = pd.read_csv(tmp_path / "f.csv", dtype={"id": str}).set_index("id")
    assert (files["status"] == "ok").all() and len(files) == 120 and "wrote 120" in res.output
    common = valid.index.intersection(files.index)
    assert len(common) == len(valid)
    assert np.allclose(files.loc[common, "pred_metallicity"], valid.loc[common, "pred_metallicity"], atol=2e-4)

    # JPEGs given to a FITS model: each gets its row and reason, and the command fails
    jpgs = tmp_path / "jpgs"
    jpgs.mkdir()
    Image.new("RGB", (112, 112), (40, 50, 60)).save(jpgs / "1.jpg")
    res = run_cli("predict", root / "r", jpgs, "--out", tmp_path / "j.csv", ok=False)
    assert res.exit_code != 0 and pd.read_csv(tmp_path / "j.csv")["status"].tolist() == ["not-fits"]
    assert "not a FITS file: a JPEG" in res.output


@pytest.mark.slow
def test_predict_names_the_models_bands_up_front(fits_run, tmp_path):
    """Issue 33 item 4: a five-band model on a folder of g, r, i files. Before: every file `wrong-bands: has bands
    g,r,i; --bands asks for u,z too`, though predict has no --bands."""
    root = fits_run
    gri = tmp_path / "gri"
    gri.mkdir()
    for src in sorted((root / "s/images").glob("*.fits"))[:3]:
        with fits.open(src) as hdul:
            _write(gri / src.name, hdul[0].data[1:4], bands="gri")
    res = run_cli("predict", root / "r", gri, "--out", tmp_path / "p.csv", ok=False)
    first = sorted(gri.glob("*.fits"))[0]
    assert res.exit_code != 0 and res.output.strip().splitlines() == [
        f"Error: the model in {root / 'r'} was trained on bands u,g,r,i,z; the .fits files in {gri} have g,r,i "
        f"(e.g. {first}), without u,z: give it cutouts with bands u,g,r,i,z, or train a model on shards of these bands"]
    # a file that lacks a band among good ones: its row says the model's bands, not --bands
    for src in sorted((root / "s/images").glob("*.fits"))[:3]:
        shutil.copy(src, gri / src.name)
    _write(gri / "1.fits", _cube(np.random.default_rng(0), side=112, bands="gri"), bands="gri")
    run_cli("predict", root / "r", gri, "--out", tmp_path / "q.csv")
    q = pd.read_csv(tmp_path / "q.csv", dtype={"id": str}).set_index("id")
    assert q.loc["1", "reason"] == "has bands g,r,i; the model (bands u,g,r,i,z) asks for u,z too"


@pytest.mark.slow
def test_the_report_shows_fits_cutouts_as_colour_pngs(fits_run):
    """report.html's gallery of a FITS run: each cutout a PNG colour composite (i, r, g as R, G, B, asinh,
    scaled together), not a grey band."""
    import base64
    import io
    import re

    text = (fits_run / "r/report.html").read_text()
    assert "bands i, r, g shown as R, G, B" in text
    srcs = re.findall(r'<img src="(data:[^"]+)" alt="cutout', text)
    assert len(srcs) == 3 * 12
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        im = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"), np.int16)
        assert im.shape == (112, 112, 3) and im.max() == 255 and np.abs(im[..., 0] - im[..., 2]).max() > 10
