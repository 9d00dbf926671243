"""PNG figures a person can open: sample cutouts, loss curves, lr_find, predicted vs true, residuals, MZR,
the coverage of predicted uncertainties.

A leaf module: it takes arrays and paths, never pipelines or learners. Each PNG carries what the figure says
(titles, captions, axis labels, legend entries) in its Description text chunk (show.save_figure):
`PIL.Image.open("runs/r1/lr_find.png").text["Description"]`. With out=None a function returns the open Figure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # the commands write files only, never a window; a notebook keeps its inline plots
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fastgal.load.show import save_figure  # noqa: E402

UNITS = {"metallicity": "dex", "lgm_tot_p50": "dex"}  # 12 + log(O/H); log stellar mass: a target's axis unit


def axis_name(name: str) -> str:
    """A target's axis label: its name with its unit where known ('metallicity (dex)'), else the name."""
    return f"{name} ({UNITS[name]})" if name in UNITS else name


def _done(fig, out: Path | None, dpi: int = 100):
    """The open figure (out=None, for a notebook or a test), else the PNG at `out` (with its text chunk)."""
    if out is None:
        return fig
    return save_figure(fig, out, dpi=dpi)


def loss_curves(train_iters, train_losses, epoch_iters, valid_rmse, out: Path, title: str = "",
                loss_name: str = "RMSE") -> Path:
    """Training loss per batch (smoothed by fastai) and validation RMSE per epoch. A loss other than the
    RMSE (the gaussian head's NLL, which goes negative) gets its own linear axis on the right."""
    fig, ax = plt.subplots(figsize=(6, 4))
    lax = ax if loss_name == "RMSE" else ax.twinx()
    lax.plot(train_iters, train_losses, label=f"train loss ({loss_name}, smoothed)", lw=1, color="C0")
    if len(valid_rmse):
        ax.plot(epoch_iters, valid_rmse, "o-", label="valid RMSE", color="C1")
    ax.set_xlabel("batch")
    ax.set_ylabel("dex")
    ax.set_yscale("log")
    if lax is not ax:
        lax.set_ylabel(loss_name)
    # one legend for both axes, drawn on the top one
    lines = [ln for a in dict.fromkeys((lax, ax)) for ln in a.get_lines()]
    lax.legend(lines, [ln.get_label() for ln in lines])
    ax.set_title(title or "loss")
    fig.tight_layout()
    return _done(fig, out)


def lr_find_plot(lrs, losses, suggested: float, out: Path | None, used: float | None = None) -> Path:
    """lr_find's loss against the learning rate, with its suggestion (the valley) and the peak lr training
    then used (`used`: --lr, which the suggestion does not change), each marked and labelled."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggested, color="r", ls="--", label=f"suggested (valley) {suggested:.2e}")
    if used is not None:
        ax.axvline(used, color="k", ls="-", lw=1.2, label=f"used for training (--lr) {used:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("lr_find")
    fig.tight_layout()
    return _done(fig, out)


DENSITY_ABOVE = 2000  # points: above this a scatter plot is a blob, so draw the density (hexbin) instead


def _points(ax, x, y, extent=None):
    if len(x) > DENSITY_ABOVE:
        ax.hexbin(x, y, gridsize=60, mincnt=1, bins="log", cmap="viridis", extent=extent)
    else:
        ax.scatter(x, y, s=6, alpha=0.6)


def _band(ax, band: dict, label: str, color: str = "C1"):
    """A running median with its 16-84% band (diagnostics.running_band)."""
    ax.plot(band["x"], band["p50"], color=color, lw=1.5, label=label)
    ax.fill_between(band["x"], band["p16"], band["p84"], color=color, alpha=0.25, lw=0)


def pred_vs_true(true, pred, out: Path, name: str = "metallicity", stats: dict | None = None) -> Path:
    """Predicted vs true (a density plot when there are many points) with the 1:1 line, the running
    median and 16-84% band of the prediction at fixed truth, and RMSE/NMAD in the corner."""
    from fastgal.score.diagnostics import running_band

    true, pred = np.asarray(true), np.asarray(pred)
    fig, ax = plt.subplots(figsize=(5, 5))
    lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    _points(ax, true, pred, (lo, hi, lo, hi))
    _band(ax, running_band(true, pred), "median, 16-84%")
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="1:1")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"true {axis_name(name)}")
    ax.set_ylabel(f"predicted {axis_name(name)}")
    if stats:
        ax.text(0.04, 0.96, "\n".join(f"{k} {v:.4f}" for k, v in stats.items()), transform=ax.transAxes,
                va="top", fontsize=9, bbox=dict(facecolor="white", alpha=0.8))
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _done(fig, out)


def residuals(true, pred, out: Path, name: str = "metallicity") -> Path:
    """predicted - true against the true and against the predicted value, each with its running median and
    16-84% band: regression to the mean shows as a tilt in the left panel."""
    from fastgal.score.diagnostics import running_band

    true, pred = np.asarray(true), np.asarray(pred)
    d = pred - true
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, x, label in ((axes[0], true, f"true {axis_name(name)}"), (axes[1], pred, f"predicted {axis_name(name)}")):
        _points(ax, x, d)
        _band(ax, running_band(x, d), "median, 16-84%")
        ax.axhline(0, color="k", ls="--", lw=1)
        ax.set_xlabel(label)
    axes[0].set_ylabel("predicted - true" + (f" ({UNITS[name]})" if name in UNITS else ""))
    axes[0].legend(loc="upper right")
    fig.tight_layout()
    return _done(fig, out)


def mzr_plot(mass, true, pred, fits: dict, out: Path) -> Path:
    """The mass-metallicity relation from the true and from the predicted metallicity, with each fit and
    the scatter about it (fits = diagnostics.summarise(...)["mzr"])."""
    mass, true, pred = np.asarray(mass), np.asarray(true), np.asarray(pred)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    grid = np.linspace(*fits["true"]["mass_range"], 100)
    for ax, z, key in ((axes[0], true, "true"), (axes[1], pred, "pred")):
        _points(ax, mass, z)
        for k, color in (("true", "C3"), ("pred", "C1")):
            f = fits[k]
            ax.plot(grid, np.polyval(f["coefficients"], grid), color=color, lw=1.5 if k == key else 1,
                    ls="-" if k == key else ":", label=f"fit to {k}: scatter {f['rmse']:.3f} dex")
        ax.set_xlabel("log stellar mass")
        ax.set_title(f"{'true' if key == 'true' else 'predicted'} metallicity")
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("12 + log(O/H) (dex)")
    fig.tight_layout()
    return _done(fig, out)


TTA_CAPTION = ("TTA spread: the standard deviation of the 8 dihedral views' predictions, used as sigma. It says how "
               "much a prediction moves when the cutout is turned or mirrored; it is not an uncertainty of the error, "
               "so its curve need not follow the Gaussian's.")


def coverage_plot(abs_z: dict, out: Path | None, k_max: float = 3.0, caption: str | None = None) -> Path:
    """Observed fraction of |error| / sigma <= k against k, for each named sigma ({label: |z| per galaxy}),
    beside a Gaussian's erf(k / sqrt 2): a curve below it is overconfident, above it underconfident.
    caption: a note under the axes (default: TTA_CAPTION where a label names a TTA spread)."""
    from math import erf, sqrt

    k = np.linspace(0, k_max, 121)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(k, [erf(v / sqrt(2)) for v in k], "k--", lw=1, label="Gaussian expectation")
    for label, z in abs_z.items():
        z = np.sort(np.asarray(z, np.float64))
        ax.plot(k, np.searchsorted(z, k, side="right") / max(len(z), 1), lw=1.5, label=label)
    for v in (1, 2):
        ax.axvline(v, color="0.8", lw=0.8, zorder=0)
    ax.set_xlim(0, k_max)
    ax.set_ylim(0, 1)
    ax.set_xlabel("k  (|predicted - true| <= k sigma)")
    ax.set_ylabel("fraction of galaxies")
    ax.legend(loc="lower right", fontsize=8)
    if caption is None and any("TTA" in label for label in abs_z):
        caption = TTA_CAPTION
    if caption:
        import textwrap

        fig.text(0.02, 0.01, textwrap.fill(caption, 80), fontsize=7, va="bottom", ha="left", color="0.25")
        fig.tight_layout(rect=(0, 0.02 + 0.03 * (len(caption) // 80 + 1), 1, 1))
    else:
        fig.tight_layout()
    return _done(fig, out)


def interval_coverage_plot(grid, curves: dict, out: Path | None, levels=(), name: str = "", n_test: int = 0):
    """Empirical against nominal coverage of intervals ({label: coverage at each level of grid}): the diagonal is
    an honest interval; below it over-promises. The chosen --interval levels are marked, with the binomial
    standard error of a coverage measured on n_test galaxies as a band."""
    grid = np.asarray(grid, np.float64)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="nominal")
    if n_test:
        se = np.sqrt(grid * (1 - grid) / n_test)
        ax.fill_between(grid, grid - 2 * se, grid + 2 * se, color="0.85", zorder=0, label=f"±2 s.e. ({n_test} galaxies)")
    for label, cov in curves.items():
        ax.plot(grid, cov, lw=1.5, label=label)
    for lv in levels:
        ax.axvline(lv, color="0.7", lw=0.8, zorder=0)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("nominal coverage (interval level)")
    ax.set_ylabel("fraction of held-out galaxies inside")
    ax.set_title(f"{name}: intervals on galaxies held out from calibration", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    return _done(fig, out)
