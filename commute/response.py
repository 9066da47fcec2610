"""The schedule's linear response: the exact derivative of a training window's end loss w.r.t. its weights.

The exact part is pure maths on parameter pytrees (the ``Params`` / ``Loss`` conventions of
:mod:`commute.bracket`); :class:`~commute.response_estimator.ResponseEstimator` (in its own module, also
importable from here) applies it to a real run (a model, its training batches, per-domain batch streams) with
mini-batch estimates and a standard error. The maths is docs/design.md §1b.

Training over a window of n steps is a discrete map. With domain losses L_k, gradients g_k = grad L_k and
weights w_k(t) (the base schedule, each w_k(t) varied independently, not constrained to sum to 1)::

    g_mix(theta, t) = sum_k w_k(t) g_k(theta)
    (theta, s)_{t+1} = U_t(theta_t, s_t; g_mix(theta_t, t))      s = optimiser state (step, m, v)

U_t is torch's own update for ``"gd"``, ``"sgd"``, ``"adam"``, ``"adamw"`` (:func:`optimizer_step`). Its
first-order response to the schedule, for a target loss L at the end of the window, is

    G_k(t) = dL(theta_n) / dw_k(t)

and one adjoint sweep gives all of it (:func:`schedule_response`): lambda_n = (grad L(theta_n), 0, 0), and
going back with z_t = (theta_t, s_t)::

    G_k(t)    = < lambda_{t+1}, dU_t/dw_k(t) >       = < (dU_t/dg)^T lambda_{t+1}, g_k(theta_t) >
    lambda_t  = (dU_t/dz_t)^T lambda_{t+1}                (through g_mix(theta_t) too: an HVP with H_mix)

For gradient descent this is lambda_t = lambda_{t+1} - gamma_t H_mix(theta_t) lambda_{t+1} and
G_k(t) = -gamma_t <lambda_{t+1}, g_k(theta_t)>. A perturbation dw(t) of the schedule changes L by
sum_t sum_k dw_k(t) G_k(t) + O(dw^2) at *any* horizon (:func:`predicted_change`); for the paper's eq. 9/10
intervention that first-order term is the leading term of the antisymmetric excess (EL^12 - EL^21)/2
(:func:`antisymmetric_excess`), and expanding it to first order in gamma recovers the bracket's
gamma^2 dw T^2 P (docs/design.md §1).

:func:`schedule_response` is full-batch and deterministic: ``losses`` are fixed functions of the parameters,
so G is the exact derivative of the map (for mini-batch training it is the derivative for those batches).
:class:`~commute.response_estimator.ResponseEstimator` replays a window of a real run on its own training
batches (the trajectory as trained) and estimates G for the *population* losses from independent
per-domain batch streams, unbiased given the trajectory, in independent groups for a stderr; it also gives
the first-order alignment baseline G0 (the adjoint not propagated). Its ``ResponseReport`` predicts
schedule changes and eq. 9/10 interventions with their stderr. :func:`optimizer_settings` and
:meth:`OptimizerState.from_state_dict` read a torch optimiser or a checkpoint's state dict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from commute.bracket import Loss, Params, _leaves, _rebuild
from commute.errors import CommuteError
from commute.schedule import Intervention

__all__ = [
    "OptimizerName",
    "OptimizerState",
    "ScheduleResponse",
    "optimizer_step",
    "schedule_response",
    "schedule_gradient",
    "predicted_change",
    "intervention_delta",
    "antisymmetric_excess",
    "cubic_node",
    "cubic_nodes",
    "antisymmetric_excess_cubic",
    "optimizer_settings",
]

OptimizerName = Literal["gd", "sgd", "adam", "adamw"]
Leaves = tuple[Tensor, ...]

_DEFAULTS: dict[str, dict[str, object]] = {
    "gd": {},
    "sgd": {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
    "adam": {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
}
"""Accepted keyword arguments per optimiser, with torch's defaults."""


# --------------------------------------------------------------------------------------------------
# the optimiser state and the update U_t
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerState:
    """The optimiser state before a step, as torch keeps it (same structure as the parameters).

    * ``step``: updates done so far (Adam's next update uses the bias corrections of ``step + 1``);
    * ``m``: Adam's ``exp_avg``, or SGD's ``momentum_buffer``; ``None`` = fresh (zeros for Adam; for SGD
      the first update copies the gradient into the buffer, as torch does);
    * ``v``: Adam's ``exp_avg_sq``; ``None`` = zeros.

    ``OptimizerState()`` is a fresh optimiser. Plain ``"gd"`` keeps only ``step``.
    """

    step: int = 0
    m: Params | None = None
    v: Params | None = None

    @classmethod
    def from_torch(cls, optimizer: torch.optim.Optimizer, params: Params) -> OptimizerState:
        """Copy the state of a ``torch.optim`` Adam/AdamW/SGD for ``params`` (the tensors it optimises).

        ``params`` is the parameter tensor, or a dict name -> tensor (e.g. ``dict(model.named_parameters())``)
        holding the very tensor objects the optimiser was built with. Hyperparameters are not read: pass
        them to :func:`schedule_response` as keyword arguments. (SGD keeps no step count: ``step`` = 0.)
        """
        keys, leaves = _leaves(params)
        return cls._from_states(keys, [optimizer.state.get(p, {}) for p in leaves], type(optimizer).__name__)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], param_names: Sequence[Any]) -> OptimizerState:
        """Read a torch Adam/AdamW/SGD ``state_dict()`` (e.g. a checkpoint's ``optimizer.pt``).

        A state dict numbers its parameters 0, 1, ... in the order of its parameter groups; ``param_names``
        names them in that order: a flat list, or one list per group as
        :func:`commute.train.param_group_names` gives for a run trained by :func:`commute.train.train`. The
        result is keyed by those names.
        """
        names = _flat_names(param_names)
        indices = _state_dict_indices(state_dict, names)
        states = state_dict["state"]
        found = [states.get(i, states.get(str(i), {})) for i in indices]  # int keys, or str after JSON
        return cls._from_states(names, found, "the state dict")

    @classmethod
    def _from_states(
        cls, keys: list[str] | None, states: Sequence[Mapping[str, Any]], what: str
    ) -> OptimizerState:
        if all(not s for s in states):
            return cls()
        if any(not s for s in states):
            raise CommuteError("the optimiser has state for some of the given parameters but not for others.")
        if all("exp_avg" in s for s in states):
            steps = {int(s["step"]) for s in states}
            if len(steps) != 1:
                raise CommuteError(f"the optimiser's parameters are at different steps {sorted(steps)}.")
            m = [s["exp_avg"].detach().clone() for s in states]
            v = [s["exp_avg_sq"].detach().clone() for s in states]
            return cls(steps.pop(), _rebuild(keys, m), _rebuild(keys, v))
        if all("momentum_buffer" in s for s in states):
            bufs = [s["momentum_buffer"] for s in states]
            if all(b is None for b in bufs):
                return cls()
            if any(b is None for b in bufs):
                raise CommuteError("the optimiser has momentum buffers for some parameters but not others.")
            return cls(0, _rebuild(keys, [b.detach().clone() for b in bufs]))
        raise CommuteError(
            f"cannot read the state of {what}; supported: SGD, Adam, AdamW."
        )


@dataclass(frozen=True)
class _Hyper:
    """Validated hyperparameters; ``weight_decay`` per leaf."""

    name: str
    weight_decay: tuple[float, ...]
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False


def _hyper(optimizer: str, keys: list[str] | None, n_leaves: int, kwargs: Mapping[str, object]) -> _Hyper:
    if optimizer not in _DEFAULTS:
        raise CommuteError(f"unknown optimizer {optimizer!r}; use one of {', '.join(map(repr, _DEFAULTS))}.")
    allowed = _DEFAULTS[optimizer]
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        ok = ", ".join(allowed) if allowed else "none"
        raise CommuteError(
            f"optimizer {optimizer!r} does not take {', '.join(map(repr, unknown))} (it takes: {ok})."
        )
    hp = {**allowed, **kwargs}
    wd = hp.pop("weight_decay", 0.0)
    if isinstance(wd, Mapping):
        if keys is None:
            raise CommuteError("a per-parameter weight_decay mapping needs parameters given as a dict.")
        stray = [k for k in wd if k not in keys]
        if stray:
            raise CommuteError(f"weight_decay names unknown parameter(s) {', '.join(map(repr, stray))}.")
        wds = tuple(float(wd.get(k, 0.0)) for k in keys)
    else:
        wds = (float(wd),) * n_leaves  # type: ignore[arg-type]
    if "betas" in hp:
        b1, b2 = hp.pop("betas")  # type: ignore[misc]
        hp["betas"] = (float(b1), float(b2))
    if hp.get("nesterov") and (hp["momentum"] <= 0 or hp["dampening"] != 0):  # type: ignore[operator]
        raise CommuteError("nesterov momentum needs momentum > 0 and dampening = 0 (as in torch).")
    return _Hyper(optimizer, wds, **hp)  # type: ignore[arg-type]


def _sqrt(v: Tensor) -> Tensor:
    """sqrt(v) with derivative 0 (not inf) where v = 0, so a coordinate no loss touches has a zero row."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))


def _step_leaves(
    p: Leaves, g: Leaves, m: Leaves | None, v: Leaves | None, step: int, lr: float, hp: _Hyper
) -> tuple[Leaves, Leaves | None, Leaves | None]:
    """U_t on leaves, out of place, in the arithmetic of torch's single-tensor optimisers (torch 2.13)."""
    if hp.name == "gd":
        return tuple(torch.add(x, d, alpha=-lr) for x, d in zip(p, g, strict=True)), None, None
    wd = hp.weight_decay
    if hp.name == "sgd":
        ds = tuple(d if w == 0 else torch.add(d, x, alpha=w) for x, d, w in zip(p, g, wd, strict=True))
        bufs = None
        if hp.momentum != 0:
            bufs = ds if m is None else tuple(
                torch.add(b * hp.momentum, d, alpha=1 - hp.dampening) for b, d in zip(m, ds, strict=True)
            )
            if hp.nesterov:
                ds = tuple(torch.add(d, b, alpha=hp.momentum) for d, b in zip(ds, bufs, strict=True))
            else:
                ds = bufs
        return tuple(torch.add(x, d, alpha=-lr) for x, d in zip(p, ds, strict=True)), bufs, None
    # Adam (L2 weight decay on the gradient) / AdamW (decoupled: the parameter shrinks first)
    b1, b2 = hp.betas
    n = step + 1
    bc1, bc2 = 1 - b1**n, 1 - b2**n
    step_size, bc2_sqrt = lr / bc1, bc2**0.5
    m = m if m is not None else tuple(torch.zeros_like(x) for x in p)
    v = v if v is not None else tuple(torch.zeros_like(x) for x in p)
    ps, ms, vs = [], [], []
    for x, d, mi, vi, w in zip(p, g, m, v, wd, strict=True):
        if w != 0:
            if hp.name == "adamw":
                x = x * (1 - lr * w)
            else:
                d = torch.add(d, x, alpha=w)
        mi = torch.lerp(mi, d, 1 - b1)
        vi = torch.addcmul(vi * b2, d, d, value=1 - b2)
        denom = _sqrt(vi) / bc2_sqrt + hp.eps
        ps.append(torch.addcdiv(x, mi, denom, value=-step_size))
        ms.append(mi)
        vs.append(vi)
    return tuple(ps), tuple(ms), tuple(vs)


def optimizer_step(
    params: Params,
    grad: Params,
    state: OptimizerState | None = None,
    lr: float = 1e-3,
    optimizer: OptimizerName = "gd",
    **optimizer_kwargs: object,
) -> tuple[Params, OptimizerState]:
    """One update U(theta, s; g) -> (theta', s'), out of place and differentiable in theta, m, v and g.

    The arithmetic of torch's single-tensor ``torch.optim`` implementations, with g the (mixture) gradient:

    * ``"gd"``: theta' = theta - lr g.
    * ``"sgd"`` (``momentum``, ``dampening``, ``nesterov``, ``weight_decay``): d = g + wd theta;
      b' = d on the first update, else mu b + (1 - dampening) d; d <- d + mu b' (nesterov) or b';
      theta' = theta - lr d.
    * ``"adam"`` (``betas``, ``eps``, ``weight_decay`` as L2: d = g + wd theta) and ``"adamw"`` (decoupled:
      theta <- theta (1 - lr wd), d = g): with n = step + 1,
      m' = b1 m + (1 - b1) d, v' = b2 v + (1 - b2) d^2,
      theta' = theta - lr / (1 - b1^n) * m' / (sqrt(v') / sqrt(1 - b2^n) + eps).

    ``weight_decay`` may be a mapping parameter name -> decay (absent names: 0), like torch's param groups.
    """
    keys, p = _leaves(params)
    g = _leaves(grad)[1] if keys is None else tuple(grad[k] for k in keys)  # type: ignore[index]
    state = state or OptimizerState()
    hp = _hyper(optimizer, keys, len(p), optimizer_kwargs)
    m, v = _state_leaves(state, keys)
    p2, m2, v2 = _step_leaves(p, g, m, v, state.step, float(lr), hp)
    return _rebuild(keys, p2), _make_state(state.step + 1, keys, m2, v2)


def _state_leaves(state: OptimizerState, keys: list[str] | None) -> tuple[Leaves | None, Leaves | None]:
    def get(x: Params | None) -> Leaves | None:
        if x is None:
            return None
        return _leaves(x)[1] if keys is None else tuple(x[k] for k in keys)  # type: ignore[index]

    return get(state.m), get(state.v)


def _make_state(step: int, keys: list[str] | None, m: Leaves | None, v: Leaves | None) -> OptimizerState:
    def tree(x: Leaves | None) -> Params | None:
        return None if x is None else _rebuild(keys, x)

    return OptimizerState(step, tree(m), tree(v))


# --------------------------------------------------------------------------------------------------
# the adjoint sweep
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScheduleResponse:
    """The result of :func:`schedule_response`.

    * ``G``: domain -> tensor [steps], G_k(t) = dL(theta_end)/dw_k(t);
    * ``params``, ``state``: theta_end and the optimiser state after the window (detached);
    * ``loss``: L(theta_end) for the target;
    * ``n_grad``, ``n_vjp``: the work done (gradient evaluations, step VJPs).
    """

    G: dict[str, Tensor]
    params: Params
    state: OptimizerState
    loss: float
    n_grad: int
    n_vjp: int


def _domain_weights(weights: Sequence[Mapping[str, float]], domains: Sequence[str]) -> list[list[float]]:
    if isinstance(weights, Mapping) or not isinstance(weights, Sequence) or len(weights) == 0:
        raise CommuteError("weights must be a non-empty sequence with one mapping domain -> weight per step.")
    out = []
    for t, w in enumerate(weights):
        if not isinstance(w, Mapping):
            raise CommuteError(f"the weights of step {t} must be a mapping domain -> weight, got {w!r}.")
        stray = [k for k in w if k not in domains]
        if stray:
            raise CommuteError(
                f"the weights of step {t} name unknown domain(s) {', '.join(map(repr, stray))}; "
                f"the losses are for {', '.join(map(repr, domains))}."
            )
        out.append([float(w.get(k, 0.0)) for k in domains])
    return out


def _learning_rates(lr: float | Sequence[float], steps: int) -> list[float]:
    if isinstance(lr, int | float) or (isinstance(lr, Tensor) and lr.ndim == 0):
        return [float(lr)] * steps
    lrs = [float(x) for x in lr]
    if len(lrs) != steps:
        raise CommuteError(f"lr has {len(lrs)} values but the schedule has {steps} steps.")
    return lrs


def _grads(loss: Loss, keys: list[str] | None, p: Leaves, create_graph: bool) -> Leaves:
    gs = torch.autograd.grad(loss(_rebuild(keys, p)), p, create_graph=create_graph, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(p, gs, strict=True))


def _mix(ws: Sequence[float] | Tensor, gks: Sequence[Leaves]) -> Leaves:
    return tuple(sum(ws[k] * gk[n] for k, gk in enumerate(gks)) for n in range(len(gks[0])))  # type: ignore[misc]


def schedule_response(
    losses: Mapping[str, Loss],
    params: Params,
    weights: Sequence[Mapping[str, float]],
    lr: float | Sequence[float],
    target: Loss | str,
    optimizer: OptimizerName = "gd",
    state: OptimizerState | None = None,
    **optimizer_kwargs: object,
) -> ScheduleResponse:
    """G_k(t) = dL(theta_n)/dw_k(t) for every domain k and step t of a window, by one adjoint sweep.

    The window is n = ``len(weights)`` updates (:func:`optimizer_step`) from ``params`` and ``state``
    (default: a fresh optimiser) with the mixture gradient g_mix = sum_k w_k(t) grad L_k(theta_t) and
    learning rate ``lr`` (a float, or one per step). Then, with z = (theta, m, v) and lambda_n =
    (grad L(theta_n), 0, 0), for t = n-1 .. 0 on the graph of step t alone (docs/design.md §1b)::

        G_k(t)   = < lambda_{t+1}, dU_t/dw_k(t) >
        lambda_t = (dU_t/dz_t)^T lambda_{t+1}     (including d g_mix/d theta = H_mix: reverse-over-reverse)

    (for ``"gd"``: G_k(t) = -gamma_t <lambda_{t+1}, g_k(theta_t)>, lambda_t = lambda_{t+1} -
    gamma_t H_mix lambda_{t+1}). Both come from a single ``autograd.grad`` of <lambda_{t+1}, U_t> through
    the step's graph, the w_k(t) being leaves of that graph.

    Cost: n mixture gradients forward; backward K gradients with ``create_graph`` and one VJP of the step
    (about one mixture HVP) per step; one target gradient. That is n (K + 1) + 1 gradients and n
    double-backward VJPs. Memory: the forward trajectory theta_0..theta_{n-1} (and m, v for Adam) as
    detached tensors, n copies of the parameters (3n for Adam), and the autograd graph of one step at a
    time; never a graph through the window.

    Args:
        losses: domain -> L_k(params) (a scalar tensor), deterministic (full batch).
        weights: one mapping domain -> w_k(t) per step (absent domains: 0); need not sum to 1.
        target: a loss callable, or the name of a domain in ``losses``.
        optimizer: ``"gd"``, ``"sgd"``, ``"adam"`` or ``"adamw"``; ``optimizer_kwargs`` as torch's
            (see :func:`optimizer_step`).

    Adam with eps << |g| from a fresh state is nearly sign-like: G is still its exact derivative, but the
    first-order prediction then holds only for very small dw (docs/design.md §1b).
    """
    domains = list(losses)
    if not domains:
        raise CommuteError("losses must name at least one domain.")
    if isinstance(target, str):
        if target not in losses:
            raise CommuteError(
                f"target {target!r} is not a domain in losses ({', '.join(map(repr, domains))})."
            )
        target = losses[target]
    ws = _domain_weights(weights, domains)
    n = len(ws)
    lrs = _learning_rates(lr, n)
    keys, p = _leaves(params)
    p = tuple(x.detach() for x in p)
    hp = _hyper(optimizer, keys, len(p), optimizer_kwargs)
    state = state or OptimizerState()
    m, v = _state_leaves(state, keys)
    m = None if m is None else tuple(x.detach() for x in m)
    v = None if v is None else tuple(x.detach() for x in v)
    fns = [losses[k] for k in domains]

    # forward: theta_t, m_t, v_t for t < n stored detached
    traj: list[tuple[Leaves, Leaves | None, Leaves | None]] = []
    for t in range(n):
        traj.append((p, m, v))
        live = [(ws[t][k], fns[k]) for k in range(len(fns)) if ws[t][k] != 0]
        pg = tuple(x.detach().requires_grad_(True) for x in p)
        if live:
            g = _grads(lambda q, live=live: sum(w * f(q) for w, f in live), keys, pg, False)
        else:
            g = tuple(torch.zeros_like(x) for x in p)
        with torch.no_grad():
            p, m, v = _step_leaves(p, g, m, v, state.step + t, lrs[t], hp)
    p_end, m_end, v_end = p, m, v

    # the target's gradient at theta_n starts the adjoint
    pg = tuple(x.detach().requires_grad_(True) for x in p_end)
    value = target(_rebuild(keys, pg))
    lam_p = tuple(torch.zeros_like(x) if g is None else g for x, g in zip(
        pg, torch.autograd.grad(value, pg, allow_unused=True), strict=True))
    lam_m = None if m_end is None else tuple(torch.zeros_like(x) for x in m_end)
    lam_v = None if v_end is None else tuple(torch.zeros_like(x) for x in v_end)

    G = torch.zeros(n, len(domains), dtype=p_end[0].dtype, device=p_end[0].device)
    for t in range(n - 1, -1, -1):
        G[t], lam_p, lam_m, lam_v = _adjoint_step(
            fns, keys, traj[t], ws[t], state.step + t, lrs[t], hp, lam_p, lam_m, lam_v
        )
        traj[t] = ((), None, None)  # free theta_t as soon as it is used
    return ScheduleResponse(
        G={k: G[:, i].clone() for i, k in enumerate(domains)},
        params=_rebuild(keys, p_end),
        state=_make_state(state.step + n, keys, m_end, v_end),
        loss=float(value.detach()),
        n_grad=n * (len(domains) + 1) + 1,
        n_vjp=n,
    )


def _adjoint_step(
    fns: Sequence[Loss],
    keys: list[str] | None,
    z: tuple[Leaves, Leaves | None, Leaves | None],
    w_t: Sequence[float],
    step: int,
    lr: float,
    hp: _Hyper,
    lam_p: Leaves,
    lam_m: Leaves | None,
    lam_v: Leaves | None,
) -> tuple[Tensor, Leaves, Leaves | None, Leaves | None]:
    """One step back: (G(t), lambda_t) from lambda_{t+1} by one VJP of U_t at z_t = (theta_t, m_t, v_t).

    The step's graph: theta_t, m_t, v_t and w(t) leaves; g_k(theta_t) with ``create_graph`` (K backwards);
    g_mix = sum_k w_k g_k; U_t. Then grad <lambda_{t+1}, U_t> w.r.t. (theta_t, m_t, v_t, w(t)) is
    (lambda_t, G(t)) in one reverse pass, the theta part running through g_mix (the H_mix product).
    """
    p0, m0, v0 = z
    p = tuple(x.detach().requires_grad_(True) for x in p0)
    m = None if m0 is None else tuple(x.detach().requires_grad_(True) for x in m0)
    v = None if v0 is None else tuple(x.detach().requires_grad_(True) for x in v0)
    w = torch.tensor(w_t, dtype=p[0].dtype, device=p[0].device, requires_grad=True)
    gks = [_grads(f, keys, p, True) for f in fns]
    p2, m2, v2 = _step_leaves(p, _mix(w, gks), m, v, step, lr, hp)
    outs, gouts = list(p2), list(lam_p)
    if m2 is not None:
        outs += m2
        gouts += lam_m if lam_m is not None else [torch.zeros_like(x) for x in m2]
    if v2 is not None:
        outs += v2
        gouts += lam_v if lam_v is not None else [torch.zeros_like(x) for x in v2]
    live = [(o, go) for o, go in zip(outs, gouts, strict=True) if o.requires_grad]
    inputs = list(p) + list(m or ()) + list(v or ()) + [w]
    grads = torch.autograd.grad([o for o, _ in live], inputs, [go for _, go in live], allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g.detach() for x, g in zip(inputs, grads, strict=True)]
    np_, nm = len(p), 0 if m is None else len(m)
    new_p = tuple(grads[:np_])
    new_m = None if m is None else tuple(grads[np_: np_ + nm])
    new_v = None if v is None else tuple(grads[np_ + nm: -1])
    return grads[-1], new_p, new_m, new_v


def schedule_gradient(
    losses: Mapping[str, Loss],
    params: Params,
    weights: Sequence[Mapping[str, float]],
    lr: float | Sequence[float],
    target: Loss | str,
    optimizer: OptimizerName = "gd",
    state: OptimizerState | None = None,
    **optimizer_kwargs: object,
) -> dict[str, Tensor]:
    """G_k(t) = dL_target(theta_end)/dw_k(t), domain -> tensor [steps]: :func:`schedule_response`'s ``G``."""
    return schedule_response(losses, params, weights, lr, target, optimizer, state, **optimizer_kwargs).G


# --------------------------------------------------------------------------------------------------
# predictions
# --------------------------------------------------------------------------------------------------
def predicted_change(G: Mapping[str, Tensor], delta_w: Mapping[str, Tensor | Sequence[float]]) -> float:
    """First-order change of the target loss for a schedule perturbation dw (docs/design.md §1b)::

        Delta L = sum_t sum_k dw_k(t) G_k(t) + O(dw^2)

    exact as dw -> 0 at any horizon. ``delta_w``: domain -> dw_k(t) over the same steps as ``G`` (absent
    domains: 0).
    """
    stray = [k for k in delta_w if k not in G]
    if stray:
        raise CommuteError(f"delta_w names domain(s) {', '.join(map(repr, stray))} that G does not have.")
    total = 0.0
    for k, dw in delta_w.items():
        g = G[k]
        d = torch.as_tensor(dw, dtype=g.dtype, device=g.device)
        if d.shape != g.shape:
            raise CommuteError(
                f"delta_w[{k!r}] has shape {tuple(d.shape)} but G[{k!r}] has shape {tuple(g.shape)}."
            )
        total += float(torch.dot(d.reshape(-1), g.reshape(-1)))
    return total


def intervention_delta(intervention: Intervention, steps: int, start: int = 0) -> dict[str, Tensor]:
    """dw(t) of the paper's eq. 9/10 intervention against its base, over a window of ``steps`` steps.

    Step t of the window is training step ``start + t``; dw_k(t) = w^{12}_k(start + t) - base_k, i.e.
    +Delta w on ``first`` and -Delta w on ``second`` for t0 <= start + t < t0 + T, the opposite for the
    next T steps, 0 elsewhere (float64). The window must contain [t0, t0 + 2T).
    """
    if intervention.t0 < start or intervention.end > start + steps:
        raise CommuteError(
            f"the intervention's steps [{intervention.t0}, {intervention.end}) are not inside the window "
            f"[{start}, {start + steps})."
        )
    base = intervention.base
    rows = [intervention(start + t) for t in range(steps)]
    return {k: torch.tensor([r[k] - base[k] for r in rows], dtype=torch.float64) for k in base}


def antisymmetric_excess(G: Mapping[str, Tensor], intervention: Intervention, start: int = 0) -> float:
    """Predicted antisymmetric excess (EL^12 - EL^21) / 2 of an eq. 9/10 intervention (docs/design.md §1b).

    The mirrored schedule w^{21} has dw^{21} = -dw^{12}, so to first order EL^12 = sum dw^{12} G =
    -EL^21, and the antisymmetric part, odd in Delta w, is::

        (EL^12 - EL^21) / 2 = sum_t sum_k dw^{12}_k(t) G_k(t) + O(Delta w^3)

    at any horizon, with G of the base schedule over a window whose step 0 is training step ``start``. As
    gamma T -> 0 for gradient descent this tends to the bracket's gamma^2 Delta w T^2 P (docs/design.md §1).
    """
    steps = len(next(iter(G.values())))
    return predicted_change(G, intervention_delta(intervention, steps, start))


def cubic_node(delta_w: float) -> float:
    """Delta w / sqrt(3): +- this are the two-point Gauss-Legendre nodes of the integral over
    [-Delta w, Delta w] that :func:`antisymmetric_excess_cubic` evaluates."""
    return float(delta_w) / math.sqrt(3.0)


def cubic_nodes(intervention: Intervention) -> tuple[Intervention, Intervention]:
    """The two schedules at which :func:`antisymmetric_excess_cubic` needs G: the same intervention with
    :func:`cubic_node` (Delta w) for its Delta w, and its mirror (base +- (Delta w / sqrt(3)) dw(t) /
    Delta w)."""
    iv = intervention
    node = Intervention(iv.base, iv.first, iv.second, cubic_node(iv.delta_w), iv.t0, iv.T)
    return node, node.reversed()


def antisymmetric_excess_cubic(G_plus: Mapping[str, Tensor], G_minus: Mapping[str, Tensor],
                               intervention: Intervention, start: int = 0) -> float:
    """(EL^12 - EL^21) / 2 through the Delta w^3 term, from G at the two :func:`cubic_nodes` schedules.

    With L(eps) the loss after base + eps u(t) (u = dw^{12} / Delta w), f = (EL^12 - EL^21)/2 = 1/2
    int_{-Delta w}^{Delta w} L'(eps) d eps, and the two-point Gauss rule at eps = +-Delta w/sqrt(3) is exact
    for L' cubic::

        f = 1/2 sum_t dw^{12}(t) . [G(t; +Delta w/sqrt 3) + G(t; -Delta w/sqrt 3)] + O(Delta w^5)

    where the first-order :func:`antisymmetric_excess` is off by O(Delta w^3) (its Delta w^3 term). Costs
    two schedule gradients, along the node schedules' own trajectories.
    """
    return 0.5 * (antisymmetric_excess(G_plus, intervention, start)
                  + antisymmetric_excess(G_minus, intervention, start))



# --------------------------------------------------------------------------------------------------
# reading a torch optimiser (its state dict numbers the parameters; the names come from the caller)
# --------------------------------------------------------------------------------------------------
def _flat_names(param_names: Any) -> list[str]:
    """Parameter names in a state dict's numbering: a flat list, or one list per parameter group."""
    if isinstance(param_names, Sequence) and not isinstance(param_names, str):
        if all(isinstance(n, str) for n in param_names):
            return list(param_names)
        if all(isinstance(g, Sequence) and not isinstance(g, str) and all(isinstance(n, str) for n in g)
               for g in param_names):
            return [n for g in param_names for n in g]
    raise CommuteError("param_names must list the parameter names in the state dict's order, flat or one "
                       "list per parameter group (as commute.train.param_group_names gives).")


def _state_dict_indices(state_dict: Any, names: Sequence[str]) -> list[Any]:
    try:
        indices = [i for g in state_dict["param_groups"] for i in g["params"]]
        if not isinstance(state_dict["state"], Mapping):
            raise TypeError
    except (KeyError, TypeError, AttributeError):
        raise CommuteError("not a torch optimizer state dict (it needs 'state' and 'param_groups' with "
                           "'params').") from None
    if len(indices) != len(names):
        raise CommuteError(f"the optimizer state dict has {len(indices)} parameters but {len(names)} names "
                           "were given for them.")
    return indices


def optimizer_settings(
    optimizer: torch.optim.Optimizer | Mapping[str, Any], param_names: Any = None
) -> tuple[OptimizerName, dict[str, object]]:
    """``(name, optimizer_kwargs)`` of a torch SGD/Adam/AdamW, or of its ``state_dict()``, for
    :func:`optimizer_step`, :func:`schedule_response` and :class:`ResponseEstimator`.

    Reads ``momentum``, ``dampening``, ``nesterov`` (SGD), ``betas``, ``eps`` (Adam/AdamW; AdamW from the
    class or the groups' ``decoupled_weight_decay``) and ``weight_decay``: one float when every parameter
    group has the same, else a mapping parameter name -> decay, which needs ``param_names`` (for an
    optimiser: a dict name -> the tensor it optimises; for a state dict: the names in its numbering, as for
    :meth:`OptimizerState.from_state_dict`). The learning rate is not read (pass the run's, per step).
    ``amsgrad``, ``maximize`` and settings that differ between groups (other than the decay) are refused.
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        groups: Sequence[Mapping[str, Any]] = optimizer.param_groups
        if isinstance(optimizer, torch.optim.SGD):
            kind = "sgd"
        elif isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            decoupled = groups[0].get("decoupled_weight_decay") or isinstance(optimizer, torch.optim.AdamW)
            kind = "adamw" if decoupled else "adam"
        else:
            raise CommuteError(f"cannot read the settings of {type(optimizer).__name__}; supported: SGD, "
                               "Adam, AdamW.")
        by_id = {} if param_names is None else {id(t): k for k, t in dict(param_names).items()}
        group_names = [[by_id.get(id(p)) for p in g["params"]] for g in groups]
    elif isinstance(optimizer, Mapping):
        flat = None if param_names is None else _flat_names(param_names)
        if flat is not None:
            _state_dict_indices(optimizer, flat)
        groups = optimizer.get("param_groups")
        if not isinstance(groups, Sequence) or not all(isinstance(g, Mapping) and "params" in g
                                                       for g in groups):
            raise CommuteError("not a torch optimizer state dict (it needs 'param_groups' with 'params').")
        first = groups[0] if groups else {}
        if "momentum" in first:
            kind = "sgd"
        elif "betas" in first:
            kind = "adamw" if first.get("decoupled_weight_decay") else "adam"
        else:
            raise CommuteError("cannot tell the optimizer from the state dict's parameter groups; supported: "
                               "SGD, Adam, AdamW.")
        it = iter(flat if flat is not None else [None] * sum(len(g["params"]) for g in groups))
        group_names = [[next(it) for _ in g["params"]] for g in groups]
    else:
        raise CommuteError(f"expected a torch optimizer or its state dict, got {type(optimizer).__name__}.")
    for flag in ("amsgrad", "maximize"):
        if any(g.get(flag) for g in groups):
            raise CommuteError(f"the optimizer uses {flag}=True, which the response does not support.")
    shared = {"sgd": ("momentum", "dampening", "nesterov"), "adam": ("betas", "eps"),
              "adamw": ("betas", "eps")}[kind] + ("lr",)
    kwargs: dict[str, object] = {}
    for key in shared:
        values = {tuple(g[key]) if isinstance(g[key], list | tuple) else g[key] for g in groups if key in g}
        if len(values) > 1:
            raise CommuteError(f"the optimizer's parameter groups have different {key} ({sorted(values)}); "
                               "the response supports one value for all.")
        if values and key != "lr":
            kwargs[key] = values.pop()
    decays = [float(g.get("weight_decay", 0.0)) for g in groups]
    if len(set(decays)) <= 1:
        kwargs["weight_decay"] = decays[0] if decays else 0.0
    else:
        if any(n is None for names in group_names for n in names):
            raise CommuteError("the optimizer's groups have different weight decays; pass param_names to "
                               "name the parameters of each group.")
        kwargs["weight_decay"] = {n: d for names, d in zip(group_names, decays, strict=True) for n in names}
    return kind, kwargs  # type: ignore[return-value]


_ESTIMATOR = ("ResponseEstimator", "ResponseReport", "Replay", "NoiseMode")


def __getattr__(name: str) -> Any:
    """The estimator's names, from :mod:`commute.response_estimator` (imported on first use)."""
    if name in _ESTIMATOR:
        from commute import response_estimator

        return getattr(response_estimator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
