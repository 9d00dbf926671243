"""How an exception out of a `fastgal` command becomes what a person reads: one place for every command.

    @click.group(cls=FastgalGroup)          # cli.py: every command's exceptions go through `failure`
    with user_errors(output=cfg.out):      # a command's ValueErrors become one line; what it writes is named

User errors are ClickExceptions: one line, non-zero exit. `failure` decides what any other exception becomes:
a full disk or an unwritable folder one line naming the file and the fix (exit 1), Ctrl-C and SIGTERM a line
(exit 130, 143) and, for `train`, how to resume; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager, nullcontext
from pathlib import Path

import click

from fastgal.util import disk_error_line, interrupted, removed_if_failed, terminated


class Interrupted(click.ClickException):
    """Ctrl-C or SIGTERM, unwound: its lines (the signal's own was printed as it arrived) and 130 or 143."""

    def __init__(self, lines: list[str], exit_code: int):
        super().__init__("; ".join(lines))
        self.lines, self.exit_code = lines, exit_code

    def show(self, file=None):
        for line in self.lines:
            click.echo(line, err=True)


def failure(exc: BaseException, meta: dict) -> click.ClickException | None:
    """What an exception a command let out becomes, for every command: KeyboardInterrupt (Ctrl-C) and
    Terminated (SIGTERM) a line or two and exit 130 or 143; a full disk, a quota, a read-only or forbidden
    folder, found anywhere in the exception's chain (fastai and torch wrap it), one line naming the file and the
    fix. None: a bug, which keeps its traceback. `meta` is what the command registered with `user_errors`:
    what it writes and the option that chooses it, and what to say when interrupted."""
    if isinstance(exc, KeyboardInterrupt):
        lines = [] if terminated() or interrupted() else ["fastgal: interrupted (Ctrl-C)"]  # else said as it came
        hint = meta.get("fastgal.on_interrupt")
        if hint is not None and (line := hint()):
            lines.append(line)
        return Interrupted(lines, 128 + (signal.SIGTERM if terminated() else signal.SIGINT))
    line = disk_error_line(exc, *meta.get("fastgal.output", (None, "--out")))
    return click.ClickException(line) if line else None


class FastgalGroup(click.Group):
    """The group whose every command's unhandled exceptions go through `failure` (in-process too: CliRunner)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except BaseException as e:
            mapped = failure(e, ctx.meta)
            if mapped is None:
                raise
            raise mapped from None


@contextmanager
def user_errors(writing: Path | None = None, also: tuple = (), option: str = "OUT", on_interrupt=None,
                 output: Path | None = None):
    """The library's ValueErrors (and `also`) become one-line ClickExceptions; so does any OSError of a
    command that only writes `writing` (chosen by `option`), with the fix. `output` (or `writing`) is what a
    command writes, for `failure`'s lines about a full disk or an unwritable folder; `on_interrupt` a line, or
    None, to add when Ctrl-C or SIGTERM stops it. Anything else is a bug and keeps its traceback."""
    meta = click.get_current_context().meta
    if (writing or output) is not None:
        meta["fastgal.output"] = (writing or output, option)
    if on_interrupt is not None:
        meta["fastgal.on_interrupt"] = on_interrupt
    try:
        yield
    except (ValueError, *also) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        line = disk_error_line(e, writing or output, option)
        if writing is None and line is None:
            raise
        raise click.ClickException(line or f"cannot write {writing}: {e.strerror or e}; choose a writable folder "
                                   "with free space") from None


def output_folder(out: Path, keep=None):
    """removed_if_failed for a command's output folder, on the process that writes it (rank 0 under torchrun)."""
    return removed_if_failed(out, keep) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()
