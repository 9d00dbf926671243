"""One config dataclass per command, its defaults taken from the seed's recipe (recipe.py).

    from fastgal.options import TrainConfig
    TrainConfig(shards="shards/synth").resolved(gpu=True, crop=144).bs == RECIPE.bs == 128

Each field's metadata is its CLI help (cli.py generates every click option from these fields):
`option(default, "help")`, plus `flag=` (another long name), `short=`, `choices=`, `argument=True`,
`multiple=True`, `cli=False` where the option differs from the plain `--field-name VALUE`.
The final config is saved next to what a command wrote (synth.json, manifest.json, a run's
config.json), so every output says exactly how it was made.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import click

from fastgal.recipe import (
    ARCH_NAMES,
    CPU_RECIPE,
    FRAMES,
    NATIVE_SCALE,
    PRESET_FIELDS,
    PRESETS,
    RECIPE,
    Recipe,
    input_size,
    preset_name,
)
from fastgal.util import is_url


def to_jsonable(cfg) -> dict:
    """asdict() with Paths turned into strings."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}


def option(default=None, help: str = "", *, factory=None, **cli):
    """A config field with its CLI metadata (see the module docstring)."""
    meta = {"help": help, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


QUIET = "No progress on stderr."
WORKERS = "Processes; 0 = all cores."
DEVICES = ["auto", "cpu", "cuda"]
LOADERS = ["auto", "dali", "torch", "batched"]
LOADER_HELP = ("Data path. dali: NVIDIA DALI's graph; torch: per batch with torch only (one decode call, nvJPEG on a "
               "GPU, and one resample); auto: DALI on a GPU where installed, else torch. batched: torch's former name.")
OPTIMIZERS = ["ranger", "fastai-ranger"]
HEADS = ["rmse", "gaussian"]
OPT_HELP = ("ranger: fastai's ranger computed over flat buffers, ~12 tensor ops a step (the same results); "
            "fastai-ranger: fastai's own, ~20 per parameter tensor.")
COMPILE_HELP = ("torch.compile the model (off by default; on a GPU, measure it first with "
                "`fastgal bench --what model --compile --compile-mode reduce-overhead`).")
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune"]
COMPILE_MODE_HELP = ("torch.compile's mode with --compile: reduce-overhead replays each step as a CUDA graph "
                     "(one launch instead of hundreds: the host cost fastgal is bound by on a GPU); on a CPU it "
                     "compiles as default.")


@dataclass
class SynthConfig:
    """`fastgal synth`: the embedded synthetic SDSS-like survey."""

    out: Path = option(Path("data/synth"), argument=True)
    n: int = option(2000, "Number of galaxies.")
    seed: int = option(0)
    size: int = option(RECIPE.image, "Cutout width/height in pixels.")
    format: str = option("jpeg", "jpeg: SkyServer-like gri RGB JPEGs. fits: the same galaxies as calibrated "
                         "fluxes, one (bands, H, W) float32 cube of nanomaggies a file (needs astropy).",
                         choices=["jpeg", "fits"])
    bands: str = option("auto", "Bands, in ugriz order: gri for jpeg; for fits any of u, g, r, i, z (e.g. ugriz); "
                        "--survey legacy: any of g, r, i, z [auto: gri; grz for --survey legacy].")
    survey: str = option("sdss", "sdss: SDSS-like imaging (0.396\" pixels, SkyServer's cutouts). legacy: the same "
                         "galaxies as the DESI Legacy Surveys image them (0.262\" pixels, 1.2-2 mag deeper, 1.2\" "
                         "seeing), FITS laid out like the viewer's fits-cutout (implies --format fits).",
                         choices=["sdss", "legacy"])
    workers: int = option(0, WORKERS)
    jpeg_quality: int = option(75, "close to what SkyServer's getjpeg serves", cli=False)
    overwrite: bool = option(False, "Replace the survey in a non-empty OUT.")
    quiet: bool = option(False, QUIET, short="-q")


@dataclass
class ShardConfig:
    """`fastgal shard`: catalog + JPEGs -> WebDataset tars + DALI indexes + manifest.json + rejects.csv."""

    catalog: Path = option(Path("data/synth/data/master.csv"), argument=True)
    images: Path = option(Path("data/synth/images"), argument=True)
    out: Path = option(Path("shards/synth"), argument=True)
    id_col: str = option("objID", "Id column (kept exact, never a float).")
    targets: list[str] = option(help="Target column; repeat for several (stored in this order).",
                             factory=lambda: [RECIPE.target], flag="--target", multiple=True)
    valid_pct: float = option(RECIPE.valid_pct, "Validation fraction (fastai RandomSplitter semantics).")
    seed: int = option(RECIPE.split_seed, "Seed of the split and the sample order.")
    shard_size: int = option(5000, "Samples per tar.")  # ~50-100 MB of 224 px cutouts
    precrop: int | None = option(None, "Store the centre PX x PX crop (JPEG q95) instead of the original bytes.")
    crop: int = option(RECIPE.crop, "The training crop region: smaller images are rejected; pixel stats use it.")
    bands: str | None = option(None, "FITS cutouts (IMAGES/{id}.fits): the bands to store, in order, by the names "
                               "in the files' headers, e.g. g,r,i or ugriz [default: every band of the files; "
                               "JPEG cutouts when the folder holds .jpg files].")
    dtype: str = option("float16", "FITS cutouts: how fluxes are stored (float16 halves the bytes; its rounding is "
                        "0.1-0.5% of the sky noise, benchmarks/RESULTS.md).", choices=["float16", "float32"])
    workers: int = option(0, WORKERS)
    overwrite: bool = option(False, "Replace the shards in an OUT that has them.")
    quiet: bool = option(False, QUIET, short="-q")


def _preset_text(r: Recipe) -> str:
    return f"{r.arch}, bs {r.bs}, {r.epochs} epochs, lr {r.lr:g}, {r.lr_find_iters} lr_find iterations"


PRESET_HELP = ("Where the settings you do not give come from (--arch, --bs, --epochs, --lr, --lr-find-iters). "
               f"recipe: the seed's ({_preset_text(RECIPE)}); cpu: sized for a few cores ({_preset_text(CPU_RECIPE)}); "
               "auto: recipe on a GPU, cpu on a CPU. Options you give win; config.json records the preset and every "
               "value.")


@dataclass
class TrainConfig:
    """`fastgal train`: the seed recipe. xresnet34(sa, Mish) + ranger + RMSE, fit_one_cycle(7, 1e-2), bs 128.

    None in a PRESET_FIELDS field (and in size) means "not given": resolved() fills it from the preset."""

    shards: Path = option(Path("shards/synth"), argument=True, location=True)  # or a URL: staged (shards/stage.py)
    out: Path | None = option(None, "Run folder [default: runs/<shards>-<time>].")
    preset: str = option("auto", PRESET_HELP, choices=["auto", *PRESETS])
    epochs: int | None = option(None, preset=True)
    lr: float | None = option(None, "Peak learning rate of fit_one_cycle.", preset=True)
    bs: int | None = option(None, "Batch size (per process).", preset=True)
    arch: str | None = option(None, "fastai's xresnet (sa=True, Mish).", choices=ARCH_NAMES, preset=True)
    size: int | None = option(None, "Random crop the model sees [default: 7/9 of the shards' crop, as the recipe's "
                              "144 -> 112: 56 for crop 72].")
    crop: int | None = option(None, "Centre region crops are drawn from [default: the shards' own, from manifest.json].")
    targets: list[str] | None = option(None, "Target name(s); default: all in the manifest.", flag="--target", multiple=True)
    lr_find: bool = option(False, "Run fastai's lr_find first; writes lr_find.png.")
    lr_find_iters: int | None = option(None, "Batches lr_find tries.", preset=True)
    tta: bool = option(False, "Also predict with the 8 dihedral views averaged; their spread is a second sigma "
                    "(sigma_tta_<t>).")
    head: str = option("rmse", "rmse: the seed's point estimate and RMSE loss. gaussian: a mean and a sigma per "
                    "galaxy (sigma_<t>), Gaussian NLL loss; validation RMSE of the mean picks the best epoch.",
                    choices=HEADS)
    interval: str | None = option(None, "Conformal intervals at these coverage levels, e.g. 0.68,0.9,0.95: "
                               "lo_<t>_<level>, hi_<t>_<level>, calibrated on --calib-pct of validation (chosen by "
                               "a hash of the id), which then no longer picks the best epoch; calibration.json "
                               "beside model.pt (score/conformal.py).")
    calib_pct: float = option(0.5, "With --interval: the fraction of validation galaxies set aside to calibrate "
                              "the intervals (the rest picks the best epoch and measures coverage).")
    interval_by: str = option("none", "With --interval: one q for every galaxy (none), or Mondrian bins of the "
                              "predicted value (pred) or of the catalog's stellar mass --mass-col (mass).",
                              choices=["none", "pred", "mass"])
    interval_bins: int = option(4, "With --interval-by pred|mass: the number of quantile bins.")
    mass_col: str = option("lgm_tot_p50", "Catalog column of log stellar mass for the mass-metallicity check "
                        "(mzr.png); skipped when the shards' rows lack it.")
    seed: int = option(42)
    device: str = option("auto", choices=DEVICES)
    precision: str = option("auto", "auto = bf16 on GPUs that have it, else fp16; fp32 on a CPU.",
                         choices=["auto", "bf16", "fp16", "fp32"])
    loader: str = option("auto", LOADER_HELP, choices=LOADERS)
    stretch: str = option("auto", "Shards of FITS bands: asinh(flux / softening) per band before normalising, or none "
                       "(the fluxes as they are); auto = the manifest's (asinh, softening = each band's sky noise).",
                       choices=["auto", "asinh", "none"])
    softening: list[float] | None = option(None, "--stretch asinh's softening per band, in the shards' band order "
                                        "(repeat it once per band) [default: the manifest's].", multiple=True)
    workers: int = option(0, "Loader threads; 0 = all cores.")
    channels_last: bool = option(True, "on a GPU", cli=False)
    overwrite: bool = option(False, "Replace an earlier run in --out.")
    resume: bool = option(False, "Continue the interrupted run in --out from its last finished epoch (same settings).")
    quiet: bool = option(False, QUIET, short="-q")
    compile: bool = option(False, COMPILE_HELP)
    compile_mode: str = option("default", COMPILE_MODE_HELP, choices=COMPILE_MODES)
    opt: str = option("ranger", OPT_HELP, choices=OPTIMIZERS)

    def resolved(self, gpu: bool, crop: int) -> "TrainConfig":
        """This config with the preset named (auto -> recipe or cpu) and every setting not given filled: the
        preset's arch, bs, epochs, lr, lr_find_iters; size from the shards' `crop` (input_size)."""
        name = preset_name(self.preset, gpu)
        r = PRESETS[name]
        fill = {f: getattr(r, f) for f in PRESET_FIELDS if getattr(self, f) is None}
        return replace(self, preset=name, size=self.size if self.size is not None else input_size(crop), **fill)

    def from_preset(self) -> list[str]:
        """The settings a preset would fill here (those not given), in PRESET_FIELDS order."""
        return [f for f in PRESET_FIELDS if getattr(self, f) is None]


@dataclass
class DownloadConfig:
    """`fastgal download`: the SkyServer sample query and the cutout downloader."""

    out: Path = option(Path("data/sdss"), argument=True)
    sql: Path | None = option(None, "SQL file to run instead of the reference sample's query (fastgal/metallicity_sample.sql).")
    catalog: Path | None = option(None, "CSV with objID, ra, dec, [petroR90_r], targets: skip the query.")
    release: str = option("dr17", "SDSS data release.")
    base_url: str = option("https://skyserver.sdss.org", "SkyServer host (a mirror, a test server).")
    limit: int | None = option(None, "Only the first N galaxies (by objID for the query).")
    size: int = option(RECIPE.image, "Cutout width/height in pixels (64-2048; SkyServer clamps outside it; "
                       "--imaging legacy: 64-512, the viewer's maximum).")
    scale: float | str = option("auto", "arcsec/pixel (0.015-60; legacy 0.05-2.62), or auto: frame each galaxy by --frame "
                             "(the native pixel without a petroR90_r: 0.396, legacy 0.262).", type="scale")
    frame: str = option("original", "--scale auto's frame: original = 2 x petroR90_r / 0.396 (about 5.05 x "
                     "petroR90_r, the published study's), 4r90 = 4 x petroR90_r.", choices=list(FRAMES))
    fallback_scale: float = option(NATIVE_SCALE, "auto without a usable petroR90_r: SDSS's native pixel", cli=False)
    imaging: str = option("skyserver", "Where the cutouts come from: skyserver (SDSS gri JPEGs, getjpeg) or legacy "
                          "(the DESI Legacy Surveys' g, r, z FITS cubes, the viewer's fits-cutout; needs astropy).",
                          choices=["skyserver", "legacy"])
    layer: str = option("ls-dr10", "--imaging legacy: the viewer's layer (ls-dr10 joins BASS/MzLS north of Dec 32.375 "
                        "to DECam south of it; ls-dr10-south, ls-dr9, ls-dr9-north, ls-dr9-south).")
    bands: str = option("grz", "--imaging legacy: bands of each FITS cube (letters of griz; i only south of Dec 32.375).")
    legacy_url: str = option("https://www.legacysurvey.org/viewer", "--imaging legacy: the cutout service (a test server).")
    jpeg: bool = option(False, "--imaging legacy: also fetch each galaxy's colour JPEG (the viewer's jpeg-cutout, same "
                        "frame) into OUT/jpeg/{objID}.jpg, beside the FITS that shard reads.")
    workers: int = option(4, "Download threads, each with its own keep-alive connection.")
    rate: float = option(4.0, "Requests/s over all threads (SkyServer and the Legacy viewer are shared); 0 = no limit.")
    retries: int = option(5, "Retries after the first try, per cutout; per query only where nothing ran "
                       "(connection errors, 502/503/504, 429 with Retry-After), never a SQL error.")
    timeout: float = option(30.0, "Seconds per request (connect, and between bytes).")
    query_timeout: float = option(660.0, "Seconds to wait for the SQL answer; more than SkyServer's own 600 s "
                               "limit, so a slow query ends with the server's message, not a client timeout.")
    backoff: float = option(0.5, "Base of the exponential backoff, seconds (retry n waits ~backoff * 2**n + jitter).")
    backoff_max: float = option(60.0, cli=False)
    retry_after_max: float = option(120.0, "cap on a server's Retry-After", cli=False)
    row_cap: int = option(500_000, "SkyServer's SqlSearch row limit; a capped result is split by objID", cli=False)
    quiet: bool = option(False, QUIET, short="-q")


@dataclass
class DemoConfig:
    """`fastgal demo`: synth -> shard -> train -> report. None = the preset for the device.

    GPU preset: the seed's full recipe (RECIPE). CPU preset: CPU_RECIPE.
    """

    out: Path = option(Path("runs/demo"))
    n: int | None = option(None, "Galaxies [default: 3000 on a CPU, 30000 on a GPU].")
    epochs: int | None = option(None, "[default: 8 on a CPU, 7 on a GPU].")
    seed: int = option(0)
    device: str = option("auto", choices=DEVICES)
    loader: str = option("auto", LOADER_HELP, choices=LOADERS)
    overwrite: bool = option(False, "Replace an earlier demo in OUT.")
    quiet: bool = option(False, QUIET, short="-q")

    def preset(self, gpu: bool) -> dict:
        name = "recipe" if gpu else "cpu"
        r = PRESETS[name]
        return dict(preset=name, n=self.n or (30000 if gpu else 3000), image=r.image, crop=r.crop, size=r.size,
                    arch=r.arch, bs=r.bs, epochs=self.epochs or r.epochs, lr=r.lr, tta=True)


@dataclass
class PredictConfig:
    """`fastgal predict`: a trained run applied to shards or a folder of JPEG cutouts."""

    run: Path = option(Path("runs/demo/run"), argument=True)
    input: Path = option(Path("shards/synth"), argument=True, location=True)  # or a shard folder's URL: staged
    out: Path | None = option(None, "CSV [default: RUN/predictions_<INPUT>.csv].")
    split: str = option("valid", "Which shards, when INPUT is a shard folder.", choices=["valid", "train", "all"])
    tta: bool = option(False, "Average the 8 dihedral views; their spread is written as sigma_tta_<t>.")
    interval: str | None = option(None, "Conformal intervals at these levels from the run's calibration.json (a run "
                               "trained with --interval), e.g. 0.68,0.9,0.95: lo_<t>_<level>, hi_<t>_<level>.")
    bs: int = option(256)
    device: str = option("auto", choices=DEVICES)
    loader: str = option("auto", LOADER_HELP, choices=LOADERS)
    workers: int = option(0, "Threads (loader threads for shards; at most 4 checking a folder's files); 0 = all cores.")
    report: bool = option(False, "Also write a self-contained HTML page beside the CSV (its name, .html): a gallery "
                          "ranked by the error (shards) or the uncertainty (new cutouts: sigma, else the --tta "
                          "spread), and every unusable file with its reason.")
    quiet: bool = option(False, QUIET, short="-q")


@dataclass
class ReportConfig:
    """`fastgal report`: report.html of a finished run folder (what `fastgal train` writes last), rebuilt."""

    run: Path = option(Path("runs/demo/run"), argument=True)
    gallery: int = option(12, "Validation galaxies in each of the gallery's sections: the N worst predicted, the N "
                          "best and N at random (0: no gallery).")
    seed: int = option(0, "Seed of the gallery's random draw.")
    out: Path | None = option(None, "HTML file [default: RUN/report.html].")


@dataclass
class BenchConfig:
    """`fastgal bench`: loaders / model / end-to-end training speed, as ratios to fastai's PIL pipeline, and the
    host cost of a training step against stock fastai's."""

    shards: Path = option(Path("shards/synth"), argument=True, location=True)  # or a URL: staged
    what: str = option("all", "Sections, comma-separated: loaders, model, e2e (e2e also runs model), step "
                           "(the host cost of a training step, fastgal vs stock fastai), shuffle, decode (the JPEG "
                           "decoders alone), equality (the torch loader vs DALI: the same pixels?), all.")
    batches: int = option(20, "Timed batches per window (equality: batches compared per view).")
    warmup: int = option(2, "Untimed batches before each window (worker start, pipeline build, autotune).")
    repeats: int = option(3, "Windows per backend; the best is reported.")
    bs: int = option(RECIPE.bs, "Batch size.")
    size: int | None = option(None, "Random crop the model sees [default: 7/9 of the crop, as `fastgal train`: 112 "
                              "for the recipe's 144, 56 for crop 72; without shards the recipe's 112].")
    crop: int | None = option(None, "Centre region crops are drawn from [default: the shards' own].")
    arch: str = option(RECIPE.arch, "Model for the model, e2e and step sections.", choices=ARCH_NAMES)
    device: str = option("auto", choices=DEVICES)
    workers: int = option(0, "Loader threads for every backend (the fastai peer: worker processes); 0 = all cores.")
    epochs: int = option(2, "Full epochs the shuffle section reads per loader (>= 2).")
    ranks: int = option(1, "Shuffle section: DDP ranks to simulate (loaders with shard_id 0..K-1).")
    images: Path | None = option(None, "JPEG folder for the fastai peer [default: the manifest's source.images].")
    catalog: Path | None = option(None, "Catalog CSV for the fastai peer [default: the manifest's source.catalog].")
    seed: int = option(42)
    quiet: bool = option(False, QUIET, short="-q")
    compile: bool = option(False, COMPILE_HELP + " The model section then times the eager model too, in the same run.")
    compile_mode: str = option("default", COMPILE_MODE_HELP, choices=COMPILE_MODES)
    opt: str = option("ranger", "Optimizer of fastgal's learner in every section (the step section's peer is always "
                   "fastai's ranger).", choices=OPTIMIZERS)


@dataclass
class StageConfig:
    """`fastgal stage`: a shard folder at a URL (or on a shared filesystem) copied to node-local disk, verified."""

    src: str = option("", cli=False)  # SRC and DST are the command's arguments (DST optional)
    cache: Path | None = option(None, cli=False)
    streams: int = option(8, "Files fetched at once.")
    retries: int = option(4, "Tries after a failed or corrupt fetch of a file, waiting 0.5 s, 1 s, 2 s, ... between.")
    timeout: float = option(60.0, "Seconds without a byte before a fetch is given up (then retried).")
    quiet: bool = option(False, QUIET, short="-q")


# --------------------------------------------------------------------------- the click options, from the fields

def _scale(ctx, param, value):
    """--scale: 'auto' or a positive number of arcsec/pixel."""
    if value == "auto":
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = -1.0
    if not v > 0:
        raise click.BadParameter(f"{value!r} is neither 'auto' nor a positive number of arcsec/pixel")
    return v


_CALLBACKS = {"scale": _scale}


class Location(click.ParamType):
    """A shard folder's path, or its URL (https://, s3://, any fsspec URL) kept as a string: a Path would collapse
    `//`. shards/stage.py stages a URL to node-local disk."""

    name = "path|url"

    def convert(self, value, param, ctx):
        return value if isinstance(value, Path) or is_url(value) else Path(value)


def _click_type(hint, meta: dict):
    """The click type for a field's annotation (Path, int, float, str, and their `| None`)."""
    if meta.get("location"):
        return Location()
    if meta.get("choices"):
        return click.Choice(meta["choices"])
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if typing.get_origin(args[0]) is list:
        args = list(typing.get_args(args[0]))
    base = args[0] if len(args) == 1 else str
    if base is Path:
        return click.Path(path_type=Path)
    return base if base in (int, float, str) else str


def options(cfg_cls, json_help: str | None = "Print the summary as JSON."):
    """Declare a command's arguments and options from cfg_cls's fields (and --json)."""
    hints = typing.get_type_hints(cfg_cls)

    def deco(f):
        decorators = []
        for fl in fields(cfg_cls):
            meta = dict(fl.metadata)
            if meta.get("cli") is False:
                continue
            default = fl.default if fl.default is not MISSING else fl.default_factory()
            if meta.get("argument"):
                decorators.append(click.argument(fl.name, type=_click_type(hints[fl.name], meta)))
                continue
            decls = [meta.get("flag") or "--" + fl.name.replace("_", "-"), fl.name]
            if meta.get("short"):
                decls.insert(0, meta["short"])
            kw = {"help": meta.get("help") or None}
            if hints[fl.name] is bool:
                kw["is_flag"] = True
            elif meta.get("type") in _CALLBACKS:
                kw.update(default=default, show_default=True, callback=_CALLBACKS[meta["type"]])
            else:
                kw["type"] = _click_type(hints[fl.name], meta)
                if meta.get("multiple"):
                    kw.update(multiple=True, default=tuple(default or ()), show_default=bool(default))
                elif meta.get("preset"):  # None = not given: --preset fills it; help shows each preset's value
                    kw["default"] = None
                    kw["help"] = ((kw["help"] or "") + " [default: the preset's: "
                                  + ", ".join(f"{n} {getattr(r, fl.name)}" for n, r in PRESETS.items()) + "]").strip()
                else:
                    kw.update(default=default, show_default=default is not None)
            decorators.append(click.option(*decls, **kw))
        if json_help:
            decorators.append(click.option("--json", "as_json", is_flag=True, help=json_help))
        for d in reversed(decorators):
            f = d(f)
        return f

    return deco


def config(cfg_cls, kwargs: dict):
    """cfg_cls(**kwargs) from click's values: a repeated option's tuple becomes a list (None when
    the field's default is None and none was given)."""
    kw = {}
    for fl in fields(cfg_cls):
        if fl.name not in kwargs:
            continue
        v = kwargs[fl.name]
        if fl.metadata.get("multiple"):
            v = list(v) if v else (None if fl.default is None else list(fl.default_factory()))
        kw[fl.name] = v
    return cfg_cls(**kw)
