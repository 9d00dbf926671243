"""fastgal download --imaging legacy against a real HTTP server on 127.0.0.1 (pytest-httpserver) playing the DESI
Legacy Surveys' viewer, serving `fastgal synth --survey legacy`'s files as its fits-cutout would.

The fake viewer answers {viewer}/fits-cutout?ra&dec&layer&pixscale&size&bands with the galaxy's (bands, H, W)
cube (BAND0.. in the header), and plays per-galaxy scripts of faults: 503 then 200, 429 with Retry-After, a 200
carrying an HTML page, a truncated FITS, a cube without the z band, an all-zero or all-NaN band (no coverage),
a frame mostly outside the footprint, a 400 text error, a 500 that never ends; a closed port plays a connection
refused. Every request is logged, so "nothing fetched twice" and "a permanent answer is asked once" are counted.
Then the download's output goes through shard -> train (1 epoch) -> predict, as a user would run them.
"""

from __future__ import annotations

import io
import json
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from pytest_httpserver import HTTPServer
from werkzeug import Response

import fastgal.survey.download as dl
from fastgal.options import DownloadConfig

fits = pytest.importorskip("astropy.io.fits")

SIZE = 64
RETRIES = 3  # a persistent fault costs 4 requests
SCRIPTS = {  # name: (server script, expected status, expected requests, reason must match); last entry repeats
    "busy": (["503", "ok"], "ok", 2, r"^$"),
    "ratelimited": (["429", "ok"], "ok", 2, r"^$"),
    "htmlonce": (["html", "ok"], "ok", 2, r"^$"),
    "edge": (["edge"], "ok", 1, r"mostly blank: 69% of a band's pixels have no data"),
    "html": (["html"], "invalid-image", 4, r"^html-error: a text/HTML page, not FITS: .*maintenance.* \(after 4 tries\)"),
    "trunc": (["trunc"], "invalid-image", 4, r"^truncated: [\d,]+ of the [\d,]+ bytes its header promises \(after 4"),
    "noz": (["noz"], "missing-band", 1, r"^missing-band: the cube has bands g,r, not z \(ls-dr10 serves g?ri?z here\)"),
    "zeros": (["zeros"], "no-coverage", 1, r"^no-coverage: band z has no data \(every pixel 0\)"),
    "nans": (["nans"], "no-coverage", 1, r"^no-coverage: band g has no data \(every pixel NaN\)"),
    "badarg": (["400"], "failed", 1, r"^HTTP 400: Invalid pixscale"),
    "broken": (["500"], "failed", 4, r"^HTTP 500 after 4 tries"),
}
N_GOOD = 24  # plain galaxies beside the faulty ones, so the output trains


@pytest.fixture(scope="module")
def legacy_survey(tmp_path_factory):
    """`fastgal synth --survey legacy`: 35 galaxies of g, r, z cubes at 64 px, laid out as the viewer's."""
    out = tmp_path_factory.mktemp("legacy") / "s"
    run_cli("synth", out, "--n", N_GOOD + len(SCRIPTS), "--seed", 5, "--size", SIZE, "--survey", "legacy", "--quiet")
    return out


def test_legacy_twin_is_the_same_galaxies_deeper(legacy_survey, tmp_path):
    """synth --survey legacy: the SDSS-like survey's catalog, files headed like the viewer's, and a sky as much
    fainter as the depths say (noise per output pixel in flux units, where both surveys bin: s >= 0.396")."""
    from fastgal.survey.render import LEGACY, SDSS

    sdss = tmp_path / "sdss"
    run_cli("synth", sdss, "--n", N_GOOD + len(SCRIPTS), "--seed", 5, "--size", SIZE, "--format", "fits", "--quiet")
    assert (sdss / "data/master.csv").read_bytes() == (legacy_survey / "data/master.csv").read_bytes()
    cat = pd.read_csv(legacy_survey / "data/master.csv", dtype={"objID": str})
    ratios = []
    for _, r in cat.iterrows():
        with fits.open(legacy_survey / "images" / f"{r.objID}.fits") as h:
            hd, lg = h[0].header, h[0].data
        assert [hd["BAND0"], hd["BAND1"], hd["BAND2"], hd["CTYPE1"]] == ["g", "r", "z", "RA---TAN"]
        assert hd["CRVAL1"] == pytest.approx(float(r.ra), abs=1e-6) and lg.shape == (3, SIZE, SIZE)
        s = float(r.scale) * 224 / SIZE
        if s >= SDSS.native:  # white noise in both: compare the g band's border, in flux per output pixel
            sd = fits.getdata(sdss / "images" / f"{r.objID}.fits")
            mad = [np.median(np.abs(np.r_[x[0, :6].ravel(), x[0, -6:].ravel()])) for x in (lg, sd)]
            ratios.append(mad[0] * (s / LEGACY.native) ** 2 / (mad[1] * (s / SDSS.native) ** 2))
    want = LEGACY.sky["g"] / LEGACY.native / (SDSS.sky["g"] / SDSS.native)  # ~0.22: 1.8 mag deeper, sharper PSF
    assert len(ratios) >= 5 and np.median(ratios) == pytest.approx(want, rel=0.35), (np.median(ratios), want)


def cube_bytes(cube: np.ndarray, bands: str) -> bytes:
    hdu = fits.PrimaryHDU(np.asarray(cube, np.float32))
    for k, b in enumerate(bands):
        hdu.header[f"BAND{k}"] = b
    buf = io.BytesIO()
    hdu.writeto(buf)
    return buf.getvalue()


class FakeViewer:
    """The Legacy Surveys' viewer: fits-cutout answers from the survey's files, keyed by ra; faults by script."""

    def __init__(self, server: HTTPServer, survey: Path):
        self.server = server
        cat = pd.read_csv(survey / "data" / "master.csv", dtype=str)
        self.rows = cat.to_dict("records")
        names = list(SCRIPTS) + [f"good{k}" for k in range(len(self.rows) - len(SCRIPTS))]
        for r, name in zip(self.rows, names):
            r["name"] = name
        self.by_ra = {r["ra"]: r for r in self.rows}
        self.files = {r["objID"]: (survey / "images" / f"{r['objID']}.fits").read_bytes() for r in self.rows}
        self.log: list[tuple[float, str, dict]] = []
        self.lock = threading.Lock()
        server.expect_request("/viewer/fits-cutout").respond_with_handler(self.cutout)
        server.expect_request("/viewer/jpeg-cutout").respond_with_handler(self.jpeg)

    def jpeg(self, request):
        from PIL import Image

        row = self.by_ra[request.args["ra"]]
        with self.lock:
            self.log.append((time.monotonic(), "jpeg " + row["objID"], dict(request.args)))
        buf = io.BytesIO()
        rgb = np.random.default_rng(int(row["objID"]) % 2**32).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(buf, "JPEG")
        return Response(buf.getvalue(), content_type="image/jpeg")

    @property
    def url(self) -> str:
        return self.server.url_for("/viewer")

    def cutout(self, request):
        args = dict(request.args)
        row = self.by_ra[args["ra"]]
        with self.lock:
            n = sum(1 for _, o, _ in self.log if o == row["objID"])
            self.log.append((time.monotonic(), row["objID"], args))
        script = SCRIPTS.get(row["name"], (["ok"],))[0]
        kind = script[min(n, len(script) - 1)]
        data = self.files[row["objID"]]
        assert args["bands"] == "grz" and args["layer"] == "ls-dr10" and int(args["size"]) == SIZE
        if kind == "ok":
            return Response(data, content_type="image/fits")
        if kind == "503":
            return Response("Service Unavailable", status=503, content_type="text/plain")
        if kind == "429":
            return Response("slow down", status=429, headers={"Retry-After": "1"})
        if kind == "500":
            return Response("<html><body>Internal Server Error</body></html>", status=500, content_type="text/html")
        if kind == "400":
            return Response("Invalid pixscale: must be positive", status=400, content_type="text/plain")
        if kind == "html":  # an error page served with 200
            return Response("<html><body><h1>Down for maintenance</h1></body></html>", content_type="text/html")
        if kind == "trunc":  # a complete response whose FITS is cut short
            return Response(data[: len(data) // 2], content_type="image/fits")
        cube = fits.getdata(io.BytesIO(data)).astype(np.float32)
        if kind == "noz":
            return Response(cube_bytes(cube[:2], "gr"), content_type="image/fits")
        if kind == "zeros":  # z has no coverage here: the viewer leaves its pixels at 0
            cube[2] = 0
        elif kind == "nans":
            cube[0] = np.nan
        elif kind == "edge":  # 70% of the frame outside the footprint, in every band
            cube[:, :, : int(SIZE * 0.7)] = 0
        return Response(cube_bytes(cube, "grz"), content_type="image/fits")

    def requests_for(self, oid: str) -> int:
        return sum(1 for _, o, _ in self.log if o == oid)

    def catalog(self, path: Path) -> Path:
        pd.DataFrame(self.rows).drop(columns=["name"]).to_csv(path, index=False)
        return path


@pytest.fixture
def httpserver_threaded():
    server = HTTPServer(host="127.0.0.1", threaded=True)
    server.start()
    yield server
    server.clear()
    if server.is_running():
        server.stop()


def legacy_cfg(out, viewer_url, catalog, **kw) -> DownloadConfig:
    base = {"out": out, "catalog": catalog, "imaging": "legacy", "legacy_url": viewer_url, "size": SIZE, "workers": 4,
            "rate": 0, "retries": RETRIES, "timeout": 2.0, "backoff": 0.01, "backoff_max": 0.05, "quiet": True}
    return DownloadConfig(**{**base, **kw})


def read_report(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "download-report.csv", dtype=str, keep_default_na=False)


def test_every_fault_has_its_reason_and_a_rerun_resumes(httpserver_threaded, legacy_survey, tmp_path):
    viewer = FakeViewer(httpserver_threaded, legacy_survey)
    out = tmp_path / "legacy"
    res = dl.download(legacy_cfg(out, viewer.url, viewer.catalog(tmp_path / "cat.csv")))

    rep = read_report(out)
    assert len(rep) == len(viewer.rows) and list(rep.objID) == [r["objID"] for r in viewer.rows]  # exact ids, in order
    assert all(len(i) == 19 for i in rep.objID)
    for row in viewer.rows:
        status, n_req, reason = SCRIPTS.get(row["name"], (None, "ok", 1, r"^$"))[1:]
        got = rep[rep.objID == row["objID"]].iloc[0]
        assert got.status == status, (row["name"], got.to_dict())
        assert re.search(reason, got.reason), (row["name"], got.reason)
        assert viewer.requests_for(row["objID"]) == n_req, row["name"]
        f = out / "images" / f"{row['objID']}.fits"
        if status == "ok":  # the server's exact bytes, read in full
            if row["name"] != "edge":
                assert f.read_bytes() == viewer.files[row["objID"]]
        else:
            assert not f.exists()  # never a silent zero image
    assert res.counts["ok"] == N_GOOD + 4 and res.counts["no-coverage"] == 2 and res.counts["missing-band"] == 1
    assert res.flagged_black == 1 and not list((out / "images").glob("*.part"))
    # the pixscale follows the frame rule: 2 x petroR90_r / 0.396 arcsec over SIZE pixels
    r0 = viewer.rows[-1]
    asked = next(a for _, o, a in viewer.log if o == r0["objID"])
    assert float(asked["pixscale"]) == pytest.approx(2 / 0.396 * float(r0["petroR90_r"]) / SIZE, rel=1e-4)
    t = [ts for ts, o, _ in viewer.log if o == next(r["objID"] for r in viewer.rows if r["name"] == "ratelimited")]
    assert t[1] - t[0] >= 0.95  # Retry-After: 1 respected
    meta = json.loads((out / "download.json").read_text())
    assert meta["cutouts"]["layer"] == "ls-dr10" and meta["counts"] == res.counts

    # a re-run: complete files are not fetched again, permanent answers are not asked again, faults are retried
    before = {r["objID"]: viewer.requests_for(r["objID"]) for r in viewer.rows}
    res2 = dl.download(legacy_cfg(out, viewer.url, tmp_path / "cat.csv"))
    rep2 = read_report(out)
    for row in viewer.rows:
        asked_again = viewer.requests_for(row["objID"]) - before[row["objID"]]
        status = SCRIPTS.get(row["name"], (None, "ok"))[1]
        if status == "ok":
            assert rep2[rep2.objID == row["objID"]].status.item() == "skipped-existing" and asked_again == 0
        elif status in ("no-coverage", "missing-band"):
            assert asked_again == 0 and "not asked again" in rep2[rep2.objID == row["objID"]].reason.item()
        else:
            assert asked_again >= 1, row["name"]
    assert res2.counts["skipped-existing"] == res.counts["ok"]
    # another layer, or SkyServer's JPEGs, into the same OUT: refused before any request
    n = len(viewer.log)
    for other in ({"layer": "ls-dr9"}, {"imaging": "skyserver", "size": 224}):
        with pytest.raises(ValueError, match=r"holds cutouts of imaging legacy.*choose another OUT"):
            dl.download(legacy_cfg(out, viewer.url, tmp_path / "cat.csv", **other))
    assert len(viewer.log) == n


def test_connection_refused_stops_at_once(legacy_survey, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cat = tmp_path / "cat.csv"
    pd.read_csv(legacy_survey / "data" / "master.csv", dtype=str).head(6).to_csv(cat, index=False)
    out = tmp_path / "refused"
    res = run_cli("download", out, "--catalog", cat, "--imaging", "legacy", "--legacy-url",
                  f"http://127.0.0.1:{port}/viewer", "--size", SIZE, "--rate", 0, "--quiet", ok=False)
    assert res.exit_code != 0
    assert re.search(rf"cannot reach http://127.0.0.1:{port}/viewer \(connection refused\); check the network, "
                     r"or --legacy-url", res.output), res.output
    rep = read_report(out)
    assert len(rep) == 6 and set(rep.status) <= {"failed", "interrupted"}
    assert (rep.status == "failed").sum() >= 1 and rep.reason.str.contains("connection refused").all()


def test_jpeg_beside_the_fits(httpserver_threaded, legacy_survey, tmp_path):
    """--jpeg: each galaxy's jpeg-cutout of the same frame into OUT/jpeg, checked; images/ keeps only the FITS."""
    viewer = FakeViewer(httpserver_threaded, legacy_survey)
    cat = tmp_path / "cat.csv"
    pd.DataFrame(viewer.rows[-4:]).drop(columns=["name"]).to_csv(cat, index=False)  # four plain galaxies
    out = tmp_path / "legacy"
    res = dl.download(legacy_cfg(out, viewer.url, cat, jpeg=True))
    assert res.counts["ok"] == 4
    jpgs = sorted(p.stem for p in (out / "jpeg").glob("*.jpg"))
    assert jpgs == sorted(r["objID"] for r in viewer.rows[-4:]) and not list((out / "images").glob("*.jpg"))
    fits_args = {o: a for _, o, a in viewer.log if not o.startswith("jpeg")}
    for _, o, a in viewer.log:
        if o.startswith("jpeg"):
            assert a == fits_args[o.split()[1]]  # the same frame
    dl.download(legacy_cfg(out, viewer.url, cat, jpeg=True))  # a re-run fetches nothing
    assert len(viewer.log) == 8


def test_the_sample_query_then_legacy_cutouts(httpserver_threaded, legacy_survey, tmp_path):
    """The SkyServer catalog route (the reference SQL, exact 19-digit ids), then the viewer's cutouts for those
    galaxies; a galaxy without petroR90_r gets the native 0.262"/px, and says so."""
    from test_download import FakeSkyServer

    sky = FakeSkyServer(httpserver_threaded, ["good1", "good2", "good3"])
    served = (legacy_survey / "images" / min(p.name for p in (legacy_survey / "images").iterdir())).read_bytes()
    asked = []

    def viewer(request):
        asked.append(dict(request.args))
        return Response(served, content_type="image/fits")

    httpserver_threaded.expect_request("/viewer/fits-cutout").respond_with_handler(viewer)
    out = tmp_path / "legacy"
    res = dl.download(legacy_cfg(out, httpserver_threaded.url_for("/viewer"), None, base_url=sky.base_url))
    assert res.counts["ok"] == 3 and len(sky.sql_seen) == 1
    master = pd.read_csv(out / "data" / "master.csv", dtype=str)
    assert list(master.objID) == [r["objID"] for r in sky.rows]  # the query's ids, exactly
    assert sorted(a["ra"] for a in asked) == sorted(r["ra"] for r in sky.rows)
    by_ra = {a["ra"]: float(a["pixscale"]) for a in asked}
    assert by_ra[sky.rows[1]["ra"]] == 0.262  # no petroR90_r: the native pixel
    assert by_ra[sky.rows[0]["ra"]] == pytest.approx(2 / 0.396 * float(sky.rows[0]["petroR90_r"]) / SIZE, rel=1e-4)
    assert res.notes == ['1 galaxies have no usable petroR90_r; their cutouts use 0.262"/pixel']


@pytest.mark.parametrize("args, message", [
    (["--size", 600], r"--size must be 64..512 pixels with --imaging legacy"),
    (["--layer", "ls-dr8"], r"--layer 'ls-dr8' is not a Legacy Surveys imaging layer"),
    (["--layer", "ls-dr9", "--bands", "griz"], r"--bands 'griz': ls-dr9 serves grz"),
])
def test_refuses_what_the_viewer_cannot_serve(tmp_path, args, message):
    cat = tmp_path / "cat.csv"
    cat.write_text("objID,ra,dec\n1237648720693755918,150.1,2.2\n")
    res = run_cli("download", tmp_path / "o", "--catalog", cat, "--imaging", "legacy", *args, ok=False)
    assert res.exit_code != 0 and re.search(message, res.output), res.output


@pytest.mark.slow
def test_download_shard_train_predict(httpserver_threaded, legacy_survey, tmp_path):
    """What a user runs: download --imaging legacy, then shard --bands g,r,z, train, predict on its output."""
    viewer = FakeViewer(httpserver_threaded, legacy_survey)
    out = tmp_path / "legacy"
    run_cli("download", out, "--catalog", viewer.catalog(tmp_path / "cat.csv"), "--imaging", "legacy",
            "--legacy-url", viewer.url, "--size", SIZE, "--rate", 0, "--retries", RETRIES, "--timeout", 2, "--backoff", 0.01, "--quiet")
    sh = tmp_path / "sh"
    run_cli("shard", out / "data" / "master.csv", out / "images", sh, "--bands", "g,r,z", "--crop", 48,
            "--target", "metallicity", "--quiet")
    man = json.loads((sh / "manifest.json").read_text())
    rejects = pd.read_csv(sh / "rejects.csv", dtype=str)
    assert man["image"]["bands"] == ["g", "r", "z"] and len(rejects) == len(SCRIPTS) - 4  # no file: rejected
    assert man["counts"]["train"] + man["counts"]["valid"] == N_GOOD + 4
    run = tmp_path / "run"
    run_cli("train", sh, "--out", run, "--epochs", 1, "--bs", 8, "--arch", "xresnet18", "--workers", 1, "--quiet")
    pred = tmp_path / "pred.csv"
    run_cli("predict", run, sh, "--out", pred)
    p = pd.read_csv(pred, dtype={"id": str})
    assert len(p) == man["counts"]["valid"] and np.isfinite(p["pred_metallicity"]).all()
    assert set(p["id"]) <= {r["objID"] for r in viewer.rows}
