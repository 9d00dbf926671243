"""Issue 33, items 4 and 5: inputs checked up front, by name, in one line that names the file and the fix (shard's
--bands, a folder of .jpg and .fits mixed, cutouts in sub-folders, a ;- or tab-separated catalog; predict on a
shard folder without its manifest.json, on sub-folders, with a model's bands; bench's --size from the shards'
crop), and the small ones: what the figures say (PNG text chunks, show.figure_text), bench's e2e / model ratio,
the notebook's folder."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def figure_text(fig) -> list[str]:
    # imported here, not at the top, so that on the old code each test fails on its own
    from fastgal.load import show

    return show.figure_text(fig)


def _one_line_error(res) -> str:
    assert res.exit_code != 0, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1 and res.output.strip().endswith(lines[0]), res.output
    return lines[0]


def _tiny_copy(survey, dest: Path, n: int, ext: str = ".jpg") -> Path:
    """The first n rows of a synthetic survey's catalog (catalog.csv) and their cutouts (images/), in dest."""
    cat = pd.read_csv(survey / "data/master.csv", dtype=str, keep_default_na=False).iloc[:n]
    (dest / "images").mkdir(parents=True)
    for i in cat.objID:
        shutil.copy(survey / "images" / f"{i}{ext}", dest / "images" / f"{i}{ext}")
    cat.to_csv(dest / "catalog.csv", index=False)
    return dest / "catalog.csv"


# --------------------------------------------------------------------------- shard

def test_bands_the_files_lack_are_named_before_any_row_is_read(fits_survey, tmp_path):
    """Before: every row rejected `wrong-bands`, the band named only inside rejects.csv."""
    cat = _tiny_copy(fits_survey / "s", tmp_path, 6, ".fits")
    imgs = tmp_path / "images"
    for bands, missing in (("g,r,x", "x"), ("gry", "y")):
        err = _one_line_error(run_cli("shard", cat, imgs, tmp_path / "out", "--bands", bands, "--crop", 72, ok=False))
        assert f"the files have no band '{missing}'" in err and "has u,g,r,i,z" in err
        assert err.endswith("choose among u,g,r,i,z")
        assert not (tmp_path / "out" / "rejects.csv").exists()  # refused up front: no row was read
    # upper case is the same letter where only one band matches: the manifest names the files' bands
    res = run_cli("shard", cat, imgs, tmp_path / "upper", "--bands", "G,R,I", "--crop", 72, "--workers", 1)
    assert "--bands G,R,I read as g,r,i, the files' band names" in res.stderr
    m = json.loads((tmp_path / "upper/manifest.json").read_text())
    assert m["image"]["bands"] == ["g", "r", "i"] and m["counts"]["rejected"] == 0


def test_a_band_that_matches_two_but_for_case_is_refused_saying_so():
    from fastgal.shards.fits import match_bands

    assert match_bands(("G", "r"), ("g", "r", "i"), "f.fits") == ("g", "r")
    with pytest.raises(ValueError, match=r"band 'ab' matches Ab and aB in f.fits but for case; name the one you mean"):
        match_bands(("ab",), ("Ab", "aB"), "f.fits")


def test_a_folder_of_jpg_and_fits_together_is_refused(survey, fits_survey, tmp_path):
    """Before: exit 0, the .fits files ignored (rows with only a .fits were `missing-image`)."""
    cat = _tiny_copy(survey, tmp_path, 4)
    for f in sorted((fits_survey / "s/images").glob("*.fits"))[:2]:
        shutil.copy(f, tmp_path / "images")
    err = _one_line_error(run_cli("shard", cat, tmp_path / "images", tmp_path / "out", ok=False))
    assert "holds both 4 .jpg and 2 .fits cutouts" in err
    assert "pass --bands (e.g. --bands g,r,i) to shard the .fits files' bands" in err and "separate folders" in err
    assert not (tmp_path / "out").exists()


def test_cutouts_in_a_sub_folder_are_found_and_named(survey, small_run, tmp_path):
    """Before: shard rejected every row `missing-image`; predict said `no files in ...`."""
    cat = _tiny_copy(survey, tmp_path, 3)
    (tmp_path / "top").mkdir()
    shutil.move(tmp_path / "images", tmp_path / "top" / "sub")
    err = _one_line_error(run_cli("shard", cat, tmp_path / "top", tmp_path / "out", ok=False))
    top, sub = tmp_path / "top", tmp_path / "top" / "sub"
    assert f"{top} holds no cutouts itself, they are in sub-folders: {sub} holds 3 .jpg files" in err
    assert err.endswith(f"e.g. {sub}")
    err = _one_line_error(run_cli("predict", small_run, tmp_path / "top", "--out", tmp_path / "p.csv", ok=False))
    assert "they are in sub-folders" in err
    assert err.endswith(f"pass the folder that holds the {{id}}.jpg files, e.g. {sub}")


@pytest.mark.parametrize("ext", [".jpeg", ".JPG"])
def test_cutouts_named_jpeg_or_upper_case_are_refused_with_the_rename(survey, tmp_path, ext):
    """Before: every row rejected `missing-image` (shard looks for {id}.jpg exactly)."""
    cat = _tiny_copy(survey, tmp_path, 3)
    for f in (tmp_path / "images").iterdir():
        f.rename(f.with_suffix(ext))
    err = _one_line_error(run_cli("shard", cat, tmp_path / "images", tmp_path / "out", ok=False))
    assert f"{tmp_path / 'images'} holds 3 {ext} files and no {{id}}.jpg" in err and "rename them" in err
    assert not (tmp_path / "out").exists()
    # the rename it gives fixes it
    subprocess.run(["bash", "-c", err.split("e.g. ", 1)[1]], check=True)
    run_cli("shard", cat, tmp_path / "images", tmp_path / "out", "--workers", 1)
    assert json.loads((tmp_path / "out/manifest.json").read_text())["counts"]["rejected"] == 0


@pytest.mark.parametrize("sep", [";", "\t"])
def test_a_semicolon_or_tab_separated_catalog_is_read(survey, tmp_path, sep):
    """Before: `no id column 'objID' (columns: objID;ra;dec;...)`."""
    cat = _tiny_copy(survey, tmp_path, 6)
    df = pd.read_csv(cat, dtype=str, keep_default_na=False)
    df.to_csv(cat, sep=sep, index=False)
    out = tmp_path / "out"
    run_cli("shard", cat, tmp_path / "images", out, "--valid-pct", 0.2, "--workers", 1, "--quiet")
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"] == {"catalog_rows": 6, "train": 5, "valid": 1, "rejected": 0}
    # decimal commas (a spreadsheet's export in such a locale) are named, not rejected row by row
    df["metallicity"] = df["metallicity"].str.replace(".", ",")
    df.to_csv(cat, sep=sep, index=False)
    err = _one_line_error(run_cli("shard", cat, tmp_path / "images", tmp_path / "o2", ok=False))
    assert "separated with decimal commas (column 'metallicity', row 1:" in err
    assert err.endswith("export it with decimal points")


# --------------------------------------------------------------------------- predict

def test_predict_on_a_shard_folder_without_its_manifest(small_run, small_shards, tmp_path):
    """Before: read as a JPEG folder, `not-jpeg: starts with 'row,id,reason'` for each of its files."""
    sh = tmp_path / "sh"
    shutil.copytree(small_shards, sh)
    (sh / "manifest.json").unlink()
    err = _one_line_error(run_cli("predict", small_run, sh, "--out", tmp_path / "p.csv", ok=False))
    assert f"{sh} is a shard folder without its manifest.json (it has rejects.csv, train-000000.idx" in err
    assert f"re-shard it (fastgal shard CATALOG IMAGES {sh} --overwrite)" in err
    assert not (tmp_path / "p.csv").exists()


# predict with a five-band model on a folder of gri files: test_fits.py (its fits_run)


# --------------------------------------------------------------------------- bench

def test_bench_size_follows_the_shards_crop(small_shards):
    """Before: crop-72 shards kept --size 112 (`crop sizes do not fit`), and --what model timed 112 px batches."""
    tiny = ("--arch", "xresnet18", "--batches", 1, "--warmup", 0, "--repeats", 1, "--bs", 8, "--workers", 1, "--quiet",
            "--json")
    res = json.loads(run_cli("bench", small_shards, "--what", "loaders,model", *tiny).stdout)
    assert res["config"]["crop"] == 72 and res["config"]["size"] == 56  # 7/9 of the crop, as `fastgal train`
    assert res["model"]["batch_shape"] == [8, 3, 56, 56] and res["loaders"]["results"]["torch"]["images_per_s"] > 0
    # a size that cannot fit says what to pass
    err = _one_line_error(run_cli("bench", small_shards, "--what", "loaders", "--size", 112, *tiny, ok=False))
    assert "model input 112px; pass --size 56 (7/9 of the region, the default) or another size up to 72" in err


def _png_text(path) -> str:
    return Image.open(path).text["Description"]


def test_the_run_figures_say_what_they_show(small_run):
    """Before: lr_find.png marked only the suggestion; coverage.png plotted the TTA spread as sigma without a word;
    pred_vs_true.png had no unit. Each PNG now carries its figure's words (text chunk Description)."""
    cfg = json.loads((small_run / "config.json").read_text())
    lr = _png_text(small_run / "lr_find.png")
    assert "suggested (valley)" in lr and f"used for training (--lr) {cfg['lr']:.2e}" in lr
    cov = _png_text(small_run / "coverage.png")
    assert "metallicity: TTA spread" in cov and "it is not an uncertainty of the error" in cov.replace("\n", " ")
    pvt = _png_text(small_run / "pred_vs_true.png")
    assert "true metallicity (dex)" in pvt and "predicted metallicity (dex)" in pvt


def test_a_target_without_a_known_unit_is_named_on_its_axes():
    from fastgal.score.plots import coverage_plot, pred_vs_true

    rng = np.random.default_rng(0)
    true = rng.normal(0, 1, 50)
    words = figure_text(pred_vs_true(true, true + rng.normal(0, 0.1, 50), None, name="redshift"))
    assert "true redshift" in words and "predicted redshift" in words
    assert not any("TTA" in w for w in figure_text(coverage_plot({"y: model sigma": np.abs(true)}, None)))


def test_fits_show_batch_says_which_bands_are_red_green_blue(fits_survey):
    """Before: no word of which of the five bands the colours are."""
    import matplotlib.pyplot as plt

    from fastgal.load.loader import dataloaders

    dls = dataloaders(fits_survey / "sh", bs=8, size=56, threads=1)
    fig = dls.train.show_batch(max_n=4)
    try:
        assert figure_text(fig)[0] == ("bands i, r, g shown as R, G, B (of u,g,r,i,z; each image scaled to its "
                                       "0.5-99.5% range)")
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- the notebook

def test_the_notebook_writes_into_an_ignored_folder_and_shows_show_batch_once():
    """Before: examples/quickstart/ was not git-ignored, and show_batch's figure showed twice (inline, then as
    the cell's value). test_notebook.py runs the notebook and counts its figures."""
    import nbformat

    nb = nbformat.read(REPO / "examples/quickstart.ipynb", as_version=4)
    src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert 'work = Path("quickstart")' in src and "dls.show_batch(max_n=8);" in src
    if shutil.which("git") and (REPO / ".git").exists():
        r = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", "examples/quickstart/shards/manifest.json"],
                           check=False)
        assert r.returncode == 0
    else:
        assert "/examples/quickstart/" in (REPO / ".gitignore").read_text().splitlines()
