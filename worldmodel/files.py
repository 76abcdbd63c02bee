"""Atomic writes: every file or folder the project saves is written under a temporary name in its own folder and
renamed into place, so a reader (or a run resumed after a crash) sees the old version or the new one, never half of
one. The one helper, `atomic_path`, also gives the result the permissions an ordinary `open()` would have (the
umask's), where `tempfile` would leave them readable by their owner only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    # os.umask can only be read by setting it; set it straight back, once, at import (threads may be writing later)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str | Path, *, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (a file, or an empty folder with `folder=True`) for the caller to fill;
    on a clean exit its contents are flushed to disk, it gets the permissions a new file or folder would get from
    the umask (or those of the file it replaces), and it is renamed over `path`. On an error it is removed and
    `path` is left as it was. The temporary name keeps `path`'s suffix, so writers that choose the format by the
    extension (matplotlib, imageio) write the right one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    if folder:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=".tmp"))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp" + path.suffix)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if folder:
            for child in tmp.rglob("*"):
                if child.is_file():
                    _fsync(child)
            os.chmod(tmp, 0o777 & ~UMASK)
            if path.exists():
                shutil.rmtree(path)
        else:
            _fsync(tmp)
            mode = path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~UMASK
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None (null): JSON has no such numbers."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON atomically. NaN and infinities are written as null (`json_safe`), so the file is standard JSON."""
    write_text_atomic(path, json.dumps(json_safe(data), indent=2, allow_nan=False))


def save_figure_atomic(fig: Any, path: str | Path, **savefig: Any) -> None:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, **savefig)
    finally:
        plt.close(fig)
