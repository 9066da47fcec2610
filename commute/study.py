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
(DESIGN.md §1) and is what we compare with the prediction

    EL_i^12 ≈ γ² Δw T² P(L_1, L_2; L_i)           (DESIGN.md §1; Cor. 3.2a with ε = γT, δ = Δw)

where P(L_1, L_2; L) = ⟨H_2 g_1 − H_1 g_2, ∇L⟩ (paper eq. 6–7 with DESIGN.md's sign) is estimated with
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
by power iteration on HVPs (:func:`top_eigenvalue`); for Adam, of the preconditioned Hessian
D^{-1/2} H D^{-1/2} with the lr (not γ_eff), since lr·D⁻¹H is Adam's linearised step. The locality sweep
(:func:`locality_sweep`) shows on the real model, with deterministic float64 full-batch steps, that the
observed antisymmetric excess / prediction → 1 as γT → 0.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from commute.bracket import Params, hvps, lie_bracket, tree_dot, tree_scale
from commute.errors import CommuteError
from commute.estimate import math_attention

__all__ = [
    "VariantConfig",
    "LocalityConfig",
    "StudyConfig",
    "PRESETS",
    "get_preset",
    "StudyResult",
    "top_eigenvalue",
    "sign_agreement",
    "predicted_excess",
    "locality_sweep",
    "run_bilingual_study",
    "config_hash",
]


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class VariantConfig:
    """One base trajectory and its interventions: paper eq. (9) (balanced) or eq. (10) (imbalanced)."""

    name: str
    base: dict[str, float]  # constant base weights, e.g. {"en": 0.5, "ru": 0.5}
    delta_ws: list[float]  # intervention degrees Δw (θ12 adds Δw to domain 1 first)


@dataclass
class LocalityConfig:
    """The locality sweep: deterministic float64 full-batch GD steps from one base checkpoint."""

    enabled: bool = True
    optimizer: str = "sgd"  # whose balanced base checkpoint to start from
    t0_index: int = -1  # which t0 of that run (index into StudyConfig.t0s)
    T_grid: list[int] = field(default_factory=lambda: [40, 20, 10, 5])
    lr_times_lambda: float = 0.001  # γ = this / λ_max, so γ·T·λ_max = this · T
    delta_w: float = 0.3
    batch_size: int = 8  # sequences per domain in the fixed full batch


@dataclass
class StudyConfig:
    """Everything the study needs; YAML round trip with :meth:`to_yaml` / :meth:`from_yaml`.

    Steps (t0s, T, extra_p_steps) are optimiser steps; a step sees ``batch_size`` sequences of
    ``seq_len`` tokens drawn with the current weights.
    """

    preset: str = "tiny"
    domains: dict[str, str] = field(default_factory=lambda: {"en": "fortunes:en", "ru": "fortunes:ru"})
    tokenizer: str = "byte"
    model_preset: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 64
    batch_size: int = 16
    sampler_mode: str = "sample"
    optimizers: list[str] = field(default_factory=lambda: ["adam", "sgd"])
    lr: dict[str, float] = field(default_factory=lambda: {"adam": 2e-3, "sgd": 0.1})
    t0s: list[int] = field(default_factory=lambda: [100, 250, 400])
    T: int = 50
    extra_p_steps: list[int] = field(default_factory=list)  # more checkpoints for the P table (Table 4)
    variants: list[VariantConfig] = field(
        default_factory=lambda: [
            VariantConfig("balanced", {"en": 0.5, "ru": 0.5}, [0.15, 0.3, 0.45]),
            VariantConfig("imbalanced", {"en": 0.9, "ru": 0.1}, [0.03, 0.06, 0.09]),
        ]
    )
    n_val_batches: int = 8
    val_batch_size: int = 16
    n_grad_batches: int = 16
    n_hvp_batches: int = 16
    est_batch_size: int = 16
    n_groups: int = 6  # estimator groups (stderr = std over groups / sqrt(G))
    lambda_iters: int = 20
    lambda_batch_size: int = 16
    locality: LocalityConfig = field(default_factory=LocalityConfig)
    seed: int = 0
    threads: int = 0  # torch CPU threads for the study (0 = torch's default); no effect on the cache keys
    train_overrides: dict[str, Any] = field(default_factory=dict)  # extra TrainConfig fields

    # -- validation and (de)serialisation ---------------------------------------------------------
    def __post_init__(self) -> None:
        self.variants = [v if isinstance(v, VariantConfig) else VariantConfig(**v) for v in self.variants]
        if not isinstance(self.locality, LocalityConfig):
            self.locality = LocalityConfig(**self.locality)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`CommuteError` with one sentence for an inconsistent study."""
        if len(self.domains) != 2:
            raise CommuteError(f"The bilingual study needs exactly 2 domains, got {len(self.domains)}.")
        for o in self.optimizers:
            if o not in ("adam", "sgd"):
                raise CommuteError(f"Unknown optimizer {o!r} in the study; use 'adam' and/or 'sgd'.")
            if o not in self.lr:
                raise CommuteError(f"The study has no learning rate for optimizer {o!r} (lr.{o}).")
        if self.T < 1 or not self.t0s or min(self.t0s) < 1:
            raise CommuteError("The study needs T >= 1 and at least one intervention start t0 >= 1.")
        names = set(self.domains)
        for v in self.variants:
            if set(v.base) != names:
                raise CommuteError(
                    f"Variant {v.name!r} weights {sorted(v.base)} do not match domains {sorted(names)}."
                )
            room = min(min(w, 1 - w) for w in v.base.values())  # both θ12 and θ21 must stay in [0, 1]
            for dw in v.delta_ws:
                if not (0 < dw <= room + 1e-12):
                    raise CommuteError(f"Variant {v.name!r}: delta_w={dw} pushes a weight outside [0, 1] "
                                       f"in θ12 or θ21 (at most {room:g} here).")
        if self.locality.enabled and self.variants:
            lv = _locality_variant(self)
            if not 0 < self.locality.delta_w <= min(min(w, 1 - w) for w in lv.base.values()) + 1e-12:
                raise CommuteError(f"locality.delta_w={self.locality.delta_w} pushes a weight of the "
                                   f"{lv.name!r} mix outside [0, 1].")
        # The prediction gamma^2 dw T^2 P takes gamma = lr for constant-step plain descent (DESIGN.md §1);
        # refuse settings that would silently change the effective step.
        changed = {k: v for k, v in self.train_overrides.items()
                   if k in _GAMMA_FIELDS and v != _GAMMA_FIELDS[k]}
        if changed:
            raise CommuteError(
                f"train_overrides {changed} change the effective step size, which the prediction "
                "gamma^2*dw*T^2*P (gamma = lr) does not model; remove them from the study config."
            )
        if self.locality.enabled and self.locality.optimizer not in self.optimizers:
            raise CommuteError(
                f"The locality sweep starts from the {self.locality.optimizer!r} run, which the study does "
                "not run."
            )

    @property
    def domain_names(self) -> tuple[str, str]:
        d = tuple(self.domains)
        return d[0], d[1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StudyConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CommuteError(f"Unknown study config field(s): {', '.join(unknown)}.")
        return cls(**copy.deepcopy(dict(d)))

    def to_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path) -> StudyConfig:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise CommuteError(f"Study config {p} does not exist.")
        return cls.from_dict(yaml.safe_load(p.read_text()) or {})


#: The presets (the reasoning is in the README, "Presets"). ``tiny`` is the README's main job (~15-20 min
#: on a shared 2-core CPU for both optimisers): a 2-layer 64-wide GPT-2 on bytes (0.12 M parameters,
#: ~60-80 ms per 20×64-token step here on one thread), T = 50, three t0s in the first 500 steps, the
#: paper's balanced Δw grid and an imbalanced grid on multiples of 1/20 so that the ``exact`` sampler
#: gives θ12, θ21 and the base exactly the same tokens per domain. ``small`` is a fuller reproduction
#: (estimated ~2 h here, not measured); ``paper`` the paper's own settings (GPUs).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "preset": "tiny",
        "threads": 1,
        "model_preset": "tiny",
        "model_overrides": {"n_embd": 64, "n_head": 2, "n_positions": 64},
        "seq_len": 64,
        "batch_size": 20,
        "sampler_mode": "exact",
        "lr": {"adam": 2e-3, "sgd": 0.1},
        "t0s": [100, 250, 400],
        "T": 50,
        "extra_p_steps": [50, 200, 300],
        "variants": [
            {"name": "balanced", "base": {"en": 0.5, "ru": 0.5}, "delta_ws": [0.15, 0.3, 0.45]},
            {"name": "imbalanced", "base": {"en": 0.9, "ru": 0.1}, "delta_ws": [0.05, 0.1]},
        ],
        "n_val_batches": 8,
        "val_batch_size": 16,
        "n_grad_batches": 12,
        "n_hvp_batches": 6,
        "est_batch_size": 16,
        "n_groups": 6,
        "lambda_iters": 15,
        "locality": {"T_grid": [40, 20, 10, 5], "lr_times_lambda": 0.001, "delta_w": 0.3, "batch_size": 8},
    },
    "small": {
        "preset": "small",
        "threads": 1,
        "model_preset": "tiny",
        "model_overrides": {"n_positions": 64},
        "seq_len": 64,
        "batch_size": 20,
        "sampler_mode": "exact",
        "lr": {"adam": 1e-3, "sgd": 0.05},
        "t0s": [200, 700, 1200],
        "T": 100,
        "extra_p_steps": [450, 950, 1400],
        "variants": [
            {"name": "balanced", "base": {"en": 0.5, "ru": 0.5}, "delta_ws": [0.15, 0.3, 0.45]},
            {"name": "imbalanced", "base": {"en": 0.9, "ru": 0.1}, "delta_ws": [0.05, 0.1]},
        ],
        "n_val_batches": 16,
        "val_batch_size": 32,
        "n_grad_batches": 40,
        "n_hvp_batches": 20,
        "est_batch_size": 32,
        "n_groups": 10,
        "lambda_iters": 20,
        "locality": {"T_grid": [40, 20, 10, 5], "lr_times_lambda": 0.001, "delta_w": 0.3, "batch_size": 16},
    },
    "paper": {
        "preset": "paper",
        "model_preset": "gpt2",
        "model_overrides": {},
        "tokenizer": "byte",
        "seq_len": 1024,
        "batch_size": 512,
        "sampler_mode": "sample",
        "lr": {"adam": 1.5e-4, "sgd": 0.1},
        "t0s": [2000, 8000, 14000, 20000],
        "T": 4000,
        "extra_p_steps": [5000, 11000, 17000, 23000],
        "n_val_batches": 20,
        "val_batch_size": 32,
        "n_grad_batches": 100,
        "n_hvp_batches": 100,
        "est_batch_size": 6,
        "lambda_iters": 20,
        "locality": {"T_grid": [40, 20, 10, 5], "lr_times_lambda": 0.001, "delta_w": 0.3, "batch_size": 8},
    },
}


def get_preset(name: str, **overrides: Any) -> StudyConfig:
    """The study config of preset ``name`` with top-level field ``overrides``."""
    if name not in PRESETS:
        raise CommuteError(f"Unknown study preset {name!r}; choose one of {', '.join(PRESETS)}.")
    d = copy.deepcopy(PRESETS[name])
    d.update(overrides)
    return StudyConfig.from_dict(d)


def config_hash(obj: Any, n: int = 12) -> str:
    """Stable short hash of a JSON-able object (the cache key of runs and results)."""
    s = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(s.encode()).hexdigest()[:n]


# --------------------------------------------------------------------------------------------------
# the maths: predictions, sign agreement, λ_max
# --------------------------------------------------------------------------------------------------
def predicted_excess(P: float, delta_w: float, T: int, gamma: float) -> float:
    """Predicted EL^12 = γ² Δw T² P(L_1, L_2; L) (DESIGN.md §1: Cor. 3.2a with ε = γT, δ = Δw)."""
    return gamma**2 * delta_w * T**2 * P


def sign_agreement(
    cells: Sequence[Mapping[str, float]], z_threshold: float = 2.0
) -> dict[str, int]:
    """Count cells whose predicted sign matches the observed antisymmetric excess loss.

    Each cell has ``pred`` (predicted EL^12), ``pred_stderr`` and ``antisym`` ((EL^12 − EL^21)/2).
    Returns ``{"n", "agree", "n_significant", "agree_significant"}``; a cell is significant when
    |pred / pred_stderr| > ``z_threshold``. Cells with a zero prediction or observation never agree.
    """
    out = {"n": 0, "agree": 0, "n_significant": 0, "agree_significant": 0}
    for c in cells:
        pred, se, obs = float(c["pred"]), float(c.get("pred_stderr", math.nan)), float(c["antisym"])
        ok = pred * obs > 0
        out["n"] += 1
        out["agree"] += int(ok)
        if se > 0 and abs(pred / se) > z_threshold:
            out["n_significant"] += 1
            out["agree_significant"] += int(ok)
    return out


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


# --------------------------------------------------------------------------------------------------
# losses of a parameter dict (functional; tied GPT-2 embeddings listed once, DESIGN.md §2)
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
    """For each domain, the loss L_k(params) = mean cross-entropy over its fixed batches."""
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
    """The training mix Σ_k w_k L_k."""

    def loss(p: Params) -> Tensor:
        return sum(float(weights[k]) * losses[k](p) for k in losses if weights.get(k, 0.0) != 0.0)

    return loss


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


# --------------------------------------------------------------------------------------------------
# the locality sweep (deterministic full-batch gradient descent in float64)
# --------------------------------------------------------------------------------------------------
def _gd(loss: Callable[[Params], Tensor], p: dict[str, Tensor], lr: float, steps: int) -> dict[str, Tensor]:
    for _ in range(steps):
        q = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        gs = torch.autograd.grad(loss(q), list(q.values()))
        p = {k: (v - lr * g).detach() for (k, v), g in zip(q.items(), gs, strict=True)}
    return p


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
    from commute.bracket import grad as _grad

    P = {k: float(tree_dot(r, _grad(losses[k], p0))) for k in (d1, d2)}
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
        base_p = _gd(mix_loss(losses, base), p0, lr, 2 * T)
        p12 = _gd(mix_loss(losses, w12b), _gd(mix_loss(losses, w12a), p0, lr, T), lr, T)
        p21 = _gd(mix_loss(losses, w12a), _gd(mix_loss(losses, w12b), p0, lr, T), lr, T)
        lb, l12, l21 = evaluate(base_p), evaluate(p12), evaluate(p21)
        row: dict[str, Any] = {"T": T, "gammaT": lr * T, "locality": lr * T * abs(lam)}
        for k in (d1, d2):
            el12, el21 = l12[k] - lb[k], l21[k] - lb[k]
            pred = predicted_excess(P[k], delta_w, T, lr)
            anti = 0.5 * (el12 - el21)
            row[k] = {"EL12": el12, "EL21": el21, "antisym": anti, "pred": pred,
                      "ratio": anti / pred if pred != 0 else math.nan}
        rows.append(row)
    return {"lr": lr, "lambda_max": lam, "delta_w": delta_w, "base": dict(base), "P": P,
            "domains": [d1, d2], "rows": rows, "L0": evaluate(p0)}


# --------------------------------------------------------------------------------------------------
# result container
# --------------------------------------------------------------------------------------------------
@dataclass
class StudyResult:
    """What :func:`run_bilingual_study` returns: where the report is, and every number in ``data``."""

    out_dir: Path
    report_path: Path
    data: dict[str, Any]

    @property
    def summary(self) -> dict[str, Any]:
        """Sign-agreement counts (see :func:`commute.report.summarise`)."""
        return self.data.get("summary", {})

    def table(self) -> Any:
        """The summary as a rich table, e.g. ``console.print(result.table())``."""
        from commute.report import summary_table

        return summary_table(self.data)


def _atomic_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# orchestration
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


def _arm_key(cfg: StudyConfig, tc: Any) -> str:
    """Cache key of an arm: the training trajectory and the validation set."""
    return config_hash({"trajectory": tc.trajectory_hash(), "val": [cfg.n_val_batches, cfg.val_batch_size]})


def _base_dir(run_dir: Path, targets: Sequence[int]) -> Path:
    """The base run's directory, keyed by its checkpoint steps (a run cannot add checkpoints to its past)."""
    return run_dir / f"base-{config_hash(sorted(targets), 8)}"


def _ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def _adam_precond(ck: Any, model: torch.nn.Module) -> dict[str, Tensor] | None:
    """Adam's diagonal metric D = √v̂ + ε per parameter name, from a checkpoint's optimiser state.

    The optimiser's parameter indices follow commute.train's groups: matrices (dim ≥ 2) first, then the
    rest, each in ``model.parameters()`` order.
    """
    st = ck.optimizer_state
    if not st or not st.get("state"):
        return None
    named = list(model.named_parameters())
    order = [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]
    beta2 = float(st["param_groups"][0]["betas"][1])
    eps = float(st["param_groups"][0]["eps"])
    out: dict[str, Tensor] = {}
    for idx, name in enumerate(order):
        s = st["state"].get(idx) or st["state"].get(str(idx))
        if s is None or "exp_avg_sq" not in s:
            return None
        t = float(s["step"])
        vhat = s["exp_avg_sq"].to(torch.float64) / (1.0 - beta2**t)
        out[name] = (vhat.sqrt() + eps).to(dict(named)[name].dtype)
    return out


class _Steps:
    """A rich progress bar over the study's optimiser steps (or a no-op)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total
        self._p: Any = None

    def __enter__(self) -> _Steps:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            from commute.cli._app import console_err

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), console=console_err, transient=False)
            self._p.start()
            self._task = self._p.add_task("study", total=self.total)
        return self

    def describe(self, text: str) -> None:
        if self._p is not None:
            self._p.update(self._task, description=text)

    def advance(self, n: int) -> None:
        if self._p is not None:
            self._p.advance(self._task, n)

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.stop()


def _planned_steps(cfg: StudyConfig) -> int:
    """Optimiser steps the whole study takes (base runs and branches), for the progress bar."""
    last = max({*cfg.t0s, *(t + 2 * cfg.T for t in cfg.t0s), *cfg.extra_p_steps})
    per_opt = sum(last + len(cfg.t0s) * len(v.delta_ws) * 2 * 2 * cfg.T for v in cfg.variants)
    return per_opt * len(cfg.optimizers)


def _run_arm(
    cfg: StudyConfig,
    optimizer: str,
    variant: VariantConfig,
    domains: Mapping[str, Any],
    val: Mapping[str, list[Tensor]],
    out: Path,
    device: str,
    bar: _Steps,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Base run, branches, evaluations and P estimates of one (optimiser, variant) arm; cached."""
    from commute.estimate import BracketEstimator
    from commute.model import lm_loss
    from commute.schedule import Constant, Intervention
    from commute.train import evaluate, load_checkpoint, train

    d1, d2 = cfg.domain_names
    targets = sorted({*cfg.t0s, *(t + 2 * cfg.T for t in cfg.t0s), *cfg.extra_p_steps})
    tc = _train_config(cfg, optimizer, variant, targets[-1], device)
    arm_key = _arm_key(cfg, tc)
    run_dir = out / "runs" / f"{optimizer}-{variant.name}-{arm_key}"
    base_dir = _base_dir(run_dir, targets)
    cache = run_dir / "cache"
    label = f"{optimizer}/{variant.name}"

    # 1. the base run, with a checkpoint at every target step (resumes if interrupted)
    tc_base = tc.replace(ckpt_steps=targets)
    done = 0
    for t in targets:
        if _ckpt(base_dir, t).is_dir():
            bar.advance(t - done)
            done = t
            continue
        bar.describe(f"{label}: base run to step {t}")
        res = train(tc_base, base_dir, schedule=Constant(variant.base), max_steps=t, domains=domains,
                    progress=False)
        bar.advance(res.step - done)
        done = res.step

    def base_eval(step: int) -> dict[str, Any]:
        path = cache / f"base_{step:08d}.json"
        if path.is_file():
            return json.loads(path.read_text())
        ck = load_checkpoint(_ckpt(base_dir, step), device=device)
        r = {"step": step, "L": evaluate(ck.model, val), "tokens": ck.state.get("tokens", {})}
        _atomic_json(path, r)
        return r

    base_curve = [base_eval(t) for t in targets]
    by_step = {r["step"]: r for r in base_curve}

    # 2. branches θ12 / θ21 from every t0, for every Δw (cached by config hash)
    tc_branch = tc.replace(ckpt_steps=[], ckpt_every=0)
    cells = []
    for t0 in cfg.t0s:
        for dw in variant.delta_ws:
            got: dict[str, dict[str, Any]] = {}
            for order in ("12", "21"):
                sched = Intervention(variant.base, d1, d2, dw, t0, cfg.T)
                if order == "21":
                    sched = sched.reversed()
                key = config_hash({"arm": arm_key, "schedule": sched.to_dict()})
                bdir = run_dir / "branches" / f"t{t0}-dw{dw:g}-{order}-{key}"
                rpath = bdir / "result.json"
                if rpath.is_file():
                    got[order] = json.loads(rpath.read_text())
                    bar.advance(2 * cfg.T)
                    continue
                bar.describe(f"{label}: θ{order} t0={t0} Δw={dw:g}")
                res = train(tc_branch, bdir, branch_from=_ckpt(base_dir, t0), schedule=sched,
                            max_steps=t0 + 2 * cfg.T, domains=domains, progress=False)
                ck = load_checkpoint(res.checkpoint, device=device)
                got[order] = {"step": ck.step, "L": evaluate(ck.model, val), "tokens": ck.state["tokens"],
                              "schedule": sched.to_dict()}
                _atomic_json(rpath, got[order])
                bar.advance(2 * cfg.T)
            b0, b1 = by_step[t0], by_step[t0 + 2 * cfg.T]
            tok = {
                "base": {k: b1["tokens"][k] - b0["tokens"][k] for k in (d1, d2)},
                "12": {k: got["12"]["tokens"][k] - b0["tokens"][k] for k in (d1, d2)},
                "21": {k: got["21"]["tokens"][k] - b0["tokens"][k] for k in (d1, d2)},
            }
            match = tok["base"] == tok["12"] == tok["21"]
            log(f"{label} t0={t0} Δw={dw:g} tokens per domain (base / θ12 / θ21): "
                + "; ".join(f"{k} {tok['base'][k]} / {tok['12'][k]} / {tok['21'][k]}" for k in (d1, d2))
                + (" — equal" if match else " — NOT equal"))
            cells.append({"t0": t0, "delta_w": dw, "T": cfg.T, "L_t0": b0["L"], "L_base": b1["L"],
                          "L12": got["12"]["L"], "L21": got["21"]["L"], "tokens": tok, "tokens_match": match})

    # 3. P(L1, L2; L_i) at every t0 and extra checkpoint, with λ_max and the γ used
    checkpoints = []
    for step in sorted({*cfg.t0s, *cfg.extra_p_steps}):
        est_key = config_hash([cfg.n_grad_batches, cfg.n_hvp_batches, cfg.est_batch_size, cfg.n_groups,
                               cfg.lambda_iters, cfg.lambda_batch_size])
        path = cache / f"P_{step:08d}_{est_key}.json"
        if path.is_file():
            checkpoints.append(json.loads(path.read_text()))
            continue
        bar.describe(f"{label}: P and λ_max at step {step}")
        ck = load_checkpoint(_ckpt(base_dir, step), device=device, with_optimizer=(optimizer == "adam"))
        model = ck.model
        seed = cfg.seed * 1_000_003 + step
        streams = {k: domains[k].batches(cfg.est_batch_size, cfg.seq_len, seed=seed) for k in (d1, d2)}
        est = BracketEstimator(model, lm_loss, streams)
        rep = est.estimate(cfg.n_grad_batches, cfg.n_hvp_batches, targets=[d1, d2], n_groups=cfg.n_groups)
        P = {k: rep.P(d1, d2, k).to_dict() for k in (d1, d2)}
        # λ_max and γ on one fixed batch per domain of the training mix
        lb = {k: [next(domains[k].batches(cfg.lambda_batch_size, cfg.seq_len, seed=seed + 7)).to(device)]
              for k in (d1, d2)}
        losses = domain_losses(model, lb)
        params = model_params(model)
        mix = mix_loss(losses, variant.base)
        lr = float(cfg.lr[optimizer])
        entry: dict[str, Any] = {"step": step, "L": by_step.get(step, base_eval(step))["L"], "P": P,
                                 "lr": lr, "n_hvp": rep.n_hvp}
        entry["gamma"] = lr  # the γ of the prediction (see the module docstring)
        D = _adam_precond(ck, model) if optimizer == "adam" else None
        if D is not None:
            from commute.bracket import grad as _grad

            g = _grad(mix, params)
            assert isinstance(g, Mapping)
            num = sum(float((g[k] * g[k] / D[k]).sum()) for k in g)
            den = sum(float((g[k] * g[k]).sum()) for k in g)
            entry["gamma_eff"] = lr * num / den
        with math_attention():  # fused SDPA kernels have no double backward (DESIGN.md §2)
            entry["lambda_max"] = abs(hessian_lambda_max(mix, params, D, iters=cfg.lambda_iters))
        entry["lambda_of"] = "D^-1/2 H D^-1/2 (Adam)" if D is not None else "H"
        _atomic_json(path, entry)
        checkpoints.append(entry)
    ck_by_step = {c["step"]: c for c in checkpoints}

    # 4. predictions and sign agreement per cell
    for c in cells:
        ck = ck_by_step[c["t0"]]
        gamma = ck["gamma"]
        lr = float(cfg.lr[optimizer])
        c["locality"] = lr * cfg.T * ck["lambda_max"]
        c["per_domain"] = {}
        for k in (d1, d2):
            el12, el21 = c["L12"][k] - c["L_base"][k], c["L21"][k] - c["L_base"][k]
            pm, ps = ck["P"][k]["mean"], ck["P"][k]["stderr"]
            pred = predicted_excess(pm, c["delta_w"], cfg.T, gamma)
            se = predicted_excess(ps, c["delta_w"], cfg.T, gamma)
            anti = 0.5 * (el12 - el21)
            c["per_domain"][k] = {"EL12": el12, "EL21": el21, "antisym": anti, "pred": pred,
                                  "pred_stderr": se, "z": pm / ps if ps > 0 else math.nan,
                                  "agree": bool(pred * anti > 0)}
            if "gamma_eff" in ck:
                geff = ck["gamma_eff"]
                c["per_domain"][k]["pred_gamma_eff"] = predicted_excess(pm, c["delta_w"], cfg.T, geff)
    rule = ("γ = lr (plain gradient descent, the theory's own case); λ_max of H." if optimizer == "sgd" else
            "γ = lr, as the paper (its sign is all the prediction claims for Adam). The alternative "
            "γ_eff = lr·⟨g, D⁻¹g⟩/⟨g, g⟩ (the GD step with Adam's first-order loss decrease, D = √v̂ + ε from "
            "the checkpoint) is in the P table; λ_max is of Adam's preconditioned Hessian "
            "D^{-1/2} H D^{-1/2}, so γTλ_max = lr·T·λ_max is the size of Adam's linearised step over the "
            "intervention.")
    return {"optimizer": optimizer, "variant": variant.name, "base": dict(variant.base),
            "lr": float(cfg.lr[optimizer]), "T": cfg.T, "gamma_rule": rule, "run_dir": str(run_dir),
            "base_curve": [{"step": r["step"], "L": r["L"]} for r in base_curve],
            "checkpoints": checkpoints, "cells": cells}


def _run_locality(cfg: StudyConfig, domains: Mapping[str, Any], out: Path, device: str,
                  log: Callable[[str], None]) -> dict[str, Any] | None:
    from commute.train import load_checkpoint

    lc = cfg.locality
    if not lc.enabled:
        return None
    var = _locality_variant(cfg)
    t0 = cfg.t0s[lc.t0_index]
    targets = sorted({*cfg.t0s, *(t + 2 * cfg.T for t in cfg.t0s), *cfg.extra_p_steps})
    tc = _train_config(cfg, lc.optimizer, var, targets[-1], device)
    arm_key = _arm_key(cfg, tc)
    ckdir = _ckpt(_base_dir(out / "runs" / f"{lc.optimizer}-{var.name}-{arm_key}", targets), t0)
    key = config_hash({"ck": str(ckdir), "loc": asdict(lc), "seed": cfg.seed})
    path = out / "locality" / f"locality-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    ck = load_checkpoint(ckdir, device=device)
    batches = {k: [next(domains[k].batches(lc.batch_size, cfg.seq_len, seed=cfg.seed + 99)).to(device)]
               for k in cfg.domain_names}
    with math_attention():  # fused SDPA kernels have no double backward (DESIGN.md §2)
        res = locality_sweep(ck.model, batches, var.base, lc.delta_w, lc.T_grid,
                             lr_times_lambda=lc.lr_times_lambda, lambda_iters=cfg.lambda_iters, progress=log)
    res["source"] = f"the {lc.optimizer} {var.name} base checkpoint at step {t0}"
    res["batch_size"] = lc.batch_size
    _atomic_json(path, res)
    return res


def _locality_variant(cfg: StudyConfig) -> VariantConfig:
    """The variant whose base run the locality sweep starts from (balanced if there is one)."""
    return next((v for v in cfg.variants if v.name == "balanced"), cfg.variants[0])


#: TrainConfig fields that would change the effective step gamma away from lr, with their neutral values.
_GAMMA_FIELDS: dict[str, Any] = {"momentum": 0.0, "lr_schedule": "constant", "warmup_steps": 0,
                                 "grad_clip": 0.0}


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
) -> StudyResult:
    """Run the bilingual order study and write its report; returns a :class:`StudyResult`.

    ``config`` (a :class:`StudyConfig` or YAML path) overrides ``preset``; ``optimizers`` restricts it to
    e.g. ``["adam"]``. Everything lands in ``out_dir``: ``config.yaml`` (re-run with it), ``runs/``
    (base runs and branches, each cached by a config hash, so a re-run skips finished work and an
    interrupted study resumes), ``results.json`` and the report (``report.md``, PNGs, CSVs).
    """
    if config is None:
        cfg = get_preset(preset)
    elif isinstance(config, StudyConfig):
        cfg = config
    else:
        cfg = StudyConfig.from_yaml(config)
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
        return _run_study(cfg, out, device, cache_dir, progress, log)
    finally:
        torch.set_num_threads(prev_threads)


def _run_study(cfg: StudyConfig, out: Path, device: str, cache_dir: str | Path | None, progress: bool,
               log: Callable[[str], None] | None) -> StudyResult:
    """The body of :func:`run_bilingual_study` (threads already set)."""
    from commute.data import load_domains

    if log is None and progress:
        from commute.cli._app import console_err

        def log(s: str) -> None:
            console_err.print(s, highlight=False)

    say = log or (lambda s: None)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    domains = load_domains(cfg.domains, tokenizer=cfg.tokenizer, cache_dir=cache_dir)
    val = {k: domains[k].val_batches(cfg.n_val_batches, cfg.val_batch_size, cfg.seq_len)
           for k in cfg.domain_names}
    arms = []
    with _Steps(progress, _planned_steps(cfg)) as bar:
        for opt in cfg.optimizers:
            for var in cfg.variants:
                arms.append(_run_arm(cfg, opt, var, domains, val, out, device, bar, say))
        bar.describe("locality sweep (float64, full batch)")
        locality = _run_locality(cfg, domains, out, device, say)
    from commute.report import render_report, summarise

    data: dict[str, Any] = {"config": cfg.to_dict(), "domains": list(cfg.domain_names), "arms": arms,
                            "locality": locality}
    data["summary"] = summarise(data)
    _atomic_json(out / "results.json", data)
    report = render_report(data, out)
    return StudyResult(out_dir=out, report_path=report, data=data)
