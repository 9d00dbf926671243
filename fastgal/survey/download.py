"""The cutout downloader: the sample's catalog (SkyServer's answer or a CSV), then one checked JPEG per galaxy.

    fastgal download data/sdss --limit 100

writes, in `fastgal synth`'s layout (so `fastgal shard` reads it unchanged), OUT/data/master.csv (the
catalog as text: exact 64-bit objIDs, NULL = empty), OUT/images/{objID}.jpg (getjpeg cutouts, each
fully decoded), OUT/download-report.csv (per objID: status, reason, tries, black_fraction) and
OUT/download.json (config, catalog source, framing rule, counts).

Threads with a keep-alive Session each share one rate limit (fastgal.survey.skyserver). What urllib3 cannot
see (a 200 carrying an HTML page, a body cut short, a JPEG that does not decode) is retried here,
within the same budget of tries. Resumable: bytes go to .part files renamed once they decode; a re-run
reuses the catalog, skips images that decode, does not re-ask earlier 404s and deletes stray .part
files. Ctrl-C writes the report (unreached objIDs are `interrupted`) and leaves only complete images.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import requests

from fastgal import __version__
from fastgal.options import DownloadConfig, to_jsonable
from fastgal.recipe import FRAMES
from fastgal.shards.catalog import id_reason, written_as_float
from fastgal.shards.cutouts import check_jpeg
from fastgal.survey.skyserver import (
    MAX_SCALE,
    MAX_SIZE,
    MIN_SCALE,
    MIN_SIZE,
    Interrupted,
    RateLimiter,
    ThreadSessions,
    Unreachable,
    column,
    cutout_url,
    get_cutout,
    make_session,
    one_line,
    query_catalog,
    unreachable_message,
)
from fastgal.util import (
    OutLock,
    Progress,
    check_writable,
    write_bytes_atomic,
    write_json_atomic,
)

DEFAULT_SQL = Path(__file__).with_name("metallicity_sample.sql")  # shipped as package data
STATUSES = ("ok", "skipped-existing", "not-found", "failed", "invalid-image", "interrupted")
REPORT_COLUMNS = ["objID", "status", "reason", "tries", "black_fraction"]
# A pixel is "no data" when all channels are <= BLACK_LEVEL; the frame is flagged mostly-black when
# more than BLACK_FLAG of it lies in rows or columns made only of such pixels. Whole black rows or
# columns are how the edge of the imaging looks in getjpeg; dark sky has noise in every row.
BLACK_LEVEL, BLACK_FLAG = 1, 0.5


# ------------------------------------------------------------------------------------- catalog


def validate(cfg: DownloadConfig) -> None:
    if cfg.sql is not None and cfg.catalog is not None:
        raise ValueError("pass --sql or --catalog, not both")
    if cfg.imaging == "legacy":
        _validate_legacy(cfg)
    elif cfg.imaging != "skyserver":
        raise ValueError(f"--imaging must be skyserver or legacy, got {cfg.imaging!r}")
    elif not MIN_SIZE <= cfg.size <= MAX_SIZE:
        raise ValueError(f"--size must be {MIN_SIZE}..{MAX_SIZE} pixels (SkyServer clamps outside it), got {cfg.size}")
    elif cfg.scale != "auto" and not (isinstance(cfg.scale, (int, float)) and MIN_SCALE <= cfg.scale <= MAX_SCALE):
        raise ValueError(f"--scale must be 'auto' or {MIN_SCALE:g}..{MAX_SCALE:g} arcsec/pixel (SkyServer clamps "
                         f"outside it), got {cfg.scale!r}")
    if cfg.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {cfg.workers}")
    if cfg.retries < 0 or cfg.rate < 0 or cfg.timeout <= 0 or cfg.query_timeout <= 0:
        raise ValueError("--retries and --rate must be >= 0, --timeout and --query-timeout > 0")
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"--limit must be a positive number of galaxies, got {cfg.limit}")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; pass a folder path")
    check_writable(out, "choose another OUT")  # before the query and any cutout


def _validate_legacy(cfg: DownloadConfig) -> None:
    """--imaging legacy's own limits (survey/legacy.py: the viewer's 512 px maximum, its layers and bands)."""
    from fastgal.shards.fits import require_astropy
    from fastgal.survey import legacy

    if not legacy.MIN_SIZE <= cfg.size <= legacy.MAX_SIZE:
        raise ValueError(f"--size must be {legacy.MIN_SIZE}..{legacy.MAX_SIZE} pixels with --imaging legacy (the "
                         f"viewer serves at most {legacy.MAX_SIZE}), got {cfg.size}")
    if cfg.scale != "auto" and not (isinstance(cfg.scale, (int, float))
                                    and legacy.MIN_SCALE <= cfg.scale <= legacy.MAX_SCALE):
        raise ValueError(f"--scale must be 'auto' or {legacy.MIN_SCALE:g}..{legacy.MAX_SCALE:g} arcsec/pixel with "
                         f"--imaging legacy (0.262 is the native pixel), got {cfg.scale!r}")
    legacy.check_layer(cfg.layer, cfg.bands.replace(",", ""))
    require_astropy("fastgal download --imaging legacy")  # before the query and any cutout


def normalise_catalog(df: pd.DataFrame, what: str, first_line: int | None = 2,
                      duplicates: str = "error") -> tuple[pd.DataFrame, list[str]]:
    """Check ids (fastgal's id rule, catalog.id_reason) and coordinates; rename objID/ra/dec/petroR90_r
    to their canonical case. Errors name the first bad row (file line when `first_line` is given).

    duplicates="error" for a user's file; "first" keeps the first row of a repeated objID
    (a SkyServer join can list a galaxy twice) and reports the dropped ids.
    """
    df = df.rename(columns={column(df, c, what, required=c != "petroR90_r") or c: c
                            for c in ("objID", "ra", "dec", "petroR90_r")})

    def where(i: int) -> str:
        return f"{what} line {first_line + i}" if first_line is not None else f"{what} row {i + 1}"

    def more(k: int) -> str:
        return f" ({k - 1} more rows like it)" if k > 1 else ""

    if len(df) == 0:
        raise ValueError(f"{what} has no rows; nothing to download")
    ids = df["objID"].str.strip()
    bad = [(i, r) for i, r in enumerate(map(id_reason, ids)) if r]
    if bad:
        i, (_, detail) = bad[0]
        fix = "" if written_as_float(ids.iloc[i]) else "; write ids as plain integers"  # a float's detail has its fix
        raise ValueError(f"{where(i)}{more(len(bad))}: {detail}{fix}")
    df["objID"] = ids
    for col, lo, hi in (("ra", 0.0, 360.0), ("dec", -90.0, 90.0)):
        vals = pd.to_numeric(df[col], errors="coerce")
        badc = np.flatnonzero(~((vals >= lo) & (vals <= hi)).to_numpy())
        if badc.size:
            i = int(badc[0])
            raise ValueError(f"{where(i)}: {col} {df[col].iloc[i]!r} is not a number in [{lo:g}, {hi:g}] degrees"
                             f"{more(badc.size)}; fix or drop the row")
    dup = ids.duplicated(keep="first").to_numpy()
    if not dup.any():
        return df, []
    if duplicates == "error":
        i = int(np.flatnonzero(dup)[0])
        j = int(np.flatnonzero((ids == ids.iloc[i]).to_numpy())[0])
        raise ValueError(f"{where(i)}: objID {ids.iloc[i]} repeats {where(j)} ({int(dup.sum())} repeated "
                         "ids in all); keep one row per galaxy")
    return df[~dup].reset_index(drop=True), ids[dup].tolist()


def read_user_catalog(path: Path) -> pd.DataFrame:
    """A user CSV, every value as text (ids exact, blanks kept blank)."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"catalog {path} does not exist; pass a CSV with objID, ra, dec columns") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"catalog {path} is not a readable CSV ({str(e).splitlines()[0]}); "
                         "save it as comma-separated text with a header row") from None


def write_catalog(path: Path, df: pd.DataFrame) -> None:
    """master.csv exactly as received: text in, text out (no float round trip)."""
    write_bytes_atomic(path, df.to_csv(index=False, lineterminator="\n").encode())


def load_catalog(cfg: DownloadConfig, out: Path, session: requests.Session) -> tuple[pd.DataFrame, str, dict]:
    """The catalog for this run, written to OUT/data/master.csv; (df, source, meta).

    A re-run of the same query (same text, release and limit) reuses the earlier answer."""
    master = out / "data" / "master.csv"
    if cfg.catalog is not None:
        path = Path(cfg.catalog)
        df, _ = normalise_catalog(read_user_catalog(path), str(path), first_line=2, duplicates="error")
        if cfg.limit is not None:
            df = df.head(cfg.limit)
        write_catalog(master, df)
        return df, str(path), {"catalog": str(path), "dropped_duplicates": []}
    sql_path = Path(cfg.sql) if cfg.sql is not None else DEFAULT_SQL
    try:
        sql = sql_path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read SQL file {sql_path}: {e.strerror or e}; pass --sql FILE") from None
    if not one_line(sql):
        raise ValueError(f"{sql_path} holds no SQL (only comments?); write a SELECT")
    key = hashlib.sha256(json.dumps([one_line(sql), cfg.release, cfg.limit]).encode()).hexdigest()
    source = f"SkyServer {cfg.release} ({sql_path.name})"
    meta_path = out / "download.json"
    if master.exists() and meta_path.exists():
        try:
            old = json.loads(meta_path.read_text()).get("catalog", {})
        except ValueError:
            old = {}
        if old.get("key") == key:
            return pd.read_csv(master, dtype=str, keep_default_na=False), source + ", reused from the earlier run", old
    raw, info = query_catalog(sql, cfg, session, f"the query in {sql_path.name}")
    df, dropped = normalise_catalog(raw, f"the answer to {sql_path.name}", first_line=None, duplicates="first")
    write_catalog(master, df)
    return df, source, {"sql": str(sql_path), "key": key, "rows": len(df), **info, "dropped_duplicates": dropped}


# ------------------------------------------------------------------------------------ cutouts


def plan_scales(df: pd.DataFrame, cfg: DownloadConfig) -> tuple[np.ndarray, list[str], dict]:
    """Each galaxy's cutout scale (arcsec/px: getjpeg's scale, the Legacy viewer's pixscale); for each, a note
    when the service's range clamps it (the report's reason column: the frame is then not what the rule asks);
    download.json's record."""
    if cfg.scale != "auto":
        return np.full(len(df), float(cfg.scale)), [""] * len(df), {"scale": float(cfg.scale)}
    if cfg.imaging == "legacy":
        from fastgal.survey import legacy

        lo, hi, fallback, service = legacy.MIN_SCALE, legacy.MAX_SCALE, legacy.LEGACY_NATIVE, "the Legacy viewer's"
    else:
        lo, hi, fallback, service = MIN_SCALE, MAX_SCALE, cfg.fallback_scale, "getjpeg's"
    span = FRAMES[cfg.frame]
    r90 = pd.to_numeric(df["petroR90_r"], errors="coerce").to_numpy(float) if "petroR90_r" in df \
        else np.full(len(df), np.nan)
    usable = np.isfinite(r90) & (r90 > 0)  # NULL, -9999 or junk: the fixed fallback scale
    want = np.where(usable, span * np.where(usable, r90, 0) / cfg.size, fallback)
    scale = np.clip(want, lo, hi)
    notes = [f"scale clamped to {service} {'minimum' if w < s else 'maximum'} {s:g}\"/px (the frame rule asks "
             f"{w:.3g}\"/px), so the frame spans {s * cfg.size:.3g}\" instead of {w * cfg.size:.3g}\"" if w != s else ""
             for w, s in zip(want, scale)]
    record = {"frame": cfg.frame, "frame_r90": span,
              "scale": f"frame_r90 * petroR90_r / size arcsec/px ({fallback} without a usable petroR90_r), "
                       f"clamped to {service} {lo:g}..{hi:g}",
              "no_petroR90_r": int((~usable).sum()), "clamped": sum(1 for n in notes if n)}
    return scale, notes, record


def inspect_jpeg(data: bytes, size: int) -> tuple[str | None, float | None]:
    """(problem or None, black fraction): shards.cutouts.check_jpeg's full decode at size x size RGB (with
    the end-of-image marker a cut-short download lacks), then how much of the frame is no-data."""
    reason, detail, im = check_jpeg(data, size=(size, size), require_eoi=True)
    if reason:
        return f"{reason}: {detail}", None
    dark = np.asarray(im).max(axis=2) <= BLACK_LEVEL
    mask = dark.all(axis=1)[:, None] | dark.all(axis=0)[None, :]
    return None, float(mask.mean())


@dataclass
class Outcome:
    objID: str
    status: str
    reason: str = ""
    tries: int = 0
    black_fraction: float | None = None


def _black_note(b: float | None) -> str:
    if b is not None and b > BLACK_FLAG:
        return f"mostly black: {b:.0%} of the frame is all-black rows/columns (edge of the imaging?)"
    return ""


class Downloader:
    """Fetches cutouts into OUT/images with a shared rate limit and one Session per thread."""

    ext = ".jpg"  # the file each galaxy's cutout is saved as (legacy.make_downloader's: .fits)

    def __init__(self, cfg: DownloadConfig, images: Path, stop: threading.Event):
        self.cfg, self.images, self.stop = cfg, images, stop
        self.limiter = RateLimiter(cfg.rate, stop)
        self.sessions = ThreadSessions(cfg, self.limiter)
        self.url = cutout_url(cfg.base_url, cfg.release)
        # Until the host has answered once, a connection that cannot be made stops the whole run (unreachable:
        # why), instead of every cutout spending its tries on a network that is not there. Afterwards it is
        # one cutout's failure, which a re-run retries.
        self.reached = threading.Event()
        self.unreachable: str | None = None

    def _backoff(self, n: int) -> None:
        """Our own retries (what urllib3 cannot see) back off like urllib3's."""
        c = self.cfg
        if self.stop.wait(min(c.backoff_max, c.backoff * 2 ** n) + random.random() * c.backoff):
            raise Interrupted()

    def answers(self, get, params: dict):
        """Each answer to one cutout's request within one budget of tries (urllib3's retries and ours, for what
        it cannot see: a 200 carrying a page, a body cut short): (got, reason, data, tries so far), the caller
        deciding whether to ask again (read on) or stop. A host never reached stops the whole run (`unreachable`)."""
        n = attempt = 0
        while n < self.cfg.retries + 1:
            if attempt:
                self._backoff(attempt)
            attempt += 1
            self.limiter.acquire()
            got, reason, k, data = get(self.sessions.get(), self.url, params, self.cfg)
            n += k
            if got == "unreachable" and not self.reached.is_set():
                self.unreachable = self.unreachable or reason
                self.stop.set()
            elif got != "unreachable":
                self.reached.set()
            yield got, reason, data, n
            if got == "unreachable":
                return

    @staticmethod
    def _save(dst: Path, data: bytes) -> None:
        """Write-then-rename: images/ only ever holds complete, checked files."""
        part = dst.with_name(dst.name + ".part")
        try:
            part.write_bytes(data)
            os.replace(part, dst)
        finally:
            part.unlink(missing_ok=True)

    def fetch(self, oid: str, ra: str, dec: str, scale: float) -> Outcome:
        cfg, dst = self.cfg, self.images / f"{oid}.jpg"
        replaced = ""
        if dst.exists():
            problem, black = inspect_jpeg(dst.read_bytes(), cfg.size)
            if problem is None:
                return Outcome(oid, "skipped-existing", _black_note(black), 0, black)
            # an incomplete or wrong-size file from elsewhere: fetch it again (the rename replaces it)
            replaced = f"replaced an unusable earlier file ({problem})"
        params = {"ra": ra, "dec": dec, "scale": f"{scale:.6g}", "width": cfg.size, "height": cfg.size}
        status, reason, n = "failed", "", 0
        for got, reason, data, n in self.answers(get_cutout, params):
            if got == "unreachable":
                return Outcome(oid, "failed", f"{reason} after {n} tries" if n > 1 else reason, n)
            if got == "not-found":
                return Outcome(oid, got, reason, n)
            if got == "failed":
                return Outcome(oid, got, reason + (f" after {n} tries" if n > 1 else ""), n)
            if got == "ok":
                reason, black = inspect_jpeg(data, cfg.size)
                if reason is None:
                    self._save(dst, data)
                    return Outcome(oid, "ok", "; ".join(x for x in (_black_note(black), replaced) if x), n, black)
            status = "failed" if got == "cut-short" else "invalid-image"  # should no try be left
        return Outcome(oid, status, f"{reason} (after {n} tries)", n)


# ------------------------------------------------------------------------------------ the job


@dataclass
class DownloadResult:
    out: Path
    n: int  # catalog rows
    counts: dict[str, int]
    seconds: float
    catalog_source: str
    flagged_black: int = 0
    dropped_duplicates: list[str] = field(default_factory=list)
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)
    first_problem: str = ""  # the first row that is not ok or skipped-existing: "status: reason"
    blank_word: str = "black"  # what a no-data frame is called: black (getjpeg's JPEGs), blank (Legacy FITS)

    @property
    def fetched(self) -> int:
        """Cutouts in images/ after this run: fetched now or kept from an earlier run."""
        return self.counts.get("ok", 0) + self.counts.get("skipped-existing", 0)

    @property
    def fetched_per_s(self) -> float:
        fetched = self.counts.get("ok", 0) + self.counts.get("not-found", 0)
        return fetched / max(self.seconds, 1e-9)

    def summary(self) -> dict:
        """`fastgal download --json`."""
        return {"out": str(self.out), "catalog": self.n, "catalog_source": self.catalog_source, "counts": self.counts,
                "flagged_mostly_black": self.flagged_black, "stopped_by_interrupt": self.interrupted,
                "seconds": round(self.seconds, 2), "notes": self.notes, "report": str(self.out / "download-report.csv")}

    def format(self) -> str:
        """`fastgal download`'s human summary."""
        c = self.counts
        lines = [f"note: {note}" for note in self.notes]
        lines.append(f"catalog: {self.n} galaxies from {self.catalog_source} -> {self.out / 'data' / 'master.csv'}")
        lines.append("cutouts: " + ", ".join(f"{c[s]} {s}" for s in c if c[s] or s in ("ok", "failed"))
                     + f" = {sum(c.values())} of {self.n}"
                     + (f"; {self.flagged_black} flagged mostly-{self.blank_word}" if self.flagged_black else ""))
        lines.append(f"report: {self.out / 'download-report.csv'} ({self.seconds:.1f}s, {self.fetched_per_s:.1f} cutouts/s)")
        if c["failed"] or c["invalid-image"] or c["interrupted"]:
            lines.append("re-run the same command to retry what is missing; finished images are kept")
        return "\n".join(lines)


def _earlier_not_found(report: Path, final: tuple[str, ...] = ("not-found",)) -> dict[str, tuple[str, str]]:
    """objIDs an earlier run found outside the footprint (a permanent 404; for the Legacy viewer also no-coverage
    and missing-band): not asked again. {objID: (its earlier status, reason)}."""
    if not report.exists():
        return {}
    try:
        rep = pd.read_csv(report, dtype=str, keep_default_na=False)
        keep = rep["status"].isin(final)
        return dict(zip(rep["objID"][keep], zip(rep["status"][keep], rep["reason"][keep])))
    except (ValueError, KeyError, pd.errors.ParserError):
        return {}


def write_report(path: Path, outcomes: list[Outcome]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(REPORT_COLUMNS)
    for o in outcomes:
        w.writerow([o.objID, o.status, o.reason, o.tries, "" if o.black_fraction is None else f"{o.black_fraction:.3f}"])
    write_bytes_atomic(path, buf.getvalue().encode())


def _catalog(cfg: DownloadConfig, out: Path, stop: threading.Event, notes: list[str]) -> tuple[pd.DataFrame, str, dict]:
    """load_catalog over its own session, and the notes a user should see about it."""
    with make_session(cfg, RateLimiter(cfg.rate, stop), query=True) as session:
        df, source, meta = load_catalog(cfg, out, session)
    if meta.get("dropped_duplicates"):
        d = meta["dropped_duplicates"]
        notes.append(f"dropped {len(d)} repeated objID row(s), kept the first (e.g. {', '.join(d[:3])})")
    if meta.get("capped"):
        notes.append(f"the query hit the {cfg.row_cap:,}-row cap; fetched it in {meta['pages']} objID-ordered pages")
    return df, source, meta


def _fetch_all(cfg: DownloadConfig, dl: Downloader, df: pd.DataFrame, scales: np.ndarray, images: Path,
               stop: threading.Event, earlier_404: dict[str, tuple[str, str]], outcomes: dict[str, Outcome]
               ) -> BaseException | None:
    """Fetch every cutout into `outcomes`; on Ctrl-C or an error, stop the workers cleanly and return
    the exception (KeyboardInterrupt included) for the caller to report. A host found unreachable
    (dl.unreachable) stops the workers too; that is not an error here."""
    prog = Progress(len(df), "download", cfg.quiet, unit="img")
    ex = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="fastgal-dl")
    futs, error = {}, None
    try:
        for i, oid in enumerate(df["objID"]):
            if oid in earlier_404 and not (images / f"{oid}{dl.ext}").exists():
                st, was = earlier_404[oid]
                why = ("HTTP 404 in an earlier run: outside the imaging footprint" if st == "not-found"
                       else f"{was.split('; not asked again')[0]}; an earlier run's answer")
                outcomes[oid] = Outcome(oid, st, why + "; not asked again", 0)
                prog.update()
                continue
            futs[ex.submit(dl.fetch, oid, df["ra"].iat[i], df["dec"].iat[i], float(scales[i]))] = oid
        for f in as_completed(futs):
            o = f.result()
            outcomes[o.objID] = o
            prog.update()
    except BaseException as e:  # Ctrl-C, a bug or a disk error: stop the workers the same way
        error = e
        stop.set()  # workers stop at their next sleep or request; in-flight ones end within timeout
        ex.shutdown(wait=True, cancel_futures=True)
        for f, oid in futs.items():
            if oid not in outcomes and f.done() and not f.cancelled() and f.exception() is None:
                outcomes[oid] = f.result()
    finally:
        ex.shutdown(wait=True)
        dl.sessions.close()
        prog.close()
    return error


def download(cfg: DownloadConfig) -> DownloadResult:
    """Catalog -> OUT/data/master.csv, cutouts -> OUT/images, report -> OUT/download-report.csv.

    Returns with interrupted=True after a Ctrl-C (everything written is consistent); other
    exceptions propagate after the same clean-up.
    """
    validate(cfg)
    out = Path(cfg.out)
    # OUT is this command's until it returns or fails: a second download into it would fetch the same cutouts
    # and overwrite the first's report
    with OutLock(out, "fastgal download", log=Progress(quiet=cfg.quiet).line):
        return _download(cfg, out)


def cutouts_of(cfg: DownloadConfig) -> dict:
    """What kind of cutouts OUT/images holds (download.json's "cutouts"): one OUT never mixes two."""
    if cfg.imaging == "legacy":
        return {"imaging": "legacy", "service": f"{cfg.legacy_url.rstrip('/')}/fits-cutout", "layer": cfg.layer,
                "bands": cfg.bands.replace(",", ""), "size": cfg.size}
    return {"imaging": "skyserver", "release": cfg.release, "size": cfg.size}


def _check_same_cutouts(cfg: DownloadConfig, out: Path) -> None:
    """Refuse to resume into an OUT whose earlier run fetched another kind of cutout (SkyServer's JPEGs, another
    layer or band set): its files and its "not asked again" rows would not be this run's."""
    try:
        old = json.loads((out / "download.json").read_text())
    except (OSError, ValueError):
        return
    was = old.get("cutouts") or {"imaging": "skyserver"}  # before #31 every run was SkyServer's
    now = cutouts_of(cfg)
    keys = ("imaging", "layer", "bands") if now["imaging"] == "legacy" else ("imaging",)
    if any(was.get(k) != now.get(k) for k in keys):
        def show(d):
            return " ".join(f"{k} {d.get(k)}" for k in keys)
        raise ValueError(f"{out} holds cutouts of {show(was)}, this run asks for {show(now)}; choose another OUT "
                         "(or move the earlier one away)")


def _download(cfg: DownloadConfig, out: Path) -> DownloadResult:
    _check_same_cutouts(cfg, out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    legacy = cfg.imaging == "legacy"
    if legacy:
        from fastgal.survey import legacy as ls

        statuses, final, make = ls.STATUSES, ls.FINAL, ls.make_downloader(Downloader)
    else:
        statuses, final, make = STATUSES, ("not-found",), Downloader
    (out / "data").mkdir(parents=True, exist_ok=True)
    notes = []
    stale = list(images.glob("*.part")) + list((out / "jpeg").glob("*.part"))  # jpeg/: --imaging legacy --jpeg
    for p in stale:  # left by a run that was killed mid-write
        p.unlink(missing_ok=True)
    if stale:
        notes.append(f"removed {len(stale)} partial file(s) left by an earlier run")

    stop = threading.Event()
    t0 = time.perf_counter()
    df, source, cat_meta = _catalog(cfg, out, stop, notes)
    scales, clamped, framing = plan_scales(df, cfg)
    if framing.get("no_petroR90_r"):
        notes.append(f"{framing['no_petroR90_r']} galaxies have no usable petroR90_r; their cutouts use "
                     f"{ls.LEGACY_NATIVE if legacy else cfg.fallback_scale}\"/pixel")
    if framing.get("clamped"):
        lo, hi = (MIN_SCALE, MAX_SCALE) if not legacy else (ls.MIN_SCALE, ls.MAX_SCALE)
        notes.append(f"{framing['clamped']} galaxies' scale is outside {'the Legacy viewer' if legacy else 'getjpeg'}'s "
                     f"{lo:g}..{hi:g}\"/px and was clamped (their frames differ from the rule); the report's reason "
                     "column names them")
    report_path = out / "download-report.csv"
    outcomes: dict[str, Outcome] = {}
    dl = make(cfg, images, stop)
    error = _fetch_all(cfg, dl, df, scales, images, stop, _earlier_not_found(report_path, final), outcomes)
    if dl.unreachable and isinstance(error, Interrupted):  # the workers stopped because the host is unreachable
        error = None
    for p in images.glob("*.part"):
        p.unlink(missing_ok=True)
    host = cfg.legacy_url if legacy else cfg.base_url
    unreached = (f"not tried: {host} could not be reached ({dl.unreachable}); re-run to resume"
                 if dl.unreachable else "run stopped before this cutout; re-run to resume")
    rows = [outcomes.get(oid) or Outcome(oid, "interrupted", unreached) for oid in df["objID"]]
    for o, note in zip(rows, clamped):
        o.reason = "; ".join(x for x in (o.reason, note) if x)
    write_report(report_path, rows)
    counts = {s: 0 for s in statuses}
    for o in rows:
        counts[o.status] += 1
    flagged = sum(1 for o in rows if o.status in ("ok", "skipped-existing") and o.black_fraction is not None
                  and o.black_fraction > BLACK_FLAG)

    bad = next((o for o in rows if o.status not in ("ok", "skipped-existing")), None)
    res = DownloadResult(out=out, n=len(rows), counts=counts, seconds=time.perf_counter() - t0,
                         catalog_source=source, flagged_black=flagged,
                         dropped_duplicates=cat_meta.get("dropped_duplicates", []),
                         interrupted=error is not None, notes=notes,
                         first_problem=f"{bad.status}: {bad.reason}" if bad else "",
                         blank_word="blank" if legacy else "black")
    write_json_atomic(out / "download.json", {
        "fastgal_version": __version__, "config": to_jsonable(cfg), "catalog": cat_meta, "cutouts": cutouts_of(cfg),
        "catalog_source": source, "framing": framing, "n": res.n, "counts": counts, "flagged_mostly_black": flagged,
        "interrupted": res.interrupted, "seconds": round(res.seconds, 3),
    })
    if error is not None and not isinstance(error, KeyboardInterrupt):
        raise error
    if dl.unreachable and not res.fetched:
        why = (unreachable_message(host, dl.unreachable) if not legacy else f"cannot reach {host} ({dl.unreachable}); "
               "check the network, or --legacy-url if the viewer is elsewhere (a mirror, a test server)")
        raise Unreachable(f"{why}; no cutout was fetched "
                          f"(the report is {report_path})")
    return res
