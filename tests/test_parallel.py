"""Worker processes: results as they finish, a task's error, and a worker that dies."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from worldmodel.parallel import WorkerDied, imap_unordered


def test_every_task_is_answered_once_in_workers_and_inline():
    tasks = [0.0, 1.0, 4.0, 9.0, 16.0]
    assert sorted(imap_unordered(math.sqrt, tasks, workers=2)) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert list(imap_unordered(math.sqrt, tasks, workers=1)) == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_a_task_that_raises_raises_in_the_caller():
    with pytest.raises(ValueError, match="math domain error"):
        list(imap_unordered(math.sqrt, [4.0, -1.0, 9.0], workers=2))


def test_a_caller_that_stops_early_does_not_wait_for_the_running_tasks():
    results = imap_unordered(time.sleep, [0.0, 60.0, 60.0, 60.0], workers=2)
    assert next(results) is None  # the instant task; a 60 s one is running, the others queued
    began = time.monotonic()
    results.close()  # as a break, an error in the caller's loop or Ctrl-C would
    assert time.monotonic() - began < 20  # ended, not run out (60 s each)


def test_a_worker_that_dies_stops_the_caller_instead_of_leaving_it_waiting():
    # os._exit ends the worker without an answer, as the kernel's OOM killer or a segfault would; in a child process
    # of its own, so that the old behaviour (waiting forever) fails by the timeout rather than hanging the suite
    code = "from worldmodel.parallel import imap_unordered; import os; print(list(imap_unordered(os._exit, [3, 3], 2)))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("the caller was still waiting for the dead worker's answer after 120 s")
    assert done.returncode != 0 and "WorkerDied" in done.stderr and "_exit" in done.stderr, done.stderr[-2000:]
    assert "(exit code 3)" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize(
    ("sig", "said"), [("SIGKILL", "SIGKILL: the out-of-memory killer's signal"), ("SIGSEGV", "SIGSEGV")]
)
def test_a_worker_killed_by_a_signal_is_reported_with_the_signal(sig, said):
    # the OOM killer sends SIGKILL; a crash in native code ends with SIGSEGV: the message tells which
    with pytest.raises(WorkerDied, match=re.escape(f"ended without an answer ({said}")):
        list(imap_unordered(signal.raise_signal, [getattr(signal, sig)] * 2, workers=2))
