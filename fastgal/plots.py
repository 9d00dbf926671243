"""PNG figures a person can open: sample cutouts, loss curves, lr_find, predicted vs true.

A leaf module: it takes arrays and paths, never pipelines or learners.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def image_grid(images: list[np.ndarray], labels: list[str], out: Path | None, ncols: int = 4, title: str = ""):
    """A grid of HWC images (uint8, or float in [0, 1]) with a label above each: saved to `out` as a PNG,
    or, with out=None, the open matplotlib figure (for a notebook)."""
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.2 * ncols, 2.4 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, im, lab in zip(axes.flat, images, labels):
        ax.imshow(im)
        ax.set_title(lab, fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if out is None:
        return fig
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return Path(out)


def loss_curves(train_iters, train_losses, epoch_iters, valid_rmse, out: Path, title: str = "") -> Path:
    """Training loss per batch (smoothed by fastai) and validation RMSE per epoch."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(train_iters, train_losses, label="train loss (RMSE, smoothed)", lw=1)
    if len(valid_rmse):
        ax.plot(epoch_iters, valid_rmse, "o-", label="valid RMSE")
    ax.set_xlabel("batch")
    ax.set_ylabel("dex")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(title or "loss")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def lr_find_plot(lrs, losses, suggested: float, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggested, color="r", ls="--", label=f"suggested (valley) {suggested:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("lr_find")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def pred_vs_true(true, pred, out: Path, name: str = "metallicity", stats: dict | None = None) -> Path:
    """Predicted vs true with the 1:1 line and RMSE/NMAD in the corner."""
    true, pred = np.asarray(true), np.asarray(pred)
    fig, ax = plt.subplots(figsize=(5, 5))
    lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    if len(true) > 2000:
        ax.hexbin(true, pred, gridsize=60, mincnt=1, bins="log", cmap="viridis", extent=(lo, hi, lo, hi))
    else:
        ax.scatter(true, pred, s=6, alpha=0.6)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="1:1")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"true {name}")
    ax.set_ylabel(f"predicted {name}")
    if stats:
        ax.text(0.04, 0.96, "\n".join(f"{k} {v:.4f}" for k, v in stats.items()), transform=ax.transAxes,
                va="top", fontsize=9, bbox=dict(facecolor="white", alpha=0.8))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
