"""User-facing errors.

Anything a user can cause (bad schedule, unknown domain, empty corpus, missing data, mismatched
checkpoint, non-finite loss) is raised as :class:`CommuteError` with one clear sentence. The CLI prints
that sentence and exits non-zero without a traceback; the Python API lets it propagate.
"""

from __future__ import annotations

from pathlib import Path


class CommuteError(Exception):
    """An error caused by the user's input or environment, with a one-sentence message."""

    exit_code: int = 2


class NonFiniteLossError(CommuteError):
    """Training met a NaN or infinite loss; the last good checkpoint is left untouched."""

    exit_code = 3


def note_interrupt(exc: BaseException, checkpoint: Path | None) -> None:
    """Attach to a ``KeyboardInterrupt`` leaving :func:`commute.train.train` the last checkpoint written
    (or resumed from), so that :func:`interrupt_message` can name it."""
    exc.commute_checkpoint = checkpoint  # type: ignore[attr-defined]


def interrupt_message(exc: BaseException | None) -> str:
    """The one sentence the CLI prints after Ctrl-C: the last checkpoint written, if training said so."""
    if exc is None or not hasattr(exc, "commute_checkpoint"):
        return "interrupted; the last checkpoint written, if any, is intact."
    ck = exc.commute_checkpoint
    if ck is None:
        return "interrupted; no checkpoint was written yet, so running the same command again starts afresh."
    step = ck.name[5:].lstrip("0") or "0"
    return (f"interrupted; the last checkpoint written (step {step}) is intact: {ck}; run the same command "
            "again to resume from it.")
