"""Atomic writes: every file or folder the project saves is written under a temporary name in its own folder and
renamed into place, so a reader (or a run resumed after a crash) sees the old version or the new one, never half of
one (a folder being replaced is moved aside for the instant between two renames, and an error puts it back). The
one helper, `atomic_path`, also gives the result the permissions of what it replaces, or those an ordinary
`open()` would give (the umask's), where `tempfile` would leave them readable by their owner only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
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


def _fsync_folder(path: Path) -> None:
    """Make a rename in `path` durable (POSIX; where a folder cannot be opened for it, nothing to do)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_folder(new: Path, path: Path) -> None:
    """Rename `new` to `path`; an existing `path` is moved aside first and removed once `new` is in its place, or
    put back if that rename fails, so an error never loses both."""
    if not path.exists():
        os.replace(new, path)
        return
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
    os.replace(path, aside / path.name)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(aside / path.name, path)
        aside.rmdir()
        raise
    shutil.rmtree(aside)


class UnwritablePath(ValueError):
    """An output path that cannot be written: a folder where a file goes, a file where a folder goes, a file among
    the folders above it, or a folder this process may not write in."""


def check_output_place(path: str | Path, *, folder: bool = False) -> Path:
    """`path` if a file (or, with `folder`, a folder) can be written there; `UnwritablePath` saying why not. Cheap:
    commands check their outputs with it before any work."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise UnwritablePath(f"{path} is a {'file' if folder else 'folder'}; give a {'folder' if folder else 'file'}")
    above = next((parent for parent in path.parents if parent.exists()), Path("."))
    if not above.is_dir():
        raise UnwritablePath(f"{above} is a file, so {path} cannot be written below it")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UnwritablePath(f"{path} cannot be written: this process may not write in {above}")
    return path


@contextmanager
def atomic_path(path: str | Path, *, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (a file, or an empty folder with `folder=True`) for the caller to fill;
    on a clean exit its contents are flushed to disk, it gets the permissions of what it replaces (or those a new
    file or folder gets from the umask), and it is renamed over `path`. On an error it is removed and `path` is
    left as it was. The temporary name keeps `path`'s suffix, so writers that choose the format by the extension
    (imageio, PIL) write the right one."""
    path = check_output_place(path, folder=folder)
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
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.is_dir() else 0o777 & ~UMASK)
            _replace_folder(tmp, path)
        else:
            _fsync(tmp)
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~UMASK)
            os.replace(tmp, path)
        _fsync_folder(path.parent)
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


class DamagedFile(ValueError):
    """A file this project wrote and reads back (a run's results, summary, scores) that no longer parses."""


def read_json(path: str | Path, missing: Any = None) -> Any:
    """A JSON file's contents, or `missing` where there is no file; a file that does not parse (cut short, or
    edited by hand) is a `DamagedFile` naming it, not a traceback from the JSON parser, and so is one that holds
    something else than an object where `missing` is one (`{}`: the caller reads it by keys)."""
    path = Path(path)
    if not path.is_file():
        return missing
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedFile(
            f"{path} is not readable JSON ({err}); restore it, or move it away to redo what it recorded"
        ) from None
    if isinstance(missing, dict) and not isinstance(data, dict):
        raise DamagedFile(
            f"{path} holds a JSON {type(data).__name__}, not the object expected; restore it, or move it away to"
            " redo what it recorded"
        )
    return data


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON atomically. NaN and infinities are written as null (`json_safe`), so the file is standard JSON."""
    write_text_atomic(path, json.dumps(json_safe(data), indent=2, allow_nan=False))


def save_figure_atomic(fig: Any, path: str | Path, **savefig: Any) -> None:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    savefig.setdefault("format", path.suffix[1:] or "png")  # the temporary name ends in .tmp without a suffix
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, **savefig)
    finally:
        plt.close(fig)
