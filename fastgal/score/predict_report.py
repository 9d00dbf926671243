"""The page of `fastgal predict ... --report`: what was predicted with which run, a gallery ranked by the error
(shards) or by the uncertainty (new cutouts), and every unusable file with its reason; report.py's pieces.

    fastgal predict runs/demo/run data/new/images --tta --report     # + predictions_images.html
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from fastgal import __version__
from fastgal.score.report import (
    CSS,
    GALLERY,
    UNITS,
    _cutout,
    _e,
    data_uri,
    gallery_rows,
)
from fastgal.util import write_bytes_atomic


def prediction_sections(df: pd.DataFrame, target: str, n: int = GALLERY, seed: int = 0) -> tuple[str, dict]:
    """How a prediction's gallery is ranked, and its sections. With the truth (shards): by |pred - true| as the
    run's report. Without it (new cutouts): by the uncertainty the table has, sigma_<t> (the model's) else
    sigma_tta_<t> (the 8 views' spread), most and least uncertain; with neither, N at random only."""
    ok = df[df["status"] == "ok"] if "status" in df else df
    pred = f"pred_{target}" if f"pred_{target}" in ok else f"pred_tta_{target}"
    if f"true_{target}" in ok:
        rows = gallery_rows(ok.assign(**{f"pred_{target}": ok[pred]}), target, n, seed)
        return f"|{pred} - true_{target}|", {"worst": rows["worst"], "best": rows["best"], "random": rows["random"]}
    unc = next((c for c in (f"sigma_{target}", f"sigma_tta_{target}") if c in ok and ok[c].notna().any()), None)
    n = max(0, min(n, len(ok)))
    rng = np.random.default_rng(seed)
    pick = ok.iloc[rng.choice(len(ok), size=n, replace=False)] if n else ok.head(0)
    if unc is None:
        return "", {"random": pick}
    order = ok[ok[unc].notna()].sort_values(unc, kind="stable")
    return unc, {"most uncertain": order.iloc[::-1].head(n), "least uncertain": order.head(n), "random": pick}


def _file_cutout(path: str, config: dict) -> tuple[bytes, str] | None:
    """A cutout file for the page: a JPEG as it is, a FITS file as _cutout renders FITS shards; None if unreadable."""
    p = Path(path)
    try:
        if p.suffix.lower() != ".fits":
            return p.read_bytes(), "image/jpeg"
        from PIL import Image

        from fastgal.load.show import colour_composite
        from fastgal.shards.fits import read_fits

        x, names = read_fits(str(p), None)
        soft = (config.get("image") or {}).get("softening") or [float(np.nanstd(x)) or 1.0] * len(x)
        rgb = colour_composite(np.arcsinh(np.nan_to_num(x) / np.asarray(soft[:len(x)], np.float32)[:, None, None]),
                               names)
        buf = io.BytesIO()
        Image.fromarray((rgb * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG", optimize=True)
        return buf.getvalue(), "image/png"
    except Exception:  # noqa: BLE001 - an unreadable file is shown as such; its reason is in the table below
        return None


def build_prediction_report(df: pd.DataFrame, run, data, csv=None, gallery: int = GALLERY, seed: int = 0) -> str:
    """The page of `fastgal predict ... --report`: what was predicted with which run, a gallery ranked by the
    error (shards) or by the uncertainty (new cutouts; see prediction_sections), and every unusable file with
    its reason."""
    run, data = Path(run), Path(data)
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    targets = [c[5:] for c in df.columns if c.startswith("pred_") and not c.startswith("pred_tta_")] or \
        [c[9:] for c in df.columns if c.startswith("pred_tta_")]
    t = targets[0] if targets else "?"
    unit = UNITS.get(t, "")
    bad = df[df["status"] != "ok"] if "status" in df else df.head(0)
    by, sections = prediction_sections(df, t, gallery, seed)
    split_of = None
    if "file" not in df and (data / "manifest.json").is_file():  # shards: cutouts by id from their split
        from fastgal.shards.read import Shards

        sh = Shards(data)
        split_of = {s: sh.split(s) for s in (df["split"].unique() if "split" in df else ["valid"])}
        where = {(s, k): i for s, sp in split_of.items() for i, k in enumerate(sp.keys)}
    parts = [f"<h1>fastgal predict: {_e(data.name)}</h1>",
             f'<p class="sub">The run <span class="mono">{_e(run)}</span> ({_e(config.get("arch", "?"))}) on '
             f'<span class="mono">{_e(data)}</span>: {len(df)} inputs, {len(df) - len(bad)} predicted, {len(bad)} '
             f'unusable{f"; the table: <span class=mono>{_e(csv)}</span>" if csv else ""}.</p>']
    if by:
        parts.append(f'<h2 id="gallery">Gallery</h2><p class="sub">Ranked by <span class="mono">{_e(by)}</span> of '
                     f"<b>{_e(t)}</b> ({_e(unit) or 'its unit'}); {gallery} of each, the random ones drawn with seed {seed}.</p>")
    else:
        parts.append(f'<h2 id="gallery">Gallery</h2><p class="note">No uncertainty to rank by: the model has no '
                     f"sigma (train with --head gaussian) and the prediction no TTA spread (predict with --tta); "
                     f"{gallery} inputs at random.</p>")
    for section, rows in sections.items():
        parts.append(f'<h3>{_e(section.capitalize())} ({len(rows)})</h3><div class="gallery">')
        for _, r in rows.iterrows():
            gid = str(r["id"])
            if split_of is not None:
                s = r["split"] if "split" in r else "valid"
                i = where.get((s, gid))
                got = _cutout(split_of[s], i, config) if i is not None else None
            else:
                got = _file_cutout(r["file"], config) if "file" in r else None
            img = (f'<img src="{data_uri(*got)}" alt="cutout of {_e(gid)}" loading="eager">' if got else
                   '<div class="noimg">no cutout</div>')
            vals = [f"{c[:-len(t) - 1]} {float(r[c]):.3f}" for c in (f"true_{t}", f"pred_{t}", f"pred_tta_{t}",
                                                                     f"sigma_{t}", f"sigma_tta_{t}")
                    if c in r and pd.notna(r[c])]
            rank = float(r[by]) if by in r else (float(r["abs_error"]) if "abs_error" in r else float("nan"))
            parts.append(f'<div class="gal" data-section="{_e(section)}" data-id="{_e(gid)}" data-rank="{rank!r}">'
                         f'{img}<div class="id">{_e(gid)}</div>{"<br>".join(_e(v) for v in vals)} {_e(unit)}</div>')
        parts.append("</div>")
    if len(bad):
        parts.append(f'<h2 id="unusable">Unusable inputs ({len(bad)})</h2><table><tr><th>id</th><th>file</th>'
                     "<th>status</th><th>reason</th></tr>" + "".join(
                         f'<tr class="bad" data-id="{_e(r["id"])}"><td class="mono">{_e(r["id"])}</td>'
                         f'<td class="mono">{_e(r.get("file", ""))}</td><td>{_e(r["status"])}</td>'
                         f'<td>{_e(r.get("reason", ""))}</td></tr>' for _, r in bad.iterrows()) + "</table>")
    parts.append(f"<footer>Written by fastgal {_e(__version__)} (`fastgal predict ... --report`). Self-contained: "
                 "every image is embedded, nothing is fetched.</footer>")
    title = f"fastgal predict {data.name}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_prediction_report(df: pd.DataFrame, out, run, data, csv=None, gallery: int = GALLERY, seed: int = 0) -> Path:
    """build_prediction_report's page, written atomically to `out`; returns its path."""
    out = Path(out)
    write_bytes_atomic(out, build_prediction_report(df, run, data, csv, gallery, seed).encode("utf-8"))
    return out
