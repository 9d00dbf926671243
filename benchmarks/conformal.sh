#!/usr/bin/env bash
# Issue 32's measurement: conformal intervals on the synthetic survey, CPU preset, 3,000 and 12,000 galaxies,
# two seeds, one run at a time at low priority (the machine is shared). Then:
#   python benchmarks/conformal_table.py $ROOT        # the RESULTS.md table
# Usage: benchmarks/conformal.sh [ROOT=/tmp/cfb]
set -euo pipefail
ROOT=${1:-/tmp/cfb}
FG="nice -n 10 ${PYTHON:-python} -m fastgal"
mkdir -p "$ROOT"
for n in 3000 12000; do
  for seed in 0 1; do
    s="$ROOT/s$n-$seed" sh="$ROOT/sh$n-$seed" run="$ROOT/r$n-$seed"
    [ -f "$run/metrics.json" ] && continue
    date -u +"%T start n=$n seed=$seed"
    [ -f "$s/synth.json" ] || $FG synth "$s" --n "$n" --seed "$seed" --size 112 --quiet --overwrite
    [ -f "$sh/manifest.json" ] || $FG shard "$s/data/master.csv" "$s/images" "$sh" --crop 72 --quiet --overwrite
    $FG train "$sh" --out "$run" --preset cpu --head gaussian --interval 0.68,0.9,0.95 --seed "$seed" \
        --workers 2 --quiet --overwrite
    date -u +"%T done n=$n seed=$seed"
  done
done
