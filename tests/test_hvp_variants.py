"""The HVP variants of ``commute.bracket`` (issue 11 §3) on the tiny GPT-2 in float64.

* every mode of :func:`hvps` / :func:`hvp_function` equals reverse-over-reverse to <= 1e-10 relative, as a
  whole and on every parameter tensor, including GPT-2's LayerNorm rows (where ``jvp(jacrev(...))`` goes
  wrong on torch 2.13, docs/design.md §2) and the tied input/output embedding;
* reverse-over-reverse itself against central finite differences of the gradient on those rows;
* ``lie_bracket`` / ``bracket_projection`` take g_i, g_j from the HVPs' own passes: fewer loss evaluations,
  the same numbers as the textbook composition of ``grad`` and ``hvp`` to float rounding;
* the ``torch.compile`` variant (tens of seconds of compile on a CPU) only with ``COMMUTE_TEST_COMPILE=1``.
"""

from __future__ import annotations

import os

import pytest
import torch

from commute.bracket import (
    bracket_projection,
    grad,
    hvp,
    hvp_function,
    hvps,
    lie_bracket,
    tree_dot,
    tree_sub,
)
from commute.curvature import domain_losses, math_attention
from commute.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
TOL = 1e-10
FWD_MODES = ["fwd-rev", "fwd-rev-vmap"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def flat(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([p[k].reshape(-1) for k in sorted(p)])


@pytest.fixture(scope="module")
def gpt2_tiny():
    """The ``tiny`` preset in float64 on two short batches: losses of a parameter dict, the parameters, and
    three random directions."""
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=256, dtype=DT).eval()
    gen = torch.Generator().manual_seed(1)
    batches = {d: [torch.randint(0, 256, (2, 24), generator=gen)] for d in ("a", "b")}
    losses = domain_losses(model, batches)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    vs = [{k: torch.randn(p.shape, generator=gen, dtype=DT) for k, p in params.items()} for _ in range(3)]
    with math_attention():
        ref = hvps(losses["a"], params, vs)
    return losses, params, vs, ref


def test_fixture_has_tied_embeddings_and_layernorms(gpt2_tiny):
    _, params, _, _ = gpt2_tiny
    assert "lm_head.weight" not in params and "transformer.wte.weight" in params  # tied: listed once
    ln = [k for k in params if ".ln_" in k]
    assert len(ln) == 2 * 2 * 2 + 2  # ln_1, ln_2 (weight, bias) per block, and ln_f


@pytest.mark.parametrize("mode", FWD_MODES)
def test_hvps_modes_equal_rev_rev_on_every_row(gpt2_tiny, mode):
    losses, params, vs, ref = gpt2_tiny
    with math_attention():
        out = hvps(losses["a"], params, vs, mode=mode)
    assert len(out) == len(vs)
    for hv, r in zip(out, ref, strict=True):
        assert set(hv) == set(params)
        assert rel(flat(hv), flat(r)) <= TOL
        for k in params:  # every tensor: LayerNorm weights and biases, the tied wte, attention, MLP
            assert rel(hv[k], r[k]) <= TOL, k


@pytest.mark.parametrize("mode", ["rev-rev", *FWD_MODES])
def test_layernorm_and_tied_embedding_rows(gpt2_tiny, mode):
    """The rows where jvp(jacrev(...)) fails on torch 2.13: LayerNorm weights (and biases), and the tied
    embedding, which gets curvature from both the input lookup and the output projection. Each mode against
    reverse-over-reverse to 1e-10, and reverse-over-reverse against central differences of the gradient."""
    losses, params, vs, ref = gpt2_tiny
    rows = [k for k in params if ".ln_" in k] + ["transformer.wte.weight"]
    with math_attention():
        hv = hvps(losses["a"], params, vs[:1], mode=mode)[0]
    for k in rows:
        assert rel(hv[k], ref[0][k]) <= TOL, k
    if mode == "rev-rev":
        norm = float(torch.linalg.vector_norm(flat(vs[0])))
        h = 1e-4 / norm  # a step of 1e-4 along the unit direction
        plus = grad(losses["a"], {k: p + h * vs[0][k] for k, p in params.items()})
        minus = grad(losses["a"], {k: p - h * vs[0][k] for k, p in params.items()})
        for k in rows:
            fd = (plus[k] - minus[k]) / (2 * h)
            assert rel(ref[0][k], fd) <= 1e-8, k


@pytest.mark.parametrize("mode", ["rev-rev", *FWD_MODES])
def test_hvp_function_is_reusable(gpt2_tiny, mode):
    losses, params, vs, ref = gpt2_tiny
    fn = hvp_function(losses["a"], mode)
    with math_attention():
        first = fn(params, vs[:2])
        again = fn(params, vs[2:])
    for hv, r in zip(first + again, ref, strict=True):
        assert rel(flat(hv), flat(r)) <= TOL
    assert fn(params, []) == []


def test_modes_on_a_plain_tensor_and_bad_modes():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(6, 6, generator=gen, dtype=DT)
    x0 = torch.randn(6, generator=gen, dtype=DT)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(a @ torch.tanh(x), 0) + (x**4).sum()

    vs = [torch.randn(6, generator=gen, dtype=DT) for _ in range(2)]
    ref = hvps(loss, x0, vs)
    for mode in FWD_MODES:
        for hv, r in zip(hvps(loss, x0, vs, mode=mode), ref, strict=True):
            assert rel(hv, r) <= 1e-13
    with pytest.raises(ValueError, match="unknown HVP mode"):
        hvps(loss, x0, vs, mode="rev-fwd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot be compiled"):
        hvp_function(loss, "rev-rev", compile=True)


# --------------------------------------------------------------------------------------------------
# lie_bracket / bracket_projection reuse the HVPs' passes
# --------------------------------------------------------------------------------------------------
def counting(loss):
    calls = [0]

    def f(p):
        calls[0] += 1
        return loss(p)

    return f, calls


@pytest.mark.parametrize("mode", ["rev-rev", "fwd-rev"])
def test_lie_bracket_reuses_gradients_same_result(gpt2_tiny, mode):
    losses, params, _, _ = gpt2_tiny
    la, lb = losses["a"], losses["b"]
    with math_attention():
        composed = tree_sub(hvp(lb, params, grad(la, params), mode), hvp(la, params, grad(lb, params), mode))
        fa, ca = counting(la)
        fb, cb = counting(lb)
        r = lie_bracket(fa, fb, params, mode)
        # before: grad + hvp of each loss (2 evaluations each); now g_i, g_j come from the HVP passes
        assert (ca[0], cb[0]) == ((1, 1) if mode == "rev-rev" else (2, 1))
        assert rel(flat(r), flat(composed)) <= 1e-12
        for k in params:
            assert rel(r[k], composed[k]) <= 1e-10, k

        p_ref = float(tree_dot(composed, grad(la, params)))
        ca[0] = cb[0] = 0
        p = bracket_projection(fa, fb, fa, params, mode)  # target = L_i: its gradient is reused too
        assert (ca[0], cb[0]) == ((1, 1) if mode == "rev-rev" else (2, 1))
        assert abs(p - p_ref) <= 1e-12 * abs(p_ref)

        ft, ct = counting(lambda q: 0.5 * (la(q) + lb(q)))
        p_mix = bracket_projection(fa, fb, ft, params, mode)
        p_mix_ref = float(tree_dot(composed, grad(lambda q: 0.5 * (la(q) + lb(q)), params)))
        assert ct[0] == 1 and abs(p_mix - p_mix_ref) <= 1e-12 * abs(p_mix_ref)


def test_lie_bracket_on_a_plain_tensor_and_linear_losses():
    """Tensor parameters, and a loss linear in the parameters (no second-order graph: H = 0)."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(5, generator=gen, dtype=DT)
    x0 = torch.randn(5, generator=gen, dtype=DT)

    def l1(x):
        return torch.cosh(x).sum() + (w * x).sum() ** 2

    def l2(x):
        return (w * x).sum()  # linear: H_2 = 0, so R = -H_1 g_2

    for mode in ("rev-rev", "fwd-rev"):
        r = lie_bracket(l1, l2, x0, mode)
        ref = tree_sub(hvp(l2, x0, grad(l1, x0)), hvp(l1, x0, grad(l2, x0)))
        assert rel(r, ref) <= 1e-13
        assert rel(r, -hvp(l1, x0, w)) <= 1e-13


# --------------------------------------------------------------------------------------------------
# torch.compile (slow: compiles per shape)
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("COMMUTE_TEST_COMPILE") != "1",
                    reason="torch.compile takes about a minute per shape on a CPU: COMMUTE_TEST_COMPILE=1")
@pytest.mark.parametrize("mode", FWD_MODES)
def test_compiled_hvps_equal_rev_rev(gpt2_tiny, mode):
    losses, params, vs, ref = gpt2_tiny
    torch._dynamo.reset()
    fn = hvp_function(losses["a"], mode, compile=True, dynamic=False)
    with math_attention():
        out = fn(params, vs)
    for hv, r in zip(out, ref, strict=True):
        assert rel(flat(hv), flat(r)) <= TOL
        for k in params:
            assert rel(hv[k], r[k]) <= TOL, k
    torch._dynamo.reset()
