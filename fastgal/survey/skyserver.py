"""SkyServer client: SQL text, polite sessions (retries + one shared rate limit), SqlSearch, paging.

    python -c "from fastgal.survey.skyserver import one_line; print(one_line(open('fastgal/metallicity_sample.sql').read()))"

What the service does, as its code (github.com/sciserver/SkyServerWS) and answers show:
  - {base}/{release}/SkyServerWS/SearchTools/SqlSearch?cmd=SQL&format=csv answers a `#Table1` line
    and CSV. A SQL error, or the server's own 600 s query timeout, is HTTP 500 with a JSON body
    {"ErrorCode", "ErrorType", "ErrorMessage", "LogMessageID"}; some refusals (limits) are HTTP 200
    with one CSV column, `error_message`. Results stop at a row cap (500,000).
  - {base}/{release}/SkyServerWS/ImgCutout/getjpeg?ra&dec&scale&width&height answers a JPEG;
    outside the imaging footprint a 404 whose body is a JPEG of an error text. It clamps width and
    height to 64-2048 px and scale to 0.015-60 arcsec/px without saying so.

Retries: urllib3's Retry inside each Session's adapter, with exponential backoff, jitter and
Retry-After. A query is retried only when nothing was computed (connect errors, 502/503/504, a 429
that says when to come back); a SQL error would fail again, and a timed-out query would cost
another ten minutes, so both are shown at once. A cutout also retries 429 and 500 and read errors.
A connection that cannot be made (refused, a host name that does not resolve, no network) is tried
CONNECT_RETRIES more times, about a second, whatever --retries says: waiting longer does not bring a
network back, and the command says at once that it cannot reach the host (Unreachable).
A Retry subclass makes every retry take a token from the shared rate limiter, and turns a
Retry-After into a pause for every thread.
"""

from __future__ import annotations

import io
import json
import math
import re
import threading
import time

import pandas as pd
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from fastgal import __version__
from fastgal.options import DownloadConfig

MIN_SIZE, MAX_SIZE = 64, 2048  # getjpeg's width/height range, px
MIN_SCALE, MAX_SCALE = 0.015, 60.0  # getjpeg's scale range, arcsec/px
QUERY_TIMEOUT_S = 600  # SqlSearch stops a query after this long (its answer is then a JSON error)
CUTOUT_RETRY = (429, 500, 502, 503, 504)  # getjpeg's 500s are transient (their body is a JPEG)
QUERY_RETRY = (502, 503, 504)  # plus a 429 with Retry-After (urllib3 retries those by itself)
CONNECT_RETRIES = 2  # a connection that cannot be made: tried 3 times in ~1 s (backoff 0.5: waits 0, 1 s)
USER_AGENT = f"fastgal/{__version__} (+https://github.com/fastgal; polite: rate-limited, resumable)"


class SkyServerError(RuntimeError):
    """SkyServer answered with an error (a SQL error, a refusal, an HTML page, a bad status)."""


class SqlError(SkyServerError):
    """SkyServer rejected or refused the SQL itself (HTTP 500 with its message, or an error_message table)."""


class Unreachable(SkyServerError):
    """No connection could be made to the host (refused, name not resolved, connect timeout, no network)."""


def unreachable_message(base_url: str, reason: str) -> str:
    return (f"cannot reach {base_url} ({reason}); check the network, or --base-url if SkyServer is elsewhere "
            "(a mirror, a test server)")


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


def sql_head(sql: str, n: int = 100) -> str:
    """The start of the query as sent (one line), for error messages."""
    s = one_line(sql)
    return s if len(s) <= n else s[:n].rstrip() + " ..."


def sql_url(base_url: str, release: str) -> str:
    return f"{base_url.rstrip('/')}/{release}/SkyServerWS/SearchTools/SqlSearch"


def cutout_url(base_url: str, release: str) -> str:
    return f"{base_url.rstrip('/')}/{release}/SkyServerWS/ImgCutout/getjpeg"


# ------------------------------------------------------------------------------------ answers


def error_message(text: str) -> str:
    """The human part of a SkyServer error body, in one line: the JSON's ErrorMessage (or another
    Message/Error string anywhere in it), else the text without its HTML tags."""
    try:
        obj = json.loads(text)
    except ValueError:
        return " ".join(re.sub(r"<[^>]+>", " ", text).split())[:300] or "(empty body)"
    stack = [obj]
    while stack:  # breadth-first: the outermost message wins
        o = stack.pop(0)
        if isinstance(o, dict):
            for k in ("ErrorMessage", "Message", "message", "Error", "error"):
                if isinstance(o.get(k), str) and o[k].strip():
                    return " ".join(o[k].split())[:300]
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return " ".join(text.split())[:300]


def column(df: pd.DataFrame, name: str, what: str, required: bool = True) -> str | None:
    """The actual column called `name`, case-insensitively (SQL may return objid or OBJID)."""
    for c in df.columns:
        if str(c).lower() == name.lower():
            return c
    if required:
        raise ValueError(f"{what} has no {name} column (it has: {', '.join(map(str, df.columns))}); "
                         "a catalog needs objID, ra and dec")
    return None


def parse_skyserver_csv(text: str, what: str, sql: str) -> pd.DataFrame:
    """SqlSearch's CSV answer -> a DataFrame of strings (exact ids, NULL = '').

    A JSON or HTML body, or a CSV whose only column is `error_message`, is an error even with
    status 200: a SkyServerError with the server's message and the start of the SQL.
    """
    body = text.lstrip("\ufeff")
    head = body.lstrip()[:1]
    if head in ("[", "{"):
        raise SqlError(f"SkyServer rejected {what}: {error_message(body)} [SQL: {sql_head(sql)}]")
    if head == "<":
        raise SkyServerError(f"SkyServer answered {what} with an HTML page, not CSV: {error_message(body)[:200]}")
    lines = body.splitlines()
    if lines and lines[0].startswith("#Table"):
        lines = lines[1:]
    if any(ln.startswith("#Table") for ln in lines):
        raise ValueError(f"{what} returned more than one table; make the SQL a single SELECT")
    if not lines or not lines[0].strip():
        raise SkyServerError(f"SkyServer returned an empty answer to {what}")
    df = pd.read_csv(io.StringIO("\n".join(lines)), dtype=str, keep_default_na=False)
    if [str(c).strip().lower() for c in df.columns] == ["error_message"]:
        msg = " ".join(" ".join(df.iloc[:, 0]).split())[:300] or "(no message)"
        raise SqlError(f"SkyServer refused {what}: {msg} [SQL: {sql_head(sql)}]")
    return df


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

    def acquire(self) -> float | None:
        """Wait for the next token; its time (time.monotonic()), or None without a rate limit."""
        if self.stop.is_set():
            raise Interrupted()
        if not self.interval:
            return None
        with self._lock:
            now = time.monotonic()
            t = max(now, self._next)
            self._next = t + self.interval
        if t > now and self.stop.wait(t - now):  # an interruptible sleep
            raise Interrupted()
        return t

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


def make_session(cfg: DownloadConfig, limiter: RateLimiter, query: bool = False) -> requests.Session:
    """A Session whose adapter retries what is transient: for a cutout, connect/read errors, 429
    and 5xx; for a query (query=True), connect errors, 502/503/504 and a 429 with Retry-After."""
    n = cfg.retries
    retry = _retry_class(limiter, cfg.retry_after_max)(
        total=n, connect=min(n, CONNECT_RETRIES), read=False if query else n, status=n, other=0, redirect=3,
        allowed_methods=frozenset({"GET"}), status_forcelist=QUERY_RETRY if query else CUTOUT_RETRY,
        backoff_factor=cfg.backoff, backoff_max=cfg.backoff_max, backoff_jitter=cfg.backoff,
        respect_retry_after_header=True, raise_on_status=False)
    s = requests.Session()
    adapter = HTTPAdapter(max_retries=retry, pool_connections=1, pool_maxsize=1)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    s.headers["User-Agent"] = USER_AGENT
    return s


class ThreadSessions:
    """One Session (one keep-alive connection) per thread, all behind one rate limiter."""

    def __init__(self, cfg: DownloadConfig, limiter: RateLimiter):
        self.cfg, self.limiter = cfg, limiter
        self._local = threading.local()
        self._all: list[requests.Session] = []
        self._lock = threading.Lock()

    def get(self) -> requests.Session:
        s = getattr(self._local, "s", None)
        if s is None:
            s = self._local.s = make_session(self.cfg, self.limiter)
            with self._lock:
                self._all.append(s)
        return s

    def close(self) -> None:
        for s in self._all:
            s.close()


def tries(resp: requests.Response) -> int:
    """How many requests urllib3 made for this response (1 + its retries)."""
    r = getattr(resp.raw, "retries", None)
    return 1 + len(r.history) if r is not None else 1


def _root(e: BaseException) -> BaseException:
    root = e
    for _ in range(6):  # unwrap requests -> MaxRetryError -> the socket error
        nxt = getattr(root, "reason", None) or (root.args[0] if root.args and isinstance(root.args[0], BaseException) else None)
        if nxt is None or nxt is root or not isinstance(nxt, BaseException):
            break
        root = nxt
    return root


def connect_failure(e: BaseException) -> str | None:
    """Why no connection could be made (the request never reached a server), or None when one was made."""
    from urllib3.exceptions import (
        ConnectTimeoutError,
        NameResolutionError,
        NewConnectionError,
    )

    root = _root(e)
    if isinstance(root, NameResolutionError):
        host = getattr(root, "_host", None) or "of the URL"
        return f"host name {host} does not resolve: no network, or no such host"
    if isinstance(root, NewConnectionError):
        return "connection refused" if "refused" in str(root).lower() else f"no connection: {str(root)[:160]}"
    if isinstance(root, ConnectTimeoutError) or isinstance(e, requests.ConnectTimeout):
        return "connect timed out"
    return None


def describe(e: BaseException) -> str:
    """A short reason for a requests exception, naming the root cause (timeout, reset, ...)."""
    why = connect_failure(e)
    if why:
        return why
    root = _root(e)
    kind, text = type(root).__name__, str(root)
    if "Timeout" in kind or "timed out" in text:
        return "timed out"
    if isinstance(root, (ConnectionResetError, ConnectionAbortedError)) or "RemoteDisconnected" in kind \
            or "reset" in text.lower() or "closed connection" in text.lower():
        return "connection dropped"
    if "Connection refused" in text or isinstance(root, ConnectionRefusedError):
        return "connection refused"
    return f"{kind}: {text[:160]}"


# ------------------------------------------------------------------------------------ queries


def run_sql(sql: str, cfg: DownloadConfig, session: requests.Session, what: str = "the query",
            shown: str | None = None) -> pd.DataFrame:
    """One SqlSearch call -> DataFrame of strings. Errors name `shown` (default: sql) by its start."""
    url, shown = sql_url(cfg.base_url, cfg.release), shown or sql
    try:
        r = session.get(url, params={"cmd": sql, "format": "csv"}, timeout=(cfg.timeout, cfg.query_timeout))
    except requests.ReadTimeout:
        raise SkyServerError(f"no answer to {what} within --query-timeout {cfg.query_timeout:g} s (SkyServer "
                             f"stops a query at {QUERY_TIMEOUT_S} s): narrow it, e.g. with --limit, or try later "
                             f"[SQL: {sql_head(shown)}]") from None
    except requests.RequestException as e:
        if connect_failure(e):
            raise Unreachable(unreachable_message(cfg.base_url, connect_failure(e))) from None
        raise SkyServerError(f"the connection to {url} failed during {what}: {describe(e)}; try again later, "
                             "or check --base-url/--release") from None
    with r:
        text = r.text
    if r.status_code != 200:
        again = f" after {tries(r)} tries" if tries(r) > 1 else ""
        kind = SqlError if r.status_code == 500 else SkyServerError  # 500: SqlSearch's answer to a SQL error
        raise kind(f"SkyServer answered HTTP {r.status_code} to {what}{again}: {error_message(text)} "
                   f"[SQL: {sql_head(shown)}]")
    return parse_skyserver_csv(text, what, shown)


def query_catalog(sql: str, cfg: DownloadConfig, session: requests.Session, what: str = "the query"
                  ) -> tuple[pd.DataFrame, dict]:
    """Run the sample query, applying cfg.limit and splitting a result that hits the row cap.

    The split is keyset paging: SELECT TOP cap * FROM (query) q WHERE q.objID > last ORDER BY
    q.objID, until a page comes back short. Bounded: each page must advance objID.
    """
    flat = one_line(sql)
    info = {"pages": 1, "capped": False}
    if cfg.limit is None:
        df = run_sql(flat, cfg, session, what)
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
            df = run_sql(q, cfg, session, f"page {page + 1} of {what} (objID > {last or 0})", shown=flat)
        except SqlError as e:  # about the SQL: say how fastgal changed it (not for a network or server fault)
            raise SqlError(f"{e} (fastgal wraps the query as SELECT TOP n * FROM (...) ORDER BY objID to apply "
                                 "--limit or split it: it must be a single SELECT that returns objID, without a "
                                 "top-level ORDER BY)") from None
        pages.append(df)
        remaining -= len(df)
        if len(df) < top or remaining <= 0:
            break
        new_last = max(int(v) for v in df[column(df, "objID", what)])
        if last is not None and new_last <= last:
            raise SkyServerError(f"objID paging did not advance past {last}; narrow the query with an objID range")
        last = new_last
    else:
        raise SkyServerError(f"the query needed more than {max_pages} pages; narrow it")
    info["pages"] = len(pages)
    return pd.concat(pages, ignore_index=True), info


# ------------------------------------------------------------------------------------ cutouts


def get_cutout(session: requests.Session, url: str, params: dict, cfg: DownloadConfig
               ) -> tuple[str, str, int, bytes | None]:
    """One getjpeg call after urllib3's retries, read as the service answers: (status, reason, tries,
    bytes). "ok" with the JPEG's bytes (still to be checked); "cut-short" (the body ended early) and
    "not-jpeg" (a 200 with an HTML page) are worth another try, which urllib3 cannot see; "not-found"
    (404: outside the imaging footprint, the body a picture of the error) and "failed" are final;
    "unreachable": no connection could be made (refused, a name that does not resolve, no network)."""
    try:
        r = session.get(url, params=params, timeout=cfg.timeout, stream=True)
    except requests.RequestException as e:  # this exception means urllib3 spent its retries
        if connect_failure(e):  # no connection at all: "unreachable", after CONNECT_RETRIES
            return "unreachable", describe(e), min(cfg.retries, CONNECT_RETRIES) + 1, None
        return "failed", describe(e), cfg.retries + 1, None
    with r:
        n = tries(r)
        if r.status_code == 404:
            return "not-found", "HTTP 404: outside the imaging footprint", n, None
        if r.status_code == 400:
            return "failed", f"HTTP 400 bad request: {error_message(r.text)}", n, None
        if r.status_code != 200:  # 429/5xx after urllib3's retries, or another 4xx
            return "failed", f"HTTP {r.status_code}", n, None
        try:
            data = r.content
        except requests.RequestException as e:
            return "cut-short", f"body cut short ({describe(e)})", n, None
        ctype = r.headers.get("Content-Type", "")
        if not ctype.lower().startswith("image/jpeg"):
            return "not-jpeg", f"HTTP 200 with Content-Type {ctype or 'none'!r}, not image/jpeg", n, None
        return "ok", "", n, data
