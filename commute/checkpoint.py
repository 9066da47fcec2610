"""Atomic, verified checkpoints: write, find, list, read and restore them, without unpickling anything.

A run directory holds ``checkpoints/step_XXXXXXXX/`` (``XXXXXXXX`` = optimiser steps done) with::

    model.safetensors    the weights θ_step
    optimizer.pt         the optimiser state dict (tensors and containers only: read with weights_only=True)
    rng.safetensors      torch's CPU (and CUDA) RNG states
    state.json           step, config, model shape, schedule, sampler, tokens, parent, sha256 of the above

and ``checkpoints/latest``, the name of the newest complete one. A checkpoint is written into a temporary
directory, synced, then renamed into place (``os.replace``), so a kill at any moment leaves the previous one
loadable; the sha256 sums in ``state.json`` make a damaged checkpoint an error instead of a silent load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from commute.errors import CommuteError
from commute.io import atomic_write, fsync_dir
from commute.model import build_model
from commute.train_config import DTYPES, TrainConfig

__all__ = [
    "CKPT_FORMAT",
    "CKPT_FILES",
    "Checkpoint",
    "save_checkpoint",
    "save_model_state",
    "list_checkpoints",
    "find_checkpoint",
    "prune_checkpoints",
    "remove_partial_checkpoints",
    "read_state",
    "load_checkpoint",
    "load_weights",
    "read_weights",
    "unloadable",
    "load_optimizer_state",
    "model_arch",
    "check_arch",
    "rng_state",
    "set_rng_state",
    "restore_rng_state",
    "sha256_file",
    "read_latest",
    "store_schedule",
    "stored_schedule_path",
    "check_finite",
    "SCHEDULE_INLINE_MAX",
]

CKPT_FORMAT = 1  #: the ``format`` of ``state.json`` this version reads and writes
CKPT_FILES = ("model.safetensors", "optimizer.pt", "rng.safetensors")  #: the files ``state.json`` checksums


@dataclass
class Checkpoint:
    """A checkpoint read by :func:`load_checkpoint`."""

    path: Path
    step: int
    config: TrainConfig
    state: dict[str, Any]  #: the parsed state.json (sampler, schedule, parent, tokens, ...)
    model: torch.nn.Module | None = None
    optimizer_state: dict[str, Any] | None = None

    @property
    def schedule(self) -> Any:
        """The schedule the run used (a :class:`commute.schedule.Schedule`), if it can be rebuilt."""
        from commute.schedule import Schedule

        return Schedule.from_dict(self.state["schedule"]) if self.state.get("schedule") else None


# --------------------------------------------------------------------------------------------------
# pieces of a checkpoint
# --------------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_arch(model: torch.nn.Module) -> dict[str, Any]:
    """The shape-defining part of a model's config (what a checkpoint must match)."""
    c = model.config
    keys = ("model_type", "n_layer", "n_embd", "n_head", "n_inner", "n_positions", "vocab_size",
            "activation_function", "tie_word_embeddings")
    return {k: getattr(c, k, None) for k in keys}


def check_arch(path: Path, saved: Mapping[str, Any], model: torch.nn.Module) -> None:
    """Raise a one-sentence :class:`CommuteError` if ``model``'s shape differs from ``saved`` (a state's
    ``arch``)."""
    if not isinstance(saved, Mapping):
        raise _corrupt(path, "state.json has no model shape (arch)")
    mine = model_arch(model)
    diff = [f"{k} {saved.get(k)!r} vs {mine[k]!r}" for k in mine if saved.get(k) != mine[k]]
    if diff:
        raise CommuteError(f"checkpoint {str(path)!r} holds a different model ({'; '.join(diff)} in this "
                           "config); use the config it was trained with.")


def rng_state() -> dict[str, Tensor]:
    """torch's RNG states: ``cpu``, and ``cuda:i`` for every device once CUDA is initialised."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda:{i}"] = s
    return out


def set_rng_state(states: Mapping[str, Tensor]) -> None:
    """Restore :func:`rng_state` (CUDA states only where CUDA is available, up to its device count)."""
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda:")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def restore_rng_state(path: Path) -> None:
    """:func:`set_rng_state` from a checkpoint's ``rng.safetensors``."""
    from safetensors.torch import load_file

    set_rng_state(load_file(str(path / "rng.safetensors")))


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module | Mapping[str, Tensor],
                    optimizer: torch.optim.Optimizer | Mapping[str, Any], state: dict[str, Any], *,
                    checksum: Callable[[Path], str] = sha256_file) -> Path:
    """Write ``checkpoints/step_XXXXXXXX`` atomically (temp dir + rename), then the ``latest`` pointer.

    ``model`` and ``optimizer`` may also be given as their full state dicts (an FSDP run gathers them:
    commute.fsdp, or ``model.state_dict()``), tied names sharing one tensor; the files are the same as for the
    modules (:func:`save_model_state`).
    ``state`` (JSON-able) becomes ``state.json`` with ``files`` = {file: ``checksum(file)``} added;
    :func:`read_state` verifies with :func:`sha256_file`, so ``checksum`` is only a seam for tests that
    simulate a crash mid-write. Re-writing an existing step replaces it atomically too.
    """
    from safetensors.torch import save_file, save_model

    ckdir = run_dir / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=ckdir))
    try:
        if isinstance(model, torch.nn.Module):
            save_model(model, str(tmp / "model.safetensors"))
        else:
            save_model_state(model, tmp / "model.safetensors")
        opt_state = optimizer if isinstance(optimizer, Mapping) else optimizer.state_dict()
        torch.save(opt_state, tmp / "optimizer.pt")
        save_file({k: v.contiguous() for k, v in rng_state().items()}, str(tmp / "rng.safetensors"))
        state = {**state, "files": {f: checksum(tmp / f) for f in CKPT_FILES}}
        atomic_write(tmp / "state.json", json.dumps(state, indent=1))
        for f in CKPT_FILES:
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        final = ckdir / name
        old = None
        if final.exists():  # re-writing a step (e.g. a run resumed from an earlier checkpoint)
            old = ckdir / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(ckdir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(ckdir / "latest", name + "\n")
    return final


def _tie_key(t: Tensor) -> tuple[Any, ...]:
    """What makes two state-dict entries one tensor (tied parameters): the same view of the same memory —
    storage address, offset, shape, strides, dtype and device, as safetensors finds shared tensors
    (``model.state_dict()`` gives each tied name its own tensor object over the one storage). Tensors
    without memory (meta, empty) are told apart by object."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):  # meta tensors
        ptr = 0
    if ptr == 0 or t.device.type == "meta":
        return ("object", id(t))
    return (str(t.device), ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def save_model_state(state: Mapping[str, Tensor], path: Path) -> None:
    """Write a model's full state dict as ``safetensors.torch.save_model`` writes the model: of the names
    holding one tensor (tied parameters: one object, or one view of one storage as in ``model.state_dict()``)
    the alphabetically first is stored and the others are named in the metadata (``{dropped: kept}``); every
    tensor contiguous."""
    from safetensors.torch import save_file

    tied: dict[tuple[Any, ...], list[str]] = {}
    for name, t in state.items():
        tied.setdefault(_tie_key(t), []).append(name)
    metadata: dict[str, str] | None = None
    out = dict(state)
    for names in tied.values():
        keep, *drop = sorted(names)
        for name in drop:
            metadata = metadata or {}
            metadata[name] = keep
            del out[name]
    save_file({k: v.contiguous() for k, v in out.items()}, str(path), metadata=metadata)


def prune_checkpoints(run_dir: Path, keep_last: int, keep_steps: Iterable[int], current: Path) -> None:
    """Delete all but the newest ``keep_last`` checkpoints whose step is not in ``keep_steps`` (never
    ``current``); ``keep_last=0`` keeps all."""
    if keep_last <= 0:
        return
    keep = set(keep_steps)
    periodic = [c for c in list_checkpoints(run_dir) if int(c.name[5:]) not in keep]
    for old in periodic[:-keep_last]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Delete the temporary directories of checkpoint writes that a crash interrupted."""
    for leftover in (run_dir / "checkpoints").glob(".tmp-step_*"):
        shutil.rmtree(leftover, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# finding and reading
# --------------------------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first (temporary leftovers are ignored)."""
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        return []
    out = [p for p in ckdir.iterdir() if _STEP_NAME.fullmatch(p.name) and p.is_dir()]
    return sorted(out, key=lambda p: int(p.name[5:]))


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a run directory, its ``checkpoints`` directory or a ``step_*`` directory to a checkpoint.

    For a run, this is the one named by ``checkpoints/latest`` (else the newest ``step_*``).
    """
    p = Path(path)
    if (p / "state.json").is_file() or p.name.startswith("step_"):
        if not p.is_dir():
            raise CommuteError(f"checkpoint {str(p)!r} does not exist.")
        return p
    run = p.parent if p.name == "checkpoints" else p
    latest = run / "checkpoints" / "latest"
    if latest.is_file():
        cand = run / "checkpoints" / read_latest(latest)
        if cand.is_dir():
            return cand
    cks = list_checkpoints(run)
    if not cks:
        raise CommuteError(f"no checkpoint found in {str(p)!r}.")
    return cks[-1]


_STEP_NAME = re.compile(r"step_[0-9]+")


def read_latest(pointer: Path) -> str:
    """The checkpoint name in a ``checkpoints/latest`` pointer: a bare ``step_*`` name of that directory;
    anything else (a path, another run's checkpoint, undecodable bytes) is a one-sentence error."""
    raw = pointer.read_bytes()[:4096]
    try:
        name = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not _STEP_NAME.fullmatch(name):
        raise CommuteError(f"{str(pointer)!r} is damaged (it must hold the name of a step_* directory beside "
                           f"it, got {raw[:60]!r}); delete it to use the newest checkpoint of the run.")
    return name


def _corrupt(path: Path, why: str) -> CommuteError:
    return CommuteError(f"checkpoint {str(path)!r} is corrupt or incomplete ({why}); delete it to use an "
                        "earlier one.")


def read_state(path: Path, verify: bool = True) -> dict[str, Any]:
    """The parsed ``state.json`` of checkpoint directory ``path``, its format checked and, with ``verify``,
    every file checked against its sha256; a one-sentence :class:`CommuteError` otherwise."""
    sp = path / "state.json"
    if not sp.is_file():
        raise _corrupt(path, "state.json is missing")
    try:
        state = json.loads(sp.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _corrupt(path, f"state.json is unreadable: {type(exc).__name__}") from None
    bad = _state_shape_error(state)
    if bad:
        raise _corrupt(path, f"state.json is malformed: {bad}")
    files = state["files"]
    if state.get("format") != CKPT_FORMAT:
        raise CommuteError(f"checkpoint {str(path)!r} has format {state.get('format')!r}, but this version "
                           f"of commute reads format {CKPT_FORMAT}.")
    if verify:
        for f in CKPT_FILES:
            if not (path / f).is_file():
                raise _corrupt(path, f"{f} is missing")
            if sha256_file(path / f) != files.get(f):
                raise _corrupt(path, f"{f} does not match its checksum")
    _resolve_stored_schedules(state, path)
    return state


#: the type of each ``state.json`` entry that code reads, and whether it must be there
_STATE_SHAPE: dict[str, tuple[type, bool]] = {
    "files": (dict, True), "step": (int, True), "config": (dict, True), "arch": (dict, False),
    "schedule": (dict, False), "sampler": (dict, False), "tokens": (dict, False), "interval": (dict, False),
    "parent": (dict, False), "domain_names": (list, False),
}


def _state_shape_error(state: Any) -> str | None:
    """Why ``state`` is not a ``state.json`` this version can read (a missing or mistyped entry), or None."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a mapping"
    for key, (kind, required) in _STATE_SHAPE.items():
        v = state.get(key)
        if v is None and not required:
            continue
        if not isinstance(v, kind) or isinstance(v, bool) or (kind is int and v < 0):
            return f"{key} is {'missing' if v is None else type(v).__name__ + ', not ' + kind.__name__}"
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in state["files"].items()):
        return "files is not a mapping of file names to checksums"
    if not isinstance(state["config"].get("seed"), int):
        return "config has no seed"
    return None


# --------------------------------------------------------------------------------------------------
# schedules stored once per run
# --------------------------------------------------------------------------------------------------
SCHEDULE_INLINE_MAX = 64 * 1024
"""A schedule whose JSON is longer (e.g. thousands of stages) is written once per run, to
``schedules/<sha256>.json``, and ``state.json`` refers to it by hash instead of repeating it."""

_STORED_NAME = re.compile(r"schedules/[0-9a-f]{64}\.json")


def store_schedule(run_dir: Path, schedule: dict[str, Any] | None) -> dict[str, Any] | None:
    """``schedule`` itself if small, else a reference ``{"type": "stored", "file": "schedules/<sha>.json",
    "sha256": <sha>}`` to its JSON, written into ``run_dir`` (atomically, once: the name is the hash)."""
    if schedule is None:
        return None
    text = json.dumps(schedule)
    if len(text) <= SCHEDULE_INLINE_MAX:
        return schedule
    sha = hashlib.sha256(text.encode()).hexdigest()
    rel = f"schedules/{sha}.json"
    if not (run_dir / rel).is_file() or sha256_file(run_dir / rel) != sha:
        atomic_write(run_dir / rel, text)
    return {"type": "stored", "file": rel, "sha256": sha}


def stored_schedule_path(run_dir: Path, ref: Any) -> Path | None:
    """The file a :func:`store_schedule` reference names (None if ``ref`` is not one)."""
    if isinstance(ref, dict) and ref.get("type") == "stored":
        return run_dir / str(ref.get("file"))
    return None


def _resolve_stored_schedules(state: dict[str, Any], path: Path) -> None:
    """Replace the references of :func:`store_schedule` in ``state`` (schedule, config.schedule,
    parent.schedule) by the schedules, each read once and checked against its sha256."""
    run_dir = path.parent.parent
    checked: set[str] = set()

    def resolve(ref: Any) -> Any:
        if not (isinstance(ref, dict) and ref.get("type") == "stored"):
            return ref
        rel, sha = ref.get("file"), ref.get("sha256")
        if not isinstance(rel, str) or not _STORED_NAME.fullmatch(rel) or rel != f"schedules/{sha}.json":
            raise _corrupt(path, "its stored schedule reference is malformed")
        f = run_dir / rel
        if not f.is_file():
            raise _corrupt(path, f"the run's {rel} is missing")
        data = f.read_bytes()
        if sha not in checked and hashlib.sha256(data).hexdigest() != sha:
            raise _corrupt(path, f"the run's {rel} does not match its checksum")
        checked.add(sha)
        return json.loads(data)  # each reference its own copy

    state["schedule"] = resolve(state.get("schedule"))
    state["config"]["schedule"] = resolve(state["config"].get("schedule"))
    if isinstance(state.get("parent"), dict):
        state["parent"]["schedule"] = resolve(state["parent"].get("schedule"))


def check_finite(path: Path, weights: torch.nn.Module | Mapping[str, Tensor]) -> None:
    """Refuse to continue from checkpoint ``path`` if its weights are not finite: the parameters of a model
    they were loaded into, or a full state dict (:func:`read_weights`; a tied tensor counted once)."""
    if isinstance(weights, torch.nn.Module):
        named = list(weights.named_parameters())
    else:
        seen: set[tuple[Any, ...]] = set()
        named = []
        for n, t in weights.items():
            key = _tie_key(t)
            if key not in seen:
                seen.add(key)
                named.append((n, t))
    bad = [n for n, p in named if not bool(torch.isfinite(p).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CommuteError(f"checkpoint {str(path)!r} holds weights that are not finite ({bad[0]}{more}); "
                           "continue from an earlier checkpoint of the run with a lower learning rate "
                           "(--branch-from).")


def unloadable(path: Path, exc: BaseException) -> CommuteError:
    """The sentence for weights of checkpoint ``path`` that cannot be loaded (``exc``'s first line)."""
    return CommuteError(f"cannot load the weights of checkpoint {str(path)!r} into this model "
                        f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}).")


def _check_fit(path: Path, missing: int, unexpected: int) -> None:
    if missing or unexpected:
        raise CommuteError(f"checkpoint {str(path)!r} does not fit this model (missing "
                           f"{missing}, unexpected {unexpected} tensors).")


def load_weights(path: Path, model: torch.nn.Module, device: torch.device | str) -> None:
    """Load ``model.safetensors`` of checkpoint ``path`` into ``model`` (every tensor must fit)."""
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False,
                                         device=str(device))
    except Exception as exc:  # header/shape errors from safetensors
        raise unloadable(path, exc) from None
    _check_fit(path, len(missing), len(unexpected))


def read_weights(path: Path, model: torch.nn.Module) -> dict[str, Tensor]:
    """``model.safetensors`` of checkpoint ``path`` as a full state dict on the CPU (e.g. to load into a
    sharded model), the names of ``model``'s tied parameters filled in (each group sharing one tensor:
    :func:`commute.fsdp.tie`), in ``model.state_dict()``'s order; refused as :func:`load_weights` refuses it
    unless its names are ``model``'s."""
    from safetensors.torch import load_file

    from commute import fsdp

    try:
        state = load_file(str(path / "model.safetensors"))
    except Exception as exc:
        raise unloadable(path, exc) from None
    state = fsdp.tie(state, fsdp.tied_groups(model))
    names = list(model.state_dict())
    want, have = set(names), set(state)
    _check_fit(path, len(want - have), len(have - want))
    return {n: state[n] for n in names}  # check_finite then names the tensor it names for the model


def load_optimizer_state(path: Path, device: torch.device | str) -> dict[str, Any]:
    """``optimizer.pt`` of checkpoint ``path``, read with ``weights_only=True`` onto ``device``."""
    try:
        return torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    except Exception as exc:
        raise _corrupt(path, f"optimizer.pt unreadable: {type(exc).__name__}") from None


def load_checkpoint(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    with_model: bool = True,
    with_optimizer: bool = False,
    verify: bool = True,
) -> Checkpoint:
    """Read a checkpoint (a run dir, its ``checkpoints`` dir or a ``step_*`` dir) without unpickling.

    Returns a :class:`Checkpoint` with the config, the parsed ``state.json`` and, by default, the model
    rebuilt from the config and loaded from ``model.safetensors`` (in eval mode, on ``device``, cast to
    ``dtype`` if given, e.g. ``torch.float64`` for curvature checks; ``attn_implementation`` may switch
    eager/sdpa). ``with_optimizer`` also loads the optimiser state dict (``weights_only=True``). Files are
    checked against the sha256 sums in ``state.json`` unless ``verify=False``.
    """
    p = find_checkpoint(path)
    state = read_state(p, verify=verify)
    config = TrainConfig.from_dict(state["config"], where=f"the config of checkpoint {str(p)!r}")
    model = None
    if with_model:
        cfg_dtype = DTYPES[config.dtype]
        vocab = (state.get("arch") or {}).get("vocab_size")
        if not isinstance(vocab, int):
            raise _corrupt(p, "state.json has no model shape (arch)")
        model = build_model(config.model, vocab_size=vocab, dtype=cfg_dtype,
                            attn_implementation=attn_implementation or config.attn_implementation,
                            **config.model_overrides)
        check_arch(p, state["arch"], model)
        load_weights(p, model, "cpu")
        model.to(device=device, dtype=dtype or cfg_dtype).eval()
    opt = load_optimizer_state(p, device) if with_optimizer else None
    return Checkpoint(path=p, step=int(state["step"]), config=config, state=state, model=model,
                      optimizer_state=opt)
