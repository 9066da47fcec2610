"""Audit a run: at one checkpoint (:func:`bracket_at`, ``commute bracket``) or over all of them
(:func:`audit_run`, ``commute audit``).

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

:func:`audit_run` goes over a run's checkpoints (any K, any schedule): the P table along training with the
locality of each window ahead, the Cor. 3.2b check that the training mix is locally optimal (docs/design.md
§1), the schedule gradient G_k(t) = ∂L/∂w_k(t) over windows replayed from their first checkpoint on the
run's own batches (:class:`commute.response.ResponseEstimator`), and recommendations, each with its
evidence; an :class:`AuditResult` written as ``audit.json``, ``report.md`` and PNGs (cached per checkpoint
and window). ``commute audit`` prints its summary.

Both take ``distributed=True`` under torchrun (``commute bracket`` and ``commute audit`` pass it when
``WORLD_SIZE`` > 1): every rank loads the checkpoints and domains, both estimators split their groups over
the ranks (:mod:`commute.distributed`), and every rank returns the one-process result; rank 0 alone logs,
shows progress and writes files. λ_max, the response estimator's replays of a window and the replay check
are done by every rank.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from commute.distributed import SINGLE, World, check_device, current, device_for, env_world, on_main, setup
from commute.errors import CommuteError
from commute.estimate import DEFAULT_MIX_NAME, BracketReport, Estimate, TournamentReport
from commute.io import atomic_write, write_json
from commute.progress import logger

__all__ = ["BracketAudit", "bracket_at", "locality_note", "AuditResult", "audit_run", "recommendations",
           "render_audit", "audit_tables"]

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

    def _target_words(self) -> str:
        """What L was measured on (older results, without ``settings["target"]``: training draws)."""
        return _TARGET_WORDS.get(self.settings.get("target"), _TARGET_WORDS["train"])

    def tables(self) -> list[Any]:
        """Rich renderables: the P table, the tournament table, the locality line."""
        from rich.table import Table
        from rich.text import Text

        p = Table(title=f"P(i, j; L) at step {self.step} of {self.checkpoint}",
                  caption="P(j, i; L) = −P(i, j; L). P > 0: training i then j raises L compared with mixing "
                          f"them (prefer j then i); bold: |z| ≥ 2. L: {self._target_words()}. "
                          f"{self.report.n_groups} groups, "
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


#: What the bracket's target L was measured on, per ``settings["target"]`` / ``bracket_target``.
_TARGET_WORDS = {"val": "the run's validation batches", "train": "fresh training-split batches"}


def _run_val_batches(cfg: Any, domains: Mapping[str, Any],
                     names: Sequence[str]) -> dict[str, list[torch.Tensor]]:
    """The run's validation batches per domain, the estimators' default targets: ``eval_batches`` (at least
    1, even for a run that did not evaluate) of its ``batch_size`` from each validation split, the set
    ``train`` evaluates on unless it was given its own."""
    return {n: domains[n].val_batches(max(1, cfg.eval_batches), cfg.batch_size, cfg.seq_len) for n in names}


def _join(distributed: bool, device: str) -> World:
    """The ranks of a distributed audit (:data:`SINGLE` unless ``distributed``): torchrun's process group,
    joined now (gloo, or nccl for a CUDA ``device``) after the refusals ``commute train`` makes too."""
    if not distributed:
        return SINGLE
    world = current() if current().enabled else env_world()
    check_device(world, device, "estimating")
    return setup(device)


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
    train_target: bool = False,
    progress: bool = False,
    distributed: bool = False,
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
        train_target: project P on fresh training-split draws (the population training loss) instead of
            the run's validation batches (``eval_batches`` of ``batch_size``: the loss its evaluation
            reports, exact and the same in every group; the default, as the audit's response and the study).
        progress: show the estimator's progress bar (rank 0's only).
        distributed: under torchrun, split the estimator's groups over the ranks (every rank must call
            this with the same arguments; see the module docstring): every rank returns the one-process
            result. Nothing is written here.
    """
    from commute.curvature import domain_losses, hessian_lambda_max, math_attention, mix_loss, model_params
    from commute.data import load_domains
    from commute.estimate import BracketEstimator
    from commute.model import lm_loss
    from commute.train import adam_metric, load_checkpoint, lr_at, resolve_device

    t0 = time.perf_counter()
    if not isinstance(horizon, int) or horizon < 1:
        raise CommuteError(f"the horizon must be a whole number of steps >= 1, got {horizon!r}.")
    world = _join(distributed, device)
    dev = device_for(world, resolve_device(device))
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
    held = None if train_target else _run_val_batches(cfg, domains, names)
    est = BracketEstimator(model, lm_loss, streams)
    report = est.estimate(grad_batches, hvp_batches, targets=targets, n_groups=groups, mode="pairs",
                          target_data=held, progress=progress, distributed=world.enabled)

    # λ_max of the training mix on one fixed batch per domain (a stream of its own: seed + 1)
    lb = {n: [next(domains[n].batches(lam_bs, cfg.seq_len, seed=seed + 1)).to(dev)] for n in names}
    params = model_params(model)
    D = adam_metric(ck.optimizer_state, model) if cfg.optimizer in ("adam", "adamw") else None
    with math_attention():  # fused SDPA kernels have no double backward (docs/design.md §2)
        lam = abs(hessian_lambda_max(mix_loss(domain_losses(model, lb), mix), params, D, iters=lambda_iters,
                                     seed=seed))
    lambda_of = "D^-1/2 H D^-1/2 (Adam)" if D is not None else "H"
    settings = {"grad_batches": report.grad_batches, "hvp_batches": report.hvp_batches, "groups": groups,
                "target": "train" if train_target else "val",
                "batch_size": bs, "seq_len": cfg.seq_len, "lambda_batch_size": lam_bs,
                "lambda_iters": lambda_iters, "seed": seed, "device": str(dev),
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                **({"world_size": report.meta["world_size"]} if "world_size" in report.meta else {})}
    return BracketAudit(checkpoint=str(ck.path), step=ck.step, optimizer=cfg.optimizer, report=report,
                        targets=targets, mix_name=mix_name, mix_from=mix_from, lambda_max=float(lam),
                        lambda_of=lambda_of, gamma=float(lr_at(cfg, ck.step)), horizon=horizon,
                        settings=settings, seconds=time.perf_counter() - t0)


def _bracket_audit_from_cache(d: dict[str, Any]) -> BracketAudit:
    """A :class:`BracketAudit` back from :func:`audit_run`'s cache file (``to_dict`` plus the report's
    per-group samples)."""
    a, rep = d["audit"], BracketReport.from_dict(d["report"])
    return BracketAudit(checkpoint=a["checkpoint"], step=int(a["step"]), optimizer=a["optimizer"], report=rep,
                        targets={k: dict(v) for k, v in a["targets"].items()}, mix_name=a["mix"]["name"],
                        mix_from=a["mix"]["from"], lambda_max=float(a["lambda_max"]),
                        lambda_of=a["lambda_of"],
                        gamma=float(a["locality"]["gamma"]), horizon=int(a["locality"]["horizon"]),
                        settings=dict(a["settings"]), seconds=float(a["seconds"]))


# ==================================================================================================
# the audit of a whole run: `commute audit RUN`
# ==================================================================================================
AUDIT_FORMAT = "commute.audit/1"

#: what the sign conventions mean, written into audit.json beside the numbers
MEANINGS = {
    "P": "P(i, j; L) = g_L.H_j g_i - g_L.H_i g_j at the checkpoint; > 0: training i then j raises L compared "
         "with mixing them, so j before i lowers it (docs/design.md §1).",
    "optimality": "Cor. 3.2b: P(X, Y; L) with X = L_i - L_j, Y = sum_k w_k L_k the training mix at the "
                  "step; shifting +delta to w_i and -delta to w_j for eps, then the opposite for eps, "
                  "changes L by delta eps^2 P(X, Y; L). At a locally optimal schedule P(X, Y; L) = 0 "
                  "wherever w_i, w_j > 0; a violation is |t| above the two-sided 95 % Student-t quantile "
                  "(G - 1 dof). P > 0: 'more i now, more j later' raises L, so 'more j now, more i later' "
                  "lowers it.",
    "response": "G_k(t) = dL(theta_end)/dw_k(t) over a window replayed from its first checkpoint on the "
                "run's own batches (commute.response.ResponseEstimator); G < 0: more weight on k at step t "
                "would have lowered L at the window's end. Moving weight delta from j to k at every step "
                "where j has weight changes L by delta * sum_t (G_k(t) - G_j(t)) over those steps to first "
                "order, at any horizon; best_shift is the most significant such shift (a selection among "
                "K(K-1)).",
}


@dataclass
class AuditResult:
    """What :func:`audit_run` found (``data`` is exactly ``audit.json``; the renderers read only it).

    ``brackets`` holds each checkpoint's :class:`BracketAudit` (per-group samples in ``.report``) and
    ``responses`` each estimated window's :class:`commute.response.ResponseReport`, keyed (start, end).
    """

    run: Path
    out_dir: Path
    data: dict[str, Any]
    brackets: dict[int, BracketAudit]
    responses: dict[tuple[int, int], Any]
    report_path: Path | None = None
    figures: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able result (what ``audit.json`` holds; the schema is in :func:`audit_run`)."""
        return self.data

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        return write_json(path, self.data)

    @property
    def p_table(self) -> list[dict[str, Any]]:
        return self.data["p_table"]

    @property
    def violations(self) -> list[dict[str, Any]]:
        """The Cor. 3.2b rows with status ``"violation"``."""
        return [r for r in self.data["optimality"] if r["status"] == "violation"]

    @property
    def windows(self) -> list[dict[str, Any]]:
        return self.data["response"]["windows"]

    @property
    def recommendations(self) -> list[dict[str, Any]]:
        return self.data["recommendations"]

    def tables(self, max_recommendations: int = 8) -> list[Any]:
        """Rich renderables for the terminal: per checkpoint, per window, and the recommendations."""
        return audit_tables(self.data, max_recommendations)


def _clean(x: Any) -> Any:
    """JSON-strict copy: non-finite floats become None, numpy scalars Python numbers."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(float(x)) else None
    return x


def _est(samples: np.ndarray) -> dict[str, Any]:
    """Mean, stderr, n and t (= z) of per-group samples, JSON-strict."""
    return _clean(Estimate.from_samples(np.asarray(samples, dtype=np.float64)).to_dict())


def _hash(obj: Any) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _read_cache(path: Path) -> dict[str, Any] | None:
    import json

    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # a damaged cache file is recomputed (written atomically, so rare)
        return None


def _select_checkpoints(run: Path, checkpoints: str | Sequence[int]) -> list[Path]:
    from commute.train import list_checkpoints

    if not run.exists():
        raise CommuteError(f"{str(run)!r} does not exist; give the directory of a run trained by commute.")
    if (run / "state.json").is_file():
        raise CommuteError(f"{str(run)!r} is one checkpoint; give its run directory "
                           f"({str(run.parent.parent)!r}) and --checkpoints "
                           f"{run.name.removeprefix('step_').lstrip('0') or '0'}.")
    cks = list_checkpoints(run)
    if not cks:
        raise CommuteError(f"no checkpoint found in {str(run)!r}; give the directory of a run trained by "
                           "commute (it holds checkpoints/step_*).")
    by_step = {int(p.name[5:]): p for p in cks}
    if isinstance(checkpoints, str):
        if checkpoints != "all":
            raise CommuteError(f"checkpoints must be 'all' or a list of steps, got {checkpoints!r}.")
        return cks
    try:
        steps = sorted({int(s) for s in checkpoints})
    except (TypeError, ValueError):
        raise CommuteError(f"checkpoints must be 'all' or a list of steps, got {checkpoints!r}.") from None
    if not steps:
        raise CommuteError("no checkpoint steps given; pass 'all' or at least one step.")
    missing = [s for s in steps if s not in by_step]
    if missing:
        raise CommuteError(f"the run {str(run)!r} has no checkpoint at step(s) "
                           f"{', '.join(map(str, missing))}; its checkpoints are at steps "
                           f"{', '.join(map(str, sorted(by_step)))}.")
    return [by_step[s] for s in steps]


def _optimality_rows(audit: BracketAudit, threshold: float, dof: int) -> list[dict[str, Any]]:
    """Cor. 3.2b at one checkpoint: for every unordered pair i < j and every target, P(X, Y; L) with
    X = L_i − L_j and Y = Σ_k w_k L_k (w: the training mix at the step), per group by bilinearity,
    P(X, Y; L) = Σ_k w_k [P(i, k; L) − P(j, k; L)]; a violation where w_i, w_j > 0 and |t| > threshold."""
    rep, names = audit.report, audit.domains
    w = audit.targets[audit.mix_name]
    eps = audit.gamma * audit.horizon / 2  # the intervention's two halves fill the window
    rows = []
    for a, i in enumerate(names):
        for j in names[a + 1:]:
            wi, wj = float(w.get(i, 0.0)), float(w.get(j, 0.0))
            for t, tw in audit.targets.items():
                g = rep.pxy_samples(i, j, tw, {k: w.get(k, 0.0) for k in names})
                e = Estimate.from_samples(g)
                tval = e.z
                sig = math.isfinite(tval) and abs(tval) > threshold
                status = "exempt" if min(wi, wj) <= 0 else ("violation" if sig else "consistent")
                first, then = (j, i) if e.mean > 0 else (i, j)
                rows.append({
                    "step": audit.step, "i": i, "j": j, "target": t, "w_i": wi, "w_j": wj,
                    "mean": e.mean, "stderr": e.stderr, "t": tval, "n": e.n, "dof": dof,
                    "threshold": threshold, "significant": sig, "status": status,
                    "exempt_reason": (f"w_{i if wi <= 0 else j} = 0 at step {audit.step}"
                                      if status == "exempt" else None),
                    "groups": np.asarray(g, dtype=np.float64).tolist(),
                    "better": {"more_now": first, "more_later": then} if sig else None,
                    "excess_per_delta": _est(eps**2 * np.asarray(g)),
                    "gamma": audit.gamma, "horizon": audit.horizon, "locality": audit.locality,
                })
    return rows


def _p_row(audit: BracketAudit, threshold: float, horizon_to: str) -> dict[str, Any]:
    d = audit.to_dict()
    for r in d["P"]:
        r["significant"] = bool(r["z"] is not None and abs(r["z"]) > threshold)
    d.pop("format", None)
    d["horizon_to"] = horizon_to
    return d


# ---- the schedule gradient over a window -----------------------------------------------------------
def _train_loss_fn(loss_weighting: str, names: Sequence[str]) -> Any:
    """The loss of one replayed training step, as :func:`commute.train.train_step` descends it: the mean
    over its micro-batches of the batch mean (or, for ``loss_weighting="domain"``, the domain-weighted)
    per-sequence loss. A step's item is ``{"micro": [Batch, ...], "w": weights}``."""
    from commute.model import sequence_losses
    from commute.train import _micro_batch_loss

    def loss(model: torch.nn.Module, item: dict[str, Any]) -> torch.Tensor:
        total = None
        for mb in item["micro"]:
            seq = sequence_losses(model, mb.input_ids)
            one = (_micro_batch_loss(seq, mb.domain, item["w"], names) if loss_weighting == "domain"
                   else seq.mean())
            total = one if total is None else total + one
        assert total is not None
        return total / len(item["micro"])

    return loss


def _skip_reason(state_a: dict[str, Any], state_b: dict[str, Any]) -> str | None:
    from commute.schedule import Schedule

    cfg = state_b["config"]
    if state_a.get("config_hash") != state_b.get("config_hash"):
        return "the run's training settings changed between the two checkpoints"
    if not state_a.get("sampler"):
        return "the run was trained on a batch source, not commute's sampler, so its batches cannot be " \
               "replayed"
    if float(cfg.get("grad_clip") or 0.0) > 0:
        return "the run clips gradients, which the replay does not reproduce"
    try:
        Schedule.from_dict(state_b.get("schedule") or {})
    except CommuteError:
        return "the run's schedule cannot be rebuilt from its checkpoint (a callable schedule)"
    return None


def _response_window(ck_a: Path, ck_b: Path, domains: dict[str, Any], *, groups: int, batch_size: int,
                     target_batches: int | None, seed: int, device: torch.device, progress: bool,
                     world: World = SINGLE, adjoint: str = "fresh", noise: str | None = None
                     ) -> tuple[Any, dict[str, Any]]:
    """:class:`commute.response.ResponseEstimator` over [step_a, step_b), replayed from ``ck_a`` on the run's
    own batches; also replays the window once more to measure how well it reproduces ``ck_b`` (several
    processes: the groups are split over the ranks; every rank replays). Targets: the run's validation
    batches (``eval_batches`` of ``batch_size``, the set its evaluation uses), or with ``target_batches``
    that many fresh training-split draws per group.

    With ``adjoint="train"`` or ``noise="rows"`` the estimator differentiates each domain's rows of a step
    (:meth:`commute.data.Batch.by_domain`): a step's micro-batches are replayed as one batch of their rows,
    which is the step the run took when its loss is the batch mean (``loss_weighting: sample``) and every
    micro-batch has ``batch_size`` rows."""
    from commute.data import Batch, MixtureSampler
    from commute.model import lm_loss
    from commute.response_estimator import ResponseEstimator
    from commute.train import load_checkpoint, lr_at, param_group_names

    ck = load_checkpoint(ck_a, device=device, with_optimizer=True)
    end = load_checkpoint(ck_b, device=device)
    cfg, names = end.config, tuple(ck.state.get("domain_names") or ck.config.domains)
    sched = end.schedule
    s, e = ck.step, end.step
    saved = ck.state["sampler"]

    rows = adjoint == "train" or noise == "rows"  # audit_run checked loss_weighting: sample

    def batches() -> Any:
        sampler = MixtureSampler({n: domains[n] for n in names}, cfg.batch_size, cfg.seq_len,
                                 int(saved["seed"]), cfg.sampler_mode)
        sampler.load_state_dict(saved)
        if rows:  # one batch of the step's rows: the mean over equal micro-batches' means is their mean
            return lambda t: Batch.concat([sampler.next_batch(sched(t)) for _ in range(cfg.grad_accum)])
        return lambda t: {"micro": [sampler.next_batch(sched(t)) for _ in range(cfg.grad_accum)],
                          "w": sched(t)}

    streams = {n: domains[n].batches(batch_size, cfg.seq_len, seed=seed + 2) for n in names}
    assert ck.model is not None and end.model is not None
    est = ResponseEstimator(ck.model, lm_loss, streams, lr=lambda t: lr_at(cfg, t),
                            state=ck.optimizer_state, state_names=param_group_names(ck.model),
                            train_loss_fn=None if rows else _train_loss_fn(cfg.loss_weighting, names))
    t0 = time.perf_counter()
    rp = est.replay(batches(), e - s, start=s, progress=progress and world.main)
    replay = {"rel_error": rp.rel_error(end.model), "seconds": time.perf_counter() - t0,
              "of": f"|theta_replayed - theta(step {e})| / |theta(step {e})| over the trained parameters"}
    held = None if target_batches is not None else _run_val_batches(cfg, domains, names)
    rep = est.estimate(batches(), sched, targets=list(names), steps=e - s, start=s, n_groups=groups,
                       batches_per_step=1, target_batches=target_batches, target_data=held,
                       progress=progress, distributed=world.enabled,
                       **({"noise": noise} if noise else {}),
                       **({"adjoint": adjoint, "train_rows": lambda b: b.by_domain(names)} if rows else {}))
    return rep, replay


def _bins(n: int, bins: int) -> list[int]:
    """Window-relative bin edges: at most ``bins`` blocks of (nearly) equal length covering [0, n)."""
    return sorted({int(round(x)) for x in np.linspace(0, n, min(bins, n) + 1)})


def _window_dict(rep: Any, replay: dict[str, Any], end: int, mix_name: str, mix: dict[str, float],
                 threshold: float, bins: int) -> dict[str, Any]:
    """The JSON of one window: per target (each domain, the mix at the window's end) G_k(t) and its stderr
    per step, in bins, and the window sums (with a noise channel also their noise part, ``noise_sums``);
    the best weight shift of each target."""
    names, n, s = rep.domains, rep.n_steps, rep.start
    targets = {**{d: {d: 1.0} for d in names}, mix_name: mix}
    edges = _bins(n, bins)
    wts = np.array([[float(w.get(d, 0.0)) for d in names] for w in rep.weights])  # [n, K]
    G, SE, BG, BSE, BZ, sums, shifts = {}, {}, {}, {}, {}, {}, {}
    noise_sums: dict[str, Any] | None = None if rep.gn_groups is None else {}
    for t, tw in targets.items():
        smp = rep.samples(tw)  # [groups, K, n]
        g, se = rep.G(tw), rep.stderr(tw)
        G[t] = {d: g[d].tolist() for d in names}
        SE[t] = {d: se[d].tolist() for d in names}
        blocks = np.stack([smp[:, :, a:b].mean(axis=2) for a, b in zip(edges[:-1], edges[1:], strict=True)],
                          axis=2)  # [groups, K, bins]
        bm = blocks.mean(axis=0)
        bse = blocks.std(axis=0, ddof=1) / math.sqrt(blocks.shape[0])
        BG[t] = {d: bm[k].tolist() for k, d in enumerate(names)}
        BSE[t] = {d: bse[k].tolist() for k, d in enumerate(names)}
        with np.errstate(divide="ignore", invalid="ignore"):
            BZ[t] = {d: (bm[k] / bse[k]).tolist() for k, d in enumerate(names)}
        tot = smp.sum(axis=2)  # [groups, K]: dL/d(w_k raised at every step)
        sums[t] = {d: _est(tot[:, k]) for k, d in enumerate(names)}
        if noise_sums is not None:
            nt = rep.samples(tw, part="noise").sum(axis=2)
            noise_sums[t] = {d: _est(nt[:, k]) for k, d in enumerate(names)}
        best = None  # moving weight from j to k at every step where j has weight (a feasible shift)
        for j, frm in enumerate(names):
            live = wts[:, j] > 0
            if not live.any():
                continue
            for k, to in enumerate(names):
                if k == j:
                    continue
                e = _est((smp[:, k, :] - smp[:, j, :])[:, live].sum(axis=1))
                if e["z"] is not None and (best is None or e["z"] < best["t"]):
                    best = {"to": to, "from": frm, "mean": e["mean"], "stderr": e["stderr"], "t": e["z"],
                            "n": e["n"], "steps": int(live.sum())}
        if best is not None:
            best["significant"] = abs(best["t"]) > threshold and best["mean"] < 0
        shifts[t] = best
    return {
        "start": s, "end": end, "n_steps": n, "skipped": None, "replay": replay,
        "targets": targets, "mix_name": mix_name,
        "weights": [{d: float(w.get(d, 0.0)) for d in names} for w in rep.weights], "lrs": list(rep.lrs),
        "G": G, "stderr": SE,
        "bins": {"edges": [s + x for x in edges], "G": BG, "stderr": BSE, "z": BZ,
                 "weights": {d: [float(np.mean([w.get(d, 0.0) for w in rep.weights[a:b]]))
                                 for a, b in zip(edges[:-1], edges[1:], strict=True)] for d in names}},
        "window_sums": sums, "noise_sums": noise_sums, "best_shift": shifts, "threshold": threshold,
        "dof": rep.n_groups - 1,
        "n_groups": rep.n_groups, "batch_size": rep.meta.get("batch_size"),
        "target_batches": rep.target_batches, "target_data": rep.meta.get("target_data"),
        "n_hvp": rep.n_hvp, "seconds": rep.seconds, "optimizer": rep.optimizer,
        "adjoint": rep.meta.get("adjoint", "fresh"), "noise": rep.meta.get("noise"),
    }


# ---- recommendations ---------------------------------------------------------------------------------
def _loc_text(value: float | None, horizon: int, to: str) -> str:
    v = math.nan if value is None else float(value)
    return f"γTλ_max = {v:.3g} (T = {horizon} steps {to}): {locality_note(v)}"


def _w_text(weights: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in weights.items())


def _rank(target: str, mix_names: set[str], t: float | None) -> tuple[bool, float]:
    """Sort key: the training mix (the run's own objective) first, then by |t|, strongest first."""
    return target not in mix_names, -abs(t or 0.0)


def recommendations(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Plain recommendations, each with its evidence, from an audit's data: Cor. 3.2b violations, weight
    shifts the schedule gradient supports, then pairwise orders of the P table not already said by a
    violation (for two domains P(L_1 − L_2, mix; L) = P(L_1, L_2; L)). Within each kind the training mix
    comes first, then by |t|. One "none" line when nothing is significant."""
    out: list[dict[str, Any]] = []
    p_by_step = {r["step"]: r for r in data["p_table"]}
    mixes = {r["mix"]["name"] for r in data["p_table"]}
    said = set()
    viol = [r for r in data["optimality"] if r["status"] == "violation"]
    for r in sorted(viol, key=lambda r: _rank(r["target"], mixes, r["t"])):
        p, b = p_by_step[r["step"]], r["better"]
        said.add((r["step"], r["target"], frozenset((r["i"], r["j"]))))
        tail = _loc_text(r["locality"], r["horizon"], p["horizon_to"])
        text = (f"At step {r['step']} (w_{r['i']} = {r['w_i']:.3g}, w_{r['j']} = {r['w_j']:.3g}), more "
                f"{b['more_now']} now and more {b['more_later']} later would lower L_{r['target']}: "
                f"P(L_{r['i']} − L_{r['j']}, {p['mix']['name']}; L_{r['target']}) = {r['mean']:+.2e} ± "
                f"{r['stderr']:.1e} "
                f"(t = {r['t']:+.1f}, |t| > t_0.975({r['dof']}) = {r['threshold']:.2f}; Cor. 3.2b: the mix "
                f"is not locally optimal here); {tail}.")
        out.append({"kind": "optimality", "step": r["step"], "target": r["target"], "pair": [r["i"], r["j"]],
                    "text": text,
                    "evidence": {"t": r["t"], "mean": r["mean"], "stderr": r["stderr"],
                                 "threshold": r["threshold"], "locality": r["locality"],
                                 "horizon": r["horizon"]}})
    resp = [(w, t, b) for w in data["response"]["windows"] if not w.get("skipped")
            for t, b in w["best_shift"].items() if b and b["significant"]]
    for w, t, b in sorted(resp, key=lambda x: _rank(x[1], {x[0]["mix_name"]}, x[2]["t"])):
        where = ("every step" if b["steps"] == w["n_steps"]
                 else f"each of the {b['steps']} steps where {b['from']} has weight")
        text = (f"Over steps [{w['start']}, {w['end']}), moving weight from {b['from']} to {b['to']} would "
                f"have lowered L_{t} at step {w['end']}: Σ_t (G_{b['to']} − G_{b['from']}) = "
                f"{b['mean']:+.2e} ± {b['stderr']:.1e} per unit of weight moved at {where} "
                f"(t = {b['t']:+.1f}, |t| > t_0.975({w['dof']}) = {w['threshold']:.2f}; the most "
                f"significant of the window's shifts); first order in the shift at any horizon (the replay "
                f"reproduces the run to {w['replay']['rel_error']:.1e}).")
        out.append({"kind": "response", "window": [w["start"], w["end"]], "target": t,
                    "pair": [b["from"], b["to"]], "text": text,
                    "evidence": {"t": b["t"], "mean": b["mean"], "stderr": b["stderr"],
                                 "threshold": w["threshold"], "replay_rel_error": w["replay"]["rel_error"]}})
    thr = data["threshold"]["t"]
    pairs = [(p, r) for p in data["p_table"] for r in p["P"]  # each unordered pair once: where P > 0
             if r["significant"] and r["mean"] > 0
             and (p["step"], r["target"], frozenset((r["i"], r["j"]))) not in said]
    for p, r in sorted(pairs, key=lambda x: _rank(x[1]["target"], mixes, x[1]["z"])):
        tail = _loc_text(p["locality"]["value"], p["locality"]["horizon"], p["horizon_to"])
        text = (f"At step {p['step']}, training {r['j']} before {r['i']} would lower L_{r['target']}: "
                f"P({r['i']}→{r['j']}; L_{r['target']}) = {r['mean']:+.2e} ± {r['stderr']:.1e} "
                f"(t = {r['z']:+.1f}, |t| > t_0.975({r['n'] - 1}) = {thr:.2f}); {tail}.")
        out.append({"kind": "order", "step": p["step"], "target": r["target"], "pair": [r["j"], r["i"]],
                    "text": text,
                    "evidence": {"t": r["z"], "mean": r["mean"], "stderr": r["stderr"], "threshold": thr,
                                 "locality": p["locality"]["value"], "horizon": p["locality"]["horizon"]}})
    if not out:
        out.append({"kind": "none", "evidence": {}, "text": (
            "Nothing is significant at the 95 % level: no Cor. 3.2b violation, no pairwise order and no "
            "weight shift of the schedule gradient stands out of the noise; more batches (--grad-batches, "
            "--hvp-batches) or groups would sharpen the estimates.")})
    return out


# ---- the audit ---------------------------------------------------------------------------------------
def audit_run(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    checkpoints: str | Sequence[int] = "all",
    grad_batches: int = 40,
    hvp_batches: int = 20,
    groups: int = 5,
    batch_size: int | None = None,
    lambda_batch_size: int | None = None,
    lambda_iters: int = 20,
    response: bool = True,
    response_windows: int | str = 2,
    response_groups: int = 2,
    response_batch_size: int | None = None,
    response_target_batches: int | None = None,
    response_adjoint: str | None = None,
    response_noise: str | None = None,
    response_bins: int = 20,
    bracket_train_target: bool = False,
    device: str = "cpu",
    seed: int = 0,
    figures: bool = True,
    progress: bool = False,
    distributed: bool = False,
) -> AuditResult:
    """Audit a run over its checkpoints: the P table along training with locality, Cor. 3.2b violations
    of the training mix, the schedule gradient over the last windows, and recommendations with evidence.

    Written into ``out_dir`` (default ``RUN/audit``): ``audit.json`` (:meth:`AuditResult.to_dict`),
    ``report.md`` and the figures ``p_along_training.png``, ``optimality.png``, ``response.png``. Every
    estimate is cached under ``out_dir/cache`` by checkpoint (its checksums) and settings, so a re-run,
    or one with other checkpoints, estimates only what is new.

    1. **P table** at every selected checkpoint: :func:`bracket_at` with these settings and ``seed`` (the
       same batch streams at every checkpoint), horizon T = the steps to the next selected checkpoint (the
       last one: the previous window's length), so γ·T·λ_max is the locality of the window ahead; the
       targets on the run's validation batches (as the response below), or with ``bracket_train_target``
       on fresh training-split draws.
    2. **Cor. 3.2b** (docs/design.md §1): per checkpoint, pair i < j and target, P(X, Y; L) with
       X = L_i − L_j and Y the training mix at the step, from the P table's groups by bilinearity
       (Σ_k w_k [P(i, k; L) − P(j, k; L)] per group); a *violation* where w_i, w_j > 0 and |t| exceeds
       the two-sided 95 % Student-t quantile with ``groups`` − 1 dof; *exempt* where w_i or w_j is 0.
    3. **Schedule gradient** (``response=True``) over the last ``response_windows`` windows between
       consecutive selected checkpoints (``"all"``: every window): :class:`commute.response.ResponseEstimator`
       replays the window from its first checkpoint on the run's own batches (the sampler restored from
       the checkpoint, the run's schedule, learning rates and optimiser state), with ``response_groups``
       groups of fresh batches of ``response_batch_size`` sequences per domain and step (default: the run's
       batch size / K); targets: each domain and the training mix at the window's end, measured on the
       run's validation batches (``eval_batches`` of ``batch_size``, at least 1: the set ``train`` evaluates
       on unless it was given its own ``val_batches``; a held-out loss
       responds to the schedule differently from the training loss, docs/design.md §1b), or, with
       ``response_target_batches`` = n, on n fresh training-split batches per domain and group. The
       replay is checked against the window's last checkpoint. ``response_adjoint="train"`` pulls the
       adjoint back through the training rows' own Hessians (the mean-field derivative of the realised
       map, ``ResponseEstimator.estimate(adjoint="train")``); ``response_noise="rows"`` adds the rows
       channel's noise term (and implies ``"train"``; it needs ``sampler_mode: exact``). Both need a run
       with ``loss_weighting: sample``.
    4. **Recommendations** (:func:`recommendations`).

    ``distributed=True`` under torchrun (every rank calls this with the same arguments): both estimators
    split their groups over the ranks, every rank reads the checkpoints, domains and cache and returns the
    one-process result (its own ``seconds``); rank 0 alone logs, shows progress and writes the cache,
    ``audit.json``, ``report.md`` and the figures, and a failure there is raised on every rank.

    ``audit.json`` (format ``commute.audit/1``): ``run``, ``domains``, ``optimizer``, ``checkpoints``
    (steps), ``threshold`` {dof, t}; ``p_table``: one entry per checkpoint with ``step``, ``mix`` {name,
    weights, from}, ``targets``, ``lambda_max``, ``lambda_of``, ``locality`` {horizon, gamma, value, note},
    ``horizon_to``, ``P`` [{i, j, target, mean, stderr, z, n, significant}] for every ordered pair,
    ``ranking``, ``scores``, ``estimator``; ``optimality``: one row per checkpoint, pair i < j and target
    with ``w_i``, ``w_j``, ``mean``, ``stderr``, ``t``, ``dof``, ``threshold``, ``status`` (violation,
    consistent or exempt), ``groups`` (the per-group samples), ``better`` {more_now, more_later},
    ``excess_per_delta``, ``locality``; ``response`` {enabled, windows, windows_available, threshold}, each
    window with ``start``, ``end``, ``skipped`` (a reason or None), ``replay`` {rel_error}, ``targets``,
    ``weights`` and ``lrs`` per step, ``G`` and ``stderr`` {target: {domain: per step}}, ``bins`` {edges, G,
    stderr, z, weights}, ``window_sums``, ``noise_sums`` (with ``response_noise="rows"``: the window sums'
    noise part, same layout; else null), ``best_shift`` {target: {from, to, mean, stderr, t, steps,
    significant}}, ``adjoint`` (fresh or train), ``noise`` (rows or null); ``recommendations`` [{kind
    (optimality, response, order or none), text, evidence, ...}];
    ``settings``, ``meaning``, ``seconds``, ``files``. Non-finite numbers are written as null.

    Raises :class:`CommuteError` (one sentence) for a missing run, unknown checkpoint steps, bad settings.
    """
    from commute.checkpoint import read_state
    from commute.response_estimator import resolve_adjoint
    from commute.scores import t_threshold
    from commute.train import resolve_device

    t_begin = time.perf_counter()
    world = _join(distributed, device)
    dev = device_for(world, resolve_device(device))
    run = Path(run_dir)
    for name, v, lo in (("grad_batches", grad_batches, 1), ("hvp_batches", hvp_batches, 1),
                        ("groups", groups, 2), ("response_groups", response_groups, 2),
                        ("response_bins", response_bins, 1), ("lambda_iters", lambda_iters, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise CommuteError(f"{name} must be a whole number >= {lo}, got {v!r}.")
    if response_target_batches is not None and (isinstance(response_target_batches, bool) or not isinstance(
            response_target_batches, int) or response_target_batches < 1):
        raise CommuteError("response_target_batches must be a whole number >= 1 (or None: the run's "
                           f"validation batches), got {response_target_batches!r}.")
    if response_noise not in (None, "rows"):
        raise CommuteError(f"response_noise must be 'rows' or None (no noise channel), got "
                           f"{response_noise!r}.")
    adjoint = resolve_adjoint(response_noise, response_adjoint, noise_name="response_noise",
                              adjoint_name="response_adjoint")
    if grad_batches < 2 * groups or hvp_batches < groups:
        raise CommuteError(f"with {groups} groups, need grad_batches >= {2 * groups} and hvp_batches >= "
                           f"{groups} (got {grad_batches} and {hvp_batches}); lower groups or add batches.")
    for name, v in (("batch_size", batch_size), ("response_batch_size", response_batch_size),
                    ("lambda_batch_size", lambda_batch_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise CommuteError(f"{name} must be a whole number >= 1, got {v!r}.")
    if not (response_windows == "all" or (isinstance(response_windows, int) and response_windows >= 0
                                          and not isinstance(response_windows, bool))):
        raise CommuteError(f"response_windows must be a whole number >= 0 or 'all', got "
                           f"{response_windows!r}.")
    paths = _select_checkpoints(run, checkpoints)
    out = Path(out_dir) if out_dir is not None else run / "audit"
    cache = out / "cache"
    states = [read_state(p, verify=False) for p in paths]
    steps = [int(s["step"]) for s in states]
    names = tuple(states[-1].get("domain_names") or states[-1]["config"]["domains"])
    if len(names) < 2:
        raise CommuteError(f"the run at {str(run)!r} has {len(names)} domain(s); the audit needs two.")
    dof = groups - 1
    thr = t_threshold(dof)

    # windows whose schedule gradient is estimated
    all_windows = list(zip(range(len(paths) - 1), range(1, len(paths)), strict=True))
    if not response:
        chosen: list[tuple[int, int]] = []
    elif response_windows == "all":
        chosen = all_windows
    else:
        chosen = all_windows[len(all_windows) - int(response_windows):] if int(response_windows) else []
    n_work = len(paths) + len(chosen)
    done = 0

    def stage(text: str) -> None:
        nonlocal done
        done += 1
        if world.main:
            logger.info(f"audit [{done}/{n_work}] {text}")

    # the cache files of every estimate; the checkpoints still to be read are verified before any work
    btarget = "train" if bracket_train_target else "val"  # what the P table's targets are measured on
    bsettings = {"grad_batches": grad_batches, "hvp_batches": hvp_batches, "groups": groups,
                 "batch_size": batch_size, "lambda_batch_size": lambda_batch_size,
                 "lambda_iters": lambda_iters, "seed": seed, "dtype_device": dev.type,
                 "target": btarget}
    bkeys = [_hash({"kind": "bracket", "files": st.get("files"), "step": step, **bsettings})
             for step, st in zip(steps, states, strict=True)]
    bpaths = [cache / f"bracket_{step:08d}_{key}.json" for step, key in zip(steps, bkeys, strict=True)]
    plan: list[tuple[int, int, str | None, Path | None, int]] = []  # (a, b, skip reason, cache file, batch)
    for a, b in chosen:
        weighting = states[b]["config"].get("loss_weighting", "sample")
        if adjoint == "train" and weighting != "sample":
            what = "rows noise channel" if response_noise else "adjoint: train"
            raise CommuteError(f"the response's {what} differentiates each domain's rows of a step, which "
                               "is the run's step only when its loss is the batch mean (loss_weighting: "
                               f"sample); this run has {weighting!r}.")
        if response_noise == "rows" and states[b]["config"].get("sampler_mode", "sample") != "exact":
            raise CommuteError("the response's rows noise channel assumes fixed rows per domain in each "
                               "batch (sampler_mode: exact); this run draws each row's domain (sampler_mode: "
                               "sample): use --response-adjoint train without the noise channel.")
        reason = _skip_reason(states[a], states[b])
        rbs = int(response_batch_size or max(1, int(states[b]["config"]["batch_size"]) // len(names)))
        rsettings = {"groups": response_groups, "batch_size": rbs, "seed": seed, "dtype_device": dev.type,
                     "target": "val" if response_target_batches is None else response_target_batches,
                     **({"adjoint": adjoint} if adjoint != "fresh" else {}),
                     **({"noise": response_noise} if response_noise else {})}  # the defaults: keys as before
        key = _hash({"kind": "response", "files": [states[a].get("files"), states[b].get("files")],
                     **rsettings})
        cpath = cache / f"response_{steps[a]:08d}_{steps[b]:08d}_{key}.json"
        plan.append((a, b, reason, None if reason else cpath, rbs))
    todo = {n for n, bp in enumerate(bpaths) if not bp.is_file()}
    todo |= {x for a, b, _, cp, _ in plan if cp is not None and not cp.is_file() for x in (a, b)}
    for n in sorted(todo):
        read_state(paths[n], verify=True)  # a corrupt checkpoint: one sentence now, not after an hour

    # 1. the P table (cached per checkpoint and settings)
    brackets: dict[int, BracketAudit] = {}
    p_table, optimality = [], []
    for n, (p, bpath) in enumerate(zip(paths, bpaths, strict=True)):
        step = steps[n]
        if n + 1 < len(paths):
            horizon, to = steps[n + 1] - step, f"to step {steps[n + 1]}"
        elif n > 0:
            horizon, to = step - steps[n - 1], "= the previous window's length"
        else:
            horizon, to = 100, "= a default, one checkpoint selected"
        horizon = max(1, horizon)
        cached = _read_cache(bpath)
        if not world.any(cached is None):  # several processes: estimated by all or by none
            assert cached is not None
            stage(f"P table at step {step}: cached")
            audit = _bracket_audit_from_cache(cached)
            audit.horizon = horizon
        else:
            stage(f"P table at step {step} ({len(names)} domains, {groups} groups)")
            audit = bracket_at(p, grad_batches=grad_batches, hvp_batches=hvp_batches, groups=groups,
                               batch_size=batch_size, horizon=horizon, device=device, seed=seed,
                               lambda_batch_size=lambda_batch_size, lambda_iters=lambda_iters,
                               train_target=bracket_train_target, progress=progress,
                               distributed=world.enabled)
            on_main(world, "audit", partial(write_json, bpath, _clean({"audit": audit.to_dict(),
                                                                       "report": audit.report.to_dict()})))
        brackets[step] = audit
        p_table.append(_p_row(audit, thr, to))
        optimality += _optimality_rows(audit, thr, dof)

    # 3. the schedule gradient over the chosen windows (cached per window and settings)
    from commute.response_estimator import ResponseReport

    windows: list[dict[str, Any]] = []
    responses: dict[tuple[int, int], Any] = {}
    domains: dict[str, Any] | None = None
    for a, b, reason, cpath, rbs in plan:
        s, e = steps[a], steps[b]
        if reason is not None or cpath is None:
            stage(f"schedule gradient over [{s}, {e}): skipped, {reason}")
            windows.append({"start": s, "end": e, "skipped": reason})
            continue
        cached = _read_cache(cpath)
        if not world.any(cached is None):
            assert cached is not None
            stage(f"schedule gradient over [{s}, {e}): cached")
            rep, replay = ResponseReport.from_dict(cached["report"]), cached["replay"]
        else:
            stage(f"schedule gradient over [{s}, {e}) ({e - s} steps, {response_groups} groups)")
            if domains is None:
                from commute.data import load_domains

                cfg = states[b]["config"]
                domains = load_domains({k: cfg["domains"][k] for k in names}, tokenizer=cfg["tokenizer"],
                                       cache_dir=cfg.get("cache_dir"), val_fraction=cfg["val_fraction"])
            rep, replay = _response_window(paths[a], paths[b], domains, groups=response_groups,
                                           batch_size=rbs, target_batches=response_target_batches, seed=seed,
                                           adjoint=adjoint, noise=response_noise,
                                           device=dev, progress=progress, world=world)
            rep.meta["batch_size"] = rbs
            on_main(world, "audit", partial(write_json, cpath, _clean({"report": rep.to_dict(),
                                                                       "replay": replay})))
        responses[(s, e)] = rep
        mix_e = brackets[e].targets[brackets[e].mix_name]
        windows.append(_window_dict(rep, replay, e, brackets[e].mix_name, dict(mix_e),
                                    t_threshold(response_groups - 1), response_bins))

    st = states[-1]
    data: dict[str, Any] = {
        "format": AUDIT_FORMAT,
        "run": str(run),
        "out_dir": str(out),
        "domains": list(names),
        "optimizer": st["config"]["optimizer"],
        "checkpoints": steps,
        "threshold": {"dof": dof, "t": thr, "rule": "two-sided 95 % Student-t quantile, G - 1 dof"},
        "p_table": p_table,
        "optimality": optimality,
        "response": {"enabled": bool(response), "windows": windows,
                     "windows_available": [[steps[a], steps[b]] for a, b in all_windows],
                     "threshold": {"dof": response_groups - 1, "t": t_threshold(response_groups - 1)}},
        "settings": {"grad_batches": grad_batches, "hvp_batches": hvp_batches, "groups": groups,
                     "batch_size": batch_size, "lambda_batch_size": lambda_batch_size,
                     "lambda_iters": lambda_iters, "response": bool(response),
                     "response_windows": response_windows, "response_groups": response_groups,
                     "response_batch_size": response_batch_size,
                     "response_target_batches": response_target_batches, "response_bins": response_bins,
                     "response_adjoint": adjoint, "response_noise": response_noise,
                     "bracket_target": btarget,
                     "device": str(dev), "seed": seed},
        "meaning": MEANINGS,
    }
    data["recommendations"] = recommendations(data)
    data["seconds"] = time.perf_counter() - t_begin
    data["estimate_seconds"] = (sum(a.seconds for a in brackets.values())
                                + sum(w.get("seconds", 0.0) + w.get("replay", {}).get("seconds", 0.0)
                                      for w in windows if not w.get("skipped")))
    data = _clean(data)

    def write() -> tuple[Path, list[Path]]:
        report_path, figs = render_audit(data, out, figures=figures)
        data["files"] = {"json": "audit.json", "report": report_path.name, "figures": [f.name for f in figs]}
        write_json(out / "audit.json", data)
        return report_path, figs

    written = on_main(world, "audit", write)
    if written is None:  # another rank: the files rank 0 has written
        figs = [out / name for name, _ in _figure_plots(data, figures)]
        report_path = out / "report.md"
        data["files"] = {"json": "audit.json", "report": report_path.name, "figures": [f.name for f in figs]}
    else:
        report_path, figs = written
    return AuditResult(run=run, out_dir=out, data=data, brackets=brackets, responses=responses,
                       report_path=report_path, figures=figs, seconds=time.perf_counter() - t_begin)


# ---- rendering: terminal tables, report.md, figures (pure functions of the audit's data) --------------
def _pm(e: dict[str, Any] | None, bold_if: float | None = None) -> str:
    """``mean ± se (t)`` of an estimate dict; bold (markdown) where |t| > ``bold_if``."""
    if not e or e.get("mean") is None:
        return "–"
    z = e.get("z", e.get("t"))
    txt = f"{e['mean']:+.2e} ± {(e.get('stderr') or math.nan):.1e}"
    txt += f" ({z:+.1f})" if z is not None else ""
    return f"**{txt}**" if bold_if is not None and z is not None and abs(z) > bold_if else txt


def _pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    return [(i, j) for a, i in enumerate(names) for j in names[a + 1:]]


def audit_tables(data: dict[str, Any], max_recommendations: int = 8) -> list[Any]:
    """Rich renderables: one row per checkpoint (mix, λ_max, locality, significant P, Cor. 3.2b), one per
    schedule-gradient window, and the first ``max_recommendations`` recommendations."""
    from rich.table import Table

    thr = data["threshold"]["t"]
    ck = Table(title=f"Audit of {data['run']}: P along training and Cor. 3.2b",
               caption=f"significant: |t| > t_0.975({data['threshold']['dof']}) = {thr:.2f}. P counts the "
                       "K(K−1)/2 pairs × targets; Cor. 3.2b counts pairs with both weights > 0 (exempt: one "
                       "weight 0).",
               caption_justify="left")
    for col in ("step", "training mix", "λ_max", "T", "γTλ_max", "P significant", "Cor. 3.2b violations"):
        ck.add_column(col, justify="left" if col == "training mix" else "right")
    for p in data["p_table"]:
        rows = [r for r in p["P"] if (r["i"], r["j"]) in set(_pairs(data["domains"]))]
        opt = [r for r in data["optimality"] if r["step"] == p["step"]]
        tested = [r for r in opt if r["status"] != "exempt"]
        viol = sum(r["status"] == "violation" for r in opt)
        ck.add_row(str(p["step"]), _w_text(p["mix"]["weights"]), f"{p['lambda_max']:.3g}",
                   str(p["locality"]["horizon"]), f"{p['locality']['value']:.3g}",
                   f"{sum(r['significant'] for r in rows)}/{len(rows)}",
                   f"{viol}/{len(tested)}" + (f" ({len(opt) - len(tested)} exempt)" if len(opt) > len(tested)
                                               else ""))
    out: list[Any] = [ck]
    wins = data["response"]["windows"]
    if wins:
        wt = Table(title="Schedule gradient over windows: the best weight shift per target",
                   caption="Σ_t (G_to − G_from): first-order change of L at the window's end per unit of "
                           f"weight moved at every step where 'from' has weight (< 0 helps; the most "
                           f"significant of the K(K−1) shifts); significant: |t| > "
                           f"t_0.975({data['response']['threshold']['dof']}) = "
                           f"{data['response']['threshold']['t']:.2f}.",
                   caption_justify="left")
        for col in ("window", "replay error", "target", "from → to", "Σ_t (G_to − G_from)", "t"):
            wt.add_column(col, justify="left" if col in ("target", "from → to") else "right")
        for w in wins:
            if w.get("skipped"):
                wt.add_row(f"[{w['start']}, {w['end']})", "–", "skipped", w["skipped"], "", "",
                           end_section=True)
                continue
            for n, (t, b) in enumerate(w["best_shift"].items()):
                first = n == 0
                cells = ("–", "–", "–") if not b else (
                    f"{b['from']} → {b['to']}", f"{b['mean']:+.2e} ± {b['stderr']:.1e}",
                    f"[bold]{b['t']:+.1f}[/]" if b["significant"] else f"{b['t']:+.1f}")
                wt.add_row(f"[{w['start']}, {w['end']})" if first else "",
                           f"{w['replay']['rel_error']:.1e}" if first else "", t, *cells,
                           end_section=n == len(w["best_shift"]) - 1)
        out.append(wt)
    recs = data["recommendations"]
    rt = Table(title=f"Recommendations ({len(recs)}; the first {min(len(recs), max_recommendations)} shown)",
               show_header=False, caption="All of them, with the tables and figures, in report.md.",
               caption_justify="left")
    rt.add_column("#", justify="right")
    rt.add_column("recommendation")
    for n, r in enumerate(recs[:max_recommendations], 1):
        rt.add_row(str(n), r["text"])
    out.append(rt)
    return out


def _adjoint_words(w: dict[str, Any]) -> str:
    """The report's clause on how a window's adjoint was pulled back (nothing for the default)."""
    if w.get("noise") == "rows":
        return (" The adjoint goes through the training rows' own Hessians and G has the rows channel's "
                "noise term (`--response-noise rows`).")
    if w.get("adjoint") == "train":
        return " The adjoint goes through the training rows' own Hessians (`--response-adjoint train`)."
    return ""


def _rec_md(recs: list[dict[str, Any]], kind: str, title: str, limit: int = 12) -> list[str]:
    sel = [r for r in recs if r["kind"] == kind]
    if not sel:
        return []
    lines = [f"**{title}** ({len(sel)})", ""]
    lines += [f"{n}. {r['text']}" for n, r in enumerate(sel[:limit], 1)]
    if len(sel) > limit:
        lines.append(f"\n… and {len(sel) - limit} more (weaker) in `audit.json` → `recommendations`.")
    return lines + [""]


def _figure_plots(data: dict[str, Any], figures: bool) -> list[tuple[str, Any]]:
    """The figures :func:`render_audit` draws: (file name, plot function)."""
    if not figures:
        return []
    plots: list[tuple[str, Any]] = [("p_along_training.png", plot_p_along),
                                    ("optimality.png", plot_optimality)]
    if any(not w.get("skipped") for w in data["response"]["windows"]):
        plots.append(("response.png", plot_response))
    return plots


def render_audit(data: dict[str, Any], out_dir: str | os.PathLike[str],
                 figures: bool = True) -> tuple[Path, list[Path]]:
    """Write ``report.md`` (and with ``figures`` the PNGs) from an audit's data; returns (report, figures)."""
    from commute.report import _table

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names, thr, dof = data["domains"], data["threshold"]["t"], data["threshold"]["dof"]
    figs = [plot(data, out / name) for name, plot in _figure_plots(data, figures)]
    s = data["settings"]
    recs = data["recommendations"]
    md = [f"# Audit of `{data['run']}`", "",
          f"{len(names)} domains ({', '.join(names)}), {data['optimizer']}, checkpoints at steps "
          f"{', '.join(map(str, data['checkpoints']))}. Bracket: {s['grad_batches']} gradient + "
          f"{s['hvp_batches']} HVP batches per domain in {s['groups']} groups (seed {s['seed']}, the same "
          f"streams at every checkpoint); significant means |t| > t_0.975({dof}) = {thr:.2f}. The estimates "
          f"took {data.get('estimate_seconds', 0):.0f} s; this `commute audit` call "
          f"{data.get('seconds', 0):.0f} s (estimates are cached per checkpoint and window, and reused).", "",
          "## Recommendations", ""]
    if recs and recs[0]["kind"] == "none":
        md += [recs[0]["text"], ""]
    md += _rec_md(recs, "optimality", "The training mix is not locally optimal (Cor. 3.2b)")
    md += _rec_md(recs, "response", "Weight shifts the schedule gradient supports")
    md += _rec_md(recs, "order", "Pairwise orders (P table)")
    md += ["How far to trust them: P and Cor. 3.2b are second-order expansions around the checkpoint, "
           "exact only as γ·T·λ_max → 0 (≲ 0.01: magnitudes within a few %; ≲ 0.1: ~20 %; beyond: at most "
           "the sign, and at training-scale horizons the study found even signs unreliable). The schedule "
           "gradient is exact to first order in the weight change at any horizon, for the replayed "
           "trajectory, but with few groups its stderr is rough.", ""]

    bt = data.get("settings", {}).get("bracket_target")
    on = f", measured on {_TARGET_WORDS[bt]}" if bt in _TARGET_WORDS else ""  # older audits: not recorded
    md += ["## 1. P along training (the paper's Table 4, generalised)", "",
           "P(i→j; L) = P(L_i, L_j; L) ± stderr (t) at each checkpoint, for each target L: each domain and "
           f"the training mix at that step{on}. **P > 0: training i then j raises L** compared with mixing "
           "them, so j before i lowers it; P(j→i) = −P(i→j). Bold: significant.", ""]
    pairs = _pairs(names)
    for t in [*names, None]:  # None: the training mix at each step
        rows = []
        for p in data["p_table"]:
            tname = p["mix"]["name"] if t is None else t
            P = {(r["i"], r["j"]): r for r in p["P"] if r["target"] == tname}
            rows.append([str(p["step"])] + [_pm(P.get(pr), thr) for pr in pairs])
        label = "the training mix at each step" if t is None else f"L_{t}"
        md += [f"Target {label}:", "", _table(["step", *[f"P({i}→{j})" for i, j in pairs]], rows), ""]
    loc_rows = [[str(p["step"]), _w_text(p["mix"]["weights"]), f"{p['locality']['gamma']:.3g}",
                 f"{p['lambda_max']:.3g} ({p['lambda_of']})",
                 f"{p['locality']['horizon']} ({p['horizon_to']})",
                 f"{p['locality']['value']:.3g}", p["locality"]["note"],
                 "; ".join(f"{t}: {' → '.join(o)}" for t, o in p["ranking"].items())]
                for p in data["p_table"]]
    md += ["Locality of each checkpoint's window and the order tournament (suggested order first to last, "
           "ascending S_i = Σ_j P(i→j; L)):", "",
           _table(["step", "training mix", "γ (lr)", "λ_max (of)", "T (steps)", "γTλ_max", "trust",
                   "order tournament"], loc_rows), ""]
    if figures:
        md += ["![P along training](p_along_training.png)", "",
               "*One panel per target; one colour per pair; P ± stderr on a symmetric-log axis; filled "
               "markers are significant.*", ""]

    md += ["## 2. Is the training mix locally optimal? (Cor. 3.2b)", "",
           "At a locally optimal schedule, wherever P(L_i − L_j, Σ_k w_k L_k; L) ≠ 0 one of w_i, w_j is 0 "
           "(docs/design.md §1). Shifting +δ to w_i and −δ to w_j for ε = γT steps, then the opposite for ε, "
           "changes L by δ·ε²·P(X, Y; L); the column ΔL/δ is that with T = half the window ahead. The "
           "estimate is the P table's per-group samples combined by bilinearity, Σ_k w_k [P(i, k; L) − P(j, "
           "k; L)]. "
           f"**Violation**: both weights > 0 and |t| > {thr:.2f}; **exempt**: one weight is 0.", ""]
    rows = []
    for r in data["optimality"]:
        better = (f"more {r['better']['more_now']} now, more {r['better']['more_later']} later"
                  if r["status"] == "violation" else "")
        rows.append([str(r["step"]), f"{r['i']}, {r['j']}", r["target"], f"{r['w_i']:.3g}, {r['w_j']:.3g}",
                     _pm({"mean": r["mean"], "stderr": r["stderr"], "t": r["t"]}, thr),
                     _pm(r["excess_per_delta"]), f"{r['locality']:.3g}",
                     f"**{r['status']}**" if r["status"] == "violation" else r["status"], better])
    md += [_table(["step", "i, j", "L", "w_i, w_j", "P(L_i − L_j, mix; L) (t)", "ΔL/δ = (γT)²P", "γTλ_max",
                   "status", "lowers L"], rows), ""]
    if figures:
        md += ["![Cor. 3.2b](optimality.png)", "",
               "*One panel per target: t = P(X, Y; L)/stderr per checkpoint and pair; outside the shaded "
               "band is a violation when both weights are > 0 (filled); hollow markers are exempt (a weight "
               "is 0).*",
               ""]

    md += ["## 3. The schedule gradient over windows", ""]
    wins = data["response"]["windows"]
    if not data["response"]["enabled"]:
        md += ["Not estimated (`--no-response`).", ""]
    elif not wins:
        md += ["No window: the audit needs two selected checkpoints (and `response_windows` ≥ 1).", ""]
    else:
        rth = data["response"]["threshold"]
        md += ["G_k(t) = ∂L(θ_end)/∂w_k(t): the window is replayed from its first checkpoint on the run's "
               "own batches (its sampler, schedule, learning rates and optimiser state) and the derivative "
               "of the window's end loss with respect to each step's weights is estimated from fresh batches "
               "(`commute.response.ResponseEstimator`, unbiased given the trajectory). **G < 0: more weight "
               "on k at t would have lowered L.** The weights need not sum to 1 here; moving δ of weight "
               "from j to k at every step where j has weight changes L by δ·Σ_t (G_k − G_j) over those "
               "steps; the best shift is the most significant of the K(K−1) (a selection: read its t with "
               "that in mind). Significant: |t| > "
               f"t_0.975({rth['dof']}) = {rth['t']:.2f}. Windows available: "
               f"{', '.join(f'[{a}, {b})' for a, b in data['response']['windows_available'])}.", ""]
        for w in wins:
            if w.get("skipped"):
                md += [f"**[{w['start']}, {w['end']})**: skipped, {w['skipped']}.", ""]
                continue
            md += [f"**[{w['start']}, {w['end']})** ({w['n_steps']} steps, {w['optimizer']}, "
                   f"{w['n_groups']} groups, {w['batch_size']} sequences per domain per step, "
                   f"{w['seconds']:.0f} s): the replay reproduces the checkpoint at step {w['end']} to a "
                   f"relative error of {w['replay']['rel_error']:.1e}.{_adjoint_words(w)} "
                   f"Σ_t G_k(t) per target (rows) and domain (columns), then the best shift:", ""]
            rows = []
            for t in w["targets"]:
                b = w["best_shift"][t]
                est = {"mean": b["mean"], "stderr": b["stderr"], "t": b["t"]} if b else None
                best = "–" if not b else f"{b['from']} → {b['to']}: " + _pm(est, rth["t"])
                label = f"{t} ({_w_text(w['targets'][t])})" if t == w["mix_name"] else t
                rows.append([label] + [_pm(w["window_sums"][t][d], rth["t"]) for d in names] + [best])
            md += [_table(["L at the window's end", *[f"Σ_t G_{d}" for d in names], "best shift from → to"],
                          rows), ""]
            if w.get("noise") and not w.get("noise_sums"):
                md += ["(This window was estimated before the noise part was kept apart: delete its file in "
                       "`cache/` to see it.)", ""]
            if w.get("noise_sums"):
                md += ["Of which through the training gradient's noise (the rows channel's own term; the "
                       "rest acts through the gradient's mean):", "",
                       _table(["L at the window's end", *[f"Σ_t G_{d}, noise" for d in names]],
                              [[t] + [_pm(w["noise_sums"][t][d], rth["t"]) for d in names]
                               for t in w["targets"]]), ""]
        if figures and any(not w.get("skipped") for w in wins):
            md += ["![schedule gradient](response.png)", "",
                   "*One panel per target, training step × domain, G averaged over bins of steps; blue: more "
                   "of that domain then would have lowered the target at the window's end, red: raised it; "
                   "hatched: |G/stderr| below the window's 95 % t threshold (G − 1 dof); ×: the domain had "
                   "weight 0 there; vertical lines: checkpoints "
                   "(each window's target is L at its own end).*", ""]
    md += ["## Files", "",
           "`audit.json` (every number; per-group samples of the Cor. 3.2b statistic, per-step G and "
           "stderr), `cache/` (per checkpoint and window; delete to recompute), "
           + ", ".join(f"`{f.name}`" for f in figs) + ".", ""]
    path = atomic_write(out / "report.md", "\n".join(md))
    return path, figs


def _legend_room(n: int, ncol: int, height: float) -> float:
    """The fraction of a figure ``height`` inches tall that a bottom legend of ``n`` entries in ``ncol``
    columns needs (8-point rows of ~0.2 inch, plus a margin)."""
    return (0.12 + 0.2 * math.ceil(n / ncol)) / height


def _grid(n: int, ncols: int = 4) -> tuple[int, int]:
    c = min(n, ncols)
    return math.ceil(n / c), c


def _target_list(data: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(key, label) per target; None stands for each step's training mix."""
    return [(d, f"L = {d}") for d in data["domains"]] + [(None, "L = training mix at the step")]


def plot_p_along(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """P(i→j; L) ± stderr against the checkpoint step, one panel per target, one colour per pair i < j
    (symmetric-log y; filled markers significant)."""
    from matplotlib.lines import Line2D

    from commute.report import _plt, _save, _symlog

    plt = _plt()
    targets, pairs, thr = _target_list(data), _pairs(data["domains"]), data["threshold"]["t"]
    nr, nc = _grid(len(targets))
    fig, axes = plt.subplots(nr, nc, figsize=(4.2 * nc, 3.4 * nr + 0.7), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    steps = [p["step"] for p in data["p_table"]]
    for n, (t, label) in enumerate(targets):
        ax = axes[n // nc][n % nc]
        vals = []
        for c, (i, j) in enumerate(pairs):
            col = colors[c % len(colors)]
            pts = []
            for p in data["p_table"]:
                tname = p["mix"]["name"] if t is None else t
                r = next(r for r in p["P"] if r["i"] == i and r["j"] == j and r["target"] == tname)
                pts.append(r)
            ms, ss = [r["mean"] for r in pts], [r["stderr"] or 0.0 for r in pts]
            vals += [abs(m) + s for m, s in zip(ms, ss, strict=True)]
            ax.plot(steps, ms, "-", color=col, lw=0.8, alpha=0.7)
            ax.errorbar(steps, ms, yerr=ss, fmt="none", ecolor=col, elinewidth=0.8, capsize=2)
            for x, r in zip(steps, pts, strict=True):
                ax.plot([x], [r["mean"]], "o", ms=5, color=col, mfc=col if r["significant"] else "white")
        v = [x for x in vals if math.isfinite(x) and x > 0]
        lim = max(v) * 1.3 if v else 1.0
        _symlog(ax, "y", lim, max(min(v), lim * 1e-4) if v else 1e-3)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("checkpoint step", fontsize=8)
        ax.set_ylabel("P(i→j; L)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
    for n in range(len(targets), nr * nc):
        axes[n // nc][n % nc].axis("off")
    handles = [Line2D([], [], color=colors[c % len(colors)], marker="o", label=f"P({i}→{j}): > 0 means {j} "
                      f"before {i} lowers L") for c, (i, j) in enumerate(pairs)]
    handles += [Line2D([], [], color="0.3", marker="o", ls="", label=f"filled: |t| > {thr:.2f}"),
                Line2D([], [], color="0.3", marker="o", mfc="white", ls="", label="hollow: not significant")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 3), fontsize=8, frameon=False)
    return _save(plt, fig, path, rect=(0, _legend_room(len(handles), 3, 3.4 * nr + 0.7), 1, 1))


def plot_optimality(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """The Cor. 3.2b statistic t = P(X, Y; L)/stderr per checkpoint and pair, one panel per target; the band
    |t| < threshold is consistent with local optimality; hollow markers are exempt (a weight is 0)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from commute.report import _plt, _save, _symlog

    plt = _plt()
    targets, pairs, thr = _target_list(data), _pairs(data["domains"]), data["threshold"]["t"]
    nr, nc = _grid(len(targets))
    fig, axes = plt.subplots(nr, nc, figsize=(4.2 * nc, 3.4 * nr + 0.7), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    mix_names = {p["step"]: p["mix"]["name"] for p in data["p_table"]}
    steps = [p["step"] for p in data["p_table"]]
    span = max(steps) - min(steps) if len(steps) > 1 else 1
    for n, (t, label) in enumerate(targets):
        ax = axes[n // nc][n % nc]
        ts = []
        for c, (i, j) in enumerate(pairs):
            col = colors[c % len(colors)]
            dx = (c - (len(pairs) - 1) / 2) * 0.03 * span  # side by side, so equal values do not hide
            for r in data["optimality"]:
                if r["i"] != i or r["j"] != j or r["target"] != (mix_names[r["step"]] if t is None else t):
                    continue
                if r["t"] is None:
                    continue
                ts.append(abs(r["t"]))
                ax.plot([r["step"] + dx], [r["t"]], "o", ms=6, color=col,
                        mfc="white" if r["status"] == "exempt" else col)
        lim = max([*ts, thr]) * 1.4
        if lim > 40:  # large t: a symmetric-log axis, linear inside the significance band
            _symlog(ax, "y", lim, thr)
        else:
            ax.set_ylim(-lim, lim)
        ax.axhspan(-thr, thr, color="tab:green", alpha=0.12)
        for y in (-thr, thr):
            ax.axhline(y, color="tab:green", ls="--", lw=0.8)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(steps)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("checkpoint step", fontsize=8)
        ax.set_ylabel("t of P(L_i − L_j, mix; L)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, axis="x")
    for n in range(len(targets), nr * nc):
        axes[n // nc][n % nc].axis("off")
    handles = [Line2D([], [], color=colors[c % len(colors)], marker="o", ls="", label=f"pair ({i}, {j})")
               for c, (i, j) in enumerate(pairs)]
    handles += [Line2D([], [], color="0.3", marker="o", ls="", label="both weights > 0 (tested)"),
                Line2D([], [], color="0.3", marker="o", mfc="white", ls="", label="exempt: a weight is 0"),
                Patch(color="tab:green", alpha=0.25, label=f"|t| < t_0.975({data['threshold']['dof']}) = "
                      f"{thr:.2f}: consistent with local optimality")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 3), fontsize=8, frameon=False)
    return _save(plt, fig, path, rect=(0, _legend_room(len(handles), 3, 3.4 * nr + 0.7), 1, 1))


def plot_response(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Heat maps of the schedule gradient: one panel per target (each domain, the training mix at each
    window's end), x = training step (bins of the estimated windows), y = domain, colour = G averaged over
    the bin (blue < 0: more of that domain then would have lowered the target), hatched where
    |G/stderr| below the window's 95 % t threshold; vertical lines at the checkpoints."""
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    from commute.report import _plt, _save

    plt = _plt()
    names = data["domains"]
    wins = [w for w in data["response"]["windows"] if not w.get("skipped")]
    targets: list[tuple[str | None, str]] = [(d, f"L = {d} at each window's end") for d in names]
    targets.append((None, "L = training mix at each window's end"))
    K = len(names)
    height = 0.45 * K + 1.0
    fig, axes = plt.subplots(len(targets), 1, figsize=(9.0, height * len(targets) + 0.9), squeeze=False)
    cmap = plt.get_cmap("RdBu_r")
    x0, x1 = min(w["start"] for w in wins), max(w["end"] for w in wins)
    for ax, (t, label) in zip(axes[:, 0], targets, strict=True):
        vals = []
        for w in wins:
            key = w["mix_name"] if t is None else t
            vals += [abs(x) for d in names for x in w["bins"]["G"][key][d] if x is not None]
        vmax = max(vals) if vals and max(vals) > 0 else 1.0
        norm = Normalize(-vmax, vmax)
        for w in wins:
            key = w["mix_name"] if t is None else t
            edges = w["bins"]["edges"]
            for k, d in enumerate(names):
                for b, (a, e) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
                    g, z = w["bins"]["G"][key][d][b], w["bins"]["z"][key][d][b]
                    ax.add_patch(Rectangle((a, k - 0.5), e - a, 1.0, facecolor=cmap(norm(g or 0.0)),
                                           edgecolor="none"))
                    if z is None or abs(z) < w.get("threshold", 2.0):
                        ax.add_patch(Rectangle((a, k - 0.5), e - a, 1.0, fill=False, hatch="///",
                                               edgecolor="0.45", lw=0))
                    if w["bins"]["weights"][d][b] == 0:
                        ax.plot([(a + e) / 2], [k], "x", color="k", ms=5, mew=1.0)
            ax.axvline(w["start"], color="k", lw=1.0)
            ax.axvline(w["end"], color="k", lw=1.0)
        ax.set_xlim(x0, x1)
        ax.set_ylim(-0.5, K - 0.5)
        ax.set_yticks(range(K), names, fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
        cb = fig.colorbar(sm, ax=ax, pad=0.01, fraction=0.04)
        cb.ax.tick_params(labelsize=7)
        cb.set_label("G_k(t)", fontsize=8)
    axes[-1, 0].set_xlabel("training step", fontsize=8)
    handles = [Patch(facecolor=cmap(0.15), label="G < 0: more of this domain here lowers L"),
               Patch(facecolor=cmap(0.85), label="G > 0: more of it here raises L"),
               Patch(facecolor="white", edgecolor="0.45", hatch="///",
                     label="|G/stderr| < t_0.975(G−1) (noise)"),
               Line2D([], [], color="k", marker="|", ms=12, ls="", label="checkpoints (window edges)"),
               Line2D([], [], color="k", marker="x", ms=5, ls="", label="w_k = 0 there (not trained on)")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    return _save(plt, fig, path, rect=(0, _legend_room(len(handles), 2, height * len(targets) + 0.9), 1, 1))
