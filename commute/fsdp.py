"""Fully sharded data parallel training (FSDP2: ``torch.distributed.fsdp.fully_shard``), ``parallel: fsdp``.

Under torchrun with ``parallel: fsdp`` (commute.train_config) every transformer block and then the root
model are wrapped with ``fully_shard`` over all the ranks: each rank keeps 1/W of every parameter, of its
gradient and of the optimiser state; a block's weights are all-gathered for its forward and backward and its
gradients are reduce-scattered (averaged over ranks, like DDP). Batches, losses and metrics are split and
summed exactly as with DDP (commute.distributed), so the trajectory is the one-process run's to float
rounding.

Checkpoints keep the one format (commute.checkpoint): every rank takes part in gathering the *full* model
and optimiser state dicts (``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True,
cpu_offload=True``: they arrive on rank 0, on the CPU), and rank 0 writes them as a one-process run would
(inside :func:`commute.distributed.on_main`: a failure there ends every rank with one sentence) —
``model.safetensors`` with the tied embedding stored once, ``optimizer.pt`` numbered like
``optimizer.state_dict()`` of the unwrapped model (:func:`commute.train.param_group_names`). Restoring reads
those full files on every rank and keeps each rank's shard, so a checkpoint moves freely between one process,
DDP and FSDP with any number of ranks.

Works on CPU with gloo (tested) and is meant for CUDA with nccl. Each rank builds the whole model on the CPU
first (the seeded initialisation must equal the one-process run's); ``fully_shard`` then moves one block at
a time to the rank's device and keeps only its shard there. So the device needs 1/W of the weights, gradients
and Adam state plus one gathered block, while the host needs the whole model once per rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from commute.distributed import World
from commute.errors import CommuteError

__all__ = ["available", "shard_model", "is_sharded", "reshard", "tied_groups", "tie", "local_nonfinite",
           "full_model_state", "gather_optimizer_state", "number_optimizer_state", "full_optimizer_state",
           "load_model_state", "load_optimizer_state"]


def available() -> bool:
    """This torch build has FSDP2 (``torch.distributed.fsdp.fully_shard``)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def _blocks(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """The transformer blocks of a GPT-2 (``transformer.h``): each becomes one FSDP unit."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None:
        raise CommuteError("parallel: fsdp shards GPT-2 models (transformer.h blocks); "
                           f"{type(model).__name__} has none.")
    return list(blocks)


def shard_model(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """``fully_shard`` every block, then the root (embeddings, final layer norm, tied head), over all the
    ranks of ``world`` on ``device``'s type; returns ``model`` itself, now an FSDP module whose parameters
    are DTensor shards. Build the optimiser after this (it must hold the sharded parameters)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world.world_size,))
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """``model`` was wrapped by :func:`shard_model` (an FSDP2 module)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered root parameters after a forward without backward (FSDP2 keeps the root's gathered
    after its forward, expecting a backward): the module holds its shards again, as after a training step."""
    if is_sharded(model):
        model.reshard()  # type: ignore[operator]


def tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """Names sharing one parameter (GPT-2's tied ``lm_head.weight`` and ``transformer.wte.weight``), each
    group sorted; parameters with one name are left out."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [sorted(names) for names in by_id.values() if len(names) > 1]


def tie(state: dict[str, Tensor], groups: Sequence[Sequence[str]]) -> dict[str, Tensor]:
    """``state`` with every name of a tied group holding the same tensor object (the one of the first name
    present), as a module's tied parameters do; names missing from ``state`` are filled in. In place."""
    for group in groups:
        have = [n for n in group if n in state]
        if have:
            for n in group:
                state[n] = state[have[0]]
    return state


def local_nonfinite(model: torch.nn.Module) -> str | None:
    """The name of a parameter whose local shard (the whole tensor if not sharded) is not finite, or None."""
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if not bool(torch.isfinite(local).all()):
            return name
    return None


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: torch.nn.Module) -> dict[str, Tensor] | None:
    """The full (unsharded) state dict of a sharded model, on the CPU, on rank 0 (None elsewhere), tied names
    sharing one tensor. A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    reshard(model)
    state = get_model_state_dict(model, options=_options(cpu_offload=True))
    if not state:
        return None
    return tie(dict(state), tied_groups(model))


def gather_optimizer_state(model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The full optimiser state dict of a sharded model keyed by parameter name, on the CPU, on rank 0 (None
    elsewhere): what :func:`number_optimizer_state` numbers. A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    reshard(model)
    by_name = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not by_name or "param_groups" not in by_name:
        return None
    return dict(by_name)


def number_optimizer_state(by_name: Mapping[str, Any],
                           group_names: Sequence[Sequence[str]]) -> dict[str, Any]:
    """A full optimiser state dict keyed by parameter name (:func:`gather_optimizer_state`) numbered like
    ``optimizer.state_dict()`` of the unwrapped model: parameter ``i`` is the ``i``-th name of
    ``group_names`` (the optimiser's groups by parameter name, in order). No collective (rank 0 calls it
    where a failure must reach the other ranks: commute.distributed.on_main)."""
    flat = [n for names in group_names for n in names]
    index = {n: i for i, n in enumerate(flat)}
    groups, start = [], 0
    for pg, names in zip(by_name["param_groups"], group_names, strict=True):
        if list(pg["params"]) != list(names):
            raise CommuteError(f"the sharded optimiser's parameter group holds {len(pg['params'])} "
                               f"parameters that differ from the model's {len(names)}; this is a bug in "
                               "commute.")
        groups.append({**{k: v for k, v in pg.items() if k != "params"},
                       "params": list(range(start, start + len(names)))})
        start += len(names)
    state = {index[n]: dict(s) for n, s in by_name["state"].items()}
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         group_names: Sequence[Sequence[str]]) -> dict[str, Any] | None:
    """The full optimiser state dict of a sharded model on rank 0 (None elsewhere), numbered like
    ``optimizer.state_dict()`` of the unwrapped model (:func:`gather_optimizer_state`, then
    :func:`number_optimizer_state` on rank 0). A collective: every rank must call it."""
    by_name = gather_optimizer_state(model, optimizer)
    return None if by_name is None else number_optimizer_state(by_name, group_names)


def load_model_state(model: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Load a full state dict (what :func:`commute.checkpoint.save_checkpoint` writes: a tied tensor under one
    of its names) into a sharded model; every rank passes the whole dict and keeps its shard. ``state`` is
    consumed (its tensors are replaced by the shards)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    tie(state, tied_groups(model))
    set_model_state_dict(model, state, options=_options())


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         state: Mapping[str, Any], group_names: Sequence[Sequence[str]]) -> None:
    """Load a full optimiser state dict numbered like the unwrapped model's (``optimizer.pt``) into the
    optimiser of a sharded model (every rank passes the whole dict and keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    flat = [n for names in group_names for n in names]
    groups = list(state["param_groups"])
    if [len(g["params"]) for g in groups] != [len(n) for n in group_names]:
        raise ValueError("parameter groups differ")
    pos = {int(i): k for k, i in enumerate(p for g in groups for p in g["params"])}
    by_name = {
        "state": {flat[pos[int(i)]]: dict(s) for i, s in state["state"].items()},
        "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": list(names)}
                         for g, names in zip(groups, group_names, strict=True)],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=_options())
