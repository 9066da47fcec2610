"""User-facing errors.

Anything a user can cause (bad schedule, unknown domain, empty corpus, missing data, mismatched
checkpoint, non-finite loss) is raised as :class:`CommuteError` with one clear sentence. The CLI prints
that sentence and exits non-zero without a traceback; the Python API lets it propagate.
"""

from __future__ import annotations


class CommuteError(Exception):
    """An error caused by the user's input or environment, with a one-sentence message."""

    exit_code: int = 2


class NonFiniteLossError(CommuteError):
    """Training met a NaN or infinite loss; the last good checkpoint is left untouched."""

    exit_code = 3
