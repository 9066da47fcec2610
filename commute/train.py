"""The one training loop: mixture batches on a weight schedule, atomic checkpoints, exact resume, branches.

Every experiment (base runs, the paper's eq. (9) interventions, locality sweeps, later an online controller)
runs through :func:`train`. One optimiser step t (0-based) takes θ_t to θ_{t+1}:

    w = schedule(t)                                    (DESIGN.md §1: right-continuous weights)
    batch = sampler.next_batch(w)   (x grad_accum)     (paper §2/§4.2: each example's domain ~ w)
    θ_{t+1} = optimiser(θ_t, ∇ mean_b L_b(θ_t))        (L_b: per-sequence next-token cross-entropy)

With ``loss_weighting="domain"`` the step instead descends Σ_k w_k · mean_{b∈k} L_b (the weighted sum of
paper eq. (1)/(2)), which with a fixed batch holding every domain is deterministic gradient descent on
Σ_k w_k L_k — what the locality sweeps need (pass ``batch_source``).

A run directory holds::

    config.yaml                      the run's TrainConfig (documented YAML)
    metrics.csv                      per row: step (steps done), lr, train loss (mean since the last row)
                                     and per domain, val loss per domain (at eval steps), weight/<d> of
                                     the last step, tokens/<d> trained on so far, tokens/s
    tb/                              TensorBoard events (same tags)
    checkpoints/step_XXXXXXXX/       model.safetensors, optimizer.pt, rng.safetensors, state.json
    checkpoints/latest               name of the newest complete checkpoint

Checkpoints are written to a temporary directory and renamed into place (``os.replace``), so a kill at any
moment leaves the previous checkpoint loadable; ``state.json`` carries sha256 sums of the other files, so
a damaged checkpoint is detected instead of silently loaded. Nothing is unpickled: weights and RNG states
are safetensors, the optimiser state is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from commute.errors import CommuteError, NonFiniteLossError
from commute.model import build_model, count_parameters, sequence_losses

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Checkpoint",
    "StepInfo",
    "train",
    "evaluate",
    "load_checkpoint",
    "find_checkpoint",
    "list_checkpoints",
    "lr_at",
]

CKPT_FORMAT = 1
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}
_OPTIMIZERS = ("adam", "adamw", "sgd")
_LR_SCHEDULES = ("constant", "cosine", "linear")


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, dict | list):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything that defines a training run. Round-trips through YAML (:meth:`to_yaml`/:meth:`from_yaml`).

    Field documentation is in each field's ``metadata["help"]`` and in the YAML written by
    :meth:`to_yaml` (``commute train-template`` prints it).
    """

    # model
    model: str = _f("tiny", "Model preset: tiny (0.45M parameters), small (3.3M) or gpt2 (the paper's 124M).")
    model_overrides: dict = _f({}, "GPT2Config fields overriding the preset, e.g. {n_layer: 1, n_embd: 64}.")
    vocab_size: int | None = _f(None, "Vocabulary size; null = the tokenizer's (256 for bytes).")
    attn_implementation: str = _f("eager", "Attention kernel: eager (safe for HVPs) or sdpa (faster).")
    # data
    domains: dict = _f({}, "Name -> source: text dir, .txt, .jsonl, HF save_to_disk dir or fortunes:<lang>.")
    tokenizer: str = _f("byte", "Tokenizer: byte (vocab 256), bpe / bpe:<vocab> (trained locally) or a path.")
    cache_dir: str | None = _f(None, "Token cache directory; null = $COMMUTE_CACHE or ~/.cache/commute.")
    val_fraction: float = _f(0.05, "Fraction of each domain's documents held out for validation.")
    seq_len: int = _f(128, "Tokens per training sequence (must not exceed the model's context).")
    batch_size: int = _f(16, "Sequences per micro-batch.")
    grad_accum: int = _f(1, "Micro-batches per optimiser step (effective batch = batch_size * grad_accum).")
    sampler_mode: str = _f("sample", "sample: each example's domain ~ w(t) (paper); exact: stratified.")
    schedule: dict | None = _f(None, "Weight schedule (commute.schedule dict); null = equal weights.")
    loss_weighting: str = _f("sample", "sample: batch mean (paper); domain: sum_k w_k * mean loss of k.")
    # optimisation
    optimizer: str = _f("adam", "adam, adamw (decoupled weight decay) or sgd.")
    lr: float = _f(1e-3, "Peak learning rate.")
    lr_schedule: str = _f("constant", "constant (default), cosine or linear decay after warmup.")
    warmup_steps: int = _f(0, "Linear warmup steps from 0 to lr.")
    min_lr_ratio: float = _f(0.1, "Final lr / peak lr for cosine and linear decay.")
    betas: list = _f([0.9, 0.999], "Adam/AdamW betas (the paper's 0.9, 0.999).")
    eps: float = _f(1e-8, "Adam/AdamW epsilon.")
    momentum: float = _f(0.0, "SGD momentum (0 = plain gradient descent, the case the theory covers).")
    weight_decay: float = _f(0.0, "Weight decay on matrices (dim >= 2); decoupled for adamw, L2 otherwise.")
    grad_clip: float = _f(0.0, "Clip the global gradient norm to this value; 0 = off.")
    steps: int = _f(300, "Total optimiser steps of the run.")
    seed: int = _f(0, "Seed of the initialisation, the sampler's streams and torch's RNG.")
    # evaluation, logging, checkpoints
    eval_every: int = _f(50, "Evaluate validation loss every N steps (and at start and end); 0 = never.")
    eval_batches: int = _f(4, "Fixed validation batches per domain (batch_size sequences each).")
    log_every: int = _f(10, "Write a metrics row every N steps (train losses averaged since the last row).")
    ckpt_every: int = _f(100, "Checkpoint every N steps (and at the end); 0 = only at the end.")
    ckpt_steps: list = _f([], "Extra steps to checkpoint at (e.g. the t0 of planned interventions).")
    keep_last: int = _f(0, "Keep only the newest N periodic checkpoints (ckpt_steps are kept); 0 = all.")
    tensorboard: bool = _f(True, "Also write TensorBoard events to <out>/tb.")
    # hardware
    device: str = _f("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps ...")
    dtype: str = _f("float32", "Parameter dtype: float32, float64, bfloat16 or float16.")
    autocast: str | None = _f(None, "Mixed-precision compute dtype (bfloat16/float16); null = off.")
    deterministic: bool = _f(True, "torch.use_deterministic_algorithms (bitwise-reproducible runs).")

    # fields that never change a run's trajectory (free to differ on resume)
    RUN_FIELDS = ("steps", "eval_every", "eval_batches", "log_every", "ckpt_every", "ckpt_steps",
                  "keep_last", "tensorboard", "device", "cache_dir")
    # fields a branch may change (on top of RUN_FIELDS)
    BRANCH_FIELDS = ("schedule", "lr", "lr_schedule", "warmup_steps", "min_lr_ratio", "betas", "eps",
                     "momentum", "weight_decay", "grad_clip", "loss_weighting", "attn_implementation",
                     "autocast", "deterministic")

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation -------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Check every field; raise :class:`CommuteError` with one sentence naming the bad one."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise CommuteError(msg)

        def pos_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
                 f"config field {name} must be an integer >= {minimum}, got {v!r}.")

        for name in ("seq_len", "batch_size", "grad_accum"):
            pos_int(name, 1)
        if self.seq_len < 2:
            raise CommuteError(f"config field seq_len must be >= 2 to have a next token, got {self.seq_len}.")
        for name in ("steps", "warmup_steps", "eval_every", "eval_batches", "ckpt_every", "keep_last",
                     "seed"):
            pos_int(name, 0)
        pos_int("log_every", 1)
        need(self.optimizer in _OPTIMIZERS,
             f"config field optimizer must be one of {', '.join(_OPTIMIZERS)}, got {self.optimizer!r}.")
        need(self.lr_schedule in _LR_SCHEDULES, f"config field lr_schedule must be one of "
             f"{', '.join(_LR_SCHEDULES)}, got {self.lr_schedule!r}.")
        need(self.sampler_mode in ("sample", "exact"),
             f"config field sampler_mode must be 'sample' or 'exact', got {self.sampler_mode!r}.")
        need(self.loss_weighting in ("sample", "domain"),
             f"config field loss_weighting must be 'sample' or 'domain', got {self.loss_weighting!r}.")
        need(self.dtype in _DTYPES,
             f"config field dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}.")
        need(self.autocast in (None, "bfloat16", "float16"),
             f"config field autocast must be null, bfloat16 or float16, got {self.autocast!r}.")
        need(self.attn_implementation in ("eager", "sdpa"),
             f"config field attn_implementation must be eager or sdpa, got {self.attn_implementation!r}.")
        for name in ("lr", "eps", "momentum", "weight_decay", "grad_clip", "min_lr_ratio", "val_fraction"):
            v = getattr(self, name)
            need(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
                 f"config field {name} must be a finite number >= 0, got {v!r}.")
        need(self.lr > 0, f"config field lr must be > 0, got {self.lr!r}.")
        need(0 < self.val_fraction < 1,
             f"config field val_fraction must be in (0, 1), got {self.val_fraction!r}.")
        need(isinstance(self.betas, list | tuple) and len(self.betas) == 2
             and all(isinstance(b, int | float) and 0 <= b < 1 for b in self.betas),
             f"config field betas must be two numbers in [0, 1), got {self.betas!r}.")
        self.betas = [float(b) for b in self.betas]
        need(isinstance(self.model_overrides, dict), "config field model_overrides must be a mapping.")
        need(isinstance(self.domains, dict) and all(isinstance(k, str) for k in self.domains),
             "config field domains must map domain names to sources, e.g. {en: 'fortunes:en'}.")
        self.domains = {k: str(v) for k, v in self.domains.items()}
        need(self.vocab_size is None or (isinstance(self.vocab_size, int) and self.vocab_size > 0),
             f"config field vocab_size must be a positive integer or null, got {self.vocab_size!r}.")
        need(isinstance(self.ckpt_steps, list | tuple)
             and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.ckpt_steps),
             f"config field ckpt_steps must be a list of integers >= 0, got {self.ckpt_steps!r}.")
        self.ckpt_steps = sorted(set(self.ckpt_steps))
        need(self.schedule is None or isinstance(self.schedule, dict | str),
             "config field schedule must be a schedule mapping (e.g. {type: constant, weights: {...}}).")
        return self

    # ---- (de)serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain dict of all fields (JSON/YAML-able)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "the config") -> TrainConfig:
        """Build from a mapping; unknown fields are an error (typos must not be silently ignored)."""
        if not isinstance(d, Mapping):
            raise CommuteError(f"{where} must be a mapping of field: value, got {type(d).__name__}.")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            raise CommuteError(f"{where} has unknown field(s) {', '.join(map(str, unknown))}; "
                               f"known fields: {', '.join(names)}.")
        try:
            return cls(**dict(d))
        except TypeError as exc:
            raise CommuteError(f"{where} is malformed: {exc}.") from None

    def to_yaml(self, path: str | Path | None = None, comments: bool = True) -> str:
        """The config as YAML, each field preceded by its documentation; written atomically to ``path``."""
        import yaml

        lines = ["# commute training config (commute train CONFIG.yaml); every field is optional."]
        d = self.to_dict()
        for f in dataclasses.fields(self):
            if comments:
                lines.append(f"# {f.metadata.get('help', '')}")
            lines.append(yaml.safe_dump({f.name: d[f.name]}, sort_keys=False, allow_unicode=True,
                                        default_flow_style=False).rstrip())
        text = "\n".join(lines) + "\n"
        if path is not None:
            _atomic_write_text(Path(path), text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Read a YAML config file (see :meth:`to_yaml`)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise CommuteError(f"config file {str(path)!r} does not exist.")
        try:
            d = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CommuteError(f"config file {str(path)!r} is not valid YAML: {first}.") from None
        return cls.from_dict(d, where=f"config file {str(path)!r}")

    @classmethod
    def load(cls, obj: TrainConfig | Mapping[str, Any] | str | Path) -> TrainConfig:
        """A config from a TrainConfig (copied), a mapping or a YAML path."""
        if isinstance(obj, TrainConfig):
            return cls.from_dict(obj.to_dict())
        if isinstance(obj, Mapping):
            return cls.from_dict(obj)
        return cls.from_yaml(obj)

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with some fields changed."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def trajectory_hash(self) -> str:
        """sha256 over the fields that determine the trajectory (all but :attr:`RUN_FIELDS`)."""
        d = {k: v for k, v in self.to_dict().items() if k not in self.RUN_FIELDS}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# results, checkpoints
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


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _arch(model: torch.nn.Module) -> dict[str, Any]:
    """The shape-defining part of a model's config (what a checkpoint must match)."""
    c = model.config
    keys = ("model_type", "n_layer", "n_embd", "n_head", "n_inner", "n_positions", "vocab_size",
            "activation_function", "tie_word_embeddings")
    return {k: getattr(c, k, None) for k in keys}


def _rng_state() -> dict[str, Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda:{i}"] = s
    return out


def _set_rng_state(states: Mapping[str, Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda:")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


_CKPT_FILES = ("model.safetensors", "optimizer.pt", "rng.safetensors")


def _save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     state: dict[str, Any]) -> Path:
    """Write ``checkpoints/step_XXXXXXXX`` atomically (temp dir + rename), then the ``latest`` pointer."""
    from safetensors.torch import save_file, save_model

    ckdir = run_dir / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=ckdir))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        save_file({k: v.contiguous() for k, v in _rng_state().items()}, str(tmp / "rng.safetensors"))
        state = {**state, "files": {f: _sha256(tmp / f) for f in _CKPT_FILES}}
        _atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
        for f in _CKPT_FILES:
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        final = ckdir / name
        old = None
        if final.exists():  # re-writing a step (e.g. a run resumed from an earlier checkpoint)
            old = ckdir / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(ckdir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(ckdir / "latest", name + "\n")
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first (temporary leftovers are ignored)."""
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        return []
    out = [p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
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
        cand = run / "checkpoints" / latest.read_text().strip()
        if cand.is_dir():
            return cand
    cks = list_checkpoints(run)
    if not cks:
        raise CommuteError(f"no checkpoint found in {str(p)!r}.")
    return cks[-1]


def _corrupt(path: Path, why: str) -> CommuteError:
    return CommuteError(f"checkpoint {str(path)!r} is corrupt or incomplete ({why}); delete it to use an "
                        "earlier one.")


def _read_state(path: Path, verify: bool = True) -> dict[str, Any]:
    sp = path / "state.json"
    if not sp.is_file():
        raise _corrupt(path, "state.json is missing")
    try:
        state = json.loads(sp.read_text(encoding="utf-8"))
        files = state["files"]
        int(state["step"])
        state["config"]["seed"]  # noqa: B018
    except (ValueError, KeyError, TypeError) as exc:
        raise _corrupt(path, f"state.json is unreadable: {type(exc).__name__}") from None
    if state.get("format") != CKPT_FORMAT:
        raise CommuteError(f"checkpoint {str(path)!r} has format {state.get('format')!r}, but this version "
                           f"of commute reads format {CKPT_FORMAT}.")
    if verify:
        for f in _CKPT_FILES:
            if not (path / f).is_file():
                raise _corrupt(path, f"{f} is missing")
            if _sha256(path / f) != files.get(f):
                raise _corrupt(path, f"{f} does not match its checksum")
    return state


def _check_arch(path: Path, saved: Mapping[str, Any], model: torch.nn.Module) -> None:
    mine = _arch(model)
    diff = [f"{k} {saved.get(k)!r} vs {mine[k]!r}" for k in mine if saved.get(k) != mine[k]]
    if diff:
        raise CommuteError(f"checkpoint {str(path)!r} holds a different model ({'; '.join(diff)} in this "
                           "config); use the config it was trained with.")


def _load_weights(path: Path, model: torch.nn.Module, device: torch.device | str) -> None:
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False,
                                         device=str(device))
    except Exception as exc:  # header/shape errors from safetensors
        raise CommuteError(f"cannot load the weights of checkpoint {str(path)!r} into this model "
                           f"({str(exc).splitlines()[0][:200]}).") from None
    if missing or unexpected:
        raise CommuteError(f"checkpoint {str(path)!r} does not fit this model (missing "
                           f"{len(missing)}, unexpected {len(unexpected)} tensors).")


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
    state = _read_state(p, verify=verify)
    config = TrainConfig.from_dict(state["config"], where=f"the config of checkpoint {str(p)!r}")
    model = None
    if with_model:
        cfg_dtype = _DTYPES[config.dtype]
        model = build_model(config.model, vocab_size=int(state["arch"]["vocab_size"]), dtype=cfg_dtype,
                            attn_implementation=attn_implementation or config.attn_implementation,
                            **config.model_overrides)
        _check_arch(p, state["arch"], model)
        _load_weights(p, model, "cpu")
        model.to(device=device, dtype=dtype or cfg_dtype).eval()
    opt = None
    if with_optimizer:
        try:
            opt = torch.load(p / "optimizer.pt", map_location=device, weights_only=True)
        except Exception as exc:
            raise _corrupt(p, f"optimizer.pt unreadable: {type(exc).__name__}") from None
    return Checkpoint(path=p, step=int(state["step"]), config=config, state=state, model=model,
                      optimizer_state=opt)


# --------------------------------------------------------------------------------------------------
# pieces of the loop
# --------------------------------------------------------------------------------------------------
def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of step ``step``: linear warmup to ``lr`` over ``warmup_steps``, then constant, or a
    cosine / linear decay to ``min_lr_ratio * lr`` at ``steps``."""
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


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Group 0: matrices (dim >= 2, decayed); group 1: biases and layer norms; ``parameters()`` order in
    each (the optimiser state's indices follow this order)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def _resolve_device(name: str) -> torch.device:
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


def _as_micro_batches(item: Any) -> list[Any]:
    if isinstance(item, list | tuple):
        return list(item)
    return [item]


_CSV_BASE = ("step", "lr", "loss")


def _csv_fields(names: Sequence[str]) -> list[str]:
    f = list(_CSV_BASE)
    f += [f"train_loss/{d}" for d in names]
    f += [f"val_loss/{d}" for d in names]
    f += [f"weight/{d}" for d in names]
    f += [f"tokens/{d}" for d in names]
    f += ["tokens_per_s", "elapsed_s"]
    return f


def _truncate_metrics(path: Path, fields: list[str], upto: int) -> None:
    """Keep the rows of steps <= ``upto`` (a resumed run rewrites what came after its checkpoint)."""
    rows: list[dict[str, str]] = []
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames and list(reader.fieldnames) != fields:
                raise CommuteError(f"{str(path)!r} has different columns than this run; use a new output "
                                   "directory.")
            rows = [r for r in reader if r.get("step", "").isdigit() and int(r["step"]) <= upto]
    import io

    s = io.StringIO()
    w = csv.DictWriter(s, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    buf = s.getvalue()
    _atomic_write_text(path, buf)


class _Metrics:
    """metrics.csv + TensorBoard, one row per logged step."""

    def __init__(self, out_dir: Path, names: Sequence[str], start_step: int, tensorboard: bool) -> None:
        self.names = list(names)
        self.fields = _csv_fields(self.names)
        self.path = out_dir / "metrics.csv"
        _truncate_metrics(self.path, self.fields, start_step)
        self.fh = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        self.writer = csv.DictWriter(self.fh, fieldnames=self.fields, lineterminator="\n")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=max(0, start_step + 1))
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow({k: ("" if v is None else (repr(v) if isinstance(v, float) else v))
                              for k, v in row.items()})
        self.fh.flush()
        if self.tb is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float) and v is not None and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.fh.close()
        if self.tb is not None:
            with contextlib.suppress(Exception):
                self.tb.close()


class _Interval:
    """Training-loss sums since the last metrics row (part of the checkpoint, so rows are exact on resume)."""

    def __init__(self, names: Sequence[str], d: Mapping[str, Any] | None = None) -> None:
        self.names = list(names)
        d = d or {}
        self.loss_sum = float(d.get("loss_sum", 0.0))
        self.n = int(d.get("n", 0))
        self.dom_sum = {k: float(d.get("dom_sum", {}).get(k, 0.0)) for k in self.names}
        self.dom_n = {k: int(d.get("dom_n", {}).get(k, 0)) for k in self.names}

    def to_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "n": self.n, "dom_sum": self.dom_sum, "dom_n": self.dom_n}

    def pop(self) -> tuple[float | None, dict[str, float | None]]:
        loss = self.loss_sum / self.n if self.n else None
        dom = {k: (self.dom_sum[k] / self.dom_n[k] if self.dom_n[k] else None) for k in self.names}
        self.__init__(self.names)  # type: ignore[misc]
        return loss, dom


def _progress(enabled: bool, total: int, start: int) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(
        TextColumn("[bold]train[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )
    task = prog.add_task("train", total=total, completed=start, info="")
    return prog, task


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------
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
    * ``callbacks``: called with a :class:`StepInfo` after every step.

    Raises :class:`CommuteError` (one sentence) for bad input, :class:`NonFiniteLossError` if the loss
    becomes NaN/inf (the last good checkpoint is left intact).
    """
    from commute.schedule import Constant, FromCallable, Intervention, parse_schedule

    out_dir = Path(out_dir)
    # ---- configuration, resume / branch decision ---------------------------------------------------
    existing = list_checkpoints(out_dir)
    resume_ck: Path | None = None
    resume_state: dict[str, Any] | None = None
    parent_ck: Path | None = None
    parent_state: dict[str, Any] | None = None
    if branch_from is not None:
        parent_ck = find_checkpoint(branch_from)
        if out_dir.resolve() == parent_ck.parent.parent.resolve():
            raise CommuteError("a branch must be written to its own directory, not into its parent's run.")
    if existing:
        if not resume:
            raise CommuteError(f"{str(out_dir)!r} already holds a run (last checkpoint "
                               f"{existing[-1].name}); resume it, or choose an empty output directory.")
        resume_ck = find_checkpoint(out_dir)
        resume_state = _read_state(resume_ck)
        recorded = (resume_state.get("parent") or {}).get("checkpoint")
        if parent_ck is not None and recorded != str(parent_ck.resolve()):
            raise CommuteError(f"{str(out_dir)!r} already holds a run that is not a branch of "
                               f"{str(parent_ck)!r}; choose an empty output directory for the branch.")
        parent_ck = None
    elif parent_ck is not None:
        parent_state = _read_state(parent_ck)
    base_state = resume_state or parent_state
    base_ck = resume_ck or parent_ck
    if config is None:
        if base_state is None:
            raise CommuteError("train() needs a config (or branch_from= to reuse a checkpoint's config).")
        config = base_state["config"]
    cfg = TrainConfig.load(config)
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                  or max_steps < 0):
        raise CommuteError(f"max_steps must be an integer >= 0, got {max_steps!r}.")

    # ---- data ---------------------------------------------------------------------------------------
    need_data = batch_source is None or (bool(cfg.domains) and bool(cfg.eval_every) and val_batches is None)
    if domains is None and need_data:
        if not cfg.domains:
            raise CommuteError("the config names no domains; add e.g. domains: {en: 'fortunes:en'}.")
        from commute.data import load_domains

        domains = load_domains(cfg.domains, tokenizer=cfg.tokenizer, cache_dir=cfg.cache_dir,
                               val_fraction=cfg.val_fraction)
    domains = dict(domains or {})
    names: list[str] = list(domains) or list(cfg.domains)
    if cfg.domains and domains and set(cfg.domains) != set(domains):
        raise CommuteError(f"the given domains {sorted(domains)} differ from the config's "
                           f"{sorted(cfg.domains)}.")

    # ---- schedule -------------------------------------------------------------------------------------
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
    if parent_state is not None and isinstance(sched, Intervention) and int(parent_state["step"]) > sched.t0:
        raise CommuteError(f"the intervention starts at t0={sched.t0} but the branch starts at step "
                           f"{int(parent_state['step'])}; branch from the checkpoint at step {sched.t0}.")

    # ---- compatibility with the checkpoint we continue from -----------------------------------------
    if base_state is not None:
        saved = TrainConfig.from_dict(base_state["config"], where=f"the config of {str(base_ck)!r}")
        allowed = set(TrainConfig.RUN_FIELDS)
        if resume_state is None:  # a new branch may change the schedule and optimiser settings
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
            what = "resume" if resume_state is not None else "branch from"
            raise CommuteError(f"cannot {what} {str(base_ck)!r}: its config differs in "
                               f"{', '.join(diff)}; use the same settings or a new output directory.")
        if list(base_state.get("domain_names", names)) != names:
            raise CommuteError(f"checkpoint {str(base_ck)!r} was trained on domains "
                               f"{base_state.get('domain_names')}, not {names}.")

    device = _resolve_device(cfg.device)
    dtype = _DTYPES[cfg.dtype]
    vocab = cfg.vocab_size or (next(iter(domains.values())).vocab_size if domains else None)
    if vocab is None:
        from commute.data import get_tokenizer

        vocab = get_tokenizer(cfg.tokenizer).vocab_size
    out_dir.mkdir(parents=True, exist_ok=True)

    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if cfg.deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    metrics: _Metrics | None = None
    prog = None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            torch.use_deterministic_algorithms(cfg.deterministic)
            torch.manual_seed(cfg.seed)
            # ---- model, optimiser, sampler ----------------------------------------------------------
            model = build_model(cfg.model, vocab_size=int(vocab), dtype=dtype,
                                attn_implementation=cfg.attn_implementation, **cfg.model_overrides)
            if cfg.seq_len > model.config.n_positions:
                raise CommuteError(f"seq_len={cfg.seq_len} exceeds the model's context of "
                                   f"{model.config.n_positions}; lower seq_len or set "
                                   "model_overrides.n_positions.")
            model.to(device)
            optimizer = _build_optimizer(model, cfg)
            sampler = None
            if batch_source is None:
                from commute.data import MixtureSampler

                sampler = MixtureSampler(domains, cfg.batch_size, cfg.seq_len, cfg.seed, cfg.sampler_mode)
            step = 0
            tokens = dict.fromkeys(names, 0)
            interval = _Interval(names)
            parent_info = None
            last_ck: Path | None = None
            if base_state is not None:
                assert base_ck is not None
                _check_arch(base_ck, base_state["arch"], model)
                _load_weights(base_ck, model, device)
                try:
                    opt_state = torch.load(base_ck / "optimizer.pt", map_location=device, weights_only=True)
                    optimizer.load_state_dict(opt_state)
                except Exception as exc:
                    raise CommuteError(f"cannot restore the optimiser state of checkpoint {str(base_ck)!r} "
                                       f"({type(exc).__name__}).") from None
                _apply_hparams(optimizer, cfg)
                from safetensors.torch import load_file

                _set_rng_state(load_file(str(base_ck / "rng.safetensors")))
                step = int(base_state["step"])
                if sampler is not None and base_state.get("sampler") is not None:
                    sampler.load_state_dict(base_state["sampler"])
                tokens = {n: int(base_state.get("tokens", {}).get(n, 0)) for n in names}
                if resume_state is not None:
                    interval = _Interval(names, base_state.get("interval"))
                    parent_info = base_state.get("parent")
                    last_ck = base_ck
                else:
                    parent_info = {"checkpoint": str(base_ck.resolve()), "step": step,
                                   "config_hash": base_state.get("config_hash"),
                                   "schedule": base_state.get("schedule")}
            start = step
            end = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
            for leftover in (out_dir / "checkpoints").glob(".tmp-step_*"):
                shutil.rmtree(leftover, ignore_errors=True)  # a write interrupted by a crash
            cfg.to_yaml(out_dir / "config.yaml")

            # ---- validation batches, metrics ----------------------------------------------------------
            if val_batches is None and cfg.eval_every and domains:
                val_batches = {n: d.val_batches(cfg.eval_batches, cfg.batch_size, cfg.seq_len)
                               for n, d in domains.items()} if cfg.eval_batches else {}
            val_batches = dict(val_batches or {})
            # a resumed run keeps the rows up to its checkpoint (they include its step); a fresh run or a
            # new branch keeps none from a run that crashed before its first checkpoint
            metrics = _Metrics(out_dir, names, start if resume_state is not None else start - 1,
                               cfg.tensorboard)
            ckpt_steps = set(cfg.ckpt_steps)
            name_idx = {n: i for i, n in enumerate(names)}

            def state_dict(at: int) -> dict[str, Any]:
                return {
                    "format": CKPT_FORMAT,
                    "step": at,
                    "config": cfg.to_dict(),
                    "config_hash": cfg.trajectory_hash(),
                    "arch": _arch(model),
                    "n_params": count_parameters(model),
                    "domain_names": names,
                    "schedule": sched.to_dict(),
                    "sampler": sampler.state_dict() if sampler is not None else None,
                    "tokens": dict(tokens),
                    "interval": interval.to_dict(),
                    "parent": parent_info,
                    "torch": torch.__version__,
                    "time": time.time(),
                }

            def checkpoint(at: int) -> Path:
                p = _save_checkpoint(out_dir, at, model, optimizer, state_dict(at))
                if cfg.keep_last:
                    periodic = [c for c in list_checkpoints(out_dir) if int(c.name[5:]) not in ckpt_steps]
                    for old in periodic[: -cfg.keep_last]:
                        if old != p:
                            shutil.rmtree(old, ignore_errors=True)
                return p

            last_val: dict[str, float] = {}
            last_val_step: int | None = None

            def do_eval(at: int) -> dict[str, float]:
                nonlocal last_val, last_val_step
                if val_batches:
                    last_val, last_val_step = evaluate(model, val_batches), at
                return last_val

            if resume_state is None and val_batches:  # fresh run or new branch: evaluate the start point
                metrics.write({"step": start, **{f"val_loss/{n}": v for n, v in do_eval(start).items()},
                               **{f"tokens/{n}": tokens[n] for n in names}})
            if resume_state is None and start in ckpt_steps and start < end:
                last_ck = checkpoint(start)

            # ---- batches ------------------------------------------------------------------------------
            src_iter: Iterator[Any] | None = None
            if batch_source is not None and not callable(batch_source):
                src_iter = iter(batch_source)

            def next_item(t: int, w: dict[str, float]) -> list[Any]:
                if sampler is not None:
                    return [sampler.next_batch(w) for _ in range(cfg.grad_accum)]
                if src_iter is not None:
                    try:
                        return _as_micro_batches(next(src_iter))
                    except StopIteration:
                        raise CommuteError(f"the batch source ran out at step {t}.") from None
                return _as_micro_batches(batch_source(t))  # type: ignore[misc,operator]

            amp = (torch.autocast(device.type, dtype=_DTYPES[cfg.autocast]) if cfg.autocast
                   else contextlib.nullcontext())
            losses: dict[int, float] = {}
            model.train()
            t_start = time.perf_counter()
            t_row = t_start
            tok_row = 0
            tok_total = 0
            prog, task = _progress(progress, end, start)
            prog.start()
            for t in range(start, end):
                w = sched(t)
                lr = lr_at(cfg, t)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                micro = next_item(t, w)
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                dom_sum = dict.fromkeys(names, 0.0)
                dom_n = dict.fromkeys(names, 0)
                for mb in micro:
                    ids = getattr(mb, "input_ids", mb)
                    dom = getattr(mb, "domain", None)
                    ids = ids.to(device, non_blocking=True)
                    with amp:
                        seq = sequence_losses(model, ids)
                    if cfg.loss_weighting == "domain":
                        if dom is None:
                            raise CommuteError("loss_weighting='domain' needs batches with domain ids.")
                        dom_d = dom.to(device)
                        parts, wsum = [], 0.0
                        for n in names:
                            m = dom_d == name_idx[n]
                            if w.get(n, 0.0) > 0 and bool(m.any()):
                                parts.append(w[n] * seq[m].mean())
                                wsum += w[n]
                        loss = torch.stack(parts).sum() / wsum
                    else:
                        loss = seq.mean()
                    (loss / len(micro)).backward()
                    step_loss += float(loss.detach()) / len(micro)
                    if dom is not None:
                        sl = seq.detach().double().cpu()
                        for n in names:
                            m = dom == name_idx[n]
                            k = int(m.sum())
                            if k:
                                dom_sum[n] += float(sl[m].sum())
                                dom_n[n] += k
                                tokens[n] += k * ids.shape[1]
                    tok_row += ids.numel()
                    tok_total += ids.numel()
                if not math.isfinite(step_loss):
                    good = (f"checkpoint {last_ck.name} is intact" if last_ck
                            else "no checkpoint was written yet")
                    raise NonFiniteLossError(f"the training loss became {step_loss} at step {t} (lr={lr:g}); "
                                             f"{good}; lower the learning rate or check the data.")
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                step = t + 1
                losses[t] = step_loss
                interval.loss_sum += step_loss
                interval.n += 1
                for n in names:
                    interval.dom_sum[n] += dom_sum[n]
                    interval.dom_n[n] += dom_n[n]

                # rows and evaluations depend on the run's steps only (not on where this call stops), so an
                # interrupted-and-resumed run writes the same rows as an uninterrupted one
                is_eval = bool(cfg.eval_every) and (step % cfg.eval_every == 0 or step == cfg.steps)
                if step % cfg.log_every == 0 or is_eval or step == cfg.steps:
                    now = time.perf_counter()
                    tps = tok_row / max(now - t_row, 1e-9)
                    t_row, tok_row = now, 0
                    loss_avg, dom_avg = interval.pop()
                    val = do_eval(step) if is_eval else {}
                    metrics.write({"step": step, "lr": lr, "loss": loss_avg,
                                   **{f"train_loss/{n}": dom_avg[n] for n in names},
                                   **{f"val_loss/{n}": val.get(n) for n in names},
                                   **{f"weight/{n}": w.get(n, 0.0) for n in names},
                                   **{f"tokens/{n}": tokens[n] for n in names},
                                   "tokens_per_s": round(tps, 1), "elapsed_s": round(now - t_start, 3)})
                    info = f"loss {loss_avg:.3f}" if loss_avg is not None else ""
                    if last_val:
                        info += "  val " + " ".join(f"{n} {v:.3f}" for n, v in last_val.items())
                    info += f"  {tps:,.0f} tok/s"
                    prog.update(task, info=info)
                if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step in ckpt_steps or step == end:
                    last_ck = checkpoint(step)
                prog.update(task, completed=step)
                for cb in callbacks:  # after logging and checkpointing: callbacks see a settled step
                    cb(StepInfo(step=step, model=model, optimizer=optimizer, loss=step_loss, weights=w,
                                domain_losses={n: dom_sum[n] / dom_n[n] for n in names if dom_n[n]}))
            if end <= start and last_ck is None and base_state is not None and resume_state is None:
                last_ck = checkpoint(step)  # a branch asked for zero steps: still give it a checkpoint
            elapsed = time.perf_counter() - t_start
        finally:
            if prog is not None:
                prog.stop()
            if metrics is not None:
                metrics.close()
            torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
    return TrainResult(out_dir=out_dir, step=step, checkpoint=last_ck, losses=losses,
                       val_losses=dict(last_val), val_step=last_val_step, tokens=dict(tokens),
                       elapsed=elapsed,
                       tokens_per_second=tok_total / max(elapsed, 1e-9), metrics_path=out_dir / "metrics.csv")
