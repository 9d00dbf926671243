"""The seed recipe's network and its loss: xresnet34(n_out, sa=True, act_cls=Mish), RMSE.

    from fastgal.train.model import make_model, rmse_loss
    model = make_model("xresnet34", n_out=1, mean=[8.9], std=[0.2])          # head="gaussian": + a log σ each
    loss = rmse_loss(model(x), y)        # the metrics, rmse_<target>: loop.target_metrics

One addition to the seed: the network ends in a fixed `Denormalize` layer (out * std + mean of the
training targets), so it starts predicting the mean instead of 0 for a ~8.9 dex target. The loss and
the metrics (loop.target_metrics) are still the seed's RMSE in the targets' own units (dex). head="gaussian" (heads.py) adds
a log σ per target; the metrics stay the RMSE of the means.
"""

from __future__ import annotations

import torch
from fastai.vision.models import xresnet
from torch import nn

from fastgal.recipe import ARCH_NAMES
from fastgal.train import heads

ARCHS = {name: getattr(xresnet, name) for name in ARCH_NAMES}


def rmse_loss(pred, targ):
    """The seed's loss: root of the mean squared error over the batch (all targets)."""
    return torch.sqrt(nn.functional.mse_loss(pred.float(), targ.float()))


class Denormalize(nn.Module):
    """A fixed affine output layer: standardised network output -> target units."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x):
        return x.float() * self.std + self.mean


def make_model(arch: str, n_out: int, mean, std, head: str = "rmse", c_in: int = 3) -> nn.Module:
    """n_out targets; head "gaussian" doubles the body's outputs into a mean and a log σ each (heads.py); c_in
    input channels (3 for gri JPEGs, one per band for FITS shards: only the first convolution changes)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    body = ARCHS[arch](n_out=heads.n_outputs(head, n_out), c_in=c_in, sa=True, act_cls=nn.Mish)
    if head == "gaussian":
        return nn.Sequential(body, heads.GaussianHead(Denormalize(mean, std), std))
    return nn.Sequential(body, Denormalize(mean, std))
