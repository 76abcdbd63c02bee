"""Run independent tasks in worker processes (spawned, so no forked torch or SDL state), results as they finish."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

Task = TypeVar("Task")
Result = TypeVar("Result")


def imap_unordered(fn: Callable[[Task], Result], tasks: Iterable[Task], workers: int) -> Iterator[Result]:
    """`fn` over `tasks` in `workers` processes (inline when workers <= 1); workers exit cleanly when done."""
    tasks = list(tasks)
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    pool = mp.get_context("spawn").Pool(min(workers, len(tasks)))
    try:
        yield from pool.imap_unordered(fn, tasks)
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()
