"""The bracket estimator on real models: P(L_i, L_j; L) from mini-batches, unbiased, with a stderr.

The quantity (paper eq. 6-7 with the sign of docs/design.md §1) is, for domains i, j and a target loss L,

    P(L_i, L_j; L) = <R(L_i, L_j), g_L> = g_L . H_j g_i - g_L . H_i g_j,

where g_k, H_k are the gradient and Hessian of the *population* loss L_k of domain k. Under gradient flow,
training dt on i then dt on j instead of 2 dt on the 50/50 mix changes L by (dt^2 / 2) P (Theorem 3.1); P > 0
means the order i -> j hurts L (and j -> i helps).

Estimation (docs/design.md §1, "Estimation under noise"). We only see mini-batches, so every factor is
noisy, and a product of two estimates from the *same* batches is biased (e.g. g_i . H_j g_i picks up
tr(H_j Cov g_i)).
:class:`BracketEstimator` therefore builds each product from three *independent* estimates:

* the target gradient g_L from gradient batches "A" (g_L^A = sum_k c_k g_k^A for a target L = sum_k c_k L_k),
* the gradient inside the bracket g_i from separate gradient batches "B",
* the Hessian H_j from separate HVP batches,

so E[g_L^A . H_j^hvp g_i^B] = g_L . H_j g_i exactly (the expectation of a product of independent factors is
the product of expectations, and each factor is linear in the batch losses). To get a standard error that
includes *all* of this noise (gradient noise in both factors and Hessian noise), the batches are split into
G independent groups; each group has its own A half, B half and HVP batches and yields an unbiased P_g. We
report mean(P_g) and std(P_g) / sqrt(G): the P_g are i.i.d., so this stderr is calibrated, and (mean - P) /
stderr follows roughly a Student t with G - 1 degrees of freedom (:meth:`Estimate.interval`).

Trade-off for G (``n_groups``, default 10): more groups give a better-determined stderr (more degrees of
freedom), but each group then uses fewer batches, and the second-order noise terms of a product (noise x
noise, e.g. eps_A . H eps_B) have variance ~ 1 / (batches per group)^2, so the total variance grows roughly
like G when gradient noise dominates. With fewer groups the mean is sharper but its stderr is noisier.

HVP cost (docs/design.md §1). By the symmetry of H_k, g_L . H_k g_i = (H_k g_L) . g_i, so per HVP batch
(one batch of every domain) either K(K-1) products H_j g_i^B ("pairs": any target afterwards, by linearity
in g_L) or K*M products H_k g_L^A ("targets", M targets) suffice; ``mode="auto"`` takes the fewer. The
vectors that hit the same domain Hessian share one double-backward graph: one ``create_graph=True``
backward per domain per HVP batch, then one ``autograd.grad`` per vector with ``retain_graph``. Measured on
a tiny GPT-2 (one CPU thread), a lone HVP costs about 2.8-2.9 gradients and 4-8 HVPs sharing one graph
1.9-2.2 gradients each: roughly 2x a gradient per HVP on CPU, 1.5-2.5x on a GPU.

Order tournament (:meth:`BracketEstimator.tournament`). For one target L, the row sum (Borda score) of domain
i over the pairwise brackets is, with u_k = H_k g_L (Hessian symmetry: g_L . H_j g_i = u_j . g_i),

    S_i = sum_j P(L_i, L_j; L) = sum_{j != i} (u_j . g_i - u_i . g_j) = g_i . U - u_i . G_sum,
    U = sum_k u_k,  G_sum = sum_k g_k        (the j = i terms g_i . u_i - u_i . g_i cancel),

so the scores of all K domains need the K HVPs u_k = H_k g_L^A per HVP batch (the "targets" mode with one
target), not the K(K-1) of the pairs. By Theorem 3.1, L(theta_ij) - L(theta_ji) = dt^2 P(L_i, L_j; L), so
dt^2 S_i is how much higher L ends when i is trained *before* each other domain rather than after it, summed
over the others: a domain with a large S_i belongs late, one with a very negative S_i early.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from commute.bracket import graph_hvps, intervention_excess, tree_dot
from commute.curvature import math_attention
from commute.distributed import GroupSplit, estimate_world
from commute.errors import CommuteError
from commute.io import JsonRoundTrip
from commute.progress import Progress
from commute.schedule import check_delta_w

__all__ = ["Estimate", "BracketEstimator", "BracketReport", "TournamentReport", "LossFn", "DEFAULT_MIX_NAME"]

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> Tensor``: see :class:`BracketEstimator` for the exact contract."""

Mode = Literal["auto", "pairs", "targets"]
TargetsArg = Sequence[str] | Mapping[str, Mapping[str, float]] | None

DEFAULT_MIX_NAME = "mix"
"""Name of the default uniform-mixture target (``"uniform_mix"`` if a domain is itself called "mix")."""


# --------------------------------------------------------------------------------------------------
# Estimate
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """A noisy scalar: ``mean`` +- ``stderr`` from ``n`` independent replicates (groups).

    ``stderr`` is std(replicates) / sqrt(n), so ``z = mean / stderr`` is roughly Student-t with n - 1 degrees
    of freedom under the null "true value is 0".
    """

    mean: float
    stderr: float
    n: int

    @property
    def z(self) -> float:
        """mean / stderr (+-inf if stderr is 0 and mean is not, nan if both are 0)."""
        if self.stderr > 0:
            return self.mean / self.stderr
        if self.mean == 0 or math.isnan(self.mean) or math.isnan(self.stderr):
            return math.nan
        return math.copysign(math.inf, self.mean)

    @property
    def df(self) -> int:
        """Degrees of freedom of the stderr (n - 1)."""
        return max(self.n - 1, 0)

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """Two-sided Student-t confidence interval mean +- t_{level, n-1} * stderr."""
        from scipy.stats import t as student_t

        if self.df < 1:
            return (math.nan, math.nan)
        half = float(student_t.ppf(0.5 + level / 2, self.df)) * self.stderr
        return (self.mean - half, self.mean + half)

    @classmethod
    def from_samples(cls, values: np.ndarray) -> Estimate:
        """Mean and std/sqrt(n) of i.i.d. replicates."""
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        n = int(v.size)
        se = float(np.std(v, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        return cls(float(np.mean(v)) if n else math.nan, se, n)

    def to_dict(self) -> dict[str, float | int | None]:
        """Plain dict; a non-finite z (stderr 0, e.g. fixed batches) is written as None (strict JSON)."""
        z = self.z
        return {"mean": self.mean, "stderr": self.stderr, "n": self.n, "z": z if math.isfinite(z) else None}

    def __str__(self) -> str:
        return f"{self.mean:+.3e} ± {self.stderr:.2e} (z={self.z:+.1f})"


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _default_targets(domains: Sequence[str]) -> dict[str, dict[str, float]]:
    targets = {d: {d: 1.0} for d in domains}
    mix = DEFAULT_MIX_NAME if DEFAULT_MIX_NAME not in domains else "uniform_mix"
    targets[mix] = {d: 1.0 / len(domains) for d in domains}
    return targets


def domain_index(domains: Sequence[str], d: str) -> int:
    """The position of domain ``d`` in ``domains``, or a one-sentence error naming the known ones."""
    try:
        return list(domains).index(d)
    except ValueError:
        raise CommuteError(f"unknown domain {d!r}; known domains are {list(domains)}.") from None


def _weights_vector(weights: Mapping[str, float], domains: Sequence[str], what: str) -> np.ndarray:
    unknown = sorted(set(weights) - set(domains))
    if unknown:
        raise CommuteError(f"{what} names unknown domain(s) {unknown}; known domains are {list(domains)}.")
    vec = np.array([float(weights.get(d, 0.0)) for d in domains], dtype=np.float64)
    if not np.all(np.isfinite(vec)):
        raise CommuteError(f"{what} has non-finite weights {dict(weights)}.")
    return vec


def _resolve_targets(targets: TargetsArg, domains: Sequence[str]) -> dict[str, dict[str, float]]:
    if targets is None:
        return _default_targets(domains)
    if isinstance(targets, str):
        targets = [targets]
    default = _default_targets(domains)
    out: dict[str, dict[str, float]] = {}
    if isinstance(targets, Mapping):
        for name, w in targets.items():
            if not isinstance(w, Mapping):
                raise CommuteError(f"target {name!r} must be a dict of domain weights, "
                                   f"got {type(w).__name__}.")
            vec = _weights_vector(w, domains, f"target {name!r}")
            if not np.any(vec):
                raise CommuteError(f"target {name!r} has all-zero weights.")
            out[str(name)] = {d: float(x) for d, x in zip(domains, vec, strict=True) if x != 0.0}
    else:
        for name in targets:
            if name not in default:
                raise CommuteError(f"unknown target {name!r}; use a domain name, {list(default)[-1]!r}, "
                                   "or a dict name -> domain weights.")
            out[name] = default[name]
    if not out:
        raise CommuteError("no targets given; pass None for the defaults (each domain plus the uniform mix).")
    return out


def check_loss(loss: Any, where: str) -> Tensor:
    """The ``loss_fn`` contract, checked: a 0-d tensor with a gradient path to the parameters, finite;
    otherwise one sentence (``where``: what the batch was, e.g. "domain 'en'")."""
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise CommuteError(f"loss_fn must return a 0-d tensor (the mean loss), got {shape}.")
    if not loss.requires_grad:
        raise CommuteError("loss_fn's result does not depend on the model's parameters (is it computed under "
                           "torch.no_grad() or detached?).")
    if not torch.isfinite(loss):
        raise CommuteError(f"loss_fn returned a non-finite loss ({loss.item()}) on {where}.")
    return loss


def check_token_ids(vocab_size: int | None, what: str, batch: Any) -> None:
    """Token ids outside the model's vocabulary give one sentence, not an IndexError in the embedding (or a
    device-side assert on CUDA). Checked for integer ``input_ids`` (a bare tensor, a dict entry or an
    attribute) when the model has ``config.vocab_size``; one min/max per batch."""
    if vocab_size is None:
        return
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else getattr(batch, "input_ids", batch)
    if not isinstance(ids, Tensor) or ids.numel() == 0 or ids.dtype == torch.bool:
        return
    if ids.dtype.is_floating_point or ids.dtype.is_complex:
        return
    lo, hi = (int(x) for x in torch.aminmax(ids))
    if lo < 0 or hi >= vocab_size:
        bad = hi if hi >= vocab_size else lo
        raise CommuteError(f"{what} has token id {bad}, outside the model's vocabulary of {vocab_size} "
                           f"(ids 0..{vocab_size - 1}); tokenise it with the model's tokenizer.")


def _to_device(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move tensors (also inside dicts, lists, tuples) to ``device``; floating tensors take ``dtype``."""
    if isinstance(batch, Tensor):
        if batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device=device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device, dtype) for v in batch))
    if isinstance(batch, tuple):
        return tuple(_to_device(v, device, dtype) for v in batch)
    if isinstance(batch, list):
        return [_to_device(v, device, dtype) for v in batch]
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):  # e.g. commute.data.Batch
        return dataclasses.replace(batch, **{f.name: _to_device(getattr(batch, f.name), device, dtype)
                                             for f in dataclasses.fields(batch) if f.init})
    if hasattr(batch, "to") and callable(batch.to):  # e.g. transformers.BatchEncoding
        return batch.to(device)
    return batch


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """<a, b> of two parameter-shaped lists: :func:`commute.bracket.tree_dot` accumulated in float64
    (products in the model's dtype)."""
    return float(tree_dot(dict(enumerate(a)), dict(enumerate(b)), dtype=torch.float64))


def mean_loss_grad(batches: Sequence[Any], loss_of: Callable[[int, Any], Tensor],
                   grad: Callable[[Tensor], Sequence[Tensor | None]],
                   like: Sequence[Tensor]) -> tuple[list[Tensor], float]:
    """(∇ mean_b L(b), mean_b L(b)) over fixed ``batches``: ``loss_of(i, batch)`` the i-th batch's loss,
    ``grad`` its gradient (None for an unused leaf), ``like`` the leaves' shapes. Zeros and 0.0 without
    batches."""
    acc = [torch.zeros_like(x) for x in like]
    total = 0.0
    for i, batch in enumerate(batches):
        loss = loss_of(i, batch)
        total += float(loss.detach()) / len(batches)
        for a, g in zip(acc, grad(loss), strict=True):
            if g is not None:
                a.add_(g.detach(), alpha=1.0 / len(batches))
    return acc, total


def combine(ws: np.ndarray,
            vecs: Sequence[Sequence[Tensor]] | Mapping[int, Sequence[Tensor]]) -> list[Tensor]:
    """sum_k ws[k] * vecs[k] of parameter-shaped lists; ``vecs`` a sequence (k its position) or a mapping
    k -> list over the k present."""
    items = list(vecs.items()) if isinstance(vecs, Mapping) else list(enumerate(vecs))
    out = [torch.zeros_like(t) for t in items[0][1]]
    for k, vec in items:
        if ws[k] != 0.0:
            for o, t in zip(out, vec, strict=True):
                o.add_(t, alpha=float(ws[k]))
    return out


# --------------------------------------------------------------------------------------------------
# the estimator
# --------------------------------------------------------------------------------------------------
def check_target_data(target_data: Mapping[str, Sequence[Any]] | None,
                      needed: Sequence[str]) -> dict[str, list[Any]] | None:
    """``target_data`` checked: a non-empty list of batches for every domain a target needs (None: off)."""
    if target_data is None:
        return None
    if not isinstance(target_data, Mapping):
        raise CommuteError("target_data must map each target domain to a list of batches.")
    out = {}
    for d in needed:
        x = target_data.get(d)
        if isinstance(x, (str, bytes)) or not isinstance(x, Sequence) or len(x) == 0:
            raise CommuteError(f"target_data needs a non-empty list of batches for domain {d!r}.")
        out[d] = list(x)
    return out


class BracketEstimator:
    """Unbiased estimates of P(L_i, L_j; L) for all ordered domain pairs and targets, with a stderr.

    Args:
        model: any ``nn.Module`` (e.g. a Hugging Face ``GPT2LMHeadModel``). It is never moved or cast: batches
            are moved to the device of its first parameter, floating batch tensors cast to its dtype. During
            :meth:`estimate` it is put in ``eval()`` mode (dropout off, so the losses are deterministic
            functions of the parameters) and its previous mode is restored afterwards. Its ``.grad`` fields
            are not touched (everything goes through ``torch.autograd.grad``).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the contract:

            * returns a 0-d tensor, the **mean** loss over the batch's examples (tokens), so that its
              expectation over random batches of a domain is that domain's population loss L_k;
            * computed by calling ``model`` on the (already moved) batch, twice differentiable with respect
              to the parameters (avoid in-place tricks on activations, ``torch.no_grad``, ``.detach()``);
            * deterministic given the batch and the parameters; no ``backward()``, no parameter updates.

            For float64 checks compute the cross-entropy yourself (Hugging Face's loss casts logits to
            float32; docs/design.md §2), e.g. ``commute.model.lm_loss``.
        domains: name -> iterable of batches (a tensor, or a dict / tuple / list of tensors). The batches of
            a domain must be independent random draws (e.g. ``TokenizedDomain.batches(...)``), which is what
            makes the estimate unbiased. Each :meth:`estimate` calls ``iter()`` on every iterable again: an
            infinite iterator/generator continues where it stopped, a list starts over.
        parameters: the parameters to take the bracket over (default: every parameter with
            ``requires_grad``, tied tensors counted once, as ``model.parameters()`` lists them).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        domains: Mapping[str, Iterable[Any]],
        *,
        parameters: Iterable[nn.Parameter] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise CommuteError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not callable(loss_fn):
            raise CommuteError("loss_fn must be callable as loss_fn(model, batch) -> scalar mean loss.")
        if len(domains) < 2:
            raise CommuteError(f"the bracket needs at least two domains, got {list(domains)}.")
        self.model = model
        self.loss_fn = loss_fn
        self.domains: dict[str, Iterable[Any]] = {str(k): v for k, v in domains.items()}
        ps = list(model.parameters()) if parameters is None else list(parameters)
        seen: set[int] = set()
        self.params: list[nn.Parameter] = []
        for p in ps:  # one copy per tensor (tied GPT-2 embeddings, docs/design.md §2)
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        if not self.params:
            raise CommuteError("the model has no parameters with requires_grad=True to take the bracket "
                               "over.")
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        self.vocab_size: int | None = int(vocab) if isinstance(vocab, int) and vocab > 0 else None
        self.n_hvp = 0  # lifetime counters
        self.n_grad = 0

    @property
    def domain_names(self) -> tuple[str, ...]:
        return tuple(self.domains)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)

    # ---- one batch ---------------------------------------------------------------------------------
    def _loss(self, name: str, it: Iterator[Any], index: int) -> Tensor:
        try:
            batch = next(it)
        except StopIteration:
            raise CommuteError(f"domain {name!r} ran out of batches after {index}; give an infinite iterator "
                               "or more batches, or ask for fewer.") from None
        batch = _to_device(batch, self.device, self.dtype)
        self._check_token_ids(name, batch)
        return check_loss(self.loss_fn(self.model, batch), f"domain {name!r}")

    def _check_token_ids(self, name: str, batch: Any) -> None:
        check_token_ids(self.vocab_size, f"domain {name!r}", batch)

    def _no_path(self) -> CommuteError:
        return CommuteError("loss_fn's result has no gradient path to the parameters the bracket is taken "
                            "over (does the loss use them, or is the model's output detached?).")

    def _grad(self, loss: Tensor) -> list[Tensor]:
        gs = torch.autograd.grad(loss, self.params, allow_unused=True)
        if all(g is None for g in gs):
            raise self._no_path()
        self.n_grad += 1
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, gs, strict=True)]

    def _hvps(self, loss: Tensor, vectors: Sequence[Sequence[Tensor]]) -> list[list[Tensor]]:
        """H v for every v in ``vectors``, one double-backward graph (create_graph once, retain_graph)."""
        gs = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        if all(g is None for g in gs):
            raise self._no_path()
        self.n_hvp += len(vectors)
        return graph_hvps(gs, self.params, vectors)

    def _mean_grad(self, name: str, it: Iterator[Any], n: int, start: int, losses: list[float],
                   tick: Callable[[], None]) -> list[Tensor]:
        acc = [torch.zeros_like(p) for p in self.params]
        for b in range(n):
            loss = self._loss(name, it, start + b)
            losses.append(float(loss.detach()))
            for a, g in zip(acc, self._grad(loss), strict=True):
                a.add_(g)
            tick()
        for a in acc:
            a.div_(n)
        return acc

    # ---- the estimate ------------------------------------------------------------------------------
    def estimate(
        self,
        n_grad_batches: int = 100,
        n_hvp_batches: int = 100,
        targets: TargetsArg = None,
        *,
        n_groups: int = 10,
        mode: Mode = "auto",
        target_data: Mapping[str, Sequence[Any]] | None = None,
        progress: bool = False,
        distributed: bool = False,
    ) -> BracketReport:
        """Estimate P(L_i, L_j; L) for every ordered pair of domains and every target.

        Args:
            n_grad_batches: gradient batches drawn from *each* domain (split into ``n_groups`` groups, each
                into an A half for the target gradient and a B half for the gradient inside the bracket;
                the paper used 100).
            n_hvp_batches: Hessian batches drawn from *each* domain, split into ``n_groups`` groups.
                Counts are floored to multiples of 2G and G; the report states the numbers used.
            targets: None for each domain's own loss plus the uniform mixture (named ``"mix"``), a list of
                those names, or a dict name -> domain weights, e.g. ``{"en": {"en": 1.0}, "avg": {"en": .5,
                "ru": .5}}`` (a target L = sum_k c_k L_k).
            n_groups: G independent groups; stderr = std over groups / sqrt(G) (see the module docstring).
            mode: ``"pairs"`` (K(K-1) HVPs per HVP batch, any target afterwards), ``"targets"`` (K*M HVPs),
                or ``"auto"`` for the fewer (``"targets"`` when ``target_data`` lacks a domain).
            target_data: domain -> a fixed list of batches (a held-out set: the loss an evaluation
                reports). The target's L_k is then the mean loss over those batches and g_L its exact
                gradient, computed once and the same in every group (no A half: all of a group's gradient
                batches go to the B half); every domain of a target is needed, every domain in ``"pairs"``
                mode. The stderr is then conditional on that set, which is the target itself.
            progress: show a rich progress bar on stderr.
            distributed: split the groups over the processes of a torchrun run (every rank must call this
                with the same model weights, domains and arguments; the process group is joined from the
                torchrun environment if it is not yet, see :mod:`commute.distributed`). Rank r computes
                groups r, r+W, ... on the model it was given (the unwrapped module: DDP has no double
                backward), drawing and discarding the other groups' batches so that every group sees the
                batches it would see on one process; the per-group samples are then summed over ranks
                (the zeros of skipped groups add exactly), so every rank returns the one-process report
                (``seconds``: the slowest rank's; ``meta["world_size"]`` added). On one process this is
                the plain estimate.

        Each batch of a domain is used exactly once: in group g, for each domain, first the A batches,
        then the B batches, then the HVP batches (with ``target_data``, B takes the A batches' place).
        """
        names = self.domain_names
        K = len(names)
        named_targets = _resolve_targets(targets, names)
        M = len(named_targets)
        if mode == "auto":  # the fewer HVPs; "targets" too when target_data covers only the targets' domains
            mode = ("targets" if K * M < K * (K - 1) or (target_data is not None and isinstance(
                target_data, Mapping) and not set(names) <= set(target_data)) else "pairs")
        if mode not in ("pairs", "targets"):
            raise CommuteError(f"unknown mode {mode!r}; use 'auto', 'pairs' or 'targets'.")
        G = int(n_groups)
        if G < 2:
            raise CommuteError(f"n_groups must be at least 2 to give a standard error, got {n_groups}.")
        n_half = int(n_grad_batches) // (2 * G)
        n_h = int(n_hvp_batches) // G
        if n_half < 1 or n_h < 1:
            raise CommuteError(f"with n_groups={G}, need n_grad_batches >= {2 * G} and n_hvp_batches >= {G} "
                               f"(got {n_grad_batches} and {n_hvp_batches}); lower n_groups or add batches.")
        W = np.stack([_weights_vector(w, names, f"target {t!r}") for t, w in named_targets.items()])  # [M, K]
        basis = np.eye(K) if mode == "pairs" else W  # the targets stored per group
        fixed = check_target_data(target_data, [d for k, d in enumerate(names) if np.any(basis[:, k] != 0)])
        T = basis.shape[0]
        p_groups = np.zeros((G, K, K, T))
        loss_groups = np.zeros((G, K))
        iters = {name: iter(self.domains[name]) for name in names}
        used = dict.fromkeys(names, 0)
        hvp0, grad0 = self.n_hvp, self.n_grad
        t0 = time.perf_counter()
        world = estimate_world(distributed, self.device)
        split = GroupSplit(G, world)
        per_group = 2 * n_half + n_h  # batches of each domain per group

        modes = [(m, m.training) for m in self.model.modules()]
        with ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(math_attention())
            bar = Progress(f"bracket ({mode}, K={K})", len(split) * K * per_group,
                           enabled=progress and world.main, unit="batches", transient=True)
            stack.enter_context(bar)
            self.model.eval()
            stack.callback(_restore_modes, modes)
            with split.share():  # an error here reaches the other ranks at split.settle
                n_grad0 = self.n_grad
                held = None if fixed is None else self._held_out_gradients(names, fixed)
                if not world.main:  # every rank computes the held-out gradients; count them once
                    self.n_grad = n_grad0
                for g in range(G):
                    if g not in split:  # another rank's group: its batches are drawn and left to that rank
                        self._skip(names, iters, used, per_group)
                    else:
                        p_groups[g], loss_groups[g] = self._group(names, iters, used, n_half, n_h, mode, W,
                                                                  T, bar.advance, held)
        if world.enabled:
            split.settle("bracket estimate")
            p_groups = world.all_sum(p_groups)
            loss_groups = world.all_sum(loss_groups)
        if not np.all(np.isfinite(p_groups)):
            raise CommuteError("the bracket estimate is not finite (the loss is finite, so gradients or "
                               "Hessian-vector products overflowed); check the model's state and dtype.")
        hvp_per_batch = K * (K - 1) if mode == "pairs" else K * M
        n_hvp, n_grad = self.n_hvp - hvp0, self.n_grad - grad0
        seconds = time.perf_counter() - t0
        meta: dict[str, Any] = {"dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
                                "n_params": self.n_params}
        if fixed is not None:
            meta["target_data"] = {d: len(x) for d, x in fixed.items()}
        if world.enabled:
            n_hvp, n_grad = (int(x) for x in world.all_sum([n_hvp, n_grad]))
            seconds = float(world.all_max([seconds])[0])
            meta["world_size"] = world.world_size
        assert n_hvp == G * n_h * hvp_per_batch, (n_hvp, G, n_h, hvp_per_batch)
        return BracketReport(
            domains=names,
            targets=named_targets,
            basis_weights=basis,
            p_groups=p_groups,
            loss_groups=loss_groups,
            n_groups=G,
            grad_batches=2 * n_half * G,
            hvp_batches=n_h * G,
            mode=mode,
            n_hvp=n_hvp,
            hvp_per_batch=hvp_per_batch,
            n_grad=n_grad,
            seconds=seconds,
            meta=meta,
        )

    def _skip(self, names: Sequence[str], iters: Mapping[str, Iterator[Any]], used: dict[str, int],
              n: int) -> None:
        """Draw (and drop) the next ``n`` batches of every domain: a group another rank computes."""
        for name in names:
            for _ in range(n):
                try:
                    next(iters[name])
                except StopIteration:
                    raise CommuteError(f"domain {name!r} ran out of batches after {used[name]}; give an "
                                       "infinite iterator or more batches, or ask for fewer.") from None
                used[name] += 1

    def _held_out_gradients(self, names: Sequence[str], fixed: Mapping[str, list[Any]]) -> list[list[Tensor]]:
        """The exact gradient of each domain's mean loss over its ``target_data`` batches (zeros where a
        domain is in no target)."""
        def loss_of(name: str) -> Callable[[int, Any], Tensor]:
            def one(i: int, batch: Any) -> Tensor:
                where = f"target_data batch {i} of domain {name!r}"
                batch = _to_device(batch, self.device, self.dtype)
                check_token_ids(self.vocab_size, where, batch)
                return check_loss(self.loss_fn(self.model, batch), where)
            return one

        return [mean_loss_grad(fixed.get(name, []), loss_of(name), self._grad, self.params)[0]
                for name in names]

    def _group(self, names: Sequence[str], iters: Mapping[str, Iterator[Any]], used: dict[str, int],
               n_half: int, n_h: int, mode: str, W: np.ndarray, T: int, advance: Callable[[], None],
               held: list[list[Tensor]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One group's P samples ``[K, K, T]`` and mean gradient-batch losses ``[K]``; ``held``: the target
        gradients from ``target_data`` (then every gradient batch goes to B)."""
        K, M = len(names), W.shape[0]
        loss_g = np.zeros(K)
        A, B = [], []
        for k, name in enumerate(names):
            losses: list[float] = []
            if held is None:
                A.append(self._mean_grad(name, iters[name], n_half, used[name], losses, advance))
                B.append(self._mean_grad(name, iters[name], n_half, used[name] + n_half, losses, advance))
            else:
                A.append(held[k])
                B.append(self._mean_grad(name, iters[name], 2 * n_half, used[name], losses, advance))
            used[name] += 2 * n_half
            loss_g[k] = float(np.mean(losses))
        # S[t, j, i] = mean_h  c_t-target-gradient^A . H_j^h g_i^B  (i != j)
        S = np.zeros((T, K, K))
        targ = [combine(W[m], A) for m in range(M)] if mode == "targets" else []
        for _ in range(n_h):
            for j, name in enumerate(names):
                loss = self._loss(name, iters[name], used[name])
                used[name] += 1
                others = [i for i in range(K) if i != j]
                if mode == "pairs":  # H_j B_i for i != j, dotted with every A_k
                    for i, hv in zip(others, self._hvps(loss, [B[i] for i in others]), strict=True):
                        for t in range(T):
                            S[t, j, i] += _dot(A[t], hv)
                else:  # H_j (sum_k c_mk A_k) for every target m, dotted with every B_i
                    for t, hv in enumerate(self._hvps(loss, targ)):
                        for i in others:
                            S[t, j, i] += _dot(hv, B[i])
                del loss
                advance()
        S /= n_h
        # P(i, j; t) = g_t . H_j g_i - g_t . H_i g_j
        return np.einsum("tji->ijt", S) - np.einsum("tij->ijt", S), loss_g

    def tournament(
        self,
        target: str | Mapping[str, float] | None = None,
        n_grad_batches: int = 100,
        n_hvp_batches: int = 100,
        *,
        n_groups: int = 10,
        name: str | None = None,
        progress: bool = False,
        distributed: bool = False,
    ) -> TournamentReport:
        """The order tournament for one target L: every domain's score S_i = sum_j P(L_i, L_j; L).

        Costs K HVPs per HVP batch (one per domain Hessian, applied to the shared target gradient g_L^A;
        see the module docstring for S_i = g_i . U - u_i . G_sum), against K(K-1) for the K(K-1) pairs one
        by one; the factors of every product still come from independent batches, so each S_i is unbiased,
        and its stderr comes from the same ``n_groups`` independent groups as :meth:`estimate`'s.

        Args:
            target: a domain name, the uniform mixture's name (``"mix"``; the default ``None``), or a dict
                of domain weights (a target L = sum_k c_k L_k, e.g. the training mix at this step).
            n_grad_batches, n_hvp_batches, n_groups, progress, distributed: as for :meth:`estimate`.
            name: the target's name in the report (default: its name, or ``"target"`` for a dict).

        Returns a :class:`TournamentReport`: ``report.order`` is the suggested training order (first to
        last, ascending S_i) and ``report.score(d)`` each score with its stderr; the pairwise P(i, j; L)
        of this target come with it (``report.P(i, j)``), at no extra HVP.
        """
        label, weights = _one_target(target, self.domain_names, name)
        rep = self.estimate(n_grad_batches, n_hvp_batches, targets={label: weights}, n_groups=n_groups,
                            mode="targets", progress=progress, distributed=distributed)
        assert rep.hvp_per_batch == len(self.domain_names)
        return rep.tournament(label)


def _one_target(target: str | Mapping[str, float] | None, domains: Sequence[str],
                name: str | None) -> tuple[str, dict[str, float]]:
    """A target argument (None: the uniform mix; a name; or a dict of weights) as (name, weights)."""
    if target is None or isinstance(target, str):
        defaults = _default_targets(domains)
        label = list(defaults)[-1] if target is None else target  # the uniform mix is the last default
        weights = _resolve_targets([label], domains)[label]
        return (name or label), weights
    label = name or "target"
    return label, _resolve_targets({label: target}, domains)[label]


def _restore_modes(modes: Sequence[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


# --------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------
@dataclass
class BracketReport(JsonRoundTrip):
    """Result of :meth:`BracketEstimator.estimate`.

    The per-group estimates are kept (``p_groups[g, i, j, t]`` = P(domain i, domain j; basis target t) in
    group g; ``basis_weights[t]`` are the domain weights of basis target t), so every derived quantity gets
    its stderr from the same groups and thereby the right covariances. In ``"pairs"`` mode the basis is each
    domain's own loss, so any target sum_k c_k L_k can be asked for afterwards; in ``"targets"`` mode the
    basis is the requested targets and any target in their span can be asked for.
    """

    json_kind = "bracket report"

    domains: tuple[str, ...]
    targets: dict[str, dict[str, float]]
    basis_weights: np.ndarray
    p_groups: np.ndarray
    loss_groups: np.ndarray
    n_groups: int
    grad_batches: int
    hvp_batches: int
    mode: str
    n_hvp: int
    hvp_per_batch: int
    n_grad: int = 0
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- lookups -----------------------------------------------------------------------------------
    def _index(self, d: str) -> int:
        return domain_index(self.domains, d)

    def _coefficients(self, target: str | Mapping[str, float]) -> np.ndarray:
        """Coefficients a with target weights = a @ basis_weights."""
        if isinstance(target, str):
            if target not in self.targets:
                raise CommuteError(f"unknown target {target!r}; estimated targets are {list(self.targets)} "
                                   "(or pass a dict of domain weights).")
            target = self.targets[target]
        c = _weights_vector(target, self.domains, f"target {dict(target)}")
        a, *_ = np.linalg.lstsq(self.basis_weights.T, c, rcond=None)
        if not np.allclose(a @ self.basis_weights, c, rtol=1e-9, atol=1e-12):
            raise CommuteError(f"target {dict(target)} is not a combination of the estimated targets "
                               f"{list(self.targets)}; estimate it (or use mode='pairs').")
        return a

    def p_samples(self, i: str, j: str, target: str | Mapping[str, float]) -> np.ndarray:
        """The G per-group estimates of P(L_i, L_j; target)."""
        return self.p_groups[:, self._index(i), self._index(j), :] @ self._coefficients(target)

    def P(self, i: str, j: str, target: str | Mapping[str, float]) -> Estimate:
        """P(L_i, L_j; L) = g_L . H_j g_i - g_L . H_i g_j (paper eq. 7, docs/design.md sign) with its stderr.

        ``target`` is a target name (see ``report.targets``) or a dict of domain weights. P > 0: training
        i then j raises L compared with mixing them (Theorem 3.1: by (dt^2/2) P under gradient flow).
        """
        return Estimate.from_samples(self.p_samples(i, j, target))

    def pxy_samples(self, i: str, j: str, target: str | Mapping[str, float],
                    weights: Mapping[str, float] | None = None) -> np.ndarray:
        """The G per-group estimates of P(X, Y; L), X = L_i − L_j, Y = Σ_k w_k L_k (Cor. 3.2a), by
        bilinearity P(X, Y; L) = Σ_k w_k [P(L_i, L_k; L) − P(L_j, L_k; L)] (= P(L_i, L_j; L) for two
        domains whatever w). ``weights``: the mix w (default uniform over all domains)."""
        ii, jj = self._index(i), self._index(j)
        K = len(self.domains)
        w = (np.full(K, 1.0 / K) if weights is None
             else _weights_vector(weights, self.domains, "weights"))
        per_pair = self.p_groups @ self._coefficients(target)  # [G, K, K]: P(k, l; target) per group
        return np.einsum("k,gk->g", w, per_pair[:, ii, :] - per_pair[:, jj, :])

    def loss(self, domain: str) -> Estimate:
        """The domain's mean loss over the gradient batches used (not a held-out evaluation)."""
        return Estimate.from_samples(self.loss_groups[:, self._index(domain)])

    def predict_excess_loss(
        self,
        i: str,
        j: str,
        target: str | Mapping[str, float],
        delta_w: float,
        steps: int,
        lr: float,
        weights: Mapping[str, float] | None = None,
    ) -> Estimate:
        """Leading-order excess loss of a reordering intervention with plain SGD steps (docs/design.md §1).

        The intervention (paper eq. 9/10, Cor. 3.2a): starting from the constant mix ``weights`` w, use
        w_i + delta_w, w_j - delta_w for ``steps`` = T steps, then w_i - delta_w, w_j + delta_w for T steps;
        compare the target loss L with 2T steps at w. With learning rate gamma (eps = gamma T):

            EL ~= delta_w * eps^2 * P(X, Y; L),   X = L_i - L_j,  Y = sum_k w_k L_k,
            P(X, Y; L) = sum_k w_k [P(L_i, L_k; L) - P(L_j, L_k; L)]   (bilinearity),

        which for two domains is gamma^2 delta_w T^2 P(L_i, L_j; L) whatever w is. The stderr is computed
        from the same combination per group, so it includes the covariances of the P's combined.

        Only the antisymmetric part (EL^ij - EL^ji) / 2 is predicted: with discrete steps a term of order
        gamma^2 T delta_w^2 adds to both orders. The expansion holds as gamma T lambda_max -> 0; for Adam or
        long horizons trust the sign, not the magnitude.

        Args:
            weights: the base mix w (default uniform over all domains); w_i, w_j +- delta_w must stay
                in [0, 1].
        """
        K = len(self.domains)
        w = (np.full(K, 1.0 / K) if weights is None
             else _weights_vector(weights, self.domains, "weights"))
        if np.any(w < 0) or abs(w.sum() - 1.0) > 1e-6:
            raise CommuteError(f"weights must be non-negative and sum to 1, got {w.tolist()}.")
        if steps < 0 or lr <= 0:
            raise CommuteError(f"need steps >= 0 and lr > 0, got steps={steps}, lr={lr}.")
        check_delta_w(dict(zip(self.domains, w.tolist(), strict=True)), i, j, delta_w)
        pxy = self.pxy_samples(i, j, target, dict(zip(self.domains, w.tolist(), strict=True)))
        return Estimate.from_samples(intervention_excess(pxy, delta_w, steps, lr))

    def tournament(self, target: str | Mapping[str, float], name: str | None = None) -> TournamentReport:
        """The order tournament of ``target`` from this report's groups (no new HVP): every domain's score
        S_i = sum_j P(L_i, L_j; L) with its stderr (see :class:`TournamentReport`).

        ``target`` is an estimated target's name or a dict of domain weights in the span of the estimated
        targets (any dict in ``"pairs"`` mode), e.g. the training mix at the checkpoint's step.
        """
        a = self._coefficients(target)
        if isinstance(target, str):
            label, weights = name or target, dict(self.targets[target])
        else:
            c = _weights_vector(target, self.domains, f"target {dict(target)}")
            label = name or "target"
            weights = {d: float(x) for d, x in zip(self.domains, c, strict=True) if x != 0.0}
        return TournamentReport(
            domains=self.domains,
            target=label,
            target_weights=weights,
            p_groups=self.p_groups @ a,
            n_groups=self.n_groups,
            grad_batches=self.grad_batches,
            hvp_batches=self.hvp_batches,
            n_hvp=self.n_hvp,
            hvp_per_batch=self.hvp_per_batch,
            mode=self.mode,
            seconds=self.seconds,
        )

    # ---- (de)serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: settings, the per-group samples, and a summary of every P (pair i < j)."""
        summary = []
        for a in range(len(self.domains)):
            for b in range(a + 1, len(self.domains)):
                i, j = self.domains[a], self.domains[b]
                for t in self.targets:
                    summary.append({"i": i, "j": j, "target": t, **self.P(i, j, t).to_dict()})
        return {
            "format": "commute.bracket_report/1",
            "domains": list(self.domains),
            "targets": self.targets,
            "mode": self.mode,
            "n_groups": self.n_groups,
            "grad_batches": self.grad_batches,
            "hvp_batches": self.hvp_batches,
            "n_hvp": self.n_hvp,
            "hvp_per_batch": self.hvp_per_batch,
            "n_grad": self.n_grad,
            "seconds": self.seconds,
            "meta": self.meta,
            "P": summary,
            "losses": {d: self.loss(d).to_dict() for d in self.domains},
            "basis_weights": self.basis_weights.tolist(),
            "p_groups": self.p_groups.tolist(),
            "loss_groups": self.loss_groups.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BracketReport:
        """Inverse of :meth:`to_dict` (the summary is recomputed from the samples)."""
        try:
            return cls(
                domains=tuple(d["domains"]),
                targets={k: dict(v) for k, v in d["targets"].items()},
                basis_weights=np.asarray(d["basis_weights"], dtype=np.float64),
                p_groups=np.asarray(d["p_groups"], dtype=np.float64),
                loss_groups=np.asarray(d["loss_groups"], dtype=np.float64),
                n_groups=int(d["n_groups"]),
                grad_batches=int(d["grad_batches"]),
                hvp_batches=int(d["hvp_batches"]),
                mode=str(d["mode"]),
                n_hvp=int(d["n_hvp"]),
                hvp_per_batch=int(d["hvp_per_batch"]),
                n_grad=int(d.get("n_grad", 0)),
                seconds=float(d.get("seconds", 0.0)),
                meta=dict(d.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CommuteError(f"not a bracket report (missing or bad field: {e}).") from None

    # ---- display -----------------------------------------------------------------------------------
    def _rows(self) -> list[tuple[str, str, list[Estimate]]]:
        rows = []
        for a in range(len(self.domains)):
            for b in range(a + 1, len(self.domains)):
                i, j = self.domains[a], self.domains[b]
                rows.append((i, j, [self.P(i, j, t) for t in self.targets]))
        return rows

    def _footer(self) -> str:
        return (f"{self.n_groups} groups; per domain {self.grad_batches} gradient + {self.hvp_batches} HVP "
                f"batches; {self.n_hvp} HVPs ({self.hvp_per_batch} per HVP batch, mode {self.mode!r}); "
                f"{self.seconds:.1f} s. stderr = std over groups / sqrt({self.n_groups}). "
                "P(i, j; L) > 0: i then j raises L (prefer j then i).")

    def __str__(self) -> str:
        head = ["P(i, j; L)"] + list(self.targets)
        body = [[f"{i} -> {j}"] + [f"{e.mean:+.3e} ± {e.stderr:.1e} (z={e.z:+.1f})" for e in ests]
                for i, j, ests in self._rows()]
        widths = [max(len(r[c]) for r in [head, *body]) for c in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" if c == 0 else f"{{:>{w}}}" for c, w in enumerate(widths))
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in body]
        return "\n".join(lines + ["", self._footer()])

    def rich_table(self) -> Any:
        """The same table as ``str(report)`` as a ``rich.table.Table`` (|z| >= 2 in bold)."""
        from rich.table import Table

        table = Table(title="Lie-bracket projections P(i, j; L)", caption=self._footer(),
                      caption_justify="left")
        table.add_column("i -> j")
        for t in self.targets:
            table.add_column(f"L = {t}", justify="right")
        for i, j, ests in self._rows():
            cells = []
            for e in ests:
                s = f"{e.mean:+.3e} ± {e.stderr:.1e} (z={e.z:+.1f})"
                cells.append(f"[bold]{s}[/bold]" if abs(e.z) >= 2 else s)
            table.add_row(f"{i} -> {j}", *cells)
        return table


# --------------------------------------------------------------------------------------------------
# the order tournament
# --------------------------------------------------------------------------------------------------
@dataclass
class TournamentReport:
    """Result of :meth:`BracketEstimator.tournament` (or :meth:`BracketReport.tournament`): for one target L,
    every domain's tournament score S_i = sum_j P(L_i, L_j; L) with its stderr.

    Meaning (Theorem 3.1, docs/design.md §1 sign): L(theta_ij) - L(theta_ji) = dt^2 P(L_i, L_j; L) + O(dt^3),
    so dt^2 S_i is how much higher L ends when domain i is trained before every other domain instead of after
    it, summed over the others. S_i > 0: i belongs late; S_i < 0: early. :attr:`order` sorts the domains by
    ascending S_i: the suggested training order, first to last. It is local (gamma T lambda_max << 1), and
    only as certain as the scores' z say.

    For K domains trained one after another for dt each, against K dt on their uniform mix, L changes by
    (dt^2 / 2) * sum_{a<b} P(L_{o_a}, L_{o_b}; L) + O(dt^3) (the K-domain form of Theorem 3.1);
    :meth:`order_score` gives that sum for any order o. Sorting by S_i minimises it exactly when the pairwise
    P are transitive (P(i, j) = c_i - c_j); with cyclic parts (K >= 3) it is the Borda heuristic, so compare
    orders with :meth:`order_score` when it matters.

    ``p_groups[g, i, j]`` = P(domain i, domain j; L) in group g (antisymmetric in i, j).
    """

    domains: tuple[str, ...]
    target: str
    target_weights: dict[str, float]
    p_groups: np.ndarray
    n_groups: int
    grad_batches: int
    hvp_batches: int
    n_hvp: int
    hvp_per_batch: int
    mode: str = "targets"
    seconds: float = 0.0

    def _index(self, d: str) -> int:
        return domain_index(self.domains, d)

    @property
    def score_groups(self) -> np.ndarray:
        """``[G, K]``: S_i per group (row sums of :attr:`p_groups`; the diagonal is 0)."""
        return self.p_groups.sum(axis=2)

    def score(self, domain: str) -> Estimate:
        """S_i = sum_j P(L_i, L_j; L) with its stderr over the groups."""
        return Estimate.from_samples(self.score_groups[:, self._index(domain)])

    @property
    def scores(self) -> dict[str, Estimate]:
        """Every domain's score, in the domains' order."""
        return {d: self.score(d) for d in self.domains}

    @property
    def order(self) -> list[str]:
        """Suggested training order, first to last: ascending S_i (ties keep the domains' order)."""
        means = self.score_groups.mean(axis=0)
        return [self.domains[k] for k in sorted(range(len(self.domains)), key=lambda k: means[k])]

    def P(self, i: str, j: str) -> Estimate:
        """P(L_i, L_j; L) for this target, from the same groups."""
        return Estimate.from_samples(self.p_groups[:, self._index(i), self._index(j)])

    def order_score(self, order: Sequence[str]) -> Estimate:
        """sum_{a<b} P(L_{o_a}, L_{o_b}; L) of an order o of all the domains (lower is better for L): times
        dt^2 / 2, the leading-order change of L when they are trained in that order for dt each instead of
        K dt on their uniform mix."""
        idx = [self._index(d) for d in order]
        if sorted(idx) != list(range(len(self.domains))):
            raise CommuteError(f"an order must name every domain once, got {list(order)}; the domains are "
                               f"{list(self.domains)}.")
        vals = sum(self.p_groups[:, idx[a], idx[b]] for a in range(len(idx)) for b in range(a + 1, len(idx)))
        return Estimate.from_samples(np.asarray(vals, dtype=np.float64))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: the scores, the order, its order score, the settings and the per-group samples."""
        return {
            "format": "commute.tournament/1",
            "target": self.target,
            "target_weights": self.target_weights,
            "domains": list(self.domains),
            "order": self.order,
            "scores": {d: e.to_dict() for d, e in self.scores.items()},
            "order_score": self.order_score(self.order).to_dict(),
            "n_groups": self.n_groups,
            "grad_batches": self.grad_batches,
            "hvp_batches": self.hvp_batches,
            "n_hvp": self.n_hvp,
            "hvp_per_batch": self.hvp_per_batch,
            "mode": self.mode,
            "seconds": self.seconds,
            "p_groups": self.p_groups.tolist(),
        }

    def _footer(self) -> str:
        return (f"S_i = sum_j P(i, j; L): > 0 means training i before the others raises L (train it late). "
                f"Suggested order, first to last: {' -> '.join(self.order)}. {self.n_groups} groups; "
                f"{self.n_hvp} HVPs ({self.hvp_per_batch} per HVP batch); {self.seconds:.1f} s.")

    def __str__(self) -> str:
        rows = [(d, str(e)) for d, e in self.scores.items()]
        w = max(len(d) for d, _ in rows + [("domain", "")])
        lines = [f"order tournament, L = {self.target}", f"{'domain':<{w}}  S_i"]
        lines += [f"{d:<{w}}  {e}" for d, e in rows]
        return "\n".join(lines + ["", self._footer()])

    def rich_table(self) -> Any:
        """The scores as a ``rich.table.Table``, in the suggested order (|z| >= 2 in bold)."""
        from rich.table import Table

        table = Table(title=f"Order tournament, L = {self.target}", caption=self._footer(),
                      caption_justify="left")
        for col in ("#", "domain", "S_i = Σ_j P(i, j; L)"):
            table.add_column(col, justify="left" if col == "domain" else "right")
        for rank, d in enumerate(self.order, 1):
            e = self.score(d)
            cell = f"{e.mean:+.3e} ± {e.stderr:.1e} (z={e.z:+.1f})"
            table.add_row(str(rank), d, f"[bold]{cell}[/bold]" if abs(e.z) >= 2 else cell)
        return table
