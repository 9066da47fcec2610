"""One progress helper and the library's logger.

The library never prints: it logs to the ``commute`` logger (the CLI shows those records on stderr) and
draws rich progress bars on stderr through :class:`Progress`. When stderr is not a terminal (output
redirected to a file, CI), a bar draws nothing, so :meth:`Progress.describe` also logs what is being
done, one line per stage.
"""

from __future__ import annotations

import logging
from typing import Any

from rich.console import Console

__all__ = ["logger", "console_err", "Progress"]

logger = logging.getLogger("commute")
#: stderr console shared by the progress bars and the CLI (soft wrap: log lines are not re-wrapped)
console_err = Console(stderr=True, soft_wrap=True)


class Progress:
    """A rich progress bar over ``total`` units of work, or nothing when ``enabled`` is false.

    Use as a context manager; :meth:`advance` counts work, :meth:`describe` names the current stage (and
    logs it when the console is not a terminal), :meth:`info` sets a trailing status text (e.g. a loss).
    """

    def __init__(self, description: str, total: int, *, enabled: bool = True, completed: int = 0,
                 unit: str = "", eta: bool = True, transient: bool = False) -> None:
        self.enabled = enabled
        self.description = description
        self._args = (total, completed, unit, eta, transient)
        self._p: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            total, completed, unit, eta, transient = self._args
            cols: list[Any] = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
            if unit:
                cols.append(TextColumn(unit))
            cols.append(TimeRemainingColumn() if eta else TimeElapsedColumn())
            cols.append(TextColumn("{task.fields[info]}"))
            self._p = RichProgress(*cols, console=console_err, transient=transient)
            self._p.start()
            self._task = self._p.add_task(self.description, total=total, completed=completed, info="")
            if not console_err.is_terminal:
                logger.info(self.description)
        return self

    def advance(self, n: float = 1) -> None:
        if self._p is not None:
            self._p.advance(self._task, n)

    def update(self, completed: float) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=completed)

    def describe(self, text: str) -> None:
        if self._p is not None:
            self._p.update(self._task, description=text)
            if not console_err.is_terminal:
                logger.info(text)

    def info(self, text: str) -> None:
        if self._p is not None:
            self._p.update(self._task, info=text)

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.stop()
