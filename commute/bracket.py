"""Pure maths on parameter pytrees: gradients, Hessian-vector products, the Lie bracket.

Parameters are a tensor or a dict of tensors (``Params``); a loss is a callable from parameters to a
scalar tensor. Nothing here knows about data, models or training. Conventions follow docs/design.md §1:

* Lie bracket of the gradient fields (paper eq. 6)::

      R(L_i, L_j) = H_j g_i - H_i g_j

* its projection on a target loss L (paper eq. 7, with the sign of docs/design.md)::

      P(L_i, L_j; L) = <R(L_i, L_j), grad L> = g_L . H_j g_i - g_L . H_i g_j

* reordering under gradient flow (Theorem 3.1): training dt on L_i then dt on L_j, against 2 dt on
  (L_i + L_j)/2, changes L by (dt^2 / 2) P(L_i, L_j; L) + O(dt^3).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

Params = Tensor | Mapping[str, Tensor]
Loss = Callable[[Params], Tensor]
HvpMode = Literal["rev-rev", "fwd-rev"]

__all__ = [
    "Params",
    "Loss",
    "grad",
    "hvp",
    "hvps",
    "graph_hvps",
    "lie_bracket",
    "bracket_projection",
    "reorder_excess",
    "intervention_excess",
    "antisymmetric_excess",
    "tree_dot",
    "tree_add",
    "tree_sub",
    "tree_scale",
]


# --------------------------------------------------------------------------------------------------
# pytree helpers (a tensor, or a flat dict of tensors)
# --------------------------------------------------------------------------------------------------
def _leaves(p: Params) -> tuple[list[str] | None, tuple[Tensor, ...]]:
    if isinstance(p, Tensor):
        return None, (p,)
    keys = list(p.keys())
    return keys, tuple(p[k] for k in keys)


def _rebuild(keys: list[str] | None, leaves: Sequence[Tensor]) -> Params:
    if keys is None:
        return leaves[0]
    return dict(zip(keys, leaves, strict=True))


def _map2(f: Callable[[Tensor, Tensor], Tensor], a: Params, b: Params) -> Params:
    ka, la = _leaves(a)
    kb, lb = _leaves(b)
    if ka is not None and kb is not None and ka != kb:
        lb = tuple(b[k] for k in ka)  # type: ignore[index]
    return _rebuild(ka, [f(x, y) for x, y in zip(la, lb, strict=True)])


def tree_dot(a: Params, b: Params, dtype: torch.dtype | None = None) -> Tensor:
    """Euclidean inner product <a, b> summed over all leaves (a 0-d tensor).

    ``dtype`` is the accumulation dtype (default: the leaves'); ``torch.float64`` sums the leaf-wise
    products of float32 parameters without float32 round-off over millions of terms.
    """
    ka, la = _leaves(a)
    _, lb = _leaves(b) if ka is None else (None, tuple(b[k] for k in ka))  # type: ignore[index]
    acc = dtype or la[0].dtype
    return sum((torch.sum(x * y, dtype=acc) for x, y in zip(la, lb, strict=True)),
               torch.zeros((), dtype=acc, device=la[0].device))


def tree_add(a: Params, b: Params) -> Params:
    """Leaf-wise a + b."""
    return _map2(torch.add, a, b)


def tree_sub(a: Params, b: Params) -> Params:
    """Leaf-wise a - b."""
    return _map2(torch.sub, a, b)


def tree_scale(a: Params, s: float | Tensor) -> Params:
    """Leaf-wise s * a."""
    k, leaves = _leaves(a)
    return _rebuild(k, [s * x for x in leaves])


def _fresh(params: Params) -> tuple[list[str] | None, tuple[Tensor, ...]]:
    """Detached copies of the leaves that require grad, so callers' tensors are never modified."""
    keys, leaves = _leaves(params)
    return keys, tuple(x.detach().requires_grad_(True) for x in leaves)


# --------------------------------------------------------------------------------------------------
# derivatives
# --------------------------------------------------------------------------------------------------
def grad(loss: Loss, params: Params) -> Params:
    """Gradient g = grad L(params), same structure as ``params``."""
    keys, leaves = _fresh(params)
    value = loss(_rebuild(keys, leaves))
    gs = torch.autograd.grad(value, leaves, allow_unused=True)
    return _rebuild(keys, [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, gs, strict=True)])


def graph_hvps(
    gs: Sequence[Tensor | None], leaves: Sequence[Tensor], vectors: Sequence[Sequence[Tensor]]
) -> list[list[Tensor]]:
    """H v for each v in ``vectors``, from one gradient graph ``gs = grad(L, leaves, create_graph=True)``.

    H v = grad <g, v> (Pearlmutter 1994), ``retain_graph`` between the products. Leaves the loss does not
    use, or uses only linearly, have no second-order graph: their rows of H v are zero.
    """
    live = [n for n, g in enumerate(gs) if g is not None and g.requires_grad]
    out: list[list[Tensor]] = []
    for m, v in enumerate(vectors):
        if not live:  # the loss is (at most) linear in the parameters: H = 0
            out.append([torch.zeros_like(x) for x in leaves])
            continue
        hv = torch.autograd.grad(
            [gs[n] for n in live], leaves, grad_outputs=[v[n] for n in live],
            retain_graph=m < len(vectors) - 1, allow_unused=True,
        )
        out.append([torch.zeros_like(x) if h is None else h for x, h in zip(leaves, hv, strict=True)])
    return out


def hvps(loss: Loss, params: Params, vs: Sequence[Params]) -> list[Params]:
    """Hessian-vector products H v for several v, sharing one double-backward graph.

    Reverse-over-reverse (Pearlmutter 1994): build g = grad L with ``create_graph=True`` once, then
    H v = grad <g, v> for each v (:func:`graph_hvps`).
    """
    keys, leaves = _fresh(params)
    value = loss(_rebuild(keys, leaves))
    gs = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
    vls = [_leaves(v)[1] if keys is None else tuple(v[k] for k in keys) for v in vs]  # type: ignore[index]
    return [_rebuild(keys, hv) for hv in graph_hvps(gs, leaves, vls)]


def hvp(loss: Loss, params: Params, v: Params, mode: HvpMode = "rev-rev") -> Params:
    """Hessian-vector product H v with H = Hess L(params).

    ``mode="rev-rev"``: reverse-over-reverse (double backward). ``mode="fwd-rev"``: forward-over-
    reverse, ``jvp`` of ``torch.func.grad`` (no retained graph; on torch 2.13 ``F.mse_loss`` cannot be
    differentiated this way, see docs/design.md §2).
    """
    if mode == "rev-rev":
        return hvps(loss, params, [v])[0]
    if mode != "fwd-rev":
        raise ValueError(f"unknown HVP mode {mode!r}; use 'rev-rev' or 'fwd-rev'")
    keys, leaves = _leaves(params)
    primals = tuple(x.detach() for x in leaves)
    _, vl = _leaves(v) if keys is None else (None, tuple(v[k] for k in keys))  # type: ignore[index]

    def g(*ps: Tensor) -> tuple[Tensor, ...]:
        return torch.func.grad(lambda *qs: loss(_rebuild(keys, qs)), argnums=tuple(range(len(ps))))(*ps)

    with warnings.catch_warnings():  # torch's forward-AD decompositions still call torch.jit.script
        warnings.filterwarnings("ignore", r".*torch\.jit\.script.* is deprecated", DeprecationWarning)
        _, tangent_out = torch.func.jvp(g, primals, tuple(x.detach() for x in vl))
    return _rebuild(keys, list(tangent_out))


# --------------------------------------------------------------------------------------------------
# the paper's quantities
# --------------------------------------------------------------------------------------------------
def lie_bracket(loss_i: Loss, loss_j: Loss, params: Params, mode: HvpMode = "rev-rev") -> Params:
    """Lie bracket of the gradient fields, paper eq. (6): R(L_i, L_j) = H_j g_i - H_i g_j."""
    g_i = grad(loss_i, params)
    g_j = grad(loss_j, params)
    return tree_sub(hvp(loss_j, params, g_i, mode), hvp(loss_i, params, g_j, mode))


def bracket_projection(
    loss_i: Loss, loss_j: Loss, loss_target: Loss, params: Params, mode: HvpMode = "rev-rev"
) -> float:
    """Projection of the bracket on a target, paper eq. (7) with docs/design.md's sign.

    P(L_i, L_j; L) = <R(L_i, L_j), grad L> = g_L . H_j g_i - g_L . H_i g_j.
    Under gradient flow, L(theta_ij) - L(theta_base) = (dt^2 / 2) P + O(dt^3) (Theorem 3.1).
    """
    r = lie_bracket(loss_i, loss_j, params, mode)
    return float(tree_dot(r, grad(loss_target, params)))


# --------------------------------------------------------------------------------------------------
# the paper's predictions from P (docs/design.md §1; each relation checked by simulation in the tests)
# --------------------------------------------------------------------------------------------------
def reorder_excess(P: Any, dt: float) -> Any:
    """Theorem 3.1: dt on L_i then dt on L_j, against 2 dt on (L_i + L_j)/2 under gradient flow, changes L
    by (dt² / 2)·P(L_i, L_j; L) + O(dt³)."""
    return dt**2 / 2 * P


def intervention_excess(P: Any, delta_w: float, steps: int, lr: float) -> Any:
    """Cor. 3.2a with ε = γT, δ = Δw: the eq. (9)/(10) intervention (w_i + Δw for T steps of learning rate
    γ, then w_i − Δw for T steps, w_j mirrored) changes L by EL^ij ≈ γ²·Δw·T²·P, with P = P(X, Y; L),
    X = L_i − L_j, Y = Σ_k w_k L_k (= P(L_i, L_j; L) for two domains). Works on arrays of P samples."""
    return lr**2 * delta_w * steps**2 * P


def antisymmetric_excess(el_ij: Any, el_ji: Any) -> Any:
    """(EL^ij − EL^ji) / 2: the part of an intervention's excess loss that is odd in Δw. Discrete steps add
    a term of order γ²TΔw² to both orders; this cancels it, so it is what a prediction is compared with."""
    return 0.5 * (el_ij - el_ji)
