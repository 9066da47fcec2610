"""The locality sweep: how the bracket's prediction fares as γ·T·λ_max grows, with no sampling noise.

From one checkpoint, deterministic full-batch gradient descent in float64 on fixed batches per domain runs
the eq. (9) intervention (θ12, θ21) and the base for a grid of T and γ, and compares the observed
antisymmetric excess with the bracket's γ²ΔwT²P (docs/design.md §1; ratio → 1 as γTλ_max → 0, and only
then) and with the schedule's linear response (docs/design.md §1b; ratio → 1 as Δw → 0 at any γTλ_max).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from commute.bracket import (
    antisymmetric_excess,
    grad,
    hvp,
    intervention_excess,
    lie_bracket,
    tree_dot,
    tree_sub,
)
from commute.curvature import domain_losses, gd_steps, hessian_lambda_max, mix_loss, model_params

__all__ = ["locality_sweep"]


def locality_sweep(
    model: torch.nn.Module,
    batches: Mapping[str, Sequence[Tensor]],
    base: Mapping[str, float],
    delta_w: float,
    T_grid: Sequence[int],
    lr: float | None = None,
    lr_times_lambda: float | Sequence[float] = 0.001,
    lambda_iters: int = 20,
    dtype: torch.dtype = torch.float64,
    progress: Callable[[str], None] | None = None,
    response: bool = True,
    pair: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Observed vs predicted reordering effect under exact (deterministic) gradient descent.

    From θ = the model's parameters (cast to ``dtype``), with fixed batches per domain (no sampling
    noise) and our own float64 cross-entropy: θ12 = T steps at w_1 = base_1 + Δw then T at base_1 − Δw;
    θ21 the mirror; θ_base = 2T steps at ``base``. For every γ (``lr``, or γ = c/λ_max for each c in
    ``lr_times_lambda``) and every T in ``T_grid`` a row gives, per domain i, EL_i^12, EL_i^21, the
    antisymmetric part and its ratio to two predictions:

    * the bracket, γ²ΔwT²P(L_1, L_2; L_i) with P exact at θ (:func:`commute.bracket.lie_bracket`), a
      second-order expansion in γT: ratio → 1 as γTλ_max → 0, and it drifts beyond;
    * with ``response``, the schedule's linear response Σ_t δw(t)·G(t) with G the exact derivative of the
      2T-step GD map (:func:`commute.response.schedule_gradient`), first order in Δw at any γT.

    ``pair`` (default: the first two domains of ``batches``) are the domains the intervention trades
    weight between; every domain of ``batches`` is a target. Rows are sorted by γTλ_max, largest first
    (the last row is the most local).
    """
    from commute import response as resp
    from commute.schedule import Intervention

    names = tuple(batches)
    d1, d2 = tuple(pair) if pair is not None else names[:2]
    m = copy.deepcopy(model).to(dtype)
    p0 = model_params(m, dtype)
    losses = domain_losses(m, batches, dtype)
    lam = hessian_lambda_max(mix_loss(losses, base), p0, iters=lambda_iters)
    if lr is not None:
        lrs = [float(lr)]
    else:
        cs = [lr_times_lambda] if isinstance(lr_times_lambda, int | float) else list(lr_times_lambda)
        lrs = [float(c) / abs(lam) for c in cs]
    r = lie_bracket(losses[d1], losses[d2], p0)
    if len(names) == 2:
        P = {k: float(tree_dot(r, grad(losses[k], p0))) for k in names}
    else:  # P(X, Y; L) with X = L_1 − L_2, Y = Σ_k w_k L_k (Cor. 3.2a)
        y = grad(mix_loss(losses, base), p0)
        rx = tree_sub(hvp(mix_loss(losses, base), p0, tree_sub(grad(losses[d1], p0), grad(losses[d2], p0))),
                      hvp(mix_loss(losses, {d1: 1.0, d2: -1.0}), p0, y))
        P = {k: float(tree_dot(rx, grad(losses[k], p0))) for k in names}
    w12a = {**base, d1: base[d1] + delta_w, d2: base[d2] - delta_w}
    w12b = {**base, d1: base[d1] - delta_w, d2: base[d2] + delta_w}
    rows = []
    Ts = sorted(set(int(t) for t in T_grid), reverse=True)

    def evaluate(p: dict[str, Tensor]) -> dict[str, float]:
        with torch.no_grad():
            return {k: float(losses[k](p)) for k in names}

    for gamma in lrs:
        for T in Ts:
            if progress:
                progress(f"locality sweep γ={gamma:.3g} T={T} (γTλ_max = {gamma * T * abs(lam):.3g})")
            base_p = gd_steps(mix_loss(losses, base), p0, gamma, 2 * T)
            p12 = gd_steps(mix_loss(losses, w12b), gd_steps(mix_loss(losses, w12a), p0, gamma, T), gamma, T)
            p21 = gd_steps(mix_loss(losses, w12a), gd_steps(mix_loss(losses, w12b), p0, gamma, T), gamma, T)
            lb, l12, l21 = evaluate(base_p), evaluate(p12), evaluate(p21)
            row: dict[str, Any] = {"T": T, "lr": gamma, "gammaT": gamma * T, "locality": gamma * T * abs(lam)}
            iv = Intervention(base, d1, d2, delta_w, 0, T)
            for k in names:
                el12, el21 = l12[k] - lb[k], l21[k] - lb[k]
                pred = intervention_excess(P[k], delta_w, T, gamma)
                anti = antisymmetric_excess(el12, el21)
                row[k] = {"EL12": el12, "EL21": el21, "antisym": anti, "pred": pred,
                          "ratio": anti / pred if pred != 0 else math.nan}
                if response:
                    G = resp.schedule_gradient(losses, p0, [dict(base)] * (2 * T), gamma, losses[k])
                    pr = resp.antisymmetric_excess(G, iv)
                    row[k].update({"pred_response": pr, "ratio_response": anti / pr if pr != 0 else math.nan})
            rows.append(row)
    rows.sort(key=lambda row: -row["locality"])
    return {"lr": lrs[0] if len(lrs) == 1 else lrs, "lambda_max": lam, "delta_w": delta_w, "base": dict(base),
            "P": P, "domains": list(names), "pair": [d1, d2], "rows": rows, "L0": evaluate(p0)}
