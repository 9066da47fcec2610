"""The bilingual study's configuration: :class:`StudyConfig` (YAML round trip, validation) and its presets.

The shipped presets are also written out as ``configs/study_*.yaml``. Steps (t0s, T, extra_p_steps) are
optimiser steps. Validation refuses, in one sentence, anything the study's predictions do not model
(three or more domains, Δw pushing a weight outside [0, 1], settings that change the effective step).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from commute.errors import CommuteError
from commute.io import atomic_write, read_yaml
from commute.schedule import check_delta_w

__all__ = ["VariantConfig", "LocalityConfig", "ResponseConfig", "StudyConfig", "PRESETS", "get_preset",
           "config_hash"]


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
    lr_times_lambda: float | list[float] = 0.001  # γ = this / λ_max (each, if a list): γ·T·λ_max = this · T
    delta_w: float = 0.3
    batch_size: int = 8  # sequences per domain in the fixed full batch
    response: bool = True  # also the exact linear response of the GD map (docs/design.md §1b)


@dataclass
class ResponseConfig:
    """The schedule's linear response on the real runs (:class:`commute.response.ResponseEstimator`):
    per (arm, t0) one adjoint sweep over the base window [t0, t0 + 2T) replayed from the checkpoint."""

    enabled: bool = True
    n_groups: int = 2  # independent groups of fresh batches (stderr over groups)
    batch_size: int = 10  # fresh sequences per domain per step per group
    trajectories: int = 1  # replays of the window under the replicates' sampler seeds (stderr over them)
    batches_per_step: int = 1  # fresh batches of batch_size per domain per step per group
    # the sampling-noise channel: "rows" (the whole channel from the training batches' own rows, any
    # optimiser, exact-count sampling), "variance" or true (Adam's v only, batches_per_step >= 2), false: none
    noise: bool | str = False
    # how the adjoint is pulled back: "fresh" (the fresh batches' Hessians) or "train" (the training rows'
    # own, the realised map's; the rows channel's always)
    adjoint: str = "fresh"
    # through the Δw³ term: per Δw, estimates along the branches at base ± (Δw/√3)·δw(t) averaged (the
    # two-point Gauss rule for (EL^12 − EL^21)/(2Δw), exact to O(Δw⁴)); 2 estimates per Δw, not 1 per window
    cubic: bool = False


@dataclass
class StudyConfig:
    """Everything the study needs; YAML round trip with :meth:`to_yaml` / :meth:`from_yaml`.

    Steps (t0s, T, extra_p_steps) are optimiser steps; a step sees ``batch_size`` sequences of
    ``seq_len`` tokens drawn with the current weights.
    """

    preset: str = "tiny"
    domains: dict[str, str] = field(default_factory=lambda: {"en": "fortunes:en", "ru": "fortunes:ru"})
    pair: list[str] | None = None  # the two domains the interventions trade weight (default: the first two)
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
    replicates: int = 1  # sampler seeds per θ12/θ21 pair (the study's own + fresh ones): observed mean ± se
    response: ResponseConfig = field(default_factory=ResponseConfig)
    seed: int = 0
    threads: int = 0  # torch CPU threads for the study (0 = torch's default); no effect on the cache keys
    train_overrides: dict[str, Any] = field(default_factory=dict)  # extra TrainConfig fields

    # -- validation and (de)serialisation ---------------------------------------------------------
    def __post_init__(self) -> None:
        self.variants = [v if isinstance(v, VariantConfig) else VariantConfig(**v) for v in self.variants]
        if not isinstance(self.locality, LocalityConfig):
            self.locality = LocalityConfig(**self.locality)
        if not isinstance(self.response, ResponseConfig):
            self.response = ResponseConfig(**self.response)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`CommuteError` with one sentence for an inconsistent study."""
        if not isinstance(self.domains, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                         for k, v in self.domains.items()):
            raise CommuteError("domains must map names to sources, e.g. {en: 'fortunes:en', ru: 'x.txt'}.")
        if self.pair is not None and (not isinstance(self.pair, list)
                                      or not all(isinstance(d, str) for d in self.pair)):
            raise CommuteError(f"pair must be a list of two domain names, got {self.pair!r}.")
        for name in ("T", "replicates", "seed", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise CommuteError(f"{name} must be an integer, got {v!r}.")
        if self.seed < 0:
            raise CommuteError(f"seed must be >= 0, got {self.seed}.")
        if not isinstance(self.t0s, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                      for t in self.t0s):
            raise CommuteError(f"t0s must be a list of integer steps, got {self.t0s!r}.")
        if not isinstance(self.lr, dict) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                     and v > 0 for v in self.lr.values()):
            raise CommuteError(f"lr must map optimisers to positive numbers, e.g. {{adam: 0.002}}, got "
                               f"{self.lr!r}.")
        for v in self.variants:
            if not all(isinstance(d, int | float) and not isinstance(d, bool) for d in v.delta_ws):
                raise CommuteError(f"Variant {v.name!r}: delta_ws must be numbers, got {v.delta_ws!r}.")
        if len(self.domains) < 2:
            raise CommuteError(f"The study needs at least 2 domains, got {len(self.domains)}.")
        if self.pair is not None and (len(self.pair) != 2 or len(set(self.pair)) != 2
                                      or not set(self.pair) <= set(self.domains)):
            raise CommuteError(f"pair must name two different domains of {sorted(self.domains)}, "
                               f"got {self.pair!r}.")
        if not isinstance(self.replicates, int) or self.replicates < 1:
            raise CommuteError(f"replicates must be an integer >= 1, got {self.replicates!r}.")
        if self.response.n_groups < 2 or self.response.batch_size < 1:
            raise CommuteError("response.n_groups must be >= 2 (for a stderr) and response.batch_size >= 1.")
        for name in ("trajectories", "batches_per_step"):
            x = getattr(self.response, name)
            if not isinstance(x, int) or isinstance(x, bool) or x < 1:
                raise CommuteError(f"response.{name} must be an integer >= 1, got {x!r}.")
        noise = self.response.noise
        if not isinstance(noise, bool | str) or noise not in (False, True, "variance", "rows"):
            raise CommuteError(f"response.noise must be false, 'rows' or 'variance' (true), got "
                               f"{noise!r}.")
        if noise == "rows" and self.sampler_mode != "exact":
            raise CommuteError("response.noise: rows needs sampler_mode: exact (the channel assumes fixed "
                               "rows per domain); use 'variance' with sampled batches.")
        if not isinstance(self.response.cubic, bool):
            raise CommuteError(f"response.cubic must be true or false, got {self.response.cubic!r}.")
        if self.response.adjoint not in ("fresh", "train"):
            raise CommuteError(f"response.adjoint must be 'fresh' or 'train', got {self.response.adjoint!r}.")
        if self.response.adjoint == "train" and noise in (True, "variance"):
            raise CommuteError("response.adjoint: train goes with response.noise: rows or false, not with "
                               "the variance channel.")
        if noise in (True, "variance") and self.response.batches_per_step < 2:
            raise CommuteError("response.noise needs response.batches_per_step >= 2 (the per-row gradient "
                               "variance comes from the spread of a step's fresh batches).")
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
            d1, d2 = self.pair_names
            for dw in v.delta_ws:
                if not dw > 0:
                    raise CommuteError(f"Variant {v.name!r}: delta_w must be > 0, got {dw}.")
                check_delta_w(v.base, d1, d2, dw, where=f"Variant {v.name!r}: ")
        if self.locality.enabled and self.variants:
            lv = _locality_variant(self)
            d1, d2 = self.pair_names
            if not self.locality.delta_w > 0:
                raise CommuteError(f"locality.delta_w must be > 0, got {self.locality.delta_w}.")
            check_delta_w(lv.base, d1, d2, self.locality.delta_w,
                          where=f"locality.delta_w of the {lv.name!r} mix: ")
        # The prediction gamma^2 dw T^2 P takes gamma = lr for constant-step plain descent
        # (docs/design.md §1); refuse settings that would silently change the effective step.
        changed = {k: v for k, v in self.train_overrides.items()
                   if k in _GAMMA_FIELDS and v != _GAMMA_FIELDS[k]}
        replay = {k: v for k, v in self.train_overrides.items()
                  if k in _REPLAY_FIELDS and v != _REPLAY_FIELDS[k]}
        if replay:
            raise CommuteError(f"train_overrides {replay} change how a step's batch is trained, which the "
                               "study's response replay does not model; remove them from the study config.")
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
    def domain_names(self) -> tuple[str, ...]:
        """Every domain (each is a target of the predictions)."""
        return tuple(self.domains)

    @property
    def pair_names(self) -> tuple[str, str]:
        """(d1, d2): θ12 boosts d1 first, θ21 boosts d2 first."""
        d = tuple(self.pair) if self.pair else tuple(self.domains)[:2]
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

        atomic_write(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path) -> StudyConfig:
        d = read_yaml(path, f"Study config {Path(path)}") or {}
        if not isinstance(d, Mapping):
            raise CommuteError(f"Study config {Path(path)} must be a mapping of field: value.")
        return cls.from_dict(d)


#: The presets (the reasoning is in the README, "Presets"). ``tiny`` is the README's main job (~15-20 min
#: on a shared 2-core CPU for both optimisers): a 2-layer 64-wide GPT-2 on bytes (0.12 M parameters,
#: ~60-80 ms per 20×64-token step here on one thread), T = 50, three t0s in the first 500 steps, the
#: paper's balanced Δw grid and an imbalanced grid below 0.1 (0.1 would remove ``ru`` for T steps: not
#: first order); the ``exact`` sampler carries its rounding error, so θ12, θ21 and the base draw exactly the
#: same tokens per domain for any Δw. ``small`` is a fuller reproduction
#: (27 min on one H100 with ``jobs=4``; hours on this CPU); ``paper`` the paper's own settings (GPUs).
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
            {"name": "imbalanced", "base": {"en": 0.9, "ru": 0.1}, "delta_ws": [0.045, 0.09]},
        ],
        "n_val_batches": 8,
        "val_batch_size": 16,
        "n_grad_batches": 12,
        "n_hvp_batches": 6,
        "est_batch_size": 16,
        "n_groups": 6,
        "lambda_iters": 15,
        "replicates": 3,
        "response": {"n_groups": 2, "batch_size": 10, "trajectories": 3},
        "locality": {"T_grid": [20, 5], "lr_times_lambda": [0.001, 0.05, 1.0], "delta_w": 0.3,
                     "batch_size": 8},
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
            {"name": "imbalanced", "base": {"en": 0.9, "ru": 0.1}, "delta_ws": [0.03, 0.06, 0.09]},
        ],
        "n_val_batches": 16,
        "val_batch_size": 32,
        "n_grad_batches": 40,
        "n_hvp_batches": 20,
        "est_batch_size": 32,
        "n_groups": 10,
        "lambda_iters": 20,
        "replicates": 5,
        # the rows channel: late in this preset's run the gradient noise's effect is as large as the mean
        # field's (README, "Measured (small preset…)": Adam; SGD orders almost nothing there with either);
        # on ``tiny`` the default is better
        "response": {"n_groups": 2, "batch_size": 10, "trajectories": 4, "noise": "rows"},
        "locality": {"T_grid": [40, 20, 10, 5], "lr_times_lambda": [0.001, 0.05, 0.5], "delta_w": 0.3,
                     "batch_size": 16},
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
        "replicates": 3,
        "response": {"n_groups": 2, "batch_size": 6},
        "locality": {"T_grid": [40, 20, 10, 5], "lr_times_lambda": [0.001, 0.05, 0.5], "delta_w": 0.3,
                     "batch_size": 8},
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


def _locality_variant(cfg: StudyConfig) -> VariantConfig:
    """The variant whose base run the locality sweep starts from (balanced if there is one)."""
    return next((v for v in cfg.variants if v.name == "balanced"), cfg.variants[0])


#: TrainConfig fields the response's window replay assumes at these values (one sampled batch per step,
#: its plain mean loss).
_REPLAY_FIELDS: dict[str, Any] = {"grad_accum": 1, "loss_weighting": "sample"}

#: TrainConfig fields that would change the effective step gamma away from lr, with their neutral values.
_GAMMA_FIELDS: dict[str, Any] = {"momentum": 0.0, "lr_schedule": "constant", "warmup_steps": 0,
                                 "grad_clip": 0.0}


