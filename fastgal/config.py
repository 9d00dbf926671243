"""One dataclass of defaults per command; the defaults are the seed recipe's.

click options in cli.py map onto these fields, and the final config is saved
next to what the command wrote (synth.json, manifest.json, a run's config.json),
so every output says exactly how it was made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


def to_jsonable(cfg) -> dict:
    """asdict() with Paths turned into strings."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}


@dataclass
class SynthConfig:
    """`fastgal synth`: the embedded synthetic SDSS-like survey."""

    out: Path = Path("data/synth")
    n: int = 2000
    seed: int = 0
    size: int = 224  # SkyServer getjpeg cutouts in the seed recipe are 224x224
    workers: int = 0  # 0 = all cores
    jpeg_quality: int = 75  # close to what SkyServer's getjpeg serves
    overwrite: bool = False
    quiet: bool = False


@dataclass
class ShardConfig:
    """`fastgal shard`: catalog + JPEGs -> WebDataset tars + DALI indexes + manifest.json + rejects.csv."""

    catalog: Path = Path("data/synth/data/master.csv")
    images: Path = Path("data/synth/images")
    out: Path = Path("shards/synth")
    id_col: str = "objID"
    targets: list[str] = field(default_factory=lambda: ["metallicity"])
    valid_pct: float = 0.2  # fastai RandomSplitter(0.2, seed=56), as in the seed recipe
    seed: int = 56  # split seed; also seeds the order samples are written in
    shard_size: int = 5000  # samples per tar (~50-100 MB of 224 px cutouts)
    precrop: int | None = None  # store the centre PX x PX crop (JPEG q95) instead of the original bytes
    crop: int = 144  # the pipeline's centre crop: smaller images are rejected, pixel stats use this region
    workers: int = 0  # 0 = all cores
    overwrite: bool = False
    quiet: bool = False
