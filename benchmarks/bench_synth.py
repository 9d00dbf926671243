"""Throughput of `fastgal synth`: images/s with all cores vs one worker, in the same run.

    .venv/bin/python benchmarks/bench_synth.py --n 4000

Prints a JSON line; the ratio (all cores / one core) is the machine-independent figure.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from fastgal.options import SynthConfig
from fastgal.survey.synth import synth
from fastgal.util import default_workers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    res = {}
    try:
        for w in (1, default_workers()):
            best = 0.0
            for r in range(a.repeats):
                out = tmp / f"w{w}-{r}"
                best = max(best, synth(SynthConfig(out=out, n=a.n, seed=1, workers=w, quiet=True)).images_per_s)
                shutil.rmtree(out)
            res[f"workers_{w}_images_per_s"] = round(best, 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    vals = list(res.values())
    res["speedup_all_cores_vs_one"] = round(vals[-1] / vals[0], 2)
    res["n"] = a.n
    print(json.dumps(res))


if __name__ == "__main__":
    main()
