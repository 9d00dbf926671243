"""Small leaf helpers shared by the commands: atomic writes, progress on stderr, hashing.

Nothing here knows about galaxies; every other module may import it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    A crash or Ctrl-C leaves a `.name.*.tmp` file, never a file that looks finished.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


class Progress:
    """A one-line progress counter on stderr: rate and ETA, redrawn at most 5x/s.

    Silent when stderr is not a TTY or when quiet=True, so logs and CI stay clean.
    """

    def __init__(self, total: int | None, desc: str = "", quiet: bool = False, unit: str = "it"):
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled = (not quiet) and sys.stderr.isatty()
        self.n = 0
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, k: int = 1) -> None:
        self.n += k
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last < 0.2 and (self.total is None or self.n < self.total):
            return
        self._last = now
        el = max(now - self.t0, 1e-9)
        rate = self.n / el
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            msg = f"{self.desc} {self.n}/{self.total} {self.unit} [{rate:,.0f} {self.unit}/s, ETA {eta:,.0f}s]"
        else:
            msg = f"{self.desc} {self.n} {self.unit} [{rate:,.0f} {self.unit}/s]"
        sys.stderr.write("\r\x1b[K" + msg)
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)
