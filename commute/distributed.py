"""More than one process: the torchrun environment, the process group, and the few collectives we use.

``torchrun --nproc_per_node N --no-python commute train CONFIG`` (or a script calling ``commute.train.train``
under torchrun) sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`setup` reads them and initialises the
default process group once (``nccl`` when the run's device is CUDA, each process on ``cuda:LOCAL_RANK``;
``gloo`` on CPU).
Without them (or with ``WORLD_SIZE=1``) nothing is initialised and :data:`SINGLE` describes the one process:
every helper here is then the identity, so a plain run takes exactly the code path it always took.

What is split across the W ranks and how (commute.train, commute.estimate, commute.response):

* training: every rank composes the same *global* batch of ``batch_size`` rows (the mixture sampler is
  deterministic in its state) and trains on its contiguous slice of B/W rows (:func:`shard_rows`); DDP
  averages the gradients, so the step descends the global batch mean. Loss sums, domain counts and tokens
  are summed over ranks (:meth:`World.all_sum`), so metrics equal the one-process run's.
* checkpoints: written by rank 0 only, inside :func:`on_main` (the others wait for the write, and a failure
  there ends every rank with one sentence); they hold the unwrapped model, the optimiser and the global
  sampler state, so a run resumes with any world size.
* the bracket estimator and the response estimator (:class:`GroupSplit`): group g is computed by rank
  g mod W on its unwrapped model, and the per-group samples are summed over ranks (each rank contributes
  zeros for the groups it skipped: exact). The response estimator's replay of the window (the trajectory
  every group needs) is done by every rank.
* ``commute bracket`` and ``commute audit`` under torchrun (:func:`commute.audit.bracket_at` and
  :func:`commute.audit.audit_run` with ``distributed=True``): every rank loads the checkpoints and domains
  and runs both estimators with ``distributed=True`` (λ_max and the response estimator's replays are done by
  every rank); rank 0 alone prints, shows progress and writes files (:func:`on_main`: a failure there is
  raised on every rank, and the others wait for it to finish).

Waiting: a collective waits for every rank, and ranks wait long by design — at :meth:`GroupSplit.settle` for
the others' groups (G groups dealt round-robin over W ranks: when ``G mod W`` ≠ 0 the ranks holding one group
fewer wait idle for the others' last group, so choose G a multiple of W; a rank that failed early waits for
all of them), and at a checkpoint for rank 0's write. A response-estimator group on a GPU can take more
than the 10 minutes that NCCL waits by default before it kills the run, so :func:`setup` gives the
process group an explicit timeout: ``COMMUTE_DIST_TIMEOUT_S`` seconds (a positive number; default
:data:`DEFAULT_TIMEOUT_S`, 3 hours). A rank that has died is still noticed at once (torchrun ends the others);
the timeout only bounds a live rank that hangs.

docs/design.md §2: DDP does not support double backward and its hooks do not fire on ``autograd.grad``, so
curvature code always runs on the unwrapped module and reduces its results explicitly.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch

from commute.errors import CommuteError

__all__ = ["World", "SINGLE", "env_world", "current", "setup", "shutdown", "shard_rows", "shard_batch",
           "estimate_world", "GroupSplit", "on_main", "timeout", "check_device", "DEFAULT_TIMEOUT_S"]

_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
TIMEOUT_ENV = "COMMUTE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 3 * 3600.0
"""How long a collective waits for the other ranks unless ``COMMUTE_DIST_TIMEOUT_S`` says otherwise (3 hours:
longer than any one estimator group or checkpoint write should take)."""
_T = TypeVar("_T")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run (``world_size == 1``: a plain, single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process (collectives are needed)."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    # ---- collectives (identity on one process) ---------------------------------------------------------
    def _device(self) -> torch.device:
        """Where a tensor must be for a collective of the default group's backend (CUDA for NCCL)."""
        import torch.distributed as dist

        if "nccl" in str(dist.get_backend()).lower():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def all_sum(self, values: Any) -> np.ndarray:
        """Element-wise sum over ranks of a float64 array (a copy of ``values`` on one process)."""
        arr = np.array(values, dtype=np.float64)
        if not self.enabled:
            return arr
        import torch.distributed as dist

        t = torch.from_numpy(arr).to(self._device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().numpy()

    def all_max(self, values: Any) -> np.ndarray:
        """Element-wise maximum over ranks of a float64 array."""
        arr = np.array(values, dtype=np.float64)
        if not self.enabled:
            return arr
        import torch.distributed as dist

        t = torch.from_numpy(arr).to(self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.cpu().numpy()

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on some rank (every rank must call it)."""
        return bool(self.all_max([1.0 if flag else 0.0])[0]) if self.enabled else bool(flag)

    def barrier(self) -> None:
        """Wait for every rank (nothing on one process)."""
        if self.enabled:
            import torch.distributed as dist

            if "nccl" in str(dist.get_backend()).lower():
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()


SINGLE = World()
"""The one process of a plain (non-torchrun) run."""

_INITIALISED_HERE = False


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        v = int(raw)
    except ValueError:
        msg = f"environment variable {name}={raw!r} is not an integer (torchrun sets it)."
        raise CommuteError(msg) from None
    if v < 0:
        raise CommuteError(f"environment variable {name}={raw!r} must be >= 0 (set by torchrun).")
    return v


def env_world() -> World:
    """The :class:`World` torchrun describes in ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (:data:`SINGLE` when
    ``WORLD_SIZE`` is unset or 1)."""
    size = _env_int("WORLD_SIZE")
    if size is None or size <= 1:
        return SINGLE
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None or rank >= size:
        raise CommuteError(f"WORLD_SIZE={size} is set but RANK is {os.environ.get('RANK')!r}; start the "
                           "processes with torchrun (it sets both).")
    return World(rank=rank, world_size=size, local_rank=rank if local is None else local)


def current() -> World:
    """The :class:`World` of the initialised default process group, else :data:`SINGLE`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return SINGLE
    local = _env_int("LOCAL_RANK")
    return World(rank=dist.get_rank(), world_size=dist.get_world_size(),
                 local_rank=dist.get_rank() if local is None else local)


def timeout() -> timedelta:
    """How long a collective of the process group waits for the other ranks: ``COMMUTE_DIST_TIMEOUT_S``
    seconds, else :data:`DEFAULT_TIMEOUT_S` (see the module docstring)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        secs = float(raw)
    except ValueError:
        secs = float("nan")
    if not (math.isfinite(secs) and 0 < secs <= 1e9):
        raise CommuteError(f"environment variable {TIMEOUT_ENV}={raw!r} must be a positive number of seconds "
                           "(how long a process waits for the others; unset: "
                           f"{DEFAULT_TIMEOUT_S:g}).")
    return timedelta(seconds=secs)


def check_device(world: World, device: str, what: str) -> None:
    """The refusals of a ``device`` (a config's or ``--device``: auto, cpu, cuda, ...) on several processes,
    one sentence each, before any rank waits for the others: ``what`` (e.g. "training") needs cpu or cuda,
    and a numbered ``cuda:N`` would put every rank on one GPU. Nothing on one process."""
    if not world.enabled:
        return
    if device.startswith("mps"):
        raise CommuteError(f"{what} on several processes needs cpu or cuda devices, not mps.")
    if device.startswith("cuda:"):
        raise CommuteError(f"device {device!r} names one GPU, but under torchrun every process uses the GPU "
                           "of its LOCAL_RANK; use the device cuda (or auto).")


def _wants_cuda(device: str) -> bool:
    if device == "auto":
        return torch.cuda.is_available()
    return device.startswith("cuda")


def setup(device: str = "auto") -> World:
    """Join the run's process group: initialise it from the torchrun environment if it is not yet (``nccl``
    when ``device`` (a config's: auto, cpu, cuda, ...) means CUDA, each rank then on ``cuda:LOCAL_RANK``;
    ``gloo`` otherwise), its collectives waiting up to :func:`timeout` for the other ranks. Returns
    :func:`current` (:data:`SINGLE` outside torchrun: nothing is done)."""
    global _INITIALISED_HERE
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return current()
    world = env_world()
    if not world.enabled:
        return SINGLE
    if not dist.is_available():
        raise CommuteError("WORLD_SIZE > 1 asks for several processes, but this torch build has no "
                           "torch.distributed.")
    wait = timeout()
    if _wants_cuda(device):
        if not torch.cuda.is_available():
            raise CommuteError(f"device {device!r} was requested but CUDA is not available on this machine.")
        if world.local_rank >= torch.cuda.device_count():
            raise CommuteError(f"LOCAL_RANK={world.local_rank} but this machine has "
                               f"{torch.cuda.device_count()} GPU(s); start at most that many processes per "
                               "node (torchrun --nproc_per_node).")
        torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", world.local_rank), timeout=wait)
    else:
        dist.init_process_group("gloo", timeout=wait)
    _INITIALISED_HERE = True
    atexit.register(shutdown)
    return current()


def shutdown() -> None:
    """Destroy the default process group if :func:`setup` created it (idempotent)."""
    global _INITIALISED_HERE
    import torch.distributed as dist

    if _INITIALISED_HERE and dist.is_available() and dist.is_initialized():
        if "gloo" in str(dist.get_backend()).lower():
            # leave together: gloo can abort a process whose peer tears the group down while it still exits
            with contextlib.suppress(Exception):
                dist.barrier()
        dist.destroy_process_group()
    _INITIALISED_HERE = False


def device_for(world: World, device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when the run is on CUDA with several processes."""
    if world.enabled and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


def shard_rows(n: int, world: World, what: str = "batch_size") -> slice:
    """Rows ``rank·n/W .. (rank+1)·n/W`` of an ``n``-row global batch: this rank's contiguous slice."""
    if n % world.world_size:
        raise CommuteError(f"{what}={n} is not divisible by the {world.world_size} processes; use a "
                           f"{what} that is a multiple of the world size.")
    per = n // world.world_size
    return slice(world.rank * per, (world.rank + 1) * per)


def shard_batch(item: Any, world: World) -> Any:
    """This rank's rows (:func:`shard_rows`) of a micro-batch: a ``[B, T]`` tensor or a ``Batch``-like
    dataclass with ``input_ids`` (and ``domain``) rows; the item itself on one process."""
    if not world.enabled:
        return item
    ids = getattr(item, "input_ids", item)
    if not isinstance(ids, torch.Tensor) or ids.ndim < 1:
        raise CommuteError(f"a batch to split across processes must be a [B, T] tensor or have input_ids, "
                           f"got {type(item).__name__}.")
    sl = shard_rows(int(ids.shape[0]), world, "the rows of a given batch")
    if ids is item:
        return item[sl]
    changes = {"input_ids": ids[sl]}
    dom = getattr(item, "domain", None)
    if isinstance(dom, torch.Tensor):
        changes["domain"] = dom[sl]
    return dataclasses.replace(item, **changes)


def owned(n: int, world: World) -> Sequence[int]:
    """The indices ``0..n-1`` this rank computes when work items are dealt round-robin (rank, rank+W, ...)."""
    return range(world.rank, n, world.world_size)


def estimate_world(distributed: bool, device: torch.device) -> World:
    """The ranks an estimator splits its groups over: :data:`SINGLE` unless ``distributed``, else the
    run's process group, joined with :func:`setup` if it is not yet (``nccl`` for a CUDA ``device``, else
    ``gloo``)."""
    if not distributed:
        return SINGLE
    return setup("cuda" if device.type == "cuda" else "cpu")


class GroupSplit:
    """An estimate's ``n`` independent groups dealt round-robin over the ranks (:func:`owned`), and the
    agreement on failure that must come before their per-group samples are summed over ranks.

    A rank runs its share inside :meth:`share`; on several processes an error raised there is kept, not
    raised, so that the rank still reaches :meth:`settle`, the first collective after the work: there every
    rank learns that some rank failed and raises (the failing rank its own error, the others one sentence
    pointing to it) instead of waiting forever for a rank that has left. On one process errors pass through.
    """

    def __init__(self, n: int, world: World) -> None:
        self.world = world
        self.mine = frozenset(owned(n, world))
        self.failure: Exception | None = None

    def __contains__(self, g: object) -> bool:
        return g in self.mine

    def __len__(self) -> int:
        return len(self.mine)

    @contextmanager
    def share(self) -> Iterator[None]:
        """Run this rank's share of the work (the error of a multi-process run is kept for :meth:`settle`)."""
        try:
            yield
        except Exception as exc:
            if not self.world.enabled:
                raise
            self.failure = exc

    def settle(self, what: str) -> None:
        """Every rank: raise if any rank's share failed (one collective; nothing on one process)."""
        if self.world.enabled and self.world.any(self.failure is not None):
            raise self.failure or CommuteError(f"the distributed {what} failed on another process (its "
                                               "message is in that process's output).")


def on_main(world: World, what: str, work: Callable[[], _T]) -> _T | None:
    """``work()`` on rank 0 only (what prints or writes files), then every rank learns whether it failed: a
    :class:`GroupSplit` of one item, so its :meth:`~GroupSplit.settle` raises rank 0's error on rank 0 and one
    sentence naming ``what`` on the others, and is the collective that makes them wait for rank 0. Returns
    ``work()``'s value on rank 0, None on the others; on one process it is ``work()``."""
    split = GroupSplit(1, world)
    out: _T | None = None
    with split.share():
        if 0 in split:
            out = work()
    split.settle(what)
    return out
