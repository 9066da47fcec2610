"""commute: does the order of your training domains cost you?

Lie-bracket diagnostics for multi-domain training (after "Commute Your Domains", see docs/design.md).
"""

from __future__ import annotations

from commute.bracket import bracket_projection, grad, hvp, hvps, lie_bracket
from commute.errors import CommuteError

__version__ = "0.1.0"

__all__ = ["hvp", "hvps", "grad", "lie_bracket", "bracket_projection", "CommuteError", "__version__"]


#: lazily imported public names -> their module (``import commute`` stays light)
_LAZY = {
    **dict.fromkeys(("BracketEstimator", "BracketReport", "TournamentReport", "Estimate"), "estimate"),
    **dict.fromkeys(("schedule_gradient", "schedule_response"), "response"),
    **dict.fromkeys(("ResponseEstimator", "ResponseReport"), "response_estimator"),
    **dict.fromkeys(("BracketMonitor", "CommuteCallback"), "callbacks"),
    "bracket_at": "audit",
    "audit_run": "audit",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"commute.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'commute' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
