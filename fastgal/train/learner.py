"""The seed recipe's Learner: make_model's network, ranger, the RMSE loss and metrics, fastgal's callbacks.

    from fastgal.train.learner import make_learner
    model = make_model("xresnet34", 1, mean=[8.9], std=[0.2])           # fastgal.train.model
    learn = make_learner(dls, model, targets=["metallicity"], path="runs/r1")
    learn.fit_one_cycle(7, 1e-2)

Everything is stock fastai, extended with callbacks rather than a custom loop. What a Learner is made of
lives by job: the network and loss in model.py, the metrics beside the loop (loop.py), the callbacks in callbacks.py, the optimizer in
ranger.py, the training loop's device-side recorder in loop.py, the output heads in heads.py; model.pt
(save_checkpoint / load_checkpoint) in checkpoints.py; --device / --precision in device.py.

The training step does less host work than stock fastai's, with the same results (what bounds a
GPU at this model size): `--opt ranger` is fastai's ranger over flat buffers (ranger.py), and the
Learner is loop.py's FastgalLearner with a DeviceRecorder (the loss read from the device every
SYNC_EVERY steps). `dress` adds what every fastgal Learner has beside fastai's (epoch timings, progress
on stderr, AMP, channels-last); `fastgal bench --what step` dresses stock fastai's Learner with it, as its peer.
"""

from __future__ import annotations

from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import *  # noqa: F401,F403  (patches fit_one_cycle, lr_find onto Learner)
from fastai.learner import Learner
from torch import nn

from fastgal.train import heads
from fastgal.train.callbacks import EpochStats, StderrProgress
from fastgal.train.loop import DeviceRecorder, FastgalLearner, target_metrics
from fastgal.train.model import rmse_loss
from fastgal.train.ranger import optimizer


def make_learner(dls, model: nn.Module, *, targets: list[str], path, precision: str = "fp32",
                 channels_last: bool = False, quiet: bool = False, opt: str = "ranger", compile: bool | str = False,
                 head: str = "rmse", progress: str = "stderr") -> FastgalLearner:
    """The seed's Learner around `model` (model.make_model's) with fastgal's callbacks. It writes no files:
    train adds the best-epoch weights and the epoch checkpoint (which holds the history rows).

    opt: 'ranger' (fastgal's flat-buffer Ranger) or 'fastai-ranger' (fastai's own).
    compile: torch.compile the model in place (nn.Module.compile: state_dict keys are unchanged); True, or
    torch.compile's mode ("default", "reduce-overhead": CUDA graphs on a GPU, "max-autotune").
    head "gaussian": Gaussian NLL loss; the metrics stay the RMSE of the means (columns 0..k-1).
    progress: "stderr" (the commands: a line per epoch on stderr, nothing on stdout) or "fastai" (fastai's
    own bars and table, as a notebook shows them: the public API's recipe_learner).
    """
    if compile:
        model.compile(mode=compile if isinstance(compile, str) else "default")
    loss = heads.gaussian_nll if head == "gaussian" else rmse_loss
    learn = FastgalLearner(dls, model, loss_func=loss, opt_func=optimizer(opt), metrics=target_metrics(targets),
                           path=path, model_dir=".")
    learn.remove_cb(learn.recorder)
    learn.add_cb(DeviceRecorder())
    return dress(learn, precision=precision, channels_last=channels_last, quiet=quiet, progress=progress)


def dress(learn: Learner, *, precision: str = "fp32", channels_last: bool = False, quiet: bool = False,
          progress: str = "stderr") -> Learner:
    """What every fastgal Learner has beside fastai's: epoch timings (learn.epoch_stats), progress on stderr
    (learn.stderr_progress) with no progress bars or table on stdout, or with progress="fastai" fastai's own,
    mixed precision (bf16/fp16) and channels-last as asked."""
    learn.add_cb(EpochStats())
    if progress == "stderr":
        learn.add_cb(StderrProgress(quiet))
        learn.remove_cb(ProgressCallback)  # its bars go to stdout; StderrProgress replaces them
        learn.logger = lambda *a, **k: None  # the Recorder's table; we print our own summary
    if precision in ("bf16", "fp16"):
        learn.add_cb(MixedPrecision(amp_mode=precision))
    if channels_last:
        from fastai.callback.channelslast import ChannelsLast

        learn.add_cb(ChannelsLast())
    return learn
