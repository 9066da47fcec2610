"""Model presets and the per-sequence loss, against closed forms and independent implementations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from commute.errors import CommuteError
from commute.model import PRESETS, build_model, count_parameters, lm_loss, model_config, sequence_losses

pytestmark = pytest.mark.usefixtures("one_thread")


def gpt2_param_count(n_layer: int, d: int, n_ctx: int, vocab: int, n_inner: int | None = None) -> int:
    """GPT-2 parameters by hand: embeddings (lm_head tied) + blocks + final layer norm."""
    f = n_inner or 4 * d
    block = (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (2 * d) + (d * f + f) + (f * d + d)
    return vocab * d + n_ctx * d + n_layer * block + 2 * d


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_parameter_counts(preset: str) -> None:
    p = PRESETS[preset]
    with torch.device("meta"):  # no memory, no init cost: shapes only
        model = build_model(preset, vocab_size=256)
    assert count_parameters(model) == gpt2_param_count(p["n_layer"], p["n_embd"], p["n_positions"], 256)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, counted once


def test_gpt2_preset_is_the_124m_model() -> None:
    with torch.device("meta"):
        model = build_model("gpt2", vocab_size=50257)
    assert count_parameters(model) == 124_439_808  # the published GPT-2 small size


def test_overrides_context_and_shapes() -> None:
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=97, n_ctx=16, n_layer=1, n_embd=32, n_head=2)
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_positions, c.vocab_size) == (1, 32, 2, 16, 97)
    assert c.resid_pdrop == c.embd_pdrop == c.attn_pdrop == 0.0
    ids = torch.randint(0, 97, (3, 16))
    assert model(ids).logits.shape == (3, 16, 97)
    assert sequence_losses(model, ids).shape == (3,)
    assert count_parameters(model) == gpt2_param_count(1, 32, 16, 97)


@pytest.mark.parametrize(
    "kwargs",
    [{"preset": "huge"}, {"attn_implementation": "flash"}, {"n_embdd": 3}, {"n_embd": 30, "n_head": 4}],
)
def test_bad_model_settings_are_one_sentence_errors(kwargs: dict) -> None:
    with pytest.raises(CommuteError):
        model_config(**kwargs)


def _tiny(dtype: torch.dtype = torch.float32, **kw):
    torch.manual_seed(1)
    return build_model("tiny", vocab_size=64, n_ctx=16, n_layer=1, n_embd=32, n_head=2, dtype=dtype, **kw)


def test_own_cross_entropy_matches_torch_and_hf_float32() -> None:
    model = _tiny()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    seq = sequence_losses(model, ids)
    logits = model(ids).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(seq, ref.view(4, 15).mean(-1), rtol=1e-6, atol=1e-6)
    hf = model(ids, labels=ids).loss  # HF shifts labels itself
    torch.testing.assert_close(lm_loss(model, ids), hf, rtol=1e-6, atol=1e-6)


def test_float64_path_is_float64_and_differentiable() -> None:
    model = _tiny(torch.float64)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    seq = sequence_losses(model, ids)
    assert seq.dtype == torch.float64
    logits = model(ids).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(seq, ref.view(2, 15).mean(-1), rtol=1e-13, atol=1e-13)
    # the float64 gradient agrees with a central finite difference to ~1e-9 (impossible in float32)
    p = model.transformer.h[0].mlp.c_fc.weight
    v = torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    (g,) = torch.autograd.grad(lm_loss(model, ids), p)
    eps = 1e-5
    with torch.no_grad():
        p.add_(eps * v)
        up = lm_loss(model, ids)
        p.sub_(2 * eps * v)
        down = lm_loss(model, ids)
        p.add_(eps * v)
    fd = (up - down) / (2 * eps)
    assert abs(float(fd - (g * v).sum())) < 1e-8 * max(1.0, abs(float(fd)))


def test_float32_model_with_float64_loss_upcasts_logits() -> None:
    model = _tiny()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    seq64 = sequence_losses(model, ids, dtype=torch.float64)
    assert seq64.dtype == torch.float64
    logits = model(ids).logits.double()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(seq64, ref.view(2, 15).mean(-1), rtol=1e-13, atol=1e-13)


def test_eager_and_sdpa_attention_agree() -> None:
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(6))
    a = _tiny(attn_implementation="eager")
    b = _tiny(attn_implementation="sdpa")
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(sequence_losses(a, ids), sequence_losses(b, ids), rtol=1e-5, atol=1e-5)


def test_lm_loss_accepts_a_batch_object_and_rejects_bad_input() -> None:
    from commute.data import Batch

    model = _tiny()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(7))
    batch = Batch(input_ids=ids, domain=torch.zeros(2, dtype=torch.long), step=0)
    assert torch.equal(lm_loss(model, batch), lm_loss(model, ids))
    with pytest.raises(CommuteError):
        lm_loss(model, ids[0])
    with pytest.raises(CommuteError):
        lm_loss(model, ids[:, :1])
