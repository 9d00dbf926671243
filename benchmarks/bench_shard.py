"""Throughput of `fastgal shard`: images/s with one worker vs all cores, in the same run.

    .venv/bin/python benchmarks/bench_shard.py --n 4000

Makes a synthetic survey of N 224 px cutouts in a temp folder, then times shard() in this process
(imports warmed by a tiny run first, so the figure is the per-image rate; best of --repeats), and
once the whole CLI in a fresh process (interpreter + torch/webdataset imports included).
Prints a JSON line; the ratio (all cores / one) is the machine-independent figure.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastgal.options import ShardConfig, SynthConfig
from fastgal.shards.write import shard
from fastgal.survey.synth import synth
from fastgal.util import default_workers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precrop", type=int, default=None)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    res = {}
    try:
        survey = tmp / "survey"
        synth(SynthConfig(out=survey, n=a.n, seed=1, quiet=True))
        cat, img = survey / "data" / "master.csv", survey / "images"
        warm = tmp / "warm"  # imports (torch via webdataset) and page cache, outside the timing
        shard(ShardConfig(catalog=cat, images=img, out=warm, quiet=True, workers=1))
        for w in (1, default_workers()):
            best = 0.0
            for r in range(a.repeats):
                out = tmp / f"w{w}-{r}"
                best = max(best, shard(ShardConfig(catalog=cat, images=img, out=out, workers=w, precrop=a.precrop,
                                                   quiet=True)).images_per_s)
                shutil.rmtree(out)
            res[f"workers_{w}_images_per_s"] = round(best, 1)
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "fastgal", "shard", str(cat), str(img), str(tmp / "cli"), "--quiet"]
        cmd += ["--precrop", str(a.precrop)] if a.precrop else []
        subprocess.run(cmd, check=True, capture_output=True)
        res["cli_cold_seconds"] = round(time.perf_counter() - t, 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    vals = [v for k, v in res.items() if k.startswith("workers_")]
    res["speedup_all_cores_vs_one"] = round(vals[-1] / vals[0], 2)
    res["n"] = a.n
    res["precrop"] = a.precrop
    print(json.dumps(res))


if __name__ == "__main__":
    main()
