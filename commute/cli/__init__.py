"""The ``commute`` command line: a thin layer over the Python API.

Each sub-module registers its commands on :data:`app` (or a sub-app); :func:`main` turns every
:class:`~commute.errors.CommuteError` into one sentence on stderr and a non-zero exit.
"""

from __future__ import annotations

import sys

from commute.cli._app import app, console_err
from commute.errors import CommuteError

# Sub-modules register their commands on import.
from commute.cli import demo as _demo  # noqa: F401,E402

for _name in ("toy", "data", "train", "study", "bracket"):
    try:
        __import__(f"commute.cli.{_name}")
    except ModuleNotFoundError as exc:  # a command group that is not written yet
        if exc.name != f"commute.cli.{_name}":
            raise


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``commute`` console script."""
    try:
        app(args=argv, prog_name="commute", standalone_mode=False)
    except CommuteError as exc:
        console_err.print(f"[bold red]error:[/] {exc}", highlight=False)
        return exc.exit_code
    except KeyboardInterrupt:
        console_err.print("[bold red]interrupted[/]: the last checkpoint written is intact.")
        return 130
    except SystemExit as exc:  # typer/click exits (--help, usage errors)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except Exception as exc:  # click usage errors arrive as ClickException in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.Abort):
            return 130
        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
