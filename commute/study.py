"""The bilingual order study (paper §4.2–4.3, Appendix B, Tables 2–4, Figures 3–4), end to end.

What it measures
----------------
Train a base run at constant weights ``base`` (balanced (0.5, 0.5), or imbalanced (0.9, 0.1)) and
checkpoint it at the intervention starts t0. From each t0 branch twice with the reordering schedule of
paper eq. (9) / (10) (:class:`commute.schedule.Intervention`):

* θ12: w_1 = base_1 + Δw for T steps, then base_1 − Δw for T steps;
* θ21: the mirror image;

and continue the base run to t0 + 2T. All three see the same total weight per domain, and they share the
sampler seed (common random numbers: per-domain example streams, so only the mix differs). The observed
excess losses on fixed validation batches are ``EL_i^12 = L_i(θ12) − L_i(θ_base(t0+2T))`` and likewise
``EL_i^21``; their antisymmetric part ``(EL^12 − EL^21)/2`` cancels the discrete-step term even in Δw
(docs/design.md §1) and is what we compare with the prediction

    EL_i^12 ≈ γ² Δw T² P(L_1, L_2; L_i)           (docs/design.md §1; Cor. 3.2a with ε = γT, δ = Δw)

where P(L_1, L_2; L) = ⟨H_2 g_1 − H_1 g_2, ∇L⟩ (paper eq. 6–7 with docs/design.md's sign) is estimated with
:class:`commute.estimate.BracketEstimator` at θ(t0), with a standard error.

Which γ for Adam
----------------
The theory is for gradient descent; for SGD γ = lr, exactly. Adam moves θ by −lr·D⁻¹m̂ with
D = diag(√v̂ + ε), and no scalar γ makes that a gradient step. The report's prediction uses γ = lr, as the
paper does, because for Adam only the *sign* is claimed and the sign does not depend on γ. We also record
``γ_eff = lr · ⟨g, D⁻¹g⟩ / ⟨g, g⟩`` (g the training-mix gradient at θ(t0), D from the checkpoint's
optimiser state): the γ for which a gradient step decreases the loss at Adam's first-order rate. On the
tiny preset γ_eff ≈ 10²·lr, and γ_eff-based magnitudes overshoot the observed effects by orders of
magnitude — the intervention is far outside the expansion's radius (see γ·T·λ_max below).

How local it is
---------------
Beside every prediction: ``γ·T·λ_max`` with λ_max the top Hessian eigenvalue of the training mix at θ(t0)
by power iteration on HVPs (:func:`commute.curvature.top_eigenvalue`); for Adam, of the preconditioned
Hessian D^{-1/2} H D^{-1/2} with the lr (not γ_eff), since lr·D⁻¹H is Adam's linearised step. The locality
sweep (:func:`commute.locality.locality_sweep`) shows on the real model, with deterministic float64
full-batch steps, that the observed antisymmetric excess / prediction → 1 as γT → 0.

Stages
------
One arm is an (optimiser, variant) pair; :func:`run_arm` runs its stages in order, each over typed results
and each cached on disk (a re-run skips finished work, an interrupted study resumes). Arms are independent:
with ``jobs`` > 1 they run in parallel processes (:func:`_run_arms_in_processes`). The stages:

1. :func:`run_base` – the base run, checkpointed at every t0, t0 + 2T and extra P step;
   :func:`evaluate_base` – validation losses there (:class:`BasePoint`);
2. :func:`run_branches` – θ12 / θ21 from every t0 for every Δw, with the token check (:class:`Cell`);
3. :func:`estimate_checkpoints` – P with stderr, λ_max and γ at every checkpoint
   (:class:`CheckpointEstimate`);
4. :func:`predict` – the prediction and locality number of every cell.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from commute.bracket import antisymmetric_excess, intervention_excess
from commute.curvature import domain_losses as fixed_batch_losses
from commute.curvature import gamma_eff, hessian_lambda_max, math_attention, mix_loss, model_params
from commute.errors import CommuteError
from commute.io import write_json
from commute.locality import locality_sweep
from commute.progress import Progress, logger
from commute.scores import delta_w_key, response_unit
from commute.study_config import (
    PRESETS,
    LocalityConfig,
    StudyConfig,
    VariantConfig,
    _locality_variant,
    config_hash,
    get_preset,
)

__all__ = [
    "VariantConfig",
    "LocalityConfig",
    "StudyConfig",
    "PRESETS",
    "get_preset",
    "config_hash",
    "Arm",
    "BasePoint",
    "Cell",
    "CheckpointEstimate",
    "ArmResult",
    "StudyResult",
    "run_base",
    "evaluate_base",
    "run_branches",
    "estimate_checkpoints",
    "predict",
    "run_arm",
    "run_bilingual_study",
]


# --------------------------------------------------------------------------------------------------
# typed results (``to_dict`` gives the layout of results.json, documented in commute.report)
# --------------------------------------------------------------------------------------------------
@dataclass
class BasePoint:
    """The base run at one checkpoint: validation losses and tokens trained on per domain so far."""

    step: int
    L: dict[str, float]
    tokens: dict[str, int]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BasePoint:
        return cls(step=int(d["step"]), L=dict(d["L"]), tokens=dict(d.get("tokens", {})))


@dataclass
class BranchEnd:
    """One branch (θ12 or θ21) at t0 + 2T: validation losses, tokens, its schedule."""

    step: int
    L: dict[str, float]
    tokens: dict[str, int]
    schedule: dict[str, Any]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BranchEnd:
        return cls(step=int(d["step"]), L=dict(d["L"]), tokens=dict(d["tokens"]),
                   schedule=dict(d["schedule"]))


@dataclass
class Cell:
    """One (t0, Δw) intervention: losses of the base and both orders at t0 + 2T, token check, and (after
    :func:`predict`) the locality number and per-domain prediction vs observation."""

    t0: int
    delta_w: float
    T: int
    L_t0: dict[str, float]
    L_base: dict[str, float]
    L12: dict[str, float]
    L21: dict[str, float]
    tokens: dict[str, dict[str, int]]
    tokens_match: bool
    replicates: list[dict[str, Any]] = field(default_factory=list)  # [{"seed", "L12", "L21"}]; 1st: above
    locality: float | None = None
    per_domain: dict[str, dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("locality", "per_domain"):
            if d[k] is None:
                del d[k]
        return d


@dataclass
class CheckpointEstimate:
    """P(L_1, L_2; L_i) ± stderr, λ_max and the γ of the prediction at one base checkpoint."""

    step: int
    L: dict[str, float]
    P: dict[str, dict[str, Any]]
    lr: float
    n_hvp: int
    gamma: float
    lambda_max: float
    lambda_of: str
    gamma_eff: float | None = None
    target: str | None = None  # "val": the target loss on the validation batches (None: older results)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"step": self.step, "L": self.L, "P": self.P, "lr": self.lr, "n_hvp": self.n_hvp,
                             "gamma": self.gamma}
        if self.gamma_eff is not None:
            d["gamma_eff"] = self.gamma_eff
        d.update({"lambda_max": self.lambda_max, "lambda_of": self.lambda_of})
        if self.target is not None:
            d["target"] = self.target
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CheckpointEstimate:
        return cls(step=int(d["step"]), L=dict(d["L"]), P=dict(d["P"]), lr=float(d["lr"]),
                   n_hvp=int(d["n_hvp"]), gamma=float(d["gamma"]), lambda_max=float(d["lambda_max"]),
                   lambda_of=str(d["lambda_of"]), gamma_eff=d.get("gamma_eff"), target=d.get("target"))


@dataclass
class ArmResult:
    """Everything one arm measured and predicted."""

    optimizer: str
    variant: str
    base: dict[str, float]
    lr: float
    T: int
    gamma_rule: str
    run_dir: str
    base_curve: list[BasePoint]
    checkpoints: list[CheckpointEstimate]
    cells: list[Cell]
    responses: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "variant": self.variant, "base": dict(self.base), "lr": self.lr,
                "T": self.T, "gamma_rule": self.gamma_rule, "run_dir": self.run_dir,
                "base_curve": [{"step": p.step, "L": p.L} for p in self.base_curve],
                "checkpoints": [c.to_dict() for c in self.checkpoints], "responses": self.responses,
                "cells": [c.to_dict() for c in self.cells]}


@dataclass
class StudyResult:
    """What :func:`run_bilingual_study` returns: where the report is, and every number in ``data``."""

    out_dir: Path
    report_path: Path
    data: dict[str, Any]

    @property
    def summary(self) -> dict[str, Any]:
        """Sign-agreement counts (see :func:`commute.scores.summarise`)."""
        return self.data.get("summary", {})

    def table(self) -> Any:
        """The summary as a rich table, e.g. ``console.print(result.table())``."""
        from commute.report import summary_table

        return summary_table(self.data)


# --------------------------------------------------------------------------------------------------
# one arm: where it lives and how it trains
# --------------------------------------------------------------------------------------------------
def _train_config(cfg: StudyConfig, optimizer: str, variant: VariantConfig, steps: int, device: str) -> Any:
    """The :class:`commute.train.TrainConfig` of one base run (branches change only the schedule)."""
    from commute.schedule import Constant
    from commute.train import TrainConfig

    d: dict[str, Any] = {
        "model": cfg.model_preset,
        "model_overrides": dict(cfg.model_overrides),
        "domains": dict(cfg.domains),
        "tokenizer": cfg.tokenizer,
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "sampler_mode": cfg.sampler_mode,
        "schedule": Constant(variant.base).to_dict(),
        "optimizer": optimizer,
        "lr": float(cfg.lr[optimizer]),
        "steps": int(steps),
        "seed": cfg.seed,
        "eval_every": 0,
        "ckpt_every": 0,
        "tensorboard": False,
        "device": device,
    }
    d.update(cfg.train_overrides)
    return TrainConfig.from_dict(d)


@dataclass
class Arm:
    """One (optimiser, variant) arm: its base run's config and the directories of its runs and caches.

    ``run_dir`` is keyed by the training trajectory and the validation set; the base run's directory also by
    its checkpoint steps (a run cannot add checkpoints to its past).
    """

    cfg: StudyConfig
    optimizer: str
    variant: VariantConfig
    out: Path
    device: str
    tc: Any = field(init=False)
    targets: list[int] = field(init=False)
    key: str = field(init=False)

    def __post_init__(self) -> None:
        c = self.cfg
        self.targets = sorted({*c.t0s, *(t + 2 * c.T for t in c.t0s), *c.extra_p_steps})
        self.tc = _train_config(c, self.optimizer, self.variant, self.targets[-1], self.device)
        self.key = config_hash({"trajectory": self.tc.trajectory_hash(),
                                "val": [c.n_val_batches, c.val_batch_size]})

    @property
    def label(self) -> str:
        return f"{self.optimizer}/{self.variant.name}"

    @property
    def lr(self) -> float:
        return float(self.cfg.lr[self.optimizer])

    @property
    def run_dir(self) -> Path:
        return self.out / "runs" / f"{self.optimizer}-{self.variant.name}-{self.key}"

    @property
    def base_dir(self) -> Path:
        return self.run_dir / f"base-{config_hash(sorted(self.targets), 8)}"

    @property
    def cache(self) -> Path:
        return self.run_dir / "cache"

    def checkpoint(self, step: int) -> Path:
        """The base run's checkpoint directory at ``step``."""
        return self.base_dir / "checkpoints" / f"step_{step:08d}"


def _cached(path: Path, compute: Callable[[], Any]) -> Any:
    """The JSON at ``path``, or ``compute()`` written there atomically."""
    if path.is_file():
        return json.loads(path.read_text())
    obj = compute()
    write_json(path, obj)
    return obj


# --------------------------------------------------------------------------------------------------
# stage 1: the base run
# --------------------------------------------------------------------------------------------------
def run_base(arm: Arm, domains: Mapping[str, Any], bar: Progress) -> None:
    """Train the base run at constant weights with a checkpoint at every target step (resumes)."""
    from commute.schedule import Constant
    from commute.train import train

    tc = arm.tc.replace(ckpt_steps=arm.targets)
    done = 0
    for t in arm.targets:
        if arm.checkpoint(t).is_dir():
            bar.advance(t - done)
            done = t
            continue
        bar.describe(f"{arm.label}: base run to step {t}")
        res = train(tc, arm.base_dir, schedule=Constant(arm.variant.base), max_steps=t, domains=domains,
                    progress=False)
        bar.advance(res.step - done)
        done = res.step


def evaluate_base(arm: Arm, val: Mapping[str, list[Tensor]]) -> dict[int, BasePoint]:
    """Validation losses and token counts of the base run at every target step (cached)."""
    from commute.train import evaluate, load_checkpoint

    def point(step: int) -> dict[str, Any]:
        ck = load_checkpoint(arm.checkpoint(step), device=arm.device)
        return {"step": step, "L": evaluate(ck.model, val), "tokens": ck.state.get("tokens", {})}

    return {t: BasePoint.from_dict(_cached(arm.cache / f"base_{t:08d}.json", lambda t=t: point(t)))
            for t in arm.targets}


# --------------------------------------------------------------------------------------------------
# stage 2: the branches θ12 / θ21
# --------------------------------------------------------------------------------------------------
def replicate_seed(seed: int, t0: int, r: int) -> int | None:
    """Sampler seed of replicate ``r`` of the window starting at t0: None (the run's own streams) for r = 0,
    else a fresh seed; θ12 and θ21 of one replicate share it (common random numbers)."""
    return None if r == 0 else int(config_hash(["replicate", seed, t0, r], 8), 16) % (2**31 - 1)


def replicate_sampler(domains: Mapping[str, Any], tc: Any, state: Mapping[str, Any], seed: int, t0: int,
                      r: int) -> Any:
    """The training sampler of replicate ``r`` of the window at t0, restored from the checkpoint's sampler
    ``state`` with the replicate's seed (:func:`replicate_seed`), as that replicate's branches run it
    (``commute.train`` gives a branch its sampler seed); ``tc`` is the arm's training config."""
    from commute.data import MixtureSampler

    saved = dict(state)
    rseed = replicate_seed(seed, t0, r)
    if rseed is not None:
        saved["seed"] = rseed
    sampler = MixtureSampler(domains, tc.batch_size, tc.seq_len, int(saved["seed"]), tc.sampler_mode)
    sampler.load_state_dict(saved)
    return sampler


def _run_branch(arm: Arm, domains: Mapping[str, Any], val: Mapping[str, list[Tensor]], t0: int, dw: float,
                order: str, bar: Progress, sampler_seed: int | None = None) -> BranchEnd:
    """θ12 (order "12": domain 1 boosted first) or θ21 from the base checkpoint at t0 (cached), under the
    run's own sampler streams or, with ``sampler_seed``, a replicate's."""
    from commute.schedule import Intervention
    from commute.train import evaluate, load_checkpoint, train

    cfg = arm.cfg
    d1, d2 = cfg.pair_names
    sched = Intervention(arm.variant.base, d1, d2, dw, t0, cfg.T)
    if order == "21":
        sched = sched.reversed()
    key_obj: dict[str, Any] = {"arm": arm.key, "schedule": sched.to_dict()}
    if sampler_seed is not None:
        key_obj["sampler_seed"] = sampler_seed
    key = config_hash(key_obj)
    rep = "" if sampler_seed is None else f"-s{sampler_seed}"
    bdir = arm.run_dir / "branches" / f"t{t0}-dw{dw:g}-{order}{rep}-{key}"

    def run() -> dict[str, Any]:
        bar.describe(f"{arm.label}: θ{order} t0={t0} Δw={dw:g}" + (f" (replicate seed {sampler_seed})"
                                                                   if sampler_seed is not None else ""))
        res = train(arm.tc.replace(ckpt_steps=[], ckpt_every=0, sampler_seed=sampler_seed), bdir,
                    branch_from=arm.checkpoint(t0), schedule=sched, max_steps=t0 + 2 * cfg.T, domains=domains,
                    progress=False)
        ck = load_checkpoint(res.checkpoint, device=arm.device)
        return {"step": ck.step, "L": evaluate(ck.model, val), "tokens": ck.state["tokens"],
                "schedule": sched.to_dict()}

    end = BranchEnd.from_dict(_cached(bdir / "result.json", run))
    bar.advance(2 * cfg.T)
    return end


def run_branches(arm: Arm, domains: Mapping[str, Any], val: Mapping[str, list[Tensor]],
                 base: Mapping[int, BasePoint], bar: Progress,
                 log: Callable[[str], None] = logger.info) -> list[Cell]:
    """Both orders from every t0 for every Δw, under ``cfg.replicates`` sampler seeds (the run's own
    first), and the check that every run saw the base's token totals per domain."""
    cfg = arm.cfg
    names = cfg.domain_names
    cells = []
    for t0 in cfg.t0s:
        for dw in arm.variant.delta_ws:
            reps, toks = [], []
            b0, b1 = base[t0], base[t0 + 2 * cfg.T]
            for r in range(cfg.replicates):
                seed = replicate_seed(cfg.seed, t0, r)
                got = {o: _run_branch(arm, domains, val, t0, dw, o, bar, seed) for o in ("12", "21")}
                reps.append({"seed": seed, "L12": got["12"].L, "L21": got["21"].L})
                toks.append({o: {k: got[o].tokens[k] - b0.tokens[k] for k in names} for o in ("12", "21")})
            tok = {"base": {k: b1.tokens[k] - b0.tokens[k] for k in names}, **toks[0]}
            match = all(t["12"] == t["21"] == tok["base"] for t in toks)
            log(f"{arm.label} t0={t0} Δw={dw:g} tokens per domain (base / θ12 / θ21): "
                + "; ".join(f"{k} {tok['base'][k]} / {tok['12'][k]} / {tok['21'][k]}" for k in names)
                + (" — equal" if match else " — NOT equal")
                + (f" (all {cfg.replicates} replicates)" if cfg.replicates > 1 else ""))
            cells.append(Cell(t0=t0, delta_w=dw, T=cfg.T, L_t0=b0.L, L_base=b1.L, L12=reps[0]["L12"],
                              L21=reps[0]["L21"], tokens=tok, tokens_match=match, replicates=reps))
    return cells


# --------------------------------------------------------------------------------------------------
# stage 3: P, λ_max and γ at every checkpoint
# --------------------------------------------------------------------------------------------------
def _estimate_at(arm: Arm, domains: Mapping[str, Any], val: Mapping[str, list[Tensor]], step: int,
                 L: dict[str, float]) -> dict[str, Any]:
    """At the base checkpoint ``step``: the bracket's prediction per unit Δw for every target domain,
    P = P(X, Y; L_i) with X = L_1 − L_2, Y = Σ_k w_k L_k (Cor. 3.2a; = P(L_1, L_2; L_i) for two domains),
    from :class:`commute.estimate.BracketEstimator` with L_i the loss the observation measures (the fixed
    validation batches ``val``, ``target_data``); λ_max of the training mix on one fixed batch per domain;
    γ (and γ_eff for Adam)."""
    from commute.bracket import grad
    from commute.estimate import BracketEstimator
    from commute.model import lm_loss
    from commute.train import adam_metric, load_checkpoint

    cfg = arm.cfg
    names = cfg.domain_names
    d1, d2 = cfg.pair_names
    ck = load_checkpoint(arm.checkpoint(step), device=arm.device, with_optimizer=(arm.optimizer == "adam"))
    model = ck.model
    seed = cfg.seed * 1_000_003 + step
    streams = {k: domains[k].batches(cfg.est_batch_size, cfg.seq_len, seed=seed) for k in names}
    rep = BracketEstimator(model, lm_loss, streams).estimate(
        cfg.n_grad_batches, cfg.n_hvp_batches, targets=list(names), n_groups=cfg.n_groups,
        target_data={k: val[k] for k in names})
    if len(names) == 2:
        P = {k: rep.P(d1, d2, k).to_dict() for k in names}
    else:  # P(X, Y; L), X = L_1 − L_2, Y = the base mix (Cor. 3.2a), from the same groups
        from commute.estimate import Estimate

        P = {k: Estimate.from_samples(rep.pxy_samples(d1, d2, k, arm.variant.base)).to_dict() for k in names}
    lb = {k: [next(domains[k].batches(cfg.lambda_batch_size, cfg.seq_len, seed=seed + 7)).to(arm.device)]
          for k in names}
    mix = mix_loss(fixed_batch_losses(model, lb), arm.variant.base)
    params = model_params(model)
    D = adam_metric(ck.optimizer_state, model) if arm.optimizer == "adam" else None
    with math_attention():  # fused SDPA kernels have no double backward (docs/design.md §2)
        lam = abs(hessian_lambda_max(mix, params, D, iters=cfg.lambda_iters))
    return CheckpointEstimate(
        step=step, L=L, P=P, lr=arm.lr, n_hvp=rep.n_hvp,
        gamma=arm.lr,  # the γ of the prediction (see the module docstring)
        gamma_eff=None if D is None else gamma_eff(grad(mix, params), D, arm.lr),
        lambda_max=lam, lambda_of="D^-1/2 H D^-1/2 (Adam)" if D is not None else "H", target="val",
    ).to_dict()


def estimate_checkpoints(arm: Arm, domains: Mapping[str, Any], val: Mapping[str, list[Tensor]],
                         base: Mapping[int, BasePoint], bar: Progress) -> list[CheckpointEstimate]:
    """:func:`_estimate_at` at every t0 and extra P step (cached by the estimator's settings)."""
    cfg = arm.cfg
    est_key = config_hash([cfg.n_grad_batches, cfg.n_hvp_batches, cfg.est_batch_size, cfg.n_groups,
                           cfg.lambda_iters, cfg.lambda_batch_size, "target: val"])
    out = []
    for step in sorted({*cfg.t0s, *cfg.extra_p_steps}):
        path = arm.cache / f"P_{step:08d}_{est_key}.json"
        if not path.is_file():
            bar.describe(f"{arm.label}: P and λ_max at step {step}")
        out.append(CheckpointEstimate.from_dict(
            _cached(path, lambda step=step: _estimate_at(arm, domains, val, step, base[step].L))))
    return out


# --------------------------------------------------------------------------------------------------
# stage 3b: the schedule's linear response over every window
# --------------------------------------------------------------------------------------------------
def _unit_delta(cfg: StudyConfig) -> dict[str, list[float]]:
    """δw(t) of θ12 per unit Δw over the window [t0, t0 + 2T): +1 on d1 / −1 on d2, then the opposite."""
    d1, d2 = cfg.pair_names
    up = [1.0] * cfg.T + [-1.0] * cfg.T
    return {d1: up, d2: [-x for x in up]}


def _gauss_points(cfg: StudyConfig, delta_ws: Sequence[float]) -> dict[float | None, tuple[float, ...]]:
    """Where the response is estimated, as multiples of δw(t): ``{None: (0,)}`` (the base window), or with
    ``response.cubic`` {Δw: (+a, −a)} with a = Δw/√3 (:func:`commute.response.cubic_node`, the two-point
    Gauss–Legendre nodes of ∫ over [−Δw, Δw])."""
    from commute.response import cubic_node

    if not cfg.response.cubic:
        return {None: (0.0,)}
    return {dw: (cubic_node(dw), -cubic_node(dw)) for dw in delta_ws}


def shifted_schedule(base: Mapping[str, float], delta: Mapping[str, Sequence[float]],
                     eps: float) -> list[dict[str, float]]:
    """base + eps·δw(t) at every step of δw's window (domains without δw keep their base weight)."""
    n = len(next(iter(delta.values())))
    return [{k: base[k] + eps * delta[k][t] if k in delta else base[k] for k in base} for t in range(n)]


def _response_at(arm: Arm, domains: Mapping[str, Any], val: Mapping[str, list[Tensor]],
                 t0: int) -> dict[str, Any]:
    """:class:`commute.response.ResponseEstimator` over the base window [t0, t0 + 2T) replayed from the
    checkpoint at t0; per target domain, the predicted antisymmetric excess (EL^12 − EL^21)/2 per unit Δw,
    Σ_t δw(t)·G(t) (docs/design.md §1b), and the first-order alignment baseline's (G without curvature).
    The targets are the losses the observation measures: the fixed validation batches ``val``
    (``target_data``), not the training split the steps' fresh batches come from.

    With ``response.trajectories`` R > 1 the window is replayed under the replicates' sampler seeds
    (trajectory r is the base continuation of replicate r's θ12/θ21 pair; r = 0 the run's own batches), one
    estimate per trajectory with its own fresh batches, and the prediction is the mean over trajectories
    with stderr std/√R: G along one trajectory varies from trajectory to trajectory far more than its
    stderr over groups says (that stderr is conditional on the trajectory). R = 1: one trajectory, the
    stderr over its groups. Trajectory 0's replay is checked against the base checkpoint at t0 + 2T.

    With ``response.cubic`` the estimates are made along replicate r's branches at base ± a·δw(t), a =
    Δw/√3, and their mean is the prediction for Δw (``by_delta_w``): f(Δw) = ½ ∫_{−Δw}^{Δw} L'(ε) dε for
    f = (EL^12 − EL^21)/2 and L(ε) the loss after the schedule base + ε·δw(t), and the two-point Gauss rule
    ∫ ≈ Δw [L'(a) + L'(−a)] is exact for L' cubic: f/Δw to O(Δw⁴), where the first-order answer L'(0) is
    off by O(Δw²).

    With a noise channel each estimate also records its two parts, ``mean_field`` and ``noise`` (they add up
    to ``response``: what the schedule does through the training gradient's mean and through its noise)."""
    from commute.estimate import Estimate
    from commute.model import lm_loss
    from commute.response_estimator import ResponseEstimator
    from commute.train import load_checkpoint, lr_at, param_group_names

    cfg, rc, tc = arm.cfg, arm.cfg.response, arm.tc
    names = cfg.domain_names
    n = 2 * cfg.T
    base = dict(arm.variant.base)
    unit = _unit_delta(cfg)
    nodes = _gauss_points(cfg, arm.variant.delta_ws)
    points = [e for at in nodes.values() for e in at]
    per: list[dict[float, dict[str, dict[str, dict[str, Any]]]]] = []  # [trajectory][point][domain]
    groups: dict[float, dict[tuple[str, str], Any]] = {}  # trajectory 0's per-group predictions
    n_hvp, seconds, replay_error = 0, 0.0, math.nan
    channel, adjoint = _noise_channel(arm), _adjoint(arm)
    order = tuple(domains)  # the sampler's domain indices
    rows = {"train_rows": lambda batch: batch.by_domain(order)}
    noise = ({"noise": "rows", **rows} if channel == "rows" else
             {"noise": tc.sampler_mode, "train_batch_size": tc.batch_size} if channel else
             {"adjoint": "train", **rows} if adjoint == "train" else {})
    # with a noise channel its term is also recorded alone, and the rest (the mean field's), per unit Δw
    parts = ("response", "alignment", *(("mean_field", "noise") if channel else ()))
    for r in range(rc.trajectories):
        per.append({})
        for eps in points:
            sched = shifted_schedule(base, unit, eps)
            ck = load_checkpoint(arm.checkpoint(t0), device=arm.device, with_optimizer=True)

            def train_batches(state: Mapping[str, Any] = ck.state["sampler"], r: int = r,
                              sched: list[dict[str, float]] = sched) -> Callable[[int], Any]:
                sampler = replicate_sampler(domains, tc, state, cfg.seed, t0, r)
                return lambda s: sampler.next_batch(sched[s - t0])

            seed = cfg.seed * 1_000_003 + t0 + 13 + 7919 * r  # the same fresh streams at every point
            streams = {k: domains[k].batches(rc.batch_size, cfg.seq_len, seed=seed) for k in names}
            # optimiser, its hyperparameters per group and the lr schedule are read from the run itself
            est = ResponseEstimator(ck.model, lm_loss, streams, lr=lambda step: lr_at(tc, step),
                                    state=ck.optimizer_state, state_names=param_group_names(ck.model))
            if r == 0 and math.isnan(replay_error):  # the replay must be the base run: compare its end with
                end = load_checkpoint(arm.checkpoint(t0 + n), device=arm.device)  # the base checkpoint
                replay_error = est.replay(train_batches(sched=[base] * n), n, start=t0).rel_error(end.model)
            with math_attention():  # fused SDPA kernels have no double backward (docs/design.md §2)
                rep = est.estimate(train_batches(), sched, targets=list(names), steps=n, start=t0,
                                   n_groups=rc.n_groups, batches_per_step=rc.batches_per_step,
                                   target_data={k: val[k] for k in names}, **noise)
            n_hvp, seconds = n_hvp + rep.n_hvp, seconds + rep.seconds
            samples = {(k, p): _part_samples(rep, k, unit, p) for k in names for p in parts}
            per[r][eps] = {k: {p: Estimate.from_samples(samples[k, p]).to_dict() for p in parts}
                           for k in names}
            if r == 0:  # per-group predictions: one trajectory's points share their fresh batches
                groups[eps] = samples

    def combine(at: Sequence[float]) -> dict[str, dict[str, Any]]:
        """Per target and predictor: the mean over ``at``'s points of each trajectory, then over
        trajectories (stderr std/√R); one trajectory: over its groups of the points' mean, group by group
        (the points' estimates share fresh batches and sampler draws, so they are correlated)."""
        def one(k: str, p: str) -> dict[str, Any]:
            x = [statistics.fmean(float(t[e][k][p]["mean"]) for e in at) for t in per]
            if len(x) > 1:
                se = statistics.stdev(x) / math.sqrt(len(x))
                return Estimate(statistics.fmean(x), se, len(x)).to_dict()
            return Estimate.from_samples(sum(groups[e][k, p] for e in at) / len(at)).to_dict()

        return {k: {p: one(k, p) for p in parts} for k in names}

    out = {"step": t0, "target": "val", "n_groups": rc.n_groups, "batch_size": rc.batch_size,
           "trajectories": rc.trajectories,
           "batches_per_step": rc.batches_per_step, "noise": channel or False,
           "adjoint": adjoint, "n_hvp": n_hvp,
           "seconds": seconds,
           "replay_rel_error": replay_error}
    if rc.cubic:
        out["cubic"] = True
        out["by_delta_w"] = {delta_w_key(dw): combine(at) for dw, at in nodes.items()}
    else:
        out["unit"] = combine([0.0]) if len(per) > 1 else per[0][0.0]
    if len(per) > 1 or rc.cubic:
        out["per_trajectory"] = ([t[0.0] for t in per] if not rc.cubic else
                                 [{delta_w_key(e): t[e] for e in points} for t in per])
    return out


def _part_samples(rep: Any, target: str, unit: Mapping[str, Any], part: str) -> Any:
    """Per-group Σ_t δw(t)·G(t) of one predictor or part of the response: ``"response"``, ``"alignment"``
    (G0), ``"mean_field"`` or ``"noise"`` (a noise channel's own term and the rest)."""
    if part in ("response", "alignment"):
        return rep.predict_samples(target, unit, baseline=part == "alignment")
    return rep.predict_samples(target, unit, part=part)


def _noise_channel(arm: Arm) -> str | None:
    """The arm's sampling-noise channel: ``"rows"`` (any optimiser), ``"variance"`` (``response.noise`` true
    or "variance": Adam arms only, SGD arms ignore it in the estimate and in its cache key alike) or None."""
    noise = arm.cfg.response.noise
    if noise == "rows":
        return "rows"
    return "variance" if noise in (True, "variance") and arm.optimizer in ("adam", "adamw") else None


def _adjoint(arm: Arm) -> str:
    """How the arm's response pulls its adjoint back: ``"train"`` (the training rows' own Hessians: the rows
    channel's, or ``response.adjoint: train``) or ``"fresh"``."""
    return "train" if _noise_channel(arm) == "rows" or arm.cfg.response.adjoint == "train" else "fresh"


def estimate_response(arm: Arm, domains: Mapping[str, Any], val: Mapping[str, list[Tensor]],
                      bar: Progress) -> dict[int, dict[str, Any]]:
    """:func:`_response_at` at every t0 (cached by the response settings); {} when disabled."""
    rc = arm.cfg.response
    if not rc.enabled:
        return {}
    channel = _noise_channel(arm)
    noise = channel == "variance"  # the former boolean, so that earlier caches keep their keys
    key = config_hash(["response", "target: val", rc.n_groups, rc.batch_size]
                      + ([rc.trajectories] if rc.trajectories != 1 else [])
                      + ([rc.batches_per_step, noise] if (rc.batches_per_step, noise) != (1, False) else [])
                      + (["noise: rows"] if channel == "rows" else [])
                      + (["adjoint: train"] if rc.adjoint == "train" and channel != "rows" else [])
                      + (["cubic", *arm.variant.delta_ws] if rc.cubic else []))
    out = {}
    for t0 in arm.cfg.t0s:
        path = arm.cache / f"response_{t0:08d}_{key}.json"
        if not path.is_file():
            bar.describe(f"{arm.label}: linear response over [{t0}, {t0 + 2 * arm.cfg.T})")
        out[t0] = _cached(path, lambda t0=t0: _response_at(arm, domains, val, t0))
    return out


# --------------------------------------------------------------------------------------------------
# stage 4: predictions beside the observations
# --------------------------------------------------------------------------------------------------
def _observed(antis: Sequence[float]) -> dict[str, Any]:
    """Mean ± stderr of the replicates' antisymmetric excess; significant when |mean/se| exceeds the
    two-sided 95 % Student-t quantile with R − 1 degrees of freedom (never with one replicate)."""
    from commute.scores import t_threshold

    R = len(antis)
    mean = float(sum(antis) / R)
    se = float(torch.tensor(antis, dtype=torch.float64).std().item() / math.sqrt(R)) if R > 1 else math.nan
    t = mean / se if R > 1 and se > 0 else math.nan
    return {"mean": mean, "stderr": se, "n": R, "t": t,
            "significant": bool(R > 1 and se > 0 and abs(t) > t_threshold(R - 1))}


def _scaled(e: Mapping[str, Any], dw: float) -> dict[str, float]:
    return {"mean": float(e["mean"]) * dw, "stderr": float(e["stderr"]) * dw}


def predict(arm: Arm, cells: Sequence[Cell], estimates: Sequence[CheckpointEstimate],
            responses: Mapping[int, Mapping[str, Any]] | None = None) -> list[Cell]:
    """Fill each cell's locality number γ·T·λ_max and, per target domain, the observation (mean ± stderr
    over replicates of (EL^12 − EL^21)/2, :func:`commute.bracket.antisymmetric_excess`) and the four
    predictors, each with its stderr: the bracket γ²ΔwT²P (:func:`commute.bracket.intervention_excess`),
    the linear response and the first-order alignment baseline (Σ δw·G, with and without curvature), and
    the recency rule (sign only: the domain boosted last ends better)."""
    by_step = {e.step: e for e in estimates}
    T = arm.cfg.T
    d1, d2 = arm.cfg.pair_names
    responses = responses or {}
    for c in cells:
        e = by_step[c.t0]
        c.locality = arm.lr * T * e.lambda_max
        c.per_domain = {}
        reps = c.replicates or [{"L12": c.L12, "L21": c.L21}]
        for k in arm.cfg.domain_names:
            el12, el21 = c.L12[k] - c.L_base[k], c.L21[k] - c.L_base[k]
            obs = _observed([antisymmetric_excess(r["L12"][k] - c.L_base[k], r["L21"][k] - c.L_base[k])
                             for r in reps])
            anti = obs["mean"]
            pm, ps = e.P[k]["mean"], e.P[k]["stderr"]
            pred = intervention_excess(pm, c.delta_w, T, e.gamma)
            preds: dict[str, Any] = {
                "bracket": {"mean": pred, "stderr": intervention_excess(ps, c.delta_w, T, e.gamma)},
                "recency": {"mean": 1.0 if k == d1 else -1.0 if k == d2 else None, "stderr": None},
            }
            if c.t0 in responses:
                u = response_unit(responses[c.t0], c.delta_w).get(k)
                if u is None:
                    raise CommuteError(f"the response at t0 = {c.t0} has no estimate for Δw = {c.delta_w} "
                                       f"and {k!r}; delete its cache file to re-estimate it.")
                preds["response"] = _scaled(u["response"], c.delta_w)
                preds["alignment"] = _scaled(u["alignment"], c.delta_w)
            c.per_domain[k] = {"EL12": el12, "EL21": el21, "antisym": anti, "observed": obs, "pred": pred,
                               "pred_stderr": preds["bracket"]["stderr"],
                               "z": pm / ps if ps > 0 else math.nan, "agree": bool(pred * anti > 0),
                               "predictions": preds}
            if e.gamma_eff is not None:
                c.per_domain[k]["pred_gamma_eff"] = intervention_excess(pm, c.delta_w, T, e.gamma_eff)
    return list(cells)


_GAMMA_RULE = {
    "sgd": "γ = lr (plain gradient descent, the theory's own case); λ_max of H.",
    "adam": "γ = lr, as the paper (its sign is all the prediction claims for Adam). The alternative "
            "γ_eff = lr·⟨g, D⁻¹g⟩/⟨g, g⟩ (the GD step with Adam's first-order loss decrease, D = √v̂ + ε from "
            "the checkpoint) is in the P table; λ_max is of Adam's preconditioned Hessian "
            "D^{-1/2} H D^{-1/2}, so γTλ_max = lr·T·λ_max is the size of Adam's linearised step over the "
            "intervention.",
}


def run_arm(arm: Arm, domains: Mapping[str, Any], val: Mapping[str, list[Tensor]], bar: Progress,
            log: Callable[[str], None] = logger.info) -> ArmResult:
    """The four stages of one arm."""
    run_base(arm, domains, bar)
    base = evaluate_base(arm, val)
    cells = run_branches(arm, domains, val, base, bar, log)
    estimates = estimate_checkpoints(arm, domains, val, base, bar)
    responses = estimate_response(arm, domains, val, bar)
    return ArmResult(optimizer=arm.optimizer, variant=arm.variant.name, base=dict(arm.variant.base),
                     lr=arm.lr, T=arm.cfg.T, gamma_rule=_GAMMA_RULE[arm.optimizer], run_dir=str(arm.run_dir),
                     base_curve=[base[t] for t in arm.targets], checkpoints=estimates,
                     responses=[responses[t] for t in sorted(responses)],
                     cells=predict(arm, cells, estimates, responses))


# --------------------------------------------------------------------------------------------------
# the locality sweep from one base checkpoint
# --------------------------------------------------------------------------------------------------
def run_locality(cfg: StudyConfig, domains: Mapping[str, Any], out: Path, device: str,
                 log: Callable[[str], None] = logger.info) -> dict[str, Any] | None:
    """:func:`commute.locality.locality_sweep` from the configured base checkpoint (cached)."""
    from commute.train import load_checkpoint

    lc = cfg.locality
    if not lc.enabled:
        return None
    var = _locality_variant(cfg)
    t0 = cfg.t0s[lc.t0_index]
    ckdir = Arm(cfg, lc.optimizer, var, out, device).checkpoint(t0)
    key = config_hash({"ck": str(ckdir), "loc": asdict(lc), "seed": cfg.seed})

    def sweep() -> dict[str, Any]:
        ck = load_checkpoint(ckdir, device=device)
        batches = {k: [next(domains[k].batches(lc.batch_size, cfg.seq_len, seed=cfg.seed + 99)).to(device)]
                   for k in cfg.domain_names}
        with math_attention():  # fused SDPA kernels have no double backward (docs/design.md §2)
            res = locality_sweep(ck.model, batches, var.base, lc.delta_w, lc.T_grid,
                                 lr_times_lambda=lc.lr_times_lambda, lambda_iters=cfg.lambda_iters,
                                 progress=log, response=lc.response, pair=cfg.pair_names)
        res["source"] = f"the {lc.optimizer} {var.name} base checkpoint at step {t0}"
        res["batch_size"] = lc.batch_size
        return res

    return _cached(out / "locality" / f"locality-{key}.json", sweep)


# --------------------------------------------------------------------------------------------------
# the whole study
# --------------------------------------------------------------------------------------------------
def _planned_steps(cfg: StudyConfig) -> int:
    """Optimiser steps the whole study takes (base runs and branches), for the progress bar."""
    last = max({*cfg.t0s, *(t + 2 * cfg.T for t in cfg.t0s), *cfg.extra_p_steps})
    branches = sum(len(v.delta_ws) for v in cfg.variants) * len(cfg.t0s) * cfg.replicates * 2 * 2 * cfg.T
    per_opt = last * len(cfg.variants) + branches
    return per_opt * len(cfg.optimizers)


def run_bilingual_study(
    preset: str = "tiny",
    out_dir: str | Path = "reports/study",
    *,
    config: StudyConfig | str | Path | None = None,
    optimizers: Sequence[str] | None = None,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    jobs: int = 1,
    seed: int | None = None,
) -> StudyResult:
    """Run the bilingual order study and write its report; returns a :class:`StudyResult`.

    ``config`` (a :class:`StudyConfig` or YAML path) overrides ``preset``; ``optimizers`` restricts it to
    e.g. ``["adam"]``; ``seed`` replaces its seed (model init and sampler streams: several seeds of one
    preset pool with :func:`commute.scores.pool_studies`). Everything lands in ``out_dir``:
    ``config.yaml`` (re-run with it), ``runs/`` (base runs and branches, each cached by a config hash, so
    a re-run skips finished work and an interrupted study resumes), ``results.json`` and the report
    (``report.md``, PNGs, CSVs). Progress lines (token checks, stages) go to ``log`` (default: the
    ``commute`` logger).

    ``jobs`` > 1 runs the arms in that many spawned processes (at most one per arm), each with the
    config's ``threads``; on a GPU they share the device. The results are those of ``jobs=1``. A script
    that calls this with ``jobs`` > 1 needs the usual ``if __name__ == "__main__":`` guard (spawn).
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise CommuteError(f"jobs must be an integer >= 1 (the number of processes running the study's "
                           f"arms), got {jobs!r}.")
    if config is None:
        cfg = get_preset(preset)
    elif isinstance(config, StudyConfig):
        cfg = config
    else:
        cfg = StudyConfig.from_yaml(config)
    if seed is not None:
        cfg = StudyConfig.from_dict({**cfg.to_dict(), "seed": seed})
    if optimizers is not None:
        cfg = StudyConfig.from_dict({**cfg.to_dict(), "optimizers": list(optimizers)})
        if cfg.locality.optimizer not in cfg.optimizers:
            cfg.locality.optimizer = cfg.optimizers[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out / "config.yaml")
    prev_threads = torch.get_num_threads()
    if cfg.threads > 0:  # tiny models on a shared CPU run far faster on one thread each
        torch.set_num_threads(cfg.threads)
    try:
        return _run_study(cfg, out, device, cache_dir, progress, log or logger.info, jobs)
    finally:
        torch.set_num_threads(prev_threads)


def _load_data(cfg: StudyConfig,
               cache_dir: str | Path | None) -> tuple[dict[str, Any], dict[str, list[Tensor]]]:
    """The study's domains (from the token cache once tokenised) and its fixed validation batches."""
    from commute.data import load_domains

    domains = load_domains(cfg.domains, tokenizer=cfg.tokenizer, cache_dir=cache_dir)
    val = {k: domains[k].val_batches(cfg.n_val_batches, cfg.val_batch_size, cfg.seq_len)
           for k in cfg.domain_names}
    return domains, val


def _run_study(cfg: StudyConfig, out: Path, device: str, cache_dir: str | Path | None, progress: bool,
               log: Callable[[str], None], jobs: int = 1) -> StudyResult:
    """The body of :func:`run_bilingual_study` (threads already set)."""
    from commute.report import render_report
    from commute.scores import summarise

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    log(f"loading the corpora {', '.join(f'{k}={v}' for k, v in cfg.domains.items())} "
        "(fetched and tokenised on first use, then cached)")
    domains, val = _load_data(cfg, cache_dir)  # with jobs > 1 also fills the token cache the workers read
    plan = [(opt, var) for opt in cfg.optimizers for var in cfg.variants]
    with Progress("study", _planned_steps(cfg), enabled=progress, unit="steps", eta=False) as bar:
        if min(jobs, len(plan)) == 1:
            arms = [run_arm(Arm(cfg, opt, var, out, device), domains, val, bar, log).to_dict()
                    for opt, var in plan]
        else:
            arms = _run_arms_in_processes(cfg, plan, out, device, cache_dir, min(jobs, len(plan)), bar, log)
        bar.describe("study: training done; locality sweep (float64, full batch, not counted in steps)")
        locality = run_locality(cfg, domains, out, device, log)
        bar.describe("study: done")
    data: dict[str, Any] = {"config": cfg.to_dict(), "domains": list(cfg.domain_names),
                            "pair": list(cfg.pair_names), "arms": arms,
                            "locality": locality}
    data["summary"] = summarise(data)
    write_json(out / "results.json", data)
    report = render_report(data, out)
    return StudyResult(out_dir=out, report_path=report, data=data)


# --------------------------------------------------------------------------------------------------
# arms in parallel processes (jobs > 1)
# --------------------------------------------------------------------------------------------------
class _Relay(Progress):
    """A worker's progress bar: forwards advance/describe to the parent's bar over a queue."""

    def __init__(self, queue: Any) -> None:
        super().__init__("", 0, enabled=False)
        self.queue = queue

    def advance(self, n: float = 1) -> None:
        self.queue.put(("advance", n))

    def describe(self, text: str) -> None:
        self.queue.put(("describe", text))


_worker_bar: Progress = Progress("", 0, enabled=False)


def _init_worker(queue: Any, threads: int) -> None:
    """Set up a spawned worker: the parent handles Ctrl-C, torch threads (``threads`` > 0: as configured;
    0: a share of the usable cores, so N workers do not each take them all), progress to the parent's bar."""
    global _worker_bar
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    if queue is not None:
        _worker_bar = _Relay(queue)


def _arm_job(cfg: StudyConfig, optimizer: str, variant: VariantConfig, out: Path, device: str,
             cache_dir: str | Path | None) -> tuple[dict[str, Any], list[str]]:
    """:func:`run_arm` in a worker process: the arm's ``to_dict()`` and the log lines it produced."""
    domains, val = _load_data(cfg, cache_dir)
    lines: list[str] = []
    try:
        res = run_arm(Arm(cfg, optimizer, variant, out, device), domains, val, _worker_bar, lines.append)
    except Exception as exc:
        exc.commute_log = lines  # type: ignore[attr-defined]  # the parent prints them before the error
        raise
    return res.to_dict(), lines


def _relay_to(bar: Progress, queue: Any) -> None:
    """Apply the workers' queued progress messages to the parent's bar."""
    from queue import Empty

    while True:
        try:
            kind, x = queue.get_nowait()
        except Empty:
            return
        if kind == "advance":
            bar.advance(x)
        else:
            bar.describe(x)


def _run_arms_in_processes(cfg: StudyConfig, plan: Sequence[tuple[str, VariantConfig]], out: Path,
                           device: str, cache_dir: str | Path | None, jobs: int, bar: Progress,
                           log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The arms of ``plan`` in ``jobs`` spawned processes (:func:`_arm_job`), returned in ``plan``'s order.

    Each arm's log lines are printed when it finishes. The first failure stops the study: arms not started
    are cancelled, running ones terminated (what they cached stays; a re-run resumes), and the error names
    the arm; Ctrl-C stops the workers the same way.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
    queue = ctx.Queue() if bar.enabled else None
    labels = [f"{opt}/{var.name}" for opt, var in plan]
    results: list[dict[str, Any] | None] = [None] * len(plan)
    bar.describe(f"study: {len(plan)} arms in {jobs} processes")
    bar.info(f"arms 0/{len(plan)}")
    threads = cfg.threads if cfg.threads > 0 else max(1, usable_cores() // jobs)
    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(queue, threads))
    # SIGTERM (a scheduler's stop) stops the workers like Ctrl-C instead of orphaning them
    main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        futures = {pool.submit(_arm_job, cfg, opt, var, out, device, cache_dir): i
                   for i, (opt, var) in enumerate(plan)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            if queue is not None:
                _relay_to(bar, queue)
            for f in sorted(done, key=futures.__getitem__):
                i = futures[f]
                try:
                    results[i], lines = f.result()
                except BrokenProcessPool:
                    unfinished = ", ".join(labels[j] for j, r in enumerate(results) if r is None)
                    raise CommuteError(f"a study worker process died abruptly (killed, e.g. out of memory) "
                                       f"while arms {unfinished} were unfinished; finished work is cached, "
                                       "so running the study again resumes.") from None
                except CommuteError as exc:
                    for line in getattr(exc, "commute_log", ()):
                        log(line)
                    exc.args = (f"{_stopped(labels[i])}: {exc}",)
                    raise exc from None
                except Exception as exc:
                    for line in getattr(exc, "commute_log", ()):
                        log(line)
                    raise CommuteError(f"{_stopped(labels[i])}: {type(exc).__name__}: {exc} (run it with "
                                       "jobs=1 for the traceback).") from exc
                for line in lines:
                    log(line)
                bar.info(f"arms {sum(r is not None for r in results)}/{len(plan)}")
    except BaseException:
        _stop_workers(pool)
        raise
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    pool.shutdown()
    if queue is not None:
        _relay_to(bar, queue)
    return [r for r in results if r is not None]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _stopped(label: str) -> str:
    return (f"study arm {label} failed, so the study stopped (finished work is cached; running it again "
            "resumes)")


def _stop_workers(pool: Any) -> None:
    """Cancel the arms not started and terminate the running ones."""
    procs = list((pool._processes or {}).values())  # no public handle before Python 3.14's terminate_workers
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.terminate()
    pool.shutdown(wait=True)
