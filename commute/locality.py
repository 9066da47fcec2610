"""The locality sweep: how the bracket's prediction fares as γ·T·λ_max grows, with no sampling noise.

From one checkpoint, deterministic full-batch gradient descent in float64 on fixed batches per domain runs
the eq. (9) intervention (θ12, θ21) and the base for several T at one γ, and compares the observed
antisymmetric excess with γ²ΔwT²P (docs/design.md §1). The ratio → 1 as γTλ_max → 0.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from commute.bracket import antisymmetric_excess, grad, intervention_excess, lie_bracket, tree_dot
from commute.curvature import domain_losses, gd_steps, hessian_lambda_max, mix_loss, model_params

__all__ = ["locality_sweep"]


# --------------------------------------------------------------------------------------------------
def locality_sweep(
    model: torch.nn.Module,
    batches: Mapping[str, Sequence[Tensor]],
    base: Mapping[str, float],
    delta_w: float,
    T_grid: Sequence[int],
    lr: float | None = None,
    lr_times_lambda: float = 0.001,
    lambda_iters: int = 20,
    dtype: torch.dtype = torch.float64,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Observed vs predicted reordering effect under exact (deterministic) gradient descent.

    From θ = the model's parameters (cast to ``dtype``), with fixed batches per domain (no sampling
    noise) and our own float64 cross-entropy: θ12 = T steps at w_1 = base_1 + Δw then T at base_1 − Δw;
    θ21 the mirror; θ_base = 2T steps at ``base``. For each T in ``T_grid`` returns EL_i^12, EL_i^21,
    the antisymmetric part and its ratio to γ² Δw T² P(L_1, L_2; L_i), with P computed exactly on the
    same batches by :func:`commute.bracket.lie_bracket`. The ratio → 1 as γ T λ_max → 0.
    ``lr=None`` picks γ = lr_times_lambda / λ_max.
    """
    (d1, d2) = tuple(batches)
    m = copy.deepcopy(model).to(dtype)
    p0 = model_params(m, dtype)
    losses = domain_losses(m, batches, dtype)
    lam = hessian_lambda_max(mix_loss(losses, base), p0, iters=lambda_iters)
    if lr is None:
        lr = lr_times_lambda / abs(lam)
    r = lie_bracket(losses[d1], losses[d2], p0)
    P = {k: float(tree_dot(r, grad(losses[k], p0))) for k in (d1, d2)}
    w12a = {d1: base[d1] + delta_w, d2: base[d2] - delta_w}
    w12b = {d1: base[d1] - delta_w, d2: base[d2] + delta_w}
    rows = []
    Ts = sorted(set(int(t) for t in T_grid), reverse=True)

    def evaluate(p: dict[str, Tensor]) -> dict[str, float]:
        with torch.no_grad():
            return {k: float(losses[k](p)) for k in (d1, d2)}

    for T in Ts:
        if progress:
            progress(f"locality sweep T={T}")
        base_p = gd_steps(mix_loss(losses, base), p0, lr, 2 * T)
        p12 = gd_steps(mix_loss(losses, w12b), gd_steps(mix_loss(losses, w12a), p0, lr, T), lr, T)
        p21 = gd_steps(mix_loss(losses, w12a), gd_steps(mix_loss(losses, w12b), p0, lr, T), lr, T)
        lb, l12, l21 = evaluate(base_p), evaluate(p12), evaluate(p21)
        row: dict[str, Any] = {"T": T, "gammaT": lr * T, "locality": lr * T * abs(lam)}
        for k in (d1, d2):
            el12, el21 = l12[k] - lb[k], l21[k] - lb[k]
            pred = intervention_excess(P[k], delta_w, T, lr)
            anti = antisymmetric_excess(el12, el21)
            row[k] = {"EL12": el12, "EL21": el21, "antisym": anti, "pred": pred,
                      "ratio": anti / pred if pred != 0 else math.nan}
        rows.append(row)
    return {"lr": lr, "lambda_max": lam, "delta_w": delta_w, "base": dict(base), "P": P,
            "domains": [d1, d2], "rows": rows, "L0": evaluate(p0)}


