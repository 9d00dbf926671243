"""fastgal.cli's one rule for failures (`failure`, issue #33 item 3): every failure a user can cause or meet is
one line naming the file or folder and the fix; a full disk or an unwritable folder (found anywhere in the
exception's chain), Ctrl-C (exit 130, with train's --resume hint), a CUDA device that is not there (the API
too); a command that fails removes the output folder it created while it holds nothing of value; a bug keeps
its traceback."""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

TRAIN = ("--epochs", "2", "--bs", "32", "--arch", "xresnet18", "--size", "32", "--quiet", "--workers", "1")
# a folder even root cannot create files in (sysfs): chmod does not stop root, and the tests run as root
READ_ONLY = Path("/sys/fastgal-test")


def _sys_is_read_only() -> bool:
    try:
        READ_ONLY.mkdir()
    except OSError:
        return True
    READ_ONLY.rmdir()
    return False


needs_read_only = pytest.mark.skipif(not _sys_is_read_only(), reason="no folder here that this user cannot write (/sys)")


def _one_line(res) -> str:
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


class _FullDisk(io.RawIOBase):
    """A file on a disk with room for ROOM more bytes: the write past it fails as a full disk's does."""

    ROOM = 2000

    def __init__(self, f):
        self.f, self.n = f, 0

    def writable(self):
        return True

    def write(self, b):
        if self.n + len(b) > self.ROOM:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.n += len(b)
        return self.f.write(b)


def test_a_full_disk_in_training_is_one_line_and_removes_the_run_folder(small_shards, tmp_path, monkeypatch):
    """The tester's case: the disk fills while fastai's BestEpoch callback saves the first epoch's weights.
    torch turns the write's ENOSPC into `RuntimeError: unexpected pos`, fastai wraps it as `Exception occured in
    BestEpoch`; the user reads one line naming the file and the fix, and the run folder, which finished no
    epoch, is gone (it would only hold the disk's last bytes)."""
    import torch

    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, **kw: real(obj, _FullDisk(f), **kw))
    run = tmp_path / "new" / "r"
    res = run_cli("train", small_shards, "--out", run, *TRAIN, ok=False)
    assert res.exit_code == 1
    line = _one_line(res)
    assert line.startswith(f"Error: no space left on device writing {run}") and line.endswith(
        "; free space there or choose another --out"), line
    assert ".tmp" not in line  # the file being written, not its temp name
    assert not (tmp_path / "new").exists()  # the folders train created, with what they held


def test_disk_errors_are_found_behind_wrappers_and_bugs_are_not():
    from fastgal.util import disk_error, disk_error_line

    def chained():
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as e:
            raise RuntimeError("unexpected pos 19520 vs 19414") from e

    with pytest.raises(RuntimeError) as caught:
        chained()
    assert disk_error(caught.value).errno == errno.EDQUOT
    assert disk_error_line(caught.value, "runs/r") == "disk quota exceeded writing runs/r; free space there or choose another --out"
    assert disk_error(RuntimeError("a bug")) is None and disk_error(FileNotFoundError(errno.ENOENT, "x")) is None
    e = PermissionError(errno.EROFS, "Read-only file system", "out/x.csv")
    assert disk_error_line(e, option="OUT") == ("cannot write out/x.csv: read-only file system; choose a folder you can "
                                                "write to (OUT) or fix its permissions")


def test_a_bug_keeps_its_traceback(small_shards, tmp_path, monkeypatch):
    import fastgal.run

    def bug(*args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(fastgal.run, "setup", bug)
    with pytest.raises(ZeroDivisionError):
        run_cli("train", small_shards, "--out", tmp_path / "r", ok=False)


@needs_read_only
@pytest.mark.parametrize("command", ["train", "synth", "shard", "download", "demo", "predict"])
def test_an_unwritable_output_is_refused_before_any_work(command, small_shards, survey, tmp_path, monkeypatch, request):
    """Root passes os.access on /sys, and its writes fail: the probe is a real file. `predict` refuses before
    scoring anything (it used to fail writing its CSV after all its work)."""
    out = READ_ONLY / "out"
    if command == "predict":
        from fastgal.score import predict

        monkeypatch.setattr(predict, "predict_table", lambda *a: pytest.fail("predict worked before checking --out"))
    args = {"train": ["train", small_shards, "--out", out, *TRAIN],
            "synth": ["synth", out, "--n", 10],
            "shard": ["shard", survey / "data/master.csv", survey / "images", out],
            "download": ["download", out, "--limit", 3, "--base-url", "http://127.0.0.1:9"],
            "demo": ["demo", "--out", out],
            "predict": ["predict", request.getfixturevalue("small_run") if command == "predict" else None,
                        small_shards, "--out", out / "p.csv"]}[command]
    res = run_cli(*args, ok=False)
    assert res.exit_code == 1
    fix = "choose a folder you can write to" if command in ("synth", "shard") else "choose a"
    assert _one_line(res).startswith(f"Error: {READ_ONLY.parent} is not writable (Permission denied); {fix}"), res.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 folder anyway (the /sys test covers root)")
def test_a_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    res = run_cli("synth", ro / "s", "--n", 10, ok=False)
    assert _one_line(res) == f"Error: {ro} is not writable; choose a folder you can write to"


def test_a_read_only_file_system_at_the_write_is_one_line(small_run, small_shards, tmp_path, monkeypatch):
    """What the checks before the work cannot see (a disk remounted read-only mid-run) is still one line."""
    from fastgal.score import predict

    def read_only(path, data):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(predict, "write_bytes_atomic", read_only)
    out = tmp_path / "p.csv"
    res = run_cli("predict", small_run, small_shards, "--out", out, ok=False)
    assert res.exit_code == 1
    assert _one_line(res) == (f"Error: cannot write {out}: read-only file system; choose a folder you can write to "
                              "(--out) or fix its permissions")


def test_a_failed_command_removes_only_the_folders_it_created(small_shards, tmp_path):
    """`train --size 200` on 72 px crops, `download` with no network: nothing of value, no folder left; a folder
    that was there before stays."""
    res = run_cli("train", small_shards, "--out", tmp_path / "a" / "r", "--size", 200, ok=False)
    assert "crop sizes do not fit" in _one_line(res) and not (tmp_path / "a").exists()
    (tmp_path / "mine").mkdir()
    run_cli("train", small_shards, "--out", tmp_path / "mine", "--size", 200, ok=False)
    assert (tmp_path / "mine").is_dir()
    res = run_cli("download", tmp_path / "d" / "x", "--limit", 3, "--base-url", "http://127.0.0.1:9", "--retries", 0,
                  "--timeout", 1, "--query-timeout", 1, ok=False)
    assert "cannot reach http://127.0.0.1:9" in _one_line(res) and not (tmp_path / "d").exists()


def test_the_api_checks_the_device_where_it_is_given(small_shards, monkeypatch):
    """README's `fastgal.dataloaders(..., device="cuda")` on a machine without one: a one-line ValueError there,
    not a DALI traceback at the first batch."""
    import torch

    import fastgal

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device='cuda' but no CUDA GPU is visible to torch; use device='cpu'$"):
        fastgal.dataloaders(small_shards, bs=32, size=32, device="cuda")
    with pytest.raises(ValueError, match="no CUDA GPU is visible to torch"):
        fastgal.predict(Path("no-such-run"), small_shards, device="cuda:0")
    dls = fastgal.dataloaders(small_shards, bs=32, size=32, threads=1)  # cpu, as before
    assert dls.device.type == "cpu"


@pytest.mark.slow
def test_ctrl_c_in_training_exits_130_and_says_how_to_resume(small_shards, tmp_path):
    """SIGINT after the 2nd batch of the 2nd epoch: one line as it lands, one saying --resume continues from the
    last finished epoch; exit 130 (was: `Aborted!`, exit 1)."""
    run = tmp_path / "r"
    kill = Path(__file__).with_name("kill_after.py")
    p = subprocess.run([sys.executable, str(kill), "1", "2", "SIGINT", "train", str(small_shards), "--out", str(run),
                        *TRAIN], capture_output=True, text=True, timeout=600, check=False,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not a background job's SIG_IGN
    assert p.returncode == 130, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("fastgal:")]
    hint = f"fastgal: {run} keeps the last finished epoch; the same command with --out {run} --resume continues from it"
    assert lines == ["fastgal: interrupted (Ctrl-C); cleaning up", hint], p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "Aborted" not in p.stderr
    assert (run / "checkpoint.pth").is_file()
