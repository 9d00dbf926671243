"""PNG figures a person can open: sample cutouts, loss curves, lr_find, predicted vs true.

A leaf module: it takes arrays and paths, never pipelines or learners.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def contact_sheet(images: list[Path], labels: list[str], out: Path, ncols: int = 6, title: str = "") -> Path:
    """A grid of cutouts with a label under each (e.g. the metallicity)."""
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2 * ncols, 2.2 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, p, lab in zip(axes.flat, images, labels):
        ax.imshow(np.asarray(Image.open(p).convert("RGB")))
        ax.set_title(lab, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
