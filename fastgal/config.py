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
class TrainConfig:
    """`fastgal train`: the seed recipe. xresnet34(sa, Mish) + ranger + RMSE, fit_one_cycle(7, 1e-2), bs 128."""

    shards: Path = Path("shards/synth")
    out: Path | None = None  # run folder; default runs/<shards name>-<timestamp>
    epochs: int = 7
    lr: float = 1e-2
    bs: int = 128
    arch: str = "xresnet34"
    size: int = 112  # RandomCrop 112 ...
    crop: int = 144  # ... out of CropPad 144
    targets: list[str] | None = None  # None = every target in the manifest
    lr_find: bool = False
    lr_find_iters: int = 100  # fastai's default
    tta: bool = False
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp16; fp32 on CPU) | bf16 | fp16 | fp32
    loader: str = "auto"  # auto | dali | torch
    workers: int = 0  # loader threads; 0 = all cores
    channels_last: bool = True  # on a GPU
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


@dataclass
class DemoConfig:
    """`fastgal demo`: synth -> shard -> train -> report. None = the preset for the device.

    GPU preset: the seed's full recipe (224 px cutouts, CropPad 144 -> RandomCrop 112, xresnet34,
    7 epochs, bs 128). CPU preset: the same geometry at half resolution (112 px cutouts spanning
    the same sky, crop 72 -> 56) with xresnet18, so 2 cores finish in a few minutes and still learn.
    """

    out: Path = Path("runs/demo")
    n: int | None = None  # galaxies: CPU 3000, GPU 30000
    seed: int = 0
    device: str = "auto"
    epochs: int | None = None  # CPU 8, GPU 7
    overwrite: bool = False
    quiet: bool = False

    def preset(self, gpu: bool) -> dict:
        if gpu:
            return dict(n=self.n or 30000, image=224, crop=144, size=112, arch="xresnet34", bs=128,
                        epochs=self.epochs or 7, lr=1e-2, tta=True)
        return dict(n=self.n or 3000, image=112, crop=72, size=56, arch="xresnet18", bs=64,
                    epochs=self.epochs or 8, lr=1e-2, tta=True)


@dataclass
class PredictConfig:
    """`fastgal predict`: a trained run applied to shards or a folder of JPEG cutouts."""

    run: Path = Path("runs/demo/run")
    input: Path = Path("shards/synth")
    out: Path | None = None  # default: <run>/predictions_<input name>.csv
    split: str = "valid"  # shard input: valid | train | all
    tta: bool = False  # average the 8 dihedral views
    bs: int = 256
    device: str = "auto"
    loader: str = "auto"
    workers: int = 0  # 0 = all cores


@dataclass
class BenchConfig:
    """`fastgal bench`: loaders / model / end-to-end training speed, as ratios to fastai's PIL pipeline."""

    shards: Path = Path("shards/synth")
    what: str = "all"  # comma-separated: loaders, model, e2e (e2e also runs model), or all
    batches: int = 20  # timed batches per window
    warmup: int = 2  # untimed batches before each window (worker start, pipeline build, autotune)
    repeats: int = 3  # windows per backend; the best one is reported
    bs: int = 128
    size: int = 112  # the seed's RandomCrop 112 ...
    crop: int = 144  # ... out of CropPad 144
    arch: str = "xresnet34"
    device: str = "auto"  # auto | cpu | cuda
    workers: int = 0  # loader threads/processes for every backend; 0 = all cores
    images: Path | None = None  # the peer's JPEG folder; default: the shards' manifest source.images
    catalog: Path | None = None  # the peer's catalog; default: the manifest's source.catalog
    seed: int = 42
    quiet: bool = False
