"""Model presets (GPT-2 built from a config, no pretrained weights) and the per-sequence LM loss.

The paper's bilingual experiment (§4.2, Appendix C) pre-trains a GPT-2 (124M) from scratch; the presets
here give the same architecture at sizes a CPU can train:

========  =======  ======  =======  =====  ==============================
preset    n_layer  n_embd  n_head   n_ctx  parameters (byte vocab, 256)
========  =======  ======  =======  =====  ==============================
``tiny``        2     128        4    128  0.45 M
``small``       4     256        4    256  3.3 M
``gpt2``       12     768       12   1024  86.0 M (124.4 M with GPT-2's 50257 vocab)
========  =======  ======  =======  =====  ==============================

Dropout is off in every preset: the Lie-bracket analysis is about the deterministic loss surface, and it
makes a resumed run bitwise-identical without replaying dropout masks. Input and output embeddings are
tied, as in GPT-2 (docs/design.md §2: ``named_parameters()`` lists the tied tensor once).

The loss is our own cross-entropy, not Hugging Face's (which casts logits to float32, docs/design.md §2), so a
float64 model gives a float64 loss:

    L(x) = 1/(T-1) * sum_{t=1}^{T-1} [ logsumexp(z_t) - z_t[x_{t+1}] ],   z_t = logits at position t.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import torch
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel

from commute.errors import CommuteError

__all__ = ["PRESETS", "build_model", "model_config", "check_overrides", "parameter_bytes", "sequence_losses",
           "lm_loss", "count_parameters"]

#: GPT2Config keyword arguments of each preset (sizes only; see :func:`build_model` for the rest).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 128},
    "small": {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 256},
    "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024},
}

#: Settings shared by all presets (overridable): no dropout, no KV cache, tied embeddings.
_COMMON: dict[str, Any] = {
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "use_cache": False,
    "tie_word_embeddings": True,
    "bos_token_id": None,
    "eos_token_id": None,
}

_ATTN = ("eager", "sdpa")


def model_config(
    preset: str = "tiny",
    vocab_size: int = 256,
    n_ctx: int | None = None,
    attn_implementation: str = "eager",
    **overrides: Any,
) -> GPT2Config:
    """The :class:`~transformers.GPT2Config` of a preset with ``overrides`` (GPT2Config kwargs) applied.

    ``n_ctx`` sets the context length (``n_positions``). ``attn_implementation`` is ``"eager"`` (default;
    safe for Hessian-vector products) or ``"sdpa"`` (faster; HVPs then need the MATH backend,
    docs/design.md §2).
    """
    if not isinstance(preset, str) or preset not in PRESETS:
        raise CommuteError(f"Unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    if not isinstance(attn_implementation, str) or attn_implementation not in _ATTN:
        raise CommuteError(
            f"Unknown attention implementation {attn_implementation!r}; choose one of {', '.join(_ATTN)}."
        )
    kwargs: dict[str, Any] = {**_COMMON, **PRESETS[preset]}
    sizes = {"vocab_size": _int_like(vocab_size)}
    if n_ctx is not None:
        sizes["n_positions"] = _int_like(n_ctx)
    kwargs.update(check_overrides({**sizes, **overrides}))
    if kwargs["n_embd"] % kwargs["n_head"] != 0:
        raise CommuteError(f"n_embd={kwargs['n_embd']} is not divisible by n_head={kwargs['n_head']}.")
    try:
        return GPT2Config(attn_implementation=attn_implementation, **kwargs)
    except Exception as exc:  # transformers' own field validation: one line of it
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1].strip()
        raise CommuteError(f"the model overrides are not a valid GPT-2 config ({first}).") from None


def _int_like(v: Any) -> Any:
    """Python and numpy integers as int (booleans and everything else unchanged, for the checks)."""
    return int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v


#: integer size fields of GPT2Config and their largest allowed values (beyond them a typo asks for terabytes)
_SIZES = {"n_layer": 4096, "n_embd": 65536, "n_head": 65536, "n_positions": 2**20, "vocab_size": 2**24}
_PROBABILITIES = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout")


def check_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """GPT2Config keyword arguments checked for type and range, one :class:`CommuteError` sentence naming
    the first bad field (``model_overrides.<field>``); float fields given as integers become floats."""
    from transformers.activations import ACT2FN

    default = GPT2Config()
    unknown = sorted(str(k) for k in overrides if not isinstance(k, str) or not hasattr(default, k))
    if unknown:
        raise CommuteError(f"Unknown GPT-2 config field(s) {', '.join(unknown)} in the model overrides.")
    out: dict[str, Any] = {}
    for k, v in overrides.items():
        name = f"model_overrides.{k}"
        is_int = isinstance(v, int) and not isinstance(v, bool)
        is_num = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        if k in _SIZES:
            if not (is_int and 1 <= v <= _SIZES[k]):
                raise CommuteError(f"{name} must be an integer from 1 to {_SIZES[k]:,}, got {v!r}.")
        elif k == "n_inner":
            if v is not None and not (is_int and 1 <= v <= 2**20):
                raise CommuteError(f"{name} must be null (4 × n_embd) or an integer from 1 to {2**20:,}, "
                                   f"got {v!r}.")
        elif k in _PROBABILITIES:
            if not (is_num and 0 <= v <= 1):
                raise CommuteError(f"{name} must be a probability in [0, 1], got {v!r}.")
            v = float(v)
        elif k == "layer_norm_epsilon":
            if not (is_num and v > 0):
                raise CommuteError(f"{name} must be a finite number > 0, got {v!r}.")
            v = float(v)
        elif k == "initializer_range":
            if not (is_num and v >= 0):
                raise CommuteError(f"{name} must be a finite number >= 0, got {v!r}.")
            v = float(v)
        elif k == "activation_function":
            if not (isinstance(v, str) and v in ACT2FN):
                raise CommuteError(f"{name} must be an activation such as gelu_new, gelu or relu, got {v!r}.")
        else:  # any other field: the type of GPT2Config's default
            d = getattr(default, k)
            if isinstance(d, bool) and not isinstance(v, bool):
                raise CommuteError(f"{name} must be true or false, got {v!r}.")
            token_id = v is None and k.endswith("_id")
            if isinstance(d, int) and not isinstance(d, bool) and not (is_int or token_id):
                raise CommuteError(f"{name} must be an integer, got {v!r}.")
            if isinstance(d, float):
                if not is_num:
                    raise CommuteError(f"{name} must be a finite number, got {v!r}.")
                v = float(v)
            if isinstance(d, str) and not isinstance(v, str):
                raise CommuteError(f"{name} must be a string, got {v!r}.")
        out[k] = v
    return out


def parameter_bytes(config: GPT2Config, dtype: torch.dtype) -> int:
    """Approximate bytes of a GPT-2's weights: embeddings and, per block, attention, MLP and norms."""
    d, n_layer = config.n_embd, config.n_layer
    inner = config.n_inner or 4 * d
    n = (config.vocab_size + config.n_positions) * d + 2 * d
    n += n_layer * (4 * d * d + 4 * d + 2 * d * inner + inner + d + 4 * d)
    return n * torch.empty((), dtype=dtype).element_size()


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def build_model(
    preset: str = "tiny",
    vocab_size: int = 256,
    n_ctx: int | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
    **overrides: Any,
) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 (``GPT2LMHeadModel``) of the given preset; no weights are downloaded.

    Initialisation uses the global torch RNG (seed it with ``torch.manual_seed`` for reproducibility).
    """
    config = model_config(preset, vocab_size, n_ctx, attn_implementation, **overrides)
    need, have = parameter_bytes(config, torch.float32), _physical_memory()
    if have is not None and need > have:
        raise CommuteError(f"the model would need about {need / 2**30:,.1f} GiB for its weights alone, "
                           f"more than this machine's {have / 2**30:,.1f} GiB; choose a smaller model.")
    try:
        model = GPT2LMHeadModel(config)
    except (RuntimeError, MemoryError) as exc:
        if isinstance(exc, RuntimeError) and "alloc" not in str(exc):
            raise
        raise CommuteError(f"out of memory while building the model ({need / 2**30:,.1f} GiB of weights); "
                           "choose a smaller model.") from None
    return model.to(dtype=dtype)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameter elements (tied tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


def _ids(batch: Any) -> Tensor:
    ids = getattr(batch, "input_ids", batch)
    if isinstance(ids, dict):
        ids = ids["input_ids"]
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise CommuteError("A language-model batch must be a [batch, seq_len] tensor of token ids.")
    return ids


def sequence_losses(model: torch.nn.Module, input_ids: Any, dtype: torch.dtype | None = None) -> Tensor:
    """Mean next-token cross-entropy of each sequence, shape ``[B]``.

    ``input_ids`` is a ``[B, T]`` LongTensor (or anything with an ``.input_ids`` attribute, e.g. a
    :class:`commute.data.Batch`). The cross-entropy is computed here, in ``dtype`` (default: the logits'
    dtype, promoted to at least float32), as ``logsumexp(z_t) - z_t[x_{t+1}]`` averaged over the ``T-1``
    predicted positions; so a float64 model gives a float64 loss (unlike Hugging Face's loss).
    """
    ids = _ids(input_ids)
    if ids.shape[1] < 2:
        raise CommuteError("Sequences need at least 2 tokens to have a next-token loss.")
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1, :]
    if dtype is None:
        dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(dtype)
    targets = ids[:, 1:].unsqueeze(-1)
    nll = torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets).squeeze(-1)
    return nll.mean(dim=-1)


def lm_loss(model: torch.nn.Module, input_ids: Any) -> Tensor:
    """Scalar mean next-token cross-entropy of a batch (the estimator's ``loss_fn(model, batch)``)."""
    return sequence_losses(model, input_ids).mean()
