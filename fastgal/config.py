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
