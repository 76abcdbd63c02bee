"""Process-wide settings that make PyTorch's CPU path fast.

PyTorch on the CPU allocates every tensor with the C library's malloc. glibc serves blocks above a threshold
(128 KiB at first) with fresh pages from the kernel and hands freed memory back once the top of the heap has
a few hundred KiB free, so a loop whose step allocates and frees a few MB-sized activations takes a page
fault for every 4 KiB of them, every step. On the 2-core machine a batch-256 dream step spent about a third
of its time there. `keep_freed_memory` asks malloc to keep freed memory for reuse instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
"""Blocks below this come from the heap and are reused (32 MiB: glibc's largest allowed threshold)."""
TRIM_THRESHOLD = 1 << 30
"""Free memory at the top of the heap is handed back to the kernel only above this."""
OPT_OUT = "WORLDMODEL_KEEP_FREED_MEMORY"
"""Set to 0 to leave malloc as it is."""

_applied = False


def keep_freed_memory() -> bool:
    """Keep freed memory in the process for reuse (glibc's `mallopt`); True when malloc took the settings.

    The cost is that the process holds on to the memory of its busiest moment until it exits, instead of
    shrinking after it. No effect (False) outside glibc, or with WORLDMODEL_KEEP_FREED_MEMORY=0. Called by the
    `worldmodel` command and by the dream env on the CPU; calling it again does nothing."""
    global _applied
    if _applied:
        return True
    if os.environ.get(OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
