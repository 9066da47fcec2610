"""The ``commute`` command line: a thin layer over the Python API.

Each sub-module registers its commands on :data:`app` (or a sub-app); :func:`main` turns every
:class:`~commute.errors.CommuteError` into one sentence on stderr and a non-zero exit.
"""

from __future__ import annotations

import sys

from commute.cli import audit, bracket, data, demo, study, toy, train  # noqa: F401  (each registers its commands)
from commute.cli._app import app, console_err, setup_logging
from commute.errors import CommuteError, interrupt_message


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
    except KeyboardInterrupt as exc:
        console_err.print(interrupt_message(exc), highlight=False, markup=False, soft_wrap=True)
        return 130
    except MemoryError:
        console_err.print("[bold red]error:[/] out of memory; lower batch_size, seq_len, eval_batches or "
                          "the model size; checkpoints already written are kept.", highlight=False,
                          soft_wrap=True)
        return 1
    except SystemExit as exc:  # click's normal exit path (also --help and usage errors)
        interrupt = _keyboard_interrupt(exc)
        if interrupt is not None:  # typer turns Ctrl-C into exit code 130 without a word
            console_err.print(interrupt_message(interrupt), highlight=False, markup=False, soft_wrap=True)
            return 130
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        console_err.print(str(exc.code))
        return 1
    return 0


def _keyboard_interrupt(exc: BaseException) -> BaseException | None:
    """The KeyboardInterrupt that caused ``exc`` (typer raises ``Exit(130) from`` it), if any."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
