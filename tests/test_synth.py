"""fastgal synth: exact ids, valid images, determinism, the metallicity distribution, CLI errors."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from PIL import Image

from fastgal.survey.synth import REF_Q, make_catalog

REF = {0.01: 8.286, 0.05: 8.492, 0.25: 8.809, 0.5: 8.956, 0.75: 9.054, 0.95: 9.134, 0.99: 9.190}


def tree_digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_survey_layout_ids_and_images(survey):
    text = (survey / "data" / "master.csv").read_text().splitlines()
    ids_text = [line.split(",")[0] for line in text[1:]]
    assert len(ids_text) == 300
    assert all(len(i) == 19 and i.isdigit() for i in ids_text)
    assert len(set(ids_text)) == 300
    # pandas must keep them exact when told to read them as integers or strings
    cat = pd.read_csv(survey / "data" / "master.csv", dtype={"objID": "int64"})
    assert [str(i) for i in cat.objID] == ids_text
    files = sorted(p.stem for p in (survey / "images").iterdir())
    assert files == sorted(ids_text)
    for i in ids_text[:50]:
        im = Image.open(survey / "images" / f"{i}.jpg")
        assert im.format == "JPEG"
        im.load()  # a full decode, not just verify()
        assert im.size == (224, 224) and im.mode == "RGB"
    meta = json.loads((survey / "synth.json").read_text())
    assert meta["n"] == 300 and meta["seed"] == 1
    fl = meta["floor"]
    assert 0.05 < fl["floor_rmse"] < 0.1 < fl["mean_baseline_rmse"]
    assert set(cat.columns) >= {"objID", "ra", "dec", "metallicity", "lgm_tot_p50", "sfr_tot_p50", "z", "petroR90_r"}


def test_deterministic_whatever_workers(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_cli("synth", a, "--n", 150, "--seed", 7, "--workers", 1, "--quiet")
    run_cli("synth", b, "--n", 150, "--seed", 7, "--workers", 2, "--quiet")
    da, db = tree_digest(a), tree_digest(b)
    assert len(da) == 152 and da == db
    # a different seed is a different survey
    c = tmp_path / "c"
    run_cli("synth", c, "--n", 150, "--seed", 8, "--quiet")
    assert tree_digest(c)["data/master.csv"] != da["data/master.csv"]


def test_distribution_matches_reference_quantiles():
    m = make_catalog(2000, 1)["metallicity"]
    for p, q in REF.items():
        assert abs(np.quantile(m, p) - q) < 0.03, (p, np.quantile(m, p), q)
    big = make_catalog(100_000, 3)["metallicity"]
    for p, q in REF.items():
        assert abs(np.quantile(big, p) - q) < 0.01
    assert abs(big.mean() - 8.906) < 0.01 and abs(big.std() - 0.200) < 0.01
    assert big.min() >= REF_Q[0] and big.max() <= REF_Q[-1]


def test_physics_is_learnable():
    cat = make_catalog(20_000, 2)
    m, rel = cat["metallicity"], cat["metallicity_relation"]
    # mass-metallicity relation: metallicity rises with stellar mass
    assert np.corrcoef(cat["lgm_tot_p50"], m)[0, 1] > 0.6
    # fundamental metallicity relation: at fixed mass, more star formation -> lower metallicity
    resid = m - np.poly1d(np.polyfit(cat["lgm_tot_p50"], m, 3))(cat["lgm_tot_p50"])
    assert np.corrcoef(cat["delta_ms"], resid)[0, 1] < -0.2
    # the relation explains most of the variance; the hidden scatter is the floor
    assert np.sqrt(np.mean((m - rel) ** 2)) < 0.5 * m.std()


def test_images_carry_the_signal(survey):
    """Redder, more massive galaxies are more metal-rich, and it shows in the pixels."""
    cat = pd.read_csv(survey / "data" / "master.csv", dtype={"objID": str})
    colour = []
    for i in cat.objID:
        a = np.asarray(Image.open(survey / "images" / f"{i}.jpg"), np.float32)[92:132, 92:132]
        colour.append((a[..., 0].sum() - a[..., 2].sum()) / max(a.sum(), 1))
    assert np.corrcoef(colour, cat.metallicity)[0, 1] > 0.3


@pytest.mark.parametrize("n", [0, -5])
def test_bad_n(tmp_path, n):
    res = run_cli("synth", tmp_path / "o", "--n", n, ok=False)
    assert res.exit_code != 0 and "--n" in res.output
    assert not (tmp_path / "o").exists()


def test_refuses_non_empty_out_then_overwrites(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run_cli("synth", out, "--n", 20, ok=False)
    assert res.exit_code != 0 and "--overwrite" in res.output and len(res.output.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    run_cli("synth", out, "--n", 20, "--overwrite", "--quiet")
    run_cli("synth", out, "--n", 30, "--overwrite", "--quiet", "--seed", 4)
    assert len(list((out / "images").iterdir())) == 30  # the old survey is replaced, not merged
    assert (out / "keep.txt").read_text() == "mine"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_next_run_removes_a_killed_runs_temp_folder(tmp_path):
    out = tmp_path / "o"
    (out / ".synth-k9").mkdir(parents=True)  # what SIGKILL leaves: a temp folder of rendered images
    (out / ".synth-k9" / "images").mkdir()
    res = run_cli("synth", out, "--n", 10)  # a killed run's leftovers do not make OUT "not empty"
    assert not (out / ".synth-k9").exists() and ".synth-k9" in res.stderr and "interrupted run" in res.stderr
    (out / ".synth-k9").mkdir()
    res = run_cli("synth", out, "--n", 10, "--overwrite", "--quiet")
    assert not (out / ".synth-k9").exists() and res.stderr == ""
    assert sorted(p.name for p in out.iterdir()) == ["data", "images", "synth.json"]


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_files_get_the_modes_of_a_plain_write(tmp_path, mask):
    out = tmp_path / "o"
    old = os.umask(mask)
    try:
        run_cli("synth", out, "--n", 4, "--workers", 2, "--quiet")
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == 6 and {p.stat().st_mode & 0o777 for p in files} == {0o666 & ~mask}
    assert {p.stat().st_mode & 0o777 for p in [out, *out.iterdir()] if p.is_dir()} == {0o777 & ~mask}


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run_cli("synth", blocker / "sub", "--n", 5, ok=False)
    assert res.exit_code != 0
    assert len(res.output.strip().splitlines()) == 1 and "writ" in res.output


def test_cli_version_and_help():
    assert "fastgal" in run_cli("--version").output
    assert "synth" in run_cli("-h").output


def test_observable_reference_matches_an_independent_estimate(survey):
    """synth.json's observable reference (measured once per generator version on 200k latent draws) agrees
    within 0.01 dex with a fresh estimate: another draw, another seed, a smaller model."""
    from fastgal.survey.floor import observable_reference
    from fastgal.survey.synth import make_catalog

    fl = json.loads((survey / "synth.json").read_text())["floor"]
    fresh = observable_reference(make_catalog(20_000, seed=2024), max_iter=150, seed=1)
    assert abs(fl["observable_reference_rmse"] - fresh) < 0.01
    # between the latent floor (an oracle knowing mass and SFR) and predicting the mean
    assert fl["floor_rmse"] < fl["observable_reference_rmse"] < fl["mean_baseline_rmse"]
    assert "best any" not in fl["note"]


# --------------------------------------------------------------------------- --format fits (issue #20)

FITS_ARGS = ("--n", 16, "--size", 64, "--seed", 3, "--quiet")


@pytest.fixture(scope="module")
def fits_surveys(tmp_path_factory):
    """The same 16 galaxies as a JPEG survey, a ugriz FITS survey (1 and 2 workers) and a gri FITS survey."""
    pytest.importorskip("astropy")
    root = tmp_path_factory.mktemp("fits")
    run_cli("synth", root / "jpeg", *FITS_ARGS)
    run_cli("synth", root / "ugriz", *FITS_ARGS, "--format", "fits", "--bands", "ugriz", "--workers", 1)
    run_cli("synth", root / "ugriz2", *FITS_ARGS, "--format", "fits", "--bands", "ugriz", "--workers", 2)
    run_cli("synth", root / "gri", *FITS_ARGS, "--format", "fits", "--workers", 2)
    return root


def read_cube(path):
    from astropy.io import fits

    with fits.open(path) as hdul:
        assert len(hdul) == 1
        return hdul[0].data.copy(), hdul[0].header


def test_fits_cube_shape_dtype_and_header(fits_surveys):
    s = fits_surveys / "ugriz"
    cat = pd.read_csv(s / "data" / "master.csv", dtype={"objID": str})
    assert sorted(p.name for p in (s / "images").iterdir()) == sorted(f"{i}.fits" for i in cat.objID)
    for i, scale in zip(cat.objID, cat.scale):
        cube, h = read_cube(s / "images" / f"{i}.fits")
        assert cube.shape == (5, 64, 64) and cube.dtype == np.dtype(">f4") and np.isfinite(cube).all()
        assert h["BANDS"] == "ugriz" and [h[f"BAND{k}"] for k in range(5)] == list("ugriz") and "BAND5" not in h
        assert h["BUNIT"] == "nanomaggy" and h["OBJID"] == i and isinstance(h["OBJID"], str)
        assert h["PIXSCALE"] == pytest.approx(scale * 224 / 64, rel=1e-4)  # the cutout's own pixel, not 224 px's
        assert "DATE" not in h and "CHECKSUM" not in h  # nothing that changes between runs
    meta = json.loads((s / "synth.json").read_text())
    assert meta["format"] == "fits" and meta["bands"] == "ugriz"
    bm = meta["bands_model"]
    assert list(bm["sky_sigma_nmgy_per_native_pixel"]) == list("ugriz")
    sky = bm["sky_sigma_nmgy_per_native_pixel"]
    assert sky["g"] < sky["u"] < sky["r"] < sky["i"] < sky["z"] and 4 < sky["z"] / sky["r"] < 5
    assert {"u-g", "i-z"} <= set(bm["colours"])
    ref = meta["floor"]["observable_reference"]
    assert ref["bands"] == "ugriz" and {"u_g", "i_z"} <= set(ref["visible"])
    assert meta["floor"]["observable_reference_rmse"] == ref["rmse"]


def test_fits_r_band_is_calibrated(fits_surveys):
    """Nanomaggies per 0.396" pixel area (NMGYPIX): the r plane summed over the cutout, times (PIXSCALE /
    NMGYPIX)^2, gives the catalog's r magnitude (22.5 - 2.5 log10 f)."""
    s = fits_surveys / "gri"
    cat = pd.read_csv(s / "data" / "master.csv", dtype={"objID": str})
    mags = []
    for i in cat.objID:
        cube, h = read_cube(s / "images" / f"{i}.fits")
        assert h["NMGYPIX"] == pytest.approx(0.396)
        mags.append(22.5 - 2.5 * np.log10(cube[1].astype(np.float64).sum() * (h["PIXSCALE"] / h["NMGYPIX"]) ** 2))
    # within a few tenths (the renderer's PSF-softened cores and the wings past the ~5 x R90 frame lose ~0.15 mag,
    # a bright neighbour adds some); read as nmgy per output pixel, they would be off by ~0.8 mag
    assert np.median(np.abs(np.array(mags) - cat.petroMag_r)) < 0.3


def test_fits_gri_planes_are_the_jpeg_surveys_galaxies(fits_surveys):
    """The FITS g, r, i planes, stretched and encoded like the JPEG survey, give its bytes exactly; asking for
    u and z changes no g, r, i pixel; the catalog is the same file."""
    from fastgal.survey.render import _lupton_rgb, encode_jpeg

    jp, ug, gri = fits_surveys / "jpeg", fits_surveys / "ugriz", fits_surveys / "gri"
    assert (jp / "data/master.csv").read_bytes() == (ug / "data/master.csv").read_bytes() == (gri / "data/master.csv").read_bytes()
    ids = pd.read_csv(jp / "data" / "master.csv", dtype={"objID": str}).objID
    for i in ids:
        cube5, _ = read_cube(ug / "images" / f"{i}.fits")
        cube3, h = read_cube(gri / "images" / f"{i}.fits")
        assert h["BANDS"] == "gri" and cube3.shape == (3, 64, 64)
        assert np.array_equal(cube5[1:4], cube3)
        assert encode_jpeg(_lupton_rgb(cube3), 75) == (jp / "images" / f"{i}.jpg").read_bytes()


def test_fits_u_and_z_have_the_documented_colours(fits_surveys):
    """u and z are their own planes, and their colours follow the relations: u - g redder at low specific SFR,
    both close to the catalog's drawn colours; i - z small and red."""
    s = fits_surveys / "ugriz"
    cat = pd.read_csv(s / "data" / "master.csv", dtype={"objID": str})
    drawn = make_catalog(16, 3)
    ug, iz = [], []
    for i in cat.objID:
        cube = read_cube(s / "images" / f"{i}.fits")[0].astype(np.float64)
        assert not np.allclose(cube[0], cube[1]) and not np.allclose(cube[4], cube[3])
        # not a rescaled copy either: the ratio varies across the galaxy (bulge/disk colours, noise)
        ap = cube[:, 22:42, 22:42].sum((1, 2))  # the central 20 x 20 px
        ug.append(-2.5 * np.log10(ap[0] / ap[1]))
        iz.append(-2.5 * np.log10(ap[3] / ap[4]))
    ug, iz = np.array(ug), np.array(iz)
    ssfr = (cat.sfr_tot_p50 - cat.lgm_tot_p50).to_numpy()
    low = ssfr < np.median(ssfr)
    assert np.median(ug[low]) > np.median(ug[~low]) + 0.1  # quenched-ward galaxies are redder in u - g
    assert np.corrcoef(ug, ssfr)[0, 1] < -0.7
    assert np.corrcoef(ug, drawn["_ug"])[0, 1] > 0.9 and np.corrcoef(iz, drawn["_iz"])[0, 1] > 0.8
    assert 0.8 < np.median(ug) < 2.0 and 0.05 < np.median(iz) < 0.45


def test_fits_reproducible_whatever_workers(fits_surveys):
    assert tree_digest(fits_surveys / "ugriz") == tree_digest(fits_surveys / "ugriz2")


@pytest.mark.parametrize("args,says", [
    (("--bands", "ugriz"), "--bands must be gri"),  # jpeg is RGB from g, r, i
    (("--format", "fits", "--bands", "ugx"), "letters of ugriz"),
    (("--format", "fits", "--bands", "irg"), "in that order"),
    (("--format", "fits", "--bands", "gg"), "distinct"),
    (("--format", "fits", "--bands", ""), "letters of ugriz"),
    (("--format", "png"), "png"),
])
def test_bad_format_or_bands(tmp_path, args, says):
    res = run_cli("synth", tmp_path / "o", "--n", 4, "--size", 64, *args, ok=False)
    assert res.exit_code != 0 and says in res.output
    # one line; click's own choice check adds its usage lines
    assert "png" in args or len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "o").exists()


def test_fits_without_astropy_says_how_to_get_it(tmp_path, monkeypatch):
    import sys

    for mod in ("astropy", "astropy.io", "astropy.io.fits"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import astropy...` raises ImportError
    res = run_cli("synth", tmp_path / "o", "--n", 4, "--size", 64, "--format", "fits", ok=False)
    assert res.exit_code != 0 and len(res.output.strip().splitlines()) == 1
    assert "needs astropy: pip install 'fastgal[fits]'" in res.output
    assert not (tmp_path / "o").exists()
    run_cli("synth", tmp_path / "j", "--n", 4, "--size", 64, "--quiet")  # JPEG surveys never need it


def test_observable_reference_per_band_set():
    """Every band set synth writes has a reference; gri's is today's, and the ugriz one agrees within 0.01 dex
    with a fresh estimate (another draw and seed, a smaller model), as gri's does above."""
    from itertools import combinations

    from fastgal.survey.floor import (
        OBSERVABLE_REFERENCE,
        VISIBLE,
        floor_stats,
        observable_reference,
        reference_for,
        visible_names,
    )

    sets = {"".join(c) for k in range(1, 6) for c in combinations("ugriz", k)}
    assert {reference_for(b)["bands"] for b in sets} == sets
    assert visible_names("gri") == VISIBLE and reference_for("gri")["rmse"] == OBSERVABLE_REFERENCE["rmse"]
    assert visible_names("ugriz")[:5] == ["petroMag_r", "u_g", "g_r", "r_i", "i_z"]
    cat = make_catalog(20_000, seed=2024)
    assert floor_stats(cat, 2, 0.066)["observable_reference_rmse"] == OBSERVABLE_REFERENCE["rmse"]  # old callers
    ref = floor_stats(cat, 2, 0.066, "ugriz")["observable_reference"]
    assert abs(ref["rmse"] - observable_reference(cat, max_iter=150, seed=1, bands="ugriz")) < 0.01
