"""The `fastgal` command line: one click group, one command per job.

    fastgal synth data/synth --n 2000 --seed 1
    fastgal demo

Options are declared once, as the fields of the command's config dataclass (fastgal/options.py):
`@options(TrainConfig)` turns each field into a click argument or option with the field's default
and help, and `config(TrainConfig, kwargs)` is built from what click parsed. Each command calls the
library, prints results to stdout (`--json` where a machine reads them) and progress to stderr.
What an exception out of a command becomes (one line, exit 1; Ctrl-C 130, SIGTERM 143) is failures.py's.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click

from fastgal import __version__
from fastgal.failures import FastgalGroup, output_folder, user_errors
from fastgal.options import (
    BenchConfig,
    DemoConfig,
    DownloadConfig,
    PredictConfig,
    ReportConfig,
    ShardConfig,
    StageConfig,
    SynthConfig,
    TrainConfig,
    config,
    options,
)
from fastgal.score.summary import calibration_lines, format_metrics
from fastgal.shards.verify import format_info, info_summary
from fastgal.util import (
    sigterm_unwinds,
)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# Warnings raised inside dependencies, not by anything the user did: (message regex, module regex).
# Filtered by both, so any other warning, and these from anywhere else, still shows.
DEPENDENCY_WARNINGS = [
    (r"`torch\.jit\.script` is deprecated", r"torch\.jit\._script"),  # at fastai's import (fastai.torch_core)
    (r"numpy\.core is deprecated", r"fastai\.learner"),  # fastai's Learner.load, after fit
    (r"The 'mode\.chained_assignment' option is deprecated", r"fastai\.tabular\.core"),  # pandas 3, at import
    # torchvision 0.29 deprecates its JPEG decoder, which the torch fallback uses: it is libjpeg-turbo, bit
    # identical to DALI's CPU decoder and PIL (tests/test_loaders.py), so it stays until a successor is too
    (r"The image decoding and encoding capabilities of TorchVision are deprecated", r"torchvision\.io\.image"),
]


def quiet_dependency_warnings() -> None:
    for message, module in DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)


@click.group(cls=FastgalGroup, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="fastgal")
def cli():
    """fastgal: predict galaxy metallicity from SDSS gri cutouts, trained fast.

    catalog + JPEGs -> WebDataset shards -> NVIDIA DALI -> fastai.
    """


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


@cli.command()
@options(SynthConfig)
def synth(as_json, **kw):
    """Generate the embedded synthetic SDSS-like survey.

    Writes OUT/data/master.csv, OUT/images/{objID}.jpg and OUT/synth.json (parameters and the
    accuracy references: the observable reference and the latent floor). Same seed and N give
    byte-identical files, whatever --workers. --format fits writes OUT/images/{objID}.fits instead:
    the same galaxies as calibrated fluxes, a (bands, H, W) float32 cube in nanomaggies per 0.396"
    SDSS pixel area (header BANDS, BAND0.., BUNIT, PIXSCALE, NMGYPIX, OBJID), u and z beside g, r, i.

    Examples:

    \b
        fastgal synth data/synth --n 2000 --seed 1
        fastgal synth data/synth-fits --n 2000 --seed 1 --format fits --bands ugriz
    """
    from fastgal.survey.synth import synth as run_synth

    cfg = config(SynthConfig, kw)
    with user_errors(writing=cfg.out), output_folder(cfg.out):
        res = run_synth(cfg)
    info = {"out": str(res.out), "n": res.n, "format": cfg.format, "bands": res.bands,
            "seconds": round(res.seconds, 2), "images_per_s": round(res.images_per_s, 1),
            **{k: v for k, v in res.floor.items() if k not in ("note", "observable_reference")}}
    if as_json:
        _echo_json(info)
    else:
        click.echo(f"wrote {res.n} galaxies to {res.out} in {res.seconds:.1f}s ({res.images_per_s:,.0f} images/s)")
        f = res.floor
        click.echo(f"observable reference RMSE {f['observable_reference_rmse']:.4f} dex (what {res.bands} images show), "
                   f"latent floor {f['floor_rmse']:.4f} dex (knowing mass and SFR), "
                   f"predict-the-mean {f['mean_baseline_rmse']:.4f} dex")


@cli.command()
@options(TrainConfig, json_help="Print metrics.json to stdout.")
def train(as_json, **kw):
    """Train the seed recipe on a shard folder and write a run folder.

    xresnet34(sa=True, Mish) + ranger + RMSE loss, fit_one_cycle(7, 1e-2), batch 128, with the
    data path on NVIDIA DALI (GPU decode when there is one). Writes config.json, history.csv,
    loss.png, model.pt, predictions_valid.csv, pred_vs_true.png, metrics.json and report.html (`fastgal
    report`) into --out.

    --head gaussian predicts a mean and a sigma per galaxy (Gaussian NLL loss): sigma_<target>, the
    calibration in metrics.json (within 1 and 2 sigma vs 68.3%, 95.4%) and coverage.png. --tta adds
    the 8 views' spread as a second sigma (sigma_tta_<target>) for either head.

    Example:

        fastgal train shards/synth --out runs/r1 --lr-find --tta --head gaussian
    """
    from fastgal.run import train as run_train
    from fastgal.run_folder import CHECKPOINT, default_run_dir

    cfg = config(TrainConfig, kw)
    cfg.out = Path(cfg.out) if cfg.out else default_run_dir(cfg.shards)  # named here: the lines below say it
    ckpt = cfg.out / CHECKPOINT

    def resume_hint():
        if ckpt.is_file():
            return (f"fastgal: {cfg.out} keeps the last finished epoch; the same command with "
                    f"--out {cfg.out} --resume continues from it")
        return None

    # a run folder holds nothing of value before its first epoch's checkpoint
    with user_errors(output=cfg.out, option="--out", on_interrupt=resume_hint), output_folder(cfg.out, keep=ckpt.is_file):
        m = run_train(cfg)
    if not m:  # a non-zero DDP rank
        return
    if as_json:
        _echo_json(m)
    else:
        click.echo(format_metrics(m))


@cli.command()
@options(DemoConfig, json_help="Print the metrics as JSON.")
def demo(as_json, **kw):
    """The main job on the embedded synthetic survey: synth -> shard -> train -> report.

    On a GPU: the seed's full recipe. On a CPU: a half-resolution preset (112 px cutouts,
    crop 72 -> 56, xresnet18) that finishes in minutes on 2 cores. Prints the validation RMSE
    beside the predict-the-mean baseline, the survey's observable reference and its latent floor.

    Example:

        fastgal demo --out runs/demo
    """
    from fastgal.demo import demo as run_demo

    cfg = config(DemoConfig, kw)
    log = (lambda msg: click.echo(msg, err=True)) if not cfg.quiet else (lambda msg: None)  # stage lines, as train's
    with user_errors(output=cfg.out, option="--out"), output_folder(cfg.out):
        m = run_demo(cfg, log=log)
    if as_json:
        _echo_json(m)
        return
    click.echo(format_metrics(m))
    t = m["targets"][m["target"]]
    click.echo(f"validation RMSE {t['rmse']:.4f} dex vs predict-the-mean {t['baseline_rmse']:.4f} dex "
               f"vs observable reference {m['survey_reference_rmse']:.4f} dex (latent floor "
               f"{m['survey_floor_rmse']:.4f}); run folder {cfg.out / 'run'}")


@cli.command()
@options(ShardConfig)
def shard(as_json, **kw):
    """Validate a catalog and its JPEGs and write WebDataset shards for DALI.

    Writes OUT/train-NNNNNN.tar and OUT/valid-NNNNNN.tar (each with its DALI .idx),
    OUT/manifest.json (split, counts, sha256s, target and pixel statistics) and OUT/rejects.csv
    (every unusable row with its reason). Every image is fully decoded first; catalog rows =
    samples + rejects, checked before success. Same inputs give byte-identical tars.

    Example:

        fastgal shard data/synth/data/master.csv data/synth/images shards/synth
    """
    from fastgal.shards.write import shard as run_shard

    cfg = config(ShardConfig, kw)
    with user_errors(writing=cfg.out), output_folder(cfg.out):
        res = run_shard(cfg)
    m = res.manifest
    c = m["counts"]
    nbytes = {s: sum(e["bytes"] for e in m["shards"][s]) for s in ("train", "valid")}
    info = {"out": str(res.out), "catalog_rows": c["catalog_rows"], "train": c["train"], "valid": c["valid"],
            "rejected": c["rejected"], "rejects_by_reason": m["rejects_by_reason"],
            "shards": {s: len(m["shards"][s]) for s in ("train", "valid")}, "bytes": nbytes,
            "seconds": round(res.seconds, 2), "images_per_s": round(res.images_per_s, 1)}
    if as_json:
        _echo_json(info)
        return
    click.echo(f"sharded {c['catalog_rows']} rows into {res.out} in {res.seconds:.1f}s ({res.images_per_s:,.0f} images/s)")
    for s in ("train", "valid"):
        click.echo(f"  {s}  {c[s]:>8} samples in {len(m['shards'][s])} shard(s), {nbytes[s] / 1e6:,.1f} MB")
    if c["rejected"]:
        why = ", ".join(f"{k} {v}" for k, v in sorted(m["rejects_by_reason"].items(), key=lambda kv: -kv[1]))
        click.echo(f"  rejected {c['rejected']} ({why}); see {res.out / 'rejects.csv'}")
    else:
        click.echo("  rejected 0")


@cli.command()
@click.argument("src", type=str)
@click.argument("dst", type=click.Path(path_type=Path), required=False)
@options(StageConfig, json_help="Print what was staged (folder, shards fetched and cached, bytes, MB/s) as JSON.")
def stage(src, dst, as_json, **kw):
    """Copy a shard folder at a URL (or on a shared filesystem) into a node-local cache, verified.

    SRC: https://..., s3://bucket/prefix/, gs://... (any fsspec URL) or a folder. DST: the cache folder
    [default: $FASTGAL_CACHE, else $SLURM_TMPDIR/fastgal, else the system temp folder's fastgal-cache]. Every tar
    is checked against the manifest's sha256 before it is taken; tars are kept by their sha256, so an unchanged
    shard is never fetched twice; a killed staging resumes. Prints the staged folder: pass it (or the URL itself)
    to train, predict, info and bench.

    Example:

        fastgal stage s3://bucket/shards/sdss/ /scratch/fastgal
    """
    from fastgal.shards.stage import stage as run_stage

    cfg = config(StageConfig, {**kw, "src": src, "cache": dst})
    with user_errors(output=dst, option="DST"):
        res = run_stage(cfg.src, cfg.cache, streams=cfg.streams, retries=cfg.retries, timeout=cfg.timeout, quiet=cfg.quiet)
    if as_json:
        _echo_json(res.as_dict())
    else:
        click.echo(res.folder)


@cli.command()
@click.argument("out", type=str)
@click.option("--json", "as_json", is_flag=True, help="Print the check and the manifest summary as JSON.")
def info(out, as_json):
    """Re-check a shard folder (sha256s, indexes, samples, counts) and summarise its manifest.

    Exits non-zero, naming the file, if anything differs from manifest.json.

    Example:

        fastgal info shards/synth
    """
    from fastgal.shards.stage import local
    from fastgal.shards.verify import verify

    with user_errors():
        out = local(out)  # a URL: staged (verified) first, then checked here as any folder
        res = verify(out)
    if as_json:
        _echo_json(info_summary(out, res))
    else:
        click.echo(format_info(out, res))
    if not res["ok"]:
        raise click.ClickException(f"{out} failed verification: {res['problems'][0]}"
                                   + (f" (+{len(res['problems']) - 1} more)" if len(res["problems"]) > 1 else "")
                                   + "; re-run `fastgal shard ... --overwrite`")


@cli.command()
@options(DownloadConfig)
def download(as_json, **kw):
    """Query SDSS SkyServer for the sample and download its gri cutouts, politely and resumably.

    Writes OUT/data/master.csv (exact objIDs, metallicity, ...), OUT/images/{objID}.jpg (each
    decoded and checked), OUT/download-report.csv (every objID: ok, skipped-existing, not-found,
    failed, invalid-image, interrupted, and why) and OUT/download.json. Re-running the same command
    resumes: complete images are not fetched again. The output feeds `fastgal shard` unchanged.

    --imaging legacy fetches the same sample's g, r, z cutouts from the DESI Legacy Surveys' viewer
    (fits-cutout, --layer ls-dr10) as OUT/images/{objID}.fits cubes, each read in full and checked
    (no-coverage, missing-band, truncated, html-error are report reasons, never a silent zero image).

    Example:

    \b
        fastgal download data/sdss --limit 1000 --workers 4 --rate 4
        fastgal shard data/sdss/data/master.csv data/sdss/images shards/sdss
        fastgal download data/legacy --imaging legacy --limit 1000
        fastgal shard data/legacy/data/master.csv data/legacy/images shards/legacy --bands g,r,z
    """
    from fastgal.survey.download import download as run_download
    from fastgal.survey.skyserver import SkyServerError

    cfg = config(DownloadConfig, kw)
    try:
        with user_errors(writing=cfg.out, also=(SkyServerError,)), output_folder(cfg.out):  # CatalogError: a ValueError
            res = run_download(cfg)
    except KeyboardInterrupt:
        click.echo("interrupted before any cutout was fetched; nothing to resume yet", err=True)
        sys.exit(130)
    if as_json:
        _echo_json(res.summary())
    else:
        click.echo(res.format())
    if res.interrupted:
        sys.exit(130)
    if res.n and not res.fetched:  # nothing could be fetched: a failure, whatever was written
        raise click.ClickException(f"none of the {res.n} cutouts could be fetched (first: {res.first_problem}); "
                                   f"every row is in {res.out / 'download-report.csv'}")


@cli.command()
@options(PredictConfig, json_help="Print a summary as JSON.")
def predict(as_json, **kw):
    """Apply a trained run to a shard folder or a folder of cutouts.

    A folder holds {id}.jpg cutouts, or {id}.fits for a model trained on FITS bands.
    Writes a CSV with one row per input: id, predictions (pred_<target>, pred_tta_<target> with
    --tta), sigma_<target> from a --head gaussian model, sigma_tta_<target> (the 8 views' spread)
    with --tta, the true values when the shards have them, and for a folder of cutouts a status/reason
    for files that could not be used. On shards it reports what `fastgal train` writes to metrics.json,
    under the same names: rmse (of pred_<target>), tta_rmse (of pred_tta_<target>, with --tta), NMAD,
    bias, outliers and the calibration of each sigma.

    Example:

        fastgal predict runs/demo/run runs/demo/shards --split valid --tta
        fastgal predict runs/demo/run data/new/images --tta --report     # + predictions_images.html
    """
    from fastgal.score.predict import diagnose
    from fastgal.score.predict import predict as run_predict

    cfg = config(PredictConfig, kw)
    with user_errors(output=cfg.out or cfg.run, option="--out"):
        df, path = run_predict(cfg)
    n_bad = int((df["status"] != "ok").sum()) if "status" in df else 0
    if n_bad and n_bad == len(df):  # nothing scored: a failure, whatever the table says
        top = df["status"].value_counts().index[0]
        raise click.ClickException(f"none of the {len(df)} inputs could be scored (first reason: "
                                   f"{top}: {df.loc[df.status == top, 'reason'].iloc[0]}); their rows are in {path}")
    page = None
    if cfg.report:
        from fastgal.score.predict_report import write_prediction_report

        with user_errors(output=path, option="--out"):
            page = write_prediction_report(df, Path(path).with_suffix(".html"), cfg.run, cfg.input, csv=path)
    diag = diagnose(df)
    # the names of train's metrics.json: rmse of pred_<t>, tta_rmse of pred_tta_<t> (--tta)
    summary = {"out": str(path), "rows": len(df), "unusable": n_bad, **({"report": str(page)} if page else {}),
               **{f"{k}_{t}": d[k] for t, d in diag.items() for k in ("rmse", "tta_rmse") if k in d},
               "diagnostics": diag}
    if as_json:
        _echo_json(summary)
        return
    click.echo(f"wrote {len(df)} predictions to {path}" + (f" ({n_bad} unusable inputs, see its status column)" if n_bad else ""))
    if page:
        click.echo(f"wrote the page {page}")
    for t, d in diag.items():
        tta = f"  TTA RMSE {d['tta_rmse']:.4f}" if "tta_rmse" in d else ""
        click.echo(f"  {t}: RMSE {d['rmse']:.4f}{tta}  NMAD {d['nmad']:.4f}  bias {d['bias']:+.4f}  "
                   f"outliers {d['outlier_fraction']:.1%}")
        for line in calibration_lines(d, "    "):
            click.echo(line)
        if "intervals" in d:  # --interval
            click.echo("    conformal intervals: " + ", ".join(f"{lv}: {v['coverage']:.1%} inside, mean width {v['mean_width']:.3f}"
                                                            for lv, v in d["intervals"].items()))


@cli.command()
@options(ReportConfig, json_help="Print where it was written and its size as JSON.")
def report(as_json, **kw):
    """Write report.html for a finished run folder, any run's, older ones too.

    One self-contained HTML file (images embedded, no script, nothing fetched) that any browser opens:
    the validation RMSE beside predict-the-mean (and the synthetic survey's observable reference and latent
    floor), the run's settings, its figures, its history and a gallery of the worst, best and random
    validation galaxies by |pred - true| of the first target, each with its cutout from the run's shards
    (config.json names them; without them the gallery says so). `fastgal train` writes the same page.

    Example:

        fastgal report runs/demo/run --gallery 12
    """
    from fastgal.score.report import write_report

    cfg = config(ReportConfig, kw)
    with user_errors(writing=cfg.out or cfg.run / "report.html", option="--out"):
        path = write_report(cfg.run, gallery=cfg.gallery, seed=cfg.seed, out=cfg.out)
    size = path.stat().st_size
    if as_json:
        _echo_json({"out": str(path), "bytes": size, "gallery": cfg.gallery})
    else:
        click.echo(f"wrote {path} ({size / 1e3:,.0f} kB)")


@cli.command()
@options(BenchConfig, json_help="Print the results as JSON.")
def bench(as_json, **kw):
    """Measure training speed as ratios to fastai's own PIL pipeline, all in one run.

    loaders: images/s of the DALI loader, the torch fallback and fastai's DataBlock over the
    original JPEGs (the seed recipe's data path, the peer). model: forward + backward of the
    learner's model on synthetic batches. e2e: a short Learner.fit with each loader, and the
    ratio e2e / model images/s (1: the loader keeps up). step: the host cost of a training step (ms, aten
    ops, device syncs) against stock fastai's. shuffle: each loader's sample order across epochs.
    decode: the JPEG decoders alone. equality: the torch loader against DALI on the same
    samples and draws (evaluation views exact, training views within one grey level).
    Machines are noisy: read the ratios.

    Example:

        fastgal bench shards/synth --what loaders,e2e --bs 128 --batches 20 --json
    """
    from fastgal.bench.main import bench as run_bench
    from fastgal.bench.main import format_table

    with user_errors():
        res = run_bench(config(BenchConfig, kw))
    if as_json:
        _echo_json(res)
    else:
        click.echo(format_table(res))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def env(as_json):
    """Versions, the NVIDIA driver and GPUs, whether torch can use them, and what will not work.

    python, torch (+ its CUDA), torchvision, fastai, DALI (+ its CUDA flavour), nvImageCodec,
    webdataset; the driver and GPUs (from nvidia-smi or /proc, not torch); usable cores; warnings
    for a GPU torch cannot use, DALI and torch built for different CUDA majors, or no DALI.

    Example:

        fastgal env --json
    """
    from fastgal.env import format_table, gather

    info = gather()
    if as_json:
        _echo_json(info)
    else:
        click.echo(format_table(info))


def main():  # console-script entry point
    quiet_dependency_warnings()
    with sigterm_unwinds():
        cli()


if __name__ == "__main__":
    main()
