"""report.html: one self-contained page a person opens to see how a run went.

    from fastgal.score.report import write_report
    write_report("runs/r1")                  # runs/r1/report.html, what `fastgal report runs/r1` writes

It needs only what a run folder holds (config.json, metrics.json, predictions_valid.csv, history.csv, the PNGs)
and, for the gallery's cutouts, the shards named in config.json; without them the gallery says so. Everything is
in the one file: images as base64 data URIs, inline CSS, no script, nothing fetched. `fastgal train` writes it
last (rank 0); `fastgal report RUN` rebuilds it for any finished run, older ones included.

The gallery ranks the validation galaxies by |pred_<t> - true_<t>| of the first target (the plain prediction, not
TTA's): the N worst, the N best and N drawn at random (seeded). Each item carries its numbers as data attributes
(data-section, data-id, data-true, data-pred, data-abs-error) for a reader that is not a person.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from fastgal import __version__
from fastgal.util import write_bytes_atomic

REPORT = "report.html"
GALLERY = 12
# the run's figures, in the order the page shows them (a per-target figure follows its first target's)
FIGURES = ("loss", "lr_find", "pred_vs_true", "residuals", "mzr", "coverage", "interval_coverage")
CAPTIONS = {"loss": "Loss per batch and validation RMSE per epoch", "lr_find": "Learning-rate finder",
            "pred_vs_true": "Predicted vs true (validation)", "residuals": "Residuals (validation)",
            "mzr": "Mass-metallicity relation", "coverage": "Coverage of the predicted uncertainties",
            "interval_coverage": "Conformal and raw sigma intervals: empirical vs nominal coverage (held-out galaxies)"}
UNITS = {"metallicity": "dex", "lgm_tot_p50": "dex"}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0 auto;
max-width:1200px;padding:1.5rem;color:#1d2330;background:#fff;line-height:1.45;font-size:15px}
h1{font-size:1.6rem;margin:0 0 .3rem}h2{font-size:1.2rem;margin:2rem 0 .6rem;border-bottom:1px solid #dde;
padding-bottom:.2rem}h3{font-size:1rem;margin:1.2rem 0 .4rem}
.sub{color:#555;margin:0 0 1rem}.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em}
.cards{display:flex;flex-wrap:wrap;gap:.8rem;margin:.8rem 0}
.card{border:1px solid #dde;border-radius:8px;padding:.6rem .9rem;min-width:9rem;background:#f8f9fc}
.card .v{font-size:1.45rem;font-weight:600}.card .k{color:#555;font-size:.85rem}.card.main{background:#eef4ff;
border-color:#9bb8f0}
table{border-collapse:collapse;margin:.4rem 0;font-size:.9rem}th,td{padding:.25rem .6rem;text-align:right;
border-bottom:1px solid #eee}th{background:#f3f4f8}td.l,th.l{text-align:left}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:1rem}
figure{margin:0;border:1px solid #eee;border-radius:6px;padding:.4rem;background:#fff}
figure img{width:100%;height:auto;display:block}figcaption{font-size:.85rem;color:#444;margin-top:.3rem}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:.6rem}
.gal{border:1px solid #dde;border-radius:6px;padding:.35rem;font-size:.8rem;background:#fafafa}
.gal img{width:100%;aspect-ratio:1/1;object-fit:contain;display:block;background:#000;image-rendering:auto}
.gal .id{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.72rem;color:#555;word-break:break-all}
.gal .err{font-weight:600}.worst .err{color:#b3261e}.best .err{color:#1b7f3b}
.noimg{width:100%;aspect-ratio:1/1;display:flex;align-items:center;justify-content:center;background:#eee;
color:#777;font-size:.75rem;text-align:center}
.note{background:#fff7e0;border:1px solid #f0d68a;border-radius:6px;padding:.5rem .8rem;margin:.6rem 0}
footer{margin-top:2rem;color:#777;font-size:.8rem}
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _png_description(data: bytes) -> str:
    """The Description text chunk plots.py writes into each PNG (what the figure says), for alt text."""
    try:
        from PIL import Image

        return Image.open(io.BytesIO(data)).text.get("Description", "")
    except (OSError, ValueError, AttributeError):  # not a PNG PIL reads, or without text chunks: the caption
        return ""


def _read_run(run: Path) -> tuple[dict, dict, pd.DataFrame, pd.DataFrame | None]:
    """config.json, metrics.json, predictions_valid.csv and (where there is one) history.csv of a finished run;
    ValueError, one line naming what is missing, otherwise."""
    if not run.is_dir():
        raise ValueError(f"{run} is not a folder; pass a run folder (what `fastgal train --out` wrote)")
    if not (run / "metrics.json").is_file():
        what = "an unfinished run" if (run / "config.json").is_file() else "no run"
        raise ValueError(f"{run} holds {what} (no metrics.json); finish it with `fastgal train ... --out {run} "
                         "--resume`, or pass a finished run folder")
    for name in ("config.json", "predictions_valid.csv"):
        if not (run / name).is_file():
            raise ValueError(f"{run / name} is missing; the report needs a whole run folder")
    try:
        config = json.loads((run / "config.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{run}: config.json or metrics.json is not valid JSON ({e})") from None
    preds = pd.read_csv(run / "predictions_valid.csv", dtype={"id": str})
    hist = pd.read_csv(run / "history.csv") if (run / "history.csv").is_file() else None
    return config, metrics, preds, hist


# --------------------------------------------------------------------------- the gallery

def gallery_rows(preds: pd.DataFrame, target: str, n: int = GALLERY, seed: int = 0) -> dict[str, pd.DataFrame]:
    """The worst, best and random n rows of predictions_valid.csv by |pred_<target> - true_<target>|, each with an
    abs_error column: worst by decreasing error, best by increasing, random in the order drawn (seeded)."""
    df = preds.copy()
    df["abs_error"] = (df[f"pred_{target}"] - df[f"true_{target}"]).abs()
    df = df[np.isfinite(df["abs_error"])]
    order = df.sort_values("abs_error", kind="stable")
    n = max(0, min(n, len(df)))
    rng = np.random.default_rng(seed)
    return {"worst": order.iloc[::-1].head(n), "best": order.head(n),
            "random": df.iloc[rng.choice(len(df), size=n, replace=False)] if n else df.head(0)}


def _open_split(config: dict, shards=None):
    """The validation split the run was scored on, and a note for the page (None: all is well). Never raises:
    shards that are gone, changed or unreadable make a note instead of a gallery's cutouts."""
    from fastgal.shards.read import Shards

    folder = config.get("shards")
    if shards is None and (not folder or not (Path(folder) / "manifest.json").is_file()):
        return None, (f"The cutouts are not shown: the run's shards ({folder}, named in config.json) are not there "
                      "any more (no manifest.json); the numbers below are from predictions_valid.csv.")
    try:
        sh = shards if shards is not None else Shards(folder)
        split = sh.split("valid")
    except (ValueError, OSError, KeyError) as e:
        return None, f"The cutouts are not shown: the run's shards ({folder}) cannot be read: {e}"
    note = None
    want = config.get("shards_sha256")
    if want and sh.sha256() != want:
        note = (f"The shards at {folder} are not the ones this run was trained on (their sha256 differs from "
                "config.json's): cutouts are matched by id, and may be missing or differ.")
    return split, note


def _cutout(split, i: int, config: dict) -> tuple[bytes, str]:
    """Sample i's cutout for the page: JPEG bytes as stored, or for FITS bands a PNG colour composite (i, r, g
    as R, G, B where present, asinh-stretched with the run's softening, scaled together)."""
    if split.kind == "jpeg":
        return split.jpeg(i).tobytes(), "image/jpeg"
    from PIL import Image

    from fastgal.load.show import colour_composite

    x = split.image(i).astype(np.float32)
    soft = (config.get("image") or {}).get("softening") or (split.shards.stretch or {}).get("softening")
    if soft is None:  # trained on the fluxes as they are: a softening of the image's own spread
        soft = [float(np.std(x)) or 1.0] * x.shape[0]
    rgb = colour_composite(np.arcsinh(x / np.asarray(soft, np.float32)[:, None, None]), split.shards.bands)
    buf = io.BytesIO()
    Image.fromarray((rgb * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG", optimize=True)
    return buf.getvalue(), "image/png"


def _gallery_html(preds: pd.DataFrame, target: str, n: int, seed: int, config: dict, shards=None, opened=None) -> str:
    unit = UNITS.get(target, "")
    rows = gallery_rows(preds, target, n, seed)
    split, note = opened if opened is not None else _open_split(config, shards)  # opened: once for every target
    where = {k: i for i, k in enumerate(split.keys)} if split is not None else {}
    sigmas = [c for c in (f"sigma_{target}", f"sigma_tta_{target}") if c in preds]
    parts = [f'<h2 id="gallery-{_e(target)}">Gallery: validation galaxies by {_e(target)}</h2>',
             (f'<p class="sub">Ranked by |pred - true| of <b>{_e(target)}</b> ({_e(unit) or "its unit"}), using the '
              f'plain prediction <span class="mono">pred_{_e(target)}</span> (not the TTA average); the {n} worst, '
              f'the {n} best and {n} drawn at random (seed {seed}) of {len(preds)}.</p>')]
    if note:
        parts.append(f'<p class="note">{_e(note)}</p>')
    if split is not None:
        kind = ("JPEG cutouts as stored" if split.kind == "jpeg" else
                "FITS bands as a colour composite: " + _band_words(split.shards.bands)
                + ", asinh-stretched, scaled together")
        parts.append(f'<p class="sub">{_e(kind)}, shown at the page\'s size.</p>')
    titles = {"worst": "Worst predicted", "best": "Best predicted", "random": "Random"}
    for section, df in rows.items():
        parts.append(f'<h3>{titles[section]} ({len(df)})</h3><div class="gallery {section}">')
        for _, r in df.iterrows():
            gid, true, pred, err = str(r["id"]), float(r[f"true_{target}"]), float(r[f"pred_{target}"]), float(r["abs_error"])
            i = where.get(gid)
            if i is not None:
                data, mime = _cutout(split, i, config)
                img = f'<img src="{data_uri(data, mime)}" alt="cutout of {_e(gid)}" loading="eager">'
            else:
                img = f'<div class="noimg">{"no cutout: shards unavailable" if split is None else "not in the shards"}</div>'
            sig = "".join(f"<br>{'sigma' if c.startswith('sigma_' + target) else 'TTA sigma'} "
                          f"{_fmt(float(r[c]), '.3f')} {_e(unit)}" for c in sigmas)
            hover = _row_words(split, i) if i is not None else ""
            parts.append(
                f'<div class="gal" data-target="{_e(target)}" title="{_e(hover)}" '
                f'data-section="{section}" data-id="{_e(gid)}" data-true="{true!r}" '
                f'data-pred="{pred!r}" data-abs-error="{err!r}">{img}<div class="id">{_e(gid)}</div>'
                f'true {true:.3f}, pred {pred:.3f}<br><span class="err">|error| {err:.3f} {_e(unit)}</span>{sig}</div>')
        parts.append("</div>")
    return "\n".join(parts)


def _row_words(split, i: int, most: int = 14) -> str:
    """Sample i's catalog row as one line for a gallery item's tooltip: its columns (the image's own record left
    out), numbers to 4 significant digits."""
    try:
        row = split.row(i)
    except (ValueError, OSError):
        return ""
    words = []
    for k, v in row.items():
        if k.startswith("__"):
            continue
        words.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(words[:most]) + (" ..." if len(words) > most else "")


def _band_words(bands: list[str]) -> str:
    from fastgal.load.show import band_pick

    return band_pick(bands)[1]


# --------------------------------------------------------------------------- the page

def _card(key: str, value: str, main: bool = False) -> str:
    return f'<div class="card{" main" if main else ""}"><div class="v">{_e(value)}</div><div class="k">{_e(key)}</div></div>'


def _headline(run: Path, config: dict, metrics: dict) -> str:
    t = metrics.get("target") or config["targets"][0]
    m = (metrics.get("targets") or {}).get(t, metrics)
    unit = UNITS.get(t, "")
    u = f" {unit}" if unit else ""
    cards = [_card(f"validation RMSE of {t}", f"{_fmt(m.get('rmse'))}{u}", main=True),
             _card("predict-the-mean RMSE", f"{_fmt(m.get('baseline_rmse'))}{u}")]
    if "tta_rmse" in m:
        cards.append(_card("TTA RMSE (8 views)", f"{_fmt(m['tta_rmse'])}{u}"))
    floor = metrics.get("floor") or {}
    if "observable_reference_rmse" in floor:
        bands = (floor.get("observable_reference") or {}).get("bands", "gri")
        cards.append(_card(f"observable reference ({bands} images)", f"{_fmt(floor['observable_reference_rmse'])}{u}"))
    if "floor_rmse" in floor:
        cards.append(_card("latent floor (knowing mass and SFR)", f"{_fmt(floor['floor_rmse'])}{u}"))

    def get(k):
        return metrics.get(k, config.get(k))

    trained_by = (config.get("versions") or {}).get("fastgal", "?")
    settings = [("arch", get("arch")), ("epochs", get("epochs")), ("best epoch", metrics.get("best_epoch")),
                ("bs", config.get("bs")), ("lr", config.get("lr")), ("preset", get("preset")), ("head", get("head")),
                ("TTA", config.get("tta")), ("train / valid", f"{get('n_train')} / {get('n_valid')}"),
                ("device", f"{get('device')}, {get('precision')}"), ("loader", get("loader_backend")),
                ("fit", (f"{_fmt(metrics.get('fit_seconds'), '.1f')} s, "
                         f"{_fmt(metrics.get('train_images_per_s'), ',.0f')} images/s")),
                ("fastgal", f"{trained_by} (trained); {__version__} (this report)"),
                ("shards", config.get("shards")), ("run folder", str(run))]
    rows = "".join(f'<tr><th class="l">{_e(k)}</th><td class="l mono">{_e(v)}</td></tr>' for k, v in settings
                   if v is not None)
    return (f'<div class="cards">{"".join(cards)}</div>'
            f'<table class="settings">{rows}</table>')


def _targets_table(metrics: dict) -> str:
    per = metrics.get("targets") or {}
    if not per:
        return ""
    head = ("<tr><th class='l'>target</th><th>RMSE</th><th>TTA RMSE</th><th>NMAD</th><th>bias</th><th>R²</th>"
            "<th>outliers</th><th>predict-the-mean</th></tr>")
    body = "".join(
        f"<tr><td class='l'>{_e(t)}{' (' + UNITS[t] + ')' if t in UNITS else ''}</td><td>{_fmt(v.get('rmse'))}</td>"
        f"<td>{_fmt(v.get('tta_rmse'))}</td><td>{_fmt(v.get('nmad'))}</td><td>{_fmt(v.get('bias'), '+.4f')}</td>"
        f"<td>{_fmt(v.get('r2'), '.3f')}</td><td>{_fmt(v.get('outlier_fraction'), '.1%')}</td>"
        f"<td>{_fmt(v.get('baseline_rmse'))}</td></tr>" for t, v in per.items())
    return f"<h2>Scores per target (validation)</h2><table>{head}{body}</table>"


def _history_table(hist: pd.DataFrame | None) -> str:
    if hist is None or hist.empty:
        return ""
    cols = [c for c in hist.columns if c == "epoch" or c.startswith(("train_loss", "valid_loss", "rmse_"))
            or c in ("seconds", "images_per_s")]
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_e(_cell(r[c]))}</td>" for c in cols) + "</tr>" for _, r in hist.iterrows())
    return f"<h2>History</h2><table>{'<tr>' + head + '</tr>'}{body}</table>"


def _cell(v) -> str:
    if isinstance(v, (int, np.integer)):
        return str(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return str(int(f)) if f.is_integer() and abs(f) < 1e6 else f"{f:.4g}"


def figure_paths(run: Path) -> list[Path]:
    """The run's PNG figures the page embeds, in FIGURES order (each with its per-target variants after it)."""
    out = []
    for name in FIGURES:
        out += [p for p in [run / f"{name}.png", *sorted(run.glob(f"{name}_*.png"))] if p.is_file() and p not in out]
    return out


def _figures_html(run: Path) -> str:
    figs = []
    for p in figure_paths(run):
        data = p.read_bytes()
        key = next(f for f in FIGURES if p.stem == f or p.stem.startswith(f + "_"))
        extra = p.stem[len(key) + 1:] if p.stem != key else ""
        cap = CAPTIONS.get(key, key) + (f": {extra}" if extra else "")
        alt = _png_description(data).replace("\n", "; ") or cap
        figs.append(f'<figure><img src="{data_uri(data, "image/png")}" alt="{_e(alt)}">'
                    f'<figcaption>{_e(cap)} <span class="mono">({_e(p.name)})</span></figcaption></figure>')
    if not figs:
        return "<h2>Figures</h2><p>No figures in the run folder.</p>"
    return f'<h2>Figures</h2><div class="figs">{"".join(figs)}</div>'


def build_report(run, gallery: int = GALLERY, seed: int = 0, shards=None) -> str:
    """report.html's text for the finished run folder `run` (ValueError when it is not one). `shards`: the
    run's open Shards (train passes its own), else those config.json names."""
    run = Path(run)
    config, metrics, preds, hist = _read_run(run)
    opened = _open_split(config, shards) if gallery else (None, None)
    t = metrics.get("target") or config["targets"][0]
    title = f"fastgal run {run.name}: {t}"
    body = [f"<h1>{_e(title)}</h1>",
            (f'<p class="sub">{_e(config.get("arch", ""))} on {_e(config.get("shards", "?"))}; validation set of '
             f"{len(preds)} galaxies. Errors and RMSEs are in the targets' units "
             f"({', '.join(f'{k}: {v}' for k, v in UNITS.items() if k in (metrics.get('targets') or {t: 0})) or '-'}).</p>"),
            _headline(run, config, metrics), _targets_table(metrics), _figures_html(run), _history_table(hist),
            *[_gallery_html(preds, target, gallery, seed, config, shards, opened)
              for target in [t, *[u for u in config.get("targets", []) if u != t and f"pred_{u}" in preds]]],
            (f"<footer>Written by fastgal {_e(__version__)} (`fastgal report {_e(run)}` rebuilds it). "
             "Self-contained: every image is embedded, nothing is fetched.</footer>")]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(run, gallery: int = GALLERY, seed: int = 0, out=None, shards=None) -> Path:
    """Write build_report's page to `out` (default RUN/report.html), atomically; returns its path."""
    if gallery < 0:
        raise ValueError(f"--gallery must be 0 or more, got {gallery}")
    text = build_report(run, gallery, seed, shards)
    out = Path(out) if out is not None else Path(run) / REPORT
    write_bytes_atomic(out, text.encode("utf-8"))
    return out
