"""SkyServer client: the reference sample's SQL query and a polite, resumable cutout downloader.

    fastgal download data/sdss --limit 100

writes, in the layout of `fastgal synth` (so `fastgal shard` reads it unchanged),
    OUT/data/master.csv        the catalog: objID (exact 64-bit), ra, dec, ..., metallicity
    OUT/images/{objID}.jpg     SkyServer ImgCutout/getjpeg cutouts, each checked by a full decode
    OUT/download-report.csv    one row per catalog objID: status, reason, tries, black_fraction
    OUT/download.json          the config, where the catalog came from, the counts

The catalog is the answer of {base}/{release}/SkyServerWS/SearchTools/SqlSearch to
fastgal/metallicity_sample.sql (or --sql FILE), or a user CSV (--catalog). Every value is kept as
the server's text, so ids never pass through a float and NULLs stay empty.

Cutouts: a bounded thread pool (one requests.Session, i.e. one keep-alive connection, per thread)
behind one token bucket shared by all threads. urllib3's Retry (inside each Session's adapter)
retries connect errors, read timeouts, resets, 429 and 5xx with exponential backoff, jitter and
Retry-After; a Retry subclass makes those retries take a token too and turns a Retry-After into a
pause for every thread. What Retry cannot see (a 200 carrying an HTML page, a body cut short, a
truncated or undecodable JPEG) is retried here, within the same per-cutout budget of tries.

Resumable: bytes go to images/{objID}.jpg.part and are renamed only once they decode; a re-run
skips images already on disk that decode at the requested size, carries over earlier not-found
answers and deletes stray .part files. Ctrl-C stops within a timeout, writes the report (objIDs not
reached are `interrupted`) and leaves only complete images.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import requests
from PIL import Image
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from . import __version__
from .config import DownloadConfig, to_jsonable
from .synth import R90_SPAN
from .util import Progress, write_bytes_atomic, write_json_atomic

DEFAULT_SQL = Path(__file__).with_name("metallicity_sample.sql")  # shipped as package data
STATUSES = ("ok", "skipped-existing", "not-found", "failed", "invalid-image", "interrupted")
REPORT_COLUMNS = ["objID", "status", "reason", "tries", "black_fraction"]
RETRY_STATUSES = (429, 500, 502, 503, 504)
MIN_SIZE, MAX_SIZE = 64, 2048  # SkyServer silently clamps getjpeg width/height to this range
MAX_ID = 2**63 - 1  # SDSS ids are signed 64-bit (bigint)
# A pixel is "no data" when all channels are <= BLACK_LEVEL; the frame is flagged mostly-black when
# more than BLACK_FLAG of it lies in rows or columns made only of such pixels. Whole black rows or
# columns are how the edge of the imaging looks in getjpeg; dark sky has noise in every row.
BLACK_LEVEL, BLACK_FLAG = 1, 0.5
USER_AGENT = f"fastgal/{__version__} (+https://github.com/fastgal; polite: rate-limited, resumable)"


class SkyServerError(RuntimeError):
    """SkyServer answered with an error (a JSON error body, an HTML page, a bad status)."""


class CatalogError(ValueError):
    """A catalog (SQL answer or user CSV) fastgal cannot use: missing columns, inexact ids, ..."""


class Interrupted(Exception):
    """Raised inside a worker when the run is being stopped (Ctrl-C)."""


# ----------------------------------------------------------------------------------------- SQL


def strip_sql_comments(sql: str) -> str:
    """Drop `-- ...` line comments and `/* ... */` blocks, leaving string literals alone.

    SkyServer strips comments itself, but only line by line; once a client joins the lines of a
    query into one, a `--` would comment out everything after it.
    """
    out, i, n = [], 0, len(sql)
    while i < n:
        c = sql[i]
        if c == "'":  # a string literal: copy through its closing quote ('' is an escaped quote)
            j = i + 1
            while j < n:
                if sql[j] == "'" and (j + 1 >= n or sql[j + 1] != "'"):
                    break
                j += 2 if sql[j] == "'" else 1
            out.append(sql[i:j + 1])
            i = j + 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
            out.append(" ")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def one_line(sql: str) -> str:
    """The query as one line: comments stripped, whitespace collapsed, no trailing semicolon."""
    return " ".join(strip_sql_comments(sql).split()).rstrip(";").strip()


def sql_url(base_url: str, release: str) -> str:
    return f"{base_url.rstrip('/')}/{release}/SkyServerWS/SearchTools/SqlSearch"


def cutout_url(base_url: str, release: str) -> str:
    return f"{base_url.rstrip('/')}/{release}/SkyServerWS/ImgCutout/getjpeg"


def _error_message(text: str) -> str:
    """The human part of a SkyServer error body (JSON like [{"Message": ...}], or plain text)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return " ".join(re.sub(r"<[^>]+>", " ", text).split())[:300] or "(empty body)"
    stack = [obj]
    while stack:  # the first Message/Error string anywhere in the structure
        o = stack.pop(0)
        if isinstance(o, dict):
            for k in ("Message", "message", "Error", "error", "ErrorMessage"):
                if isinstance(o.get(k), str) and o[k].strip():
                    return " ".join(o[k].split())[:300]
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return " ".join(text.split())[:300]


def parse_skyserver_csv(text: str, what: str) -> pd.DataFrame:
    """SqlSearch's CSV answer -> a DataFrame of strings (exact ids, NULL = '').

    The answer starts with a `#Table1` line; an error comes back as JSON (sometimes with status
    200), which becomes a SkyServerError with the server's message.
    """
    body = text.lstrip("\ufeff")
    head = body.lstrip()[:1]
    if head in ("[", "{"):
        raise SkyServerError(f"SkyServer rejected {what}: {_error_message(body)}")
    if head == "<":
        raise SkyServerError(f"SkyServer answered {what} with an HTML page, not CSV: {_error_message(body)[:200]}")
    lines = body.splitlines()
    if lines and lines[0].startswith("#Table"):
        lines = lines[1:]
    if any(ln.startswith("#Table") for ln in lines):
        raise CatalogError(f"{what} returned more than one table; make the SQL a single SELECT")
    if not lines or not lines[0].strip():
        raise SkyServerError(f"SkyServer returned an empty answer to {what}")
    return pd.read_csv(io.StringIO("\n".join(lines)), dtype=str, keep_default_na=False)


# ----------------------------------------------------------------------------- HTTP plumbing


class RateLimiter:
    """A token bucket of depth 1 shared by all threads: at most `rate` requests per second.

    Depth 1 keeps requests evenly spaced (no bursts at start-up); pause() pushes the next token
    out, so one server Retry-After slows every thread, not just the one that got it.
    """

    def __init__(self, rate: float, stop: threading.Event | None = None):
        self.interval = 1.0 / rate if rate and rate > 0 else 0.0
        self.stop = stop or threading.Event()
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if self.stop.is_set():
            raise Interrupted()
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            t = max(now, self._next)
            self._next = t + self.interval
        if t > now and self.stop.wait(t - now):  # an interruptible sleep
            raise Interrupted()

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._next = max(self._next, time.monotonic() + seconds)


def _retry_class(limiter: RateLimiter, retry_after_max: float) -> type[Retry]:
    """urllib3 Retry whose sleeps honour the shared limiter, the stop event and a Retry-After cap.

    A class (not an instance attribute) because Retry.new() rebuilds the object for each retry
    from its constructor arguments only.
    """

    class PoliteRetry(Retry):
        def get_retry_after(self, response):
            v = super().get_retry_after(response)
            return None if v is None else min(v, retry_after_max)

        def sleep(self, response=None):
            if limiter.stop.is_set():
                raise Interrupted()
            ra = self.get_retry_after(response) if response is not None else None
            if ra:
                limiter.pause(ra)
            super().sleep(response)
            limiter.acquire()  # a retry is a request too

    return PoliteRetry


def make_session(cfg: DownloadConfig, limiter: RateLimiter) -> requests.Session:
    """A Session whose adapter retries what urllib3 can see (connect/read errors, 429, 5xx)."""
    retry = _retry_class(limiter, cfg.retry_after_max)(
        total=cfg.retries, connect=cfg.retries, read=cfg.retries, status=cfg.retries, other=0,
        redirect=3, allowed_methods=frozenset({"GET"}), status_forcelist=RETRY_STATUSES,
        backoff_factor=cfg.backoff, backoff_max=cfg.backoff_max, backoff_jitter=cfg.backoff,
        respect_retry_after_header=True, raise_on_status=False)
    s = requests.Session()
    adapter = HTTPAdapter(max_retries=retry, pool_connections=1, pool_maxsize=1)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    s.headers["User-Agent"] = USER_AGENT
    return s


def _tries(resp: requests.Response) -> int:
    """How many requests urllib3 made for this response (1 + its retries)."""
    r = getattr(resp.raw, "retries", None)
    return 1 + len(r.history) if r is not None else 1


def _describe(e: BaseException) -> str:
    """A short reason for a requests exception, naming the root cause (timeout, reset, ...)."""
    root = e
    for _ in range(6):  # unwrap requests -> MaxRetryError -> the socket error
        nxt = getattr(root, "reason", None) or (root.args[0] if root.args and isinstance(root.args[0], BaseException) else None)
        if nxt is None or nxt is root:
            break
        root = nxt
    kind = type(root).__name__
    if "Timeout" in kind or "timed out" in str(root):
        return "timed out"
    if isinstance(root, (ConnectionResetError, ConnectionAbortedError)) or "RemoteDisconnected" in kind \
            or "reset" in str(root).lower() or "closed connection" in str(root).lower():
        return "connection dropped"
    if "Connection refused" in str(root) or isinstance(root, ConnectionRefusedError):
        return "connection refused"
    return f"{kind}: {str(root)[:160]}"


# ------------------------------------------------------------------------------------- catalog


def run_sql(sql: str, cfg: DownloadConfig, session: requests.Session, what: str = "the query") -> pd.DataFrame:
    """One SqlSearch call -> DataFrame of strings."""
    url = sql_url(cfg.base_url, cfg.release)
    try:
        r = session.get(url, params={"cmd": sql, "format": "csv"}, timeout=(cfg.timeout, cfg.query_timeout))
    except requests.RequestException as e:
        raise SkyServerError(f"cannot reach {url}: {_describe(e)}; check --base-url/--release "
                             "or try again later") from None
    with r:
        text = r.text
        if r.status_code != 200:
            raise SkyServerError(f"SkyServer answered HTTP {r.status_code} to {what} "
                                 f"(after {_tries(r)} tries): {_error_message(text)}")
        return parse_skyserver_csv(text, what)


def query_catalog(sql: str, cfg: DownloadConfig, session: requests.Session) -> tuple[pd.DataFrame, dict]:
    """Run the sample query, applying --limit and splitting a result that hits the row cap.

    The split is keyset paging: SELECT TOP cap * FROM (query) q WHERE q.objID > last ORDER BY
    q.objID, until a page comes back short. Bounded: each page must advance objID.
    """
    flat = one_line(sql)
    info = {"pages": 1, "capped": False}
    if cfg.limit is None:
        df = run_sql(flat, cfg, session)
        if len(df) < cfg.row_cap:
            return df, info
        info["capped"] = True  # the server stopped at its cap: fetch it again in objID order, in pages
    pages, last, remaining = [], None, cfg.limit if cfg.limit is not None else math.inf
    max_pages = 10_000
    for page in range(max_pages):
        top = int(min(cfg.row_cap, remaining))
        where = f" WHERE fastgal_q.objID > {last}" if last is not None else ""
        q = f"SELECT TOP {top} * FROM ({flat}) AS fastgal_q{where} ORDER BY fastgal_q.objID"
        try:
            df = run_sql(q, cfg, session, what=f"page {page + 1} of the query (objID > {last or 0})")
        except SkyServerError as e:
            if info["capped"] or cfg.limit is not None:
                raise SkyServerError(f"{e} -- while wrapping the query to apply --limit or split it by objID: "
                                     "make --sql a single SELECT that returns objID, without a top-level "
                                     "ORDER BY") from None
            raise
        pages.append(df)
        remaining -= len(df)
        if len(df) < top or remaining <= 0:
            break
        ids = _column(df, "objID", "the query")
        new_last = max(int(v) for v in df[ids])
        if last is not None and new_last <= last:
            raise SkyServerError(f"objID paging did not advance past {last}; narrow the query with an objID range")
        last = new_last
    else:
        raise SkyServerError(f"the query needed more than {max_pages} pages; narrow it")
    info["pages"] = len(pages)
    return pd.concat(pages, ignore_index=True), info


def _column(df: pd.DataFrame, name: str, what: str, required: bool = True) -> str | None:
    """The actual column called `name`, case-insensitively (SQL may return objid or OBJID)."""
    for c in df.columns:
        if c.lower() == name.lower():
            return c
    if required:
        raise CatalogError(f"{what} has no {name} column (it has: {', '.join(map(str, df.columns))}); "
                           "a catalog needs objID, ra and dec")
    return None


_ID_RE = re.compile(r"^\d{1,19}$")


def normalise_catalog(df: pd.DataFrame, what: str, first_line: int | None = 2,
                      duplicates: str = "error") -> tuple[pd.DataFrame, list[str]]:
    """Check ids and coordinates; rename objID/ra/dec/petroR90_r to their canonical case.

    Errors name the first bad row (file line when `first_line` is given) and how to fix it.
    duplicates="error" for a user's file; "first" keeps the first row of a repeated objID
    (a SkyServer join can list a galaxy twice) and reports the dropped ids.
    """
    df = df.rename(columns={_column(df, c, what, required=c != "petroR90_r") or c: c
                            for c in ("objID", "ra", "dec", "petroR90_r")})

    def where(i: int) -> str:
        return f"{what} line {first_line + i}" if first_line is not None else f"{what} row {i + 1}"

    if len(df) == 0:
        raise CatalogError(f"{what} has no rows; nothing to download")
    ids = df["objID"].str.strip()
    bad = [i for i, v in enumerate(ids) if not _ID_RE.match(v) or int(v) > MAX_ID]
    if bad:
        i = bad[0]
        raise CatalogError(f"{where(i)}: objID {ids.iloc[i]!r} is not an exact 64-bit integer"
                           f"{f' ({len(bad) - 1} more rows like it)' if len(bad) > 1 else ''}; write ids as "
                           "plain integers (read them with dtype=str: a float keeps only ~16 digits)")
    df["objID"] = ids
    for col, lo, hi in (("ra", 0.0, 360.0), ("dec", -90.0, 90.0)):
        vals = pd.to_numeric(df[col], errors="coerce")
        badc = np.flatnonzero(~((vals >= lo) & (vals <= hi)).to_numpy())
        if badc.size:
            i = int(badc[0])
            raise CatalogError(f"{where(i)}: {col} {df[col].iloc[i]!r} is not a number in [{lo:g}, {hi:g}] degrees"
                               f"{f' ({badc.size - 1} more rows like it)' if badc.size > 1 else ''}; fix or drop the row")
    dup = ids.duplicated(keep="first").to_numpy()
    dropped: list[str] = []
    if dup.any():
        if duplicates == "error":
            i = int(np.flatnonzero(dup)[0])
            j = int(np.flatnonzero((ids == ids.iloc[i]).to_numpy())[0])
            raise CatalogError(f"{where(i)}: objID {ids.iloc[i]} repeats {where(j)} ({int(dup.sum())} repeated "
                               "ids in all); keep one row per galaxy")
        dropped = ids[dup].tolist()
        df = df[~dup].reset_index(drop=True)
    return df, dropped


def read_user_catalog(path: Path) -> pd.DataFrame:
    """A user CSV, every value as text (ids exact, blanks kept blank)."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise CatalogError(f"catalog {path} does not exist; pass a CSV with objID, ra, dec columns") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise CatalogError(f"catalog {path} is not a readable CSV ({str(e).splitlines()[0]}); "
                           "save it as comma-separated text with a header row") from None


def write_catalog(path: Path, df: pd.DataFrame) -> None:
    """master.csv exactly as received: text in, text out (no float round trip)."""
    buf = io.StringIO()
    df.to_csv(buf, index=False, lineterminator="\n")
    write_bytes_atomic(path, buf.getvalue().encode())


# ------------------------------------------------------------------------------------ cutouts


def cutout_scale(petro_r90: str | None, cfg: DownloadConfig) -> float:
    """arcsec/pixel: fixed, or auto = the frame spans R90_SPAN x petroR90_r (as fastgal synth)."""
    if cfg.scale != "auto":
        return float(cfg.scale)
    try:
        r90 = float(petro_r90) if petro_r90 not in (None, "") else math.nan
    except ValueError:
        r90 = math.nan
    if not (math.isfinite(r90) and r90 > 0):  # NULL, -9999 or junk: fall back to a fixed scale
        return float(cfg.fallback_scale)
    return R90_SPAN * r90 / cfg.size


def check_jpeg(data: bytes, size: int) -> tuple[str | None, float | None]:
    """(problem or None, black fraction). A full decode (load(), not verify()) at size x size RGB."""
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        return "not a JPEG (no SOI marker)", None
    if not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return f"truncated JPEG (no EOI marker; {len(data)} bytes)", None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt, mode, wh = im.format, im.mode, im.size
            arr = np.asarray(im) if mode == "RGB" else None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"JPEG does not decode ({e})", None
    if fmt != "JPEG":
        return f"{fmt} image, not JPEG", None
    if wh != (size, size):
        return f"{wh[0]}x{wh[1]} image, expected {size}x{size}", None
    if mode != "RGB":
        return f"{mode} image, expected RGB", None
    dark = arr.max(axis=2) <= BLACK_LEVEL
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

    def __init__(self, cfg: DownloadConfig, images: Path, stop: threading.Event):
        self.cfg, self.images, self.stop = cfg, images, stop
        self.limiter = RateLimiter(cfg.rate, stop)
        self.url = cutout_url(cfg.base_url, cfg.release)
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def session(self) -> requests.Session:
        s = getattr(self._local, "s", None)
        if s is None:
            s = self._local.s = make_session(self.cfg, self.limiter)
            with self._lock:
                self._sessions.append(s)
        return s

    def close(self) -> None:
        for s in self._sessions:
            s.close()

    def _backoff(self, n: int) -> None:
        """Our own retries (what urllib3 cannot see) back off like urllib3's."""
        c = self.cfg
        d = min(c.backoff_max, c.backoff * 2 ** n) + random.random() * c.backoff
        if self.stop.wait(d):
            raise Interrupted()

    def fetch(self, oid: str, ra: str, dec: str, scale: float) -> Outcome:
        cfg, dst = self.cfg, self.images / f"{oid}.jpg"
        replaced = ""
        if dst.exists():
            problem, black = check_jpeg(dst.read_bytes(), cfg.size)
            if problem is None:
                return Outcome(oid, "skipped-existing", _black_note(black), 0, black)
            # an incomplete or wrong-size file from elsewhere: fetch it again (the rename replaces it)
            replaced = f"replaced an unusable earlier file ({problem})"
        params = {"ra": ra, "dec": dec, "scale": f"{scale:.6g}", "width": cfg.size, "height": cfg.size}
        tries, attempt, last, last_status = 0, 0, "", "failed"
        budget = cfg.retries + 1
        while tries < budget:
            if attempt:
                self._backoff(attempt)
            attempt += 1
            self.limiter.acquire()
            try:
                r = self.session().get(self.url, params=params, timeout=cfg.timeout, stream=True)
            except Interrupted:
                raise
            except requests.RequestException as e:  # urllib3 has already spent the retries
                n = tries + cfg.retries + 1  # this exception means urllib3 spent its retries
                return Outcome(oid, "failed", f"{_describe(e)} after {n} tries", n)
            with r:
                tries += _tries(r)
                if r.status_code == 404:
                    return Outcome(oid, "not-found", "HTTP 404: outside the imaging footprint", tries)
                if r.status_code == 400:
                    return Outcome(oid, "failed", f"HTTP 400 bad request: {_error_message(r.text)}", tries)
                if r.status_code != 200:  # 429/5xx after urllib3's retries, or another 4xx: final
                    return Outcome(oid, "failed", f"HTTP {r.status_code} after {tries} tries", tries)
                try:
                    data = r.content
                except requests.RequestException as e:  # the body was cut short: retry it here
                    last, last_status = f"body cut short ({_describe(e)})", "failed"
                    continue
                ctype = r.headers.get("Content-Type", "")
                if not ctype.lower().startswith("image/jpeg"):
                    last, last_status = f"HTTP 200 with Content-Type {ctype or 'none'!r}, not image/jpeg", "invalid-image"
                    continue
                problem, black = check_jpeg(data, cfg.size)
                if problem:
                    last, last_status = problem, "invalid-image"
                    continue
            part = dst.with_name(dst.name + ".part")
            try:
                part.write_bytes(data)
                os.replace(part, dst)
            finally:
                part.unlink(missing_ok=True)
            return Outcome(oid, "ok", "; ".join(x for x in (_black_note(black), replaced) if x), tries, black)
        return Outcome(oid, last_status, f"{last} (after {tries} tries)", tries)


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

    @property
    def fetched_per_s(self) -> float:
        fetched = self.counts.get("ok", 0) + self.counts.get("not-found", 0)
        return fetched / max(self.seconds, 1e-9)


def _validate(cfg: DownloadConfig) -> None:
    if cfg.sql is not None and cfg.catalog is not None:
        raise ValueError("pass --sql or --catalog, not both")
    if not MIN_SIZE <= cfg.size <= MAX_SIZE:
        raise ValueError(f"--size must be {MIN_SIZE}..{MAX_SIZE} pixels (SkyServer clamps outside it), got {cfg.size}")
    if cfg.scale != "auto" and not (isinstance(cfg.scale, (int, float)) and cfg.scale > 0):
        raise ValueError(f"--scale must be 'auto' or a positive arcsec/pixel, got {cfg.scale!r}")
    if cfg.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {cfg.workers}")
    if cfg.retries < 0 or cfg.rate < 0 or cfg.timeout <= 0:
        raise ValueError("--retries and --rate must be >= 0 and --timeout > 0")
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"--limit must be a positive number of galaxies, got {cfg.limit}")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; pass a folder path")


def _catalog_key(cfg: DownloadConfig, sql: str) -> str:
    return hashlib.sha256(json.dumps([one_line(sql), cfg.release, cfg.limit]).encode()).hexdigest()


def load_catalog(cfg: DownloadConfig, out: Path, session: requests.Session) -> tuple[pd.DataFrame, str, dict]:
    """The catalog for this run, written to OUT/data/master.csv; (df, source, meta)."""
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
        raise CatalogError(f"cannot read SQL file {sql_path}: {e.strerror or e}; pass --sql FILE") from None
    if not one_line(sql):
        raise CatalogError(f"{sql_path} holds no SQL (only comments?); write a SELECT")
    key = _catalog_key(cfg, sql)
    source = f"SkyServer {cfg.release} ({sql_path.name})"
    meta_path = out / "download.json"
    if master.exists() and meta_path.exists():  # resume: the same query was answered before
        try:
            old = json.loads(meta_path.read_text()).get("catalog", {})
        except ValueError:
            old = {}
        if old.get("key") == key:
            df = pd.read_csv(master, dtype=str, keep_default_na=False)
            return df, source + ", reused from the earlier run", old
    raw, info = query_catalog(sql, cfg, session)
    df, dropped = normalise_catalog(raw, f"the answer to {sql_path.name}", first_line=None, duplicates="first")
    write_catalog(master, df)
    meta = {"sql": str(sql_path), "key": key, "rows": len(df), **info, "dropped_duplicates": dropped}
    return df, source, meta


def _earlier_not_found(report: Path) -> dict[str, str]:
    """objIDs an earlier run found outside the footprint (a permanent 404): not asked again."""
    if not report.exists():
        return {}
    try:
        rep = pd.read_csv(report, dtype=str, keep_default_na=False)
        return {o: r for o, s, r in zip(rep["objID"], rep["status"], rep["reason"]) if s == "not-found"}
    except (ValueError, KeyError, pd.errors.ParserError):
        return {}


def write_report(path: Path, outcomes: list[Outcome]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(REPORT_COLUMNS)
    for o in outcomes:
        w.writerow([o.objID, o.status, o.reason, o.tries, "" if o.black_fraction is None else f"{o.black_fraction:.3f}"])
    write_bytes_atomic(path, buf.getvalue().encode())


def download(cfg: DownloadConfig) -> DownloadResult:
    """Catalog -> OUT/data/master.csv, cutouts -> OUT/images, report -> OUT/download-report.csv.

    Returns with interrupted=True after a Ctrl-C (everything written is consistent); other
    exceptions propagate after the same clean-up.
    """
    _validate(cfg)
    out = Path(cfg.out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(parents=True, exist_ok=True)
    notes = []
    stale = list(images.glob("*.part"))
    for p in stale:  # left by a run that was killed mid-write
        p.unlink(missing_ok=True)
    if stale:
        notes.append(f"removed {len(stale)} partial file(s) left by an earlier run")

    stop = threading.Event()
    dl = Downloader(cfg, images, stop)
    t0 = time.perf_counter()
    try:
        df, source, cat_meta = load_catalog(cfg, out, dl.session())
    finally:
        dl.close()
    dl = Downloader(cfg, images, stop)  # fresh sessions for the worker threads
    if cat_meta.get("dropped_duplicates"):
        d = cat_meta["dropped_duplicates"]
        notes.append(f"dropped {len(d)} repeated objID row(s), kept the first (e.g. {', '.join(d[:3])})")
    if cat_meta.get("capped"):
        notes.append(f"the query hit the {cfg.row_cap:,}-row cap; fetched it in {cat_meta['pages']} objID-ordered pages")

    report_path = out / "download-report.csv"
    earlier_404 = _earlier_not_found(report_path)
    r90col = "petroR90_r" if "petroR90_r" in df.columns else None
    if cfg.scale == "auto":
        r90 = pd.to_numeric(df[r90col], errors="coerce") if r90col else pd.Series(np.nan, index=df.index)
        n_fixed = int((~(r90 > 0)).sum())
        if n_fixed:
            notes.append(f"{n_fixed} galaxies have no usable petroR90_r; their cutouts use {cfg.fallback_scale}\"/pixel")
    ids = df["objID"].tolist()
    outcomes: dict[str, Outcome] = {}
    prog = Progress(len(ids), "download", cfg.quiet, unit="img")
    interrupted, error = False, None
    ex = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="fastgal-dl")
    futs = {}
    try:
        for i, oid in enumerate(ids):
            if oid in earlier_404 and not (images / f"{oid}.jpg").exists():
                outcomes[oid] = Outcome(oid, "not-found", f"{earlier_404[oid]} (earlier run; not asked again)", 0)
                prog.update()
                continue
            scale = cutout_scale(df[r90col].iat[i] if r90col else None, cfg)
            futs[ex.submit(dl.fetch, oid, df["ra"].iat[i], df["dec"].iat[i], scale)] = oid
        for f in as_completed(futs):
            o = f.result()
            outcomes[o.objID] = o
            prog.update()
    except KeyboardInterrupt:
        interrupted = True
    except BaseException as e:  # a bug or a disk error: clean up the same way, then re-raise
        error = e
    finally:
        if interrupted or error is not None:
            stop.set()  # workers stop at their next sleep or request; in-flight ones end within timeout
            ex.shutdown(wait=True, cancel_futures=True)
            for f, oid in futs.items():
                if oid not in outcomes and f.done() and not f.cancelled() and f.exception() is None:
                    outcomes[oid] = f.result()
        else:
            ex.shutdown(wait=True)
        dl.close()
        prog.close()
        for p in images.glob("*.part"):
            p.unlink(missing_ok=True)
        rows = [outcomes.get(oid) or Outcome(oid, "interrupted", "run stopped before this cutout; re-run to resume")
                for oid in ids]
        write_report(report_path, rows)
        counts = {s: 0 for s in STATUSES}
        for o in rows:
            counts[o.status] += 1
        flagged = sum(1 for o in rows if o.black_fraction is not None and o.black_fraction > BLACK_FLAG)
        res = DownloadResult(out=out, n=len(ids), counts=counts, seconds=time.perf_counter() - t0,
                             catalog_source=source, flagged_black=flagged,
                             dropped_duplicates=cat_meta.get("dropped_duplicates", []),
                             interrupted=interrupted or error is not None, notes=notes)
        write_json_atomic(out / "download.json", {
            "fastgal_version": __version__, "config": to_jsonable(cfg), "catalog": cat_meta,
            "catalog_source": source, "n": len(ids), "counts": counts, "flagged_mostly_black": flagged,
            "interrupted": res.interrupted, "seconds": round(res.seconds, 3),
        })
    if error is not None:
        raise error
    return res
