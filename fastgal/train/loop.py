"""fastai's training loop with less host work per batch, and the same results.

    learn = make_learner(...)            # fastgal.train.learner: builds a FastgalLearner with a DeviceRecorder
    fastgal bench shards --what step     # the host cost of a step, against stock fastai's, in one run

On a GPU at 112 px and bs 128 a step's arithmetic takes a few ms, so what the CPU does per step (and
every device -> CPU copy, which makes the CPU wait for the GPU) bounds the speed. Three changes:
- `DeviceRecorder`: fastai's Recorder without the loss copied to the CPU every batch: batch losses
  stay on the device and are read every `SYNC_EVERY` steps and at the end of each epoch, then folded
  into the smoothed loss with fastai's exact arithmetic (history.csv is unchanged).
- `DeviceAccumMetric`, `DeviceAvgLoss`: the validation loss and RMSE accumulate on the device and are
  read once per epoch (fastai's copy every batch to the CPU).
- `FastgalLearner`: each event calls only the callbacks that define it, and fit_one_cycle's schedule
  is computed without tensors (the same floats).
Everything else is fastai's: these are a Recorder/metric replacement and a thin Learner subclass, not a
custom loop.
"""

from __future__ import annotations

import numpy as np
import torch
from fastai.callback.core import event
from fastai.learner import AvgLoss, Learner, Recorder
from fastai.metrics import AccumMetric
from fastai.torch_core import find_bs, flatten_check, maybe_gather, num_distrib
from fastcore.foundation import L

SYNC_EVERY = 20  # training steps between reads of the loss from the device (and at each epoch's end)


class DeviceAccumMetric(AccumMetric):
    """AccumMetric that keeps the predictions and targets on the device (fastai's copies them to the
    CPU every batch) and computes `func` on the device once, when the value is read."""

    def accum_values(self, preds, targs, learn=None):
        preds, targs = preds.detach(), targs.detach()
        if self.flatten:
            preds, targs = flatten_check(preds, targs)
        self.preds.append(preds)
        self.targs.append(targs)

    @property
    def value(self):
        if len(self.preds) == 0:
            return None
        preds, targs = torch.cat(self.preds), torch.cat(self.targs)
        # fastai's to_detach gathers every batch under DDP; once here is the same set
        return self.func(maybe_gather(preds), maybe_gather(targs)).cpu()




def _col_rmse(j):
    def f(pred, targ):
        return torch.sqrt(((pred[:, j].float() - targ[:, j].float()) ** 2).mean())

    return f


def target_metrics(targets: list[str], on_device: bool = True):
    """Exact per-target RMSE over the whole validation set (not a mean of batch RMSEs).

    on_device=False: fastai's AccumMetric, which reads every batch back to the CPU."""
    cls = DeviceAccumMetric if on_device else AccumMetric
    return [cls(_col_rmse(j), flatten=False, name=f"rmse_{t}") for j, t in enumerate(targets)]


class DeviceAvgLoss(AvgLoss):
    """fastai's AvgLoss (validation loss) summed on the device and read once, when its value is."""

    def accumulate(self, learn):
        bs = find_bs(learn.yb)
        self.total += learn.loss.mean().detach() * bs
        self.count += bs

    @property
    def value(self):
        if self.count == 0:
            return None
        total = maybe_gather(self.total) if torch.is_tensor(self.total) else self.total  # DDP: mean over ranks
        return (total.cpu() if torch.is_tensor(total) else total) / self.count


class DeviceRecorder(Recorder):
    """fastai's Recorder without a device -> CPU copy of the loss every training batch.

    fastai's smooth loss does `lerp(loss.cpu(), val, beta)` per batch: on a GPU that is a sync per
    step, which stops the CPU from queueing work ahead. Here the batch losses stay on the device
    (with the lr of their batch) and are read every `every` steps, at the end of training in each
    epoch and at the end of a fit, then folded in on the CPU with fastai's exact arithmetic, so
    `losses`, `lrs`, `values`, the log (history.csv) and `learn.smooth_loss` hold what fastai's
    would (learn.smooth_loss is at most `every` - 1 batches old in between). Under lr_find it reads
    every batch (LRFinder decides each batch whether to stop). Under DDP the read is a collective
    at the same steps on every rank, averaging the ranks' losses as fastai's per-batch gather does.
    """

    def __init__(self, every: int = SYNC_EVERY, **kwargs):
        super().__init__(**kwargs)
        self.every = max(1, int(every))
        self.loss = DeviceAvgLoss()
        self._pending, self.reads = [], 0

    @property
    def name(self):
        return "recorder"  # learn.recorder, as fastai's code expects

    def before_fit(self):
        super().before_fit()
        self._pending, self.reads = [], 0

    def after_batch(self):
        if len(self.yb) == 0:
            return
        if not self.training:
            for met in self._valid_mets:
                met.accumulate(self.learn)
            return
        for met in self._train_mets[1:]:  # train_metrics=True only
            met.accumulate(self.learn)
        self._pending.append((self.learn.loss.detach(), self.opt.hypers[-1]["lr"]))
        if len(self._pending) >= self.every or hasattr(self.learn, "lr_finder"):
            self.flush()

    def flush(self):
        """Read the pending batch losses from the device (one copy) into the smoothed loss."""
        if not self._pending:
            return
        losses, lrs = zip(*self._pending)
        self._pending = []
        vals = torch.stack([v if v.ndim == 0 else v.mean() for v in losses])
        if num_distrib() > 1:  # fastai: maybe_gather(loss.mean()) per batch = the mean over ranks
            import torch.distributed as dist

            parts = [torch.zeros_like(vals) for _ in range(num_distrib())]
            dist.all_gather(parts, vals.contiguous())
            vals = torch.stack(parts).mean(0)
        sm = self.smooth_loss
        for v, lr in zip(vals.cpu(), lrs):  # AvgSmoothLoss.accumulate + Recorder.after_batch, per batch
            sm.count += 1
            sm.val = torch.lerp(v, sm.val, sm.beta)
            self.lrs.append(lr)
            self.losses.append(sm.value)
        self.learn.smooth_loss = sm.value
        self.reads += 1

    def after_train(self):
        self.flush()
        super().after_train()

    def after_cancel_train(self):
        self.flush()
        super().after_cancel_train()

    def after_fit(self):
        self.flush()  # a fit cancelled mid-epoch (lr_find, a timing window)



def combine_scheds(pcts, scheds):
    """fastai's combine_scheds, value for value, without tensors: fastai keeps the phase boundaries in a
    float32 tensor and runs ~10 tensor ops and an .item() per hyper-parameter per batch; the same
    float32 arithmetic on numpy scalars gives the same floats for a fraction of the host time."""
    assert sum(pcts) == 1.0
    bounds = np.cumsum(np.array([0, *pcts], dtype=np.float32).astype(np.float64)).astype(np.float32)
    assert (bounds >= 0).all()
    last = len(bounds) - 2

    def _inner(pos):
        p32 = np.float32(pos)
        idx = min(int(np.flatnonzero(p32 >= bounds).max()), last)
        actual = (p32 - bounds[idx]) / (bounds[idx + 1] - bounds[idx])
        return scheds[idx](float(actual))

    return _inner


def combined_cos(pct, start, middle, end):
    """fastai's combined_cos on fastgal's combine_scheds."""
    from fastai.callback.schedule import SchedCos

    return combine_scheds([pct, 1 - pct], [SchedCos(start, middle), SchedCos(middle, end)])


class FastgalLearner(Learner):
    """fastai's Learner with less host work per batch, and the same results.

    - Events call only the callbacks that define them, in order, from a cache kept per event (fastai
      sorts every callback by order and calls each, defined or not, ~9 times a batch). `after_fit`
      still reaches every callback (fastai resets each one's `run` there). The cache is rebuilt when
      callbacks are added or removed; changing a callback's `order` after adding it is not seen.
    - fit_one_cycle's schedule is fastai's, computed with `combine_scheds` above instead of tensors.
    """

    def __init__(self, *args, **kwargs):
        self._event_cbs = {}
        super().__init__(*args, **kwargs)

    def add_cb(self, cb):
        self._event_cbs = {}
        return super().add_cb(cb)

    def remove_cb(self, cb):
        self._event_cbs = {}
        return super().remove_cb(cb)

    def __call__(self, event_name):
        if isinstance(event_name, str):
            self._call_one(event_name)
        else:
            for e in event_name:
                self._call_one(e)

    def _call_one(self, event_name):
        cbs = self._event_cbs.get(event_name)
        if cbs is None:
            if not hasattr(event, event_name):
                raise Exception(f"missing {event_name}")
            cbs = list(self.cbs.sorted("order"))
            if event_name != "after_fit":
                cbs = [cb for cb in cbs if callable(getattr(type(cb), event_name, None))]
            self._event_cbs[event_name] = cbs
        for cb in cbs:
            cb(event_name)

    def fit_one_cycle(self, n_epoch, lr_max=None, div=25.0, div_final=1e5, pct_start=0.25, wd=None, moms=None,
                      cbs=None, reset_opt=False, start_epoch=0):
        """fastai's Learner.fit_one_cycle (the same schedule, see combine_scheds)."""
        from fastai.callback.schedule import ParamScheduler

        if self.opt is None:
            self.create_opt()
        self.opt.set_hyper("lr", self.lr if lr_max is None else lr_max)
        lr_max = np.array([h["lr"] for h in self.opt.hypers])
        scheds = {"lr": combined_cos(pct_start, lr_max / div, lr_max, lr_max / div_final),
                  "mom": combined_cos(pct_start, *(self.moms if moms is None else moms))}
        self.fit(n_epoch, cbs=ParamScheduler(scheds) + L(cbs), reset_opt=reset_opt, wd=wd, start_epoch=start_epoch)

