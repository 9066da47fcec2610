"""Audit a run's checkpoint: the bracket of every ordered domain pair, the order tournament, and how local.

:func:`bracket_at` reads a checkpoint written by :func:`commute.train.train` (or a run directory: its latest
checkpoint), rebuilds the run's domains from its config, and estimates with
:class:`commute.estimate.BracketEstimator` (unbiased, with a stderr over independent batch groups):

* P(L_i, L_j; L) = g_L . H_j g_i - g_L . H_i g_j for every ordered pair (i, j) of the run's K domains and
  every target L: each domain's own loss and the run's training mix ``"mix"`` = Σ_k w_k(t) L_k with the
  schedule's weights w(t) at the checkpoint's step t (docs/design.md §1 sign: P > 0 means training i then
  j raises L compared with mixing them);
* the order tournament of each target (S_i = Σ_j P(L_i, L_j; L), the suggested order first to last; see
  :class:`commute.estimate.TournamentReport`), from the same groups at no extra HVP;
* λ_max of the training mix's Hessian on one fixed batch per domain (for Adam/AdamW of the preconditioned
  D^{-1/2} H D^{-1/2}, D = √v̂ + ε from the checkpoint's optimiser state), and the locality number
  γ·T·λ_max with γ the learning rate at the checkpoint's step and T a horizon in steps: the expansion behind
  every prediction holds as γ·T·λ_max → 0 (docs/design.md §1), so it says how far to trust a magnitude.

Everything is computed in the checkpoint's dtype on ``device``; batches come from the domains' training
splits (independent streams seeded by ``seed``). The result is a :class:`BracketAudit` (``to_dict`` /
``to_json`` / ``tables``); the ``commute bracket`` command only prints it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from commute.errors import CommuteError
from commute.estimate import DEFAULT_MIX_NAME, BracketReport, Estimate, TournamentReport
from commute.io import write_json

__all__ = ["BracketAudit", "bracket_at", "locality_note"]

FORMAT = "commute.bracket_audit/1"


def locality_note(value: float) -> str:
    """How far to trust a prediction at locality γ·T·λ_max (tiers calibrated by the study's sweeps)."""
    if not math.isfinite(value):
        return "unknown"
    if value < 0.01:
        return "local: magnitudes within a few %"
    if value < 0.1:
        return "near-local: magnitudes within ~20 %"
    return "far outside the local regime: trust signs at most"


@dataclass
class BracketAudit:
    """What :func:`bracket_at` found at one checkpoint (see the module docstring)."""

    checkpoint: str
    step: int
    optimizer: str
    report: BracketReport  #: P for every pair, basis = each domain's loss ("pairs" mode): any target
    targets: dict[str, dict[str, float]]  #: each domain's own loss and the training mix
    mix_name: str
    mix_from: str  #: where the mix's weights come from (the schedule at the step, or uniform)
    lambda_max: float
    lambda_of: str  #: "H" or "D^-1/2 H D^-1/2 (Adam)"
    gamma: float  #: the learning rate at the checkpoint's step
    horizon: int  #: T, in optimiser steps
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def domains(self) -> tuple[str, ...]:
        return self.report.domains

    @property
    def locality(self) -> float:
        """γ·T·λ_max."""
        return self.gamma * self.horizon * self.lambda_max

    def P(self, i: str, j: str, target: str) -> Estimate:
        """P(L_i, L_j; L) with its stderr; ``target`` is a domain or the mix's name."""
        return self.report.P(i, j, self._weights(target))

    def _weights(self, target: str) -> dict[str, float]:
        if target not in self.targets:
            raise CommuteError(f"unknown target {target!r}; the audit's targets are {list(self.targets)}.")
        return self.targets[target]

    def tournament(self, target: str) -> TournamentReport:
        """The order tournament of ``target`` (the suggested order is ``.order``, first to last)."""
        return self.report.tournament(self._weights(target), name=target)

    @property
    def ranking(self) -> dict[str, list[str]]:
        """Per target, the domains in the suggested training order, first to last (ascending S_i)."""
        return {t: self.tournament(t).order for t in self.targets}

    # ---- output ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (see ``commute bracket --help`` for the fields)."""
        P = []
        for i in self.domains:
            for j in self.domains:
                if i != j:
                    for t in self.targets:
                        P.append({"i": i, "j": j, "target": t, **self.P(i, j, t).to_dict()})
        tours = {t: self.tournament(t) for t in self.targets}
        return {
            "format": FORMAT,
            "checkpoint": self.checkpoint,
            "step": self.step,
            "domains": list(self.domains),
            "targets": self.targets,
            "mix": {"name": self.mix_name, "weights": self.targets[self.mix_name], "from": self.mix_from},
            "optimizer": self.optimizer,
            "lambda_max": self.lambda_max,
            "lambda_of": self.lambda_of,
            "locality": {"horizon": self.horizon, "gamma": self.gamma, "value": self.locality,
                         "note": locality_note(self.locality)},
            "P": P,
            "P_meaning": "P(i, j; L) = g_L.H_j g_i - g_L.H_i g_j; > 0: training i then j raises L compared "
                         "with mixing them (so j then i lowers it).",
            "ranking": {t: r.order for t, r in tours.items()},
            "ranking_meaning": "suggested training order, first to last: ascending S_i = sum_j P(i, j; L); "
                               "S_i > 0 means training i before the others raises L.",
            "scores": {t: {d: e.to_dict() for d, e in r.scores.items()} for t, r in tours.items()},
            "estimator": {"n_groups": self.report.n_groups, "grad_batches": self.report.grad_batches,
                          "hvp_batches": self.report.hvp_batches, "n_hvp": self.report.n_hvp,
                          "hvp_per_batch": self.report.hvp_per_batch, "mode": self.report.mode,
                          "seconds": self.report.seconds},
            "settings": self.settings,
            "seconds": self.seconds,
        }

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` atomically (:func:`commute.io.write_json`)."""
        return write_json(path, self.to_dict())

    def tables(self) -> list[Any]:
        """Rich renderables: the P table, the tournament table, the locality line."""
        from rich.table import Table
        from rich.text import Text

        p = Table(title=f"P(i, j; L) at step {self.step} of {self.checkpoint}",
                  caption="P(j, i; L) = −P(i, j; L). P > 0: training i then j raises L compared with mixing "
                          f"them (prefer j then i); bold: |z| ≥ 2. {self.report.n_groups} groups, "
                          f"{self.report.grad_batches} gradient + {self.report.hvp_batches} HVP batches per "
                          f"domain, {self.report.n_hvp} HVPs.",
                  caption_justify="left")
        for col in ("i → j", "L", "P", "± stderr", "z"):
            p.add_column(col, justify="left" if col in ("i → j", "L") else "right")
        pairs = [(i, j) for a, i in enumerate(self.domains) for j in self.domains[a + 1:]]
        for n, (i, j) in enumerate(pairs):
            for m, t in enumerate(self.targets):
                p.add_row(f"{i} → {j}" if m == 0 else "", t, *_cells(self.P(i, j, t)),
                          end_section=m == len(self.targets) - 1 and n < len(pairs) - 1)

        r = Table(title="Order tournament: S_i = Σ_j P(i, j; L), suggested order first to last",
                  caption="Ascending S_i: S_i > 0 means training i before the others raises L, so it goes "
                          "late. Local, and only as sure as the z.",
                  caption_justify="left")
        for col in ("L", "#", "domain", "S_i", "± stderr", "z"):
            r.add_column(col, justify="left" if col in ("L", "domain") else "right")
        for n, t in enumerate(self.targets):
            tour = self.tournament(t)
            for rank, d in enumerate(tour.order, 1):
                r.add_row(t if rank == 1 else "", str(rank), d, *_cells(tour.score(d)),
                          end_section=rank == len(tour.order) and n < len(self.targets) - 1)

        mix = ", ".join(f"{k} {v:g}" for k, v in self.targets[self.mix_name].items())
        lam_bs = self.settings.get("lambda_batch_size", "?")
        loc = Text.from_markup(
            f"Training mix [bold]{self.mix_name}[/] = {mix} ({self.mix_from}). "
            f"λ_max = {self.lambda_max:.4g} (of {self.lambda_of}, the training mix, {lam_bs} sequences per "
            f"domain); γ = {self.gamma:g} (the {self.optimizer} learning rate at step {self.step}); "
            f"locality γ·T·λ_max = [bold]{self.locality:.3g}[/] for a horizon of T = {self.horizon} steps: "
            f"{locality_note(self.locality)}.")
        return [p, r, loc]


def _cells(e: Estimate) -> tuple[str, str, str]:
    bold = math.isfinite(e.z) and abs(e.z) >= 2
    cells = (f"{e.mean:+.3e}", f"{e.stderr:.1e}", f"{e.z:+.1f}")
    return tuple(f"[bold]{c}[/bold]" for c in cells) if bold else cells  # type: ignore[return-value]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CommuteError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CommuteError(f"device {name!r} was requested but CUDA is not available on this machine.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CommuteError(f"device {name!r} was requested but MPS is not available on this machine.")
    return dev


def _mix_weights(ck: Any, domains: tuple[str, ...]) -> tuple[dict[str, float], str]:
    """The schedule's weights at the checkpoint's step, or uniform if the schedule cannot be rebuilt."""
    try:
        sched = ck.schedule
    except CommuteError:  # e.g. a callable schedule: recorded by name only
        sched = None
    if sched is None:
        return {d: 1.0 / len(domains) for d in domains}, "uniform: the run's schedule cannot be rebuilt"
    w = sched(ck.step)
    return {d: float(w.get(d, 0.0)) for d in domains}, f"the schedule's weights at step {ck.step}"


def bracket_at(
    checkpoint: str | os.PathLike[str],
    *,
    grad_batches: int = 40,
    hvp_batches: int = 20,
    groups: int = 5,
    batch_size: int | None = None,
    horizon: int = 100,
    device: str = "cpu",
    seed: int = 0,
    lambda_batch_size: int | None = None,
    lambda_iters: int = 20,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> BracketAudit:
    """Estimate the bracket, the order tournament and the locality at a checkpoint (module docstring).

    Args:
        checkpoint: a ``step_*`` checkpoint directory, or a run directory (its latest checkpoint).
        grad_batches, hvp_batches, groups: per domain, as :meth:`BracketEstimator.estimate`'s
            ``n_grad_batches``, ``n_hvp_batches``, ``n_groups``.
        batch_size: sequences per estimator batch (default: the run's ``batch_size``); sequences are the
            run's ``seq_len``.
        horizon: T in γ·T·λ_max, in optimiser steps (e.g. the length of a reordering you consider).
        device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``.
        seed: seeds the estimator's batch streams (independent of the run's own sampler).
        lambda_batch_size: sequences per domain in the fixed batch of λ_max (default: ``batch_size``).
        lambda_iters: power iterations for λ_max.
        cache_dir: the token cache (default: the run's ``cache_dir``).
    """
    from commute.curvature import domain_losses, hessian_lambda_max, math_attention, mix_loss, model_params
    from commute.data import load_domains
    from commute.estimate import BracketEstimator
    from commute.model import lm_loss
    from commute.train import adam_metric, load_checkpoint, lr_at

    t0 = time.perf_counter()
    if not isinstance(horizon, int) or horizon < 1:
        raise CommuteError(f"the horizon must be a whole number of steps >= 1, got {horizon!r}.")
    dev = _device(device)
    path = Path(checkpoint)
    if not path.exists():
        raise CommuteError(f"{str(path)!r} does not exist; give a run directory or one of its checkpoints.")
    ck = load_checkpoint(path, device=dev, with_optimizer=True)
    cfg, model = ck.config, ck.model
    assert model is not None
    names = tuple(ck.state.get("domain_names") or cfg.domains)
    if len(names) < 2:
        raise CommuteError(f"the run at {str(ck.path)!r} has {len(names)} domain(s); the bracket needs two.")
    bs = int(batch_size or cfg.batch_size)
    lam_bs = int(lambda_batch_size or bs)
    if bs < 1 or lam_bs < 1:
        raise CommuteError(f"batch sizes must be >= 1, got {bs} and {lam_bs}.")
    domains = load_domains({n: cfg.domains[n] for n in names}, tokenizer=cfg.tokenizer,
                           cache_dir=cache_dir if cache_dir is not None else cfg.cache_dir,
                           val_fraction=cfg.val_fraction)

    mix_name = DEFAULT_MIX_NAME if DEFAULT_MIX_NAME not in names else "training_mix"
    mix, mix_from = _mix_weights(ck, names)
    targets = {**{d: {d: 1.0} for d in names}, mix_name: {d: w for d, w in mix.items() if w != 0.0}}

    streams = {n: domains[n].batches(bs, cfg.seq_len, seed=seed) for n in names}
    est = BracketEstimator(model, lm_loss, streams)
    report = est.estimate(grad_batches, hvp_batches, targets=targets, n_groups=groups, mode="pairs",
                          progress=progress)

    # λ_max of the training mix on one fixed batch per domain (a stream of its own: seed + 1)
    lb = {n: [next(domains[n].batches(lam_bs, cfg.seq_len, seed=seed + 1)).to(dev)] for n in names}
    params = model_params(model)
    D = adam_metric(ck.optimizer_state, model) if cfg.optimizer in ("adam", "adamw") else None
    with math_attention():  # fused SDPA kernels have no double backward (docs/design.md §2)
        lam = abs(hessian_lambda_max(mix_loss(domain_losses(model, lb), mix), params, D, iters=lambda_iters,
                                     seed=seed))
    lambda_of = "D^-1/2 H D^-1/2 (Adam)" if D is not None else "H"
    settings = {"grad_batches": report.grad_batches, "hvp_batches": report.hvp_batches, "groups": groups,
                "batch_size": bs, "seq_len": cfg.seq_len, "lambda_batch_size": lam_bs,
                "lambda_iters": lambda_iters, "seed": seed, "device": str(dev),
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    return BracketAudit(checkpoint=str(ck.path), step=ck.step, optimizer=cfg.optimizer, report=report,
                        targets=targets, mix_name=mix_name, mix_from=mix_from, lambda_max=float(lam),
                        lambda_of=lambda_of, gamma=float(lr_at(cfg, ck.step)), horizon=horizon,
                        settings=settings, seconds=time.perf_counter() - t0)
