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
HvpsMode = Literal["rev-rev", "fwd-rev", "fwd-rev-vmap"]

__all__ = [
    "Params",
    "Loss",
    "grad",
    "hvp",
    "hvps",
    "graph_hvps",
    "hvp_function",
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


def hvps(loss: Loss, params: Params, vs: Sequence[Params], mode: HvpsMode = "rev-rev") -> list[Params]:
    """Hessian-vector products H v for several v.

    ``mode="rev-rev"`` (default): reverse-over-reverse (Pearlmutter 1994), sharing one double-backward
    graph: build g = grad L with ``create_graph=True`` once, then H v = grad <g, v> for each v
    (:func:`graph_hvps`). ``mode="fwd-rev"``: one ``jvp`` of ``torch.func.grad`` per v (as :func:`hvp`).
    ``mode="fwd-rev-vmap"``: the same ``jvp`` batched over the vectors with ``torch.func.vmap`` (one
    forward-over-reverse pass with K tangents; the forward-mode routes need a functional ``loss``, e.g.
    through ``torch.func.functional_call``, and ``F.mse_loss`` cannot be differentiated this way on
    torch 2.13, docs/design.md §2). All modes agree to float rounding; bench/bench_hvp.py measures them
    (on one CPU thread "rev-rev" is the fastest eager mode).
    """
    if mode == "rev-rev":
        keys, leaves = _fresh(params)
        value = loss(_rebuild(keys, leaves))
        gs = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
        vls = [_vector_leaves(keys, v) for v in vs]
        return [_rebuild(keys, hv) for hv in graph_hvps(gs, leaves, vls)]
    if mode not in ("fwd-rev", "fwd-rev-vmap"):
        raise ValueError(f"unknown HVP mode {mode!r}; use 'rev-rev', 'fwd-rev' or 'fwd-rev-vmap'")
    return hvp_function(loss, mode)(params, vs)


def _vector_leaves(keys: list[str] | None, v: Params) -> tuple[Tensor, ...]:
    """The leaves of a vector in the order of the parameters' ``keys``."""
    return _leaves(v)[1] if keys is None else tuple(v[k] for k in keys)  # type: ignore[index]


def _jvp_quiet(f: Callable[..., Any], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]) -> Any:
    with warnings.catch_warnings():  # torch's forward-AD decompositions still call torch.jit.script
        warnings.filterwarnings("ignore", r".*torch\.jit\.script.* is deprecated", DeprecationWarning)
        return torch.func.jvp(f, primals, tangents)


def hvp_function(
    loss: Loss, mode: HvpsMode = "rev-rev", compile: bool = False, **compile_kwargs: Any
) -> Callable[[Params, Sequence[Params]], list[Params]]:
    """A reusable ``f(params, vs) -> [H v for v in vs]`` for a fixed ``loss``, optionally compiled.

    ``mode`` as in :func:`hvps`. ``compile=True`` wraps the forward-over-reverse product (modes
    ``"fwd-rev"`` and ``"fwd-rev-vmap"``; double backward cannot be compiled) in ``torch.compile``
    (``compile_kwargs`` are passed on). The first call per shape compiles, which takes tens of seconds on
    a CPU; it pays off only over many products of the same shapes (bench/bench_hvp.py reports both).
    """
    if mode == "rev-rev":
        if compile:
            raise ValueError("mode 'rev-rev' (double backward) cannot be compiled; use 'fwd-rev-vmap'")
        return lambda params, vs: hvps(loss, params, vs)
    if mode not in ("fwd-rev", "fwd-rev-vmap"):
        raise ValueError(f"unknown HVP mode {mode!r}; use 'rev-rev', 'fwd-rev' or 'fwd-rev-vmap'")
    state: dict[str, list[str] | None] = {"keys": None}

    def gradient(*ps: Tensor) -> tuple[Tensor, ...]:
        keys = state["keys"]
        return torch.func.grad(lambda *qs: loss(_rebuild(keys, qs)), argnums=tuple(range(len(ps))))(*ps)

    def one(primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return torch.func.jvp(gradient, primals, tangents)[1]

    def batched(primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return torch.func.vmap(lambda *ts: torch.func.jvp(gradient, primals, ts)[1])(*tangents)

    inner: Callable[..., tuple[Tensor, ...]] = batched if mode == "fwd-rev-vmap" else one
    if compile:
        inner = torch.compile(inner, **compile_kwargs)

    def apply(params: Params, vs: Sequence[Params]) -> list[Params]:
        keys, leaves = _leaves(params)
        state["keys"] = keys
        primals = tuple(x.detach() for x in leaves)
        vls = [tuple(x.detach() for x in _vector_leaves(keys, v)) for v in vs]
        if not vls:
            return []
        with warnings.catch_warnings():  # torch's forward-AD decompositions still call torch.jit.script
            warnings.filterwarnings("ignore", r".*torch\.jit\.script.* is deprecated", DeprecationWarning)
            if mode == "fwd-rev":
                return [_rebuild(keys, list(inner(primals, vl))) for vl in vls]
            stacked = tuple(torch.stack(ts) for ts in zip(*vls, strict=True))
            out = inner(primals, stacked)
        return [_rebuild(keys, [h[m] for h in out]) for m in range(len(vls))]

    return apply


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
def _bracket_parts(
    loss_i: Loss, loss_j: Loss, params: Params, mode: HvpMode
) -> tuple[Params, list[Tensor], list[Tensor]]:
    """R(L_i, L_j) with the gradients met on the way: (R, g_i leaves, g_j leaves).

    The gradients come out of the HVPs' own passes instead of extra ones. ``"rev-rev"``: the
    ``create_graph`` gradients of L_i and L_j are g_i and g_j, and each graph then gives its HVP
    (both graphs are alive until H_j g_i is taken: the peak memory of two double-backward graphs).
    ``"fwd-rev"``: one gradient g_i, then jvp(grad L_j)(g_i) = (g_j, H_j g_i) and H_i g_j.
    """
    if mode == "rev-rev":
        keys, leaves = _fresh(params)
        p = _rebuild(keys, leaves)
        gs_i = torch.autograd.grad(loss_i(p), leaves, create_graph=True, allow_unused=True)
        gs_j = torch.autograd.grad(loss_j(p), leaves, create_graph=True, allow_unused=True)
        g_i = [torch.zeros_like(x) if g is None else g.detach() for x, g in zip(leaves, gs_i, strict=True)]
        g_j = [torch.zeros_like(x) if g is None else g.detach() for x, g in zip(leaves, gs_j, strict=True)]
        hj_gi = graph_hvps(gs_j, leaves, [g_i])[0]
        del gs_j
        hi_gj = graph_hvps(gs_i, leaves, [g_j])[0]
        return _rebuild(keys, [a - b for a, b in zip(hj_gi, hi_gj, strict=True)]), g_i, g_j
    if mode != "fwd-rev":
        raise ValueError(f"unknown HVP mode {mode!r}; use 'rev-rev' or 'fwd-rev'")
    keys, leaves = _leaves(params)
    primals = tuple(x.detach() for x in leaves)
    g_i = list(_leaves(grad(loss_i, params))[1])

    def gradient(f: Loss) -> Callable[..., tuple[Tensor, ...]]:
        argnums = tuple(range(len(primals)))
        return lambda *ps: torch.func.grad(lambda *qs: f(_rebuild(keys, qs)), argnums=argnums)(*ps)

    g_j, hj_gi = _jvp_quiet(gradient(loss_j), primals, tuple(g_i))
    _, hi_gj = _jvp_quiet(gradient(loss_i), primals, tuple(x.detach() for x in g_j))
    return _rebuild(keys, [a - b for a, b in zip(hj_gi, hi_gj, strict=True)]), g_i, list(g_j)


def lie_bracket(loss_i: Loss, loss_j: Loss, params: Params, mode: HvpMode = "rev-rev") -> Params:
    """Lie bracket of the gradient fields, paper eq. (6): R(L_i, L_j) = H_j g_i - H_i g_j.

    g_i and g_j are taken from the HVPs' own passes (no separate gradients in ``"rev-rev"``, one in
    ``"fwd-rev"``); the result equals the textbook composition of :func:`grad` and :func:`hvp` to float
    rounding.
    """
    return _bracket_parts(loss_i, loss_j, params, mode)[0]


def bracket_projection(
    loss_i: Loss, loss_j: Loss, loss_target: Loss, params: Params, mode: HvpMode = "rev-rev"
) -> float:
    """Projection of the bracket on a target, paper eq. (7) with docs/design.md's sign.

    P(L_i, L_j; L) = <R(L_i, L_j), grad L> = g_L . H_j g_i - g_L . H_i g_j.
    Under gradient flow, L(theta_ij) - L(theta_base) = (dt^2 / 2) P + O(dt^3) (Theorem 3.1).
    When ``loss_target`` is ``loss_i`` or ``loss_j`` (the same object), its gradient is reused.
    """
    r, g_i, g_j = _bracket_parts(loss_i, loss_j, params, mode)
    if loss_target is loss_i:
        g_l: Params = _rebuild(_leaves(params)[0], g_i)
    elif loss_target is loss_j:
        g_l = _rebuild(_leaves(params)[0], g_j)
    else:
        g_l = grad(loss_target, params)
    return float(tree_dot(r, g_l))


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
