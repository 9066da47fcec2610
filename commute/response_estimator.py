"""The schedule's linear response on a real, noisy run: :class:`ResponseEstimator` and its report.

The maths is :mod:`commute.response` (the exact, full-batch adjoint sweep, docs/design.md §1b); this module
applies it to a model, its checkpointed optimiser state, the run's own training batches and independent
per-domain batch streams, with mini-batch estimates, a calibrated stderr and (Adam) the sampling-noise
channel. ``from commute.response import ResponseEstimator`` keeps working.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from commute.bracket import graph_hvps
from commute.curvature import math_attention
from commute.distributed import GroupSplit, estimate_world
from commute.errors import CommuteError
from commute.estimate import (
    Estimate,
    LossFn,
    TargetsArg,
    _dot,
    _resolve_targets,
    _restore_modes,
    _to_device,
    _weights_vector,
    check_loss,
    check_target_data,
    check_token_ids,
    combine,
    domain_index,
    mean_loss_grad,
)
from commute.io import JsonRoundTrip
from commute.progress import Progress
from commute.response import (
    Leaves,
    OptimizerName,
    OptimizerState,
    _hyper,
    _learning_rates,
    _make_state,
    _step_leaves,
    intervention_delta,
    optimizer_settings,
)
from commute.schedule import Intervention

__all__ = ["ResponseEstimator", "ResponseReport", "Replay", "NoiseMode"]

NoiseMode = Literal["exact", "sample", "rows"]
AdjointMode = Literal["fresh", "train"]
Part = Literal["total", "noise", "mean_field"]

TrainBatches = Sequence[Any] | Iterable[Any] | Callable[[int], Any]
WeightsArg = Sequence[Mapping[str, float]] | Callable[[int], Mapping[str, float]]
LrArg = float | Sequence[float] | Callable[[int], float]


class _Call(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that ``functional_call`` evaluates it at any parameters."""

    def __init__(self, model: nn.Module, fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: Any) -> Tensor:
        return self.fn(self.model, batch)


@dataclass(frozen=True)
class Replay:
    """The window replayed as trained (:meth:`ResponseEstimator.replay`): theta_end and the optimiser state
    after it (detached, keyed by parameter name), and each step's training-batch loss."""

    params: dict[str, Tensor]
    state: OptimizerState
    losses: list[float]

    def rel_error(self, model: nn.Module) -> float:
        """|theta_replayed - theta_model| / |theta_model| over the trained parameters (those the replay
        carries; float64; nan if they are 0): compare with the run's checkpoint at the window's end to check
        that the replay is the run."""
        ref = dict(model.named_parameters())
        num = sum(float((x.double() - ref[k].detach().double().to(x.device)).pow(2).sum())
                  for k, x in self.params.items())
        den = sum(float(ref[k].detach().double().pow(2).sum()) for k in self.params)
        return math.sqrt(num / den) if den > 0 else math.nan


class ResponseEstimator:
    """G_k(t) = dL(theta_end)/dw_k(t) on a real, noisy run, for population losses, with a stderr.

    **The map.** From a checkpoint (theta_t0 and the optimiser state) the window's n steps are replayed
    exactly as training did them: step t's own training batch B_t gives g_t = grad loss(theta_t; B_t) and
    (theta, m, v)_{t+1} = U_t(theta_t, m_t, v_t; g_t) with :func:`optimizer_step`'s arithmetic (torch's
    update), so the replayed theta_t are training's. The schedule enters through the batches' composition:
    E[g_t | theta_t] = g_mix(theta_t) = sum_k w_k(t) g_k(theta_t) with g_k = grad L_k the *population*
    gradients. The response linearises the map around the trajectory with that mean (docs/design.md §1b):
    U_t's Jacobian is evaluated at the trajectory (theta_t, m_t, v_t, g_t), and the batch gradient's
    derivatives are replaced by their population values, d g / d theta = H_mix(theta_t) = sum_k w_k(t)
    H_k(theta_t) and d g / d w_k(t) = g_k(theta_t). With z = (theta, m, v) and target L = sum_k c_k L_k::

        lambda_n = (grad L(theta_n), 0, 0)
        (a_theta, a_m, a_v, a_g) = (dU_t/d(theta, m, v, g))^T lambda_{t+1}          (one VJP of U_t)
        G_k(t)   = < a_g, g_k(theta_t) >
        lambda_t = (a_theta + H_mix(theta_t) a_g, a_m, a_v)

    For GD, a_theta = lambda_{t+1} and a_g = -gamma_t lambda_{t+1}: G_k(t) = -gamma_t <lambda_{t+1}, g_k>
    and lambda_t = lambda_{t+1} - gamma_t H_mix lambda_{t+1}. With full batches this is exactly
    :func:`schedule_response`.

    **The first-order alignment baseline** G0 comes from the same samples at no extra gradient or HVP:
    the adjoint is not propagated, every step sees lambda_n, G0_k(t) = < a0_g, g_k(theta_t) > with a0_g
    the g-part of (dU_t/dg)^T (grad L(theta_n), 0, 0) (for GD: -gamma_t <grad L(theta_n), g_k(theta_t)>).
    It has no curvature and no optimiser-state carry-over: the difference G - G0 is what they contribute
    (and, with ``noise``, the sampling-noise channel, which G0 leaves out).

    **Estimation.** Every population quantity comes from the independent per-domain ``streams``:
    grad L(theta_n) from ``target_batches`` fresh batches per domain (or, with ``target_data``, exactly on
    a fixed held-out set: the loss an evaluation reports); at step t, ``batches_per_step``
    fresh batches per domain give ghat_k(theta_t) and (the same batches) Hhat_mix a_g. The same batch may
    serve both because they never multiply each other: G_k(t) uses ghat_k(t) and lambda_{t+1}, which holds
    the batches of steps > t and the target's only; lambda_t, which holds Hhat_mix(t), feeds G only at steps
    < t. Every term of G_k(t) is thus a product of factors from *different* independent batches, each an
    unbiased estimate of its population value, and U_t's Jacobian is fixed given the trajectory (for
    Adam/AdamW too: it is evaluated at the actual training gradient g_t, not at an estimate), so G is
    multilinear in independent unbiased factors and E[G | trajectory] is the population answer above (the
    same holds for G0). The draws are split into ``n_groups`` independent groups, each a full sweep with
    its own batches; stderr = std over groups / sqrt(G) is calibrated (Student t, G - 1 degrees of
    freedom), as for :class:`~commute.estimate.BracketEstimator`, **for this trajectory**. In noisy
    training G varies from one realisation of the window's batches to another far more than that (tiny
    GPT-2, Adam, 40 steps: ten times the stderr over groups); to predict the mean over realisations,
    estimate along several trajectories (the study's ``response.trajectories``: one estimator call per
    replay under another sampler seed) and take the stderr over them.

    **Cost.** The replay: one training-batch gradient per step, once (a training step's cost). Then per
    step per group, with b = ``batches_per_step``: b K domain gradients (with ``create_graph`` for the
    domains with w_k(t) != 0, from t = 1 on: lambda_0 is never needed), M Hessian-vector products on each
    such graph (M targets, sharing it with ``retain_graph``: together M double backwards through the
    step's fresh batches), and 2M VJPs of the elementwise update U_t. Per group once: K ``target_batches``
    gradients at theta_n. So with fresh batches of the K domains adding up to one training batch and one
    target, a group costs about 1 + 2 = 3 training steps per step (a graph gradient costs about a
    gradient, an HVP about 2, docs/design.md §2), and the window 1 + 3G times training it. Measured (tiny
    GPT-2, 2 layers, n_embd 64, batches of 64 tokens, one CPU thread, CPU time, AdamW, K = 2): per step per
    group 3.2x a training step of 20 sequences with fresh batches of 10 + 10 sequences (2.8x for GD), 1.9x
    with 5 + 5, 1.6x with 3 + 3 (small batches cost more per sequence), 6.4x with M = 3 targets and
    10 + 10; the replay 1.0-1.1x. With G = 4 groups of 5 + 5 a window costs about 9 trainings of it.
    Memory: the trajectory, detached (theta_t; plus m_t for SGD with momentum; plus m_t, v_t and g_t for
    Adam/AdamW: n, 2n or 4n copies of the parameters, ``store_device="cpu"`` keeps them in host memory;
    with ``noise="rows"`` or ``adjoint="train"`` also the window's training rows, where the batches put them),
    for the step in hand about 7M + K + 4 copies for Adam, 5M + K + 1 for GD (pulled-back adjoints,
    grad L(theta_n), accumulators; with ``noise`` about 4K + M more: the per-domain second moments and shifts,
    the update's curvature per target and the variance derivatives), and the autograd graph of one fresh
    batch of one domain at a time: never a graph across steps.

    The model runs in eval mode, so a run trained with dropout is not replayed exactly (commute's presets
    have none); gradient clipping is not replayed either.

    Args:
        model: an ``nn.Module``, used functionally (``torch.func.functional_call`` with one tensor per
            parameter, tied GPT-2 embeddings once): never moved, cast or updated, ``.grad`` never touched.
            It is put in ``eval()`` mode (dropout off) while estimating and its modes are restored. Its
            current parameters are theta_t0, the window's start.
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the mean loss over the batch (the contract of
            :class:`~commute.estimate.BracketEstimator`), e.g. :func:`commute.model.lm_loss`.
        streams: domain -> iterable of independent random batches (e.g. ``TokenizedDomain.batches`` with
            seeds unused by training); ``iter()`` is called again at each :meth:`estimate`.
        lr: the learning rate: one float, one per window step, or a callable training step -> lr (e.g.
            ``lambda s: commute.train.lr_at(config, s)``).
        optimizer: ``"gd"``, ``"sgd"``, ``"adam"`` or ``"adamw"`` with ``optimizer_kwargs`` as
            :func:`optimizer_step`. Default: read from ``state`` when it is a torch optimiser or its state
            dict (:func:`optimizer_settings`), else ``"gd"``.
        state: the optimiser state at theta_t0: an :class:`OptimizerState` keyed by parameter name, a
            ``torch.optim`` SGD/Adam/AdamW over the model's parameters, or its ``state_dict()`` (e.g. a
            checkpoint's) with ``state_names`` naming its parameters in order (a flat list, or one list per
            group: :func:`commute.train.param_group_names` for runs of :func:`commute.train.train`).
            Default: a fresh optimiser.
        parameters: the parameters trained (default: every parameter with ``requires_grad``, tied tensors
            once); the others stay fixed.
        train_loss_fn: the loss of a *training* batch, if not ``loss_fn``: e.g. the domain-weighted loss
            of ``loss_weighting="domain"``, or an average over gradient-accumulation micro-batches.
        store_device: where the trajectory is kept (default: the model's device).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        streams: Mapping[str, Iterable[Any]],
        *,
        lr: LrArg,
        optimizer: OptimizerName | None = None,
        state: OptimizerState | torch.optim.Optimizer | Mapping[str, Any] | None = None,
        state_names: Any = None,
        parameters: Iterable[nn.Parameter] | None = None,
        train_loss_fn: LossFn | None = None,
        store_device: str | torch.device | None = None,
        **optimizer_kwargs: object,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise CommuteError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not callable(loss_fn) or (train_loss_fn is not None and not callable(train_loss_fn)):
            raise CommuteError("loss_fn (and train_loss_fn) must be callable as loss_fn(model, batch) -> "
                               "mean loss.")
        if not isinstance(streams, Mapping) or not streams:
            raise CommuteError("streams must map at least one domain name to an iterable of batches.")
        self.model = model
        self.loss_fn = loss_fn
        self.train_loss_fn = train_loss_fn or loss_fn
        self.streams: dict[str, Iterable[Any]] = {str(k): v for k, v in streams.items()}
        self.lr = lr
        self.names, self.params = _trained_parameters(model, parameters)
        self.device, self.dtype = self.params[0].device, self.params[0].dtype
        self.store_device = torch.device(store_device) if store_device is not None else self.device
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        self.vocab_size: int | None = int(vocab) if isinstance(vocab, int) and vocab > 0 else None
        self._train = _Call(model, self.train_loss_fn)
        self._eval = _Call(model, loss_fn)

        settings = None
        if isinstance(state, torch.optim.Optimizer):
            named = dict(zip(self.names, self.params, strict=True))
            settings = optimizer_settings(state, named) if optimizer is None else None
            state = OptimizerState.from_torch(state, named)
        elif isinstance(state, Mapping):
            if state_names is None:
                raise CommuteError("an optimizer state dict needs state_names, the parameter names in its "
                                   "order (e.g. commute.train.param_group_names(model)).")
            settings = optimizer_settings(state, state_names) if optimizer is None else None
            state = OptimizerState.from_state_dict(state, state_names)
        elif state is not None and not isinstance(state, OptimizerState):
            raise CommuteError(f"state must be an OptimizerState, a torch optimizer or its state dict, got "
                               f"{type(state).__name__}.")
        state = state or OptimizerState()
        if settings is not None:
            if optimizer_kwargs:
                raise CommuteError("optimizer keyword arguments need an explicit optimizer=...; without it "
                                   "they are read from the torch optimizer state.")
            optimizer, optimizer_kwargs = settings
        if optimizer is None:
            if state.m is not None or state.v is not None:
                raise CommuteError("the optimizer state has moments; name the optimizer (optimizer='adam', "
                                   "'adamw' or 'sgd').")
            optimizer = "gd"
        self.optimizer: str = optimizer
        self.optimizer_kwargs = dict(optimizer_kwargs)
        self._hp = _hyper(optimizer, self.names, len(self.params), optimizer_kwargs)
        self.state = state
        self._m0, self._v0 = self._state_leaves(state)
        self.n_grad = self.n_graph = self.n_hvp = self.n_vjp = 0  # lifetime counters

    # ---- inputs ------------------------------------------------------------------------------------
    def _state_leaves(self, state: OptimizerState) -> tuple[Leaves | None, Leaves | None]:
        if self._hp.name == "gd":
            return None, None
        out = []
        for what, tree in (("m", state.m), ("v", state.v)):
            if tree is None or (what == "v" and self._hp.name == "sgd"):
                out.append(None)
                continue
            if not isinstance(tree, Mapping):
                raise CommuteError("the optimizer state must be keyed by parameter name.")
            missing = [k for k in self.names if k not in tree]
            if missing:
                more = " ..." if len(missing) > 3 else ""
                raise CommuteError(f"the optimizer state has no {what} for parameter(s) "
                                   f"{', '.join(map(repr, missing[:3]))}{more}.")
            leaves = []
            for k, p in zip(self.names, self.params, strict=True):
                x = tree[k]
                if tuple(x.shape) != tuple(p.shape):
                    raise CommuteError(f"the optimizer state's {what} of {k!r} has shape "
                                       f"{tuple(x.shape)} but the parameter has {tuple(p.shape)} (are the "
                                       "state's names in its order?).")
                leaves.append(x.detach().to(device=self.device, dtype=self.dtype).clone())
            out.append(tuple(leaves))
        if self._hp.name in ("adam", "adamw") and (out[0] is None) != (out[1] is None):
            raise CommuteError("an Adam state needs both exp_avg (m) and exp_avg_sq (v), or neither.")
        return out[0], out[1]

    def _window(self, weights: WeightsArg, steps: int | None, start: int) -> list[list[float]]:
        domains = list(self.streams)
        if callable(weights) and not isinstance(weights, Mapping):
            if steps is None:
                raise CommuteError("weights given as a schedule need steps=, the window's length.")
            weights = [weights(start + t) for t in range(int(steps))]
        if isinstance(weights, Mapping) or not isinstance(weights, Sequence) or len(weights) == 0:
            raise CommuteError("weights must be a schedule (step -> weights) or a non-empty sequence with "
                               "one mapping domain -> weight per step.")
        if steps is not None and len(weights) != int(steps):
            raise CommuteError(f"weights has {len(weights)} steps but steps={steps}.")
        out = []
        for t, w in enumerate(weights):
            if not isinstance(w, Mapping):
                raise CommuteError(f"the weights of step {start + t} must be a mapping domain -> weight, got "
                                   f"{w!r}.")
            stray = [k for k in w if k not in self.streams]
            if stray:
                raise CommuteError(f"the weights of step {start + t} name domain(s) "
                                   f"{', '.join(map(repr, stray))} that have no stream (the streams are "
                                   f"{', '.join(map(repr, domains))}).")
            row = [float(w.get(k, 0.0)) for k in domains]
            if not all(math.isfinite(x) for x in row):
                raise CommuteError(f"the weights of step {start + t} are not finite: {dict(w)}.")
            out.append(row)
        return out

    def _lrs(self, n: int, start: int) -> list[float]:
        if callable(self.lr):
            lrs = [float(self.lr(start + t)) for t in range(n)]
        else:
            lrs = _learning_rates(self.lr, n)
        if not all(math.isfinite(x) and x >= 0 for x in lrs):
            raise CommuteError(f"the learning rates must be finite and >= 0, got {lrs}.")
        return lrs

    def _train_batches(self, train_batches: TrainBatches, n: int, start: int) -> Iterator[Any]:
        if callable(train_batches):
            return (train_batches(start + t) for t in range(n))
        if isinstance(train_batches, Sequence) and not isinstance(train_batches, str):
            if len(train_batches) != n:
                raise CommuteError(f"train_batches has {len(train_batches)} batches but the window has {n} "
                                   "steps (one per entry of weights).")
            return iter(train_batches)
        if isinstance(train_batches, Iterable):
            it = iter(train_batches)

            def take() -> Iterator[Any]:
                for t in range(n):
                    try:
                        yield next(it)
                    except StopIteration:
                        raise CommuteError(f"train_batches ran out after {t} batches; the window has {n} "
                                           "steps.") from None

            return take()
        raise CommuteError("train_batches must be a sequence of batches, an iterator, or a callable training "
                           f"step -> batch, got {type(train_batches).__name__}.")

    # ---- one loss, one gradient --------------------------------------------------------------------
    def _loss(self, call: _Call, name: str, batch: Any, leaves: Leaves) -> Tensor:
        batch = _to_device(batch, self.device, self.dtype)
        self._check_token_ids(name, batch)
        tensors = {f"model.{k}": x for k, x in zip(self.names, leaves, strict=True)}
        return check_loss(torch.func.functional_call(call, tensors, (batch,), tie_weights=True, strict=False),
                          name)

    def _check_token_ids(self, name: str, batch: Any) -> None:
        check_token_ids(self.vocab_size, name, batch)

    def _grad(self, loss: Tensor, leaves: Leaves, create_graph: bool = False) -> tuple[Tensor | None, ...]:
        gs = torch.autograd.grad(loss, leaves, create_graph=create_graph, allow_unused=True)
        if all(g is None for g in gs):
            raise CommuteError("loss_fn's result has no gradient path to the trained parameters.")
        if create_graph:
            self.n_graph += 1
        else:
            self.n_grad += 1
        return gs

    def _next(self, name: str, it: Iterator[Any], used: dict[str, int]) -> Any:
        try:
            batch = next(it)
        except StopIteration:
            raise CommuteError(f"domain {name!r} ran out of batches after {used[name]}; give an infinite "
                               "iterator or more batches.") from None
        used[name] += 1
        return batch

    def _counters(self) -> tuple[int, int, int, int]:
        return self.n_grad, self.n_graph, self.n_hvp, self.n_vjp

    def _store(self, x: Leaves | None) -> Leaves | None:
        return None if x is None else tuple(t.detach().to(self.store_device) for t in x)

    def _load(self, x: Leaves | None) -> Leaves | None:
        return None if x is None else tuple(t.to(self.device) for t in x)

    # ---- the replay --------------------------------------------------------------------------------
    def _replay(
        self, train_batches: TrainBatches, n: int, start: int, lrs: Sequence[float], keep: bool,
        tick: Callable[[], None], rows_fn: Callable[[Any], Mapping[str, Any]] | None = None,
    ) -> tuple[list[tuple], Leaves, Leaves | None, Leaves | None, list[float]]:
        """theta_t (m_t, v_t, g_t; with ``rows_fn`` the batch's rows by domain index) for t < n (stored if
        ``keep``), and theta_n, m_n, v_n, batch losses."""
        p = tuple(x.detach() for x in self.params)
        m, v = self._m0, self._v0
        step0 = self.state.step
        adam = self._hp.name in ("adam", "adamw")
        traj: list[tuple] = []
        losses = []
        for t, batch in enumerate(self._train_batches(train_batches, n, start)):
            q = tuple(x.detach().requires_grad_(True) for x in p)
            loss = self._loss(self._train, f"the training batch of step {start + t}", batch, q)
            losses.append(float(loss.detach()))
            gs = self._grad(loss, q)
            g = tuple(torch.zeros_like(x) if d is None else d for x, d in zip(q, gs, strict=True))
            if keep:  # U_t is linear in g except for Adam: only Adam's Jacobian needs g_t
                rows = None if rows_fn is None else self._split_rows(rows_fn, batch, start + t)
                traj.append(tuple(self._store(x) for x in (p, m, v, g if adam else None)) + (rows,))
            with torch.no_grad():
                p, m, v = _step_leaves(p, g, m, v, step0 + t, lrs[t], self._hp)
            tick()
        return traj, p, m, v, losses

    def replay(
        self, train_batches: TrainBatches, steps: int, *, start: int = 0, progress: bool = False
    ) -> Replay:
        """Replay ``steps`` training steps from theta_t0 on ``train_batches`` (as :meth:`estimate` does) and
        return theta_end, the optimiser state and the batch losses: compare them with the checkpoint at the
        window's end to check that the replay is the run (same batches, learning rates, optimiser)."""
        n = int(steps)
        if n < 1:
            raise CommuteError(f"steps must be >= 1, got {steps}.")
        lrs = self._lrs(n, start)
        with self._context(progress, "replay", n) as bar:
            _, p, m, v, losses = self._replay(train_batches, n, start, lrs, False, bar.advance)
        keys = list(self.names)
        return Replay(dict(zip(keys, p, strict=True)), _make_state(self.state.step + n, keys, m, v), losses)

    @contextmanager
    def _context(self, progress: bool, what: str, total: int) -> Iterator[Progress]:
        modes = [(mod, mod.training) for mod in self.model.modules()]
        with ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(math_attention())
            bar = stack.enter_context(Progress(what, total, enabled=progress, unit="steps", transient=True))
            self.model.eval()
            stack.callback(_restore_modes, modes)
            yield bar

    # ---- the estimate ------------------------------------------------------------------------------
    def estimate(
        self,
        train_batches: TrainBatches,
        weights: WeightsArg,
        targets: TargetsArg = None,
        *,
        steps: int | None = None,
        start: int = 0,
        n_groups: int = 4,
        batches_per_step: int = 1,
        target_batches: int | None = None,
        target_data: Mapping[str, Sequence[Any]] | None = None,
        noise: NoiseMode | None = None,
        train_batch_size: int | None = None,
        train_rows: Callable[[Any], Mapping[str, Any]] | None = None,
        adjoint: AdjointMode | None = None,
        progress: bool = False,
        distributed: bool = False,
    ) -> ResponseReport:
        """G_k(t) and G0_k(t) for every domain, window step and target, in ``n_groups`` groups.

        Args:
            train_batches: the window's training batches, as trained: a sequence (one per step), an
                iterator, or a callable training step -> batch, called once per step in order (e.g.
                ``lambda s: sampler.next_batch(schedule(s))`` with a ``MixtureSampler`` restored from the
                checkpoint).
            weights: the schedule w_k(t) that composed those batches: one mapping domain -> weight per
                step (absent domains: 0), or a callable training step -> weights (e.g. a
                :class:`commute.schedule.Schedule`) with ``steps``.
            targets: None for each domain's loss plus their uniform mix, a list of those names, or a dict
                name -> domain weights (L = sum_k c_k L_k), as for ``BracketEstimator``.
            steps: the window's length n (default: ``len(weights)``).
            start: the training step of the window's first step (callables get ``start + t``).
            n_groups: G >= 2 independent groups (stderr = std over groups / sqrt(G)).
            batches_per_step: fresh batches per domain per step per group.
            target_batches: fresh batches per domain for grad L(theta_end), per group (default
                ``batches_per_step``).
            target_data: domain -> a fixed list of batches on which the targets are *measured* (e.g. the
                held-out batches an evaluation reports): L_k is then the mean of the batches' mean losses
                (batches weighted equally) and
                grad L(theta_end) its exact gradient, the same in every group, instead of ``target_batches``
                fresh draws from ``streams`` (the training distribution). Give it whenever the loss you will
                compare with is a held-out one: the response of the training-split loss to the schedule is
                not that of the held-out loss (the schedule moves theta along the training data's own
                gradients; on the tiny study the two differ several-fold, docs/design.md §1b), even where
                the two losses' values agree.
            noise: Adam/AdamW only: also the **sampling-noise channel**, how the schedule moves the update
                through the training gradient's variance, for training batches of ``train_batch_size`` rows
                (B) composed ``"exact"``-ly (n_k = w_k B rows of domain k: Var g = sum_k w_k s_k^2 / B) or by
                ``"sample"`` (every row's domain drawn from w: Var g = (sum_k w_k (s_k^2 + mu_k^2) -
                mu_mix^2) / B), s_k^2 the per-row gradient variance of domain k, per coordinate. U_t is
                elementwise in g, so E[<lambda_{t+1}, U_t(g)>] moves with Var g by c = diag(d2 <lambda_{t+1},
                U_t>/dg2) / 2 (exact for Gaussian noise; one double backward of the elementwise update at the
                actual g_t): G_k(t) gains < c, dVar/dw_k >. Through v alone c would be (1 - b2)/b2 a_v; the
                rest is the curvature of m/sqrt(v) in g. s_k^2 comes from the spread of the step's
                ``batches_per_step`` (>= 2, equal rows) fresh gradients, mu_k^2 from products of different
                batches: unbiased, and independent of c. Left out, though of the same order in Var: how the
                noise moves theta and so the later steps (the curvature term 1/2 tr(H Cov theta), all of
                SGD's noise effect; ``"rows"`` has it), and how Var itself moves with theta.
                docs/design.md §1b.
                ``"rows"``: the **whole** sampling-noise channel, through theta and the optimiser state
                alike, for batches composed ``"exact"``-ly, from the training batch's own rows (any
                optimiser, no second derivative, ``batches_per_step`` >= 1). Domain k's noise in g_t is
                xi_k = (n_k / B)(ghat_k^train - gbar_k), of variance w_k s_k^2 / B, so with the noise
                written as sqrt(w_k) times a fixed deviate the update's derivative is dg_t/dw_k = gbar_k +
                xi_k / (2 w_k) (reparametrisation): G_k(t) = < a_g, gbar_k + (n_k / (B w_k))(ghat_k^train -
                gbar_k) / 2 >, with gbar_k the fresh estimate and ghat_k^train the gradient of the step's
                training rows of domain k (``train_rows``) at theta_t. Because lambda_{t+1} depends on xi_k
                through theta_{t+1}, the product's mean carries the noise's second-order effect on
                E[L(theta_n)] (Stein's lemma: exact for Gaussian noise), which the fresh estimate alone
                leaves out (docs/design.md §1b). lambda is pulled back through the training rows' own
                Hessian sum_k (n_k / B) H_k^train (the realised map's Jacobian; with fresh Hessians the mean
                misses the Hessian noise's effect, which over a window is of the same order). Cost per step
                per group: the fresh gradients without graphs, one graph gradient per domain on its training
                rows and the M HVPs on it; the replay keeps the rows. A step where domain k has no rows
                gets no noise term for it. Either channel's term is also kept on its own in the report
                (``part="noise"`` of :meth:`ResponseReport.predict`; the rest, ``part="mean_field"``, is
                what the schedule does through the gradient's mean).
            train_batch_size: B, the rows of one training batch (with ``noise="exact"`` or ``"sample"``).
            train_rows: with ``noise="rows"`` or ``adjoint="train"``: training batch -> {domain: that
                domain's rows of it, a batch ``loss_fn`` takes} (absent or empty: no rows); for commute's
                sampler, :meth:`commute.data.Batch.by_domain`.
            adjoint: how lambda is pulled back. ``"fresh"`` (the default without the rows channel): through
                the fresh batches' Hessian estimate, the population linearisation along the trajectory.
                ``"train"`` (the rows channel's, and its default): through the training batch's own rows,
                sum_k (n_k / B) H_k^train, the realised map's Jacobian, needing ``train_rows``. With
                ``noise=None`` that is the exact pathwise derivative of a run in which the schedule moves
                only the mean gradient (by delta w_k gbar_k, gbar_k from the fresh batches), so its mean over
                replays is the mean-field derivative: the fresh estimate's target, without the Hessian
                noise that a fresh adjoint multiplies over the window (on the tiny study's window its
                24 replays all lie within +-0.14 per unit, where the fresh adjoint's reach -0.86 and +1.75;
                docs/design.md §1b). Cost: the rows channel's.
            progress: show a rich progress bar on stderr.
            distributed: split the groups over the processes of a torchrun run (every rank must call this
                with the same model weights, optimiser state, streams, training batches and arguments; the
                process group is joined from the torchrun environment if it is not yet, see
                :mod:`commute.distributed`). Every rank replays the window (each group needs the
                trajectory), then rank r computes groups r, r+W, ... on the model it was given (the
                unwrapped module: DDP has no double backward), drawing and discarding the other groups'
                batches so that every group sees the batches it would see on one process; the per-group
                samples are then summed over ranks (the zeros of skipped groups add exactly), so every rank
                returns the one-process report (``seconds`` and ``replay_seconds``: the slowest rank's;
                ``meta["world_size"]`` added). On one process this is the plain estimate.

        Draw order from each domain's stream (each batch used once): group by group; in a group, first
        the ``target_batches`` at theta_end (none with ``target_data``), then steps n-1 down to 0,
        ``batches_per_step`` per step.
        """
        domains = tuple(self.streams)
        K = len(domains)
        named = _resolve_targets(targets, domains)
        W = np.stack([_weights_vector(c, domains, f"target {t!r}") for t, c in named.items()])  # [M, K]
        M = len(named)
        ws = self._window(weights, steps, int(start))
        n = len(ws)
        lrs = self._lrs(n, start)
        G, b = int(n_groups), int(batches_per_step)
        bt = b if target_batches is None else int(target_batches)
        if G < 2:
            raise CommuteError(f"n_groups must be at least 2 to give a standard error, got {n_groups}.")
        if b < 1 or bt < 1:
            raise CommuteError(f"batches_per_step and target_batches must be >= 1, got {b} and {bt}.")
        if target_data is not None and target_batches is not None:
            raise CommuteError("give target_data (a fixed evaluation set) or target_batches (fresh draws per "
                               "group), not both.")
        rows_fn = self._rows_setting(noise, train_rows, train_batch_size, adjoint)
        noise_set = None if rows_fn is not None else self._noise_setting(noise, train_batch_size, b)
        in_targets = [k for k in range(K) if np.any(W[:, k] != 0)]
        fixed = check_target_data(target_data, [domains[k] for k in in_targets])
        if fixed is not None:
            bt = 0
        g_groups = np.zeros((G, M, K, n))
        g0_groups = np.zeros((G, M, K, n))
        # the noise channel's own part of G (the rest is the mean field's): kept apart for the report
        gn_groups = np.zeros((G, M, K, n)) if noise_set is not None or noise == "rows" else None
        loss_groups = np.full((G, K), np.nan)
        world = estimate_world(distributed, self.device)
        split = GroupSplit(G, world)
        end_fixed: tuple[dict[int, list[Tensor]], dict[int, float]] | None = None
        counters0 = self._counters()
        t_begin = time.perf_counter()
        t_replay, counters1, train_losses = 0.0, counters0, []
        what = f"response ({self._hp.name}, K={K}, M={M})"
        with self._context(progress and world.main, what, n * (len(split) + 1)) as bar, split.share():
            traj, p_end, m_end, v_end, train_losses = self._replay(train_batches, n, start, lrs, True,
                                                                   bar.advance, rows_fn)
            t_replay = time.perf_counter() - t_begin
            counters1 = self._counters()  # every rank replays: counted once below
            iters = {d: iter(self.streams[d]) for d in domains}
            used = dict.fromkeys(domains, 0)
            for g in range(G):
                if g not in split:  # another rank's group: its batches are drawn (in order) and left to it
                    for d in [domains[k] for _ in range(bt) for k in in_targets] + [*domains] * (n * b):
                        self._next(d, iters[d], used)
                    continue
                # grad L(theta_end) per target: on target_data (exact, the same in every group: computed
                # once), else from fresh batches
                if end_fixed is not None:
                    end = end_fixed
                elif fixed is not None:
                    n_grad0 = self.n_grad
                    end = end_fixed = self._target_gradients(p_end, fixed, in_targets, domains)
                    if not world.main:  # every rank with a group computes it (rank 0 has group 0): count once
                        self.n_grad = n_grad0
                else:
                    draws: dict[str, list[Any]] = {domains[k]: [] for k in in_targets}
                    for _ in range(bt):  # for each batch index, every domain in turn
                        for k in in_targets:
                            draws[domains[k]].append(self._next(domains[k], iters[domains[k]], used))
                    end = self._target_gradients(p_end, draws, in_targets, domains)
                gk_end, lends = end
                loss_groups[g, in_targets] = [lends[k] for k in in_targets]
                lam_end = [tuple(combine(W[i], gk_end)) for i in range(M)]
                lam = [(lam_end[i], _zeros(m_end), _zeros(v_end)) for i in range(M)]
                for t in range(n - 1, -1, -1):
                    lam = self._step_back(t, traj[t], ws[t], lrs[t], lam, lam_end, iters, used, b, noise_set,
                                          noise == "rows", g_groups[g, :, :, t], g0_groups[g, :, :, t],
                                          None if gn_groups is None else gn_groups[g, :, :, t])
                    bar.advance()
                del lam, lam_end
        seconds = time.perf_counter() - t_begin
        replayed, done = (tuple(y1 - y0 for y0, y1 in zip(c0, c1, strict=True))
                          for c0, c1 in ((counters0, counters1), (counters1, self._counters())))
        if world.enabled:
            split.settle("response estimate")
            skipped = [g for g in range(G) if g not in split]
            loss_groups[skipped] = 0.0  # the owner's row (NaN where a domain is in no target) + zeros
            g_groups, g0_groups, loss_groups = (world.all_sum(x) for x in (g_groups, g0_groups, loss_groups))
            gn_groups = None if gn_groups is None else world.all_sum(gn_groups)
            done = tuple(int(x) for x in world.all_sum(done))
            seconds, t_replay = (float(x) for x in world.all_max([seconds, t_replay]))
        if not (np.all(np.isfinite(g_groups)) and np.all(np.isfinite(g0_groups))):
            raise CommuteError("the response estimate is not finite (gradients or Hessian-vector products "
                               "overflowed); check the model's state and dtype.")
        n_grad, n_graph, n_hvp, n_vjp = (a + c for a, c in zip(replayed, done, strict=True))
        meta = {"dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
                "n_params": sum(p.numel() for p in self.params),
                "optimizer_kwargs": _jsonable(self.optimizer_kwargs), "state_step": self.state.step}
        if noise_set is not None:
            meta["noise"], meta["train_batch_size"] = noise_set
        if rows_fn is not None:
            meta["adjoint"] = "train"
            if noise == "rows":
                meta["noise"] = "rows"
        if fixed is not None:
            meta["target_data"] = {d: len(x) for d, x in fixed.items()}
        if world.enabled:
            meta["world_size"] = world.world_size
        return ResponseReport(
            domains=domains,
            targets=named,
            target_weights=W,
            g_groups=g_groups,
            g0_groups=g0_groups,
            loss_groups=loss_groups,
            weights=[dict(zip(domains, row, strict=True)) for row in ws],
            gn_groups=gn_groups,
            lrs=list(lrs),
            start=int(start),
            optimizer=self._hp.name,
            n_groups=G,
            batches_per_step=b,
            target_batches=bt,
            train_losses=train_losses,
            n_grad=n_grad,
            n_graph=n_graph,
            n_hvp=n_hvp,
            n_vjp=n_vjp,
            seconds=seconds,
            replay_seconds=t_replay,
            meta=meta,
        )

    def _target_gradients(self, p_end: Leaves, batches: Mapping[str, list[Any]], in_targets: Sequence[int],
                          domains: Sequence[str]) -> tuple[dict[int, list[Tensor]], dict[int, float]]:
        """grad L_k(theta_end) and L_k(theta_end) for the target domains: the mean over ``batches[d]``."""
        q = tuple(x.detach().requires_grad_(True) for x in p_end)
        grads: dict[int, list[Tensor]] = {}
        losses: dict[int, float] = {}
        for k in in_targets:
            where = f"domain {domains[k]!r}"
            grads[k], losses[k] = mean_loss_grad(
                batches[domains[k]], lambda _, batch, where=where: self._loss(self._eval, where, batch, q),
                lambda loss: self._grad(loss, q), q)
        return grads, losses

    def _rows_setting(self, noise: str | None, train_rows: Any, train_batch_size: int | None,
                      adjoint: str | None = None) -> Callable[[Any], Mapping[str, Any]] | None:
        """The training-batch splitter of the rows channel and of ``adjoint="train"`` (None: neither)."""
        adjoint = resolve_adjoint(noise, adjoint)
        if adjoint == "fresh":
            if train_rows is not None:
                raise CommuteError("train_rows is for the rows noise channel or adjoint='train': give one of "
                                   "them as well.")
            return None
        what = "noise='rows'" if noise == "rows" else "adjoint='train'"
        if noise not in (None, "rows"):
            raise CommuteError(f"adjoint='train' goes with noise='rows' or no noise channel, not {noise!r}.")
        if not callable(train_rows):
            raise CommuteError(f"{what} needs train_rows, a function training batch -> {{domain: its rows of "
                               "that domain}} (commute.data.Batch.by_domain for commute's sampler).")
        if train_batch_size is not None:
            raise CommuteError(f"{what} counts each batch's rows itself: leave train_batch_size unset.")
        if self.train_loss_fn is not self.loss_fn:
            raise CommuteError(f"{what} differentiates the training rows with loss_fn: it needs the "
                               "training loss to be the same function (leave train_loss_fn unset).")
        return train_rows

    def _split_rows(self, rows_fn: Callable[[Any], Mapping[str, Any]], batch: Any, step: int
                    ) -> dict[int, Any]:
        """{k: domain k's rows of the training batch} for the domains with rows, checked to add up to the
        batch's rows."""
        parts = rows_fn(batch)
        if not isinstance(parts, Mapping):
            raise CommuteError(f"train_rows must return a mapping domain -> rows, got "
                               f"{type(parts).__name__}.")
        index = {d: k for k, d in enumerate(self.streams)}
        unknown = sorted(str(d) for d in parts if d not in index)
        if unknown:
            raise CommuteError(f"train_rows returned rows of {unknown}, which have no stream (domains: "
                               f"{list(index)}).")
        out = {index[d]: rows for d, rows in parts.items() if rows is not None and _rows(rows) > 0}
        total, split = _rows(batch), sum(_rows(x) for x in out.values())
        if split != total:
            raise CommuteError(f"train_rows split the training batch of step {step} into {split} rows, but "
                               f"it has {total}; every row must go to its domain.")
        return out

    def _noise_setting(self, noise: str | None, train_batch_size: int | None,
                       b: int) -> tuple[str, int] | None:
        """(mode, B) of the sampling-noise channel (None: off), after checking the arguments."""
        if noise is None:
            if train_batch_size is not None:
                raise CommuteError("train_batch_size is for the sampling-noise channel: give noise='exact' "
                                   "or 'sample' too (how the training batches were composed).")
            return None
        if noise not in ("exact", "sample"):
            raise CommuteError(f"noise must be 'exact' or 'sample' (how the training batches were composed), "
                               f"got {noise!r}.")
        if self._hp.name not in ("adam", "adamw"):
            raise CommuteError(f"the sampling-noise channel is implemented for Adam/AdamW (the variance "
                               f"enters the update through v); {self._hp.name}'s update is linear in the "
                               "gradient and its noise acts only through curvature, which is not modelled: "
                               "leave noise unset.")
        if isinstance(train_batch_size, bool) or not isinstance(train_batch_size, numbers.Integral) \
                or train_batch_size < 1:
            raise CommuteError(f"noise needs train_batch_size, the rows of one training batch (an int >= 1), "
                               f"got {train_batch_size!r}.")
        if b < 2:
            raise CommuteError(f"noise needs batches_per_step >= 2 (the per-row variance comes from the "
                               f"spread of a step's fresh gradients), got {b}.")
        if self._hp.betas[1] <= 0:
            raise CommuteError("noise needs Adam's beta2 > 0.")
        return noise, int(train_batch_size)

    @staticmethod
    def _variance_derivative(w: Sequence[float], gk: list[list[Tensor]], sq: list[list[Tensor]],
                             shift: list[list[Tensor]], rows: list[set[int]], b: int,
                             noise: tuple[str, int]) -> list[list[Tensor]]:
        """dVar(g_t)/dw_k per coordinate, unbiased from b fresh batches per domain of n rows each (``sq``:
        the mean of (ghat_k - c_k)^2 about a shift c_k, for accuracy when |mean| >> spread):
        Var(ghat_k) = b/(b-1) (mean (ghat_k - c)^2 - (gbar_k - c)^2), s_k^2 = n Var(ghat_k),
        mu_k^2 = gbar_k^2 - Var(ghat_k)/b. ``exact``: s_k^2 / B; ``sample``: (s_k^2 + mu_k^2 -
        2 mu_mix mu_k) / B, where mu_j mu_k = gbar_j gbar_k for j != k (independent batches) and mu_k^2
        for j = k."""
        mode, B = noise
        out = []
        for k in range(len(w)):
            if len(rows[k]) != 1:
                raise CommuteError(f"noise needs fresh batches of equal rows per domain, got "
                                   f"{sorted(rows[k])}.")
            (n,) = rows[k]
            var = [b / (b - 1) * (s_ - (g_ - c_) ** 2)
                   for s_, g_, c_ in zip(sq[k], gk[k], shift[k], strict=True)]
            d = [n * v_ for v_ in var]
            if mode == "sample":
                mu2 = [g_ * g_ - v_ / b for g_, v_ in zip(gk[k], var, strict=True)]
                for j in range(len(w)):
                    cross = mu2 if j == k else [a * c for a, c in zip(gk[j], gk[k], strict=True)]
                    d = [x - 2 * w[j] * c for x, c in zip(d, cross, strict=True)]
                d = [x + m for x, m in zip(d, mu2, strict=True)]
            out.append([x / B for x in d])
        return out

    def _step_back(
        self,
        t: int,
        z: tuple,
        w: Sequence[float],
        lr: float,
        lam: list[tuple[Leaves, Leaves | None, Leaves | None]],
        lam_end: list[Leaves],
        iters: dict[str, Iterator[Any]],
        used: dict[str, int],
        b: int,
        noise: tuple[str, int] | None,
        rows_noise: bool,
        out: np.ndarray,
        out0: np.ndarray,
        out_noise: np.ndarray | None = None,
    ) -> list[tuple[Leaves, Leaves | None, Leaves | None]]:
        """One step back for one group: G(t) into ``out[M, K]``, G0(t) into ``out0``; returns lambda_t.
        With the training rows in ``z`` (``adjoint="train"``) lambda_t goes through their Hessian, and with
        ``rows_noise`` G(t) also gets the rows channel's noise term; a noise channel's term is also added to
        ``out_noise``."""
        p0, m0, v0, g0 = (self._load(x) for x in z[:4])
        own = z[4]  # adjoint="train" (the rows channel's): the training batch's rows by domain index
        step = self.state.step + t
        # U_t's pullback at the trajectory, with g an input (for GD/SGD U is linear: any g will do)
        p = tuple(x.detach().requires_grad_(True) for x in p0)
        m = None if m0 is None else tuple(x.detach().requires_grad_(True) for x in m0)
        v = None if v0 is None else tuple(x.detach().requires_grad_(True) for x in v0)
        g = tuple((torch.zeros_like(x) if g0 is None else g0[i]).detach().requires_grad_(True)
                  for i, x in enumerate(p0))
        p2, m2, v2 = _step_leaves(p, g, m, v, step, lr, self._hp)
        inputs = list(p) + list(m or ()) + list(v or ()) + list(g)
        np_, nm = len(p), len(m or ())
        pulled, curv = [], []
        for lp, lm, lv in lam:
            outs = list(p2) + list(m2 or ()) + list(v2 or ())
            gos = list(lp) + list(lm or ()) + list(lv or ())
            live = [(o, go) for o, go in zip(outs, gos, strict=True) if o.requires_grad]
            gs = torch.autograd.grad([o for o, _ in live], inputs, [go for _, go in live], retain_graph=True,
                                     allow_unused=True, create_graph=noise is not None)
            gs = [torch.zeros_like(x) if d is None else d for x, d in zip(inputs, gs, strict=True)]
            if noise is not None:  # U_t is elementwise in g: diag d2<lambda, U_t>/dg2 = d(sum a_g)/dg
                a_g = [d for d in gs[-np_:] if d.requires_grad]
                hs = (torch.autograd.grad(sum(d.sum() for d in a_g), g, retain_graph=True, allow_unused=True)
                      if a_g else [None] * np_)
                curv.append([torch.zeros_like(x) if h is None else 0.5 * h.detach()
                             for x, h in zip(g, hs, strict=True)])
                gs = [d.detach() for d in gs]
            pulled.append((tuple(gs[:np_]), None if m is None else tuple(gs[np_:np_ + nm]),
                           None if v is None else tuple(gs[np_ + nm:-np_]), tuple(gs[-np_:])))
        a0 = []
        for le in lam_end:  # G0: (grad L(theta_end), 0, 0) through U_t's g-derivative only
            gs = torch.autograd.grad(list(p2), list(g), list(le), retain_graph=True, allow_unused=True)
            a0.append(tuple(torch.zeros_like(x) if d is None else d for x, d in zip(g, gs, strict=True)))
        self.n_vjp += len(lam) + len(lam_end)
        del p2, m2, v2, inputs
        lam.clear()  # lambda_{t+1} is pulled back: free it (the caller's list) before the batches' graphs

        # fresh batches at theta_t: ghat_k for G(t); the same batches give Hhat_mix a_g for lambda_t
        need_h = t > 0 and any(x != 0 for x in w)
        q = tuple(x.detach().requires_grad_(True) for x in p0)
        vecs = [a[3] for a in pulled]
        gk = [[torch.zeros_like(x) for x in q] for _ in w]
        hv = [[torch.zeros_like(x) for x in q] for _ in pulled]
        sq = None if noise is None else [[torch.zeros_like(x) for x in q] for _ in w]  # mean (ghat - c)^2
        shift: list[list[Tensor]] = [[] for _ in w]  # c: the first batch's gradient (no cancellation)
        rows: list[set[int]] = [set() for _ in w]
        for _ in range(b):
            for k, d in enumerate(self.streams):
                batch = self._next(d, iters[d], used)
                loss = self._loss(self._eval, f"domain {d!r}", batch, q)
                graph = need_h and w[k] != 0 and own is None  # adjoint="train": the realised Hessian below
                gs = self._grad(loss, q, create_graph=graph)
                _accumulate(gk[k], gs, 1.0 / b)
                if sq is not None:
                    rows[k].add(_rows(batch))
                    if not shift[k]:
                        shift[k] = [torch.zeros_like(x) if d is None else d.detach().clone()
                                    for x, d in zip(q, gs, strict=True)]
                    _accumulate(sq[k], [None if d is None else (d.detach() - c) ** 2
                                        for d, c in zip(gs, shift[k], strict=True)], 1.0 / b)
                if graph:
                    self.n_hvp += len(vecs)
                    for acc, h in zip(hv, graph_hvps(gs, q, vecs), strict=True):
                        for a_, h_ in zip(acc, h, strict=True):
                            a_.add_(h_.detach(), alpha=w[k] / b)
                del loss, gs
        for i in range(len(pulled)):
            for k in range(len(w)):
                out[i, k] = _dot(vecs[i], gk[k])
                out0[i, k] = _dot(a0[i], gk[k])
        if own is not None:  # lambda_t through the training rows' own Hessian; with the rows channel also
            # G_k(t) += < a_g, (n_k / (B w_k)) (ghat_k^train - gbar_k) / 2 >
            B = sum(_rows(x) for x in own.values())
            for k, rows_k in own.items():
                n_k = _rows(rows_k)
                where = f"domain {list(self.streams)[k]!r}'s rows of the training batch of step {step}"
                loss = self._loss(self._eval, where, rows_k, q)
                gs = self._grad(loss, q, create_graph=need_h)
                gt = [torch.zeros_like(x) if d is None else d.detach() for x, d in zip(q, gs, strict=True)]
                if rows_noise and w[k] > 0:
                    c = 0.5 * n_k / (B * w[k])
                    for i in range(len(pulled)):
                        term = c * (_dot(vecs[i], gt) - _dot(vecs[i], gk[k]))
                        out[i, k] += term
                        if out_noise is not None:
                            out_noise[i, k] += term
                if need_h:
                    self.n_hvp += len(vecs)
                    for acc, h in zip(hv, graph_hvps(gs, q, vecs), strict=True):
                        for a_, h_ in zip(acc, h, strict=True):
                            a_.add_(h_.detach(), alpha=n_k / B)
                del loss, gs
        if sq is not None:  # the noise channel: G_k(t) += < diag(d2<lambda, U_t>/dg2) / 2, dVar/dw_k >
            dvar = self._variance_derivative(w, gk, sq, shift, rows, b, noise)
            for i in range(len(pulled)):
                for k in range(len(w)):
                    term = _dot(curv[i], dvar[k])
                    out[i, k] += term
                    if out_noise is not None:
                        out_noise[i, k] += term
        return [(tuple(ap + h for ap, h in zip(a[0], hv[i], strict=True)), a[1], a[2])
                for i, a in enumerate(pulled)]


def resolve_adjoint(noise: str | None, adjoint: str | None, *, noise_name: str = "noise",
                    adjoint_name: str = "adjoint") -> str:
    """The adjoint mode an estimate runs with: ``adjoint`` as given, or when unset ``"train"`` with the rows
    noise channel (which needs it) and ``"fresh"`` otherwise; one sentence for a bad value or for the rows
    channel with ``"fresh"``. ``noise_name`` / ``adjoint_name``: how the caller's user spells the two."""
    if adjoint not in (None, "fresh", "train"):
        raise CommuteError(f"{adjoint_name} must be 'fresh' or 'train', got {adjoint!r}.")
    if noise == "rows" and adjoint == "fresh":
        raise CommuteError(f"the rows noise channel ({noise_name}='rows') pulls the adjoint back through the "
                           f"training rows' own Hessians: leave {adjoint_name} unset (or 'train').")
    return adjoint or ("train" if noise == "rows" else "fresh")


def _rows(batch: Any) -> int:
    """Rows (examples) of a batch: a tensor's first dimension, else that of the first tensor it holds (or
    of its ``input_ids``, as commute's ``Batch``)."""
    if isinstance(batch, Tensor) and batch.ndim > 0:
        return int(batch.shape[0])
    items = (batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, tuple | list) else
             [getattr(batch, "input_ids", None)])
    for x in items:
        if isinstance(x, Tensor) and x.ndim > 0:
            return int(x.shape[0])
    raise CommuteError("the sampling-noise channel needs batches that are tensors (or tuples / dicts of "
                       "them) with examples along the first dimension.")


def _trained_parameters(model: nn.Module, parameters: Iterable[nn.Parameter] | None
                        ) -> tuple[list[str], list[nn.Parameter]]:
    """(names, tensors) of the trained parameters, tied tensors once, in ``named_parameters()`` order."""
    named = list(model.named_parameters())  # lists a tied tensor once, under its first name
    by_id = {id(p): k for k, p in named}
    if parameters is None:
        chosen = [p for _, p in named if p.requires_grad]
    else:
        chosen, seen = [], set()
        for p in parameters:
            if id(p) not in by_id:
                raise CommuteError("parameters must be parameters of the model (as model.parameters() lists "
                                   "them).")
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                chosen.append(p)
        chosen.sort(key=lambda p: list(by_id).index(id(p)))
    if not chosen:
        raise CommuteError("the model has no parameters with requires_grad=True to train.")
    return [by_id[id(p)] for p in chosen], chosen


def _accumulate(acc: list[Tensor], gs: Sequence[Tensor | None], scale: float) -> None:
    for a, d in zip(acc, gs, strict=True):
        if d is not None:
            a.add_(d.detach(), alpha=scale)


def _zeros(x: Leaves | None) -> Leaves | None:
    return None if x is None else tuple(torch.zeros_like(t) for t in x)


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x if isinstance(x, str | int | float | bool) or x is None else str(x)


# --------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------
@dataclass
class ResponseReport(JsonRoundTrip):
    """Result of :meth:`ResponseEstimator.estimate`: per-group samples of G and G0 and what they predict.

    ``g_groups[g, m, k, t]`` = G_k(t) for basis target m (weights ``target_weights[m]``) in group g;
    ``g0_groups`` the same for the alignment baseline G0. With a noise channel (``noise=`` of
    :meth:`ResponseEstimator.estimate`) ``gn_groups`` holds its own part of G, the sampling noise's effect
    (G = mean field + noise; ``part=`` of :meth:`samples` and :meth:`predict`); else None. Window step t is
    training step ``start + t``. Every derived quantity (a prediction, a sum over steps, another target in
    the span of the estimated ones, a part) is computed per group first, so its stderr carries the right
    covariances.
    """

    json_kind = "response report"

    domains: tuple[str, ...]
    targets: dict[str, dict[str, float]]
    target_weights: np.ndarray
    g_groups: np.ndarray
    g0_groups: np.ndarray
    loss_groups: np.ndarray
    weights: list[dict[str, float]]
    lrs: list[float]
    start: int
    optimizer: str
    n_groups: int
    batches_per_step: int
    target_batches: int  # fresh draws per domain per group; 0 when the targets were on ``target_data``
    train_losses: list[float] = field(default_factory=list)
    n_grad: int = 0
    n_graph: int = 0
    n_hvp: int = 0
    n_vjp: int = 0
    seconds: float = 0.0
    replay_seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    gn_groups: np.ndarray | None = None

    @property
    def n_steps(self) -> int:
        return int(self.g_groups.shape[-1])

    # ---- lookups -----------------------------------------------------------------------------------
    def _index(self, d: str) -> int:
        return domain_index(self.domains, d)

    def _coefficients(self, target: str | Mapping[str, float]) -> np.ndarray:
        """a with (target's domain weights) = a @ target_weights: G is linear in the target."""
        if isinstance(target, str):
            if target not in self.targets:
                raise CommuteError(f"unknown target {target!r}; estimated targets are {list(self.targets)} "
                                   "(or pass a dict of domain weights).")
            return np.eye(len(self.targets))[list(self.targets).index(target)]
        c = _weights_vector(target, self.domains, f"target {dict(target)}")
        a, *_ = np.linalg.lstsq(self.target_weights.T, c, rcond=None)
        if not np.allclose(a @ self.target_weights, c, rtol=1e-9, atol=1e-12):
            raise CommuteError(f"target {dict(target)} is not a combination of the estimated targets "
                               f"{list(self.targets)}; estimate it.")
        return a

    def samples(self, target: str | Mapping[str, float], baseline: bool = False,
                part: Part = "total") -> np.ndarray:
        """``[groups, K, steps]``: the per-group G_k(t) of ``target`` (G0 with ``baseline=True``).
        ``part``: ``"total"``; with a noise channel also ``"noise"`` (its term alone: how the schedule acts
        through the training gradient's noise) or ``"mean_field"`` (the rest: through its mean)."""
        if part not in ("total", "noise", "mean_field"):
            raise CommuteError(f"part must be 'total', 'noise' or 'mean_field', got {part!r}.")
        if part != "total" and baseline:
            raise CommuteError("the alignment baseline has no noise part: ask for part='total'.")
        if part != "total" and self.gn_groups is None:
            raise CommuteError("this estimate predates keeping the noise channel's part apart: re-estimate "
                               "it to split it." if self.meta.get("noise") else
                               "the response's noise and mean-field parts exist only for an estimate with a "
                               "noise channel (noise='rows', 'exact' or 'sample').")
        arr = (self.g0_groups if baseline else self.g_groups if part == "total" else self.gn_groups
               if part == "noise" else self.g_groups - self.gn_groups)
        return np.einsum("gmkt,m->gkt", arr, self._coefficients(target))

    def G(self, target: str | Mapping[str, float]) -> dict[str, np.ndarray]:
        """Domain -> G_k(t) over the window's steps (mean over groups)."""
        s = self.samples(target).mean(axis=0)
        return {d: s[k] for k, d in enumerate(self.domains)}

    def G0(self, target: str | Mapping[str, float]) -> dict[str, np.ndarray]:
        """Domain -> the alignment baseline G0_k(t) (mean over groups)."""
        s = self.samples(target, baseline=True).mean(axis=0)
        return {d: s[k] for k, d in enumerate(self.domains)}

    def stderr(self, target: str | Mapping[str, float], baseline: bool = False) -> dict[str, np.ndarray]:
        """Domain -> the stderr of G_k(t) (or G0) per step: std over groups / sqrt(G)."""
        s = self.samples(target, baseline)
        se = s.std(axis=0, ddof=1) / math.sqrt(s.shape[0])
        return {d: se[k] for k, d in enumerate(self.domains)}

    def at(self, target: str | Mapping[str, float], domain: str, step: int,
           baseline: bool = False) -> Estimate:
        """G_k(t) (or G0) of one domain at window step ``step`` with its stderr."""
        if not 0 <= int(step) < self.n_steps:
            raise CommuteError(f"step {step} is outside the window's steps 0..{self.n_steps - 1}.")
        return Estimate.from_samples(self.samples(target, baseline)[:, self._index(domain), int(step)])

    def loss(self, target: str | Mapping[str, float]) -> Estimate:
        """L(theta_end) of ``target`` on the batches its gradient came from: fresh training draws per group,
        or the fixed ``target_data`` set (then the same in every group, stderr 0)."""
        c = self._coefficients(target) @ self.target_weights
        used = np.flatnonzero(c)
        return Estimate.from_samples(self.loss_groups[:, used] @ c[used])

    # ---- predictions -------------------------------------------------------------------------------
    def _delta(self, delta_w: Mapping[str, Any]) -> np.ndarray:
        if not isinstance(delta_w, Mapping):
            raise CommuteError("delta_w must map domain -> one weight change per window step.")
        out = np.zeros((len(self.domains), self.n_steps))
        for d, dw in delta_w.items():
            arr = np.asarray(dw.detach().cpu() if isinstance(dw, Tensor) else dw, dtype=np.float64)
            if d not in self.domains:
                if np.any(arr != 0):
                    raise CommuteError(f"delta_w changes domain {d!r}, which was not estimated (the domains "
                                       f"are {list(self.domains)}).")
                continue
            if arr.shape != (self.n_steps,):
                raise CommuteError(f"delta_w[{d!r}] has shape {arr.shape} but the window has {self.n_steps} "
                                   "steps.")
            out[self._index(d)] = arr
        return out

    def predict(self, target: str | Mapping[str, float], delta_w: Mapping[str, Any],
                baseline: bool = False, part: Part = "total") -> Estimate:
        """First-order change of L(theta_end) for a schedule change dw (docs/design.md §1b)::

            Delta L = sum_t sum_k dw_k(t) G_k(t) + O(dw^2)

        ``delta_w``: domain -> dw_k(t) over the window's steps (absent domains: 0). Mean +- stderr over
        groups; ``baseline=True`` gives the alignment baseline's prediction (G0); ``part`` one part of G
        (:meth:`samples`): with a noise channel, the change through the gradient's mean and through its
        noise, which add up to the total.
        """
        return Estimate.from_samples(self.predict_samples(target, delta_w, baseline, part))

    def predict_samples(self, target: str | Mapping[str, float], delta_w: Mapping[str, Any],
                        baseline: bool = False, part: Part = "total") -> np.ndarray:
        """``[groups]``: :meth:`predict`'s sum_t sum_k dw_k(t) G_k(t) per group."""
        return np.einsum("gkt,kt->g", self.samples(target, baseline, part), self._delta(delta_w))

    def predict_alignment(self, target: str | Mapping[str, float], delta_w: Mapping[str, Any]) -> Estimate:
        """:meth:`predict` with the first-order alignment baseline G0 (no curvature, no optimiser carry)."""
        return self.predict(target, delta_w, baseline=True)

    def predict_intervention(self, target: str | Mapping[str, float], intervention: Intervention,
                             start: int | None = None, baseline: bool = False,
                             part: Part = "total") -> Estimate:
        """The antisymmetric excess (EL^12 - EL^21)/2 of an eq. 9/10 intervention, to first order
        (:func:`antisymmetric_excess`, docs/design.md §1b): sum dw^12 G over the window, dw from
        :func:`intervention_delta` (window step 0 = training step ``start``, default the report's);
        ``baseline`` and ``part`` as :meth:`predict`.

        The response is taken at the report's schedule, which must be the intervention's base over the
        intervention's steps (else it would predict a different experiment).
        """
        start = self.start if start is None else int(start)
        for s in range(max(intervention.t0, start), min(intervention.end, start + self.n_steps)):
            w = self.weights[s - start]
            off = [d for d in set(w) | set(intervention.base)
                   if abs(w.get(d, 0.0) - intervention.base.get(d, 0.0)) > 1e-9]
            if off:
                raise CommuteError(f"the report's weights at step {s} differ from the intervention's base "
                                   f"for {', '.join(map(repr, sorted(off)))}; estimate the response at that "
                                   "base.")
        dw = intervention_delta(intervention, self.n_steps, start)
        return self.predict(target, dw, baseline, part)

    # ---- (de)serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: settings, per-group samples, and each target's window sums per domain."""
        def sums(t: str, d: str) -> dict[str, Any]:
            ones = {d: np.ones(self.n_steps)}
            out = {"G": self.predict(t, ones).to_dict(), "G0": self.predict_alignment(t, ones).to_dict()}
            if self.gn_groups is not None:
                out["noise"] = self.predict(t, ones, part="noise").to_dict()
            return out

        summary = {t: {d: sums(t, d) for d in self.domains} for t in self.targets}
        return {
            "format": "commute.response_report/1",
            "domains": list(self.domains),
            "targets": self.targets,
            "target_weights": self.target_weights.tolist(),
            "start": self.start,
            "n_steps": self.n_steps,
            "optimizer": self.optimizer,
            "weights": self.weights,
            "lrs": self.lrs,
            "n_groups": self.n_groups,
            "batches_per_step": self.batches_per_step,
            "target_batches": self.target_batches,
            "n_grad": self.n_grad,
            "n_graph": self.n_graph,
            "n_hvp": self.n_hvp,
            "n_vjp": self.n_vjp,
            "seconds": self.seconds,
            "replay_seconds": self.replay_seconds,
            "meta": self.meta,
            "window_sums": summary,
            "train_losses": self.train_losses,
            "loss_groups": [[None if math.isnan(x) else x for x in row] for row in self.loss_groups.tolist()],
            "g_groups": self.g_groups.tolist(),
            "g0_groups": self.g0_groups.tolist(),
            **({} if self.gn_groups is None else {"gn_groups": self.gn_groups.tolist()}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ResponseReport:
        """Inverse of :meth:`to_dict` (the summary is recomputed from the samples)."""
        try:
            if d.get("format") != "commute.response_report/1":
                raise ValueError(f"format {d.get('format')!r}")
            rep = cls(
                domains=tuple(d["domains"]),
                targets={str(k): {str(a): float(b) for a, b in v.items()} for k, v in d["targets"].items()},
                target_weights=np.asarray(d["target_weights"], dtype=np.float64),
                g_groups=np.asarray(d["g_groups"], dtype=np.float64),
                g0_groups=np.asarray(d["g0_groups"], dtype=np.float64),
                loss_groups=np.asarray([[math.nan if x is None else x for x in row]
                                        for row in d["loss_groups"]], dtype=np.float64),
                weights=[{str(k): float(x) for k, x in w.items()} for w in d["weights"]],
                lrs=[float(x) for x in d["lrs"]],
                start=int(d["start"]),
                optimizer=str(d["optimizer"]),
                n_groups=int(d["n_groups"]),
                batches_per_step=int(d["batches_per_step"]),
                target_batches=int(d["target_batches"]),
                train_losses=[float(x) for x in d.get("train_losses", [])],
                n_grad=int(d.get("n_grad", 0)),
                n_graph=int(d.get("n_graph", 0)),
                n_hvp=int(d.get("n_hvp", 0)),
                n_vjp=int(d.get("n_vjp", 0)),
                seconds=float(d.get("seconds", 0.0)),
                replay_seconds=float(d.get("replay_seconds", 0.0)),
                meta=dict(d.get("meta", {})),
                gn_groups=(None if d.get("gn_groups") is None
                           else np.asarray(d["gn_groups"], dtype=np.float64)),
            )
            G, M, K, n = rep.g_groups.shape
            if (rep.g0_groups.shape != rep.g_groups.shape or (M, K) != rep.target_weights.shape
                    or (rep.gn_groups is not None and rep.gn_groups.shape != rep.g_groups.shape)
                    or K != len(rep.domains) or M != len(rep.targets) or len(rep.weights) != n
                    or len(rep.lrs) != n or rep.loss_groups.shape != (G, K)):
                raise ValueError("inconsistent shapes")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CommuteError(f"not a response report (missing or bad field: {e}).") from None
        return rep

    # ---- display -----------------------------------------------------------------------------------
    def __str__(self) -> str:
        head = (f"schedule response over training steps [{self.start}, {self.start + self.n_steps}) "
                f"({self.optimizer}): sum_t G_k(t) = dL(theta_end)/d(w_k raised at every step)")
        lines = [head]
        w = max(len(d) for d in self.domains)
        for t in self.targets:
            lines.append(f"L = {t}   (L(theta_end) = {self.loss(t)})")
            for d in self.domains:
                ones = {d: np.ones(self.n_steps)}
                parts = ("" if self.gn_groups is None else
                         f" (mean field {self.predict(t, ones, part='mean_field')}, noise "
                         f"{self.predict(t, ones, part='noise')})")
                lines.append(f"  {d:<{w}}  response {self.predict(t, ones)}{parts}   "
                             f"alignment {self.predict_alignment(t, ones)}")
        lines.append(f"{self.n_groups} groups x {self.batches_per_step} fresh batch(es) per domain per step; "
                     f"{self.n_grad} gradients, {self.n_graph} graph gradients, {self.n_hvp} HVPs; "
                     f"{self.seconds:.1f} s ({self.replay_seconds:.1f} s replay). stderr = std over groups / "
                     f"sqrt({self.n_groups}).")
        return "\n".join(lines)
