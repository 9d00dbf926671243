"""Training speed vs fastai's PIL pipeline, as same-run ratios: reproduces benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/bench_loaders.py --n 3000          # CPU: a few minutes on 2 cores
    .venv/bin/python benchmarks/bench_loaders.py --n 30000         # GPU machine: the seed recipe's batch

Makes a synthetic survey of N 224 px cutouts and its shards in --work (default: a temp folder, removed
after; the figures do not depend on the survey's content), then runs `fastgal bench` twice in fresh
processes, exactly as a person would:
  1. loaders at the seed geometry (224 px -> CropPad 144 -> RandomCrop 112) and batch size;
  2. model + e2e: on a GPU the seed's xresnet34 at --bs; on a CPU xresnet18 at batch 32 and a few batches,
     because one xresnet34 step of batch 128 takes ~10 s on 2 cores.
Prints the two commands on stderr and one JSON line (both results) on stdout; --save writes it too.
The ratios (x fastai) are the machine-independent figures; absolute images/s depend on the machine
and on whatever else it runs.
"""

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def run(cmd: list[str]) -> str:
    print("$ " + shlex.join(cmd), file=sys.stderr)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def main():
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000, help="galaxies in the survey")
    ap.add_argument("--work", type=Path, default=None, help="keep the survey and shards here (reused if present)")
    ap.add_argument("--bs", type=int, default=128 if gpu else 64, help="loader batch size")
    ap.add_argument("--batches", type=int, default=50 if gpu else 20, help="timed loader batches per window")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--e2e-arch", default="xresnet34" if gpu else "xresnet18")
    ap.add_argument("--e2e-bs", type=int, default=128 if gpu else 32)
    ap.add_argument("--e2e-batches", type=int, default=30 if gpu else 10)
    ap.add_argument("--e2e-repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="loader threads per backend; 0 = all cores")
    ap.add_argument("--save", type=Path, default=None, help="also write the JSON here")
    a = ap.parse_args()

    fg = [sys.executable, "-m", "fastgal"]
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_loaders_"))
    try:
        survey, shards = work / "survey", work / "shards"
        if not (survey / "synth.json").is_file():
            run(fg + ["synth", str(survey), "--n", str(a.n), "--seed", "1", "--quiet"])
        if not (shards / "manifest.json").is_file():
            run(fg + ["shard", str(survey / "data/master.csv"), str(survey / "images"), str(shards), "--quiet"])
        common = ["--workers", str(a.workers), "--quiet", "--json"]
        loaders = json.loads(run(fg + ["bench", str(shards), "--what", "loaders", "--bs", str(a.bs),
                                       "--batches", str(a.batches), "--repeats", str(a.repeats)] + common))
        e2e = json.loads(run(fg + ["bench", str(shards), "--what", "e2e", "--arch", a.e2e_arch, "--bs", str(a.e2e_bs),
                                   "--batches", str(a.e2e_batches), "--warmup", "1", "--repeats", str(a.e2e_repeats)]
                             + common))
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    res = {"n": a.n, "loaders": loaders["loaders"], "model": e2e["model"], "e2e": e2e["e2e"],
           "machine": loaders["machine"], "load_avg_after_e2e": e2e["machine"].get("load_avg_1min")}
    line = json.dumps(res)
    print(line)
    if a.save:
        a.save.write_text(line + "\n")


if __name__ == "__main__":
    main()
