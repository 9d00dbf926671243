"""What the commands print for a person: the summaries of `fastgal train`/`demo`, `predict` and `info`.

    from fastgal.score.summary import format_metrics
    print(format_metrics(json.load(open("runs/r1/metrics.json"))))

The numbers come from run.py and predict.py; this module only lays them out.
"""

from __future__ import annotations

from fastgal.util import plural


def format_metrics(m: dict) -> str:
    """metrics.json as the summary `fastgal train` and `demo` print on stdout."""
    lines = [f"{'target':<14}{'RMSE':>8}{'NMAD':>8}{'bias':>9}{'R2':>7}{'TTA RMSE':>10}{'mean-baseline':>15}"]
    for t, v in m["targets"].items():
        tta = f"{v['tta_rmse']:.4f}" if "tta_rmse" in v else "-"
        lines.append(f"{t:<14}{v['rmse']:>8.4f}{v['nmad']:>8.4f}{v['bias']:>+9.4f}{v['r2']:>7.3f}{tta:>10}{v['baseline_rmse']:>15.4f}")
    for t, v in m["targets"].items():
        lines += calibration_lines(v, f"{t}: ")
    lines += interval_lines(m.get("conformal"))
    if m.get("floor"):
        f = m["floor"]
        lines.append(f"synthetic survey: observable reference RMSE {f['observable_reference_rmse']:.4f} dex (what "
                     f"{f.get('observable_reference', {}).get('bands', 'gri')} images show), latent floor {f['floor_rmse']:.4f} dex (an oracle knowing mass and SFR)")
    lines.append(f"{plural(m['epochs'], 'epoch')} in {m['fit_seconds']:.1f}s, {m['train_images_per_s']:.0f} train images/s "
                 f"({m['device']}, {m['precision']}, {m['loader_backend']} loader, "
                 f"{'decode on ' if not m['loader_decode'].startswith('no decode') else ''}{m['loader_decode']}"
                 + (f"; {m['arch']}, preset {m['preset']}" if m.get("preset") else "")
                 + (f"; compiled ({m['compile']}): epoch 1 includes compiling" if m.get("compile") else "")
                 + f"); best epoch {m['best_epoch']} of {m['epochs']}")  # epochs count from 1, as the progress lines
    return "\n".join(lines)


def calibration_lines(d: dict, prefix: str) -> list[str]:
    """The coverage of the head's sigma (a gaussian head: an uncertainty, so its coverage is a test), and the
    TTA spread's size (how much the 8 views disagree: not an uncertainty, so no coverage is expected of it;
    metrics.json keeps its coverage figures for whoever wants them)."""
    lines = []
    c = d.get("calibration")
    if c and c["within_1sigma"] is not None:
        lines.append(f"{prefix}sigma (median {c['median_sigma']:.4f}): within 1 sigma {c['within_1sigma']:.1%} "
                     f"(Gaussian 68.3%), within 2 sigma {c['within_2sigma']:.1%} (95.4%), RMS z {c['rms_z']:.2f}")
    t = d.get("tta_calibration")
    if t and t["within_1sigma"] is not None:
        lines.append(f"{prefix}TTA spread: median {t['median_sigma']:.4f} across the 8 views (how much the views "
                     "disagree, not an uncertainty)")
    return lines




def interval_lines(c: dict | None) -> list[str]:
    """--interval: per target, the conformal intervals' coverage on the held-out galaxies (with its standard error)
    and mean width per level, beside the raw sigma intervals' (pred -+ z sigma)."""
    if not c:
        return []
    lines = []
    for t, per in c["held_out"].items():
        parts = []
        for lv, row in per.items():
            mg, raw = row.get(c.get("written", "marginal"), row["marginal"]), row.get("raw_sigma")
            w = "infinite: too few calibration galaxies" if mg["mean_width"] is None else f"{mg['mean_width']:.3f}"
            parts.append(f"{lv}: {mg['coverage']:.1%} ± {mg['se']:.1%} (width {w})"
                         + (f" vs raw sigma {raw['coverage']:.1%} ({raw['mean_width']:.3f})" if raw else ""))
        by = "" if c.get("by", "none") == "none" else f", Mondrian by {c['by']}"
        lines.append(f"{t}: conformal intervals{by} on {c['n_test']} held-out galaxies (calibrated on {c['n_calibration']}): "
                     + "; ".join(parts))
    return lines
