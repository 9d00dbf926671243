"""fastgal.train.ranger: fastgal's flat-buffer Ranger is fastai's ranger (parameters within 1e-5 under one-cycle,
param groups, frozen layers, missing gradients, checkpoints across implementations, lr_find's reload)."""

from __future__ import annotations

import copy

import fastai.callback.schedule  # noqa: F401  (patches fit_one_cycle and lr_find onto Learner)
import torch
from conftest import tiny_regression
from fastai.layers import ConvLayer, Flatten
from fastai.learner import Learner
from fastai.optimizer import ranger
from torch import nn

from fastgal.train.model import rmse_loss
from fastgal.train.ranger import Ranger


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
    return [Learner(tiny_regression(), copy.deepcopy(m), loss_func=rmse_loss, opt_func=f, cbs=[], **kw) for f in (ranger, Ranger)]


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
    fa, fg = (_quiet(Learner(tiny_regression(), copy.deepcopy(m), loss_func=rmse_loss, opt_func=f, cbs=[]))
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
    learn = _quiet(Learner(tiny_regression(), _model(), loss_func=rmse_loss, opt_func=Ranger, path=tmp_path, model_dir="."))
    before = [p.detach().clone() for p in learn.model.parameters()]
    sug = learn.lr_find(num_it=12, show_plot=False)
    assert sug.valley > 0 and len(learn.recorder.losses) > 0
    for a, b in zip(before, learn.model.parameters()):
        assert torch.equal(a, b)
    learn.fit_one_cycle(1, 1e-2)  # and trains afterwards (the plan is rebuilt after lr_find's reload)


