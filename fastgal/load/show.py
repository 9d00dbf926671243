"""A grid of images with their labels as a PNG (a Loader's show_batch), or an open figure for a notebook; the
colour composite of a cutout of FITS bands (show_batch and score/report.py's gallery)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def band_pick(bands: list[str]) -> tuple[list[int], str]:
    """Which of a cutout's bands show as R, G, B, and the words for it: i, r, g (SDSS's colours) where there are
    all three, else the reddest, middle and bluest; a band or two: the first in grey."""
    if len(bands) >= 3:
        pick = [bands.index(b) for b in "irg"] if set("irg") <= set(bands) else [len(bands) - 1, len(bands) // 2, 0]
        return pick, f"bands {', '.join(bands[k] for k in pick)} shown as R, G, B"
    return [0, 0, 0], f"band {bands[0]} shown in grey"


def colour_composite(x: np.ndarray, bands: list[str]) -> np.ndarray:
    """A (bands, H, W) cutout of stretched fluxes (asinh) as an (H, W, 3) float image in [0, 1]: band_pick's
    bands as R, G, B, scaled together (colours kept) to the image's 0.5-99.5% range."""
    pick, _ = band_pick(bands)
    v = np.asarray(x, np.float32)[pick]
    lo, hi = np.quantile(v, [0.005, 0.995])
    return np.clip((v - lo) / max(float(hi - lo), 1e-9), 0, 1).transpose(1, 2, 0)


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
    return save_figure(fig, out, dpi=80)


def figure_text(fig) -> list[str]:
    """Every piece of text a figure shows, in reading order: its title and captions, then per axes the title,
    axis labels and legend entries (not tick labels)."""
    out = [t.get_text() for t in ([fig._suptitle] if fig._suptitle else []) + list(fig.texts)]
    for ax in fig.axes:
        out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), *(t.get_text() for t in ax.texts)]
        leg = ax.get_legend()
        if leg is not None:
            out += [t.get_text() for t in leg.get_texts()]
    return [t for t in out if t]


def save_figure(fig, out, dpi: int = 100) -> Path:
    """Save a figure as a PNG whose Description text chunk holds figure_text (what it says, readable without
    the pixels: by a search, a screen reader, a test), and close it."""
    fig.savefig(out, dpi=dpi, metadata={"Description": "\n".join(figure_text(fig))})
    plt.close(fig)
    return Path(out)
