"""`fastgal bench --what step`: the host cost of one training step, with the arithmetic taken out.

    fastgal bench shards/synth --what step --repeats 15 --batches 30 --warmup 3 --json

On a GPU at 112 px and bs 128 the model's forward and backward take a few ms, so what the CPU does
per step decides the speed, and no CPU wall-clock shows it (there the convolutions dominate). This
section builds the Learner exactly as `fastgal train` does (make_learner: callbacks, optimizer, loss,
metrics, fit_one_cycle, best-epoch callback) around a thin model (the same layers and parameter
tensors, every channel count / 16) on tiny synthetic batches, on one torch thread, and reports per step:
ms split into fastai loop + callbacks / forward + backward / optimizer step; aten ops per phase
(counted with a TorchDispatchMode: on a GPU each non-view op is a kernel launch); and would-be device
syncs (Tensor.item/.cpu/.tolist/.numpy/bool/float/int while the step runs). The same figures for
stock fastai's configuration (fastai's ranger, Recorder and AccumMetric) come from the same run, with
their ratio, and the GPU ceiling they imply (bs / host ms).
"""

from __future__ import annotations

import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from fastai.vision.models import xresnet
from torch import nn

from fastgal.bench.common import PEER, SyntheticLoader, fork_safe, sync
from fastgal.options import BenchConfig
from fastgal.recipe import RECIPE

STEP_WIDTH = 1 / 16  # channel scale of the thin model: xresnet34 keeps its 118 parameter tensors, ~84k weights
STEP_BATCH = (8, 3, 32, 32)  # tiny synthetic inputs: what is timed is Python, dispatch and fastai, not arithmetic
# (the channel count is the shards': 3 for JPEGs, one per band for FITS shards)
COUNT_STEPS = 60  # steps of the counting pass: 10 Lookahead syncs (k=6) and 3 loss reads (every 20)
SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")  # each one waits for a GPU
STEP_CONFIGS = {  # name -> optimizer; "fastai" is the peer: stock fastai's Learner, ranger, Recorder, AccumMetric
    "fastgal": {},
    PEER: {"opt": "fastai-ranger"},
}


def stock_learner(dls, model, *, targets, path, precision="fp32", channels_last=False):
    """The peer: stock fastai's Learner, `ranger`, Recorder and AccumMetric (which read the loss and the
    predictions back to the CPU every batch), with fastgal's callbacks (learner.dress), as train's would be."""
    from fastai.learner import Learner
    from fastai.optimizer import ranger

    from fastgal.train.learner import dress
    from fastgal.train.loop import target_metrics
    from fastgal.train.model import rmse_loss

    learn = Learner(dls, model, loss_func=rmse_loss, opt_func=ranger, metrics=target_metrics(targets, on_device=False),
                    path=path, model_dir=".")
    return dress(learn, precision=precision, channels_last=channels_last, quiet=True)




class _ThinXResNet(xresnet.XResNet):
    """XResNet with every channel count (stem and all stages) scaled by `width`: the same layers and
    parameter tensors, a fraction of the arithmetic (for timing the host side of a step)."""

    def __init__(self, *args, width: float, **kwargs):
        self._width = width
        super().__init__(*args, stem_szs=tuple(max(1, int(c * width)) for c in (32, 32, 64)), widen=width, **kwargs)

    def _make_blocks(self, layers, block_szs, sa, stride, **kwargs):
        # XResNet fixes the first stage's input at 64 // expansion; scale it with the stem
        return super()._make_blocks(layers, [max(1, int(block_szs[0] * self._width))] + block_szs[1:], sa, stride,
                                    **kwargs)


def thin_model(arch: str, n_out: int, mean, std, width: float = STEP_WIDTH, c_in: int = 3) -> nn.Module:
    """make_model's network with every channel count scaled by `width`: the same layer graph and parameter
    tensors (what the host works through per step), a fraction of the arithmetic; c_in input channels."""
    from fastgal.train.model import ARCHS, Denormalize

    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    # xresnetNN = _xresnet(pretrained, expansion, layers): read both off a tiny build
    probe = ARCHS[arch](n_out=n_out, sa=True, act_cls=nn.Mish, widen=1 / 64, stem_szs=(1, 1, 1))
    layers = [len(stage) for stage in list(probe.children())[4:-4]]
    body = _ThinXResNet(xresnet.ResBlock, probe.expansion, layers, c_in=c_in, n_out=n_out, sa=True, act_cls=nn.Mish,
                        width=width)
    return nn.Sequential(body, Denormalize(mean, std))


class _StepProbe:
    """Puts every moment of a training step in one phase: fwd_bwd (model forward, loss, backward), opt
    (optimizer step and zero_grad) or loop (everything else: the fastai loop and its callbacks).

    Wraps the Learner's own pieces (forward hooks on the model, loss_func, _backward, _step and
    opt.zero_grad) without changing what they do; `seconds` accumulates host time per phase and
    `phase` names the current one (the op counter reads it).
    """

    def __init__(self, learn):
        self.phase, self.seconds, self._t0 = "loop", {"fwd_bwd": 0.0, "opt": 0.0}, None
        # outside what --compile traces: the hooks run eagerly around the compiled forward
        learn.model.register_forward_pre_hook(torch.compiler.disable(lambda *a: self._enter("fwd_bwd")))
        learn.model.register_forward_hook(torch.compiler.disable(lambda *a: self._exit()))
        learn.loss_func = self._wrap(learn.loss_func, "fwd_bwd")
        learn._backward = self._wrap(learn._backward, "fwd_bwd")
        learn._step = self._wrap(learn._step, "opt")
        learn.opt.zero_grad = self._wrap(learn.opt.zero_grad, "opt")

    def _enter(self, phase):
        self.phase, self._t0 = phase, time.perf_counter()

    def _exit(self):
        self.seconds[self.phase] += time.perf_counter() - self._t0
        self.phase = "loop"

    def _wrap(self, f, phase):
        def timed(*args, **kwargs):
            self._enter(phase)
            try:
                return f(*args, **kwargs)
            finally:
                self._exit()

        return timed


@contextmanager
def count_syncs(counts: dict, sites: dict | None = None):
    """Count the calls that would wait for a GPU (Tensor.item, .cpu, .tolist, .numpy, bool/float/int)
    into counts[method], and into sites["file:function method"] (who called) when given."""
    saved = {m: (torch.Tensor.__dict__.get(m), getattr(torch.Tensor, m)) for m in SYNC_METHODS}

    def counted(name, f):
        def g(self, *args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            if sites is not None:
                fr = sys._getframe(1)
                parts = Path(fr.f_code.co_filename).parts
                key = f"{'/'.join(parts[-2:])}:{fr.f_code.co_name} {name}"
                sites[key] = sites.get(key, 0) + 1
            return f(self, *args, **kwargs)

        return g

    for m, (_, f) in saved.items():
        setattr(torch.Tensor, m, counted(m, f))
    try:
        yield counts
    finally:
        for m, (own, _) in saved.items():
            if own is None:
                delattr(torch.Tensor, m)
            else:
                setattr(torch.Tensor, m, own)


def _op_counter(probe: _StepProbe):
    """A TorchDispatchMode counting aten ops per phase: all, and those that are not views (kernels on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.kernels = {}, {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ph = probe.phase
            self.ops[ph] = self.ops.get(ph, 0) + 1
            if not func.is_view:
                self.kernels[ph] = self.kernels.get(ph, 0) + 1
            return func(*args, **(kwargs or {}))

    return OpCounter()


def _step_window(probe: _StepProbe, *, warmup: int, steps: int, device: torch.device, count: bool):
    """A callback over training steps warmup+1 .. warmup+steps of one epoch (the epoch then ends normally).

    count=False: wall time and probe seconds across the window. count=True: aten ops per phase and
    would-be syncs per step (and which steps read the loss back, from the recorder's `reads`).
    """
    from fastai.callback.core import Callback

    class StepWindow(Callback):
        order = 100  # after every other callback's after_batch

        def before_fit(self):
            self.seen, self.active, self.result = 0, False, None
            if warmup == 0:
                self._start()

        def _start(self):
            sync(device)
            self.active, self.t0, self.p0 = True, time.perf_counter(), dict(probe.seconds)
            if count:
                self.syncs, self.sites, self.per_step, self.prev, self.reads0 = {}, {}, [], 0, self._reads()
                self._sync_cm = count_syncs(self.syncs, self.sites)
                self._sync_cm.__enter__()
                self.mode = _op_counter(probe)
                self.mode.__enter__()

        def _reads(self):
            return getattr(self.learn.recorder, "reads", 0)

        def _stop(self):
            if count:
                self.mode.__exit__(None, None, None)
                self._sync_cm.__exit__(None, None, None)
            sync(device)
            secs = time.perf_counter() - self.t0
            self.active = False
            self.result = {"seconds": secs, "phases": {k: probe.seconds[k] - self.p0[k] for k in probe.seconds}}
            if count:
                self.result.update(ops=self.mode.ops, kernels=self.mode.kernels, syncs=dict(self.syncs),
                                   sites=dict(self.sites), per_step=self.per_step)

        def after_batch(self):
            if not self.training:
                return
            self.seen += 1
            if self.active and count:
                n, reads = sum(self.syncs.values()), self._reads()
                self.per_step.append((n - self.prev, reads != self.reads0))  # (syncs, read the loss?)
                self.prev, self.reads0 = n, reads
            if self.seen == warmup and not self.active:
                self._start()
            elif self.active and self.seen == warmup + steps:
                self._stop()

        def after_fit(self):
            if self.active:  # the fit failed or was cancelled mid-window: leave no mode or patch behind
                self._stop()

    return StepWindow()


def bench_step(cfg: BenchConfig, *, device: torch.device, precision: str, targets, tmean, tstd, log,
               channels: int = 3) -> dict:
    """The `step` section: fastgal's and stock fastai's training step, host cost per phase, ops and syncs;
    channels: the input's (the shards': 3 for JPEGs, one per FITS band)."""
    from fastai.data.core import DataLoaders

    from fastgal.train.callbacks import best_epoch_callback
    from fastgal.train.learner import make_learner
    from fastgal.train.loop import SYNC_EVERY

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host overhead, not parallel arithmetic
    try:
        with tempfile.TemporaryDirectory(prefix="fastgal-bench-step-") as tmp:
            torch.manual_seed(cfg.seed)
            bs, _, h, w = STEP_BATCH
            x = torch.randn(bs, channels, h, w, device=device)
            y = torch.tensor(tmean, device=device).repeat(len(x), 1) + 0.1 * torch.randn(len(x), len(targets),
                                                                                         device=device)

            def dls(n_batches):
                return DataLoaders(SyntheticLoader(x, y, n_batches), SyntheticLoader(x, y, 1), path=tmp,
                                   device=device)

            learners, probes = {}, {}
            for name in STEP_CONFIGS:
                (Path(tmp) / name).mkdir()
                model = thin_model(cfg.arch, len(targets), tmean, tstd, c_in=channels)
                common = dict(targets=targets, path=Path(tmp) / name, precision=precision,
                              channels_last=device.type == "cuda")
                if name == PEER:
                    if cfg.compile:
                        model.compile(mode=cfg.compile_mode)
                    learn = stock_learner(dls(1), model, **common)
                else:
                    learn = make_learner(dls(1), model, quiet=True, compile=cfg.compile and cfg.compile_mode, opt=cfg.opt, **common)
                learn.create_opt()  # fit_one_cycle keeps it: the probe wraps this optimizer's zero_grad
                learners[name], probes[name] = learn, _StepProbe(learn)
            monitor = f"rmse_{targets[0]}"

            def run(name, steps, count):
                learn = learners[name]
                learn.dls = dls(cfg.warmup + steps)
                win = _step_window(probes[name], warmup=cfg.warmup, steps=steps, device=device, count=count)
                with fork_safe():  # fastgal train's fit: one cycle, best-epoch weights kept
                    learn.fit_one_cycle(1, RECIPE.lr, cbs=[best_epoch_callback(monitor), win])
                if win.result is None:
                    raise RuntimeError(f"step {name}: the fit stopped before {cfg.warmup + steps} steps")
                return win.result

            windows = {name: [] for name in learners}
            for r in range(cfg.repeats):  # alternate the two, so drifting load hits both alike
                for name in learners:
                    windows[name].append(run(name, cfg.batches, count=False))
                    log(f"  step {name}: repeat {r + 1}/{cfg.repeats} "
                        f"{windows[name][-1]['seconds'] / cfg.batches * 1e3:.2f} ms/step")
            results = {}
            # the counting mode runs the model's ops one by one: with --compile, say so to dynamo (force_eager)
            # rather than let it recompile each block under the mode until its recompile limit
            for name, learn in learners.items():
                with torch.compiler.set_stance("force_eager") if cfg.compile else nullcontext():
                    c = run(name, COUNT_STEPS, count=True)
                results[name] = _step_figures(windows[name], c, cfg.batches, learn, STEP_CONFIGS[name], cfg)
            learn = learners["fastgal"]
            n_tensors = len(list(learn.model.parameters()))
            n_weights = sum(p.numel() for p in learn.model.parameters())
    finally:
        torch.set_num_threads(threads)

    f, p = results["fastgal"], results[PEER]
    speedup = {k: round(p["ms"][k] / f["ms"][k], 3) if f["ms"][k] > 0 else None for k in f["ms"]}
    for k in ("loop", "fwd_bwd", "opt", "total"):
        speedup[f"{k}_aten_ops"] = round(p["aten_ops"][k] / f["aten_ops"][k], 2) if f["aten_ops"][k] else None
    ceiling = {name: {"outside_fwd_bwd": round(cfg.bs / r["ms"]["outside_fwd_bwd"] * 1e3),
                      "total": round(cfg.bs / r["ms"]["total"] * 1e3)} for name, r in results.items()}
    return {
        "arch": cfg.arch, "width": STEP_WIDTH, "batch_shape": list(x.shape), "param_tensors": n_tensors,
        "weights": n_weights, "torch_threads": 1, "precision": precision, "compile": cfg.compile,
        "sync_every": SYNC_EVERY, "count_steps": COUNT_STEPS, "baseline": PEER, "results": results,
        "speedup_vs_baseline": speedup,
        "gpu_ceiling_images_per_s": {"bs": cfg.bs, **ceiling},
        "note": "ms: best of repeats per figure (loop = best of total - fwd_bwd - opt per window); aten ops and "
                "syncs per step over count_steps steps; speedup = peer / fastgal; gpu ceiling = bs / host ms"
                + ("; with --compile the op counts are not the compiled graph's (the counting mode makes torch "
                   "run the model's ops one by one)" if cfg.compile else ""),
    }


def _step_figures(windows: list[dict], c: dict, steps: int, learn, kw: dict, cfg: BenchConfig) -> dict:
    per = [{"total": w["seconds"] / steps * 1e3, "fwd_bwd": w["phases"]["fwd_bwd"] / steps * 1e3,
            "opt": w["phases"]["opt"] / steps * 1e3} for w in windows]
    for w in per:
        w["loop"] = w["total"] - w["fwd_bwd"] - w["opt"]
        w["outside_fwd_bwd"] = w["total"] - w["fwd_bwd"]
    ms = {k: round(min(w[k] for w in per), 3) for k in ("loop", "fwd_bwd", "opt", "outside_fwd_bwd", "total")}
    n = len(c["per_step"])
    ops = {k: round(c["ops"].get(k, 0) / n, 1) for k in ("loop", "fwd_bwd", "opt")}
    kernels = {k: round(c["kernels"].get(k, 0) / n, 1) for k in ("loop", "fwd_bwd", "opt")}
    ops["total"], kernels["total"] = round(sum(ops.values()), 1), round(sum(kernels.values()), 1)
    quiet = [s for s, read in c["per_step"] if not read]
    reads = [s for s, read in c["per_step"] if read]
    return {
        "optimizer": "fastai ranger" if kw.get("opt") == "fastai-ranger" else f"fastgal {cfg.opt}",
        "recorder": type(learn.recorder).__name__,
        "ms": ms, "repeats_total_ms": [round(w["total"], 3) for w in per],
        "aten_ops": ops, "kernel_ops": kernels,
        "syncs_per_step": round(sum(s for s, _ in c["per_step"]) / n, 3),
        "syncs_per_step_between_reads": round(sum(quiet) / len(quiet), 3) if quiet else None,
        "loss_reads": len(reads), "syncs_per_read": round(sum(reads) / len(reads), 2) if reads else None,
        "syncs_by_method_per_step": {k: round(v / n, 3) for k, v in sorted(c["syncs"].items())},
        "syncs_by_site_per_step": {k: round(v / n, 3) for k, v in sorted(c["sites"].items())},
    }



def step_table(st: dict) -> list[str]:
    """The step section as text: per configuration, ms / aten ops per phase, syncs; then the speed-ups."""
    w = st["width"]
    lines = ["", f"step: host cost of one training step, {st['arch']} thin (channels x {w:g}, {st['param_tensors']} "
                 f"parameter tensors) on synthetic {tuple(st['batch_shape'])} batches, {st['precision']}, "
                 f"{st['torch_threads']} torch thread",
             f"  {'':<22}{'-- ms per step (best of repeats) --':^45}{'-- aten ops per step --':^30}{'syncs/step':>12}",
             f"  {'':<22}{'loop+cbs':>9}{'fwd+bwd':>9}{'opt':>9}{'not f+b':>9}{'total':>9}"
             f"{'loop':>8}{'fwd+bwd':>8}{'opt':>7}{'total':>7}{'(between reads)':>18}"]
    for name, r in st["results"].items():
        ms, ops = r["ms"], r["aten_ops"]
        between = r["syncs_per_step_between_reads"]
        tag = f"{name} ({r['optimizer'].replace('fastgal ', '').replace('fastai ', '')})" + (
            " peer" if name == st["baseline"] else "")
        lines.append(f"  {tag:<22}{ms['loop']:>9.2f}{ms['fwd_bwd']:>9.2f}{ms['opt']:>9.2f}"
                     f"{ms['outside_fwd_bwd']:>9.2f}{ms['total']:>9.2f}{ops['loop']:>8.0f}{ops['fwd_bwd']:>8.0f}"
                     f"{ops['opt']:>7.0f}{ops['total']:>7.0f}{r['syncs_per_step']:>9.2f}"
                     f" ({'-' if between is None else f'{between:g}'})")
    sp = st["speedup_vs_baseline"]
    lines.append(f"  {'fastai / fastgal':<22}{sp['loop']:>8.2f}x{sp['fwd_bwd']:>8.2f}x{sp['opt']:>8.2f}x"
                 f"{sp['outside_fwd_bwd']:>8.2f}x{sp['total']:>8.2f}x{sp['loop_aten_ops']:>7.1f}x"
                 f"{sp['fwd_bwd_aten_ops']:>7.1f}x{sp['opt_aten_ops']:>6.0f}x{sp['total_aten_ops']:>6.1f}x")
    f = st["results"]["fastgal"]
    if f["loss_reads"]:
        lines.append(f"  fastgal reads the loss from the device every {st['sync_every']} steps "
                     f"({f['syncs_per_read']:g} sync per read) and at each epoch's end")
    for name, r in st["results"].items():
        sites = "; ".join(f"{k} {v:g}" for k, v in r["syncs_by_site_per_step"].items()) or "none"
        lines.append(f"  {name} would-be syncs per step, by caller: {sites}")
    g = st["gpu_ceiling_images_per_s"]
    lines.append(f"  GPU ceiling at bs {g['bs']} = bs / host ms outside fwd+bwd: "
                 + ", ".join(f"{n} {g[n]['outside_fwd_bwd']:,} img/s" for n in st["results"])
                 + "; with the thin model's fwd+bwd host time: "
                 + ", ".join(f"{n} {g[n]['total']:,} img/s" for n in st["results"]))
    return lines
