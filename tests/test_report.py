"""report.html: what `fastgal train` writes last and `fastgal report RUN` rebuilds, for any finished run folder;
read here as a browser would (headless Chromium, where installed) and as a program would (its data attributes)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from PIL import Image

RUN_FILES = ("config.json", "metrics.json", "history.csv", "predictions_valid.csv")  # what a report reads, + PNGs


class Page(HTMLParser):
    """Every <img>'s src and every gallery item's data attributes, in page order."""

    def __init__(self, text: str):
        super().__init__()
        self.imgs, self.items, self.scripts, self.links = [], [], 0, []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        if tag == "script":
            self.scripts += 1
        if tag in ("link", "iframe", "object", "embed") or (tag == "a" and a.get("href", "").startswith("http")):
            self.links.append(a)
        if "data-section" in a:
            self.items.append(a)

    def section(self, name: str) -> list[dict]:
        return [a for a in self.items if a["data-section"] == name]


def decoded(src: str) -> Image.Image:
    """An <img> src as the image it embeds: a data: URI of a PNG or JPEG that decodes whole."""
    assert src.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")), src[:60]
    data = base64.b64decode(src.split(",", 1)[1], validate=True)
    im = Image.open(io.BytesIO(data))
    im.load()
    assert im.format in ("PNG", "JPEG") and im.width > 8 and im.height > 8
    return im


def copy_run(run: Path, dest: Path, shards: str | None = None, report: bool = False) -> Path:
    """A copy of a run folder as one made before report.html existed (without it, and without model.pt, which a
    report does not read); `shards` rewrites the folder config.json names."""
    dest.mkdir(parents=True)
    for p in run.iterdir():
        if p.name in RUN_FILES or p.suffix == ".png" or (report and p.name == "report.html"):
            shutil.copy2(p, dest / p.name)
    if shards is not None:
        cfg = json.loads((dest / "config.json").read_text())
        cfg["shards"] = shards
        (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_train_writes_a_self_contained_report(small_run):
    text = (small_run / "report.html").read_text()
    page = Page(text)
    assert page.scripts == 0 and page.links == []  # no script, nothing fetched
    assert "http://" not in text and "https://" not in text
    pngs = [p.name for p in small_run.glob("*.png") if p.name != "show_batch.png"]
    assert len(page.imgs) == len(pngs) + 2 * 3 * 12  # every figure, and per target 12 worst + 12 best + 12 random
    for src in page.imgs:
        decoded(src)
    m = json.loads((small_run / "metrics.json").read_text())
    assert f"{m['rmse']:.4f} dex" in text and f"{m['baseline_rmse']:.4f} dex" in text
    assert f"{m['floor']['observable_reference_rmse']:.4f}" in text and f"{m['floor']['floor_rmse']:.4f}" in text
    assert "xresnet18" in text and "fastgal" in text and json.loads((small_run / "config.json").read_text())["shards"] in text


def test_the_gallery_worst_are_the_largest_errors_of_predictions_valid(small_run):
    page = Page((small_run / "report.html").read_text())
    df = pd.read_csv(small_run / "predictions_valid.csv", dtype={"id": str})
    err = (df["pred_metallicity"] - df["true_metallicity"]).abs()  # the plain prediction, not TTA's
    def section(name, target="metallicity"):
        return [a for a in page.section(name) if a["data-target"] == target]

    worst = section("worst")
    assert [a["data-id"] for a in worst] == df["id"][err.sort_values(ascending=False, kind="stable").index[:12]].tolist()
    assert [a["data-id"] for a in section("best")] == df["id"][err.sort_values(kind="stable").index[:12]].tolist()
    # a multi-target run: a gallery per target, each ranked by its own error
    err2 = (df["pred_lgm_tot_p50"] - df["true_lgm_tot_p50"]).abs()
    assert [a["data-id"] for a in section("worst", "lgm_tot_p50")] == \
        df["id"][err2.sort_values(ascending=False, kind="stable").index[:12]].tolist()
    # the catalog row on hover (the shards carry it): the galaxy's own coordinates
    cat = pd.read_csv(Path(json.loads((small_run / "config.json").read_text())["shards"]).parent / "s/data/master.csv",
                      dtype={"objID": str}).set_index("objID")
    first = worst[0]
    assert f"ra={cat.loc[first['data-id'], 'ra']:.4g}" in first["title"], first["title"]
    rows = df.set_index("id")
    for a in [a for a in page.items if a["data-target"] == "metallicity"]:  # each item's numbers are its row's
        r = rows.loc[a["data-id"]]
        assert float(a["data-true"]) == pytest.approx(r["true_metallicity"])
        assert float(a["data-pred"]) == pytest.approx(r["pred_metallicity"])
        assert float(a["data-abs-error"]) == pytest.approx(abs(r["pred_metallicity"] - r["true_metallicity"]))
    rand = section("random")
    assert len(rand) == 12 and len({a["data-id"] for a in rand}) == 12
    assert min(float(a["data-abs-error"]) for a in worst) >= err.nlargest(12).min() - 1e-12


def test_report_rebuilds_a_run_made_before_it(small_run, tmp_path):
    old = copy_run(small_run, tmp_path / "old")  # as a run made before report.html: no report in it
    res = run_cli("report", old, "--gallery", 5, "--json")
    info = json.loads(res.stdout)
    out = old / "report.html"
    assert info["out"] == str(out) and info["bytes"] == out.stat().st_size
    page = Page(out.read_text())
    assert [len(page.section(s)) for s in ("worst", "best", "random")] == [10, 10, 10]  # 5 each for both targets
    assert all(decoded(s) for s in page.imgs)
    # the same run, the same page but for its folder's name: the gallery of train's own and of a rebuild agree
    again = run_cli("report", small_run, "--out", tmp_path / "again.html")
    assert "wrote" in again.output and "kB" in again.output
    assert Page((tmp_path / "again.html").read_text()).items == Page((small_run / "report.html").read_text()).items


def test_report_without_the_shards_says_so(small_run, tmp_path):
    gone = tmp_path / "gone-shards"
    run = copy_run(small_run, tmp_path / "r", shards=str(gone))
    run_cli("report", run)
    text = (run / "report.html").read_text()
    page = Page(text)
    assert "The cutouts are not shown" in text and str(gone) in text
    assert len(page.section("worst")) == 24 and "no cutout: shards unavailable" in text
    assert len(page.imgs) == len([p for p in run.glob("*.png") if p.name != "show_batch.png"])  # the figures stay


def test_report_refuses_what_is_not_a_finished_run(small_run, tmp_path):
    run = copy_run(small_run, tmp_path / "r")
    (run / "metrics.json").unlink()
    res = run_cli("report", run, ok=False)
    assert res.exit_code == 1 and "unfinished run (no metrics.json)" in res.output and not (run / "report.html").exists()
    res = run_cli("report", tmp_path / "nothing", ok=False)
    assert res.exit_code == 1 and "not a folder" in res.output


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's; apt-get install chromium)")
def test_a_browser_renders_the_report(small_run, tmp_path):
    """Headless Chromium opens the page: a screenshot that is not blank, and the DOM it built has every image as a
    data: URI that decodes (none broken), and no script ran (there is none)."""
    page = tmp_path / "report.html"
    shutil.copy2(small_run / "report.html", page)
    shot = tmp_path / "shot.png"
    base = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    im = np.asarray(Image.open(shot).convert("RGB"))
    assert im.shape[:2] == (2000, 1280)
    assert im.std() > 20 and len(np.unique(im.reshape(-1, 3), axis=0)) > 500  # text, figures: not a blank page
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    rendered = Page(dom)
    assert len(rendered.imgs) == len(Page(page.read_text()).imgs) > 36
    for src in rendered.imgs:
        decoded(src)


def test_predict_report_ranks_new_cutouts_by_uncertainty_and_lists_the_unusable(small_run, small_shards, tmp_path):
    """`fastgal predict ... --tta --report` on a folder of new cutouts: the gallery's most uncertain are exactly the
    rows with the largest sigma_tta_<t> (the views' spread: no truth to rank by), every cutout is embedded, and
    each unusable file is listed with its reason; on shards it ranks by the error, as the run's report."""
    src = small_shards.parent / "s" / "images"
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    ids = pd.read_csv(small_run / "predictions_valid.csv", dtype={"id": str}).id[:10]
    for i in ids:
        shutil.copy(src / f"{i}.jpg", imgs / f"{i}.jpg")
    (imgs / "page.jpg").write_bytes(b"<html>404 Not Found</html>")
    res = run_cli("predict", small_run, imgs, "--tta", "--report", "--out", tmp_path / "p.csv", "--json")
    summary = json.loads(res.stdout)
    page_path = Path(summary["report"])
    assert page_path == tmp_path / "p.html" and page_path.is_file()
    page = Page(page_path.read_text())
    assert page.scripts == 0 and not page.links
    df = pd.read_csv(tmp_path / "p.csv", dtype={"id": str})
    ok = df[df.status == "ok"].sort_values("sigma_tta_metallicity", ascending=False, kind="stable")
    most = page.section("most uncertain")
    ranks = [float(a["data-rank"]) for a in most]
    assert len(most) == 10 and {a["data-id"] for a in most} == set(ok.id)  # all 10 usable files, most uncertain first
    assert ranks == sorted(ranks, reverse=True)
    sigma = dict(zip(ok.id, ok.sigma_tta_metallicity))  # the CSV rounds to 5 decimals
    assert all(abs(float(a["data-rank"]) - sigma[a["data-id"]]) <= 1e-5 for a in most)
    for src_ in page.imgs:
        decoded(src_)
    assert len(page.imgs) == len(page.items)  # every gallery item shows its cutout
    text = page_path.read_text()
    assert 'data-id="page"' in text and "not-jpeg" in text  # the unusable file and its reason
    res = run_cli("predict", small_run, small_shards, "--report", "--out", tmp_path / "s.csv")
    spage = Page((tmp_path / "s.html").read_text())
    worst = spage.section("worst")
    s = pd.read_csv(tmp_path / "s.csv", dtype={"id": str})
    err = (s.pred_metallicity - s.true_metallicity).abs().sort_values(ascending=False, kind="stable")
    assert len(worst) == 12 and {a["data-id"] for a in worst} == set(s.id[err.index[:12]])  # (5-decimal CSV: no ties here)
    assert [float(a["data-rank"]) for a in worst] == sorted((float(a["data-rank"]) for a in worst), reverse=True)
