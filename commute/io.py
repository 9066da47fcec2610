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

__all__ = ["atomic_write", "write_json", "write_csv", "fsync_dir", "read_text", "read_yaml",
           "check_unique_keys"]


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


class JsonRoundTrip:
    """``to_json`` / ``from_json`` around a class's ``to_dict`` / ``from_dict``: an atomic write, and a read
    whose failure is one sentence naming ``json_kind``."""

    json_kind = "file"

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write ``to_dict()`` as JSON (atomically, :func:`atomic_write`)."""
        return atomic_write(path, json.dumps(self.to_dict(), indent=1) + "\n")  # type: ignore[attr-defined]

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Any:
        """The object of ``from_dict`` on the JSON at ``path``."""
        from commute.errors import CommuteError

        try:
            return cls.from_dict(json.loads(Path(path).read_text()))  # type: ignore[attr-defined]
        except (OSError, json.JSONDecodeError) as e:
            raise CommuteError(f"cannot read {cls.json_kind} {str(path)!r}: {e}.") from None


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


# --------------------------------------------------------------------------------------------------
# reading a file the user gave: one sentence for every way it can be wrong
# --------------------------------------------------------------------------------------------------
def read_text(path: str | os.PathLike[str], what: str) -> str:
    """The UTF-8 text of ``path``; :class:`~commute.errors.CommuteError` (one sentence naming ``what``) when
    it does not exist or is not UTF-8."""
    from commute.errors import CommuteError

    path = Path(path)
    if not path.is_file():
        raise CommuteError(f"{what} does not exist.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CommuteError(f"{what} is not UTF-8 text (byte {exc.start}).") from None


def read_yaml(path: str | os.PathLike[str], what: str) -> Any:
    """A YAML file parsed with ``yaml.safe_load`` only, a key given twice refused
    (:func:`check_unique_keys`); every failure (missing, not UTF-8, not YAML, nested too deeply) is one
    sentence naming ``what``."""
    import yaml

    from commute.errors import CommuteError

    text = read_text(path, what)
    try:
        check_unique_keys(text, what)
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CommuteError(f"{what} is not valid YAML: {first}.") from None
    except RecursionError:
        raise CommuteError(f"{what} is nested too deeply to read.") from None


def check_unique_keys(text: str, where: str) -> None:
    """Refuse a YAML mapping that gives a key twice (``yaml.safe_load`` silently keeps the last one).

    Walks the node graph of ``yaml.compose`` with the safe loader (nothing is constructed); raises a
    one-sentence :class:`CommuteError` naming the key and its line.
    """
    import yaml

    from commute.errors import CommuteError

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    stack, seen = [root] if root is not None else [], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:  # aliases share nodes
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[Any] = set()
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in keys:
                        raise CommuteError(f"{where} gives {k.value!r} twice (line {k.start_mark.line + 1}); "
                                           "keep one.")
                    keys.add(k.value)
                stack += [k, v]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value
