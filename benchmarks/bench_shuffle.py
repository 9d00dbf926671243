"""Shuffle quality of the training loaders on 100,000 samples: reproduces benchmarks/RESULTS.md (#11).

    .venv/bin/python benchmarks/bench_shuffle.py --work /tmp/fg_shuffle     # ~30 min on 2 busy cores

Makes (or reuses, in --work) a synthetic survey of N 112 px cutouts and two shard sets made from it with
`--crop 72` (the CPU geometry: crop 72 -> 56): the default shard size, and --small-shard samples per tar
(more, smaller shards: what DALI's shuffle_after_epoch can reorder). Then runs, in fresh processes as a
person would:
  A. fastgal bench SHARDS --what shuffle                (1 rank)
  B. fastgal bench SHARDS_SMALL --what shuffle          (1 rank, small tars)
  C. fastgal bench SHARDS --what shuffle --ranks 2      (the DDP split: 2 loaders, shard_id 0 and 1)
Prints each command on stderr and one JSON line with the three results on stdout; --save writes it too.
"""

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path


def run(cmd: list[str]) -> str:
    print("$ " + shlex.join(cmd), file=sys.stderr)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000, help="galaxies in the survey")
    ap.add_argument("--work", type=Path, required=True, help="survey and shards go here (reused if present)")
    ap.add_argument("--small-shard", type=int, default=1000, help="samples per tar of the second shard set")
    ap.add_argument("--bs", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="loader threads; 0 = all cores")
    ap.add_argument("--save", type=Path, default=None, help="also write the JSON here")
    a = ap.parse_args()

    fg = [sys.executable, "-m", "fastgal"]
    survey = a.work / "survey"
    if not (survey / "synth.json").is_file():
        run(fg + ["synth", str(survey), "--n", str(a.n), "--seed", "1", "--size", "112", "--quiet"])
    sets = {"shards": [], "shards_small": ["--shard-size", str(a.small_shard)]}
    for name, extra in sets.items():
        if not (a.work / name / "manifest.json").is_file():
            run(fg + ["shard", str(survey / "data/master.csv"), str(survey / "images"), str(a.work / name),
                      "--crop", "72", "--quiet", *extra])
    common = ["--what", "shuffle", "--bs", str(a.bs), "--size", "56", "--epochs", str(a.epochs),
              "--workers", str(a.workers), "--quiet", "--json"]
    out = {}
    for key, folder, ranks in (("A", "shards", 1), ("B", "shards_small", 1), ("C", "shards", 2)):
        out[key] = json.loads(run(fg + ["bench", str(a.work / folder), *common, "--ranks", str(ranks)]))
    line = json.dumps(out)
    print(line)
    if a.save:
        a.save.write_text(line + "\n")


if __name__ == "__main__":
    main()
