"""`fastgal stage` against a plain copy of the same files from the same server, in the same run; and the first
training epoch's images/s from the staged copy against the already-local folder.

    .venv/bin/python benchmarks/bench_stage.py --n 4000
    .venv/bin/python benchmarks/bench_stage.py --n 4000 --rate 50

Makes a synthetic survey (N 224 px cutouts) and its shards (--shard-size per tar) in a temp folder, serves them
with Python's http.server on 127.0.0.1 (a separate process, the same for every peer; --rate R sends each response
at most R MB/s, as one connection to an object store does), then, alternating, best
of --repeats, each into an empty folder:
  stage         fastgal.shards.stage.stage(URL): --streams at once, sha256 verified, index files rebuilt, linked
  copy          urllib from the standard library, the same files (tars, index files, manifest), the same number of
                streams, nothing verified: what `wget`/`aws s3 cp` of the folder does
  copy-1        the same, one stream
and one epoch of the training loader (torch backend, CPU) over the staged folder vs the source folder.
Prints a JSON line; the ratios are the machine-independent figures.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastgal.options import ShardConfig, SynthConfig
from fastgal.shards.stage import stage
from fastgal.shards.write import shard
from fastgal.survey.synth import synth


def serve(folder: str, rate: float) -> None:
    """The server (a process of its own): http.server, each response sent at most `rate` MB/s when rate > 0,
    as one connection to an object store is (S3 serves ~50-100 MB/s per connection)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Throttled(SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def copyfile(self, src, dst):
            if rate <= 0:
                return shutil.copyfileobj(src, dst)
            t0, sent = time.perf_counter(), 0
            while chunk := src.read(1 << 16):
                dst.write(chunk)
                sent += len(chunk)
                ahead = sent / (rate * 1e6) - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Throttled, directory=folder))
    print(f"port {srv.server_address[1]}", flush=True)
    srv.serve_forever()


def plain_copy(url: str, names: list[str], dst: Path, streams: int) -> float:
    dst.mkdir(parents=True)
    t0 = time.perf_counter()

    def get(name):
        with urllib.request.urlopen(f"{url}/{name}") as r, open(dst / name, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)

    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(get, names))
    return time.perf_counter() - t0


def first_epoch(folder: Path, bs: int) -> float:
    import fastgal

    dls = fastgal.dataloaders(str(folder), bs=bs, size=56, device="cpu", backend="torch", threads=2)
    t0 = time.perf_counter()
    n = sum(len(xb) for xb, _ in dls.train)
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bs", type=int, default=64)
    ap.add_argument("--rate", type=float, default=0.0, help="MB/s per response (0: as fast as loopback goes)")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        return serve(a.serve, a.rate)
    tmp = Path(tempfile.mkdtemp())
    os.environ["XDG_CACHE_HOME"] = str(tmp / "xdg")  # the sha256 cache of this run's files: not the user's
    server = None
    try:
        survey, src = tmp / "survey", tmp / "www" / "sh"
        synth(SynthConfig(out=survey, n=a.n, seed=1, quiet=True))
        shard(ShardConfig(catalog=survey / "data" / "master.csv", images=survey / "images", out=src, quiet=True,
                          shard_size=a.shard_size))
        names = sorted(p.name for p in src.iterdir() if p.suffix in (".tar", ".idx", ".json", ".csv"))
        nbytes = sum((src / n).stat().st_size for n in names)
        tar_bytes = sum((src / n).stat().st_size for n in names if n.endswith(".tar"))
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(tmp / "www"), "--rate", str(a.rate)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        url = f"http://127.0.0.1:{int(server.stdout.readline().split()[1])}/sh"
        best = {"stage": 1e9, "copy": 1e9, "copy-1": 1e9}
        for r in range(a.repeats):
            for peer in (("stage", "copy", "copy-1") if r % 2 == 0 else ("copy-1", "copy", "stage")):
                dst = tmp / f"{peer}-{r}"
                if peer == "stage":
                    t0 = time.perf_counter()  # all of it: manifest, fetches, sha256s, index files, links
                    staged = stage(url, dst, streams=a.streams, quiet=True).folder
                    secs = time.perf_counter() - t0
                else:
                    secs = plain_copy(url, names, dst, a.streams if peer == "copy" else 1)
                best[peer] = min(best[peer], secs)
        epoch = {"local": 0.0, "staged": 0.0}
        for r in range(a.repeats):
            for k in (("local", "staged") if r % 2 == 0 else ("staged", "local")):
                epoch[k] = max(epoch[k], first_epoch(src if k == "local" else staged, a.bs))
        res = {
            "n": a.n, "shards": sum(n.endswith(".tar") for n in names), "bytes": nbytes, "tar_bytes": tar_bytes,
            "streams": a.streams, "rate_mb_per_s_per_response": a.rate, "seconds": {k: round(v, 3) for k, v in best.items()},
            "mb_per_s": {k: round(nbytes / 1e6 / v, 1) for k, v in best.items()},
            "stage_over_copy": round(best["copy"] / best["stage"], 3),  # rate ratio: > 1 staging is faster
            "stage_over_copy_1": round(best["copy-1"] / best["stage"], 3),
            "first_epoch_images_per_s": {k: round(v, 1) for k, v in epoch.items()},
            "staged_over_local": round(epoch["staged"] / epoch["local"], 3),
        }
        print(json.dumps(res))
    finally:
        if server:
            server.terminate()
            server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
