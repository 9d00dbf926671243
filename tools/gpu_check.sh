#!/usr/bin/env bash
# GPU check: the DALI GPU path (mixed decode), bf16 training and the loader benchmark on a CUDA machine.
#
#   bash tools/gpu_check.sh [OUT]        # OUT defaults to /tmp/fastgal-gpu
#
# Needs fastgal installed with nvidia-dali-cuda120 (or -cuda130) and a CUDA GPU. On a machine without
# PyPI access, install carried wheels first: pip install --no-index --no-deps .whl/*.whl
# Prints one line per check and exits non-zero on the first failure.
set -euo pipefail
OUT=${1:-/tmp/fastgal-gpu}
FG=${FASTGAL:-fastgal}
rm -rf "$OUT" && mkdir -p "$OUT"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible to torch"
print("gpu:", torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
PY
$FG synth "$OUT/s" --n "${N:-20000}" --seed 1 -q
$FG shard "$OUT/s/data/master.csv" "$OUT/s/images" "$OUT/sh" -q
# GPU and CPU DALI valid graphs must give the same tensors (up to nvJPEG vs libjpeg rounding)
python - "$OUT/sh" <<'PY'
import sys, torch
from fastgal.loaders import make_dls
g = make_dls(sys.argv[1], bs=256, device="cuda", backend="dali").valid
c = make_dls(sys.argv[1], bs=256, device="cpu", backend="dali").valid
assert g.spec.device == "gpu"
xg = torch.cat([x.cpu() for x, _ in g]); xc = torch.cat([x for x, _ in c])
std = torch.tensor(g.spec.std).view(1, 3, 1, 1)
d = ((xg - xc).abs() * std)
print(f"gpu vs cpu valid tensors: max diff {d.max():.2f}, mean {d.mean():.4f} (0-255 units)")
assert d.mean() < 1.0
PY
$FG train "$OUT/sh" --out "$OUT/run" --epochs "${EPOCHS:-3}" --device cuda --tta --lr-find --json > "$OUT/metrics.json"
python -c "import json,sys; m=json.load(open(sys.argv[1])); print('train:', {k: m[k] for k in ('rmse','tta_rmse','baseline_rmse','train_images_per_s','precision','loader_backend')})" "$OUT/metrics.json"
$FG bench "$OUT/sh" --device cuda --what all --json > "$OUT/bench.json"
cat "$OUT/bench.json"
echo "gpu check: ok"
