"""The configuration of a training run: :class:`TrainConfig`, validated, documented, YAML round-trip.

Every field carries its one-line documentation in ``metadata["help"]``; :meth:`TrainConfig.to_yaml` writes
it above the field (``commute train-template``). :meth:`TrainConfig.trajectory_hash` hashes the fields that
determine the trajectory θ_0, θ_1, ... (all but :attr:`TrainConfig.RUN_FIELDS`), so two configs with the same
hash train bitwise-identical runs on the same data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from commute.errors import CommuteError
from commute.io import atomic_write, read_yaml

__all__ = ["TrainConfig", "DTYPES"]

#: config ``dtype`` / ``autocast`` names -> torch dtypes
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
_OPTIMIZERS = ("adam", "adamw", "sgd")
_LR_SCHEDULES = ("constant", "cosine", "linear")
_SEED_MAX = 2**64 - 1  #: torch.manual_seed takes seeds up to 2^64 - 1
#: upper bounds that keep a typo from asking for terabytes (checked before anything is allocated)
MAX_VOCAB = 2**24
MAX_BATCH_TOKENS = 2**26  #: batch_size * seq_len of one micro-batch (512 MiB of int64 token ids)
MAX_EVAL_TOKENS = 2**26  #: eval_batches * batch_size * seq_len, the validation tokens held per domain


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, dict | list):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


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
    sampler_seed: int | None = _f(None, "Seed of the sampler's streams from this run's first step on; null = "
                                  "seed. A branch may set its own: a replicate of its window.")
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
    parallel: str = _f("ddp", "Under torchrun: ddp (each process holds the whole model) or fsdp (weights, "
                       "gradients and optimiser state sharded over the processes); no effect on one process.")

    # fields that never change a run's trajectory (free to differ on resume; parallel, like the number of
    # processes, changes only the float rounding, and a checkpoint moves between ddp, fsdp and one process)
    RUN_FIELDS = ("steps", "eval_every", "eval_batches", "log_every", "ckpt_every", "ckpt_steps",
                  "keep_last", "tensorboard", "device", "cache_dir", "parallel")
    # fields a branch may change (on top of RUN_FIELDS)
    BRANCH_FIELDS = ("schedule", "lr", "lr_schedule", "warmup_steps", "min_lr_ratio", "betas", "eps",
                     "momentum", "weight_decay", "grad_clip", "loss_weighting", "attn_implementation",
                     "autocast", "deterministic", "sampler_seed")

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation -------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Check every field; raise :class:`CommuteError` with one sentence naming the bad one."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise CommuteError(msg)

        def pos_int(name: str, minimum: int = 1, maximum: int | None = None) -> None:
            v = getattr(self, name)
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= minimum
            if maximum is None:
                need(ok, f"config field {name} must be an integer >= {minimum}, got {v!r}.")
            else:
                need(ok and v <= maximum,
                     f"config field {name} must be an integer from {minimum} to {maximum:,}, got {v!r}.")

        for name in ("seq_len", "batch_size", "grad_accum"):
            pos_int(name, 1)
        if self.seq_len < 2:
            raise CommuteError(f"config field seq_len must be >= 2 to have a next token, got {self.seq_len}.")
        for name in ("steps", "warmup_steps", "eval_every", "eval_batches", "ckpt_every", "keep_last"):
            pos_int(name, 0)
        pos_int("seed", 0, _SEED_MAX)
        if self.sampler_seed is not None:
            pos_int("sampler_seed", 0, _SEED_MAX)
        pos_int("log_every", 1)
        need(self.batch_size * self.seq_len <= MAX_BATCH_TOKENS,
             f"config fields batch_size × seq_len ask for {self.batch_size * self.seq_len:,} tokens per "
             f"micro-batch, more than the {MAX_BATCH_TOKENS:,} allowed; lower batch_size or seq_len (use "
             "grad_accum for a larger effective batch).")
        eval_tokens = self.eval_batches * self.batch_size * self.seq_len
        need(eval_tokens <= MAX_EVAL_TOKENS,
             f"config field eval_batches={self.eval_batches:,} asks for {eval_tokens:,} validation tokens "
             f"per domain (× batch_size × seq_len), more than the {MAX_EVAL_TOKENS:,} allowed; lower "
             "eval_batches.")
        need(isinstance(self.model, str) and bool(self.model),
             f"config field model must be a preset name such as tiny, small or gpt2, got {self.model!r}.")
        need(isinstance(self.tokenizer, str) and bool(self.tokenizer),
             f"config field tokenizer must be byte, bpe, bpe:<vocab> or a path, got {self.tokenizer!r}.")
        need(self.cache_dir is None or isinstance(self.cache_dir, str),
             f"config field cache_dir must be a path or null, got {self.cache_dir!r}.")
        need(isinstance(self.device, str), f"config field device must be a name such as cpu or cuda, got "
             f"{self.device!r}.")
        for name in ("tensorboard", "deterministic"):
            need(isinstance(getattr(self, name), bool),
                 f"config field {name} must be true or false, got {getattr(self, name)!r}.")
        need(self.optimizer in _OPTIMIZERS,
             f"config field optimizer must be one of {', '.join(_OPTIMIZERS)}, got {self.optimizer!r}.")
        need(self.lr_schedule in _LR_SCHEDULES, f"config field lr_schedule must be one of "
             f"{', '.join(_LR_SCHEDULES)}, got {self.lr_schedule!r}.")
        need(self.sampler_mode in ("sample", "exact"),
             f"config field sampler_mode must be 'sample' or 'exact', got {self.sampler_mode!r}.")
        need(self.loss_weighting in ("sample", "domain"),
             f"config field loss_weighting must be 'sample' or 'domain', got {self.loss_weighting!r}.")
        need(self.dtype in DTYPES,
             f"config field dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        need(self.autocast in (None, "bfloat16", "float16"),
             f"config field autocast must be null, bfloat16 or float16, got {self.autocast!r}.")
        need(self.parallel in ("ddp", "fsdp"),
             f"config field parallel must be ddp or fsdp, got {self.parallel!r}.")
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
        need(isinstance(self.domains, dict) and all(isinstance(k, str) and k for k in self.domains)
             and all(isinstance(v, str | os.PathLike) and str(v) for v in self.domains.values()),
             "config field domains must map domain names to sources, e.g. {en: 'fortunes:en'}.")
        self.domains = {k: str(v) for k, v in self.domains.items()}
        v = self.vocab_size
        need(v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_VOCAB),
             f"config field vocab_size must be null or an integer from 1 to {MAX_VOCAB:,}, got "
             f"{self.vocab_size!r}.")
        need(isinstance(self.ckpt_steps, list | tuple)
             and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.ckpt_steps),
             f"config field ckpt_steps must be a list of integers >= 0, got {self.ckpt_steps!r}.")
        self.ckpt_steps = sorted(set(self.ckpt_steps))
        need(self.schedule is None or isinstance(self.schedule, dict | str),
             "config field schedule must be a schedule mapping (e.g. {type: constant, weights: {...}}).")
        return self

    # ---- (de)serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain dict of all fields (JSON/YAML-able; a deep copy)."""
        # the JSON round trip copies; dataclasses.asdict would deep-copy a large schedule once more
        return json.loads(json.dumps({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}))

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
            atomic_write(path, text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Read a YAML config file (see :meth:`to_yaml`)."""
        where = f"config file {str(Path(path))!r}"
        d = read_yaml(path, where) or {}
        return cls.from_dict(d, where=where)

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
        """sha256 over the fields that determine the trajectory (all but :attr:`RUN_FIELDS`; an unset
        ``sampler_seed`` is left out, so runs made before that field existed keep their hash)."""
        d = {k: v for k, v in self.to_dict().items()
             if k not in self.RUN_FIELDS and not (k == "sampler_seed" and v is None)}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
