"""Curvature of a model's losses: losses of a parameter dict, λ_max by power iteration, Adam's metric.

Pure functions over parameter dicts (``commute.bracket.Params``) and a model used only as a function
through ``torch.func.functional_call``; nothing here trains or reads data. Conventions: docs/design.md §1.

* λ_max: the dominant eigenvalue of the Hessian H of the training mix Σ_k w_k L_k, or for Adam of the
  preconditioned D^{-1/2} H D^{-1/2} with D = diag(√v̂ + ε) (``lr·D⁻¹H`` is Adam's linearised step), so that
  γ·T·λ_max measures how far an intervention of T steps is from the local regime of the expansion.
* ``gd_steps``: the deterministic full-batch gradient-descent map θ ← θ − γ ∇L(θ).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from commute.bracket import Params, hvps, tree_dot, tree_scale

__all__ = [
    "math_attention",
    "model_params",
    "domain_losses",
    "mix_loss",
    "top_eigenvalue",
    "hessian_lambda_max",
    "gd_steps",
    "gamma_eff",
]


def math_attention() -> Any:
    """Restrict scaled_dot_product_attention to the MATH backend: the fused kernels have no double
    backward (docs/design.md §2), so every HVP through attention runs inside this context."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        return nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


# --------------------------------------------------------------------------------------------------
# losses of a parameter dict (functional; tied GPT-2 embeddings listed once, docs/design.md §2)
# --------------------------------------------------------------------------------------------------
class _MeanLoss(torch.nn.Module):
    """Wraps a language model so that ``functional_call`` gives its mean per-token loss on a batch."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, ids: Tensor) -> Tensor:
        from commute.model import sequence_losses

        return sequence_losses(self.model, ids, dtype=self.dtype).mean()


def model_params(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Detached copies of the model's parameters (tied tensors once), optionally cast to ``dtype``."""
    return {k: p.detach().clone().to(dtype or p.dtype) for k, p in model.named_parameters()}


def domain_losses(
    model: torch.nn.Module, batches: Mapping[str, Sequence[Tensor]], dtype: torch.dtype | None = None
) -> dict[str, Callable[[Params], Tensor]]:
    """For each domain k, L_k(params) = mean next-token cross-entropy over its fixed batches."""
    wrapper = _MeanLoss(model, dtype)

    def make(bs: Sequence[Tensor]) -> Callable[[Params], Tensor]:
        def loss(p: Params) -> Tensor:
            assert isinstance(p, Mapping)
            pp = {f"model.{k}": v for k, v in p.items()}
            vals = [torch.func.functional_call(wrapper, pp, (b,), tie_weights=True) for b in bs]
            return torch.stack(vals).mean()

        return loss

    return {k: make(bs) for k, bs in batches.items()}


def mix_loss(losses: Mapping[str, Callable[[Params], Tensor]], weights: Mapping[str, float]) -> Callable:
    """The training mix Σ_k w_k L_k (domains with w_k = 0 are not evaluated)."""

    def loss(p: Params) -> Tensor:
        return sum(float(weights[k]) * losses[k](p) for k in losses if weights.get(k, 0.0) != 0.0)

    return loss


# --------------------------------------------------------------------------------------------------
# λ_max
# --------------------------------------------------------------------------------------------------
def _normalize(v: Params) -> Params:
    n = float(torch.sqrt(tree_dot(v, v)))
    return tree_scale(v, 1.0 / n)


def top_eigenvalue(
    matvec: Callable[[Params], Params],
    like: Params,
    iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
) -> tuple[float, Params]:
    """Dominant eigenvalue (largest |λ|, with its sign) of a symmetric operator, by power iteration.

    ``matvec(v)`` applies the operator (e.g. a Hessian-vector product, or D^{-1/2} H D^{-1/2} v for Adam);
    ``like`` gives the structure of v. Returns the Rayleigh quotient λ = vᵀAv (|v| = 1) after convergence
    (relative change < ``tol``) or ``iters`` products, and the eigenvector. For a Hessian near a minimum
    the dominant eigenvalue is the largest positive one, the curvature that limits the step size.
    """
    g = torch.Generator().manual_seed(seed)
    if isinstance(like, Tensor):
        v: Params = torch.randn(like.shape, generator=g, dtype=like.dtype).to(like.device)
    else:
        v = {k: torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device) for k, x in like.items()}
    v = _normalize(v)
    lam = math.nan
    for _ in range(iters):
        av = matvec(v)
        new = float(tree_dot(v, av))
        norm = float(torch.sqrt(tree_dot(av, av)))
        if norm == 0.0:
            return 0.0, v
        v = tree_scale(av, 1.0 / norm)
        if not math.isnan(lam) and abs(new - lam) <= tol * abs(new):
            lam = new
            break
        lam = new
    return lam, v


def hessian_lambda_max(
    loss: Callable[[Params], Tensor],
    params: dict[str, Tensor],
    precond: Mapping[str, Tensor] | None = None,
    iters: int = 20,
    seed: int = 0,
    tol: float = 1e-3,
) -> float:
    """Top eigenvalue of H (or of D^{-1/2} H D^{-1/2} when ``precond`` = diag D is given), by HVPs.

    The HVPs are reverse-over-reverse through :func:`commute.bracket.hvps`.
    """
    if precond is None:
        hv = lambda v: hvps(loss, params, [v])[0]  # noqa: E731
        return top_eigenvalue(hv, params, iters=iters, tol=tol, seed=seed)[0]
    s = {k: precond[k].rsqrt() for k in params}

    def mv(v: Params) -> Params:
        assert isinstance(v, Mapping)
        hv = hvps(loss, params, [{k: s[k] * v[k] for k in params}])[0]
        assert isinstance(hv, Mapping)
        return {k: s[k] * hv[k] for k in params}

    return top_eigenvalue(mv, params, iters=iters, tol=tol, seed=seed)[0]


def gamma_eff(g: Mapping[str, Tensor], D: Mapping[str, Tensor], lr: float) -> float:
    """γ_eff = lr·⟨g, D⁻¹g⟩ / ⟨g, g⟩: the plain-GD step with Adam's first-order loss decrease along g."""
    num = sum(float((g[k] * g[k] / D[k]).sum()) for k in g)
    den = sum(float((g[k] * g[k]).sum()) for k in g)
    return lr * num / den


# --------------------------------------------------------------------------------------------------
# the full-batch gradient-descent map
# --------------------------------------------------------------------------------------------------
def gd_steps(
    loss: Callable[[Params], Tensor], p: dict[str, Tensor], lr: float, steps: int
) -> dict[str, Tensor]:
    """``steps`` deterministic steps θ ← θ − lr·∇L(θ) from ``p`` (detached copies; one graph at a time)."""
    for _ in range(steps):
        q = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        gs = torch.autograd.grad(loss(q), list(q.values()))
        p = {k: (v - lr * g).detach() for (k, v), g in zip(q.items(), gs, strict=True)}
    return p
