"""One way to write a file: atomically (temp file in the same directory, fsync, ``os.replace``).

A reader never sees a half-written file and a kill at any moment leaves the previous version in place.
Every module that writes results, caches, configs or checkpoints goes through :func:`atomic_write`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "write_json", "write_csv", "fsync_dir"]


def atomic_write(path: str | os.PathLike[str], data: str | bytes | Callable[[IO[bytes]], Any]) -> Path:
    """Write ``data`` (text as UTF-8, bytes, or a callable that writes to a binary file) to ``path``.

    The parent directory is created; the file appears under its name only once complete and synced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 1) -> Path:
    """:func:`atomic_write` of ``obj`` as JSON (non-JSON numbers such as numpy floats become floats)."""
    return atomic_write(path, json.dumps(obj, indent=indent, default=float) + "\n")


def write_csv(path: str | os.PathLike[str], header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """:func:`atomic_write` of a CSV table (a header row, then ``rows``)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return atomic_write(path, buf.getvalue())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory entry (after renames into it); a no-op where the OS does not support it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
