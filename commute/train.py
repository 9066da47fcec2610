"""The one training loop: mixture batches on a weight schedule, exact resume, branches.

Every experiment (base runs, the paper's eq. (9) interventions, locality sweeps, an online controller) runs
through :func:`train`. One optimiser step t (0-based, :func:`train_step`) takes θ_t to θ_{t+1}:

    w = schedule(t)                                    (docs/design.md §1: right-continuous weights)
    batch = sampler.next_batch(w)   (x grad_accum)     (paper §2/§4.2: each example's domain ~ w)
    θ_{t+1} = optimiser(θ_t, ∇ mean_b L_b(θ_t))        (L_b: per-sequence next-token cross-entropy)

With ``loss_weighting="domain"`` the step instead descends Σ_k w_k · mean_{b∈k} L_b (the weighted sum of
paper eq. (1)/(2)), which with a fixed batch holding every domain is deterministic gradient descent on
Σ_k w_k L_k — what the locality sweeps need (pass ``batch_source``).

A run directory holds::

    config.yaml                      the run's TrainConfig (documented YAML, commute.train_config)
    metrics.csv, tb/                 one row per logged step (commute.metrics)
    checkpoints/step_XXXXXXXX/       atomic, checksummed checkpoints (commute.checkpoint)
    checkpoints/latest               name of the newest complete checkpoint

The modules split the ideas; every name used elsewhere (:class:`TrainConfig`, :func:`load_checkpoint`,
:func:`find_checkpoint`, :func:`list_checkpoints`, :class:`Checkpoint`, ...) is also importable from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from commute import fsdp
from commute.checkpoint import (
    CKPT_FORMAT,
    Checkpoint,
    check_arch,
    check_finite,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    model_arch,
    prune_checkpoints,
    read_state,
    read_weights,
    remove_partial_checkpoints,
    restore_rng_state,
    save_checkpoint,
    store_schedule,
    stored_schedule_path,
    unloadable,
)
from commute.checkpoint import sha256_file as _sha256
from commute.distributed import SINGLE, World, check_device, device_for, on_main, shard_batch
from commute.distributed import setup as setup_distributed
from commute.distributed import shard_rows as shard_rows_check
from commute.errors import CommuteError, NonFiniteLossError, note_interrupt
from commute.metrics import Interval, Metrics, csv_fields, read_metrics
from commute.model import build_model, count_parameters, model_config, sequence_losses
from commute.progress import Progress, logger
from commute.train_config import DTYPES, TrainConfig

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Checkpoint",
    "StepInfo",
    "StepResult",
    "train",
    "train_step",
    "evaluate",
    "load_checkpoint",
    "find_checkpoint",
    "list_checkpoints",
    "lr_at",
    "param_group_names",
    "adam_metric",
    "CKPT_FORMAT",
]


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What :func:`train` returns."""

    out_dir: Path
    step: int  #: optimiser steps done (the run's position)
    checkpoint: Path | None  #: the last checkpoint written (or resumed from)
    losses: dict[int, float]  #: training loss of every step run in this call, keyed by the step's index t
    val_losses: dict[str, float]  #: the last validation losses per domain
    tokens: dict[str, int]  #: tokens trained on per domain since step 0
    elapsed: float  #: seconds spent in this call
    tokens_per_second: float  #: training throughput in this call
    metrics_path: Path
    val_step: int | None = None  #: the step at which ``val_losses`` were measured (None: none this call)


@dataclass
class StepInfo:
    """Passed to each callback after every optimiser step (e.g. an online mixing controller)."""

    step: int  #: steps done (θ_step is the current model)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: float
    weights: dict[str, float]
    domain_losses: dict[str, float]


@dataclass(frozen=True)
class StepResult:
    """What one :func:`train_step` did (domain sums cover micro-batches that carry domain ids)."""

    loss: float  #: the descended loss, averaged over the micro-batches
    domain_loss_sum: dict[str, float]  #: Σ of per-sequence losses of each domain's sequences (float64)
    domain_sequences: dict[str, int]  #: sequences of each domain
    domain_tokens: dict[str, int]  #: tokens of each domain
    tokens: int  #: tokens of all micro-batches

    @property
    def domain_losses(self) -> dict[str, float]:
        """Mean per-sequence loss of each domain present in the step."""
        return {n: self.domain_loss_sum[n] / k for n, k in self.domain_sequences.items() if k}


# --------------------------------------------------------------------------------------------------
# optimiser and learning rate
# --------------------------------------------------------------------------------------------------
def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of step ``step``: linear warmup to ``lr`` over ``warmup_steps``, then constant, or a
    cosine / linear decay to ``min_lr_ratio * lr`` at ``steps``.

    With s = (step − warmup) / max(1, steps − warmup) clipped to [0, 1] and lo = min_lr_ratio·lr:
    cosine lr(s) = lo + (lr − lo)(1 + cos πs)/2, linear lr(s) = lr + (lo − lr)s.
    """
    lr = config.lr
    if config.warmup_steps and step < config.warmup_steps:
        return lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return lr
    span = max(1, config.steps - config.warmup_steps)
    s = min(1.0, max(0.0, (step - config.warmup_steps) / span))
    lo = lr * config.min_lr_ratio
    if config.lr_schedule == "cosine":
        return lo + 0.5 * (lr - lo) * (1.0 + math.cos(math.pi * s))
    return lr + (lo - lr) * s


def param_group_names(model: torch.nn.Module) -> list[list[str]]:
    """The optimiser's parameter groups by name: ``[matrices (dim ≥ 2, weight-decayed), the rest (biases,
    layer norms)]``, trainable parameters only, each in ``model.named_parameters()`` order (tied tensors
    once). An optimiser state dict numbers its parameters in this order, group 0 first."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [[n for n, p in named if p.dim() >= 2], [n for n, p in named if p.dim() < 2]]


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The optimiser's groups (:func:`param_group_names`); weight decay on group 0 only."""
    params = dict(model.named_parameters())
    decay, no_decay = ([params[n] for n in group] for group in param_group_names(model))
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adam_metric(optimizer_state: Mapping[str, Any] | None,
                model: torch.nn.Module) -> dict[str, Tensor] | None:
    """Adam's diagonal metric per parameter name, from an Adam/AdamW state dict built by :func:`train`:

        D = √v̂ + ε,   v̂ = v / (1 − β₂^t)      (v = ``exp_avg_sq``, t = the parameter's step count)

    so Adam's step is θ ← θ − lr · m̂ / D. Computed in float64, returned in each parameter's dtype and on
    the state's device. β₂ and ε are those of the parameter's group. ``None`` if the state has no
    ``exp_avg_sq`` for some parameter (SGD, or no step taken yet). Parameters are matched to the state's
    indices through :func:`param_group_names`, so ``model`` must have the trainable parameters the
    optimiser was built with (a mismatch is a :class:`CommuteError`).
    """
    if not optimizer_state or not optimizer_state.get("state"):
        return None
    state, groups = optimizer_state["state"], optimizer_state["param_groups"]
    names = param_group_names(model)
    sizes = [len(g["params"]) for g in groups]
    if sizes != [len(n) for n in names]:
        raise CommuteError(f"the optimiser state has parameter groups of sizes {sizes}, but this model's "
                           f"are {[len(n) for n in names]}; pass the model the optimiser was built for.")
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    out: dict[str, Tensor] = {}
    for group, group_names in zip(groups, names, strict=True):
        for idx, name in zip(group["params"], group_names, strict=True):
            s = state.get(idx) or state.get(str(idx))
            if s is None or "exp_avg_sq" not in s:
                return None
            beta2, eps = float(group["betas"][1]), float(group["eps"])
            vhat = s["exp_avg_sq"].to(torch.float64) / (1.0 - beta2 ** float(s["step"]))
            out[name] = (vhat.sqrt() + eps).to(dtypes[name])
    return out


def _build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)


def _apply_hparams(optimizer: torch.optim.Optimizer, config: TrainConfig) -> None:
    """After ``load_state_dict`` (which restores saved hyperparameters) re-apply this config's."""
    for i, g in enumerate(optimizer.param_groups):
        g["weight_decay"] = config.weight_decay if i == 0 else 0.0
        if config.optimizer == "sgd":
            g["momentum"] = config.momentum
        else:
            g["betas"] = tuple(config.betas)
            g["eps"] = config.eps


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CommuteError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CommuteError(f"device {name!r} was requested but CUDA is not available on this machine.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CommuteError(f"device {name!r} was requested but MPS is not available on this machine.")
    return dev


# --------------------------------------------------------------------------------------------------
# evaluation and one step
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: torch.nn.Module, val_batches: Mapping[str, Sequence[Any]],
             dtype: torch.dtype | None = None) -> dict[str, float]:
    """Mean next-token cross-entropy per domain over fixed batches: ``{domain: loss}``.

    Every sequence weighs the same (all have the same length). ``dtype`` is the cross-entropy dtype (see
    :func:`commute.model.sequence_losses`). The model is put in eval mode and restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, float] = {}
    try:
        for name, batches in val_batches.items():
            total, n = 0.0, 0
            for b in batches:
                ids = getattr(b, "input_ids", b).to(device)
                losses = sequence_losses(model, ids, dtype=dtype)
                total += float(losses.double().sum())
                n += losses.numel()
            out[name] = total / n if n else float("nan")
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def _evaluate_distributed(model: torch.nn.Module, val_batches: Mapping[str, Sequence[Any]], world: World,
                          by_rows: bool = False) -> dict[str, float]:
    """:func:`evaluate` on several processes; the loss sums and sequence counts are summed over ranks, so
    every rank gets the losses of all the batches. Rank r takes batches r, r+W, ... of every domain, or,
    ``by_rows`` (an FSDP-sharded model, where every forward is a collective), every batch on its share of
    the rows (``torch.tensor_split``; a rank without rows runs one row and discards it)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: list[float] = []
    try:
        for batches in val_batches.values():
            total, n = 0.0, 0
            for b in (batches if by_rows else batches[world.rank::world.world_size]):
                ids = getattr(b, "input_ids", b)
                mine = torch.tensor_split(ids, world.world_size)[world.rank] if by_rows else ids
                losses = sequence_losses(model, (mine if len(mine) else ids[:1]).to(device))
                if len(mine):
                    total += float(losses.double().sum())
                    n += losses.numel()
            sums += [total, n]
    finally:
        model.train(was_training)
        if by_rows:
            fsdp.reshard(model)
    tot = world.all_sum(sums)
    return {name: float(tot[2 * k] / tot[2 * k + 1]) if tot[2 * k + 1] else float("nan")
            for k, name in enumerate(val_batches)}


def _load_sharded_weights(path: Path, model: torch.nn.Module) -> None:
    """:func:`load_weights` and :func:`check_finite` for an FSDP-sharded model: every rank reads the full
    ``model.safetensors`` on the CPU (:func:`read_weights`) and keeps its shards."""
    state = read_weights(path, model)
    check_finite(path, state)
    try:
        fsdp.load_model_state(model, state)
    except Exception as exc:
        raise unloadable(path, exc) from None


def diverged(what: str, lr: float, last_checkpoint: Path | None) -> NonFiniteLossError:
    """The one sentence of a diverged run: what happened, the last (healthy) checkpoint and how to go on
    from it with a lower learning rate (a branch into a new directory: ``lr`` is a branch field)."""
    if last_checkpoint is not None:
        how = (f"checkpoint {last_checkpoint.name} is intact; lower the learning rate and branch from it "
               f"into a new directory (commute train CONFIG --branch-from {last_checkpoint} --out NEW_DIR), "
               "or check the data")
    else:
        how = "no checkpoint was written yet; lower the learning rate and start again, or check the data"
    return NonFiniteLossError(f"{what} (lr={lr:g}); {how}.")


def _check_token_ids(ids: Tensor, vocab: int, step: int) -> None:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise CommuteError(f"a batch of step {step} holds token id {hi if hi >= vocab else lo}, outside the "
                           f"model's vocabulary of {vocab}; set vocab_size to at least the tokenizer's (or "
                           "null to use it).")


def _micro_batch_loss(seq: Tensor, dom: Tensor | None, weights: Mapping[str, float],
                      names: Sequence[str]) -> Tensor:
    """Σ_k w_k · mean_{b: d_b=k} ℓ_b / Σ_k w_k over the domains k present with w_k > 0 (``seq`` = ℓ)."""
    if dom is None:
        raise CommuteError("loss_weighting='domain' needs batches with domain ids.")
    dom_d = dom.to(seq.device)
    parts, wsum = [], 0.0
    for i, n in enumerate(names):
        m = dom_d == i
        if weights.get(n, 0.0) > 0 and bool(m.any()):
            parts.append(weights[n] * seq[m].mean())
            wsum += weights[n]
    return torch.stack(parts).sum() / wsum


def _sharded_micro_batch_loss(seq: Tensor, dom: Tensor | None, weights: Mapping[str, float],
                              names: Sequence[str], world: World) -> Tensor:
    """This rank's share of :func:`_micro_batch_loss` of the global micro-batch: with N_k the rows of domain
    k in the global micro-batch (summed over ranks), W · Σ_k w_k · Σ_{local b: d_b=k} ℓ_b / N_k / Σ_k w_k;
    DDP's mean over the W ranks is then the global loss."""
    if dom is None:
        raise CommuteError("loss_weighting='domain' needs batches with domain ids.")
    dom_d = dom.to(seq.device)
    counts = world.all_sum([int((dom == i).sum()) for i in range(len(names))])
    parts, wsum = [], 0.0
    for i, n in enumerate(names):
        if weights.get(n, 0.0) > 0 and counts[i] > 0:
            parts.append(weights[n] * seq[dom_d == i].sum() / float(counts[i]))
            wsum += weights[n]
    return torch.stack(parts).sum() * (world.world_size / wsum)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Any],
    weights: Mapping[str, float],
    names: Sequence[str],
    *,
    lr: float,
    loss_weighting: str = "sample",
    grad_clip: float = 0.0,
    autocast: torch.dtype | None = None,
    step: int = 0,
    last_checkpoint: Path | None = None,
    world: World = SINGLE,
) -> StepResult:
    """One optimiser step at learning rate ``lr`` on M = ``len(micro_batches)`` micro-batches.

    A micro-batch is a ``Batch`` (``input_ids`` [B, T] and ``domain`` ids indexing ``names``) or a [B, T]
    LongTensor. With ℓ_b the per-sequence loss, the step descends ∇ (1/M) Σ_m L_m with

        L_m = mean_{b∈m} ℓ_b                                        (``loss_weighting="sample"``)
        L_m = Σ_k w_k · mean_{b∈m, d_b=k} ℓ_b / Σ_k w_k             (``"domain"``; k over domains present
                                                                     in m with w_k > 0)

    then clips the global gradient norm to ``grad_clip`` (0 = off). ``autocast`` is the mixed-precision
    compute dtype (None = off). A non-finite loss raises :class:`NonFiniteLossError` before the optimiser
    steps, naming ``step`` and ``last_checkpoint``.

    Several processes (``world`` of :mod:`commute.distributed`, ``model`` wrapped in DDP): every rank passes
    its equal share of each micro-batch's rows; the local losses are scaled so that DDP's average of the
    gradients over ranks is the gradient of the global L_m above (for ``"domain"`` the per-domain row
    counts of the global micro-batch are summed over ranks first), gradients are synchronised once per step
    (``no_sync`` on all micro-batches but the last), and the returned loss, domain sums and token counts are
    those of the global batch (summed over ranks), identical on every rank. A model sharded by
    :mod:`commute.fsdp` reduce-scatters its gradients after every micro-batch: FSDP2's counterpart of
    ``no_sync`` (``set_requires_gradient_sync(False)``) would keep every parameter's full, unsharded gradient
    on every rank until the last micro-batch, giving up the 1/W gradient memory FSDP is used for.
    """
    for g in optimizer.param_groups:
        g["lr"] = lr
    device = next(model.parameters()).device
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    vocab = getattr(getattr(model.module if ddp else model, "config", None), "vocab_size", None)
    amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    optimizer.zero_grad(set_to_none=True)
    step_loss = 0.0
    dom_sum = dict.fromkeys(names, 0.0)
    dom_n = dict.fromkeys(names, 0)
    dom_tokens = dict.fromkeys(names, 0)
    n_tokens = 0
    for m, mb in enumerate(micro_batches):
        ids = getattr(mb, "input_ids", mb)
        dom = getattr(mb, "domain", None)
        if isinstance(vocab, int) and isinstance(ids, Tensor) and ids.numel():
            _check_token_ids(ids, vocab, step)
        ids = ids.to(device, non_blocking=True)
        sync = model.no_sync() if ddp and m < len(micro_batches) - 1 else contextlib.nullcontext()
        with sync:
            with amp:
                seq = sequence_losses(model, ids)
            if loss_weighting != "domain":
                loss = seq.mean()
            elif world.enabled:
                loss = _sharded_micro_batch_loss(seq, dom, weights, names, world)
            else:
                loss = _micro_batch_loss(seq, dom, weights, names)
            (loss / len(micro_batches)).backward()
        step_loss += float(loss.detach()) / len(micro_batches)
        if dom is not None:
            sl = seq.detach().double().cpu()
            for i, n in enumerate(names):
                m = dom == i
                k = int(m.sum())
                if k:
                    dom_sum[n] += float(sl[m].sum())
                    dom_n[n] += k
                    dom_tokens[n] += k * ids.shape[1]
        n_tokens += ids.numel()
    if world.enabled:  # the global batch's sums (the loss: the mean of the ranks' scaled local losses)
        k = len(names)
        tot = world.all_sum([step_loss, n_tokens] + [dom_sum[n] for n in names] + [dom_n[n] for n in names]
                            + [dom_tokens[n] for n in names])
        step_loss, n_tokens = float(tot[0]) / world.world_size, int(tot[1])
        dom_sum = {n: float(tot[2 + i]) for i, n in enumerate(names)}
        dom_n = {n: int(tot[2 + k + i]) for i, n in enumerate(names)}
        dom_tokens = {n: int(tot[2 + 2 * k + i]) for i, n in enumerate(names)}
    if not math.isfinite(step_loss):
        raise diverged(f"the training loss became {step_loss} at step {step}", lr, last_checkpoint)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return StepResult(loss=step_loss, domain_loss_sum=dom_sum, domain_sequences=dom_n,
                      domain_tokens=dom_tokens, tokens=n_tokens)


# --------------------------------------------------------------------------------------------------
# setting a run up: where it continues from, data, schedule
# --------------------------------------------------------------------------------------------------
@dataclass
class _Origin:
    """The checkpoint a call continues from: the run's own latest (resume), a parent's (a new branch),
    or none (a fresh run)."""

    path: Path | None = None
    state: dict[str, Any] | None = None
    resume: bool = False

    @property
    def branch(self) -> bool:
        """A new branch: starts at another run's checkpoint."""
        return self.state is not None and not self.resume


def _find_origin(out_dir: Path, resume: bool, branch_from: str | Path | None) -> _Origin:
    """Resume ``out_dir`` if it holds checkpoints (it must then be ``branch_from``'s branch, if given), else
    branch from ``branch_from``, else start afresh."""
    existing = list_checkpoints(out_dir)
    parent: Path | None = None
    if branch_from is not None:
        parent = find_checkpoint(branch_from)
        if out_dir.resolve() == parent.parent.parent.resolve():
            raise CommuteError("a branch must be written to its own directory, not into its parent's run.")
    if existing:
        if not resume:
            raise CommuteError(f"{str(out_dir)!r} already holds a run (last checkpoint "
                               f"{existing[-1].name}); resume it, or choose an empty output directory.")
        own = find_checkpoint(out_dir)
        state = read_state(own)
        recorded = (state.get("parent") or {}).get("checkpoint")
        if parent is not None and recorded != str(parent.resolve()):
            raise CommuteError(f"{str(out_dir)!r} already holds a run that is not a branch of "
                               f"{str(parent)!r}; choose an empty output directory for the branch.")
        return _Origin(own, state, resume=True)
    if parent is not None:
        return _Origin(parent, read_state(parent))
    return _Origin()


def _load_domains(cfg: TrainConfig, domains: Mapping[str, Any] | None, batch_source: Any,
                  val_batches: Any) -> dict[str, Any]:
    """The given domains, else the config's loaded if batches or validation batches must come from them."""
    need_data = batch_source is None or (bool(cfg.domains) and bool(cfg.eval_every) and val_batches is None)
    if domains is None and need_data:
        if not cfg.domains:
            raise CommuteError("the config names no domains; add e.g. domains: {en: 'fortunes:en'}.")
        from commute.data import load_domains

        domains = load_domains(cfg.domains, tokenizer=cfg.tokenizer, cache_dir=cfg.cache_dir,
                               val_fraction=cfg.val_fraction)
    domains = dict(domains or {})
    if cfg.domains and domains and set(cfg.domains) != set(domains):
        raise CommuteError(f"the given domains {sorted(domains)} differ from the config's "
                           f"{sorted(cfg.domains)}.")
    return domains


def _resolve_schedule(cfg: TrainConfig, schedule: Any,
                      names: list[str]) -> tuple[Any, TrainConfig, list[str]]:
    """The schedule (argument, else config, else equal weights), the config recording it, the domain names."""
    from commute.schedule import Constant, FromCallable, parse_schedule

    sched_obj: Any = schedule if schedule is not None else cfg.schedule
    if sched_obj is None:
        if not names:
            raise CommuteError("cannot make the default equal-weight schedule without domain names.")
        sched = Constant({n: 1.0 / len(names) for n in names})
    else:
        sched = parse_schedule(sched_obj, domains=names or None)
    if not names:
        names = list(sched.domains)
    if not isinstance(sched, FromCallable):
        cfg = cfg.replace(schedule=sched.to_dict())
    return sched, cfg, names


def _check_origin(cfg: TrainConfig, sched: Any, names: list[str], origin: _Origin) -> None:
    """The run may continue from ``origin``: same trajectory fields (a branch may change
    :attr:`TrainConfig.BRANCH_FIELDS`), same model and domains, and an intervention not already begun."""
    from commute.schedule import FromCallable, Intervention

    if origin.state is None:
        return
    base_ck, base_state = origin.path, origin.state
    if origin.branch and isinstance(sched, Intervention) and int(base_state["step"]) > sched.t0:
        raise CommuteError(f"the intervention starts at t0={sched.t0} but the branch starts at step "
                           f"{int(base_state['step'])}; branch from the checkpoint at step {sched.t0}.")
    saved = TrainConfig.from_dict(base_state["config"], where=f"the config of {str(base_ck)!r}")
    allowed = set(TrainConfig.RUN_FIELDS)
    if origin.branch:  # a new branch may change the schedule and optimiser settings
        allowed |= set(TrainConfig.BRANCH_FIELDS)
    mine, theirs = cfg.to_dict(), saved.to_dict()
    if isinstance(sched, FromCallable) or base_state.get("schedule", {}).get("type") == "callable":
        allowed.add("schedule")
    diff = [k for k in mine if k not in allowed and mine[k] != theirs[k]]
    shape = [k for k in ("model", "model_overrides", "vocab_size") if k in diff]
    if shape:
        raise CommuteError(f"checkpoint {str(base_ck)!r} holds a different model ("
                           + "; ".join(f"{k} {theirs[k]!r} there, {mine[k]!r} here" for k in shape)
                           + "); use the config it was trained with or a new output directory.")
    if diff:
        what = "resume" if origin.resume else "branch from"
        if origin.resume and set(diff) <= set(TrainConfig.BRANCH_FIELDS):
            raise CommuteError(f"cannot resume {str(base_ck)!r}: its config differs in {', '.join(diff)}, "
                               "which only a branch may change; branch from it into a new directory (commute "
                               f"train CONFIG --branch-from {base_ck} --out NEW_DIR).")
        raise CommuteError(f"cannot {what} {str(base_ck)!r}: its config differs in "
                           f"{', '.join(diff)}; use the same settings or a new output directory.")
    if list(base_state.get("domain_names", names)) != names:
        raise CommuteError(f"checkpoint {str(base_ck)!r} was trained on domains "
                           f"{base_state.get('domain_names')}, not {names}.")


def _vocab_size(cfg: TrainConfig, domains: Mapping[str, Any]) -> int:
    """The model's vocabulary: the config's, else the tokenizer's; a config's smaller than the tokens of the
    domains (their tokenizer's vocabulary, or their largest token id) is refused."""
    vocab = cfg.vocab_size or (next(iter(domains.values())).vocab_size if domains else None)
    if vocab is None:
        from commute.data import get_tokenizer

        vocab = get_tokenizer(cfg.tokenizer).vocab_size
    if cfg.vocab_size is not None and domains:
        need = max(_tokens_needed(d) for d in domains.values())
        if cfg.vocab_size < need:
            raise CommuteError(f"config field vocab_size={cfg.vocab_size} is smaller than the {need} token "
                               f"ids of the data (tokenizer {cfg.tokenizer}); set vocab_size >= {need}, or "
                               "null to use the tokenizer's.")
    return int(vocab)


def _tokens_needed(domain: Any) -> int:
    """How many token ids a domain's data uses: its tokenizer's vocabulary, else its largest id + 1."""
    if getattr(domain, "tokenizer", None) is not None:
        return int(domain.tokenizer.vocab_size)
    arrays = [a for a in (getattr(domain, "train", None), getattr(domain, "val", None))
              if a is not None and len(a)]
    return max((int(a.max()) + 1 for a in arrays), default=0)


def _check_model(cfg: TrainConfig, vocab: int) -> None:
    """The model the config describes can be built (overrides checked) and holds ``seq_len`` tokens."""
    mc = model_config(cfg.model, vocab, attn_implementation=cfg.attn_implementation, **cfg.model_overrides)
    if cfg.seq_len > mc.n_positions:
        raise CommuteError(f"seq_len={cfg.seq_len} exceeds the model's context of {mc.n_positions}; lower "
                           "seq_len or set model_overrides.n_positions.")


_RUN_FILES = {"checkpoints": "dir", "tb": "dir", "schedules": "dir", "metrics.csv": "file",
              "config.yaml": "file"}


def _check_out_dir(out_dir: Path) -> None:
    """Before anything is written: ``out_dir`` is (or can become) a directory and what a run keeps in it
    has the right kind (a file where ``checkpoints/`` belongs is refused instead of found out half-way)."""
    for up in (out_dir, *out_dir.parents):
        if up.exists():
            if not up.is_dir():
                raise CommuteError(f"the output directory {str(out_dir)!r} cannot be made: {str(up)!r} is "
                                   "not a directory; choose another --out.")
            break
    for name, kind in _RUN_FILES.items():
        p = out_dir / name
        if p.exists() or p.is_symlink():
            if kind == "dir" and not p.is_dir():
                raise CommuteError(f"{str(p)!r} is not a directory; move it away (nothing was written).")
            if kind == "file" and not p.is_file():
                raise CommuteError(f"{str(p)!r} is not a regular file; move it away (nothing was written).")


def _move_aside(out_dir: Path) -> None:
    """A run starting afresh in ``out_dir`` moves the output of an earlier one that left no checkpoint
    (metrics.csv, config.yaml, tb/) into ``out_dir/previous-<time>/`` instead of overwriting it."""
    old = [p for p in (out_dir / "metrics.csv", out_dir / "config.yaml", out_dir / "tb") if p.exists()]
    if not old:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = out_dir / f"previous-{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = out_dir / f"previous-{stamp}-{n}"
    dest.mkdir()
    for p in old:
        os.replace(p, dest / p.name)
    logger.warning(f"{str(out_dir)!r} holds the output of an earlier run but no checkpoint to resume from; "
                   f"moved {', '.join(p.name for p in old)} to {str(dest)!r} and starting afresh.")


def _write_config(cfg: TrainConfig, out_dir: Path) -> None:
    """``config.yaml``; a large schedule is written once to ``schedules/`` and named there by path."""
    stored = stored_schedule_path(out_dir, store_schedule(out_dir, cfg.schedule))
    if stored is not None:
        cfg = dataclasses.replace(cfg, schedule=str(stored.resolve()))
    cfg.to_yaml(out_dir / "config.yaml")


def _validation_batches(cfg: TrainConfig, domains: Mapping[str, Any],
                        given: Mapping[str, Sequence[Any]] | None) -> dict[str, Sequence[Any]]:
    """``given``, else ``eval_batches`` fixed batches per domain from its validation split (if evaluating)."""
    if given is None and cfg.eval_every and domains:
        given = {n: d.val_batches(cfg.eval_batches, cfg.batch_size, cfg.seq_len)
                 for n, d in domains.items()} if cfg.eval_batches else {}
    return dict(given or {})


def _join_world(cfg: TrainConfig, batch_source: Any) -> World:
    """The processes of this run (:func:`commute.distributed.setup`: joins torchrun's process group, if any).
    Checked first (a one-sentence error on every rank, before any rank waits for the others): the sampler's
    batch must split evenly, and the device must leave the choice of GPU to LOCAL_RANK."""
    from commute.distributed import current, env_world

    world = current() if current().enabled else env_world()
    if world.enabled:
        if batch_source is None:
            shard_rows_check(cfg.batch_size, world)
        check_device(world, cfg.device, "training")
        if cfg.parallel == "fsdp" and not fsdp.available():
            raise CommuteError("parallel: fsdp needs torch.distributed.fsdp.fully_shard (FSDP2), which torch "
                               f"{torch.__version__} lacks; use parallel: ddp or a newer torch.")
    return setup_distributed(cfg.device)


@contextlib.contextmanager
def _deterministic(enabled: bool, device: torch.device) -> Iterator[None]:
    """Inside: ``torch.use_deterministic_algorithms(enabled)`` and a forked RNG; both restored after."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            torch.use_deterministic_algorithms(enabled)
            yield
        finally:
            torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------
class _Run:
    """One :func:`train` call's state: model, optimiser, batches, counters, metrics, last checkpoint.

    Built inside :func:`_deterministic` (the initialisation draws from torch's seeded RNG).
    """

    def __init__(self, cfg: TrainConfig, out_dir: Path, names: list[str], sched: Any,
                 domains: Mapping[str, Any], batch_source: Any, device: torch.device, vocab: int,
                 world: World = SINGLE) -> None:
        self.cfg, self.out_dir, self.names, self.sched, self.device = cfg, out_dir, names, sched, device
        self.world = world
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, vocab_size=vocab, dtype=DTYPES[cfg.dtype],
                                 attn_implementation=cfg.attn_implementation, **cfg.model_overrides)
        if cfg.seq_len > self.model.config.n_positions:
            raise CommuteError(f"seq_len={cfg.seq_len} exceeds the model's context of "
                               f"{self.model.config.n_positions}; lower seq_len or set "
                               "model_overrides.n_positions.")
        #: parallel: fsdp on several processes: the model is sharded over the ranks (commute.fsdp) before the
        #: optimiser is built, and checkpoints gather and scatter full state dicts
        self.fsdp = world.enabled and cfg.parallel == "fsdp"
        if self.fsdp:  # fully_shard moves each block to the device as it shards it
            fsdp.shard_model(self.model, world, device)
        else:
            self.model.to(device)
        #: what the steps run through: the model itself, or its DDP wrapper on several processes (begin)
        self.train_model: torch.nn.Module = self.model
        self.optimizer = _build_optimizer(self.model, cfg)
        self.sampler = None
        if batch_source is None:
            from commute.data import MixtureSampler

            seed = cfg.seed if cfg.sampler_seed is None else cfg.sampler_seed
            self.sampler = MixtureSampler(domains, cfg.batch_size, cfg.seq_len, seed, cfg.sampler_mode)
        self.batch_source = batch_source
        self.source_iter: Iterator[Any] | None = None
        self.step = 0
        self.end = 0
        self.tokens = dict.fromkeys(names, 0)
        self.interval = Interval(names)
        self.parent: dict[str, Any] | None = None
        self.last_ck: Path | None = None
        self.losses: dict[int, float] = {}
        self.val_batches: dict[str, Sequence[Any]] = {}
        self.last_val: dict[str, float] = {}
        self.last_val_step: int | None = None
        self.metrics: Metrics | None = None
        self.ckpt_steps = set(cfg.ckpt_steps)
        self.t_start = self.t_row = 0.0
        self.tok_row = self.tok_total = 0
        self.amp = DTYPES[cfg.autocast] if cfg.autocast else None
        self.lr = cfg.lr  #: the learning rate of the last step (for messages)
        self.probe: Any = None  #: the last micro-batch trained on: a checkpoint's weights must give it a loss
        self._static: dict[str, Any] | None = None  #: the state.json entries fixed for the whole call

    def restore(self, origin: _Origin) -> None:
        """Continue from ``origin``: weights, optimiser, RNG, step, sampler, tokens; on resume also the
        metrics interval, the parent and the last checkpoint."""
        ck, state = origin.path, origin.state
        assert ck is not None and state is not None
        check_arch(ck, state.get("arch"), self.model)
        if self.fsdp:
            _load_sharded_weights(ck, self.model)
        else:
            load_weights(ck, self.model, self.device)
            check_finite(ck, self.model)
        try:
            if self.fsdp:  # every rank reads the full state and keeps its shard
                opt_state = torch.load(ck / "optimizer.pt", map_location="cpu", weights_only=True)
                fsdp.load_optimizer_state(self.model, self.optimizer, opt_state,
                                          param_group_names(self.model))
            else:
                opt_state = torch.load(ck / "optimizer.pt", map_location=self.device, weights_only=True)
                self.optimizer.load_state_dict(opt_state)
        except Exception as exc:
            raise CommuteError(f"cannot restore the optimiser state of checkpoint {str(ck)!r} "
                               f"({type(exc).__name__}).") from None
        _apply_hparams(self.optimizer, self.cfg)
        restore_rng_state(ck)
        self.step = int(state["step"])
        if self.sampler is not None and state.get("sampler") is not None:
            saved = dict(state["sampler"])
            if not origin.resume:  # a branch continues the parent's position under its own sampler seed
                saved["seed"] = self.sampler.seed
            self.sampler.load_state_dict(saved)
        self.tokens = {n: int(state.get("tokens", {}).get(n, 0)) for n in self.names}
        if origin.resume:
            self.interval = Interval(self.names, state.get("interval"))
            self.parent = state.get("parent")
            self.last_ck = ck
        else:
            self.parent = {"checkpoint": str(ck.resolve()), "step": self.step,
                           "config_hash": state.get("config_hash"), "schedule": state.get("schedule")}

    def state_dict(self, at: int) -> dict[str, Any]:
        """The checkpoint's ``state.json`` (without the checksums :func:`save_checkpoint` adds).

        What cannot change during the call (config, its hash, the schedule) is computed once; a large
        schedule is stored once per run (:func:`commute.checkpoint.store_schedule`) and referred to by hash.
        """
        if self._static is None:
            config = self.cfg.to_dict()
            config["schedule"] = store_schedule(self.out_dir, config["schedule"])
            parent = self.parent
            if parent is not None:
                parent = {**parent, "schedule": store_schedule(self.out_dir, parent.get("schedule"))}
            self._static = {"config": config, "config_hash": self.cfg.trajectory_hash(),
                            "arch": model_arch(self.model), "n_params": count_parameters(self.model),
                            "schedule": store_schedule(self.out_dir, self.sched.to_dict()), "parent": parent}
        st = self._static
        return {
            "format": CKPT_FORMAT,
            "step": at,
            "config": st["config"],
            "config_hash": st["config_hash"],
            "arch": st["arch"],
            "n_params": st["n_params"],
            "domain_names": self.names,
            "schedule": st["schedule"],
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
            "tokens": dict(self.tokens),
            "interval": self.interval.to_dict(),
            "parent": st["parent"],
            "torch": torch.__version__,
            "time": time.time(),
            # several processes: recorded for the reader (a resume may use any number of processes)
            **({"world_size": self.world.world_size} if self.world.enabled else {}),
        }

    def unhealthy(self) -> str | None:
        """Why the current weights must not be checkpointed (not finite, or a non-finite loss on the last
        batch trained on), or None. The probe runs in eval mode without gradients: it changes no state and
        draws no random numbers, so the run is bitwise the same with or without it. Under FSDP every rank
        checks its shards and the probe's forward (a collective) runs on every rank or none."""
        if self.fsdp:
            name = fsdp.local_nonfinite(self.model)
            if self.world.any(name is not None):
                return f"are not finite ({name or 'in the shard of another process'})"
        else:
            for name, p in self.model.named_parameters():
                if not bool(torch.isfinite(p).all()):
                    return f"are not finite ({name})"
        if self.probe is None:
            return None
        ids = getattr(self.probe, "input_ids", self.probe)
        amp = (torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None
               else contextlib.nullcontext())
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), amp:
                loss = float(sequence_losses(self.model, ids.to(self.device)).double().mean())
        finally:
            self.model.train(was)
            if self.fsdp:
                fsdp.reshard(self.model)
        return None if math.isfinite(loss) else f"give the loss {loss} on the last batch"

    def checkpoint(self, at: int) -> Path:
        """Save a checkpoint at step ``at`` (only healthy weights: see :meth:`unhealthy`) and prune periodic
        ones beyond ``keep_last``."""
        bad = self.unhealthy()
        if self.world.enabled and self.world.any(bad is not None):  # every rank stops, or none
            bad = bad or "give a non-finite loss on another process's rows of the last batch"
        if bad is not None:
            raise diverged(f"the weights reached at step {at} {bad}", self.lr, self.last_ck)
        model: Any = self.model
        optimizer: Any = self.optimizer
        if self.fsdp:  # every rank takes part in gathering the full state dicts; rank 0 receives them
            model = fsdp.full_model_state(self.model)
            optimizer = fsdp.gather_optimizer_state(self.model, self.optimizer)

        def write() -> Path:
            opt = (fsdp.number_optimizer_state(optimizer, param_group_names(self.model)) if self.fsdp
                   else optimizer)
            # _sha256 is read from this module at call time: tests replace it to simulate a crash mid-write
            p = save_checkpoint(self.out_dir, at, model, opt, self.state_dict(at), checksum=_sha256)
            prune_checkpoints(self.out_dir, self.cfg.keep_last, self.ckpt_steps, current=p)
            return p

        # rank 0 writes it (every rank holds the same weights, optimiser and sampler state); the others wait
        # for it there, and every rank raises if it failed (rank 0 its error, the others one sentence)
        p = on_main(self.world, f"training (writing the checkpoint of step {at})", write)
        if p is None:
            p = self.out_dir / "checkpoints" / f"step_{at:08d}"
        self.last_ck = p
        return p

    def validate(self, at: int) -> dict[str, float]:
        """Evaluate on the validation batches (if any) and remember the result; the last one otherwise."""
        if self.val_batches:
            if self.world.enabled:  # under FSDP (only on several ranks) every forward is a collective
                val = _evaluate_distributed(self.model, self.val_batches, self.world, by_rows=self.fsdp)
            else:
                val = evaluate(self.model, self.val_batches)
            self.last_val, self.last_val_step = val, at
        return self.last_val

    def begin(self, origin: _Origin, end: int) -> None:
        """Before the first step: evaluate and checkpoint a new start point, open the batches, start the
        clocks."""
        self.end = end
        if self.world.enabled and not self.fsdp:  # after restore(): every rank holds the same weights already
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids, forward_sync_buffers=False)
        if not origin.resume and self.val_batches:  # fresh run or new branch: evaluate the start point
            assert self.metrics is not None
            self.metrics.write_start(self.step, self.validate(self.step), self.tokens)
        if not origin.resume and self.step in self.ckpt_steps and self.step < end:
            self.checkpoint(self.step)
        if self.batch_source is not None and not callable(self.batch_source):
            self.source_iter = iter(self.batch_source)
        self.model.train()
        self.t_start = self.t_row = time.perf_counter()

    def micro_batches(self, t: int, w: Mapping[str, float]) -> list[Any]:
        """Step ``t``'s micro-batches: ``grad_accum`` sampler batches at weights ``w``, or the source's."""
        world = self.world
        if self.sampler is not None:
            shard = (world.rank, world.world_size) if world.enabled else None
            mbs = [self.sampler.next_batch(w, shard=shard) for _ in range(self.cfg.grad_accum)]
        elif self.source_iter is not None:
            try:
                mbs = _as_micro_batches(next(self.source_iter))
            except StopIteration:
                raise CommuteError(f"the batch source ran out at step {t}.") from None
        else:
            mbs = _as_micro_batches(self.batch_source(t))
        if world.enabled and self.sampler is None:  # a given batch is global: this rank takes its rows
            mbs = [shard_batch(mb, world) for mb in mbs]
        self.probe = mbs[-1] if mbs else None
        return mbs

    def after_step(self, t: int, lr: float, w: Mapping[str, float], res: StepResult, prog: Progress) -> None:
        """Count step ``t``, then write its metrics row, evaluate and checkpoint where the config says.

        Rows and evaluations depend on the run's steps only (not on where this call stops), so an
        interrupted-and-resumed run writes the same rows as an uninterrupted one.
        """
        cfg = self.cfg
        self.step = step = t + 1
        self.lr = lr
        self.losses[t] = res.loss
        self.interval.add(res.loss, res.domain_loss_sum, res.domain_sequences)
        for n in self.names:
            self.tokens[n] += res.domain_tokens[n]
        self.tok_row += res.tokens
        self.tok_total += res.tokens
        is_eval = bool(cfg.eval_every) and (step % cfg.eval_every == 0 or step == cfg.steps)
        if step % cfg.log_every == 0 or is_eval or step == cfg.steps:
            prog.info(self._log_row(step, lr, w, is_eval))
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step in self.ckpt_steps or step == self.end:
            self.checkpoint(step)

    def _log_row(self, step: int, lr: float, w: Mapping[str, float], is_eval: bool) -> str:
        """Write the metrics row of ``step`` (evaluating if ``is_eval``); returns the progress text."""
        assert self.metrics is not None
        now = time.perf_counter()
        tps = self.tok_row / max(now - self.t_row, 1e-9)
        self.t_row, self.tok_row = now, 0
        loss, dom = self.interval.pop()
        val = self.validate(step) if is_eval else {}
        self.metrics.write_step(step, lr, loss, dom, val, w, self.tokens, tps, now - self.t_start)
        info = f"loss {loss:.3f}" if loss is not None else ""
        if self.last_val:
            info += "  val " + " ".join(f"{n} {v:.3f}" for n, v in self.last_val.items())
        return info + f"  {tps:,.0f} tok/s"

    def result(self, elapsed: float) -> TrainResult:
        return TrainResult(out_dir=self.out_dir, step=self.step, checkpoint=self.last_ck, losses=self.losses,
                           val_losses=dict(self.last_val), val_step=self.last_val_step,
                           tokens=dict(self.tokens), elapsed=elapsed,
                           tokens_per_second=self.tok_total / max(elapsed, 1e-9),
                           metrics_path=self.out_dir / "metrics.csv")


class _NoMetrics:
    """The metrics writer of ranks other than 0 (only rank 0 writes metrics.csv and TensorBoard)."""

    def write_start(self, *args: Any) -> None:
        pass

    def write_step(self, *args: Any) -> None:
        pass

    def __enter__(self) -> _NoMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _as_micro_batches(item: Any) -> list[Any]:
    if isinstance(item, list | tuple):
        return list(item)
    return [item]


def train(
    config: TrainConfig | Mapping[str, Any] | str | Path | None,
    out_dir: str | Path,
    *,
    resume: bool = True,
    branch_from: str | Path | None = None,
    schedule: Any = None,
    max_steps: int | None = None,
    domains: Mapping[str, Any] | None = None,
    batch_source: Iterable[Any] | Callable[[int], Any] | None = None,
    val_batches: Mapping[str, Sequence[Any]] | None = None,
    callbacks: Sequence[Callable[[StepInfo], None]] = (),
    progress: bool = True,
) -> TrainResult:
    """Train (or resume, or branch) a run into ``out_dir``; returns a :class:`TrainResult`.

    * ``config``: a :class:`TrainConfig`, a mapping, or a YAML path; may be ``None`` with ``branch_from``
      (the parent's config is used).
    * ``resume``: if ``out_dir`` already holds checkpoints, continue from the latest one (the config must
      agree on everything but :attr:`TrainConfig.RUN_FIELDS`); with ``resume=False`` such a directory is an
      error (nothing already written is overwritten).
    * ``branch_from``: a checkpoint (or run) directory; a fresh ``out_dir`` starts from its weights,
      optimiser, sampler and RNG state and step, typically with another ``schedule``. The parent is only
      read, and is recorded in the branch's ``state.json``. A branch directory that already has checkpoints
      is resumed.
    * ``schedule``: a :class:`commute.schedule.Schedule`, mapping, path or ``"en=0.5,ru=0.5"``; overrides
      ``config.schedule``.
    * ``max_steps``: stop after this step (counted from 0 like ``config.steps``, which still sets the
      learning-rate horizon), leaving a checkpoint to resume from.
    * ``domains``: already loaded ``{name: TokenizedDomain}`` (skips :func:`commute.data.load_domains`).
    * ``batch_source``: train on given batches instead of the sampler: an iterable yielding one item per
      optimiser step, or a callable ``step -> item``; an item is a batch (``Batch``, or a ``[B, T]``
      LongTensor) or a list of micro-batches. Resume needs the callable form (an iterable cannot rewind).
    * ``val_batches``: ``{name: [batches]}`` for validation (default: ``eval_batches`` fixed batches per
      domain from each domain's validation split).
    * ``callbacks``: called with a :class:`StepInfo` after every step (on every process of a torchrun run).

    Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE`` > 1 in the environment; see
    :mod:`commute.distributed`) the run is data-parallel: the default process group is initialised (``nccl``
    on CUDA, each rank on ``cuda:LOCAL_RANK``; ``gloo`` on CPU) unless it already is, the model is wrapped
    in DDP, every rank composes the same global batch of ``batch_size`` rows and trains on its contiguous
    B/N rows (``batch_size`` must be a multiple of N), validation batches are dealt round-robin, and the
    losses, domain sums and token counts are summed over ranks. So the trajectory, ``metrics.csv`` and the
    checkpoints are those of the one-process run with the same config, to float rounding. Rank 0 alone
    writes files; the other ranks wait for each checkpoint to be written (and end with one sentence if the
    write fails on rank 0), and it holds the unwrapped model and the global sampler state, so it resumes (or
    branches) with any number of processes. Every rank returns the same :class:`TrainResult`. With
    ``parallel: fsdp`` the model is sharded with FSDP2 instead of replicated (:mod:`commute.fsdp`): the same
    batches, metrics and checkpoint files (gathered to rank 0), each rank holding 1/N of the weights,
    gradients and optimiser state; validation batches are then split by rows. Callbacks then receive the
    sharded model (``StepInfo.model``: its parameters are this rank's DTensor shards): its forward gathers
    each block's weights from every rank, a collective, so a callback that runs it must run it on every rank
    with the same number of calls (a forward on rank 0 only hangs), then call
    :func:`commute.fsdp.reshard`; :func:`commute.fsdp.full_model_state` (called on every rank) gives the full
    weights on rank 0.

    Raises :class:`CommuteError` (one sentence) for bad input, :class:`NonFiniteLossError` if the loss
    becomes NaN/inf (the last good checkpoint is left intact).
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    origin = _find_origin(out_dir, resume, branch_from)
    run: _Run | None = None
    try:
        if config is None:
            if origin.state is None:
                raise CommuteError("train() needs a config (or branch_from= to reuse a checkpoint's config).")
            config = origin.state["config"]
        cfg = TrainConfig.load(config)
        world = _join_world(cfg, batch_source)
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                      or max_steps < 0):
            raise CommuteError(f"max_steps must be an integer >= 0, got {max_steps!r}.")
        domains = _load_domains(cfg, domains, batch_source, val_batches)
        sched, cfg, names = _resolve_schedule(cfg, schedule, list(domains) or list(cfg.domains))
        _check_origin(cfg, sched, names, origin)
        device = device_for(world, resolve_device(cfg.device))
        vocab = _vocab_size(cfg, domains)
        _check_model(cfg, vocab)
        start_step = int(origin.state["step"]) if origin.state is not None else 0
        if origin.resume:  # a damaged metrics.csv is refused now, not after config.yaml was rewritten
            read_metrics(out_dir / "metrics.csv", csv_fields(names), start_step)
        with _deterministic(cfg.deterministic, device):
            run = _Run(cfg, out_dir, names, sched, domains, batch_source, device, vocab, world)
            if origin.state is not None:
                run.restore(origin)
            start, end = run.step, cfg.steps if max_steps is None else min(cfg.steps, max_steps)
            run.val_batches = _validation_batches(cfg, domains, val_batches)
            # everything is checked: from here on files are written (an earlier run's are moved, not lost);
            # several processes: every rank has read what it continues from before rank 0 writes anything
            world.barrier()
            if world.main:
                if not origin.resume:
                    _move_aside(out_dir)
                out_dir.mkdir(parents=True, exist_ok=True)
                remove_partial_checkpoints(out_dir)  # a write interrupted by a crash
                _write_config(cfg, out_dir)
            # a resumed run keeps the rows up to its checkpoint (they include its step); a fresh run or a new
            # branch starts a new metrics.csv
            keep = start if origin.resume else start - 1
            metrics = Metrics(out_dir, names, keep, cfg.tensorboard) if world.main else _NoMetrics()
            with metrics as run.metrics:
                run.begin(origin, end)
                with Progress("train", end, enabled=progress and world.main, completed=start) as prog:
                    for t in range(start, end):
                        w, lr = sched(t), lr_at(cfg, t)
                        res = train_step(run.train_model, run.optimizer, run.micro_batches(t, w), w, names,
                                         lr=lr, loss_weighting=cfg.loss_weighting, grad_clip=cfg.grad_clip,
                                         autocast=run.amp, step=t, last_checkpoint=run.last_ck, world=world)
                        run.after_step(t, lr, w, res, prog)
                        prog.update(run.step)
                        for cb in callbacks:  # after logging and checkpointing: callbacks see a settled step
                            cb(StepInfo(step=run.step, model=run.model, optimizer=run.optimizer,
                                        loss=res.loss, weights=w, domain_losses=res.domain_losses))
                if end <= start and run.last_ck is None and origin.branch:
                    run.checkpoint(run.step)  # a branch asked for zero steps: still give it a checkpoint
                if end <= start and not origin.resume and not origin.branch and world.main:
                    why = f"steps is {cfg.steps}" + (" and max_steps 0" if end < cfg.steps else "")
                    logger.warning(f"nothing to train: {why}, so no step was taken and no checkpoint was "
                                   "written; set steps in the config (or --steps N).")
                elapsed = time.perf_counter() - run.t_start
    except KeyboardInterrupt as exc:  # the CLI names the checkpoint to resume from
        note_interrupt(exc, run.last_ck if run is not None else origin.path if origin.resume else None)
        raise
    return run.result(elapsed)
