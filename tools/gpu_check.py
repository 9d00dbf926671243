#!/usr/bin/env python
"""The GPU check: one command that answers whether fastgal's GPU path works, and how fast, in 330 s.

    python tools/gpu_check.py /tmp/gpu-check                 # a CUDA machine (sized for an H200, 16 cores)
    python tools/gpu_check.py /tmp/gpu-check --dry-run       # anywhere: tiny sizes, CPU placement

It needs fastgal, fastai and webdataset beside torch; DALI only where it is installed (a box with torch
alone: `python tools/wheelhouse.py` on a machine with an index, then the README's "Checking fastgal on a
GPU box"). Every step runs plain `fastgal ...` commands in subprocesses under its own timeout; the
measurements live in the package (`fastgal bench --what decode,equality,...`, history.csv's per-epoch GPU
columns), so a user can run any of them alone. STEPS below lists them, the most valuable answers first; each
is one Step(name, timeout, run, headline): to add a step, write its run(ctx) -> dict and add one entry.

Verdicts: ok / fail / timeout / skipped, each with its reason. Exit status 1 when any step failed or timed
out. Results: OUT holds three files, rewritten after every step so an outer limit leaves what was done:
summary.json, summary.txt (the table) and steps.tar.gz (each step's JSON and log). The survey, shards, runs
and logs go to the work folder (--work, default OUT-work beside OUT). `--budget` (330 s) caps the whole run
and the steps' timeouts (seconds, `--timeout STEP=S`) must fit inside it. `--dry-run` runs every step on the
CPU with tiny sizes (steps that need CUDA run their CPU equivalent), so tests/test_gpu_check.py and
tests/test_wheelhouse.py keep this script from rotting.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

try:
    import fastgal  # noqa: F401
except ImportError:  # a checkout that is not installed: use it, and tell the subprocesses too
    _root = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, _root)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_root, os.environ.get("PYTHONPATH")]))
from fastgal.recipe import RECIPE  # noqa: E402
from fastgal.util import atomic_path, write_bytes_atomic, write_json_atomic  # noqa: E402

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
    equality_batches: int = 8  # batches of bs per view and pair
    bench_batches: int = 30
    bench_warmup: int = 5
    bench_repeats: int = 2
    jpegs: int = 500
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


# --------------------------------------------------------------------------- what a step runs with

class Ctx:
    """One step's world: the sizes (p), the work folder, the results of the steps before it (done), and its
    commands, run under the step's deadline with their stderr in the step's log."""

    def __init__(self, p: Params, work: Path, log: Path, deadline: float, done: dict):
        self.p, self.work, self.log, self.deadline, self.done = p, work, log, deadline, done
        self.cuda = p.device == "cuda"

    def __call__(self, cmd: list, what: str) -> str:
        """Run cmd to completion within the step's deadline; its stdout (stderr goes to the log)."""
        cmd = [str(c) for c in cmd]
        with open(self.log, "a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            start = log.tell()
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
                if isinstance(e, subprocess.TimeoutExpired):  # how far it got: its last progress line
                    raise StepTimeout(f"{what} still running at the step's timeout; its last line: "
                                      f"{self.last_line(start) or 'none'}") from None
                raise
        if proc.returncode != 0:
            raise StepError(f"{what} exited {proc.returncode}: {self.last_line(0) or 'no output'}")
        return out

    def fastgal(self, *args) -> dict:
        """`python -m fastgal ARGS --json` -> its JSON."""
        return json.loads(self([sys.executable, "-m", "fastgal", *args, "--json"], f"fastgal {args[0]}"))

    def last_line(self, start: int) -> str:
        with open(self.log, errors="replace") as f:
            f.seek(start)
            lines = [ln.strip() for ln in f.read().splitlines() if ln.strip() and not ln.startswith("$ ")]
        return lines[-1][:300] if lines else ""

    def shards(self) -> Path:
        if not (self.work / "shards" / "manifest.json").is_file():
            raise Skip("needs the data step's shards (WORK/shards)")
        return self.work / "shards"


@dataclass
class Step:
    """A step of the check: its name, its timeout (seconds on an H200 with 16 cores: estimates, summing to the
    330 s budget, so that a 15-minute device session can run the whole check twice with its start-up), what
    it runs (ctx -> result dict; Skip or StepError to say why not) and the headline of its result."""

    name: str
    timeout: float
    run: Callable[[Ctx], dict]
    headline: Callable[[dict], str]


# --------------------------------------------------------------------------- the steps

def env(ctx: Ctx) -> dict:
    info = ctx.fastgal("env")
    ctx([sys.executable, "-c", "import fastai.callback.channelslast"], "import fastai.callback.channelslast")
    if ctx.cuda and not info["torch"]["cuda_available"]:
        raise StepError("torch cannot use a GPU here: " + ("; ".join(info["warnings"]) or "no NVIDIA device found"))
    return {"env": info, "channelslast_import": True}


def data(ctx: Ctx) -> dict:
    p, w = ctx.p, ctx.work
    t0 = time.perf_counter()
    synth = ctx.fastgal("synth", w / "survey", "--n", p.n, "--size", p.image, "--seed", 1, "--quiet", "--overwrite")
    t1 = time.perf_counter()
    shard = ctx.fastgal("shard", w / "survey/data/master.csv", w / "survey/images", w / "shards", "--crop", p.crop,
                        "--shard-size", p.shard_size, "--quiet", "--overwrite")
    t2 = time.perf_counter()
    if shard["rejected"]:
        raise StepError(f"{shard['rejected']} synthetic galaxies rejected: {shard['rejects_by_reason']}")
    return {"synth": synth, "shard": shard, "synth_wall_s": round(t1 - t0, 2), "shard_wall_s": round(t2 - t1, 2)}


def _history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def _num(v):
    return float(v) if v not in (None, "") else None


def _projection(hist: list[dict], valid_frac: float, epochs: int) -> dict:
    """The seed's full job (7 epochs over ~130,000 galaxies) at this run's steady-state rates: the median of
    every epoch after the first (cuDNN autotuning, allocator warm-up and worker start land in the first)."""
    steady = hist[1:] or hist
    tr = statistics.median(float(h["images_per_s"]) for h in steady)
    va = [_num(h.get("valid_images_per_s")) for h in steady if _num(h.get("valid_images_per_s"))]
    va = statistics.median(va) if va else tr
    n = SEED_JOB["galaxies"]
    seconds = SEED_JOB["epochs"] * (round(n * (1 - valid_frac)) / tr + round(n * valid_frac) / va)
    return {"galaxies": n, "epochs": SEED_JOB["epochs"], "train_images_per_s": round(tr, 1), "valid_images_per_s": round(va, 1),
            "projected_seconds": round(seconds, 2), "projected_minutes": round(seconds / 60, 2),
            "seed_minutes_p100": SEED_JOB["minutes_p100"], "speedup_vs_seed": round(SEED_JOB["minutes_p100"] * 60 / seconds, 2),
            "from_epochs": len(steady), "of": epochs}


def _model_rate(ctx: Ctx) -> float:
    """Model-only images/s (`fastgal bench --what model`: forward + backward + step on one synthetic batch
    reused on the device): what no data path can beat."""
    p = ctx.p
    b = ctx.fastgal("bench", ctx.shards(), "--what", "model", "--arch", p.arch, "--bs", p.bs, "--size", p.size,
                    "--device", p.device, "--batches", p.model_batches, "--warmup", p.model_warmup, "--repeats", 1,
                    "--quiet")
    return b["model"]["images_per_s"]


def _recipe(ctx: Ctx, loader: str, folder: Path, model_rate: float | None) -> dict:
    """The recipe (`fastgal train --tta`, bf16 on a GPU) with `loader`: per epoch from history.csv (on CUDA
    with its peak GPU memory and utilisation columns), the seed job's projection, RMSE against references."""
    p = ctx.p
    t0 = time.perf_counter()
    m = ctx.fastgal("train", ctx.shards(), "--out", folder, "--epochs", p.epochs, "--bs", p.bs, "--arch", p.arch,
                    "--size", p.size, "--tta", "--device", p.device, "--precision", "bf16" if ctx.cuda else "fp32",
                    "--loader", loader, "--quiet", "--overwrite")
    wall = time.perf_counter() - t0
    hist = _history(folder)
    epochs = [{"epoch": int(h["epoch"]), "seconds": float(h["seconds"]), "train_images_per_s": float(h["images_per_s"]),
               "valid_images_per_s": _num(h.get("valid_images_per_s")), "checkpoint_seconds": _num(h.get("checkpoint_seconds")),
               "peak_gpu_memory_gib": _num(h.get("peak_gpu_memory_gib")), "gpu_utilisation_pct": _num(h.get("gpu_utilisation_pct"))}
              for h in hist]
    model_rate = model_rate or _model_rate(ctx)
    valid_frac = json.loads((ctx.shards() / "manifest.json").read_text())["split"]["valid_pct"]
    proj = _projection(hist, valid_frac, p.epochs)
    t = m["targets"][m["target"]]
    ref = (m.get("floor") or {}).get("observable_reference_rmse")
    peaks = [e["peak_gpu_memory_gib"] for e in epochs if e["peak_gpu_memory_gib"] is not None]
    res = {"run": str(folder), "epochs": p.epochs, "bs": p.bs, "precision": m["precision"],
           "loader_backend": m["loader_backend"], "loader_decode": m["loader_decode"],
           "fit_seconds": m["fit_seconds"], "wall_seconds": round(wall, 2), "per_epoch": epochs,
           # the epoch checkpoints (weights + optimizer state, written after each epoch's timing) against the fit
           "checkpoint_share": round(sum(e["checkpoint_seconds"] or 0 for e in epochs) / max(m["fit_seconds"], 1e-9), 3),
           "peak_gpu_memory_gib": max(peaks) if peaks else None, "model_images_per_s": model_rate,
           # end-to-end over model-only: 1.0 = the data path keeps up with the model
           "data_bound_fraction": round(proj["train_images_per_s"] / model_rate, 3) if model_rate else None,
           "seed_job": proj,
           "metrics": {"rmse": t["rmse"], "tta_rmse": t.get("tta_rmse", float("nan")), "baseline_rmse": t["baseline_rmse"],
                       "floor_rmse": (m.get("floor") or {}).get("floor_rmse"),
                       # accuracy against what the images can reveal (issue 12): 1.0 = the tabular reference
                       "reference_rmse": ref, "rmse_over_reference": round(t["rmse"] / ref, 3) if ref else None}}
    if not all(math.isfinite(res["metrics"][k]) for k in ("rmse", "tta_rmse")):
        raise StepError(f"non-finite RMSE {t['rmse']} / TTA {res['metrics']['tta_rmse']}", res)
    if p.epochs >= 3 and not t["rmse"] < t["baseline_rmse"]:  # one tiny epoch (the dry run) need not learn
        raise StepError(f"RMSE {t['rmse']:.4f} is no better than predicting the mean ({t['baseline_rmse']:.4f})", res)
    return res


def recipe(ctx: Ctx) -> dict:
    """The recipe with what --loader auto takes here (DALI where installed, else torch): WORK/run."""
    return _recipe(ctx, "auto", ctx.work / "run", None)


def peer(ctx: Ctx) -> dict:
    """The recipe again with the torch loader, DALI's peer, where DALI is installed."""
    dali = (ctx.done.get("env") or {}).get("env", {}).get("dali", {}).get("importable")
    if dali is None:  # the env step did not run: ask this Python
        dali = subprocess.run([sys.executable, "-c", "import nvidia.dali"], capture_output=True).returncode == 0
    if not dali:
        raise Skip("DALI not installed: the recipe step ran the torch loader already")
    return _recipe(ctx, "torch", ctx.work / "run-torch", (ctx.done.get("recipe") or {}).get("model_images_per_s"))


def recipe_headline(r: dict) -> str:
    m, j, peak, dbf = r["metrics"], r["seed_job"], r["peak_gpu_memory_gib"], r["data_bound_fraction"]
    util = [e["gpu_utilisation_pct"] for e in r["per_epoch"] if e["gpu_utilisation_pct"] is not None]
    return (f"{r['loader_backend']} loader, decode on {r['loader_decode']}: {j['train_images_per_s']:,.0f} train / "
            f"{j['valid_images_per_s']:,.0f} valid img/s (model alone {r['model_images_per_s'] or float('nan'):,.0f}, "
            f"train / model {dbf if dbf is not None else '-'}); seed job (7 x 130k) projected "
            f"{j['projected_minutes']:.1f} min vs {j['seed_minutes_p100']} min on a P100 ({j['speedup_vs_seed']}x); "
            f"RMSE {m['rmse']:.4f} (TTA {m['tta_rmse']:.4f}) vs mean {m['baseline_rmse']:.4f}, "
            f"{m.get('rmse_over_reference')}x the observable reference; checkpoints {r['checkpoint_share']:.0%} of the fit"
            + (f"; peak {peak} GiB" if peak is not None else "") + (f", GPU busy {max(util):.0f}%" if util else ""))


def bench(ctx: Ctx) -> dict:
    """`fastgal bench --what step,model,loaders,e2e`: every loader and fastai's peer; then the recipe's model
    eager and compiled (--compile-mode, reduce-overhead = CUDA graphs on a GPU) in one process: the ratio and
    the first step's seconds. The compile run is not --quiet: a timeout names the last line it reached."""
    p, sh = ctx.p, ctx.shards()
    args = ["bench", sh, "--device", p.device, "--bs", p.bs, "--size", p.size, "--arch", p.arch,
            "--batches", p.bench_batches, "--warmup", p.bench_warmup, "--repeats", p.bench_repeats]
    res = {"bench": ctx.fastgal(*args, "--what", "step,model,loaders,e2e", "--quiet")}
    m = ctx.fastgal(*args, "--what", "model", "--compile", "--compile-mode", p.compile_mode)["model"]
    res["compile"] = {"mode": p.compile_mode, "cuda_graphs": m["compiled"]["cuda_graphs"], "arch": m["arch"],
                      "precision": m["precision"], "eager_images_per_s": m["compiled"]["eager"]["images_per_s"],
                      "compiled_images_per_s": m["images_per_s"], "compiled_x_eager": m["compiled"]["x_eager"],
                      "first_step_seconds": m["compiled"]["first_step_seconds"]}
    return res


def bench_headline(r: dict) -> str:
    b, c = r["bench"], r["compile"]
    e2e = ", ".join(f"{k} {v:.2f}" for k, v in b.get("e2e", {}).get("ratio_vs_baseline", {}).items())
    return (f"model {b['model']['images_per_s']:,.0f} img/s; e2e x fastai: {e2e}; {c['arch']} {c['precision']} "
            f"--compile-mode {c['mode']}{' (CUDA graphs)' if c['cuda_graphs'] else ''}: {c['compiled_x_eager']:.2f}x "
            f"eager ({c['eager_images_per_s']:,.0f} img/s), first step {c['first_step_seconds']:.1f} s")


def _read_csv(path: Path) -> dict:
    with open(path) as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def _max_diff(a: dict, b: dict, cols: list[str]) -> float:
    return max(abs(float(a[i][c]) - float(b[i][c])) for i in a for c in cols)


def predict(ctx: Ctx) -> dict:
    """`fastgal predict` on the valid shards (= predictions_valid.csv) and on JPEGs of the same galaxies with --tta."""
    p, w, sh, rd = ctx.p, ctx.work, ctx.shards(), ctx.work / "run"
    if not (rd / "metrics.json").is_file():
        raise Skip("needs the recipe step's run (WORK/run)")
    ref = _read_csv(rd / "predictions_valid.csv")
    cols = [c for c in next(iter(ref.values())) if c.startswith("pred_")]
    s = ctx.fastgal("predict", rd, sh, "--split", "valid", "--tta", "--device", p.device, "--out", w / "pred_valid.csv")
    got = _read_csv(w / "pred_valid.csv")
    if list(got) != list(ref):
        raise StepError("predict's ids differ from predictions_valid.csv's (order or set)")
    jp = w / "jpegs"
    shutil.rmtree(jp, ignore_errors=True)
    jp.mkdir()
    ids = list(ref)[: p.jpegs]  # validation galaxies: their shard predictions are the reference
    for i in ids:
        shutil.copy(w / "survey/images" / f"{i}.jpg", jp / f"{i}.jpg")
    j = ctx.fastgal("predict", rd, jp, "--tta", "--device", p.device, "--out", w / "pred_jpegs.csv")
    jrows = _read_csv(w / "pred_jpegs.csv")
    res = {"valid": s, "jpegs": j, "n_jpegs": len(ids), "tolerance_dex": p.predict_tol,
           "valid_vs_predictions_valid_max_abs_dex": _max_diff(got, ref, cols),
           "jpegs_vs_shards_tta_max_abs_dex": _max_diff({i: jrows[i] for i in ids}, got, [c for c in cols if c.startswith("pred_tta_")]),
           "unusable_jpegs": sum(r["status"] != "ok" for r in jrows.values())}
    worst = max(res["valid_vs_predictions_valid_max_abs_dex"], res["jpegs_vs_shards_tta_max_abs_dex"])
    if res["unusable_jpegs"] or worst > p.predict_tol:
        raise StepError(f"predictions differ by up to {worst:.4f} dex (tolerance {p.predict_tol}); "
                        f"{res['unusable_jpegs']} unusable JPEGs", res)
    return res


def decode(ctx: Ctx) -> dict:
    """`fastgal bench --what decode`: the JPEG decoders alone (torch's batched decode, DALI's where installed)."""
    p = ctx.p
    return ctx.fastgal("bench", ctx.shards(), "--what", "decode", "--device", p.device, "--bs", p.decode_bs,
                       "--batches", p.decode_batches, "--warmup", 2, "--repeats", 1, "--quiet")["decode"]


def decode_headline(r: dict) -> str:
    rates = ", ".join(f"{k} {v['images_per_s']:,.0f}" for k, v in r["results"].items())
    px = r.get("torch_gpu_vs_cpu_pixels")
    px = f"; nvJPEG vs CPU pixels max {px['max_abs']}, means {px['mean_signed_rgb']}" if px else ""
    return f"{r.get('torch_decoder', '')} decode img/s: {rates or '-'}{px}" + "".join(
        f"; {k} skipped: {why}" for k, why in r["skipped"].items())


def equality(ctx: Ctx) -> dict:
    """`fastgal bench --what equality`: torch vs DALI, centre and TTA views exact, training views
    within one grey level; on CUDA also the GPU against the CPU."""
    p = ctx.p
    r = ctx.fastgal("bench", ctx.shards(), "--what", "equality", "--device", p.device, "--bs", p.bs, "--size", p.size,
                    "--batches", p.equality_batches, "--quiet")["equality"]
    if r["ok"] is None:
        raise Skip("; ".join(r["skipped"].values()))
    if not r["ok"]:
        raise StepError(f"{len(r['problems'])} problem(s), first {r['problems'][0]}", r)
    return r


def equality_headline(r: dict) -> str:
    worst = max(r["comparisons"].values(), key=lambda c: c["max_abs"])
    return (f"{len(r['comparisons'])} comparisons ok; worst max |delta| {worst['max_abs']} "
            f"({worst['fraction_differing']:.4%} of values differ)")


def short(ctx: Ctx) -> dict:
    """One epoch in fp16 (the loss must stay finite); the torch loader on a GPU is in the bench step."""
    p = ctx.p
    prec = "fp16" if ctx.cuda else "fp32"  # fp16 needs a GPU: the dry run checks the path in fp32
    name, rd = f"{prec}_epoch", ctx.work / f"run-{prec}_epoch"
    m = ctx.fastgal("train", ctx.shards(), "--out", rd, "--epochs", 1, "--precision", prec, "--bs", p.bs, "--arch",
                    p.arch, "--size", p.size, "--device", p.device, "--quiet", "--overwrite")
    hist = _history(rd)
    losses = [float(h[k]) for h in hist for k in ("train_loss", "valid_loss")]
    res = {name: {"rmse": m["rmse"], "losses": losses, "epochs": len(hist), "loader_backend": m["loader_backend"],
                  "precision": m["precision"], "images_per_s": [float(h["images_per_s"]) for h in hist]}}
    if not all(math.isfinite(v) for v in losses + [m["rmse"]]):
        raise StepError(f"{name}: a loss is not finite: {losses}", res)
    return res


# The most valuable answers first: does it run, how fast is the recipe, how does it compare, does predict
# agree. Adding a step: one entry here.
STEPS = [
    Step("env", 10, env, lambda r: f"torch {r['env']['torch']['version']}, GPUs {r['env']['torch']['device_count']}, "
                                   f"DALI {'importable' if r['env']['dali']['importable'] else 'not importable'}; "
                                   f"{len(r['env']['warnings'])} warning(s)"),
    Step("data", 30, data, lambda r: f"synth {r['synth']['images_per_s']:,.0f} img/s ({r['synth_wall_s']} s), "
                                     f"shard {r['shard']['images_per_s']:,.0f} img/s ({r['shard_wall_s']} s)"),
    Step("recipe", 95, recipe, recipe_headline),
    Step("bench", 90, bench, bench_headline),
    Step("predict", 20, predict, lambda r: f"valid max |delta| {r['valid_vs_predictions_valid_max_abs_dex']:.4f} dex, "
                                           f"{r['n_jpegs']} JPEGs vs shards {r['jpegs_vs_shards_tta_max_abs_dex']:.4f} dex"),
    Step("peer", 40, peer, recipe_headline),
    Step("decode", 15, decode, decode_headline),
    Step("equality", 20, equality, equality_headline),
    Step("short", 10, short, lambda r: "; ".join(f"{k}: {v['epochs']} epoch(s), losses finite, "
                                                 f"{max(v['images_per_s']):,.0f} img/s" for k, v in r.items())),
]


# --------------------------------------------------------------------------- orchestration

def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_step(k: int, step: Step, p: Params, work: Path, timeout: float, done: dict) -> dict:
    """One step under its timeout; WORK/steps/<k>-<name>.json written as soon as it ends, whatever the verdict."""
    log = work / "logs" / f"{k}-{step.name}.log"
    log.unlink(missing_ok=True)
    log.touch()
    t0, cpu0 = time.monotonic(), _children_cpu()
    rec = {"step": k, "name": step.name, "timeout_s": round(timeout, 1), "log": f"logs/{k}-{step.name}.log"}
    try:
        rec.update(verdict="ok", reason="", result=step.run(Ctx(p, work, log, t0 + timeout, done)))
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
    """The figure that matters for a step, for the table; the reason where it did not run to ok."""
    if rec["verdict"] != "ok":
        return rec["reason"]
    try:
        return next(s for s in STEPS if s.name == rec["name"]).headline(rec["result"])
    except Exception as e:  # a result without a figure the headline expects: say so, keep the table
        return f"(no headline: {type(e).__name__}: {e})"


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
    t0, recs, done = time.monotonic(), [], {}
    for k, step in enumerate(STEPS):
        left = p.budget - (time.monotonic() - t0)
        if step.name not in chosen:
            rec = {"step": k, "name": step.name, "verdict": "skipped", "reason": "not in --steps", "seconds": 0}
        elif left < 5:
            rec = {"step": k, "name": step.name, "verdict": "skipped", "reason": f"--budget {p.budget:.0f} s spent", "seconds": 0}
        else:
            print(f"[{k}] {step.name} (timeout {min(timeouts[step.name], left):.0f} s) ...", file=sys.stderr, flush=True)
            rec = run_step(k, step, p, work, min(timeouts[step.name], left), done)
            if rec["verdict"] == "ok":
                done[step.name] = rec["result"]
        write_json_atomic(work / "steps" / f"{k}-{step.name}.json", rec)
        recs.append(rec)
        print(f"[{k}] {step.name}: {rec['verdict']} {headline(rec)}", file=sys.stderr, flush=True)
        _results(out, work, recs, p, timeouts, dry, t0, final=False)
    summary = _results(out, work, recs, p, timeouts, dry, t0, final=True)
    print((out / "summary.txt").read_text(), end="")
    return 0 if summary["ok"] else 1


def main(argv=None) -> int:
    names = [s.name for s in STEPS]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="results folder: summary.json, summary.txt, steps.tar.gz (3 files)")
    ap.add_argument("--work", type=Path, help="work folder for the survey, shards, runs and logs [OUT-work, beside OUT]")
    ap.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny sizes")
    ap.add_argument("--steps", default=",".join(names), help="comma-separated subset, e.g. recipe,predict")
    ap.add_argument("--timeout", action="append", default=[], metavar="STEP=S", help="a step's timeout, seconds")
    ap.add_argument("--overwrite", action="store_true", help="empty OUT and the work folder first")
    for f in fields(Params):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None, help=f"[{f.default}]")
    a = ap.parse_args(argv)
    # a plain `kill` of the check ends the step running now as well (Ctx kills its process group)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = replace(Params(), **DRY) if a.dry_run else Params()
    p = replace(p, **{f.name: getattr(a, f.name) for f in fields(Params) if getattr(a, f.name) is not None})
    timeouts = {s.name: DRY_TIMEOUT if a.dry_run else s.timeout for s in STEPS}
    for t in a.timeout:
        s, _, v = t.partition("=")
        if s not in timeouts:
            ap.error(f"--timeout {t}: no step {s!r} (steps: {', '.join(names)})")
        timeouts[s] = float(v)
    chosen = [s.strip() for s in a.steps.split(",") if s.strip()]
    if set(chosen) - set(names):
        ap.error(f"--steps: unknown {sorted(set(chosen) - set(names))} (steps: {', '.join(names)})")
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


if __name__ == "__main__":
    sys.exit(main())
