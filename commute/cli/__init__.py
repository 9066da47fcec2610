"""The ``commute`` command line: a thin layer over the Python API.

Each sub-module registers its commands on :data:`app` (or a sub-app); :func:`main` turns every
:class:`~commute.errors.CommuteError` into one sentence on stderr and a non-zero exit.
"""

from __future__ import annotations

import sys

from commute.cli import bracket, data, demo, study, toy, train  # noqa: F401  (each registers its commands)
from commute.cli._app import app, console_err, setup_logging
from commute.errors import CommuteError


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``commute`` console script.

    Typer runs in standalone mode, so usage errors (bad option values, unknown commands) are printed
    by click with exit code 2; a :class:`CommuteError` from the API becomes one sentence on stderr.
    """
    setup_logging()
    try:
        app(args=argv, prog_name="commute", standalone_mode=True)
    except CommuteError as exc:
        console_err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except OSError as exc:  # a path the user gave cannot be read or written
        where = f" ({exc.filename})" if exc.filename else ""
        console_err.print(f"[bold red]error:[/] {exc.strerror or exc}{where}; files already written are "
                          "kept.", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        console_err.print("[bold red]interrupted[/]: the last checkpoint written is intact.")
        return 130
    except SystemExit as exc:  # click's normal exit path (also --help and usage errors)
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        console_err.print(str(exc.code))
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
