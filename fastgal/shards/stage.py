"""Shards anywhere: a shard folder at a URL (https://, s3://, gs://, any fsspec URL, or a path on a shared
filesystem) staged to node-local disk, every tar verified against the manifest's sha256 before anything reads it.

    fastgal stage https://example.org/shards/synth/            # -> $FASTGAL_CACHE, else $SLURM_TMPDIR, else /tmp
    fastgal stage s3://bucket/shards/synth/ /scratch/fastgal   # the cache folder to stage into
    from fastgal.shards.stage import local; folder = local("s3://bucket/shards/synth/")   # train/predict do this

The cache (one per node) holds
    sha256/<hex>.tar          the tars, content-addressed: a shard is fetched once, whatever folder lists it, and a
                              changed shard (a new sha256 in the manifest) always is; written under a temporary
                              name (.<hex>.*.part) and renamed only after its size and sha256 match the manifest
    sha256/<hex>.idx          each tar's DALI index file, kept once every entry names a member of the verified tar
                              at its offset, with its size (the manifest holds no hash of index files)
    <name>-<h>/               the staged shard folder `Shards` reads: manifest.json (written last), the tars as
                              hard links to sha256/, the index files, rejects.csv, .fastgal-stage.json (the source,
                              redacted, and the manifest's sha256)
Nothing is ever deleted but this module's own temporary files; a killed staging leaves whole, verified tars and
resumes with the rest. Transfers go through fsspec (torch already depends on it); http(s) needs aiohttp and s3://
s3fs (`pip install fastgal[remote]`), gs:// gcsfs. Credentials come from the backends' usual places (AWS_* env,
~/.aws, AWS_ENDPOINT_URL for an S3-compatible store); user:password@ and query strings (signed tokens) in a URL
are redacted in every message and in what is written.

Under torchrun, one process per node stages (LOCAL_RANK 0); the others read the (small) manifest themselves and
wait for the staged folder's marker to name its sha256: a file-based wait, because staging happens before the
process group exists (and `predict`, `info`, `bench` have none), and because a waiter can then say what it
waited for when the time runs out (FASTGAL_STAGE_TIMEOUT seconds, default 3600).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from fastgal.shards.index import index_problem
from fastgal.shards.read import FORMAT, READS
from fastgal.util import (
    HashCache,
    Progress,
    is_url,
    sha256_file,
    umask,
    write_bytes_atomic,
    write_json_atomic,
)

MARKER = ".fastgal-stage.json"
_TOKEN_FIX = "(the URL's credentials and query are shown as ***)"


class Redactor:
    """Hides a URL's secrets (the password of user:password@, every query value: signed tokens) in any text."""

    def __init__(self, url: str):
        self.secrets: list[str] = []
        if is_url(url):
            parts = urlsplit(url)
            userinfo = parts.netloc.rpartition("@")[0]
            if userinfo:  # user:password@ as a whole (a short user name alone would match anywhere)
                self.secrets.append(userinfo)
            if parts.password and len(parts.password) >= 4:  # as some clients quote it back alone
                self.secrets.append(parts.password)
            for kv in parts.query.split("&"):
                _, _, v = kv.partition("=")
                if len(v) >= 3:
                    self.secrets.append(v)
        self.secrets.sort(key=len, reverse=True)

    def __call__(self, text) -> str:
        text = str(text)
        for s in self.secrets:
            text = text.replace(s, "***")
        return text


def redact(url: str) -> str:
    return Redactor(url)(url)


def cache_root() -> Path:
    """Where staged shards go: $FASTGAL_CACHE, else $SLURM_TMPDIR/fastgal (the node-local disk HPC centres
    give a job), else the system temp folder's fastgal-cache."""
    if os.environ.get("FASTGAL_CACHE"):
        return Path(os.environ["FASTGAL_CACHE"])
    if os.environ.get("SLURM_TMPDIR"):
        return Path(os.environ["SLURM_TMPDIR"]) / "fastgal"
    return Path(tempfile.gettempdir()) / "fastgal-cache"


class _Source:
    """A shard folder's location: its files' URLs (a query, e.g. a signed token, kept on each) and the fsspec
    filesystem that reads them, with a read timeout."""

    def __init__(self, src: str, timeout: float):
        import fsspec  # torch's own dependency

        self.src = src
        self.redact = Redactor(src)
        base, _, self.query = src.partition("?") if is_url(src) else (src, "", "")
        self.base = base.rstrip("/")
        protocol = fsspec.utils.get_protocol(self.base)
        opts: dict = {}
        if protocol in ("http", "https"):
            try:
                import aiohttp
            except ImportError:
                raise ValueError(f"{redact(src)}: reading shards over http(s) needs aiohttp; "
                                 "pip install 'fastgal[remote]'") from None
            # a server that stops sending mid-body fails after `timeout` s of silence (then retried), not never
            opts["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)}
        elif protocol in ("s3", "s3a"):
            opts["config_kwargs"] = {"connect_timeout": timeout, "read_timeout": timeout}
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.base, **opts)
        except ImportError as e:  # fsspec names the package a protocol needs
            raise ValueError(f"{redact(src)}: {e}; pip install 'fastgal[remote]' (http, s3) or the package named") from None
        except ValueError as e:
            raise ValueError(f"{redact(src)}: {self.redact(e)}") from None
        self.http = protocol in ("http", "https")

    def path(self, name: str) -> str:
        p = f"{self.root.rstrip('/')}/{name}"
        return f"{p}?{self.query}" if self.http and self.query else p

    def shown(self, name: str) -> str:
        return redact(f"{self.base}/{name}" + (f"?{self.query}" if self.query else ""))


@dataclass
class Staged:
    folder: Path  # the staged shard folder: pass it wherever a shard folder is taken
    source: str  # the location, redacted
    shards: int = 0
    fetched: int = 0  # tars fetched now
    cached: int = 0  # tars already in the cache (content-addressed)
    bytes_fetched: int = 0
    bytes_total: int = 0
    seconds: float = 0.0
    retries: list[str] = field(default_factory=list)  # one line per retried fetch: what failed

    @property
    def mb_per_s(self) -> float:
        return self.bytes_fetched / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        rate = (f"{self.bytes_fetched / 1e6:,.1f} MB in {self.seconds:.1f}s ({self.mb_per_s:,.1f} MB/s)"
                if self.fetched else "nothing fetched")
        return (f"staged {self.shards} shard(s) from {self.source} into {self.folder}: {self.fetched} fetched, "
                f"{self.cached} already in the cache; {rate}")

    def as_dict(self) -> dict:
        return {"folder": str(self.folder), "source": self.source, "shards": self.shards, "fetched": self.fetched,
                "cached": self.cached, "bytes_fetched": self.bytes_fetched, "bytes_total": self.bytes_total,
                "seconds": round(self.seconds, 3), "mb_per_s": round(self.mb_per_s, 2), "retries": self.retries}


class _Stopped(Exception):
    """The command is stopping (Ctrl-C, SIGTERM, another stream's failure): a transfer ends at its next chunk."""


class _Missing(FileNotFoundError):
    """A file of the folder the server does not have (`what`: its URL, redacted)."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def _with_retries(what: str, fn, redactor: Redactor, retries: int, backoff: float, log, missing,
                  stop: threading.Event | None = None):
    """fn() with up to `retries` more tries after a failure, waiting backoff, 2x backoff, ... (at most 30 s).
    A missing file (FileNotFoundError) is not retried: one line naming it (`missing(url)`)."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except FileNotFoundError as e:
            raise ValueError(missing(getattr(e, "what", what))) from None
        except (KeyboardInterrupt, SystemExit, _Stopped):
            raise
        except Exception as e:  # noqa: BLE001 - network errors come as many types (aiohttp, botocore, OSError, timeouts)
            why = redactor(f"{type(e).__name__}: {e}".strip().rstrip(":"))
            if attempt == retries:
                raise ValueError(f"could not fetch {what} after {retries + 1} tries (last: {why}); check the "
                                 f"server and run the same command again (whole shards already staged are kept)") from None
            wait = min(backoff * 2 ** attempt, 30.0)
            log(f"fastgal: {what}: {why}; retrying in {wait:.1f}s ({attempt + 1}/{retries})")
            if stop is not None and stop.wait(wait):
                raise _Stopped()
            if stop is None:
                time.sleep(wait)


class _Corrupt(OSError):
    """A fetched file that is not the one the manifest lists (size or sha256): fetched again."""


def _folder_hint(source: _Source) -> str:
    """A URL that names one of a shard folder's files (a tar, an index, the manifest) rather than the folder."""
    base, name = source.base.rpartition("/")[::2]
    if name.endswith((".tar", ".idx", ".json", ".csv")):
        return f"; it names a file: give the folder that holds it, {redact(base)}/"
    return ""


def _fetch_manifest(source: _Source, retries: int, backoff: float, log) -> tuple[dict, bytes]:
    shown = source.shown("manifest.json")
    raw = _with_retries(shown, lambda: source.fs.cat_file(source.path("manifest.json")), source.redact, retries, backoff,
                        log, lambda url: f"{url} does not exist: {redact(source.src)} is not a fastgal shard folder "
                                         "(`fastgal shard` writes manifest.json beside the tars)" + _folder_hint(source))
    try:
        m = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{shown} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("format_version") not in READS:
        raise ValueError(f"{shown} is not a fastgal shard manifest this fastgal reads (format {m.get('format') if isinstance(m, dict) else None!r})")
    return m, raw


def view_folder(cache: Path, src: str) -> Path:
    """The staged folder of a location in a cache: its last path component and a hash of the location
    without secrets, so two sources never share one."""
    base = src.partition("?")[0] if is_url(src) else f"file://{Path(src).resolve()}"  # a path: its file:// URL's
    parts = urlsplit(base)
    key = f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}".rstrip("/")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", key.rstrip("/").rsplit("/", 1)[-1]) or "shards"
    return Path(cache) / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _entries(m: dict) -> list[dict]:
    return [e for sp in m["shards"].values() for e in sp]


def _staged_matches(view: Path, manifest_sha: str) -> bool:
    try:
        mk = json.loads((view / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return mk.get("manifest_sha256") == manifest_sha and (view / "manifest.json").is_file()


def stage(src, cache=None, *, streams: int = 8, retries: int = 4, timeout: float = 60.0, backoff: float | None = None,
          quiet: bool = False) -> Staged:
    """Stage the shard folder at `src` into `cache` (default cache_root()); returns what was done, its folder first."""
    src = str(src)
    backoff = float(os.environ.get("FASTGAL_STAGE_BACKOFF", 0.5)) if backoff is None else backoff
    t0 = time.perf_counter()
    log = Progress(quiet=quiet)
    source = _Source(src, timeout)
    cache = Path(cache) if cache else cache_root()
    m, raw = _fetch_manifest(source, retries, backoff, log.line)
    manifest_sha = hashlib.sha256(raw).hexdigest()
    view = view_folder(cache, src)
    entries = _entries(m)
    res = Staged(folder=view, source=redact(src), shards=len(entries), bytes_total=sum(e["bytes"] for e in entries))
    if view.exists() and not (view / MARKER).is_file() and any(view.iterdir()):
        raise ValueError(f"{view} holds files `fastgal stage` did not write (no {MARKER}); it deletes and overwrites "
                         "nothing of anyone else's: move them, or stage into another cache (fastgal stage SRC DST)")
    store = cache / "sha256"
    store.mkdir(parents=True, exist_ok=True)
    for stale in store.glob(".*.part"):  # our own partial files, of a staging killed with SIGKILL
        if _stale(stale):
            stale.unlink(missing_ok=True)
    hashes = HashCache()

    def have(e) -> bool:  # a whole, verified object (written only after its check; re-checked through the cache)
        obj = store / f"{e['sha256']}.tar"
        return (obj.is_file() and obj.stat().st_size == e["bytes"] and hashes.sha256(obj) == e["sha256"]
                and obj.with_suffix(".idx").is_file())

    todo, seen = [], set()
    for e in entries:
        if e["sha256"] in seen:
            continue
        seen.add(e["sha256"])
        if not have(e):
            todo.append(e)
    need = sum(e["bytes"] for e in todo) + sum(e["bytes"] // 50 for e in entries) + len(raw)  # + the index files
    free = shutil.disk_usage(store).free
    if need > free:
        raise ValueError(f"staging {res.source} needs {need / 1e9:,.2f} GB ({need:,} bytes: {len(todo)} shard(s) not yet "
                         f"in {cache}, and their index files) but {cache} has {free / 1e9:,.2f} GB free; free space "
                         f"there or stage into a larger disk (fastgal stage SRC DST, or FASTGAL_CACHE=DIR)")
    fetching = {e["sha256"] for e in todo}
    res.cached = sum(1 for e in entries if e["sha256"] not in fetching)
    bar = Progress(sum(e["bytes"] for e in todo) / 1e6, f"stage {res.source}", quiet, unit="MB")
    lock, stop = threading.Lock(), threading.Event()

    def fetch(e) -> None:
        shown = source.shown(e["file"])
        obj = store / f"{e['sha256']}.tar"

        def once() -> None:
            from fsspec.callbacks import Callback

            class Count(Callback):
                def call(self, *a, **k):
                    pass

                def relative_update(self, inc=1):
                    if stop.is_set():  # Ctrl-C, SIGTERM or another stream's failure: this transfer ends here
                        raise _Stopped()
                    with lock:
                        bar.update(inc / 1e6)

            part = store / f".{e['sha256']}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part"
            try:
                if not (obj.is_file() and hashes.sha256(obj) == e["sha256"]):  # (a retry after a bad index file)
                    source.fs.get_file(source.path(e["file"]), str(part), callback=Count())
                    size = part.stat().st_size
                    if size != e["bytes"]:
                        raise _Corrupt(f"{size:,} bytes arrived, the manifest lists {e['bytes']:,}")
                    got = sha256_file(part)
                    if got != e["sha256"]:
                        raise _Corrupt(f"sha256 {got[:12]}... differs from the manifest's {e['sha256'][:12]}...")
                    os.chmod(part, 0o444 & ~umask())  # content-addressed: never written again
                    os.replace(part, obj)  # whole and verified, or not there at all
                    hashes.put(obj, got)
                # its index file (the manifest has no hash of it): kept by the tar's sha256 once every entry
                # names a member of the verified tar at its offset, with its size
                try:
                    raw_idx = source.fs.cat_file(source.path(e["index"]))
                except FileNotFoundError:
                    raise _Missing(source.shown(e["index"])) from None
                problem = index_problem(raw_idx, obj, e["samples"])
                if problem:
                    raise _Corrupt(f"{source.shown(e['index'])} {problem}")
                with open(part, "wb") as f:
                    f.write(raw_idx)
                os.replace(part, obj.with_suffix(".idx"))
            finally:
                part.unlink(missing_ok=True)

        def note(line: str) -> None:
            with lock:
                res.retries.append(line)
            log.line(line)

        _with_retries(shown, once, source.redact, retries, backoff, note,
                      lambda url: f"{url} is missing (listed in {source.shown('manifest.json')}); re-upload the "
                                  "shard folder whole, or stage another copy", stop)
        with lock:
            res.fetched += 1
            res.bytes_fetched += e["bytes"]

    t_fetch = time.perf_counter()
    try:
        _run_streams(fetch, todo, streams, stop, store)
    finally:
        bar.close()
    res.seconds = time.perf_counter() - t_fetch
    rejects = _fetch_optional(source, "rejects.csv", retries, backoff, log.line)  # what `fastgal info` reports
    _link_view(view, store, m, raw, manifest_sha, res.source, hashes, rejects)
    hashes.save()
    res.seconds = res.seconds if res.fetched else time.perf_counter() - t0
    log.line(res.summary())
    return res


def _stale(part: Path) -> bool:
    """A partial file of a process that is gone (its pid in the name): one of a live process is left alone."""
    try:
        pid = int(part.name.split(".")[2].split("-")[0])
    except (ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


def _run_streams(fetch, todo: list, streams: int, stop: threading.Event, store: Path) -> None:
    """fetch(e) for every entry, `streams` at once, in daemon threads: Ctrl-C or SIGTERM (raised in this thread)
    returns at once instead of waiting out a stalled transfer, and the first failure stops the other streams.
    Stopped, this process's partial files are removed here (a transfer still in flight writes to an unlinked file,
    and nothing renames it: it can no longer be found to be verified); one of a SIGKILLed process is removed by
    the next staging (`_stale`)."""
    pending = list(reversed(todo))
    errors: list[BaseException] = []
    guard = threading.Lock()

    def worker() -> None:
        while not stop.is_set():
            with guard:
                if not pending:
                    return
                e = pending.pop()
            try:
                fetch(e)
            except BaseException as ex:  # noqa: BLE001 - handed to the main thread
                errors.append(ex)
                stop.set()
                return

    threads = [threading.Thread(target=worker, daemon=True, name=f"fastgal-stage-{i}")
               for i in range(max(1, min(streams, len(todo))))] if todo else []
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)  # a timeout: a signal's exception is raised here between waits
    except BaseException:
        stop.set()
        for part in store.glob(f".*.{os.getpid()}-*.part"):
            part.unlink(missing_ok=True)
        raise
    first = next((e for e in errors if not isinstance(e, _Stopped)), None)
    if first is not None:
        raise first


def _fetch_optional(source: _Source, name: str, retries: int, backoff: float, log) -> bytes | None:
    """A small file of the folder that may be absent (None then)."""
    try:
        return _with_retries(source.shown(name), lambda: source.fs.cat_file(source.path(name)), source.redact, retries,
                             backoff, log, lambda url: "absent")
    except ValueError as e:
        if str(e) == "absent":
            return None
        raise


def _link_view(view: Path, store: Path, m: dict, raw: bytes, manifest_sha: str, source: str, hashes: HashCache,
               rejects: bytes | None = None) -> None:
    """The staged folder: its old manifest and marker (ours) out first, so it is never half one manifest's and
    half another's while it reads as finished; then the tars (hard links), index files, manifest, marker."""
    view.mkdir(parents=True, exist_ok=True)
    for ours in (MARKER, "manifest.json"):
        (view / ours).unlink(missing_ok=True)
    for e in _entries(m):
        tar, obj = view / e["file"], store / f"{e['sha256']}.tar"
        if not (tar.is_file() and os.path.samefile(tar, obj)):
            tmp = view / f".{e['file']}.{uuid.uuid4().hex[:8]}.link"
            try:
                os.link(obj, tmp)
            except OSError:  # a filesystem without hard links
                os.symlink(obj.resolve(), tmp)
            os.replace(tmp, tar)
        hashes.put(obj, e["sha256"])  # a new link changes the inode's ctime: record both names now
        hashes.put(tar, e["sha256"])
        idx, text = view / e["index"], obj.with_suffix(".idx").read_bytes()
        if not (idx.is_file() and idx.read_bytes() == text):
            write_bytes_atomic(idx, text)
    if rejects is not None:
        write_bytes_atomic(view / "rejects.csv", rejects)
    write_bytes_atomic(view / "manifest.json", raw)
    write_json_atomic(view / MARKER, {"source": source, "manifest_sha256": manifest_sha,
                                      "files": sorted({f for e in _entries(m) for f in (e["file"], e["index"])}),
                                      "staged_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def wait_for(src: str, cache=None, *, timeout: float | None = None, retries: int = 4, quiet: bool = False) -> Path:
    """A process that is not its node's LOCAL_RANK 0: wait until that one has staged `src`, return the folder."""
    src = str(src)
    timeout = float(os.environ.get("FASTGAL_STAGE_TIMEOUT", 3600)) if timeout is None else timeout
    source = _Source(src, 60.0)
    _, raw = _fetch_manifest(source, retries, float(os.environ.get("FASTGAL_STAGE_BACKOFF", 0.5)), Progress(quiet=quiet).line)
    sha = hashlib.sha256(raw).hexdigest()
    view = view_folder(Path(cache) if cache else cache_root(), src)
    t0 = time.monotonic()
    while not _staged_matches(view, sha):
        if time.monotonic() - t0 > timeout:
            raise ValueError(f"LOCAL_RANK {os.environ.get('LOCAL_RANK')} waited {timeout:.0f}s for LOCAL_RANK 0 to stage "
                             f"{redact(src)} into {view} ({view / MARKER} naming manifest sha256 {sha[:12]}... did not "
                             "appear); see LOCAL_RANK 0's error, or stage first (`fastgal stage SRC`) and raise "
                             "FASTGAL_STAGE_TIMEOUT")
        time.sleep(0.5)
    return view


def local(location, quiet: bool = False) -> Path:
    """A shard folder on this machine for `location`: a local path as it is; a URL staged (under torchrun by
    LOCAL_RANK 0 of each node, the others waiting for it)."""
    if not is_url(str(location)):
        return Path(location)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        return stage(str(location), quiet=quiet or int(os.environ.get("RANK", "0")) > 0).folder
    return wait_for(str(location), quiet=True)
