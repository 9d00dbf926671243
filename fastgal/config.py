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


@dataclass
class DownloadConfig:
    """`fastgal download`: the SkyServer sample query and the cutout downloader."""

    out: Path = Path("data/sdss")
    sql: Path | None = None  # None = the reference sample's query (fastgal/metallicity_sample.sql)
    catalog: Path | None = None  # a user CSV (objID, ra, dec, [petroR90_r], targets) instead of a query
    release: str = "dr17"
    base_url: str = "https://skyserver.sdss.org"
    limit: int | None = None  # the first N galaxies by objID
    size: int = 224  # pixels; SkyServer clamps width/height to [64, 2048]
    scale: float | str = "auto"  # arcsec/pixel, or "auto": the frame spans 4 x petroR90_r
    fallback_scale: float = 0.396  # auto without a usable petroR90_r: SDSS's native pixel
    workers: int = 4  # threads, each with its own keep-alive connection
    rate: float = 4.0  # requests/s over all workers (SkyServer is shared); 0 = no limit
    retries: int = 5  # retries after the first try, per cutout and per query
    timeout: float = 30.0  # seconds to connect and between bytes, per cutout request
    query_timeout: float = 600.0  # seconds for the SQL answer (the full sample takes minutes)
    backoff: float = 0.5  # seconds; retry n waits ~backoff * 2**n plus up to `backoff` of jitter
    backoff_max: float = 60.0
    retry_after_max: float = 120.0  # cap on a server's Retry-After
    row_cap: int = 500_000  # SkyServer's SqlSearch row limit; a capped result is split by objID
    quiet: bool = False
