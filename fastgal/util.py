"""Small leaf helpers every command shares: atomic writes that keep the umask, output folders and the lock
that gives each to one command, hashing (and its cache), workers, one bounded ordered pool, one progress
writer, SIGTERM unwound as Ctrl-C, the disk errors a user can fix and the output folder a failed command created.

Nothing here knows about galaxies, images or shards (the JPEG check is shards/cutouts.py's); it imports
nothing of fastgal, and every other module may import it.

    from fastgal.util import write_json_atomic, Progress, worker_pool, imap_ordered
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from contextlib import contextmanager
from itertools import islice
from multiprocessing import get_context
from pathlib import Path

# --------------------------------------------------------------------------- files

def umask() -> int:
    """The process umask (os.umask can only be read by setting it; set it straight back)."""
    m = os.umask(0o022)
    os.umask(m)
    return m


def plain_file_mode() -> int:
    """The mode open(path, "w") would give a new file: 0666 less the umask (mkstemp makes 0600)."""
    return 0o666 & ~umask()


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    An exception, Ctrl-C or SIGTERM removes the temp file; SIGKILL leaves it (`.name.*.tmp`), never a
    file that looks finished. The file gets the mode a plain write would give (the umask's), not
    mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, plain_file_mode())
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        disk = disk_error(e)  # name the file being written, not its temp name (or none: a write to an open file)
        if disk is not None and disk.filename in (None, tmp):
            disk.filename = str(path)
        raise


def temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A hidden work folder inside `parent`, with the mode mkdir would give (mkdtemp makes 0700),
    so what is renamed out of it into place can be shared like any other output."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def remove_stale(parent: str | os.PathLike, prefix: str) -> list[Path]:
    """Delete what a killed earlier run left behind: `parent/prefix*` work folders and files."""
    parent = Path(parent)
    gone = []
    if parent.is_dir():
        for p in parent.glob(prefix + "*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p)
    return gone


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(location) -> bool:
    """Whether a data location is a URL (https://, s3://, any fsspec URL: shards/stage.py stages it) rather than
    a local path. A Path never is (Path collapses the `//`)."""
    return isinstance(location, str) and bool(_URL.match(location))


def write_bytes_atomic(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def check_out(out: Path, *, overwrite: bool, finished: str, unfinished=None, what: str = "output") -> None:
    """Refuse an OUT that is a file, holds a finished result (`finished` exists) or files of an
    unfinished run (`unfinished(name) -> bool`) without overwrite, or cannot be written to.

    Every command that writes a folder checks it here, before any work starts.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; pass a folder path for the {what}")
    if out.exists() and not overwrite:
        if (out / finished).exists():
            raise ValueError(f"{out} already holds a finished {what} ({finished}); pass --overwrite to replace it, "
                             "or choose another folder")
        if unfinished is not None and any(unfinished(p.name) for p in out.iterdir()):
            raise ValueError(f"{out} holds files of an unfinished {what}; pass --overwrite to replace them, "
                             "or choose another folder")
    check_writable(out)


def check_writable(folder: str | os.PathLike, fix: str = "choose a folder you can write to") -> None:
    """Refuse, in one line and before any work, a `folder` this process cannot create files in (the nearest of
    it and its parents that exists), or whose disk is full. A real probe (a file created and removed), not only
    os.access: root passes os.access on a read-only folder such as /sys, and its writes then fail."""
    folder = Path(folder)
    parent = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{parent} is not writable; {fix}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fastgal-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{parent} is not writable ({e.strerror or e}); {fix}") from None
    if shutil.disk_usage(parent).free < MIN_FREE:
        raise ValueError(f"no space left on the device of {parent}; free space there, or {fix}")


MIN_FREE = 1 << 20  # bytes: a disk with less is full for any command's output


# --------------------------------------------------------------------------- failures a user can fix

NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
NOT_WRITABLE = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def disk_error(exc: BaseException | None) -> OSError | None:
    """The OSError a user can fix (a full disk, a quota, a read-only or forbidden folder) that `exc` is or was
    raised from or while handling: fastai re-raises a callback's error as its own, torch.save into a Python file
    raises a RuntimeError while handling the file's OSError. None when there is none (a bug keeps its traceback)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE.keys() | NOT_WRITABLE.keys():
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def disk_error_line(exc: BaseException, writing: str | os.PathLike | None = None, option: str = "--out") -> str | None:
    """One line for disk_error(exc), naming the file (or else `writing`, the command's output) and the fix;
    None where exc is no such error."""
    e = disk_error(exc)
    if e is None:
        return None
    where = e.filename or writing
    if e.errno in NO_SPACE:
        return f"{NO_SPACE[e.errno]}{f' writing {where}' if where else ''}; free space there or choose another {option}"
    return (f"cannot write {where or 'the output'}: {NOT_WRITABLE[e.errno]}; choose a folder you can write to "
            f"({option}) or fix its permissions")


@contextmanager
def removed_if_failed(path: str | os.PathLike, keep=None):
    """A command's output folder: when the block fails (an error, Ctrl-C, SIGTERM) and `keep()` says it holds
    nothing of value (the default: no file in it), what the command created is removed: the folder and the
    parents it made for it. A folder that existed before the command is never removed."""
    path = Path(path).absolute()
    top, p = None, path
    while not p.exists():
        top, p = p, p.parent
    try:
        yield
    except BaseException:
        if top is not None and top.is_dir() and not (keep or (lambda: has_files(path)))():
            shutil.rmtree(top, ignore_errors=True)
        raise


def has_files(folder: str | os.PathLike) -> bool:
    return any(p.is_file() for p in Path(folder).rglob("*"))


# --------------------------------------------------------------------------- one command per output folder

LOCK_NAME = ".fastgal.lock"  # and, for a moment while it is made or taken over, .fastgal.lock.* beside it


def _proc_start(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (Linux /proc), to tell a live holder from a later
    process that was given the same pid; None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the lock's holder, a process on this host, still runs (the same process, not a reused pid)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    started = holder.get("pid_start")
    return started is None or _proc_start(pid) in (None, started)


def _who(h: dict) -> str:
    return f"`{h.get('command', 'fastgal')}` (pid {h.get('pid')} on {h.get('host')}, started {h.get('started')})"


def claim_out(out, command: str, check, stack, quiet: bool = False, tmp_prefix: str | None = None) -> None:
    """The start of a command that writes the folder `out`: refuse it if a live command holds it (that work in
    progress is not output to judge), `check()` what it holds (refusals before any work), claim it with an OutLock
    released when `stack` closes, `check()` again under the claim (another command may have finished meanwhile),
    and remove the `tmp_prefix` folders a killed run of this command left there."""
    log = Progress(quiet=quiet).line
    lock = OutLock(out, command, log=log)
    lock.refuse_if_busy()
    check()
    stack.enter_context(lock)
    check()
    gone = [p.name for p in remove_stale(out, tmp_prefix)] if tmp_prefix else []
    if gone:
        log(f"removed {len(gone)} temporary folder(s) left in {out} by an interrupted run: {', '.join(gone)}")


class OutLock:
    """OUT/.fastgal.lock: the claim of one command on an output folder, taken before anything is written
    into it and held to the end (released on success, on an error, Ctrl-C and SIGTERM; SIGKILL leaves it).

    The file is made complete (JSON: pid, host, started, command, argv) in a temp file and hard-linked into
    place: link() fails when the name exists, atomically also on NFS, where flock() is not dependable (and a
    flock names no holder). Where the filesystem has no hard links, O_CREAT|O_EXCL instead. A second command
    is refused in one line naming the holder. A lock whose holder no longer runs (its pid is gone on this
    host, or now belongs to a process started later) is stale and taken over; one from another host cannot
    be checked from here and is refused, naming the file to delete if that command is gone.
    """

    def __init__(self, out, command: str, log=None):
        self.out, self.command, self.log = Path(out), command, log
        self.path = self.out / LOCK_NAME
        self.held = False

    def _record(self) -> bytes:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
              "command": self.command, "argv": sys.argv, "pid_start": _proc_start(os.getpid())}
        return (json.dumps(me, indent=1) + "\n").encode()

    def _create(self, data: bytes) -> bool:
        """Make the lock file holding data; False if one exists."""
        fd, tmp = tempfile.mkstemp(prefix=LOCK_NAME + ".", dir=self.out)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, plain_file_mode())
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links here (some FUSE, SMB mounts): the exclusive create
                pass
        finally:
            Path(tmp).unlink(missing_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def holder(self) -> dict | None:
        """The lock file's content ({} when it cannot be read as a lock), None when there is none."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            h = json.loads(text)
        except ValueError:
            h = None
        return h if isinstance(h, dict) else {}

    def _refusal(self, h: dict) -> str:
        if not h:
            return (f"{self.out} is locked by {self.path}, which does not say who holds it; if no fastgal command "
                    f"is writing into {self.out}, delete {self.path} and run again")
        who = _who(h)
        if h.get("host") != socket.gethostname():
            return (f"{self.out} is in use by {who}; wait for it to finish, or if it is no longer running on "
                    f"{h.get('host')}, delete {self.path} and run again")
        return (f"{self.out} is in use by {who}; wait for it to finish or stop it (kill {h.get('pid')}), "
                "or choose another folder")

    def _take_over(self, h: dict) -> bool:
        """Remove the stale lock `h` unless another command replaced it meanwhile (rename, then check that
        what was renamed is the stale one; put back anything else)."""
        aside = self.out / f"{LOCK_NAME}.stale.{os.getpid()}"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return True  # someone else removed it: try again
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = {}
        if moved != h:  # a new holder's lock: put it back (link fails only if yet another exists)
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        if self.log:
            self.log(f"took over {self.path} left by `{h.get('command', 'fastgal')}` (pid {h.get('pid')}, started "
                     f"{h.get('started')}), which is no longer running")
        return True

    def acquire(self) -> OutLock:
        out = self.out
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out} exists and is not a folder; pass a folder path")
        data = self._record()
        self._mine = json.loads(data)
        for _ in range(20):
            if not out.is_dir():
                parent = next((p for p in out.parents if p.exists()), Path("."))
                if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                    raise ValueError(f"{parent} is not writable; choose a folder you can write to")
                out.mkdir(parents=True, exist_ok=True)
            if not os.access(out, os.W_OK | os.X_OK):
                raise ValueError(f"{out} is not writable; choose a folder you can write to")
            try:
                if self._create(data):
                    self.held = True
                    return self
            except FileNotFoundError:  # the folder was removed meanwhile: make it again
                continue
            h = self.holder()
            if h is None:
                continue  # released meanwhile
            if h and h.get("host") == socket.gethostname() and not _alive(h):
                self._take_over(h)
                continue
            raise ValueError(self._refusal(h))
        raise ValueError(self._refusal(self.holder() or {}))

    def release(self) -> None:
        """Remove the lock, if it is still ours."""
        if not self.held:
            return
        self.held = False
        if self.holder() == self._mine:  # never another command's (had ours been removed and replaced)
            self.path.unlink(missing_ok=True)

    def refuse_if_busy(self) -> None:
        """Refuse now if a live command holds OUT: before a command judges what OUT holds (a run, shards), as
        that is the other command's work in progress; acquire() is still what makes OUT this command's."""
        h = self.holder()
        if h is not None and not (h and h.get("host") == socket.gethostname() and not _alive(h)):
            raise ValueError(self._refusal(h))

    def busy(self) -> str | None:
        """Who holds this folder now, in words (`fastgal shard` (pid 12, on host, started ...)), or None when no
        command does (no lock, or a stale one)."""
        h = self.holder()
        if not h or (h.get("host") == socket.gethostname() and not _alive(h)):
            return None
        return _who(h)

    def __enter__(self) -> OutLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def sha256_file(path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/fastgal, else ~/.cache/fastgal (what fastgal may recompute: never results)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except (RuntimeError, KeyError):  # no home directory (a bare container user): the temp folder's
            base = Path(tempfile.gettempdir()) / f"fastgal-cache-{os.getuid() if hasattr(os, 'getuid') else 0}"
    return Path(base) / "fastgal"


class HashCache:
    """The sha256 of files, remembered by what a change of a file changes: its absolute path, size, mtime_ns,
    ctime_ns and inode (ctime cannot be set back by `touch`, and a copy is a new inode), so a folder is hashed
    once and not at every run. In one JSON file in the user's cache dir (user_cache_dir()/sha256.json), not
    beside the files: a data folder then holds exactly what made it (read-only and shared ones included), and
    a copy of it is hashed again. A cache that cannot be read is empty; one that cannot be written is skipped
    (the files are hashed again next time). What it cannot see: bytes changed in place by something that
    keeps all four (a disk's bit rot); `fastgal info` re-hashes everything, always.

        cache = HashCache(); h = cache.sha256("shards/synth/train-000000.tar"); cache.save()
    """

    FORMAT = "fastgal-sha256-cache"

    def __init__(self, path=None):
        self.path = Path(path) if path else user_cache_dir() / "sha256.json"
        self.files = self._read()
        self.changed: dict[str, dict] = {}
        self.hashed = 0  # files hashed (not found in the cache) since this cache was read

    def _read(self) -> dict:
        try:
            d = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return d["files"] if isinstance(d, dict) and d.get("format") == self.FORMAT and isinstance(d.get("files"), dict) else {}

    @staticmethod
    def _key(path) -> tuple[str, list[int]]:
        st = os.stat(path)
        return str(Path(path).resolve()), [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def get(self, path) -> str | None:
        key, sig = self._key(path)
        e = self.files.get(key)
        return e["sha256"] if isinstance(e, dict) and e.get("stat") == sig else None

    def put(self, path, sha256: str) -> None:
        key, sig = self._key(path)
        self.files[key] = self.changed[key] = {"stat": sig, "sha256": sha256}

    def sha256(self, path) -> str:
        h = self.get(path)
        if h is None:
            h = sha256_file(path)
            self.hashed += 1
            self.put(path, h)
        return h

    def save(self) -> None:
        """Write what changed, merged into the file as it is now (other commands may have added to it);
        entries of files that are gone are dropped."""
        if not self.changed:
            return
        files = {**self._read(), **self.changed}
        files = {k: v for k, v in files.items() if os.path.exists(k)}
        with contextlib.suppress(OSError):
            write_json_atomic(self.path, {"format": self.FORMAT, "version": 1, "files": files})
        self.changed = {}


# --------------------------------------------------------------------------- workers

def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


class Terminated(KeyboardInterrupt):
    """SIGTERM in a command's process: unwound as Ctrl-C is (see `stop_on_sigterm`)."""


_sigterm = {"received": False, "unwinding": False, "interrupted": False}


def stop_on_sigterm() -> None:
    """SIGTERM (a batch scheduler's time limit, torchrun stopping the other ranks, `kill`) unwinds the command
    as Ctrl-C does, instead of ending it where it stands: temporary folders (lr_find's weights), temp files of
    atomic writes and loader workers are removed, and `download` writes its report. `terminated()` then says
    so (`sigterm_unwinds` makes it exit status 143).

    A forked worker that inherits the handler dies as it would have without it. A second SIGTERM during the
    clean-up is ignored (SIGKILL still ends everything). Python swallows an exception raised where it cannot
    propagate (an at-fork hook, seen when the signal landed as a DataLoader forked its workers; a __del__):
    there the unraisable hook hands the signal back to the main thread, which then unwinds."""
    main = os.getpid()

    def handler(signum, frame):
        if os.getpid() != main:  # a forked worker (the shard pool): the default, as if never installed
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if _sigterm["unwinding"]:
            return
        if not _sigterm["received"]:
            print("fastgal: terminated (SIGTERM); cleaning up", file=sys.stderr, flush=True)
        _sigterm.update(received=True, unwinding=True)
        raise Terminated()

    previous = sys.unraisablehook

    def unraisable(u):
        if isinstance(u.exc_value, Terminated) and os.getpid() == main:
            _sigterm["unwinding"] = False
            # not from here (a handler run inside this hook is swallowed too): the signal again, to the main
            # thread, from a thread of its own a moment later
            again = threading.Timer(0.05, signal.pthread_kill, (threading.main_thread().ident, signal.SIGTERM))
            again.daemon = True
            again.start()
            return
        previous(u)

    sys.unraisablehook = unraisable
    signal.signal(signal.SIGTERM, handler)


def terminated() -> bool:
    return _sigterm["received"]


def interrupted() -> bool:
    """Whether Ctrl-C (SIGINT) reached this command's process under `sigterm_unwinds` (which said so on stderr)."""
    return _sigterm["interrupted"]


def stop_on_sigint() -> None:
    """Ctrl-C says so in one line on stderr as it arrives (the unwinding may take a moment: loader workers, a
    report), then unwinds as Python's own handler does (KeyboardInterrupt, here and in forked workers). Where
    SIGINT is not Python's own (ignored, as a background job's children inherit it, or someone else's), it stays."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return
    main = os.getpid()

    def handler(signum, frame):
        if os.getpid() == main and not _sigterm["interrupted"]:
            _sigterm["interrupted"] = True
            print("fastgal: interrupted (Ctrl-C); cleaning up", file=sys.stderr, flush=True)
        raise KeyboardInterrupt()

    signal.signal(signal.SIGINT, handler)


@contextmanager
def sigterm_unwinds():
    """A command's whole process under `stop_on_sigterm` and `stop_on_sigint`; whatever exit status click or
    the command made of the unwinding, a SIGTERM'd one exits 143 (the shell's code for SIGTERM)."""
    stop_on_sigterm()
    stop_on_sigint()
    try:
        yield
    except SystemExit:
        if terminated():
            sys.exit(128 + signal.SIGTERM)
        raise


def _quiet_worker() -> None:
    """Pool workers leave Ctrl-C to the parent (which reports and cleans up) and die quietly, without
    a BrokenPipe traceback, when the parent is gone; the pool's own SIGTERM ends them at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # A SIGKILLed parent can leave a worker waiting forever on a queue lock that a sibling held when
    # SIGPIPE ended it: watch the parent instead of relying on the pipes.
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(ppid: int) -> None:
    while os.getppid() == ppid:
        time.sleep(0.5)
    os._exit(0)


@contextmanager
def worker_pool(workers: int):
    """A process pool of `workers` (None for 1: run in this process). Fork where there is fork:
    the workers share the parent's imports instead of re-importing numpy/PIL per process."""
    if workers <= 1:
        yield None
        return
    ctx = get_context("fork" if hasattr(os, "fork") else "spawn")
    with ctx.Pool(workers, initializer=_quiet_worker) as pool:
        yield pool


def imap_ordered(fn, tasks, pool, window: int):
    """fn over tasks, results in task order; at most `window` tasks in flight, so workers run ahead
    of the consumer without piling every result of a large survey up in memory."""
    if pool is None:
        for t in tasks:
            yield fn(t)
        return
    it = iter(tasks)
    pending = deque(pool.apply_async(fn, (t,)) for t in islice(it, window))
    while pending:
        res = pending.popleft().get()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.apply_async(fn, (nxt,)))
        yield res


def plural(n: int, word: str) -> str:
    """'1 epoch', '3 epochs'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def chunks(seq, k: int) -> list:
    return [seq[a:a + k] for a in range(0, len(seq), k)]


# --------------------------------------------------------------------------- progress

class Progress:
    """The one progress writer, and its one rule for every command: a counter line on stderr with rate and
    ETA, redrawn at most 5x/s, only when stderr is a terminal (a log file would fill with redraws); whole
    lines (`line`: one per epoch, per stage, lr_find's start and result) whether or not it is one, so a batch
    job's log reads one line per step. quiet=True (--quiet) silences both; warnings and errors still show.
    """

    def __init__(self, total: int | None = None, desc: str = "", quiet: bool = False, unit: str = "it"):
        self.total, self.desc, self.unit, self.quiet = total, desc, unit, quiet
        self.tty = sys.stderr.isatty()
        self.enabled = (not quiet) and self.tty
        self.n = 0
        self.t0 = time.perf_counter()
        self._last = 0.0
        self._drawn = False

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
        self.status(msg)

    def status(self, msg: str) -> None:
        """Redraw the transient status line (terminal only)."""
        if self.enabled:
            sys.stderr.write("\r\x1b[K" + msg)
            sys.stderr.flush()
            self._drawn = True

    def line(self, msg: str) -> None:
        """A permanent line, replacing the status line if one is drawn."""
        if self.quiet:
            return
        sys.stderr.write(("\r\x1b[K" if self._drawn else "") + msg + "\n")
        sys.stderr.flush()
        self._drawn = False

    def close(self) -> None:
        if self.enabled and self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._drawn = False

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
