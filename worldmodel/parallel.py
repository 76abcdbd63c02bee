"""Run independent tasks in worker processes (spawned, so no forked torch or SDL state), results as they finish."""

from __future__ import annotations

import multiprocessing as mp
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
            f"a worker process running {name} ended without an answer (killed, out of memory, or a crash in native"
            f" code; a script that starts workers needs `if __name__ == '__main__':`): {err}"
        ) from err
    finally:
        if not finished:
            # stopped early (an error, the caller's break or Ctrl-C): end the running and queued tasks now, as
            # Pool.terminate did; shutdown alone would let each run its whole episode first
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
