"""The Typer application object shared by the command modules."""

from __future__ import annotations

import logging

import typer
from rich.console import Console

from commute.progress import console_err as _console_err
from commute.progress import logger

app = typer.Typer(
    name="commute",
    help="Does the order of your training domains cost you? "
    "Lie-bracket diagnostics for multi-domain training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)  # log lines are not re-wrapped at 80 columns in CI logs
# the library's stderr console (progress bars), shared so bars and log lines do not interleave badly
console_err = _console_err


class _ConsoleHandler(logging.Handler):
    """Shows the library's ``commute`` log records (INFO and up) as plain lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        console_err.print(record.getMessage(), highlight=False, markup=False)


def setup_logging(level: int = logging.INFO) -> None:
    """Route the ``commute`` logger to stderr once (the library itself only logs)."""
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
    logger.setLevel(level)


def _version(value: bool) -> None:
    if value:
        from commute import __version__

        console.print(f"commute {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Does the order of your training domains cost you? Lie-bracket diagnostics for multi-domain training."""
