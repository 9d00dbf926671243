"""The path one `fastgal train` takes, and how often it reads manifest.json and each index file (#17).

    python benchmarks/trace_train.py SHARDS OUT       # 1 epoch, xresnet18 at 56 px, --tta, 1 worker

Every fastgal function's first call made from fastgal code, in order; consecutive calls into the same
module are one stop. Prints the stops, the distinct modules, the returns to a module already left, the
sequence, and the reads. Run it with PYTHONPATH=<another checkout> to trace that code instead.
"""
import sys, collections
from pathlib import Path
import fastgal.shards.read as man
reads = collections.Counter()
for name in ("load_manifest", "read_index"):
    real = getattr(man, name)
    def wrap(*a, _real=real, _n=name, **k):
        reads[_n if _n == "load_manifest" else f"{_n}:{Path(a[0]).name}"] += 1
        return _real(*a, **k)
    setattr(man, name, wrap)
seen, seq = set(), []
def prof(frame, event, arg):
    if event != "call":
        return
    mod = frame.f_globals.get("__name__", "")
    caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
    if not mod.startswith("fastgal.") or not caller.startswith("fastgal.") or frame.f_code.co_name.startswith("<"):
        return
    key = (mod, frame.f_code.co_name)
    if key in seen:
        return
    seen.add(key)
    m = mod.split(".")[1]
    if not seq or seq[-1] != m:
        seq.append(m)
from fastgal.options import TrainConfig
from fastgal.run import train
cfg = TrainConfig(shards=Path(sys.argv[1]), out=Path(sys.argv[2]), epochs=1, bs=32, arch="xresnet18", size=56, tta=True,
                  quiet=True, overwrite=True, workers=1)
sys.setprofile(prof)
train(cfg)
sys.setprofile(None)
left, returns = set(), 0
for i, m in enumerate(seq):
    if m in left:
        returns += 1
    if i:
        left.add(seq[i - 1])
print(f"stops {len(seq)} in {len(set(seq))} modules, returns to a module already left {returns}")
print(" -> ".join(seq))
print(dict(reads))
