"""fastgal download against a real HTTP server on 127.0.0.1 (pytest-httpserver) playing SkyServer.

The fake SkyServer answers as the real one does (sciserver/SkyServerWS): SqlSearch with `#Table1`
CSV (19-digit ids), a SQL error as HTTP 500 + JSON {ErrorCode, ErrorType, ErrorMessage, LogMessageID},
a limit refusal as HTTP 200 + a CSV whose only column is `error_message`; ImgCutout/getjpeg clamps
scale to 0.015-60"/px and plays per-galaxy scripts of faults: 503 then 200, 429 with Retry-After, a
reply slower than the timeout, 404 with a JPEG body (outside the footprint), 200 with HTML, a
truncated JPEG, dropped connections, 400 JSON. Every request is logged, so "nothing downloaded
twice" and "a bad query is sent once" are counted.
"""

from __future__ import annotations

import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from PIL import Image
from pytest_httpserver import HTTPServer
from werkzeug import Response

import fastgal.survey.download as dl
import fastgal.survey.skyserver as sky_client
from fastgal.options import DownloadConfig
from fastgal.survey.synth import make_catalog

SQL_PATH = "/dr17/SkyServerWS/SearchTools/SqlSearch"
JPEG_PATH = "/dr17/SkyServerWS/ImgCutout/getjpeg"
# ids above 2**53 whose float64 round trip changes them: they must arrive exactly
BASE_ID = 1237648720693755918
ORIGINAL_SPAN = 2 / 0.396  # Wu & Boada's download_images.py: scale = 2 * petroR90_r / 0.396 / width


def sql_error(message: str) -> Response:
    """SqlSearch's answer to a bad query (and to its own 600 s timeout): HTTP 500 and a JSON body."""
    body = {"ErrorCode": 500, "ErrorType": "InternalServerError", "ErrorMessage": message, "LogMessageID": "1234"}
    return Response(json.dumps(body), status=500, content_type="application/json")


def limit_error(message: str) -> Response:
    """A refusal that comes back as HTTP 200: CSV with the single column error_message."""
    return Response(f"#Table1\nerror_message\n{message}\n", content_type="text/plain")


def jpeg(seed: int, size: int = 224, black: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(20, 230, (size, size, 3), dtype=np.uint8)
    if black:
        arr[:, : int(size * 0.7)] = 0  # a frame at the edge of the imaging
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def drop_connection(request) -> Response:
    """Close the socket under the request: the client sees a reset / remote disconnect."""
    sock = request.environ["werkzeug.socket"]
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    return Response("", status=500)


# each fault is one server reply; a galaxy's script is played in order, its last entry repeats
def reply(kind: str, oid: int, size: int = 224):
    ok = jpeg(oid % 2**32, size)
    if kind == "ok":
        return Response(ok, content_type="image/jpeg")
    if kind == "black":
        return Response(jpeg(oid % 2**32, size, black=True), content_type="image/jpeg")
    if kind == "503":
        return Response(b"busy", status=503, content_type="text/plain")
    if kind == "500":  # SkyServer's internal errors carry a JPEG body
        return Response(jpeg(1), status=500, content_type="image/jpeg")
    if kind == "429":
        return Response(b"slow down", status=429, headers={"Retry-After": "1"})
    if kind == "404":  # out of footprint: a picture of an error message, status 404
        return Response(jpeg(2), status=404, content_type="image/jpeg")
    if kind == "400":
        return Response(json.dumps({"Message": "scale must be positive"}), status=400, content_type="application/json")
    if kind == "html":
        return Response("<html><body>Service maintenance</body></html>", content_type="text/html")
    if kind == "trunc":
        return Response(ok[: len(ok) // 2], content_type="image/jpeg")
    if kind == "small":  # the server clamped the size
        return Response(jpeg(oid % 2**32, size=100), content_type="image/jpeg")
    if kind == "cutbody":  # headers promise more bytes than arrive, then the connection closes
        return Response(ok[:500], content_type="image/jpeg",
                        headers={"Content-Length": str(len(ok)), "Connection": "close"})
    raise AssertionError(kind)


SCRIPTS = {  # name: (server script, expected status, expected requests, reason must match)
    "good1": (["ok"], "ok", 1, r"^$"),
    "good2": (["ok"], "ok", 1, r"^$"),
    "good3": (["ok"], "ok", 1, r"^$"),
    "busy": (["503", "ok"], "ok", 2, r"^$"),
    "ratelimited": (["429", "ok"], "ok", 2, r"^$"),
    "slow": (["slow", "ok"], "ok", 2, r"^$"),
    "dropped": (["drop", "ok"], "ok", 2, r"^$"),
    "cutbody": (["cutbody", "ok"], "ok", 2, r"^$"),
    "htmlonce": (["html", "ok"], "ok", 2, r"^$"),
    "black": (["black"], "ok", 1, r"mostly black"),
    "offsky": (["404"], "not-found", 1, r"404"),
    "badarg": (["400"], "failed", 1, r"400 .*scale must be positive"),
    "broken": (["500"], "failed", 4, r"HTTP 500 after 4 tries"),
    "html": (["html"], "invalid-image", 4, r"text/html"),
    "alwaysslow": (["slow"], "failed", 4, r"timed out after 4 tries"),
    "alwaysdropped": (["drop"], "failed", 4, r"connection dropped after 4 tries"),
    "trunc": (["trunc"], "invalid-image", 4, r"corrupt-image: truncated JPEG"),
    "small": (["small"], "invalid-image", 4, r"wrong-size: 100x100 px, expected 224x224"),
}
RETRIES = 3  # so a persistent fault costs 4 requests


class FakeSkyServer:
    """Cutouts keyed by ra (unique per galaxy); the SQL answer is the catalog as #Table1 CSV."""

    def __init__(self, server: HTTPServer, names: list[str], scripts=SCRIPTS):
        self.server, self.scripts = server, scripts
        self.rows = []
        for k, name in enumerate(names):
            oid = BASE_ID + 7919 * k
            self.rows.append({"objID": str(oid), "specObjID": str(299489677444933632 + 1000 * k),
                              "ra": f"{150 + 0.01 * k:.6f}", "dec": f"{2 + 0.01 * k:.6f}",
                              "petroR90_r": "" if k == 1 else f"{5.6 + 0.1 * k:.4f}",
                              "metallicity": f"{8.6 + 0.01 * k:.3f}", "name": name})
        self.by_ra = {r["ra"]: r for r in self.rows}
        self.log: list[tuple[float, str, dict]] = []  # (time, objID or 'sql', args)
        self.sql_seen: list[str] = []
        self.sql_reply = None  # a callable(cmd) -> Response (None: the catalog), to override the catalog
        self.lock = threading.Lock()
        server.expect_request(SQL_PATH).respond_with_handler(self.sql)
        server.expect_request(JPEG_PATH).respond_with_handler(self.cutout)

    @property
    def base_url(self) -> str:
        return self.server.url_for("/").rstrip("/")

    def sql(self, request):
        cmd = request.args["cmd"]
        assert request.args.get("format") == "csv"
        with self.lock:
            self.sql_seen.append(cmd)
            self.log.append((time.monotonic(), "sql", dict(request.args)))
        if self.sql_reply and (resp := self.sql_reply(cmd)) is not None:
            return resp
        cols = ["objID", "specObjID", "ra", "dec", "petroR90_r", "metallicity"]
        body = "#Table1\n" + ",".join(cols) + "\n" + "".join(",".join(r[c] for c in cols) + "\n" for r in self.rows)
        return Response(body, content_type="text/plain")

    def cutout(self, request):
        row = self.by_ra[request.args["ra"]]
        args = dict(request.args)
        args["served_scale"] = min(max(float(args["scale"]), 0.015), 60.0)  # getjpeg clamps, silently
        with self.lock:
            n = sum(1 for _, o, _ in self.log if o == row["objID"])
            self.log.append((time.monotonic(), row["objID"], args))
        script = self.scripts[row["name"]][0]
        kind = script[min(n, len(script) - 1)]
        if kind == "slow":
            time.sleep(0.8)  # past the client's 0.3 s timeout
            kind = "ok"
        if kind == "drop":
            return drop_connection(request)
        return reply(kind, int(row["objID"]), min(max(int(args["width"]), 64), 2048))

    def requests_for(self, oid: str) -> int:
        return sum(1 for _, o, _ in self.log if o == oid)

    def cutout_requests(self) -> int:
        return sum(1 for _, o, _ in self.log if o != "sql")

    def catalog_csv(self, path: Path, with_r90: bool = True) -> Path:
        cols = ["objID", "ra", "dec"] + (["petroR90_r"] if with_r90 else []) + ["metallicity"]
        pd.DataFrame(self.rows)[cols].to_csv(path, index=False)
        return path


@pytest.fixture
def httpserver_threaded():
    server = HTTPServer(host="127.0.0.1", threaded=True)  # a slow reply must not block the others
    server.start()
    yield server
    server.clear()
    if server.is_running():
        server.stop()


def fast_cfg(out, sky, **kw) -> DownloadConfig:
    base = dict(out=out, base_url=sky.base_url, workers=4, rate=0, retries=RETRIES, timeout=0.3,
                backoff=0.01, backoff_max=0.05, quiet=True)
    return DownloadConfig(**{**base, **kw})


def read_report(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "download-report.csv", dtype=str, keep_default_na=False)


def test_faults_statuses_and_resume(httpserver_threaded, tmp_path):
    names = list(SCRIPTS)
    sky = FakeSkyServer(httpserver_threaded, names)
    out = tmp_path / "sdss"
    res = dl.download(fast_cfg(out, sky))

    rep = read_report(out)
    assert len(rep) == len(names) and sorted(rep.objID) == sorted(r["objID"] for r in sky.rows)
    assert sum(res.counts.values()) == len(names) and not res.interrupted
    for row in sky.rows:
        _, status, n_req, reason = SCRIPTS[row["name"]]
        got = rep[rep.objID == row["objID"]].iloc[0]
        assert got.status == status, (row["name"], got.to_dict())
        assert re.search(reason, got.reason), (row["name"], got.reason)
        assert sky.requests_for(row["objID"]) == n_req, row["name"]
        img = out / "images" / f"{row['objID']}.jpg"
        if status == "ok":  # arrived whole and valid: the server's exact bytes, fully decodable
            expect = jpeg(int(row["objID"]) % 2**32, black=row["name"] == "black")
            assert img.read_bytes() == expect
            with Image.open(img) as im:
                im.load()
                assert im.size == (224, 224)
        else:
            assert not img.exists()
    assert res.flagged_black == 1
    assert res.notes == ['1 galaxies have no usable petroR90_r; their cutouts use 0.396"/pixel']
    assert not list((out / "images").glob("*.part"))
    # Retry-After: 1 was respected
    t = [ts for ts, o, _ in sky.log if o == next(r["objID"] for r in sky.rows if r["name"] == "ratelimited")]
    assert t[1] - t[0] >= 0.95
    # master.csv keeps the 19-digit ids exactly (compare text, not numbers)
    lines = (out / "data" / "master.csv").read_text().splitlines()
    assert lines[0].split(",")[:2] == ["objID", "specObjID"]
    assert [ln.split(",")[0] for ln in lines[1:]] == [r["objID"] for r in sky.rows]
    assert [ln.split(",")[1] for ln in lines[1:]] == [r["specObjID"] for r in sky.rows]
    meta = json.loads((out / "download.json").read_text())
    assert meta["counts"] == res.counts and meta["n"] == len(names)

    # the re-run asks for nothing it already has: no new query, no ok image fetched again,
    # not-found carried over; only failed / invalid-image galaxies are asked again
    before = {r["objID"]: sky.requests_for(r["objID"]) for r in sky.rows}
    n_sql = len(sky.sql_seen)
    res2 = dl.download(fast_cfg(out, sky))
    assert len(sky.sql_seen) == n_sql
    rep2 = read_report(out)
    assert len(rep2) == len(names)
    for row in sky.rows:
        status = SCRIPTS[row["name"]][1]
        again = sky.requests_for(row["objID"]) - before[row["objID"]]
        got = rep2[rep2.objID == row["objID"]].iloc[0].status
        if status == "ok":
            assert (again, got) == (0, "skipped-existing"), row["name"]
        elif status == "not-found":
            assert (again, got) == (0, "not-found")
        else:
            assert again >= 1 and got == status
    assert res2.counts["skipped-existing"] == res.counts["ok"]


def test_rate_limit_is_global(httpserver_threaded, tmp_path, monkeypatch):
    """4 threads, yet 10 requests/s: every request takes a token from one bucket, the tokens are 1/rate apart
    and each request waits for its token. Checked on the limiter's own schedule (token times), which a loaded
    machine cannot squeeze the way it can the moments requests reach the server."""
    names = [f"good{i % 3 + 1}" for i in range(8)]
    sky = FakeSkyServer(httpserver_threaded, names)
    tokens = []  # (limiter, thread, token time, when acquire returned)
    acquire, entered, two = sky_client.RateLimiter.acquire, set(), threading.Event()

    def recorded(self):
        entered.add(threading.get_ident())
        if len(entered) > 1:
            two.set()
        two.wait(60)  # the first request waits for a second thread's: the bucket is surely shared by threads
        t = acquire(self)
        tokens.append((id(self), threading.get_ident(), t, time.monotonic()))
        return t

    monkeypatch.setattr(sky_client.RateLimiter, "acquire", recorded)
    res = dl.download(fast_cfg(tmp_path / "o", sky, rate=10, workers=4))
    assert res.counts["ok"] == 8 and len(tokens) == sky.cutout_requests() == 8  # a token per request
    assert len({lim for lim, _, _, _ in tokens}) == 1 and len({th for _, th, _, _ in tokens}) > 1
    slots = sorted(t for _, _, t, _ in tokens)
    assert np.diff(slots).min() >= 0.1 - 1e-9 and slots[-1] - slots[0] >= 0.7 - 1e-9  # 7 gaps of 1/rate
    assert all(back >= t - 1e-6 for _, _, t, back in tokens)  # nobody went before its token


def test_framing_follows_the_original_rule_and_reports_clamps(httpserver_threaded, tmp_path):
    sky = FakeSkyServer(httpserver_threaded, ["good1", "good2", "good3", "good1"])
    sky.rows[3]["petroR90_r"] = "0.5000"  # tiny: 5.05 x 0.5" over 224 px is below getjpeg's 0.015"/px
    cat = sky.catalog_csv(tmp_path / "cat.csv")

    def scales(out, size, span):
        """Check every request against the rule; {objID: reason} from the report."""
        args = {o: a for _, o, a in sky.log if o != "sql"}
        rep = read_report(out).set_index("objID")
        assert set(rep.status) == {"ok"}
        reasons = rep.reason
        for r in sky.rows:
            a = args[r["objID"]]
            assert a["width"] == a["height"] == str(size) and (a["ra"], a["dec"]) == (r["ra"], r["dec"])
            want = span * float(r["petroR90_r"]) / size if r["petroR90_r"] else 0.396  # no petroR90_r: fixed
            assert float(a["scale"]) == a["served_scale"]  # fastgal asks only for what getjpeg serves
            assert float(a["scale"]) == pytest.approx(max(want, 0.015), rel=1e-5)
            assert ("scale clamped" in reasons[r["objID"]]) == (want < 0.015)
        return reasons

    out = tmp_path / "o"
    res = run_cli("download", out, "--catalog", cat, "--base-url", sky.base_url, "--rate", 0, "--json")
    reasons = scales(out, 224, ORIGINAL_SPAN)  # the default: the original study's frame
    tiny = sky.rows[3]["objID"]
    assert re.fullmatch(r"scale clamped to getjpeg's minimum 0.015\"/px \(the frame rule asks 0.0113\"/px\), "
                        r"so the frame spans 3.36\" instead of 2.53\"", reasons[tiny]), reasons[tiny]
    assert any("1 galaxies' scale is outside getjpeg's" in n for n in json.loads(res.output)["notes"])
    framing = json.loads((out / "download.json").read_text())["framing"]
    assert (framing["frame"], framing["clamped"], framing["no_petroR90_r"]) == ("original", 1, 1)
    assert framing["frame_r90"] == pytest.approx(ORIGINAL_SPAN)

    # --frame 4r90 keeps fastgal's earlier rule; at 128 px the tiny galaxy's scale is in range
    sky.log.clear()
    run_cli("download", tmp_path / "p", "--catalog", cat, "--base-url", sky.base_url, "--rate", 0, "--quiet",
            "--frame", "4r90", "--size", 128)
    scales(tmp_path / "p", 128, 4.0)
    # --scale fixes it, within getjpeg's range
    sky.log.clear()
    res = dl.download(fast_cfg(tmp_path / "q", sky, scale=0.25, size=128))
    assert {a["scale"] for _, o, a in sky.log if o != "sql"} == {"0.25"} and res.counts["ok"] == 4
    res = run_cli("download", tmp_path / "r", "--catalog", cat, "--scale", 0.01, ok=False)
    assert res.exit_code == 1 and "0.015..60 arcsec/pixel" in res.output


def test_synth_frames_like_the_download_default(tmp_path):
    cat = make_catalog(2000, 3)
    want = ORIGINAL_SPAN * cat["petroR90_r"] / 224
    assert np.allclose(cat["scale"], np.clip(want, 0.05, 1.5), rtol=1e-12)
    assert ((want > 0.05) & (want < 1.5)).mean() > 0.95  # the rule, not synth's clip, frames the galaxies
    run_cli("synth", tmp_path / "s", "--n", 4, "--quiet")
    framing = json.loads((tmp_path / "s" / "synth.json").read_text())["framing"]
    assert framing["frame"] == "original" and framing["frame_r90"] == pytest.approx(ORIGINAL_SPAN)


def test_interrupt_leaves_consistent_state_and_resumes(httpserver_threaded, tmp_path, monkeypatch):
    names = [f"good{i % 3 + 1}" for i in range(12)]
    sky = FakeSkyServer(httpserver_threaded, names)
    out = tmp_path / "o"
    (out / "images").mkdir(parents=True)
    # debris of an earlier crash: a partial download and an image cut short
    oid0, oid1 = sky.rows[0]["objID"], sky.rows[1]["objID"]
    (out / "images" / f"{oid0}.jpg.part").write_bytes(b"\xff\xd8junk")
    (out / "images" / f"{oid1}.jpg").write_bytes(jpeg(3)[:1000])

    real_check, calls = dl.inspect_jpeg, []

    def check_then_ctrl_c(data, size):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # as if Ctrl-C landed mid-run
        return real_check(data, size)

    monkeypatch.setattr(dl, "inspect_jpeg", check_then_ctrl_c)
    res = dl.download(fast_cfg(out, sky, workers=2, rate=20))
    monkeypatch.setattr(dl, "inspect_jpeg", real_check)
    assert res.interrupted
    rep = read_report(out)
    assert len(rep) == 12 and sum(res.counts.values()) == 12
    assert 0 < res.counts["interrupted"] < 12 and res.counts["ok"] >= 1
    assert not list((out / "images").glob("*.part"))
    done = set(rep.objID[rep.status == "ok"])
    on_disk = {p.stem for p in (out / "images").glob("*.jpg")}
    assert done <= on_disk and on_disk - done <= {oid1}  # only the planted broken file is extra
    for oid in done:
        assert real_check((out / "images" / f"{oid}.jpg").read_bytes(), 224)[0] is None

    fetched = {o: sky.requests_for(o) for o in done}
    res2 = dl.download(fast_cfg(out, sky, workers=2))
    rep2 = read_report(out)
    assert set(rep2.status) <= {"ok", "skipped-existing"} and len(rep2) == 12
    assert set(rep2.objID[rep2.status == "skipped-existing"]) == done
    assert all(sky.requests_for(o) == fetched[o] for o in done)  # nothing downloaded twice
    assert res2.counts["ok"] == 12 - len(done)
    assert real_check((out / "images" / f"{oid1}.jpg").read_bytes(), 224)[0] is None  # re-fetched whole
    reasons = pd.concat([rep, rep2]).set_index("objID").reason[oid1].tolist()  # fetched in run 1 or run 2
    assert any("replaced an unusable earlier file (corrupt-image: truncated JPEG" in r for r in reasons), reasons


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_in_a_real_process(httpserver_threaded, tmp_path, sig, status):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's time limit, kill) to `python -m fastgal download`: exit 130 or
    143, a full report, no .part; then resume."""
    names = [f"good{i % 3 + 1}" for i in range(30)]
    sky = FakeSkyServer(httpserver_threaded, names)
    slow, release = sky.cutout, threading.Event()

    def slow_cutout(request):
        # after 6 cutouts the server holds every request until the test has sent SIGINT, so the download
        # cannot finish first however late a loaded machine schedules this process
        if sky.cutout_requests() >= 6:
            release.wait(30)
        time.sleep(0.1)
        return slow(request)

    httpserver_threaded.clear()
    httpserver_threaded.expect_request(SQL_PATH).respond_with_handler(sky.sql)
    httpserver_threaded.expect_request(JPEG_PATH).respond_with_handler(slow_cutout)
    out = tmp_path / "o"
    cat = sky.catalog_csv(tmp_path / "cat.csv")
    cmd = [sys.executable, "-m", "fastgal", "download", str(out), "--catalog", str(cat), "--base-url", sky.base_url,
           "--workers", "2", "--rate", "0", "--timeout", "5", "--quiet"]
    # SIGINT's default handler in the child even when this suite runs in a background job, whose children
    # inherit SIGINT ignored (POSIX: a non-interactive shell's `cmd &`), and Python then keeps it ignored
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while sky.cutout_requests() < 6 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.02)
    assert sky.cutout_requests() >= 6, "the download made no progress in 60 s"
    p.send_signal(sig)
    time.sleep(0.5)  # the signal lands while requests are held, then they finish (or are abandoned)
    release.set()
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == status, (stdout, stderr)
    rep = read_report(out)
    assert len(rep) == 30 and set(rep.status) <= {"ok", "interrupted"}
    assert 0 < (rep.status == "interrupted").sum() < 30
    assert not list((out / "images").glob("*.part"))
    done = set(rep.objID[rep.status == "ok"])
    assert {p.stem for p in (out / "images").glob("*.jpg")} == done
    assert "interrupted" in stdout and "re-run" in stdout
    n_before = sky.cutout_requests()
    res = run_cli("download", out, "--catalog", cat, "--base-url", sky.base_url, "--rate", "0", "--quiet", "--json")
    info = json.loads(res.output)["counts"]
    assert info["skipped-existing"] == len(done) and info["ok"] == 30 - len(done) and sum(info.values()) == 30
    assert sky.cutout_requests() - n_before == 30 - len(done)


def test_cli_main_path_feeds_shard(httpserver_threaded, tmp_path):
    names = ["good1", "good2", "good3", "offsky", "black", "good1"]
    sky = FakeSkyServer(httpserver_threaded, names)
    out = tmp_path / "sdss"
    res = run_cli("download", out, "--base-url", sky.base_url, "--rate", "0", "--retries", 1, "--backoff", 0.01,
                  "--timeout", 2, "--quiet")
    # the default query reached the server as one line, comments stripped, with the sample's cuts
    (cmd,) = sky.sql_seen
    assert "\n" not in cmd and "--" not in cmd and cmd.startswith("SELECT")
    for piece in ["oh_p50 AS metallicity", "s.rChi2 < 2", "s.z > 0.02", "e.oh_p50 != -9999", "e.lgm_tot_p50 > 0",
                  "GalSpecIndx", "i.reliable FROM"]:
        assert piece in cmd
    assert "reliable =" not in cmd  # documented as an optional cut, off by default
    m = re.search(r"cutouts: (.*) = (\d+) of (\d+)", res.output)
    counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) ([a-z-]+)", m.group(1)))
    assert counts == {"ok": 5, "not-found": 1, "failed": 0} and int(m.group(2)) == int(m.group(3)) == 6
    assert "1 flagged mostly-black" in res.output
    cat = pd.read_csv(out / "data" / "master.csv", dtype={"objID": "int64"})
    assert [str(i) for i in cat.objID] == [r["objID"] for r in sky.rows]
    assert "metallicity" in cat.columns

    # the output is what `fastgal shard` reads: CATALOG=OUT/data/master.csv IMAGES=OUT/images
    sh = tmp_path / "shards"
    run_cli("shard", out / "data" / "master.csv", out / "images", sh, "--quiet")
    manifest = json.loads((sh / "manifest.json").read_text())
    rejects = pd.read_csv(sh / "rejects.csv", dtype=str)
    # the only reject is the galaxy SkyServer had no image for; every downloaded cutout is a sample
    assert rejects["id"].tolist() == [next(r["objID"] for r in sky.rows if r["name"] == "offsky")]
    c = manifest["counts"]
    assert c["catalog_rows"] == 6 and c["train"] + c["valid"] == 5 and c["rejected"] == 1


def one_line_error(res) -> str:
    (line,) = res.output.strip().splitlines()
    assert res.exit_code == 1 and line.startswith("Error: ")
    return line


def test_sql_errors_are_asked_once_and_shown_in_one_line(httpserver_threaded, tmp_path):
    sky = FakeSkyServer(httpserver_threaded, ["good1", "good2"])
    cli_args = ["download", tmp_path / "a", "--base-url", sky.base_url, "--backoff", 0.01]  # default --retries 5
    sky.sql_reply = lambda cmd: sql_error("Incorrect syntax near 'SELEC'.\r\nStatement(s) could not be prepared.")
    for extra in ([], ["--limit", 5]):  # as sent, and wrapped to apply --limit
        sky.sql_seen.clear()
        line = one_line_error(run_cli(*cli_args, *extra, ok=False))
        assert len(sky.sql_seen) == 1  # it would fail again: not retried
        assert "Incorrect syntax near 'SELEC'. Statement(s) could not be prepared." in line
        assert "the query in metallicity_sample.sql" in line and "[SQL: SELECT g.objID, s.specObjID" in line

    # a limit refusal with status 200: one CSV column, error_message
    sky.sql_seen.clear()
    sky.sql_reply = lambda cmd: limit_error("Query rate limit exceeded: at most 60 queries per minute")
    line = one_line_error(run_cli(*cli_args, ok=False))
    assert "SkyServer refused the query in metallicity_sample.sql: Query rate limit exceeded" in line
    assert len(sky.sql_seen) == 1 and "objID" not in line.split("[SQL")[0]

    # transient answers are retried: a 503, then a 429 that says when to come back, then the table
    sky.sql_seen.clear()
    answers = iter([Response("busy", status=503), Response("slow down", status=429, headers={"Retry-After": "0"})])
    sky.sql_reply = lambda cmd: next(answers, None)
    run_cli("download", tmp_path / "b", "--base-url", sky.base_url, "--backoff", 0.01, "--rate", 0, "--quiet")
    assert len(sky.sql_seen) == 3
    # a 429 without Retry-After is an answer, not a pause
    sky.sql_seen.clear()
    sky.sql_reply = lambda cmd: Response("too many", status=429)
    assert "HTTP 429" in one_line_error(run_cli(*cli_args, ok=False)) and len(sky.sql_seen) == 1


def test_query_timeout_exceeds_the_servers_and_is_an_option(httpserver_threaded, tmp_path):
    assert DownloadConfig().query_timeout > 600  # SqlSearch's own limit: let the server say a query is too slow
    sky = FakeSkyServer(httpserver_threaded, ["good1"])
    sky.sql_reply = lambda cmd: time.sleep(1.0)  # then the catalog, too late
    line = one_line_error(run_cli("download", tmp_path / "a", "--base-url", sky.base_url, "--query-timeout", 0.3,
                                  ok=False))
    assert "no answer to the query in metallicity_sample.sql within --query-timeout 0.3 s" in line
    assert len(sky.sql_seen) == 1  # a timed-out query is not sent again


def test_catalog_errors(httpserver_threaded, tmp_path):
    sky = FakeSkyServer(httpserver_threaded, ["good1", "good2"])
    # a user catalog with an id that went through a float names the line and the fix
    bad = tmp_path / "bad.csv"
    bad.write_text("objID,ra,dec,metallicity\n1237648720693755918,150.0,2.0,8.9\n1.23764872069376e+18,150.1,2.1,8.8\n")
    res = run_cli("download", tmp_path / "b", "--catalog", bad, "--base-url", sky.base_url, ok=False)
    assert res.exit_code == 1 and f"{bad} line 3" in res.output and "dtype=str" in res.output
    dup = tmp_path / "dup.csv"
    dup.write_text("objID,ra,dec\n1237648720693755918,150.0,2.0\n1237648720693755918,150.1,2.1\n")
    res = run_cli("download", tmp_path / "b", "--catalog", dup, "--base-url", sky.base_url, ok=False)
    assert f"{dup} line 3" in res.output and "repeats" in res.output
    nodec = tmp_path / "nodec.csv"
    nodec.write_text("objID,ra\n1237648720693755918,150.0\n")
    res = run_cli("download", tmp_path / "b", "--catalog", nodec, "--base-url", sky.base_url, ok=False)
    assert "no dec column" in res.output
    res = run_cli("download", tmp_path / "b", "--catalog", dup, "--sql", dup, ok=False)
    assert "not both" in res.output
    res = run_cli("download", tmp_path / "b", "--scale", "-1", ok=False)
    assert res.exit_code == 2 and "arcsec/pixel" in res.output
    assert sky.cutout_requests() == 0

    # a good user catalog reaches master.csv digit for digit (ids beyond float64's 2**53)
    good = sky.catalog_csv(tmp_path / "good.csv")
    run_cli("download", tmp_path / "c", "--catalog", good, "--base-url", sky.base_url, "--rate", 0, "--quiet")
    ids = [ln.split(",")[0] for ln in (tmp_path / "c" / "data" / "master.csv").read_text().splitlines()[1:]]
    assert ids == [r["objID"] for r in sky.rows]


def test_row_cap_splits_by_objid_and_limit(httpserver_threaded, tmp_path):
    ids = [BASE_ID + 104729 * k for k in range(10)]
    sky = FakeSkyServer(httpserver_threaded, [])

    def capped(cmd, cap=4):
        top = re.search(r"SELECT TOP (\d+) \* FROM", cmd)
        after = re.search(r"objID > (\d+)", cmd)
        rows = ids[::-1]  # the plain query comes back in no particular order
        if top:  # the wrapped query: keyset paging in objID order
            rows = sorted(i for i in ids if not after or i > int(after.group(1)))[: int(top.group(1))]
        rows = rows[:cap]
        return Response("#Table1\nobjID,ra,dec\n" + "".join(f"{i},{150 + (i % 97) / 100},1.5\n" for i in rows))

    sky.sql_reply = capped
    cfg = fast_cfg(tmp_path / "o", sky, row_cap=4)
    df, info = sky_client.query_catalog("SELECT objID, ra, dec FROM Galaxy -- a comment\n;", cfg, requests_session(cfg))
    assert info == {"pages": 3, "capped": True}
    assert [int(i) for i in df.objID] == ids  # all 10, exact, each once
    assert all("--" not in c and "a comment" not in c for c in sky.sql_seen)
    df, info = sky_client.query_catalog("SELECT objID, ra, dec FROM Galaxy", fast_cfg(tmp_path / "o", sky, row_cap=4, limit=6),
                                  requests_session(cfg))
    assert [int(i) for i in df.objID] == ids[:6] and info["pages"] == 2


def requests_session(cfg):
    return sky_client.make_session(cfg, sky_client.RateLimiter(0))


def test_strip_sql_comments_keeps_strings_and_minus():
    sql = "SELECT a - b AS d, '--not a comment' AS s -- real comment\nFROM t /* block\n comment */ WHERE x != -9999 --end"
    assert sky_client.one_line(sql) == "SELECT a - b AS d, '--not a comment' AS s FROM t WHERE x != -9999"
    assert sky_client.one_line("SELECT 'it''s -- here' -- gone\n;") == "SELECT 'it''s -- here'"


def test_default_sql_ships_with_the_package_and_tools_link():
    text = dl.DEFAULT_SQL.read_text()
    assert "oh_p50 AS metallicity" in text and "-- AND i.reliable = 1" in text
    tools = Path(__file__).resolve().parents[1] / "tools" / "metallicity_sample.sql"
    assert tools.is_symlink() and tools.resolve() == dl.DEFAULT_SQL.resolve()  # one copy of the text


def test_inspect_jpeg_reasons_and_black_fraction():
    good = jpeg(5)
    assert dl.inspect_jpeg(good, 224) == (None, 0.0)
    problem, black = dl.inspect_jpeg(jpeg(5, black=True), 224)
    # the blacked-out 156 of 224 columns, less a few that JPEG ringing lifts above black
    assert problem is None and 0.6 < black <= 156 / 224
    # start and end markers in place but no image inside: only a full decode sees it
    no_image = good[:2] + b"\xff\xe0garbage" + good[-2:]
    for data, want in [(good[:-100], "corrupt-image: truncated JPEG"), (b"<html>", "not-jpeg: starts with '<html>'"),
                       (no_image, "corrupt-image: "), (jpeg(5, size=128), "wrong-size: 128x128 px, expected 224x224")]:
        problem, black = dl.inspect_jpeg(data, 224)
        assert problem.startswith(want) and black is None, (want, problem)


def _closed_port() -> int:
    """A local port nothing listens on: a connection to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_network_is_said_at_once(httpserver_threaded, tmp_path):
    """Issue 22, case 5: a host that refuses the connection or does not resolve is tried CONNECT_RETRIES more
    times, whatever --retries says, and the one-line error says what is true (cannot reach it, check the network
    or --base-url), not how --limit wraps a query. The --catalog route stops at the first such cutout (the
    report has every row) and exits non-zero."""
    refused = f"http://127.0.0.1:{_closed_port()}"
    for base, why in ((refused, "(connection refused)"), ("http://fastgal-test.invalid", "does not resolve")):
        for extra in ([], ["--limit", 5]):
            line = one_line_error(run_cli("download", tmp_path / "q", "--base-url", base, "--backoff", 0.01, *extra,
                                          ok=False))
            assert f"cannot reach {base} " in line and why in line and "check the network, or --base-url" in line
            assert "SELECT TOP" not in line and "wraps" not in line
    cfg = DownloadConfig(retries=5)
    for query in (True, False):  # the adapters' Retry: 2 more connects, the full --retries for the rest
        r = sky_client.make_session(cfg, sky_client.RateLimiter(0), query=query).get_adapter("http://x").max_retries
        assert (r.connect, r.total) == (sky_client.CONNECT_RETRIES, 5) == (2, 5)
    sky = FakeSkyServer(httpserver_threaded, ["good1", "good2", "good3"])
    cat = sky.catalog_csv(tmp_path / "cat.csv")
    out = tmp_path / "c"
    res = run_cli("download", out, "--catalog", cat, "--base-url", refused, "--backoff", 0.01, "--workers", 1,
                  ok=False)
    line = one_line_error(res)
    assert f"cannot reach {refused} (connection refused)" in line and "no cutout was fetched" in line
    rep = read_report(out)
    assert len(rep) == 3 and rep.status.tolist() == ["failed", "interrupted", "interrupted"]
    assert rep.tries.tolist() == ["3", "0", "0"] and "not tried: " in rep.reason[1]  # 1 + CONNECT_RETRIES, not 6
    assert sky.cutout_requests() == 0


def test_nothing_fetched_is_a_failure(httpserver_threaded, tmp_path):
    """Issue 22, case 5: the --catalog route with 0 of N cutouts fetched exits non-zero after writing the catalog
    and the report, naming the first reason; one cutout fetched (or kept from an earlier run) is a success."""
    sky = FakeSkyServer(httpserver_threaded, ["offsky", "broken"])
    cat = sky.catalog_csv(tmp_path / "cat.csv")
    out = tmp_path / "d"
    args = ["download", out, "--catalog", cat, "--base-url", sky.base_url, "--rate", 0, "--retries", 1, "--backoff",
            0.01]
    res = run_cli(*args, ok=False)
    assert res.exit_code == 1 and "cutouts: 0 ok, 1 not-found, 1 failed = 2 of 2" in res.stdout
    assert ("Error: none of the 2 cutouts could be fetched (first: not-found: HTTP 404: outside the imaging "
            f"footprint); every row is in {out / 'download-report.csv'}") in res.stderr
    assert read_report(out).status.tolist() == ["not-found", "failed"] and (out / "data" / "master.csv").is_file()
    sky.scripts = {**SCRIPTS, "broken": (["ok"], "ok", 1, "")}  # the server mends: the re-run fetches one
    assert run_cli(*args).exit_code == 0


def test_a_float_id_is_described_as_it_is(httpserver_threaded, tmp_path):
    """Issue 22, case 5: an id written `...801.0` keeps every digit (no float64 is that value, and it has 19
    significant digits), so the message says so and how to write it; one a float may have rounded says that."""
    sky = FakeSkyServer(httpserver_threaded, ["good1"])
    for written, said in ((f"{BASE_ID}.0", f"every digit is there: write it as {BASE_ID}"),
                          (f"{float(BASE_ID)!r}", "may have been rounded")):
        bad = tmp_path / "bad.csv"
        bad.write_text(f"objID,ra,dec\n{written},150.0,2.0\n")
        line = one_line_error(run_cli("download", tmp_path / "b", "--catalog", bad, "--base-url", sky.base_url,
                                      ok=False))
        assert f"{bad} line 2: id '{written}' is written as a float" in line and said in line
        assert ("lost" in line) is False and ("may have been rounded" in line) == (said == "may have been rounded")
