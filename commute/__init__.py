"""commute: does the order of your training domains cost you?

Lie-bracket diagnostics for multi-domain training (after "Commute Your Domains", see docs/design.md).
"""

from __future__ import annotations

from commute.bracket import bracket_projection, grad, hvp, hvps, lie_bracket
from commute.errors import CommuteError

__version__ = "0.1.0"

__all__ = ["hvp", "hvps", "grad", "lie_bracket", "bracket_projection", "CommuteError", "__version__"]


def __getattr__(name: str):  # lazy: keep `import commute` light
    if name in {"BracketEstimator", "BracketReport", "Estimate"}:
        from commute import estimate

        return getattr(estimate, name)
    if name in {"schedule_gradient", "schedule_response"}:
        from commute import response

        return getattr(response, name)
    raise AttributeError(f"module 'commute' has no attribute {name!r}")
