"""fastgal.util: what every command shares and no other test reaches on its own; here SIGTERM's unwinding
(`stop_on_sigterm`) where Python would swallow it. The commands' own SIGTERM tests are in test_train.py,
test_download.py and test_gpu_check.py."""

from __future__ import annotations

import subprocess
import sys

PROLOGUE = """
import os, signal, sys, time
from fastgal.util import Terminated, stop_on_sigterm, terminated
stop_on_sigterm()
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROLOGUE + code], capture_output=True, text=True, timeout=120)


def test_sigterm_swallowed_in_an_at_fork_hook_still_unwinds():
    """Found in the GPU check's dry run: a timeout's SIGTERM landed while a DataLoader forked its workers; the
    Terminated raised in logging's at-fork hook was printed as 'Exception ignored' and the run went on, so the
    SIGKILL 2 s later left its temp folder behind. It is handed back to the main thread instead."""
    res = _run("""
os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGTERM))
try:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    for _ in range(50):
        time.sleep(0.02)
    print("went on")
except Terminated:
    print("unwound", terminated())
""")
    assert res.stdout.split() == ["unwound", "True"], res.stdout + res.stderr
    assert res.stderr.count("terminated (SIGTERM)") == 1, res.stderr  # said once, though delivered twice


def test_a_forked_child_dies_of_sigterm_as_without_the_handler_and_a_second_one_is_ignored():
    res = _run("""
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(w, b"x")  # a signal in fork's own aftermath is dropped by Python (pending signals are cleared)
    time.sleep(30)
    os._exit(0)
os.read(r, 1)
os.kill(pid, signal.SIGTERM)
_, status = os.waitpid(pid, 0)
print("child", os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM)
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1)
except Terminated:
    try:  # the clean-up: a second SIGTERM does not interrupt it
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        print("cleaned up")
    except Terminated:
        print("interrupted the clean-up")
""")
    assert res.stdout.split() == ["child", "True", "cleaned", "up"], res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
