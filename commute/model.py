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

from typing import Any

import torch
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel

from commute.errors import CommuteError

__all__ = ["PRESETS", "build_model", "model_config", "sequence_losses", "lm_loss", "count_parameters"]

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
    if preset not in PRESETS:
        raise CommuteError(f"Unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    if attn_implementation not in _ATTN:
        raise CommuteError(
            f"Unknown attention implementation {attn_implementation!r}; choose one of {', '.join(_ATTN)}."
        )
    kwargs: dict[str, Any] = {**_COMMON, **PRESETS[preset], "vocab_size": int(vocab_size)}
    if n_ctx is not None:
        kwargs["n_positions"] = int(n_ctx)
    unknown = sorted(k for k in overrides if not hasattr(GPT2Config(), k))
    if unknown:
        raise CommuteError(f"Unknown GPT-2 config field(s) {', '.join(unknown)} in the model overrides.")
    kwargs.update(overrides)
    if kwargs["n_embd"] % kwargs["n_head"] != 0:
        raise CommuteError(f"n_embd={kwargs['n_embd']} is not divisible by n_head={kwargs['n_head']}.")
    return GPT2Config(attn_implementation=attn_implementation, **kwargs)


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
    model = GPT2LMHeadModel(config)
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
