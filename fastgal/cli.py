"""The `fastgal` command line: one click group, one command per job.

    fastgal synth data/synth --n 2000 --seed 1
    fastgal demo

Each command parses its options into the dataclass of fastgal/config.py, calls the library,
prints results to stdout (`--json` where a machine reads them) and progress to stderr.
User errors are ClickExceptions: one line, non-zero exit.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import click

from . import __version__
from .config import DemoConfig, PredictConfig, ShardConfig, SynthConfig, TrainConfig
from .config import DownloadConfig

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="fastgal")
def cli():
    """fastgal: predict galaxy metallicity from SDSS gri cutouts, trained fast.

    catalog + JPEGs -> WebDataset shards -> NVIDIA DALI -> fastai.
    """


@contextmanager
def _user_errors(writing: Path | None = None, also: tuple = ()):
    """The library's ValueErrors (and `also`) become one-line ClickExceptions; so does an OSError
    while writing `writing`, with the fix. Anything else is a bug and keeps its traceback."""
    try:
        yield
    except (ValueError, *also) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        if writing is None:
            raise
        raise click.ClickException(f"cannot write {writing}: {e.strerror or e}; choose a writable folder with free space") from None


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--n", "n", type=int, default=SynthConfig.n, show_default=True, help="Number of galaxies.")
@click.option("--seed", type=int, default=SynthConfig.seed, show_default=True)
@click.option("--size", type=int, default=SynthConfig.size, show_default=True, help="Cutout width/height in pixels.")
@click.option("--workers", type=int, default=SynthConfig.workers, show_default=True, help="Processes; 0 = all cores.")
@click.option("--overwrite", is_flag=True, help="Replace the survey in a non-empty OUT.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def synth(out, n, seed, size, workers, overwrite, quiet, as_json):
    """Generate the embedded synthetic SDSS-like survey.

    Writes OUT/data/master.csv, OUT/images/{objID}.jpg and OUT/synth.json (parameters and the
    accuracy floor). Same seed and N give byte-identical files, whatever --workers.

    Example:

        fastgal synth data/synth --n 2000 --seed 1
    """
    from .synth import synth as run_synth

    cfg = SynthConfig(out=out, n=n, seed=seed, size=size, workers=workers, overwrite=overwrite, quiet=quiet)
    with _user_errors(writing=out):
        res = run_synth(cfg)
    info = {"out": str(res.out), "n": res.n, "seconds": round(res.seconds, 2),
            "images_per_s": round(res.images_per_s, 1), **{k: v for k, v in res.floor.items() if k != "note"}}
    if as_json:
        _echo_json(info)
    else:
        click.echo(f"wrote {res.n} galaxies to {res.out} in {res.seconds:.1f}s ({res.images_per_s:,.0f} images/s)")
        click.echo(f"accuracy floor RMSE {res.floor['floor_rmse']:.4f} dex, "
                   f"predict-the-mean RMSE {res.floor['mean_baseline_rmse']:.4f} dex")


@cli.command()
@click.argument("shards", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run folder [default: runs/<shards>-<time>].")
@click.option("--epochs", type=int, default=TrainConfig.epochs, show_default=True)
@click.option("--lr", type=float, default=TrainConfig.lr, show_default=True, help="Peak learning rate of fit_one_cycle.")
@click.option("--bs", type=int, default=TrainConfig.bs, show_default=True, help="Batch size (per process).")
@click.option("--arch", default=TrainConfig.arch, show_default=True, help="xresnet18|xresnet34|xresnet50 (sa=True, Mish).")
@click.option("--size", type=int, default=TrainConfig.size, show_default=True, help="Random crop the model sees.")
@click.option("--crop", type=int, default=TrainConfig.crop, show_default=True, help="Centre region crops are drawn from.")
@click.option("--target", "targets", multiple=True, help="Target name(s); default: all in the manifest.")
@click.option("--lr-find", is_flag=True, help="Run fastai's lr_find first; writes lr_find.png.")
@click.option("--lr-find-iters", type=int, default=TrainConfig.lr_find_iters, show_default=True, help="Batches lr_find tries.")
@click.option("--tta", is_flag=True, help="Also predict with the 8 dihedral views averaged.")
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True)
@click.option("--device", default=TrainConfig.device, show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--precision", default=TrainConfig.precision, show_default=True, type=click.Choice(["auto", "bf16", "fp16", "fp32"]))
@click.option("--loader", default=TrainConfig.loader, show_default=True, type=click.Choice(["auto", "dali", "torch"]))
@click.option("--workers", type=int, default=TrainConfig.workers, show_default=True, help="Loader threads; 0 = all cores.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier run in --out.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json to stdout.")
def train(shards, out, epochs, lr, bs, arch, size, crop, targets, lr_find, lr_find_iters, tta, seed, device, precision, loader,
          workers, overwrite, quiet, as_json):
    """Train the seed recipe on a shard folder and write a run folder.

    xresnet34(sa=True, Mish) + ranger + RMSE loss, fit_one_cycle(7, 1e-2), batch 128, with the
    data path on NVIDIA DALI (GPU decode when there is one). Writes config.json, history.csv,
    loss.png, model.pt, predictions_valid.csv, pred_vs_true.png and metrics.json into --out.

    Example:

        fastgal train shards/synth --out runs/r1 --epochs 7 --lr-find --tta
    """
    from .train import train as run_train

    cfg = TrainConfig(shards=shards, out=out, epochs=epochs, lr=lr, bs=bs, arch=arch, size=size, crop=crop,
                      targets=list(targets) or None, lr_find=lr_find, lr_find_iters=lr_find_iters, tta=tta, seed=seed, device=device,
                      precision=precision, loader=loader, workers=workers, overwrite=overwrite, quiet=quiet)
    with _user_errors():
        m = run_train(cfg)
    if not m:  # a non-zero DDP rank
        return
    if as_json:
        _echo_json(m)
    else:
        _print_metrics(m)


def _print_metrics(m: dict) -> None:
    """The final summary table on stdout."""
    click.echo(f"{'target':<14}{'RMSE':>8}{'NMAD':>8}{'bias':>9}{'R2':>7}{'TTA RMSE':>10}{'mean-baseline':>15}")
    for t, v in m["targets"].items():
        tta = f"{v['tta_rmse']:.4f}" if "tta_rmse" in v else "-"
        click.echo(f"{t:<14}{v['rmse']:>8.4f}{v['nmad']:>8.4f}{v['bias']:>+9.4f}{v['r2']:>7.3f}{tta:>10}{v['baseline_rmse']:>15.4f}")
    if m.get("floor"):
        click.echo(f"synthetic survey floor RMSE {m['floor']['floor_rmse']:.4f} dex (the best achievable)")
    click.echo(f"{m['epochs']} epochs in {m['fit_seconds']:.1f}s, {m['train_images_per_s']:.0f} train images/s "
               f"({m['device']}, {m['precision']}, {m['loader_backend']}); best epoch {m['best_epoch']}")


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=DemoConfig.out, show_default=True)
@click.option("--n", "n", type=int, default=None, help="Galaxies [default: 3000 on a CPU, 30000 on a GPU].")
@click.option("--epochs", type=int, default=None, help="[default: 8 on a CPU, 7 on a GPU].")
@click.option("--seed", type=int, default=DemoConfig.seed, show_default=True)
@click.option("--device", default=DemoConfig.device, show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--overwrite", is_flag=True, help="Replace an earlier demo in OUT.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def demo(out, n, epochs, seed, device, overwrite, quiet, as_json):
    """The main job on the embedded synthetic survey: synth -> shard -> train -> report.

    On a GPU: the seed's full recipe. On a CPU: a half-resolution preset (112 px cutouts,
    crop 72 -> 56, xresnet18) that finishes in minutes on 2 cores. Prints the validation RMSE
    beside the predict-the-mean baseline and the survey's accuracy floor.

    Example:

        fastgal demo --out runs/demo
    """
    from .demo import demo as run_demo

    cfg = DemoConfig(out=out, n=n, epochs=epochs, seed=seed, device=device, overwrite=overwrite, quiet=quiet)
    log = (lambda msg: click.echo(msg, err=True)) if not (quiet or as_json) else (lambda msg: None)
    with _user_errors():
        m = run_demo(cfg, log=log)
    if as_json:
        _echo_json(m)
        return
    _print_metrics(m)
    t = m["targets"][m["target"]]
    click.echo(f"validation RMSE {t['rmse']:.4f} dex vs predict-the-mean {t['baseline_rmse']:.4f} dex "
               f"vs floor {m['survey_floor_rmse']:.4f} dex; run folder {out / 'run'}")


@cli.command()
@click.argument("catalog", type=click.Path(path_type=Path))
@click.argument("images", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--id-col", default=ShardConfig.id_col, show_default=True, help="Id column (kept exact, never a float).")
@click.option("--target", "targets", multiple=True, default=("metallicity",), show_default=True,
              help="Target column; repeat for several (stored in this order).")
@click.option("--valid-pct", type=float, default=ShardConfig.valid_pct, show_default=True,
              help="Validation fraction (fastai RandomSplitter semantics).")
@click.option("--seed", type=int, default=ShardConfig.seed, show_default=True, help="Seed of the split and the sample order.")
@click.option("--shard-size", type=int, default=ShardConfig.shard_size, show_default=True, help="Samples per tar.")
@click.option("--precrop", type=int, default=None, help="Store the centre PX x PX crop (JPEG q95) instead of the original bytes.")
@click.option("--crop", type=int, default=ShardConfig.crop, show_default=True,
              help="The training crop region: smaller images are rejected; pixel stats use it.")
@click.option("--workers", type=int, default=ShardConfig.workers, show_default=True, help="Processes; 0 = all cores.")
@click.option("--overwrite", is_flag=True, help="Replace the shards in an OUT that has them.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def shard(catalog, images, out, id_col, targets, valid_pct, seed, shard_size, precrop, crop, workers, overwrite, quiet,
          as_json):
    """Validate a catalog and its JPEGs and write WebDataset shards for DALI.

    Writes OUT/train-NNNNNN.tar and OUT/valid-NNNNNN.tar (each with its DALI .idx),
    OUT/manifest.json (split, counts, sha256s, target and pixel statistics) and OUT/rejects.csv
    (every unusable row with its reason). Every image is fully decoded first; catalog rows =
    samples + rejects, checked before success. Same inputs give byte-identical tars.

    Example:

        fastgal shard data/synth/data/master.csv data/synth/images shards/synth
    """
    from .shards import shard as run_shard

    cfg = ShardConfig(catalog=catalog, images=images, out=out, id_col=id_col, targets=list(targets),
                      valid_pct=valid_pct, seed=seed, shard_size=shard_size, precrop=precrop, crop=crop,
                      workers=workers, overwrite=overwrite, quiet=quiet)
    with _user_errors(writing=out):
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
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the check and the manifest summary as JSON.")
def info(out, as_json):
    """Re-check a shard folder (sha256s, indexes, samples, counts) and summarise its manifest.

    Exits non-zero, naming the file, if anything differs from manifest.json.

    Example:

        fastgal info shards/synth
    """
    from .shards import verify

    with _user_errors():
        res = verify(out)
    m = res["manifest"]
    summary = {"out": str(out), "ok": res["ok"], "problems": res["problems"], "counts": m["counts"],
               "rejects_by_reason": m["rejects_by_reason"], "targets": m["target_stats"],
               "image": m["image"], "pixel_stats": m["pixel_stats"], "split": m["split"],
               "shards": {s: len(v) for s, v in m["shards"].items()}, "bytes": res["bytes"],
               "source": m["source"], "fastgal_version": m["fastgal_version"]}
    if as_json:
        _echo_json(summary)
    else:
        c = m["counts"]
        click.echo(f"{out}: {m['format']} v{m['format_version']} from {m['source']['catalog']}")
        click.echo(f"  rows {c['catalog_rows']} = train {c['train']} + valid {c['valid']} + rejected {c['rejected']}"
                   f"  ({', '.join(f'{k} {v}' for k, v in m['rejects_by_reason'].items()) or 'no rejects'})")
        click.echo(f"  shards: {', '.join(f'{s} {len(v)}' for s, v in m['shards'].items())}, {res['bytes'] / 1e6:,.1f} MB")
        for t, st in m["target_stats"].items():
            click.echo(f"  {t}: mean {st['mean']:.4f} std {st['std']:.4f} range [{st['min']:.3f}, {st['max']:.3f}] (train)")
        ps = m["pixel_stats"]
        click.echo(f"  images {m['image']['size']} precrop {m['image']['precrop']}; centre {ps['region']} px mean "
                   f"{[round(x, 2) for x in ps['mean']]} std {[round(x, 2) for x in ps['std']]}")
        click.echo("  verified: sha256s, indexes and counts match" if res["ok"] else f"  {len(res['problems'])} problem(s)")
    if not res["ok"]:
        raise click.ClickException(f"{out} failed verification: {res['problems'][0]}"
                                   + (f" (+{len(res['problems']) - 1} more)" if len(res["problems"]) > 1 else "")
                                   + "; re-run `fastgal shard ... --overwrite`")


def _scale(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        v = float(value)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise click.BadParameter(f"{value!r} is neither 'auto' nor a positive number of arcsec/pixel")
    return v


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--sql", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="SQL file to run instead of the reference sample's query (fastgal/metallicity_sample.sql).")
@click.option("--catalog", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="CSV with objID, ra, dec, [petroR90_r], targets: skip the query.")
@click.option("--release", default=DownloadConfig.release, show_default=True, help="SDSS data release.")
@click.option("--base-url", default=DownloadConfig.base_url, show_default=True, help="SkyServer host (a mirror, a test server).")
@click.option("--limit", type=int, default=None, help="Only the first N galaxies (by objID for the query).")
@click.option("--size", type=int, default=DownloadConfig.size, show_default=True, help="Cutout width/height in pixels (64-2048).")
@click.option("--scale", default="auto", show_default=True, callback=lambda c, p, v: _scale(v),
              help="arcsec/pixel, or auto: the frame spans 4 x petroR90_r (0.396 without it).")
@click.option("--workers", type=int, default=DownloadConfig.workers, show_default=True, help="Download threads.")
@click.option("--rate", type=float, default=DownloadConfig.rate, show_default=True, help="Requests/s over all threads; 0 = no limit.")
@click.option("--retries", type=int, default=DownloadConfig.retries, show_default=True, help="Retries per cutout after the first try.")
@click.option("--timeout", type=float, default=DownloadConfig.timeout, show_default=True, help="Seconds per request (connect, and between bytes).")
@click.option("--backoff", type=float, default=DownloadConfig.backoff, show_default=True, help="Base of the exponential backoff, seconds.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def download(out, sql, catalog, release, base_url, limit, size, scale, workers, rate, retries, timeout, backoff,
             quiet, as_json):
    """Query SDSS SkyServer for the sample and download its gri cutouts, politely and resumably.

    Writes OUT/data/master.csv (exact objIDs, metallicity, ...), OUT/images/{objID}.jpg (each
    decoded and checked), OUT/download-report.csv (every objID: ok, skipped-existing, not-found,
    failed, invalid-image, interrupted, and why) and OUT/download.json. Re-running the same command
    resumes: complete images are not fetched again. The output feeds `fastgal shard` unchanged.

    Example:

    \b
        fastgal download data/sdss --limit 1000 --workers 4 --rate 4
        fastgal shard data/sdss/data/master.csv data/sdss/images shards/sdss
    """
    import sys

    from .sdss import SkyServerError
    from .sdss import download as run_download

    cfg = DownloadConfig(out=out, sql=sql, catalog=catalog, release=release, base_url=base_url, limit=limit,
                         size=size, scale=scale, workers=workers, rate=rate, retries=retries, timeout=timeout,
                         backoff=backoff, quiet=quiet)
    try:
        with _user_errors(writing=out, also=(SkyServerError,)):  # CatalogError is a ValueError
            res = run_download(cfg)
    except KeyboardInterrupt:
        click.echo("interrupted before any cutout was fetched; nothing to resume yet", err=True)
        sys.exit(130)
    c = res.counts
    if as_json:
        _echo_json({"out": str(res.out), "catalog": res.n, "catalog_source": res.catalog_source, "counts": c,
                    "flagged_mostly_black": res.flagged_black, "stopped_by_interrupt": res.interrupted,
                    "seconds": round(res.seconds, 2), "notes": res.notes,
                    "report": str(res.out / "download-report.csv")})
    else:
        for note in res.notes:
            click.echo(f"note: {note}")
        click.echo(f"catalog: {res.n} galaxies from {res.catalog_source} -> {res.out / 'data' / 'master.csv'}")
        click.echo("cutouts: " + ", ".join(f"{c[s]} {s}" for s in c if c[s] or s in ("ok", "failed"))
                   + f" = {sum(c.values())} of {res.n}"
                   + (f"; {res.flagged_black} flagged mostly-black" if res.flagged_black else ""))
        click.echo(f"report: {res.out / 'download-report.csv'} ({res.seconds:.1f}s, {res.fetched_per_s:.1f} cutouts/s)")
        if c["failed"] or c["invalid-image"] or c["interrupted"]:
            click.echo("re-run the same command to retry what is missing; finished images are kept")
    if res.interrupted:
        sys.exit(130)


@cli.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("input", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="CSV [default: RUN/predictions_<INPUT>.csv].")
@click.option("--split", default=PredictConfig.split, show_default=True, type=click.Choice(["valid", "train", "all"]),
              help="Which shards, when INPUT is a shard folder.")
@click.option("--tta", is_flag=True, help="Average the 8 dihedral views.")
@click.option("--bs", type=int, default=PredictConfig.bs, show_default=True)
@click.option("--device", default=PredictConfig.device, show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--loader", default=PredictConfig.loader, show_default=True, type=click.Choice(["auto", "dali", "torch"]))
@click.option("--workers", type=int, default=PredictConfig.workers, show_default=True, help="0 = all cores.")
@click.option("--json", "as_json", is_flag=True, help="Print a summary as JSON.")
def predict(run, input, out, split, tta, bs, device, loader, workers, as_json):
    """Apply a trained run to a shard folder or a folder of JPEG cutouts.

    Writes a CSV with one row per input: id, predictions (pred_<target>, pred_tta_<target> with
    --tta), the true values when the shards have them, and for JPEG folders a status/reason for
    files that could not be used.

    Example:

        fastgal predict runs/demo/run runs/demo/shards --split valid --tta
    """
    from .predict import predict as run_predict

    cfg = PredictConfig(run=run, input=input, out=out, split=split, tta=tta, bs=bs, device=device, loader=loader,
                        workers=workers)
    with _user_errors():
        df, path = run_predict(cfg)
    n_bad = int((df["status"] != "ok").sum()) if "status" in df else 0
    summary = {"out": str(path), "rows": len(df), "unusable": n_bad}
    for c in [c for c in df.columns if c.startswith("true_")]:
        t = c[5:]
        p = f"pred_tta_{t}" if f"pred_tta_{t}" in df else f"pred_{t}"
        summary[f"rmse_{t}"] = float(((df[p] - df[c]) ** 2).mean() ** 0.5)
    if as_json:
        _echo_json(summary)
        return
    click.echo(f"wrote {len(df)} predictions to {path}" + (f" ({n_bad} unusable inputs, see its status column)" if n_bad else ""))
    for k, v in summary.items():
        if k.startswith("rmse_"):
            click.echo(f"  {k} {v:.4f}")


from .config import BenchConfig  # noqa: E402  (kept beside its command: cli.py is edited by many hands)


@cli.command()
@click.argument("shards", type=click.Path(path_type=Path))
@click.option("--what", default=BenchConfig.what, show_default=True,
              help="Sections, comma-separated: loaders, model, e2e (e2e also runs model), all.")
@click.option("--batches", type=int, default=BenchConfig.batches, show_default=True, help="Timed batches per window.")
@click.option("--warmup", type=int, default=BenchConfig.warmup, show_default=True, help="Untimed batches before each window.")
@click.option("--repeats", type=int, default=BenchConfig.repeats, show_default=True, help="Windows per backend; best reported.")
@click.option("--bs", type=int, default=BenchConfig.bs, show_default=True, help="Batch size.")
@click.option("--size", type=int, default=BenchConfig.size, show_default=True, help="Random crop the model sees.")
@click.option("--crop", type=int, default=BenchConfig.crop, show_default=True, help="Centre region crops are drawn from.")
@click.option("--arch", default=BenchConfig.arch, show_default=True, help="Model for the model and e2e sections.")
@click.option("--device", default=BenchConfig.device, show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--workers", type=int, default=BenchConfig.workers, show_default=True, help="Loader threads per backend; 0 = all cores.")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="JPEG folder for the fastai peer [default: the manifest's source.images].")
@click.option("--catalog", type=click.Path(path_type=Path), default=None,
              help="Catalog CSV for the fastai peer [default: the manifest's source.catalog].")
@click.option("--seed", type=int, default=BenchConfig.seed, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench(shards, what, batches, warmup, repeats, bs, size, crop, arch, device, workers, images, catalog, seed, quiet,
          as_json):
    """Measure training speed as ratios to fastai's own PIL pipeline, all in one run.

    loaders: images/s of the DALI loader, the torch fallback and fastai's DataBlock over the
    original JPEGs (the seed recipe's data path, the peer). model: forward + backward of the
    learner's model on synthetic batches. e2e: a short Learner.fit with each loader, and its
    data-bound fraction (e2e / model images/s). Machines are noisy: read the ratios.

    Example:

        fastgal bench shards/synth --what loaders,e2e --bs 128 --batches 20 --json
    """
    from .bench import bench as run_bench
    from .bench import format_table

    cfg = BenchConfig(shards=shards, what=what, batches=batches, warmup=warmup, repeats=repeats, bs=bs, size=size,
                      crop=crop, arch=arch, device=device, workers=workers, images=images, catalog=catalog, seed=seed,
                      quiet=quiet)
    with _user_errors():
        res = run_bench(cfg)
    if as_json:
        _echo_json(res)
    else:
        click.echo(format_table(res))


def main():  # console-script entry point
    cli()


if __name__ == "__main__":
    main()
