"""Run independent tasks in worker processes (spawned, so no forked torch or SDL state), results as they finish."""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

Task = TypeVar("Task")
Result = TypeVar("Result")


class WorkerDied(RuntimeError):
    """A worker process ended without answering its task: killed, out of memory, or a crash in native code."""


def imap_unordered(fn: Callable[[Task], Result], tasks: Iterable[Task], workers: int) -> Iterator[Result]:
    """`fn` over `tasks` in `workers` processes (inline when workers <= 1), each result as soon as it is ready. A
    worker that dies stops the whole with `WorkerDied` at once (`multiprocessing.Pool` would start another worker
    and wait for the lost task's answer forever); a task that raises re-raises here. Either way, or when the caller
    stops early, the running tasks are ended, the others dropped, and the workers exit."""
    tasks = list(tasks)
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=mp.get_context("spawn"))
    finished = False
    try:
        for future in as_completed([pool.submit(fn, task) for task in tasks]):
            yield future.result()
        finished = True
    except BrokenProcessPool as err:
        name = getattr(fn, "__name__", repr(fn))
        raise WorkerDied(
            f"a worker process running {name} ended without an answer{_how_workers_ended(pool)}. Workers are lost"
            f" when killed, out of memory or crashing in native code; a script that starts workers needs"
            f" `if __name__ == '__main__':`. ({err})"
        ) from err
    finally:
        if not finished:
            # stopped early (an error, the caller's break or Ctrl-C): end the running and queued tasks now, as
            # Pool.terminate did; shutdown alone would let each run its whole episode first
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def _how_workers_ended(pool: ProcessPoolExecutor) -> str:
    """How the workers ended, as " (SIGKILL, ...)" ("" when none had): the signal or exit code tells the OOM
    killer (SIGKILL) from a crash (SIGSEGV) or an exit. Once one dies the executor terminates the others with
    SIGTERM, which is named only when nothing else is. It reads the executor's private `_processes` (no public
    way)."""
    endings = set()
    deadline = time.monotonic() + 5.0
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        # the executor's thread is ending them and may reap one first, when its code reads None here for a moment
        while process.exitcode is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if process.exitcode:
            endings.add(_ending(process.exitcode))
    if len(endings) > 1:
        endings.discard("SIGTERM")
    return f" ({'; '.join(sorted(endings))})" if endings else ""


def _ending(code: int) -> str:
    """A process's exit code in words: "exit code 3", or the signal that ended it (a negative code)."""
    if code > 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:  # real-time signals have no name in `signal.Signals`
        return f"signal {-code}"
    return f"{name}: the out-of-memory killer's signal, or kill -9" if -code == signal.SIGKILL else name
