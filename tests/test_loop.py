"""fastgal.train.loop: fastai's Recorder and Learner with less host work per step; the same history, no sync
between the loss reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_regression
from fastai.learner import Learner

from fastgal.bench.step import count_syncs, thin_model
from fastgal.train.learner import dress, make_learner
from fastgal.train.loop import DeviceRecorder, FastgalLearner, target_metrics
from fastgal.train.model import rmse_loss
from fastgal.train.ranger import Ranger


def _make(tmp_path, name, stock, sync_every=7):
    """fastgal's Learner (reading the loss every sync_every steps), or stock fastai's Learner, Recorder and
    AccumMetric with the same optimizer and callbacks."""
    (tmp_path / name).mkdir()
    torch.manual_seed(0)
    dls = tiny_regression(n=96)  # 12 steps an epoch: reads at 7 and at each epoch's end
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
