#!/usr/bin/env python
"""The GPU check: one command that answers whether fastgal's GPU path works, and how fast, in 330 s.

    python tools/gpu_check.py /tmp/gpu-check                 # a CUDA machine (sized for an H200, 16 cores)
    python tools/gpu_check.py /tmp/gpu-check --dry-run       # anywhere: tiny sizes, CPU placement

It needs fastgal, fastai and webdataset beside torch; DALI only where it is installed (a box with torch
alone: `python tools/wheelhouse.py` on a machine with an index, then the README's "Checking fastgal on a
GPU box"). Steps, the most valuable answers first (each in its own subprocess(es) under its own timeout):
  0 env       `fastgal env --json`; `import fastai.callback.channelslast`; torch must see the GPU
  1 data      `fastgal synth` 30,000 galaxies at 224 px + `fastgal shard`, timed
  2 recipe    the recipe (7 epochs, bs 128, bf16, --tta) with --loader auto (DALI where installed, else
              batched), in-process: per epoch train and valid img/s, seconds, checkpoint write seconds, peak
              GPU memory, GPU utilisation (nvidia-smi); model-only img/s in the same process and the
              data-bound fraction; the seed's job (7 epochs x 130k galaxies) projected from the steady-state
              epochs beside its 13.6 min on a P100; RMSE vs the mean, the observable reference and the floor
  3 bench     `fastgal bench --what step,model,loaders,e2e --device cuda`: every loader and fastai's peer
  4 predict   `fastgal predict` on the valid shards (= predictions_valid.csv) and on 500 JPEGs with --tta
  5 compile   `fastgal bench --what model --compile --compile-mode reduce-overhead`: the recipe's model eager,
              then compiled with CUDA graphs, in one process: the ratio and the first step's seconds
  6 peer      the recipe again with --loader batched where step 2 ran DALI (skipped without DALI)
  7 decode    decode only, images/s: torch's batched decode (nvJPEG on CUDA; its pixels against the CPU's),
              and DALI `mixed` (GPU) vs DALI CPU where DALI is installed
  8 equality  valid graph, the 8 TTA views, the train graph with the same draws: DALI GPU and CPU (where
              installed), the batched torch path (GPU and CPU), the torch worker path; |delta| p99/max and
              signed per-channel means in 0-255 units, targets identical, outputs on CUDA
  9 short     one fp16 epoch (the loss must stay finite); the torch loader on the GPU is in step 3
Verdicts: ok / fail / timeout / skipped, each with its reason. Exit status 1 when any step failed or
timed out. Results: OUT holds three files, rewritten after every step so an outer limit leaves what was
done: summary.json, summary.txt (the table) and steps.tar.gz (each step's JSON and log). The survey,
shards, runs and logs go to the work folder (--work, default OUT-work beside OUT). `--budget` (330 s) caps
the whole run and the steps' timeouts (seconds, `--timeout STEP=S`) must fit inside it. `--dry-run` runs
every step on the CPU with tiny sizes (steps that need CUDA run their CPU equivalent), so
tests/test_gpu_check.py and tests/test_wheelhouse.py keep this script from rotting.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

try:
    import fastgal  # noqa: F401
except ImportError:  # a checkout that is not installed: use it, and tell the subprocesses too
    _root = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, _root)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_root, os.environ.get("PYTHONPATH")]))
from fastgal.recipe import RECIPE  # noqa: E402
from fastgal.util import atomic_path, stop_on_sigterm, write_bytes_atomic, write_json_atomic  # noqa: E402

# the most valuable answers first: does it run, how fast is the recipe, how does it compare, does predict agree,
# does --compile with CUDA graphs pay
STEPS = ["env", "data", "recipe", "bench", "predict", "compile", "peer", "decode", "equality", "short"]
# Seconds per step on an H200 with 16 cores (estimates: no such machine has run this order yet), summing to
# the --budget (330 s), so that a 15-minute device session can run the whole check twice with its start-up.
TIMEOUTS = {"env": 10, "data": 30, "recipe": 90, "bench": 40, "predict": 20, "compile": 50, "peer": 40, "decode": 15,
            "equality": 20, "short": 15}
# the published recipe's job, which the recipe step projects its rates onto
SEED_JOB = {"galaxies": 130_000, "epochs": RECIPE.epochs, "minutes_p100": 13.6}
# every step of --dry-run: about 30 s of CPU each at most, but a 2-core machine shared with other jobs is slow
DRY_TIMEOUT = 600


@dataclass
class Params:
    """Sizes of the GPU run; DRY replaces them for --dry-run. Each is also an option (--n, --bs, ...)."""

    n: int = 30000
    image: int = RECIPE.image
    crop: int = RECIPE.crop
    size: int = RECIPE.size
    arch: str = RECIPE.arch
    epochs: int = RECIPE.epochs
    bs: int = RECIPE.bs
    shard_size: int = 5000
    device: str = "cuda"
    decode_bs: int = 256
    decode_batches: int = 40
    equality_batches: int = 8  # batches of bs per graph and backend
    bench_batches: int = 30
    bench_warmup: int = 5
    bench_repeats: int = 2
    jpegs: int = 500
    p99_tol: float = 2.0  # 0-255 units: decoders may round differently, not disagree
    mean_tol: float = 0.25  # 0-255 units, signed per-channel mean: a colour shift is a metallicity bias
    train_p99_tol: float = 4.0  # the train graph adds bilinear rotation, computed per device
    predict_tol: float = 0.02  # dex
    model_batches: int = 30  # the recipe step's model-only window (after model_warmup batches)
    model_warmup: int = 5
    compile_mode: str = "reduce-overhead"  # torch.compile's CUDA graphs: one launch a step instead of ~540
    budget: float = 330.0


# --dry-run: the smallest sizes that still exercise every path (several shards, a partial last batch, SA at
# the last stage), so the whole check runs in about two minutes on 2 shared cores
DRY = dict(n=80, image=64, crop=48, size=32, arch="xresnet18", epochs=1, bs=12, shard_size=40, device="cpu",
           decode_bs=12, decode_batches=3, equality_batches=2, bench_batches=1, bench_warmup=0, bench_repeats=1,
           jpegs=16, model_batches=1, model_warmup=0, budget=3600.0)


class Skip(Exception):
    """A step that cannot run here; its message is the reason."""


class StepError(Exception):
    """A step that ran and failed: the reason, and what it measured before it failed."""

    def __init__(self, reason: str, result: dict | None = None):
        super().__init__(reason)
        self.result = result


class StepTimeout(Exception):
    pass


# --------------------------------------------------------------------------- running commands

class Runner:
    """Subprocesses of one step: its deadline, its log file, and a clean kill of what they started."""

    def __init__(self, log: Path, deadline: float):
        self.log, self.deadline = log, deadline

    def __call__(self, cmd: list, what: str) -> str:
        """Run cmd to completion within the step's deadline; its stdout (stderr goes to the log)."""
        cmd = [str(c) for c in cmd]
        with open(self.log, "a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            # its own session: a timeout kills DALI's threads and loader workers with it
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
            try:
                out, _ = proc.communicate(timeout=max(self.deadline - time.monotonic(), 0.1))
            except BaseException as e:  # the timeout, or Ctrl-C: nothing may outlive the check
                # SIGTERM first: fastgal unwinds on it and removes its temp folders (lr_find's weights, 43 MB a
                # time on a dry run); what is still there after 2 s is killed
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:  # the whole group is gone already
                    pass
                proc.wait()
                if isinstance(e, subprocess.TimeoutExpired):
                    raise StepTimeout(f"{what} still running at the step's timeout") from None
                raise
        if proc.returncode != 0:
            raise StepError(f"{what} exited {proc.returncode}: {self.last_error()}")
        return out

    def fastgal(self, *args) -> dict:
        """`python -m fastgal ARGS --json` -> its JSON."""
        return json.loads(self([sys.executable, "-m", "fastgal", *args, "--json"], f"fastgal {args[0]}"))

    def worker(self, name: str, p: Params, work: Path) -> dict:
        """This script's in-process work for a step (--worker), in a subprocess; its result JSON."""
        res = work / "workers" / f"{name}.json"
        res.unlink(missing_ok=True)
        self([sys.executable, __file__, str(work), "--worker", name, "--params", json.dumps(asdict(p))], f"worker {name}")
        got = json.loads(res.read_text())
        if "skip" in got:
            raise Skip(got["skip"])
        return got

    def last_error(self) -> str:
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip() and not ln.startswith("$ ")]
        return lines[-1][:300] if lines else "no output"


# --------------------------------------------------------------------------- steps (orchestrator side)

def cuda(p: Params) -> bool:
    return p.device == "cuda"


def shards_of(work: Path) -> Path:
    if not (work / "shards" / "manifest.json").is_file():
        raise Skip("needs step 1's shards (WORK/shards)")
    return work / "shards"


def step_env(run: Runner, p: Params, work: Path) -> dict:
    info = run.fastgal("env")
    run([sys.executable, "-c", "import fastai.callback.channelslast"], "import fastai.callback.channelslast")
    res = {"env": info, "channelslast_import": True}
    if cuda(p) and not info["torch"]["cuda_available"]:
        raise StepError("torch cannot use a GPU here: " + ("; ".join(info["warnings"]) or "no NVIDIA device found"))
    return res


def step_data(run: Runner, p: Params, work: Path) -> dict:
    t0 = time.perf_counter()
    synth = run.fastgal("synth", work / "survey", "--n", p.n, "--size", p.image, "--seed", 1, "--quiet", "--overwrite")
    t1 = time.perf_counter()
    shard = run.fastgal("shard", work / "survey/data/master.csv", work / "survey/images", work / "shards", "--crop", p.crop,
                        "--shard-size", p.shard_size, "--quiet", "--overwrite")
    t2 = time.perf_counter()
    if shard["rejected"]:
        raise StepError(f"{shard['rejected']} synthetic galaxies rejected: {shard['rejects_by_reason']}")
    return {"synth": synth, "shard": shard, "synth_wall_s": round(t1 - t0, 2), "shard_wall_s": round(t2 - t1, 2)}


def step_decode(run: Runner, p: Params, work: Path) -> dict:
    shards_of(work)
    return run.worker("decode", p, work)


def step_equality(run: Runner, p: Params, work: Path) -> dict:
    shards_of(work)
    res = run.worker("equality", p, work)
    bad = [f"{name}: {why}" for name, c in res["comparisons"].items() for why in c["problems"]]
    if bad:
        raise StepError(f"{len(bad)} problem(s), first {bad[0]}", res)
    return res


def step_bench(run: Runner, p: Params, work: Path) -> dict:
    sh = shards_of(work)
    args = ["bench", sh, "--device", p.device, "--bs", p.bs, "--size", p.size, "--arch", p.arch,
            "--batches", p.bench_batches, "--warmup", p.bench_warmup, "--repeats", p.bench_repeats, "--quiet"]
    return {"what": "step,model,loaders,e2e", "bench": run.fastgal(*args, "--what", "step,model,loaders,e2e")}


def step_compile(run: Runner, p: Params, work: Path) -> dict:
    """--compile measured where it matters: the recipe's model (fastgal bench's model section) eager, then
    compiled with --compile-mode (reduce-overhead: each step replayed as a CUDA graph), in one process; the
    ratio and the first step's seconds (tracing, compiling, recording). Its progress lines go to the log, so
    a timeout still says how far it got."""
    sh = shards_of(work)
    args = ["bench", sh, "--what", "model", "--device", p.device, "--bs", p.bs, "--size", p.size, "--arch", p.arch,
            "--batches", p.bench_batches, "--warmup", p.bench_warmup, "--repeats", p.bench_repeats,
            "--compile", "--compile-mode", p.compile_mode]
    try:
        b = run.fastgal(*args)
    except StepTimeout as e:
        seen = [ln.strip() for ln in run.log.read_text().splitlines() if ln.strip().startswith("model ")]
        raise StepTimeout(f"{e}; its last line: {seen[-1] if seen else 'none'}") from None
    m = b["model"]
    return {"mode": p.compile_mode, "cuda_graphs": m["compiled"]["cuda_graphs"], "arch": m["arch"],
            "precision": m["precision"], "eager_images_per_s": m["compiled"]["eager"]["images_per_s"],
            "compiled_images_per_s": m["images_per_s"], "compiled_x_eager": m["compiled"]["x_eager"],
            "first_step_seconds": m["compiled"]["first_step_seconds"], "bench": b}


def _check_recipe(res: dict, p: Params) -> dict:
    t = res["metrics"]
    if not all(math.isfinite(t.get(k, float("nan"))) for k in ("rmse", "tta_rmse")):
        raise StepError(f"non-finite RMSE {t.get('rmse')} / TTA {t.get('tta_rmse')}", res)
    if p.epochs >= 3 and not t["rmse"] < t["baseline_rmse"]:  # one tiny epoch (the dry run) need not learn
        raise StepError(f"RMSE {t['rmse']:.4f} is no better than predicting the mean ({t['baseline_rmse']:.4f})", res)
    return res


def step_recipe(run: Runner, p: Params, work: Path) -> dict:
    """The recipe with what --loader auto takes here (DALI where installed, else batched): WORK/run."""
    shards_of(work)
    return _check_recipe(run.worker("recipe", p, work), p)


def step_peer(run: Runner, p: Params, work: Path) -> dict:
    """The recipe again with the batched torch loader, DALI's peer, where the recipe step ran DALI."""
    shards_of(work)
    return _check_recipe(run.worker("peer", p, work), p)


def _history(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def step_short(run: Runner, p: Params, work: Path) -> dict:
    """One epoch in fp16 (the loss must stay finite); the torch loader on a GPU is in the bench step."""
    sh = shards_of(work)
    prec = "fp16" if cuda(p) else "fp32"  # fp16 needs a GPU: the dry run checks the path in fp32
    name, rd = f"{prec}_epoch", work / f"run-{prec}_epoch"
    m = run.fastgal("train", sh, "--out", rd, "--epochs", 1, "--precision", prec, "--bs", p.bs, "--arch", p.arch,
                    "--size", p.size, "--device", p.device, "--quiet", "--overwrite")
    hist = _history(rd)
    losses = [float(h[k]) for h in hist for k in ("train_loss", "valid_loss")]
    res = {name: {"rmse": m["rmse"], "losses": losses, "epochs": len(hist), "loader_backend": m["loader_backend"],
                  "precision": m["precision"], "images_per_s": [float(h["images_per_s"]) for h in hist]}}
    if not all(math.isfinite(v) for v in losses + [m["rmse"]]):
        raise StepError(f"{name}: a loss is not finite: {losses}", res)
    return res


def _read_csv(path: Path) -> dict:
    import csv

    with open(path) as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def _max_diff(a: dict, b: dict, cols: list[str]) -> float:
    return max(abs(float(a[i][c]) - float(b[i][c])) for i in a for c in cols)


def step_predict(run: Runner, p: Params, work: Path) -> dict:
    sh, rd = shards_of(work), work / "run"
    if not (rd / "metrics.json").is_file():
        raise Skip("needs step 2's run (WORK/run)")
    ref = _read_csv(rd / "predictions_valid.csv")
    cols = [c for c in next(iter(ref.values())) if c.startswith("pred_")]
    s = run.fastgal("predict", rd, sh, "--split", "valid", "--tta", "--device", p.device, "--out", work / "pred_valid.csv")
    got = _read_csv(work / "pred_valid.csv")
    if list(got) != list(ref):
        raise StepError("predict's ids differ from predictions_valid.csv's (order or set)")
    jp = work / "jpegs"
    shutil.rmtree(jp, ignore_errors=True)
    jp.mkdir()
    ids = list(ref)[: p.jpegs]  # validation galaxies: their shard predictions are the reference
    for i in ids:
        shutil.copy(work / "survey/images" / f"{i}.jpg", jp / f"{i}.jpg")
    j = run.fastgal("predict", rd, jp, "--tta", "--device", p.device, "--out", work / "pred_jpegs.csv")
    jrows = _read_csv(work / "pred_jpegs.csv")
    tta_cols = [c for c in cols if c.startswith("pred_tta_")]
    res = {"valid": s, "jpegs": j, "n_jpegs": len(ids), "tolerance_dex": p.predict_tol,
           "valid_vs_predictions_valid_max_abs_dex": _max_diff(got, ref, cols),
           "jpegs_vs_shards_tta_max_abs_dex": _max_diff({i: jrows[i] for i in ids}, got, tta_cols),
           "unusable_jpegs": sum(r["status"] != "ok" for r in jrows.values())}
    worst = max(res["valid_vs_predictions_valid_max_abs_dex"], res["jpegs_vs_shards_tta_max_abs_dex"])
    if res["unusable_jpegs"] or worst > p.predict_tol:
        raise StepError(f"predictions differ by up to {worst:.4f} dex (tolerance {p.predict_tol}); "
                        f"{res['unusable_jpegs']} unusable JPEGs", res)
    return res


# --------------------------------------------------------------------------- workers (in-process work)

def _loaders(p: Params, shards: Path, backend: str, device: str, threads: int):
    from fastgal.load.loader import dataloaders

    return dataloaders(shards, bs=p.bs, size=p.size, crop=p.crop, device=device, backend=backend, threads=threads, seed=42)


def work_decode(p: Params, work: Path) -> dict:
    """images/s of the JPEG decoders alone over the training shards: torch's batched decode (fastgal.load.decode:
    nvJPEG on CUDA, libjpeg-turbo threads on the CPU) and, where installed, DALI's mixed (GPU) and CPU
    decoders; and nvJPEG's pixels against libjpeg-turbo's (chroma upsampling shifts colours, the signal)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from fastgal.load.decode import decode_batch, decoder_name
    from fastgal.load.loader import dali_available
    from fastgal.util import default_workers

    split = _loaders(p, work / "shards", "torch", "cpu", 0).train.split  # the shard and index lists
    threads = default_workers()
    batches = [range(i * p.decode_bs, (i + 1) * p.decode_bs) for i in range(min(p.decode_batches, len(split) // p.decode_bs))]

    def torch_rate(device: str) -> float:
        with ThreadPoolExecutor(threads) as pool:
            for pos in batches[:2]:  # nvJPEG handles, the pool's threads
                decode_batch(split.batch(pos)[0], device, pool=pool)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for pos in batches:
                decode_batch(split.batch(pos)[0], device, pool=pool)
            if device == "cuda":
                torch.cuda.synchronize()
        return len(batches) * p.decode_bs / (time.perf_counter() - t0)

    res = {"threads": threads, "batch": p.decode_bs, "batches": len(batches), "torch_decoder": decoder_name(),
           "torch_cpu_images_per_s": round(torch_rate("cpu"), 1), "torch_gpu_images_per_s": None}
    if cuda(p):
        res["torch_gpu_images_per_s"] = round(torch_rate("cuda"), 1)
        pr = Pair([1.0, 1.0, 1.0])
        for pos in batches[:4]:
            jpegs, y = split.batch(pos)
            t = torch.from_numpy(y)
            pr.add((decode_batch(jpegs, "cuda"), t), (decode_batch(jpegs, "cpu"), t))
        res["torch_gpu_vs_cpu_pixels"] = pr.summary(p.p99_tol, p.mean_tol)
    if not dali_available():
        res["dali"] = "skipped: DALI not installed"
        return res
    from nvidia.dali import Pipeline, fn, types

    def rate(device: str) -> float:
        pipe = Pipeline(batch_size=p.decode_bs, num_threads=threads, device_id=0 if device == "mixed" else None,
                        prefetch_queue_depth=2)
        with pipe:
            jpg = fn.readers.webdataset(paths=split.tars, index_paths=split.idxs, ext=[split.image_ext])
            extra = {"jpeg_fancy_upsampling": True} if device == "mixed" else {}  # the chroma upsampling of the CPU
            pipe.set_outputs(fn.decoders.image(jpg, device=device, output_type=types.RGB, **extra))
        pipe.build()
        for _ in range(3):  # pipeline start, decoder allocations
            pipe.run()
        t0 = time.perf_counter()
        for _ in range(p.decode_batches):
            (imgs,) = pipe.run()
        if device == "mixed":
            imgs.as_cpu()  # waits for the GPU's last batch
        return p.decode_bs * p.decode_batches / (time.perf_counter() - t0)

    res["dali_cpu_images_per_s"] = round(rate("cpu"), 1)
    res["dali_mixed_images_per_s"] = round(rate("mixed"), 1) if cuda(p) else None
    return res


class Pair:
    """Streaming comparison of two loaders' batches: |delta| histogram (p99, max), signed per-channel means
    and target equality, in 0-255 units (the normalised tensors times the normalisation std)."""

    BIN = 0.01

    def __init__(self, std):
        import torch

        self.std = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
        self.hist = torch.zeros(int(256 / self.BIN), dtype=torch.float64)
        self.max, self.sum, self.n, self.targets_equal, self.images = 0.0, torch.zeros(3, dtype=torch.float64), 0, True, 0
        self.shape_problem = None

    def add(self, a, b):
        (xa, ya), (xb, yb) = a, b
        if xa.shape != xb.shape:
            self.shape_problem = f"shapes {tuple(xa.shape)} vs {tuple(xb.shape)}"
            return
        d = (xa.double().cpu() - xb.double().cpu()) * self.std
        ad = d.abs()
        self.max = max(self.max, float(ad.max()))
        self.hist += ad.clamp(max=255.99).float().histc(bins=len(self.hist), min=0, max=256).double()
        self.sum += d.sum(dim=(0, 2, 3))
        self.n += d.numel() // 3
        self.images += len(xa)
        self.targets_equal &= bool((ya.cpu() == yb.cpu()).all())

    def summary(self, p99_tol: float, mean_tol: float) -> dict:
        cdf = self.hist.cumsum(0) / max(float(self.hist.sum()), 1.0)
        p99 = min((int((cdf < 0.99).sum()) + 1) * self.BIN, self.max)
        means = [round(float(v), 4) for v in self.sum / max(self.n, 1)]
        problems = [self.shape_problem] if self.shape_problem else []
        problems += [f"p99 |delta| {p99:.2f} > {p99_tol}"] if p99 > p99_tol else []
        problems += [f"per-channel mean delta {means} beyond +-{mean_tol}"] if max(map(abs, means)) > mean_tol else []
        problems += ["targets differ"] if not self.targets_equal else []
        problems += ["no batches compared"] if not self.images else []
        return {"images": self.images, "p99_abs": round(p99, 3), "max_abs": round(self.max, 3),
                "mean_signed_rgb": means, "targets_identical": self.targets_equal, "problems": problems}


def _compare(loaders: dict, batches: int, std, p99_tol, mean_tol, on_cuda: dict) -> dict:
    """Every pair of loaders over their first `batches` batches, zipped (they yield the same samples)."""
    import itertools

    names = list(loaders)
    pairs = {(a, b): Pair(std) for a, b in itertools.combinations(names, 2)}
    for got in itertools.islice(zip(*loaders.values()), batches):
        got = dict(zip(names, got))
        for n, (x, y) in got.items():
            on_cuda[n] = on_cuda.get(n, True) and x.device.type == "cuda" and y.device.type == "cuda"
        for (a, b), pr in pairs.items():
            pr.add(got[a], got[b])
    return {f"{a} vs {b}": pr.summary(p99_tol, mean_tol) for (a, b), pr in pairs.items()}


def work_equality(p: Params, work: Path) -> dict:
    """Every data path on the same samples with the same draws (see the module docstring, step 3)."""
    import gc

    from fastgal.load.loader import dali_available
    from fastgal.util import default_workers

    sh, threads = work / "shards", default_workers()
    dls = {}
    if dali_available():
        dls = {"dali_cpu": _loaders(p, sh, "dali", "cpu", threads)}
        if cuda(p):
            dls = {"dali_gpu": _loaders(p, sh, "dali", "cuda", threads), **dls}
    dls["batched"] = _loaders(p, sh, "batched", p.device, threads)
    if cuda(p):
        dls["batched_cpu"] = _loaders(p, sh, "batched", "cpu", threads)
    # no worker processes: equality does not depend on them, and spawning 10 loaders' workers costs minutes
    dls["torch"] = _loaders(p, sh, "torch", p.device, 0)
    geo = dls["batched"].valid.geometry
    std, on_cuda, k = list(geo.std), {}, p.equality_batches
    comps = {f"valid: {n}": c for n, c in _compare({n: d.valid for n, d in dls.items()}, k, std, p.p99_tol,
                                                   p.mean_tol, on_cuda).items()}
    for v in range(8):  # one view's pipelines alive at a time: each holds its threads and GPU buffers
        views = {n: d.valid.view_of(v) for n, d in dls.items()}
        comps.update({f"tta {v}: {n}": c for n, c in _compare(views, k, std, p.p99_tol, p.mean_tol, on_cuda).items()})
        del views
        gc.collect()
    # one seed: every path reads the same order with the same augmentation draws (fastgal.load.order)
    comps.update({f"train: {n}": c for n, c in _compare({n: d.train for n, d in dls.items()}, k, std,
                                                       p.train_p99_tol, p.mean_tol, on_cuda).items()})
    for n in dls:
        if p.device == "cuda" and not n.endswith("_cpu") and not on_cuda.get(n):
            comps.setdefault(f"device: {n}", {"problems": [f"{n} did not hand over CUDA tensors"]})
    return {"backends": list(dls), "batches_per_graph": k, "bs": p.bs, "outputs_on_cuda": on_cuda,
            "dali": None if dali_available() else "skipped: DALI not installed",
            "tolerances": {"p99": p.p99_tol, "mean": p.mean_tol, "train_p99": p.train_p99_tol}, "comparisons": comps}


class _EpochDevice:
    """Per epoch of a fit: peak GPU memory (torch's allocator) and, where nvidia-smi answers, the mean GPU
    utilisation, sampled every 0.2 s by a thread while the fit runs."""

    def __init__(self, cuda: bool):
        self.cuda, self.rows, self.samples, self.stop = cuda, [], [], None

    def callback(self):
        import threading

        import torch
        from fastai.callback.core import Callback

        outer = self

        class EpochDevice(Callback):
            order = 61  # after EpochStats (60): the device is idle, the epoch's figures are final

            def before_epoch(self):
                self.t0 = time.monotonic()
                if outer.cuda:
                    torch.cuda.reset_peak_memory_stats()

            def after_epoch(self):
                t1 = time.monotonic()
                util = [u for t, u in list(outer.samples) if self.t0 <= t <= t1]
                outer.rows.append({"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if outer.cuda else None,
                                   "gpu_utilisation_pct": round(sum(util) / len(util), 1) if util else None})

        if self.cuda and shutil.which("nvidia-smi"):
            self.stop = threading.Event()
            threading.Thread(target=self._sample, daemon=True).start()
        return EpochDevice()

    def _sample(self):
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=2).stdout.split()
                self.samples.append((time.monotonic(), float(out[0])))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            self.stop.wait(0.2)

    def close(self):
        if self.stop is not None:
            self.stop.set()


def _model_rate(p: Params, work: Path) -> float | None:
    """Model-only images/s (forward + backward + step on one synthetic batch reused on the device) through
    `fastgal bench --what model` in this process: what no data path can beat, measured in the same run."""
    from fastgal.bench.main import bench
    from fastgal.options import BenchConfig

    res = bench(BenchConfig(shards=work / "shards", what="model", arch=p.arch, bs=p.bs, size=p.size, device=p.device,
                            batches=p.model_batches, warmup=p.model_warmup, repeats=1, quiet=True))
    return res["model"]["images_per_s"]


def _projection(hist: list[dict], n_valid_frac: float, epochs: int) -> dict:
    """The seed's full job (7 epochs over ~130,000 galaxies) at this run's steady-state rates: the median of
    every epoch after the first (cuDNN autotuning, allocator warm-up and worker start land in the first)."""
    import statistics

    steady = hist[1:] or hist
    tr = statistics.median(float(h["images_per_s"]) for h in steady)
    va = [float(h["valid_images_per_s"]) for h in steady if h.get("valid_images_per_s") not in (None, "")]
    va = statistics.median(va) if va else tr
    n = SEED_JOB["galaxies"]
    n_train, n_valid = round(n * (1 - n_valid_frac)), round(n * n_valid_frac)
    seconds = SEED_JOB["epochs"] * (n_train / tr + n_valid / va)
    return {"galaxies": n, "epochs": SEED_JOB["epochs"], "train_images_per_s": round(tr, 1), "valid_images_per_s": round(va, 1),
            "projected_seconds": round(seconds, 2), "projected_minutes": round(seconds / 60, 2), "seed_minutes_p100": SEED_JOB["minutes_p100"],
            "speedup_vs_seed": round(SEED_JOB["minutes_p100"] * 60 / seconds, 2),
            "from_epochs": len(steady), "of": epochs}


def _recipe(p: Params, work: Path, loader: str, folder: Path) -> dict:
    """The full recipe through fastgal.run.train, in this process (peak GPU memory, utilisation)."""
    from fastgal.options import TrainConfig
    from fastgal.shards.read import Shards
    from fastgal.run import train

    cfg = TrainConfig(shards=work / "shards", out=folder, epochs=p.epochs, bs=p.bs, arch=p.arch, size=p.size,
                      tta=True, device=p.device, precision="bf16" if cuda(p) else "fp32", quiet=True,
                      overwrite=True, loader=loader)
    dev = _EpochDevice(cuda(p))
    t0 = time.perf_counter()
    try:
        m = train(cfg, cbs=[dev.callback()])
    finally:
        dev.close()
    wall = time.perf_counter() - t0
    hist = _history(folder)
    epochs = [{"epoch": int(h["epoch"]), "seconds": float(h["seconds"]), "train_images_per_s": float(h["images_per_s"]),
               "valid_images_per_s": float(h["valid_images_per_s"]) if h.get("valid_images_per_s") else None,
               "checkpoint_seconds": float(h["checkpoint_seconds"]) if h.get("checkpoint_seconds") else None, **d}
              for h, d in zip(hist, dev.rows + [{}] * (len(hist) - len(dev.rows)))]
    t = m["targets"][m["target"]]
    ref = (m.get("floor") or {}).get("observable_reference_rmse")
    model = _model_rate(p, work)
    proj = _projection(hist, Shards(work / "shards").manifest["split"]["valid_pct"], p.epochs)
    return {"run": str(folder), "epochs": p.epochs, "bs": p.bs, "precision": m["precision"],
            "loader_backend": m["loader_backend"], "loader_decode": m["loader_decode"],
            "fit_seconds": m["fit_seconds"], "wall_seconds": round(wall, 2), "per_epoch": epochs,
            # the epoch checkpoints (weights + optimizer state, written after each epoch's timing) against the fit
            "checkpoint_share": round(sum(e["checkpoint_seconds"] or 0 for e in epochs) / max(m["fit_seconds"], 1e-9), 3),
            "images_per_s_per_epoch": [e["train_images_per_s"] for e in epochs],
            "peak_gpu_memory_gib": max((e.get("peak_gpu_memory_gib") or 0 for e in epochs), default=None) if cuda(p) else None,
            "model_images_per_s": model,
            # end-to-end over model-only, both measured here: 1.0 = the data path keeps up with the model
            "data_bound_fraction": round(proj["train_images_per_s"] / model, 3) if model else None,
            "seed_job": proj,
            "metrics": {"rmse": t["rmse"], "tta_rmse": t.get("tta_rmse", float("nan")), "baseline_rmse": t["baseline_rmse"],
                        "floor_rmse": (m.get("floor") or {}).get("floor_rmse"),
                        # accuracy against what the images can reveal (issue 12): 1.0 = the tabular reference
                        "reference_rmse": ref, "rmse_over_reference": round(t["rmse"] / ref, 3) if ref else None}}


def work_recipe(p: Params, work: Path) -> dict:
    from fastgal.load.loader import pick_backend

    return _recipe(p, work, pick_backend("auto", p.device), work / "run")


def work_peer(p: Params, work: Path) -> dict:
    from fastgal.load.loader import dali_available

    if not dali_available():
        raise Skip("DALI not installed: the recipe step ran the batched loader already")
    return _recipe(p, work, "batched", work / "run-batched")


WORKERS = {"decode": work_decode, "equality": work_equality, "recipe": work_recipe, "peer": work_peer}
RUNNERS = {"env": step_env, "data": step_data, "recipe": step_recipe, "bench": step_bench, "predict": step_predict,
           "compile": step_compile, "peer": step_peer, "decode": step_decode, "equality": step_equality, "short": step_short}


def worker_main(name: str, p: Params, out: Path) -> None:
    """--worker NAME: the in-process part of a step; a Skip is reported in the result, not as a crash."""
    stop_on_sigterm()  # the step's timeout sends SIGTERM first: clean up as fastgal's own commands do
    try:
        res = WORKERS[name](p, out)
    except Skip as e:
        res = {"skip": str(e)}
    (out / "workers").mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "workers" / f"{name}.json", res)


# --------------------------------------------------------------------------- orchestration

def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_step(k: int, name: str, p: Params, work: Path, timeout: float) -> dict:
    """One step under its timeout; WORK/steps/<k>-<name>.json written as soon as it ends, whatever the verdict."""
    log = work / "logs" / f"{k}-{name}.log"
    log.unlink(missing_ok=True)
    t0, cpu0 = time.monotonic(), _children_cpu()
    rec = {"step": k, "name": name, "timeout_s": round(timeout, 1), "log": f"logs/{k}-{name}.log"}
    try:
        rec.update(verdict="ok", reason="", result=RUNNERS[name](Runner(log, t0 + timeout), p, work))
    except Skip as e:
        rec.update(verdict="skipped", reason=str(e))
    except StepTimeout as e:
        rec.update(verdict="timeout", reason=f"{e} ({timeout:.0f} s)")
    except StepError as e:
        rec.update(verdict="fail", reason=str(e), result=e.result)
    except Exception as e:  # a bug in the check itself must not stop the other steps
        rec.update(verdict="fail", reason=f"{type(e).__name__}: {e}")
    rec["seconds"] = round(time.monotonic() - t0, 2)
    rec["cpu_seconds"] = round(_children_cpu() - cpu0, 2)  # of its subprocesses: the load a step puts on a machine
    return rec


def headline(rec: dict) -> str:
    """The figure that matters for a step, for the table."""
    r = rec.get("result") or {}
    if rec["verdict"] != "ok":
        return rec["reason"]
    if rec["name"] == "data":
        return (f"synth {r['synth']['images_per_s']:,.0f} img/s ({r['synth_wall_s']} s), "
                f"shard {r['shard']['images_per_s']:,.0f} img/s ({r['shard_wall_s']} s)")
    if rec["name"] == "decode":
        def rate(k):
            return f"{r[k]:,.0f}" if r.get(k) else "-"
        dali = (f"; DALI mixed {rate('dali_mixed_images_per_s')}, cpu {rate('dali_cpu_images_per_s')} img/s"
                if "dali_cpu_images_per_s" in r else "; DALI skipped: not installed")
        px = r.get("torch_gpu_vs_cpu_pixels")
        px = f" (vs CPU: p99 {px['p99_abs']}, means {px['mean_signed_rgb']})" if px else ""
        return (f"{r['torch_decoder']} nvJPEG {rate('torch_gpu_images_per_s')}{px}, "
                f"cpu {rate('torch_cpu_images_per_s')} img/s{dali}")
    if rec["name"] == "equality":
        worst = max((c for c in r["comparisons"].values() if "p99_abs" in c), key=lambda c: c["p99_abs"])
        return f"{len(r['comparisons'])} comparisons; worst p99 |delta| {worst['p99_abs']}, max {worst['max_abs']}"
    if rec["name"] in ("recipe", "peer"):
        m, j = r["metrics"], r["seed_job"]
        peak, dbf = r["peak_gpu_memory_gib"], r["data_bound_fraction"]
        return (f"{r['loader_backend']} loader, decode on {r['loader_decode']}: {j['train_images_per_s']:,.0f} train / "
                f"{j['valid_images_per_s']:,.0f} valid img/s (model alone {r['model_images_per_s'] or float('nan'):,.0f}, "
                f"data-bound fraction {dbf if dbf is not None else '-'}); seed job (7 x 130k) projected "
                f"{j['projected_minutes']:.1f} min vs {j['seed_minutes_p100']} min on a P100 ({j['speedup_vs_seed']}x); "
                f"RMSE {m['rmse']:.4f} (TTA {m['tta_rmse']:.4f}) vs mean {m['baseline_rmse']:.4f}, "
                f"{m.get('rmse_over_reference')}x the observable reference; checkpoints {r['checkpoint_share']:.0%} of the fit"
                + (f"; peak {peak} GiB" if peak is not None else ""))
    if rec["name"] == "bench":
        b = r["bench"]
        e2e = ", ".join(f"{k} {v:.2f}" for k, v in b.get("e2e", {}).get("ratio_vs_baseline", {}).items())
        return f"model {b['model']['images_per_s']:,.0f} img/s; e2e x fastai: {e2e}"
    if rec["name"] == "compile":
        return (f"{r['arch']} {r['precision']}, --compile-mode {r['mode']}{' (CUDA graphs)' if r['cuda_graphs'] else ''}: "
                f"{r['compiled_images_per_s']:,.0f} img/s = {r['compiled_x_eager']:.2f}x eager "
                f"({r['eager_images_per_s']:,.0f}); first step {r['first_step_seconds']:.1f} s")
    if rec["name"] == "short":
        return "; ".join(f"{k}: {v['epochs']} epoch(s), losses finite, {max(v['images_per_s']):,.0f} img/s" for k, v in r.items())
    if rec["name"] == "predict":
        return (f"valid max |delta| {r['valid_vs_predictions_valid_max_abs_dex']:.4f} dex, "
                f"{r['n_jpegs']} JPEGs vs shards {r['jpegs_vs_shards_tta_max_abs_dex']:.4f} dex")
    return r.get("note", "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="results folder: summary.json, summary.txt, steps.tar.gz (3 files)")
    ap.add_argument("--work", type=Path, help="work folder for the survey, shards, runs and logs [OUT-work, beside OUT]")
    ap.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny sizes")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset, e.g. recipe,predict")
    ap.add_argument("--timeout", action="append", default=[], metavar="STEP=S", help="a step's timeout, seconds")
    ap.add_argument("--overwrite", action="store_true", help="empty OUT and the work folder first")
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    for f in fields(Params):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None, help=f"[{f.default}]")
    a = ap.parse_args(argv)
    if a.worker:
        worker_main(a.worker, Params(**json.loads(a.params)), a.out)
        return 0
    # a plain `kill` of the check ends the step running now as well (Runner kills its process group)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = replace(Params(), **DRY) if a.dry_run else Params()
    p = replace(p, **{f.name: getattr(a, f.name) for f in fields(Params) if getattr(a, f.name) is not None})
    timeouts = {s: DRY_TIMEOUT if a.dry_run else TIMEOUTS[s] for s in STEPS}
    for t in a.timeout:
        s, _, v = t.partition("=")
        if s not in timeouts:
            ap.error(f"--timeout {t}: no step {s!r} (steps: {', '.join(STEPS)})")
        timeouts[s] = float(v)
    chosen = [s.strip() for s in a.steps.split(",") if s.strip()]
    if set(chosen) - set(STEPS):
        ap.error(f"--steps: unknown {sorted(set(chosen) - set(STEPS))} (steps: {', '.join(STEPS)})")
    total = sum(timeouts[s] for s in chosen)
    if not a.dry_run and total > p.budget:
        ap.error(f"the chosen steps' timeouts sum to {total:.0f} s, more than --budget {p.budget:.0f} s: "
                 "lower some with --timeout STEP=S or raise --budget")
    if a.dry_run:  # one torch thread per process: on 2 busy cores, two threads each run several times slower
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = a.work or a.out.with_name(a.out.name + "-work")
    if work.resolve() == a.out.resolve() or a.out.resolve() in work.resolve().parents:
        ap.error(f"--work {work} must not be OUT or inside it: OUT holds the results only")
    if a.overwrite:
        shutil.rmtree(a.out, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    for d in (a.out, work / "logs", work / "steps"):
        d.mkdir(parents=True, exist_ok=True)
    return orchestrate(a.out, work, p, chosen, timeouts, a.dry_run)


def _results(out: Path, work: Path, recs: list[dict], p: Params, timeouts: dict, dry: bool, t0: float,
             final: bool) -> dict:
    """OUT's three files, rewritten after every step (an outer limit that kills the check leaves the steps
    done so far): summary.json, summary.txt (the table) and steps.tar.gz (each step's JSON and log)."""
    import tarfile

    bad = [r for r in recs if r["verdict"] in ("fail", "timeout")]
    summary = {"ok": not bad and final, "finished": final, "dry_run": dry, "wall_seconds": round(time.monotonic() - t0, 1),
               "work": str(work), "params": asdict(p), "timeouts_s": timeouts,
               "steps": [{k: r[k] for k in ("step", "name", "verdict", "reason", "seconds")} | {"headline": headline(r)}
                         for r in recs]}
    write_json_atomic(out / "summary.json", summary)
    lines = [f"{'step':<12}{'verdict':<9}{'seconds':>8}{'cpu s':>8}  headline / reason"]
    lines += [f"{r['step']} {r['name']:<10}{r['verdict']:<9}{r['seconds']:>8.1f}{r.get('cpu_seconds', 0):>8.1f}  {headline(r)}"
              for r in recs]
    lines.append(f"{'ok' if summary['ok'] else 'FAILED' if bad else 'unfinished'}: {len(recs) - len(bad)} of "
                 f"{len(recs)} steps ok or skipped in {summary['wall_seconds']} s; each step's JSON and log in "
                 f"{out}/steps.tar.gz, the survey, shards and runs in {work}")
    write_bytes_atomic(out / "summary.txt", ("\n".join(lines) + "\n").encode())
    with atomic_path(out / "steps.tar.gz") as tmp:
        with tarfile.open(tmp, "w:gz") as tar:
            for r in recs:
                for f in (work / "steps" / f"{r['step']}-{r['name']}.json", work / "logs" / f"{r['step']}-{r['name']}.log"):
                    if f.is_file():
                        tar.add(f, arcname=f"{f.parent.name}/{f.name}")
    return summary


def orchestrate(out: Path, work: Path, p: Params, chosen: list[str], timeouts: dict, dry: bool) -> int:
    t0 = time.monotonic()
    recs = []
    for k, name in enumerate(STEPS):
        left = p.budget - (time.monotonic() - t0)
        if name not in chosen:
            rec = {"step": k, "name": name, "verdict": "skipped", "reason": "not in --steps", "seconds": 0}
        elif left < 5:
            rec = {"step": k, "name": name, "verdict": "skipped", "reason": f"--budget {p.budget:.0f} s spent", "seconds": 0}
        else:
            print(f"[{k}] {name} (timeout {min(timeouts[name], left):.0f} s) ...", file=sys.stderr, flush=True)
            rec = run_step(k, name, p, work, min(timeouts[name], left))
        write_json_atomic(work / "steps" / f"{k}-{name}.json", rec)
        recs.append(rec)
        print(f"[{k}] {name}: {rec['verdict']} {headline(rec)}", file=sys.stderr, flush=True)
        _results(out, work, recs, p, timeouts, dry, t0, final=False)
    summary = _results(out, work, recs, p, timeouts, dry, t0, final=True)
    print((out / "summary.txt").read_text(), end="")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
