"""A grid of images with their labels as a PNG (a Loader's show_batch), or an open figure for a notebook."""

from __future__ import annotations

from pathlib import Path

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
