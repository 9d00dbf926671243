"""Output heads: the seed's point estimate (`rmse`) or a per-galaxy Gaussian (`gaussian`: a mean and a σ).

    from fastgal.train.heads import GaussianHead, gaussian_nll, split_outputs
    model = nn.Sequential(body_with_2k_outputs, GaussianHead(Denormalize(mean, std), std))
    loss = gaussian_nll(model(x), y)          # x -> (B, 2k): k means, then k log-σ
    mu, sigma = split_outputs(outputs, k)           # numpy (N, k) each; sigma is None for an rmse head

A gaussian head's network emits 2 numbers per target. The first k go through the same fixed
`Denormalize` as the rmse head (so the mean starts at the training mean); the last k are log σ in the
target's own units (dex), offset by log(target std) so that σ starts at the spread of the training
targets (what predicting the mean would be wrong by), and clamped to [std·e^-7, std·e^2] so that one
bad batch early on cannot drive σ to 0 (an infinite loss) or to infinity (a dead mean gradient).

The loss is the Gaussian negative log-likelihood written with log σ (not torch's gaussian_nll_loss,
which takes a variance, clamps it at eps and takes its log again): mean over batch and targets of
log σ + ½((y − μ)/σ)² + ½ log 2π. The constant keeps it the true NLL per value, so it compares
across runs; it is negative once σ is small, which is why lr_find's stop-on-divergence is off for it.
The metrics (and best-epoch selection) stay the RMSE of the means, so both heads read the same.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

LOG_SIGMA_RANGE = (-7.0, 2.0)  # log(σ / target std): σ from ~1/1000 of the spread to ~7× it
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def n_outputs(head: str, n_targets: int) -> int:
    """The network's output width: one value per target, or a mean and a log σ per target."""
    return n_targets * (2 if head == "gaussian" else 1)


class GaussianHead(nn.Module):
    """(B, 2k) raw network output -> (B, 2k): k means in target units (via `denormalize`), then k log σ."""

    def __init__(self, denormalize: nn.Module, std):
        super().__init__()
        self.denormalize = denormalize
        self.register_buffer("log_std", torch.log(torch.as_tensor(std, dtype=torch.float32)))

    def forward(self, x):
        k = self.log_std.numel()
        x = x.float()
        lo, hi = LOG_SIGMA_RANGE
        log_sigma = self.log_std + x[:, k:].clamp(lo, hi)
        return torch.cat([self.denormalize(x[:, :k]), log_sigma], dim=1)


def gaussian_nll(pred, targ):
    """Mean Gaussian negative log-likelihood of targ (B, k) under pred = (B, 2k) [means | log σ]."""
    pred, targ = pred.float(), targ.float()
    k = targ.shape[1]
    mu, log_sigma = pred[:, :k], pred[:, k:]
    z = (targ - mu) * torch.exp(-log_sigma)
    return (log_sigma + 0.5 * z**2).mean() + HALF_LOG_2PI


def split_outputs(out, n_targets: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Model outputs (..., k) or (..., 2k) -> (means, σ or None), as float numpy arrays."""
    out = out.float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, np.float32)
    if out.shape[-1] == n_targets:
        return out, None
    if out.shape[-1] != 2 * n_targets:
        raise ValueError(f"model output has {out.shape[-1]} columns for {n_targets} targets")
    return out[..., :n_targets], np.exp(out[..., n_targets:])


def view_stats(view_means) -> tuple[np.ndarray, np.ndarray]:
    """Means over the TTA views (axis 0) and their spread: the population std of the 8 dihedral views'
    predictions, a cheap second σ that needs no gaussian head (it only sees what the views disagree on)."""
    v = np.stack(view_means)
    return v.mean(axis=0), v.std(axis=0)
