"""Tests of commute.estimate against independent truth.

* Noisy linear regression (float64): every domain k has x ~ N(0, S_k), y = x . beta_k + noise, so the
  population loss L_k = (theta - beta_k)^T S_k (theta - beta_k) / 2 + const has g_k = S_k (theta - beta_k) and
  H_k = S_k in closed form. Over 200 independent repeats the estimator is unbiased and its stderr calibrated,
  while a naive same-batch estimator (the core's ``bracket_projection`` on one batch) is visibly biased.
* A tiny Hugging Face GPT-2 (tied embeddings, dropout on in its config, eager and SDPA attention): P on fixed
  batches against central finite differences of gradients.
* predict_excess_loss against exact simulation of the intervention with discrete gradient steps.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from commute import CommuteError
from commute.bracket import bracket_projection
from commute.estimate import BracketEstimator, BracketReport, Estimate

DT = torch.float64


# --------------------------------------------------------------------------------------------------
# noisy linear regression with known population quantities
# --------------------------------------------------------------------------------------------------
class Regression:
    """K linear-regression domains with closed-form population gradients and Hessians."""

    def __init__(self, K: int = 3, d: int = 4, batch: int = 8, noise: float = 1.0, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.K, self.d, self.batch, self.noise = K, d, batch, noise
        self.names = [chr(ord("a") + k) for k in range(K)]
        self.chol = [torch.randn(d, d, dtype=DT, generator=g) / d**0.5 + 0.5 * torch.eye(d, dtype=DT)
                     for _ in range(K)]
        self.S = [c @ c.T for c in self.chol]  # H_k
        self.beta = [torch.randn(d, dtype=DT, generator=g) for _ in range(K)]
        self.model = nn.Linear(d, 1, bias=False).to(DT)
        with torch.no_grad():
            self.model.weight.copy_(torch.randn(1, d, dtype=DT, generator=g))
        self.theta = self.model.weight.detach().reshape(-1).clone()

    def pop_grad(self, k: int, theta: torch.Tensor | None = None) -> torch.Tensor:
        theta = self.theta if theta is None else theta
        return self.S[k] @ (theta - self.beta[k])

    def true_P(self, i: int, j: int, c: list[float]) -> float:
        """g_L . H_j g_i - g_L . H_i g_j with the population quantities."""
        gL = sum(ck * self.pop_grad(k) for k, ck in enumerate(c))
        return float(gL @ self.S[j] @ self.pop_grad(i) - gL @ self.S[i] @ self.pop_grad(j))

    def sample(self, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        X = torch.randn(self.batch, self.d, dtype=DT, generator=gen) @ self.chol[k].T
        y = X @ self.beta[k] + self.noise * torch.randn(self.batch, dtype=DT, generator=gen)
        return X, y

    def stream(self, k: int, gen: torch.Generator):
        while True:
            yield self.sample(k, gen)

    def streams(self, gen: torch.Generator) -> dict:
        return {n: self.stream(k, gen) for k, n in enumerate(self.names)}

    @staticmethod
    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        X, y = batch
        return 0.5 * ((model(X).squeeze(-1) - y) ** 2).mean()


def test_unbiased_and_calibrated_over_200_repeats() -> None:
    prob = Regression(K=3, noise=1.0, seed=0)
    gen = torch.Generator().manual_seed(1)
    est = BracketEstimator(prob.model, prob.loss_fn, prob.streams(gen))
    G, repeats = 20, 200
    w, dw, steps, lr = {"a": 0.5, "b": 0.3, "c": 0.2}, 0.1, 10, 0.01
    quantities: dict[tuple, tuple[float, list[Estimate]]] = {}
    for _ in range(repeats):
        rep = est.estimate(n_grad_batches=2 * G, n_hvp_batches=G, n_groups=G)
        assert rep.mode == "pairs" and rep.n_hvp == G * 3 * 2
        for a in range(3):
            for b in range(a + 1, 3):
                for t, c in [("a", [1, 0, 0]), ("b", [0, 1, 0]), ("c", [0, 0, 1]), ("mix", [1 / 3] * 3)]:
                    key = (prob.names[a], prob.names[b], t)
                    quantities.setdefault(key, (prob.true_P(a, b, c), []))[1].append(rep.P(*key))
        # K = 3 prediction, Cor. 3.2a: dw eps^2 sum_k w_k [P(a, k; L) - P(b, k; L)], L = mix
        mix = [1 / 3] * 3
        pxy = sum(w[n] * (prob.true_P(0, k, mix) - prob.true_P(1, k, mix)) for k, n in enumerate(prob.names))
        quantities.setdefault(("predict",), (dw * (lr * steps) ** 2 * pxy, []))[1].append(
            rep.predict_excess_loss("a", "b", "mix", dw, steps, lr, weights=w))
    pooled = []
    for key, (truth, ests) in quantities.items():
        means = np.array([e.mean for e in ests])
        z = np.array([(e.mean - truth) / e.stderr for e in ests])
        se_of_mean = means.std(ddof=1) / math.sqrt(repeats)
        assert abs(means.mean() - truth) < 3 * se_of_mean, (key, truth, means.mean(), se_of_mean)
        # t with G - 1 = 19 degrees of freedom: P(|t| < 2) = 0.94
        coverage = float(np.mean(np.abs(z) < 2))
        assert 0.90 <= coverage <= 0.99, (key, coverage)
        pooled.append(coverage)
        # the signal is not buried: the truth is a few stderr of the mean away from 0
        assert abs(truth) > 3 * se_of_mean or key[-1] in {"b", "c"}, (key, truth, se_of_mean)
    assert 0.92 <= np.mean(pooled) <= 0.96, np.mean(pooled)


def test_naive_same_batch_estimator_is_biased() -> None:
    """The core's bracket_projection on a single batch per domain (g and H from the same batch) is biased:
    E[g_a^ . H_b g_a^] = g_a . H_b g_a + tr(H_b Cov g_a^). The grouped estimator is not (test above)."""
    prob = Regression(K=3, noise=1.0, seed=0)
    gen = torch.Generator().manual_seed(2)
    theta = prob.theta.clone()

    def batch_loss(batch: tuple[torch.Tensor, torch.Tensor]):
        X, y = batch
        return lambda th: 0.5 * ((X @ th - y) ** 2).mean()

    vals = []
    for _ in range(1000):
        la, lb = batch_loss(prob.sample(0, gen)), batch_loss(prob.sample(1, gen))
        vals.append(bracket_projection(la, lb, la, theta))  # P(a, b; L_a), everything from the same batches
    vals = np.array(vals)
    truth = prob.true_P(0, 1, [1, 0, 0])
    se = vals.std(ddof=1) / math.sqrt(len(vals))
    assert abs(vals.mean() - truth) > 6 * se, (vals.mean(), truth, se)


# --------------------------------------------------------------------------------------------------
# exactness on fixed batches, HVP accounting, modes
# --------------------------------------------------------------------------------------------------
def _counting(loss_fn):
    calls = [0]

    def wrapped(model, batch):
        calls[0] += 1
        return loss_fn(model, batch)

    return wrapped, calls


def test_modes_agree_and_hvp_count(monkeypatch) -> None:
    prob = Regression(K=3, seed=3)
    autograd_calls: list[str] = []
    real_grad = torch.autograd.grad

    def spy(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False, **kw):
        autograd_calls.append("graph" if create_graph else "hvp" if grad_outputs is not None else "grad")
        return real_grad(outputs, inputs, grad_outputs=grad_outputs, retain_graph=retain_graph,
                         create_graph=create_graph, **kw)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    reports = {}
    for mode, targets in [("pairs", None), ("targets", None), ("auto", ["mix"]), ("auto", None)]:
        gen = torch.Generator().manual_seed(5)  # identical batches for every run
        loss_fn, calls = _counting(prob.loss_fn)
        est = BracketEstimator(prob.model, loss_fn, prob.streams(gen))
        autograd_calls.clear()
        rep = est.estimate(n_grad_batches=24, n_hvp_batches=9, targets=targets, n_groups=3, mode=mode)
        M = len(rep.targets)
        per_batch = {"pairs": 3 * 2, "targets": 3 * M, "auto": min(3 * M, 3 * 2)}[mode]
        assert rep.hvp_per_batch == per_batch
        assert rep.n_hvp == est.n_hvp == 9 * per_batch == autograd_calls.count("hvp")
        # one double-backward graph per domain per HVP batch, shared by all its HVPs
        assert autograd_calls.count("graph") == 3 * 9 and autograd_calls.count("grad") == 3 * 24
        assert calls[0] == 3 * (24 + 9)  # every batch is evaluated once
        assert rep.grad_batches == 24 and rep.hvp_batches == 9 and rep.n_grad == 3 * 24
        reports[(mode, M)] = rep
    assert reports[("auto", 1)].mode == "targets" and reports[("auto", 4)].mode == "pairs"
    for t in ["a", "b", "c", "mix"]:
        for i, j in [("a", "b"), ("b", "c"), ("c", "a")]:
            p, q = reports[("pairs", 4)].p_samples(i, j, t), reports[("targets", 4)].p_samples(i, j, t)
            np.testing.assert_allclose(p, q, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(reports[("auto", 1)].p_samples("a", "c", "mix"),
                               reports[("pairs", 4)].p_samples("a", "c", "mix"), rtol=1e-10, atol=1e-12)
    # pairs mode answers any target afterwards; targets mode only those in the span of its targets
    pr = reports[("pairs", 4)]
    np.testing.assert_allclose(pr.p_samples("a", "b", {"a": 2.0, "c": -1.0}),
                               2 * pr.p_samples("a", "b", "a") - pr.p_samples("a", "b", "c"), rtol=1e-12)
    with pytest.raises(CommuteError, match="not a combination"):
        reports[("auto", 1)].P("a", "b", {"a": 1.0})


def test_fixed_batches_give_exact_bracket_of_the_batch_losses() -> None:
    """With one fixed batch per domain every group sees the same losses: P equals the core's exact
    bracket_projection of those batch losses, with zero spread."""
    prob = Regression(K=2, seed=4)
    gen = torch.Generator().manual_seed(0)
    fixed = {n: prob.sample(k, gen) for k, n in enumerate(prob.names)}
    est = BracketEstimator(prob.model, prob.loss_fn, {n: _repeat(b) for n, b in fixed.items()})
    rep = est.estimate(8, 4, n_groups=4)

    def batch_loss(batch):
        X, y = batch
        return lambda th: 0.5 * ((X @ th - y) ** 2).mean()

    la, lb = batch_loss(fixed["a"]), batch_loss(fixed["b"])
    for t, lt in [("a", la), ("b", lb), ("mix", lambda th: 0.5 * (la(th) + lb(th)))]:
        e = rep.P("a", "b", t)
        assert e.mean == pytest.approx(bracket_projection(la, lb, lt, prob.theta), rel=1e-10)
        assert e.stderr <= 1e-12 * abs(e.mean)
        assert rep.P("b", "a", t).mean == -e.mean
    assert rep.P("a", "a", "mix").mean == 0.0
    json.dumps(rep.to_dict(), allow_nan=False)  # z = inf (zero spread) is written as null


def _repeat(batch):
    while True:
        yield batch


@pytest.mark.parametrize("mode", ["pairs", "targets"])
def test_target_data_is_the_held_out_loss(mode: str) -> None:
    """``target_data``: g_L is the exact gradient of the mean loss over a fixed held-out set (the same in
    every group); with one fixed training batch per domain P is exactly bracket_projection with that
    held-out loss as the target, and differs from the training target's. No A half is drawn."""
    prob = Regression(K=2, seed=4)
    gen = torch.Generator().manual_seed(0)
    fixed = {n: prob.sample(k, gen) for k, n in enumerate(prob.names)}
    held = {n: [prob.sample(k, gen), prob.sample(k, gen)] for k, n in enumerate(prob.names)}
    drawn = dict.fromkeys(prob.names, 0)

    def counting(n, b):
        while True:
            drawn[n] += 1
            yield b

    est = BracketEstimator(prob.model, prob.loss_fn, {n: counting(n, b) for n, b in fixed.items()})
    rep = est.estimate(8, 4, ["a", "mix"], n_groups=4, mode=mode, target_data=held)
    assert rep.meta["target_data"] == {"a": 2, "b": 2} and drawn == {"a": 12, "b": 12}  # 8 B + 4 HVP each
    plain = est.estimate(8, 4, ["a", "mix"], n_groups=4, mode=mode)

    def batch_loss(batch):
        X, y = batch
        return lambda th: 0.5 * ((X @ th - y) ** 2).mean()

    la, lb = batch_loss(fixed["a"]), batch_loss(fixed["b"])
    ha = lambda th: 0.5 * sum(batch_loss(b)(th) for b in held["a"])  # noqa: E731
    hb = lambda th: 0.5 * sum(batch_loss(b)(th) for b in held["b"])  # noqa: E731
    for t, lt in [("a", ha), ("mix", lambda th: 0.5 * (ha(th) + hb(th)))]:
        e = rep.P("a", "b", t)
        assert e.mean == pytest.approx(bracket_projection(la, lb, lt, prob.theta), rel=1e-10)
        assert e.stderr <= 1e-12 * abs(e.mean)
        assert abs(plain.P("a", "b", t).mean - e.mean) > 0.05 * abs(e.mean)
    with pytest.raises(CommuteError, match="non-empty list of batches for domain 'b'"):
        est.estimate(8, 4, ["mix"], n_groups=4, mode=mode, target_data={"a": held["a"]})
    with pytest.raises(CommuteError, match="map each target domain"):
        est.estimate(8, 4, ["a"], n_groups=4, mode=mode, target_data=[held["a"]])


def test_target_data_groups_average_their_own_batches() -> None:
    """With ``target_data`` each group's inner gradient is the mean over *all* its 2·n_half gradient batches
    and its Hessian the mean over its HVP batches, in draw order (distinct batches, closed form per group);
    ``mode="auto"`` takes "targets" when the held-out set lacks a domain; a bad held-out batch is named."""
    prob = Regression(K=3, seed=6)
    gen = torch.Generator().manual_seed(1)
    draws = {n: [prob.sample(k, gen) for _ in range(12)] for k, n in enumerate(prob.names)}
    held = {n: [prob.sample(k, gen)] for k, n in enumerate(prob.names)}
    est = BracketEstimator(prob.model, prob.loss_fn, {n: iter(b) for n, b in draws.items()})
    rep = est.estimate(8, 4, ["a"], n_groups=2, mode="pairs", target_data=held)  # per group: 4 B + 2 HVP
    th = prob.theta

    def g(batch):
        X, y = batch
        return X.T @ (X @ th - y) / len(y)

    def H(batch):
        X, _ = batch
        return X.T @ X / len(X)

    gL = g(held["a"][0])
    for grp in range(2):
        B = {n: torch.stack([g(b) for b in draws[n][6 * grp:6 * grp + 4]]).mean(0) for n in prob.names}
        Hs = {n: torch.stack([H(b) for b in draws[n][6 * grp + 4:6 * grp + 6]]).mean(0) for n in prob.names}
        for i, j in (("a", "b"), ("b", "c"), ("c", "a")):
            want = float(gL @ Hs[j] @ B[i] - gL @ Hs[i] @ B[j])
            assert rep.p_samples(i, j, "a")[grp] == pytest.approx(want, rel=1e-10)
    # auto: with targets on a and b only, pairs would need c's held-out set; targets does not
    two = {"t": {"a": 1.0}, "u": {"b": 1.0}}  # K·M = K(K−1) = 6: auto alone would take pairs
    fresh = {n: _repeat(b[0]) for n, b in draws.items()}
    assert BracketEstimator(prob.model, prob.loss_fn, fresh).estimate(
        8, 4, two, n_groups=2, target_data={"a": held["a"], "b": held["b"]}).mode == "targets"
    assert BracketEstimator(prob.model, prob.loss_fn, fresh).estimate(8, 4, two, n_groups=2).mode == "pairs"
    X, y = held["b"][0]
    with pytest.raises(CommuteError, match=r"non-finite loss \(nan\) on target_data batch 0 of domain 'b'\."):
        BracketEstimator(prob.model, prob.loss_fn, fresh).estimate(
            8, 4, ["a", "b"], n_groups=2, target_data={"a": held["a"], "b": [(X, y * float("nan"))]})


# --------------------------------------------------------------------------------------------------
# a tiny Hugging Face GPT-2 against finite differences
# --------------------------------------------------------------------------------------------------
def _gpt2(attn: str) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=256, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=None,
                     eos_token_id=None, attn_implementation=attn)  # dropout 0.1 by default
    return GPT2LMHeadModel(cfg).to(DT).train()


def _ce(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Own float64 next-token cross-entropy (HF's loss casts to float32)."""
    logits = model(input_ids=ids).logits[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_against_finite_differences(attn: str) -> None:
    model = _gpt2(attn)
    assert model.lm_head.weight is model.transformer.wte.weight
    g = torch.Generator().manual_seed(0)
    fixed = {"en": torch.randint(0, 128, (3, 12), generator=g),   # two "domains" over different bytes
             "ru": torch.randint(128, 256, (3, 12), generator=g)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.transformer.h[1].eval()  # a mixed train/eval state must come back as it was
    modes = [m.training for m in model.modules()]
    est = BracketEstimator(model, _ce, {d: _repeat(b) for d, b in fixed.items()})
    assert len(est.params) == len(list(model.parameters())) == len(before)  # tied tensor once
    rep = est.estimate(4, 2, n_groups=2, progress=True)
    assert [m.training for m in model.modules()] == modes  # modes restored
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())

    # independent truth, first-order only: H_j v ~ (grad L_j(theta + h v) - grad L_j(theta - h v)) / 2h
    model.eval()
    params = list(model.parameters())

    def grad_at(d: str) -> list[torch.Tensor]:
        return list(torch.autograd.grad(_ce(model, fixed[d]), params))

    def fd_hvp(d: str, v: list[torch.Tensor]) -> list[torch.Tensor]:
        h = 1e-6 / math.sqrt(sum(float((x * x).sum()) for x in v))
        with torch.no_grad():
            for p, x in zip(params, v, strict=True):
                p.add_(x, alpha=h)
        plus = grad_at(d)
        with torch.no_grad():
            for p, x in zip(params, v, strict=True):
                p.add_(x, alpha=-2 * h)
        minus = grad_at(d)
        with torch.no_grad():
            for p, x in zip(params, v, strict=True):
                p.add_(x, alpha=h)
        return [(a - b) / (2 * h) for a, b in zip(plus, minus, strict=True)]

    def dot(a, b):
        return float(sum((x * y).sum() for x, y in zip(a, b, strict=True)))

    g_en, g_ru = grad_at("en"), grad_at("ru")
    h_ru_g_en, h_en_g_ru = fd_hvp("ru", g_en), fd_hvp("en", g_ru)
    g_mix = [(a + b) / 2 for a, b in zip(g_en, g_ru, strict=True)]
    for t, gL in [("en", g_en), ("ru", g_ru), ("mix", g_mix)]:
        fd = dot(gL, h_ru_g_en) - dot(gL, h_en_g_ru)
        e = rep.P("en", "ru", t)
        assert e.mean == pytest.approx(fd, rel=1e-6), (t, e.mean, fd)
        assert e.stderr <= 1e-9 * abs(e.mean)  # dropout was off: all groups agree


# --------------------------------------------------------------------------------------------------
# predict_excess_loss against exact simulation of the intervention
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [2, 3])
def test_predict_excess_loss_matches_simulated_intervention(K: int) -> None:
    """Gradient descent on fixed-dataset quadratics: the antisymmetric excess (EL^ij - EL^ji)/2 of the
    eq. 9/10 intervention approaches dw (lr T)^2 P(X, Y; L) (docs/design.md §1), with error O(lr T)."""
    prob = Regression(K=K, batch=32, seed=6)
    gen = torch.Generator().manual_seed(7)
    data = [prob.sample(k, gen) for k in range(K)]
    est = BracketEstimator(prob.model, prob.loss_fn, {n: _repeat(data[k]) for k, n in enumerate(prob.names)})
    rep = est.estimate(4, 2, n_groups=2)
    X = [x.numpy() for x, _ in data]
    y = [yy.numpy() for _, yy in data]
    H = [x.T @ x / len(x) for x in X]
    b = [x.T @ yy / len(x) for x, yy in zip(X, y, strict=True)]

    def loss(k, th):
        return 0.5 * np.mean((X[k] @ th - y[k]) ** 2)

    def run(th, w, n, lr):
        for _ in range(n):
            th = th - lr * sum(wk * (H[k] @ th - b[k]) for k, wk in enumerate(w))
        return th

    w = np.full(K, 1.0 / K) if K == 2 else np.array([0.2, 0.5, 0.3])
    wd = dict(zip(prob.names, w, strict=True))
    i, j, dw, T = 0, 1, 0.1, 8
    e = np.zeros(K)
    e[i], e[j] = dw, -dw
    theta0 = prob.theta.numpy()
    target = K - 1  # L = the last domain's loss
    errs = []
    for lr in [2e-3, 2e-4]:
        base = run(theta0, w, 2 * T, lr)
        th_ij = run(run(theta0, w + e, T, lr), w - e, T, lr)
        th_ji = run(run(theta0, w - e, T, lr), w + e, T, lr)
        el_ij = loss(target, th_ij) - loss(target, base)
        el_ji = loss(target, th_ji) - loss(target, base)
        antisym = (el_ij - el_ji) / 2
        names = prob.names
        pred = rep.predict_excess_loss(names[i], names[j], names[target], dw, T, lr, weights=wd)
        assert pred.stderr <= 1e-9 * abs(pred.mean)
        errs.append(abs(antisym / pred.mean - 1))
    assert errs[1] < 0.02 and errs[1] < errs[0] / 5, errs  # O(dt): measured 0.096, 0.010


# --------------------------------------------------------------------------------------------------
# report plumbing and user errors
# --------------------------------------------------------------------------------------------------
def test_report_roundtrip_table_and_dtype(tmp_path) -> None:
    prob = Regression(K=2, seed=8)
    gen = torch.Generator().manual_seed(0)
    # float32 data in a dict batch and in a dataclass batch: cast to the model's float64, on its device
    @dataclasses.dataclass
    class XY:
        X: torch.Tensor
        y: torch.Tensor

    streams = {"a": ({"X": X.float(), "y": y.float()} for X, y in prob.stream(0, gen)),
               "b": (XY(X.float(), y.float()) for X, y in prob.stream(1, gen))}
    seen = []

    def loss_fn(model, batch):
        X, y = (batch["X"], batch["y"]) if isinstance(batch, dict) else (batch.X, batch.y)
        seen.append((X.dtype, y.dtype))
        return prob.loss_fn(model, (X, y))

    rep = BracketEstimator(prob.model, loss_fn, streams).estimate(
        20, 10, targets={"A": {"a": 1.0}, "avg": {"a": 0.5, "b": 0.5}}, n_groups=5)
    assert set(seen) == {(DT, DT)}
    path = rep.to_json(tmp_path / "sub" / "report.json")
    back = BracketReport.from_json(path)
    assert json.loads(path.read_text())["n_hvp"] == rep.n_hvp == 2 * 10
    for t in ["A", "avg", {"b": 1.0}]:
        assert back.P("a", "b", t) == rep.P("a", "b", t)
    assert back.predict_excess_loss("a", "b", "avg", 0.1, 5, 0.01) == rep.predict_excess_loss(
        "a", "b", "avg", 0.1, 5, 0.01)
    text = str(rep)
    assert "a -> b" in text and "avg" in text and f"{rep.n_hvp} HVPs" in text
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(rep.rich_table())
    assert "a -> b" in console.export_text()
    e = rep.P("a", "b", "avg")
    lo, hi = e.interval(0.95)
    assert lo < e.mean < hi and e.z == pytest.approx(e.mean / e.stderr)


def test_user_errors_are_commute_errors() -> None:
    prob = Regression(K=2, seed=9)
    gen = torch.Generator().manual_seed(0)
    short = {n: [prob.sample(k, gen) for _ in range(6)] for k, n in enumerate(prob.names)}
    prob.model.train()
    est = BracketEstimator(prob.model, prob.loss_fn, short)
    with pytest.raises(CommuteError, match="ran out of batches"):
        est.estimate(8, 4, n_groups=2)
    assert prob.model.training  # restored after the failure
    with pytest.raises(CommuteError, match="n_grad_batches"):
        est.estimate(2, 1, n_groups=2)
    with pytest.raises(CommuteError, match="unknown domain"):
        est.estimate(4, 1, targets={"x": {"zz": 1.0}}, n_groups=2)
    bad = BracketEstimator(prob.model, lambda m, b: m(b[0]).squeeze(-1), short)  # not a scalar
    with pytest.raises(CommuteError, match="0-d"):
        bad.estimate(4, 2, n_groups=2)
    with pytest.raises(CommuteError, match="at least two domains"):
        BracketEstimator(prob.model, prob.loss_fn, {"a": short["a"]})
    rep = est.estimate(4, 2, n_groups=2)
    with pytest.raises(CommuteError, match="unknown domain"):
        rep.P("a", "zz", "mix")
    with pytest.raises(CommuteError, match="outside"):
        rep.predict_excess_loss("a", "b", "mix", 0.6, 10, 0.1)


# --------------------------------------------------------------------------------------------------
# one inner product, one prediction formula, one progress bar, one atomic write (shared helpers)
# --------------------------------------------------------------------------------------------------
def test_inner_products_are_tree_dot_accumulated_in_float64(monkeypatch) -> None:
    import commute.estimate as estimate_mod
    from commute.bracket import tree_dot

    dtypes = []

    def spy(a, b, dtype=None):
        dtypes.append(dtype)
        return tree_dot(a, b, dtype=dtype)

    monkeypatch.setattr(estimate_mod, "tree_dot", spy)
    prob = Regression(K=3, seed=10)
    rep = BracketEstimator(prob.model.float(), prob.loss_fn, prob.streams(torch.Generator().manual_seed(0)))
    rep = rep.estimate(8, 4, n_groups=2, mode="pairs")
    assert len(dtypes) == 2 * (4 // 2) * 3 * 2 * 3  # groups x HVP batches x K(K-1) HVPs x 3 basis targets
    assert set(dtypes) == {torch.float64}
    # float32 leaves summed in float64: the float64 sum of the float32 products, not a float32 sum
    g = torch.Generator().manual_seed(0)
    a = {"w": 1 + torch.rand(1000, 1000, generator=g), "b": torch.rand(7, generator=g)}
    b = {"w": 1 + torch.rand(1000, 1000, generator=g), "b": torch.rand(7, generator=g)}
    ref = sum(float((a[k] * b[k]).double().sum()) for k in a)
    got = tree_dot(a, b, dtype=torch.float64)
    assert got.dtype == torch.float64 and float(got) == pytest.approx(ref, rel=1e-14)
    assert tree_dot(a, b).dtype == torch.float32  # the default is unchanged


def test_predict_excess_loss_goes_through_intervention_excess(monkeypatch) -> None:
    import commute.estimate as estimate_mod
    from commute.bracket import intervention_excess

    calls = []

    def spy(P, delta_w, steps, lr):
        calls.append((delta_w, steps, lr))
        return intervention_excess(P, delta_w, steps, lr)

    monkeypatch.setattr(estimate_mod, "intervention_excess", spy)
    prob = Regression(K=2, seed=11)
    rep = BracketEstimator(prob.model, prob.loss_fn, prob.streams(torch.Generator().manual_seed(0))).estimate(
        8, 4, n_groups=4)
    e = rep.predict_excess_loss("a", "b", "mix", 0.1, 7, 0.03)
    assert calls == [(0.1, 7, 0.03)]
    expect = Estimate.from_samples(0.1 * (0.03 * 7) ** 2 * rep.p_samples("a", "b", "mix"))
    assert e.mean == pytest.approx(expect.mean, rel=1e-12)
    assert e.stderr == pytest.approx(expect.stderr, rel=1e-12)


def test_progress_is_the_library_progress_bar(monkeypatch) -> None:
    import commute.estimate as estimate_mod
    from commute.progress import Progress

    assert not hasattr(estimate_mod, "_Progress")
    seen = []

    class Spy(Progress):
        def __init__(self, description, total, **kw):
            super().__init__(description, total, **kw)
            seen.append({"total": total, "enabled": kw.get("enabled"), "advanced": 0})

        def advance(self, n=1):
            seen[-1]["advanced"] += n
            super().advance(n)

    monkeypatch.setattr(estimate_mod, "Progress", Spy)
    prob = Regression(K=3, seed=12)
    est = BracketEstimator(prob.model, prob.loss_fn, prob.streams(torch.Generator().manual_seed(0)))
    est.estimate(12, 6, n_groups=3, progress=True)
    # per group and domain: 2 x 2 gradient batches and 2 HVP batches
    assert seen == [{"total": 3 * 3 * (4 + 2), "enabled": True, "advanced": 3 * 3 * (4 + 2)}]


def test_to_json_writes_atomically_through_commute_io(monkeypatch, tmp_path) -> None:
    import commute.io as io_mod
    from commute.io import atomic_write

    written = []

    def spy(path, data):
        written.append(str(path))
        return atomic_write(path, data)

    monkeypatch.setattr(io_mod, "atomic_write", spy)  # the reports' to_json (commute.io.JsonRoundTrip)
    prob = Regression(K=2, seed=13)
    rep = BracketEstimator(prob.model, prob.loss_fn, prob.streams(torch.Generator().manual_seed(0))).estimate(
        4, 2, n_groups=2)
    path = rep.to_json(tmp_path / "r.json")
    assert written == [str(tmp_path / "r.json")] and path == tmp_path / "r.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary file left behind
    assert BracketReport.from_json(path).P("a", "b", "a") == rep.P("a", "b", "a")


# --------------------------------------------------------------------------------------------------
# inputs that used to give a silent 0 ± 0 or a traceback
# --------------------------------------------------------------------------------------------------
def test_loss_without_a_gradient_path_to_the_parameters_is_refused() -> None:
    prob = Regression(K=2, seed=14)
    stray = nn.Parameter(torch.zeros(3, dtype=DT))  # not used by the loss: the bracket over it is no answer
    est = BracketEstimator(prob.model, prob.loss_fn, prob.streams(torch.Generator().manual_seed(0)),
                           parameters=[stray])
    with pytest.raises(CommuteError, match="no gradient path") as e:
        est.estimate(4, 2, n_groups=2)
    assert "\n" not in str(e.value)
    # the loss uses only some parameters: fine, the unused ones have zero gradient and Hessian rows
    partial = BracketEstimator(prob.model, prob.loss_fn, prob.streams(torch.Generator().manual_seed(0)),
                               parameters=[stray, prob.model.weight])
    assert math.isfinite(partial.estimate(4, 2, n_groups=2).P("a", "b", "mix").mean)


@pytest.mark.parametrize("bad", [256, 1000, -1])
@pytest.mark.parametrize("wrap", ["tensor", "dict"])
def test_token_id_outside_the_vocabulary_is_one_sentence(bad: int, wrap: str) -> None:
    model = _gpt2("eager")  # vocab_size 256
    g = torch.Generator().manual_seed(0)
    ids = {d: torch.randint(0, 256, (2, 8), generator=g) for d in ("en", "ru")}
    ids["ru"][1, 3] = bad
    batches = {d: _repeat(x if wrap == "tensor" else {"input_ids": x}) for d, x in ids.items()}

    def loss_fn(model, batch):
        return _ce(model, batch if wrap == "tensor" else batch["input_ids"])

    with pytest.raises(CommuteError, match="outside the model's vocabulary of 256") as e:
        BracketEstimator(model, loss_fn, batches).estimate(4, 2, n_groups=2)
    assert f"token id {bad}" in str(e.value) and "'ru'" in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# the order tournament
# --------------------------------------------------------------------------------------------------
def test_tournament_is_the_row_sum_of_the_pairs_with_K_hvps_per_batch(monkeypatch) -> None:
    """Brute force: the K(K-1) pairs one by one on the same batches; the tournament's S_i equals sum_j P(i, j)
    group by group, with K HVPs (one double-backward graph per domain) per HVP batch instead of K(K-1)."""
    prob = Regression(K=4, seed=15)
    counts: list[str] = []
    real_grad = torch.autograd.grad

    def spy(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False, **kw):
        counts.append("graph" if create_graph else "hvp" if grad_outputs is not None else "grad")
        return real_grad(outputs, inputs, grad_outputs=grad_outputs, retain_graph=retain_graph,
                         create_graph=create_graph, **kw)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    G, n_grad, n_hvp = 3, 12, 6
    brute_est = BracketEstimator(prob.model, prob.loss_fn, prob.streams(torch.Generator().manual_seed(3)))
    pairs = brute_est.estimate(n_grad, n_hvp, n_groups=G, mode="pairs")
    assert counts.count("hvp") == pairs.n_hvp == n_hvp * 4 * 3
    for target, name in [(None, "mix"), ("c", "c"), ({"a": 0.7, "d": 0.3}, "target")]:
        counts.clear()
        est = BracketEstimator(prob.model, prob.loss_fn, prob.streams(torch.Generator().manual_seed(3)))
        tour = est.tournament(target, n_grad, n_hvp, n_groups=G)
        assert tour.target == name and tour.n_groups == G
        assert counts.count("hvp") == tour.n_hvp == est.n_hvp == n_hvp * 4 and tour.hvp_per_batch == 4
        assert counts.count("graph") == n_hvp * 4 and counts.count("grad") == n_grad * 4
        weights = target if isinstance(target, dict) else tour.target_weights
        for i in prob.names:
            brute = sum(pairs.p_samples(i, j, weights) for j in prob.names if j != i)
            got = tour.score_groups[:, prob.names.index(i)]
            np.testing.assert_allclose(got, brute, rtol=1e-10, atol=1e-14)
            for j in prob.names:
                np.testing.assert_allclose(tour.P(i, j).mean, pairs.P(i, j, weights).mean, rtol=1e-10,
                                           atol=1e-14)
        # the same ranking from the pairs report, no new HVP
        again = pairs.tournament(weights if target is not None else "mix")
        np.testing.assert_allclose(again.score_groups, tour.score_groups, rtol=1e-10, atol=1e-14)
        means = tour.score_groups.mean(axis=0)
        assert tour.order == [prob.names[k] for k in np.argsort(means)]
        assert np.allclose(tour.score_groups.sum(axis=1), 0.0, atol=1e-12)  # antisymmetry: scores sum to 0
    assert pairs.tournament("mix").target_weights == {n: 0.25 for n in prob.names}


def test_tournament_matches_the_closed_form_on_fixed_batches() -> None:
    """S_i = g_i . U - u_i . G_sum with u_k = H_k g_L (module docstring), from numpy on the batch losses."""
    prob = Regression(K=3, batch=16, seed=16)
    gen = torch.Generator().manual_seed(0)
    data = [prob.sample(k, gen) for k in range(3)]
    est = BracketEstimator(prob.model, prob.loss_fn, {n: _repeat(data[k]) for k, n in enumerate(prob.names)})
    tour = est.tournament("b", 4, 2, n_groups=2)
    th = prob.theta.numpy()
    H = [x.numpy().T @ x.numpy() / len(x) for x, _ in data]
    g = [Hk @ th - x.numpy().T @ y.numpy() / len(x) for Hk, (x, y) in zip(H, data, strict=True)]
    u = [Hk @ g[1] for Hk in H]
    U, Gs = sum(u), sum(g)
    for k, n in enumerate(prob.names):
        e = tour.score(n)
        assert e.mean == pytest.approx(g[k] @ U - u[k] @ Gs, rel=1e-10) and e.stderr <= 1e-12 * abs(e.mean)
    d = tour.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["order"] == tour.order and set(d["scores"]) == set(prob.names)
    text = str(tour)
    assert "first to last" in text and " -> ".join(tour.order) in text
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(tour.rich_table())
    assert tour.order[0] in console.export_text()
    with pytest.raises(CommuteError, match="every domain once"):
        tour.order_score(["a", "b"])
    with pytest.raises(CommuteError, match="unknown target"):
        est.tournament("zz", 4, 2, n_groups=2)


def test_order_score_predicts_training_the_domains_one_after_another() -> None:
    """Exact gradient flows on fixed-batch quadratics (K = 3): training the domains in order o for dt each,
    against 3 dt on their uniform mix, changes L by (dt^2/2) sum_{a<b} P(o_a, o_b; L) + O(dt^3); the
    tournament's order beats its reverse."""
    import itertools

    from scipy.linalg import expm

    prob = Regression(K=3, batch=32, seed=17)
    gen = torch.Generator().manual_seed(1)
    data = [prob.sample(k, gen) for k in range(3)]
    est = BracketEstimator(prob.model, prob.loss_fn, {n: _repeat(data[k]) for k, n in enumerate(prob.names)})
    tour = est.tournament("mix", 4, 2, n_groups=2)
    X = [x.numpy() for x, _ in data]
    H = [x.T @ x / len(x) for x in X]
    b = [x.T @ y.numpy() / len(x) for x, (_, y) in zip(X, data, strict=True)]

    def flow(th, Hk, bk, t):  # exact gradient flow of 0.5 th'H th - b'th for time t
        star = np.linalg.solve(Hk, bk)
        return star + expm(-Hk * t) @ (th - star)

    def L(th):  # the uniform-mix target, up to a constant
        return float(np.mean([0.5 * th @ Hk @ th - bk @ th for Hk, bk in zip(H, b, strict=True)]))

    th0 = prob.theta.numpy()
    errs = []
    for dt in [0.01, 0.001]:
        base = L(flow(th0, sum(H) / 3, sum(b) / 3, 3 * dt))
        worst = 0.0
        for order in itertools.permutations(range(3)):
            th = th0
            for k in order:
                th = flow(th, H[k], b[k], dt)
            pred = dt**2 / 2 * tour.order_score([prob.names[k] for k in order]).mean
            worst = max(worst, abs((L(th) - base) / pred - 1))
        errs.append(worst)
        first = [prob.names.index(d) for d in tour.order]
        seq = {o: th0 for o in ("order", "reverse")}
        for o, ks in (("order", first), ("reverse", first[::-1])):
            for k in ks:
                seq[o] = flow(seq[o], H[k], b[k], dt)
        assert L(seq["order"]) < L(seq["reverse"])
    assert errs[1] < 0.02 and errs[1] < errs[0] / 5, errs  # O(dt): measured 0.096, 0.010
