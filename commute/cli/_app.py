"""The Typer application object shared by the command modules."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="commute",
    help="Does the order of your training domains cost you? "
    "Lie-bracket diagnostics for multi-domain training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)  # log lines are not re-wrapped at 80 columns in CI logs
console_err = Console(stderr=True, soft_wrap=True)
