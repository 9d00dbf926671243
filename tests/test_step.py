"""The training step at GPU speed (issue 8): fastgal's Ranger is fastai's ranger, the device-side Recorder
writes fastai's history, the thin bench model keeps the layer graph, `bench --what step` reports what it
claims, and `--compile` trains into the same run folder.

Speed figures live in benchmarks/RESULTS.md; here only structure, equality and counts are checked.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.layers import ConvLayer, Flatten
from fastai.learner import Learner
from fastai.optimizer import ranger
from torch import nn

from conftest import run_cli
from fastgal.bench import format_table
from fastgal.bench_step import count_syncs, thin_model
from fastgal.learner import dress, make_learner
from fastgal.loop import DeviceRecorder, FastgalLearner
from fastgal.model import ARCHS, make_model, rmse_loss, target_metrics
from fastgal.ranger import Ranger


def _data(n=80, bs=8, seed=0):
    """A tiny regression (80 samples of 3x8x8, 10 steps per epoch), in a fixed order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = x.mean((1, 2, 3))[:, None] * 3 + 0.1 * torch.randn(n, 1, generator=g)
    items = list(zip(x, y))
    return DataLoaders(DataLoader(items[:n], bs=bs, shuffle=False), DataLoader(items[:16], bs=bs, shuffle=False))


def _model(seed=0):
    """Convolutions with batch norm (do_wd=False, force_train) and a biased head: every parameter kind."""
    torch.manual_seed(seed)
    return nn.Sequential(ConvLayer(3, 8), ConvLayer(8, 16, stride=2), nn.AdaptiveAvgPool2d(1), Flatten(),
                         nn.Linear(16, 1))


def _two_groups(m):
    return [list(m[:2].parameters()), list(m[2:].parameters())]


def _pair(**kw):
    """Two Learners from the same start: fastai's ranger and fastgal's Ranger."""
    m = _model()
    return [Learner(_data(), copy.deepcopy(m), loss_func=rmse_loss, opt_func=f, cbs=[], **kw) for f in (ranger, Ranger)]


def _assert_same(a: Learner, b: Learner, rtol=1e-5):
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(pb, pa, rtol=rtol, atol=1e-7, msg=lambda m: f"{name}: {m}")
    for (name, ba), bb in zip(a.model.named_buffers(), b.model.buffers()):
        torch.testing.assert_close(bb.float(), ba.float(), rtol=rtol, atol=1e-7, msg=lambda m: f"{name}: {m}")


def _quiet(learn):
    learn.remove_cb(learn.progress) if hasattr(learn, "progress") else None
    learn.logger = lambda *a, **k: None
    return learn


def test_ranger_is_fastais_ranger_under_one_cycle():
    """30 steps of fit_one_cycle (5 Lookahead syncs, RAdam's unrectified then rectified phase): same parameters."""
    fa, fg = map(_quiet, _pair())
    for learn in (fa, fg):
        learn.fit_one_cycle(3, 1e-2)
    assert fa.opt.count == fg.opt.count == 30 and fg.opt.state[next(fg.model.parameters())]["step"] == 30
    assert fg.opt._plan is not None and fg.opt.plans_built == 1  # the flat path ran, its views held for 30 steps
    _assert_same(fa, fg)
    assert not torch.equal(next(fa.model.parameters()), next(_model().parameters()))  # it did train
    # the optimizer state too, in fastai's format
    sa, sg = fa.opt.state_dict(), fg.opt.state_dict()
    assert sa.keys() == sg.keys() and sa["count"] == sg["count"]
    for a, b in zip(sa["state"], sg["state"]):
        assert a.keys() == b.keys()
        for k in ("grad_avg", "sqr_avg"):
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-9)
        assert a["step"] == b["step"] and a.get("do_wd", True) == b.get("do_wd", True)
    assert [dict(h) for h in sa["hypers"]] == [dict(h) for h in sg["hypers"]]


def test_ranger_param_groups_freeze_and_discriminative_lr():
    """freeze (frozen parameters have no gradient: the foreach path), then unfreeze with an lr slice (flat path)."""
    fa, fg = map(_quiet, _pair(splitter=_two_groups))
    for learn in (fa, fg):
        learn.freeze()
        learn.fit_one_cycle(1, 1e-2)
    assert fg.opt._plan is None  # some parameters had no gradient
    _assert_same(fa, fg)
    for learn in (fa, fg):
        learn.unfreeze()
        learn.fit_one_cycle(2, slice(1e-3, 1e-2))
    assert fg.opt._plan is not None and len(fg.opt.hypers) == 2
    assert fg.opt.hypers[0]["lr"] != fg.opt.hypers[1]["lr"]
    _assert_same(fa, fg)


class _SometimesUnused(nn.Module):
    """A head whose second layer is skipped every third training step: no gradient at all on those steps."""

    def __init__(self):
        super().__init__()
        self.body, self.a, self.b, self.n = _model(), nn.Linear(1, 1), nn.Linear(1, 1), 0

    def forward(self, x):
        y = self.a(self.body(x))
        if self.training:
            self.n += 1
            if self.n % 3 == 0:
                return y
        return self.b(y)


def test_ranger_steps_a_parameter_without_a_gradient_as_fastai_does():
    """fastai zeroes gradients in place, so a parameter unused in a step is still stepped (zero gradient:
    weight decay, moving averages); fastgal drops gradients and must do the same."""
    m = _SometimesUnused()
    fa, fg = (_quiet(Learner(_data(), copy.deepcopy(m), loss_func=rmse_loss, opt_func=f, cbs=[]))
              for f in (ranger, Ranger))
    for learn in (fa, fg):
        learn.fit_one_cycle(3, 1e-2)
    assert fg.opt.plans_built == 1 and fg.model.b.weight.grad is None  # dropped, yet stepped
    _assert_same(fa, fg)


def test_ranger_checkpoints_load_across_implementations(tmp_path):
    """learn.save(with_opt=True) from one implementation loads into the other and both go on alike."""
    fa, fg = (_quiet(lr) for lr in _pair(path=tmp_path, model_dir="."))
    fg.fit_one_cycle(1, 1e-2)
    fg.save("g", with_opt=True)
    fa.load("g", with_opt=True)  # fastai's ranger takes fastgal's state (a Lookahead(RAdam) state_dict)
    assert fa.opt.count == fg.opt.count == 10
    _assert_same(fa, fg, rtol=0)
    for learn in (fa, fg):
        learn.fit(1, 1e-3)
    _assert_same(fa, fg)
    fa.save("a", with_opt=True)
    fg.load("a", with_opt=True)  # and back
    assert fg.opt.count == 20
    for learn in (fa, fg):
        learn.fit(1, 1e-3)
    _assert_same(fa, fg)


def test_lr_find_restores_weights_with_ranger(tmp_path):
    learn = _quiet(Learner(_data(), _model(), loss_func=rmse_loss, opt_func=Ranger, path=tmp_path, model_dir="."))
    before = [p.detach().clone() for p in learn.model.parameters()]
    sug = learn.lr_find(num_it=12, show_plot=False)
    assert sug.valley > 0 and len(learn.recorder.losses) > 0
    for a, b in zip(before, learn.model.parameters()):
        assert torch.equal(a, b)
    learn.fit_one_cycle(1, 1e-2)  # and trains afterwards (the plan is rebuilt after lr_find's reload)


def _make(tmp_path, name, stock, sync_every=7):
    """fastgal's Learner (reading the loss every sync_every steps), or stock fastai's Learner, Recorder and
    AccumMetric with the same optimizer and callbacks."""
    (tmp_path / name).mkdir()
    torch.manual_seed(0)
    dls = _data(n=96)  # 12 steps an epoch: reads at 7 and at each epoch's end
    model = thin_model("xresnet18", 1, [0.0], [1.0])
    if stock:
        return dress(Learner(dls, model, loss_func=rmse_loss, opt_func=Ranger, path=tmp_path / name, model_dir=".",
                             metrics=target_metrics(["t"], on_device=False)), quiet=True)
    learn = make_learner(dls, model, targets=["t"], path=tmp_path / name, quiet=True)
    learn.remove_cb(learn.recorder)
    learn.add_cb(DeviceRecorder(every=sync_every))
    return learn


def test_device_recorder_writes_fastais_history(tmp_path):
    """The same run with fastai's Recorder/AccumMetric/Learner and with fastgal's: the same history, losses, lrs."""
    runs = {}
    for stock in (True, False):
        learn = _make(tmp_path, f"s{stock}", stock)
        assert isinstance(learn.recorder, DeviceRecorder) != stock and isinstance(learn, FastgalLearner) != stock
        learn.fit_one_cycle(3, 1e-2)
        runs[stock] = learn
    a, b = runs[True], runs[False]
    # what history.csv is made of: per epoch train_loss, valid_loss, rmse_t
    assert a.recorder.metric_names == b.recorder.metric_names and len(b.recorder.values) == 3
    np.testing.assert_allclose(np.array(b.recorder.values, dtype=float), np.array(a.recorder.values, dtype=float),
                               rtol=1e-6)
    np.testing.assert_allclose([float(v) for v in b.recorder.losses], [float(v) for v in a.recorder.losses], rtol=1e-6)
    assert b.recorder.lrs == a.recorder.lrs and b.recorder.iters == a.recorder.iters
    assert b.recorder.reads == 3 * 2  # per epoch: one after 7 steps, one at the end of training
    assert float(b.smooth_loss) == pytest.approx(float(a.smooth_loss), rel=1e-6)


def test_no_sync_between_loss_reads(tmp_path):
    """Training steps of fastgal's Learner call no Tensor.item/.cpu/bool/... except when the recorder reads."""
    from fastai.callback.core import Callback

    learn = _make(tmp_path, "r", stock=False, sync_every=5)

    class PerStep(Callback):
        order = 100

        def before_fit(self):
            self.rows, self.prev = [], (0, 0)

        def after_batch(self):
            if self.training:
                n = sum(counts.values())
                self.rows.append((n - self.prev[0], self.learn.recorder.reads - self.prev[1]))
                self.prev = (n, self.learn.recorder.reads)

    counts: dict = {}
    cb = PerStep()
    with count_syncs(counts):
        learn.fit_one_cycle(1, 1e-2, cbs=[cb])
    steps = cb.rows[1:]  # the first step starts inside before_fit's bookkeeping
    assert [s for s, read in steps if not read] == [0] * sum(1 for _, read in steps if not read)
    assert sum(read for _, read in steps) == 2  # after 5 and 10 of 12 steps (the 3rd read is at the epoch's end)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_thin_model_keeps_the_layer_graph(arch):
    full, thin = make_model(arch, 2, [0, 0], [1, 1]), thin_model(arch, 2, [0, 0], [1, 1], width=1 / 16)
    fp, tp = list(full.named_parameters()), list(thin.named_parameters())
    assert [n for n, _ in fp] == [n for n, _ in tp]
    assert [p.dim() for _, p in fp] == [p.dim() for _, p in tp]
    def kinds(m):  # the thin body is an XResNet subclass
        return [type(x).__name__.replace("_ThinXResNet", "XResNet") for x in m.modules()]

    assert kinds(full) == kinds(thin)
    assert sum(p.numel() for _, p in tp) * 50 < sum(p.numel() for _, p in fp)
    assert thin(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_bench_step_section(tmp_path):
    """`fastgal bench --what step` without shards: the issue's counts, ratios that are the quotient of the figures."""
    res = json.loads(run_cli("bench", tmp_path / "none", "--what", "step", "--arch", "xresnet18", "--batches", 3,
                             "--warmup", 1, "--repeats", 1, "--quiet", "--json").stdout)
    assert res["sections"] == ["step"] and res["n_train"] is None
    st = res["step"]
    assert st["param_tensors"] == len(list(make_model("xresnet18", 1, [0], [1]).parameters()))
    f, p = st["results"]["fastgal"], st["results"]["fastai"]
    assert f["recorder"] == "DeviceRecorder" and p["recorder"] == "Recorder" and p["optimizer"] == "fastai ranger"
    assert f["aten_ops"]["opt"] <= 60 < p["aten_ops"]["opt"]
    assert f["syncs_per_step_between_reads"] == 0 and f["loss_reads"] == 60 // st["sync_every"]
    assert p["syncs_by_method_per_step"]["cpu"] >= 1  # fastai's smooth loss: a copy to the CPU every step
    for r in (f, p):
        ms = r["ms"]
        assert 0 < ms["fwd_bwd"] < ms["total"] and ms["opt"] > 0 and ms["outside_fwd_bwd"] > 0
    sp = st["speedup_vs_baseline"]
    assert sp["opt"] == pytest.approx(p["ms"]["opt"] / f["ms"]["opt"], rel=1e-2)
    g = st["gpu_ceiling_images_per_s"]
    assert g["fastgal"]["outside_fwd_bwd"] == pytest.approx(g["bs"] / f["ms"]["outside_fwd_bwd"] * 1e3, rel=1e-2)
    table = format_table(res)  # what the command prints without --json
    assert "fastai / fastgal" in table and "aten ops" in table and "GPU ceiling" in table


def test_train_opt_option(small_shards, small_run, tmp_path, monkeypatch):
    """--opt reaches the Learner and config.json (small_run trained with the default, fastgal's ranger):
    every optimizer the run makes is fastai's Lookahead(RAdam), and it stepped; an unknown name is refused."""
    import fastgal.learner
    from fastai.optimizer import Lookahead

    assert json.loads((small_run / "config.json").read_text())["opt"] == "ranger"
    made, real = [], fastgal.learner.optimizer

    def spy(name):  # the opt_func make_learner gets for --opt, recording each optimizer it makes
        f = real(name)

        def opt_func(*args, **kwargs):
            made.append(f(*args, **kwargs))
            return made[-1]

        return opt_func

    monkeypatch.setattr(fastgal.learner, "optimizer", spy)
    run = tmp_path / "fastai-ranger"
    run_cli("train", small_shards, "--out", run, "--epochs", 1, "--bs", 32, "--arch", "xresnet18", "--size", 56,
            "--quiet", "--opt", "fastai-ranger")
    assert made and all(type(o) is Lookahead for o in made)  # fastgal's Ranger is not one
    assert made[-1].count > 0  # and the fit stepped it
    assert json.loads((run / "config.json").read_text())["opt"] == "fastai-ranger"
    assert (run / "metrics.json").is_file() and len(pd.read_csv(run / "history.csv")) == 1
    res = run_cli("train", small_shards, "--out", tmp_path / "x", "--opt", "adam", ok=False)
    assert res.exit_code == 2 and not (tmp_path / "x").exists()
    assert res.output.splitlines()[-1] == "Error: Invalid value for '--opt': 'adam' is not one of 'ranger', 'fastai-ranger'."


@pytest.mark.slow
def test_compile_trains_the_same_run_folder(small_shards, small_run, tmp_path, monkeypatch):
    """--compile (torch.compile of the model in place): small_run's files, weight keys and columns, close losses.

    Dynamo captures the graphs as with the default backend; they run eagerly here, because inductor's C++
    code generation takes minutes on 2 cores (tools/gpu_check.py times the real thing on a GPU)."""
    compiled, real = [], torch.nn.Module.compile

    def compile_eager(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        return real(self, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eager)
    run = tmp_path / "compiled"
    run_cli("train", small_shards, "--out", run, "--epochs", 1, "--bs", 32, "--arch", "xresnet18", "--size", 56,
            "--tta", "--quiet", "--compile")  # small_run's command + --compile
    a, b = small_run, run
    def written(r):  # test_predict adds predictions_<input>.csv to the shared small_run
        return sorted(p.name for p in r.iterdir() if not p.name.startswith("predictions_") or p.name.endswith("_valid.csv"))

    assert written(a) == written(b) and "model.pt" in written(b)
    assert json.loads((b / "config.json").read_text())["compile"] is True and compiled == ["Sequential"]
    wa, wb = (torch.load(r / "model.pt", weights_only=False)["state_dict"] for r in (a, b))
    assert list(wa) == list(wb)  # no "_orig_mod." prefix: predict reads it as any run
    pa, pb = (pd.read_csv(r / "predictions_valid.csv") for r in (a, b))
    assert list(pa.columns) == list(pb.columns) and len(pa) == len(pb)
    assert np.isfinite(pb.filter(like="pred_").values).all()
    ha, hb = (pd.read_csv(r / "history.csv") for r in (a, b))
    assert list(ha.columns) == list(hb.columns)
    # the same seed and data: compiled kernels reorder float sums, so close rather than equal
    np.testing.assert_allclose(hb.train_loss, ha.train_loss, rtol=0.05)
