"""ResponseEstimator (the schedule gradient on noisy runs, docs/design.md §1b) against independent truth.

* Full-batch limit: streams that always yield the whole data and training batches whose loss is the exact
  mixture give :func:`schedule_response`'s exact G (GD, SGD, Adam, AdamW; a tanh MLP and a tiny GPT-2 with
  tied embeddings), and G0 equals the first-order alignment computed directly from the trajectory.
* Noisy linear regression (population g_k = S_k (theta - beta_k), H_k = S_k in closed form): over many
  repeats with fresh training batches and fresh streams, the mean estimate equals the population answer
  given the trajectory (GD: closed-form adjoint; Adam: adjoint through torch.func.vjp of optimizer_step),
  and the stderr is calibrated. And the mean over many trajectories of a long noisy Adam window equals the
  derivative of the *expected* loss, by vectorised Monte Carlo with common random numbers.
* Cost: one graph per domain per step per group, the HVPs on it, nothing spanning two steps.
* Replay: the replayed theta_end equals real torch.optim runs (SGD, Adam, AdamW; states and settings read
  from the live optimiser or its state dict) and commute.train.train_step on a GPT-2 with a MixtureSampler.
* JSON round trip, predictions, and one-sentence errors.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import LiveSaved
from scipy.stats import t as student_t
from torch import nn

from commute.errors import CommuteError
from commute.response import (
    OptimizerState,
    ResponseEstimator,
    ResponseReport,
    intervention_delta,
    optimizer_settings,
    optimizer_step,
    schedule_response,
)
from commute.schedule import Intervention

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# a tanh MLP on three fixed classification domains
# --------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, d: int = 4, h: int = 6, c: int = 3) -> None:
        super().__init__()
        self.l1 = nn.Linear(d, h)
        self.l2 = nn.Linear(h, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


def ce(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def mixture_loss(model: nn.Module, batch) -> torch.Tensor:
    """A training batch that is every domain's full data with the step's weights: sum_k w_k L_k exactly."""
    w, data = batch
    return sum(w[k] * ce(model, data[k]) for k in data)


def mlp_problem(seed: int = 0, n: int = 16):
    torch.manual_seed(seed)
    model = MLP().to(DT)
    gen = torch.Generator().manual_seed(seed)
    data = {}
    for k in "abc":
        x = torch.randn(n, 4, generator=gen, dtype=DT) + torch.randn(4, generator=gen, dtype=DT)
        y = (x @ (2 * torch.randn(4, 3, generator=gen, dtype=DT))).argmax(1)
        data[k] = (x, y)
    return model, data


def random_weights(steps: int, domains: str, seed: int = 1) -> list[dict[str, float]]:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.rand(steps, len(domains), generator=gen, dtype=DT) + 0.2
    raw = raw / raw.sum(1, keepdim=True)
    return [{d: float(x) for d, x in zip(domains, row, strict=True)} for row in raw]


def functional_losses(model: nn.Module, data, loss=ce):
    return {k: (lambda q, b=b: loss(lambda x: torch.func.functional_call(model, q, (x,)), b))
            for k, b in data.items()}


def rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return float((a - b).norm() / b.norm())


def direct_G0(losses, target, params, weights, lrs, name, state, kw):
    """G0_k(t) = <(dU_t/dg)^T (grad L(theta_end), 0, 0), g_k(theta_t)> on the exact trajectory, written out
    with optimizer_step and torch.func.vjp."""
    traj, p, s = [], params, state or OptimizerState()
    for w, lr in zip(weights, lrs, strict=True):
        q = {k: x.detach().requires_grad_(True) for k, x in p.items()}
        g = dict(zip(q, torch.autograd.grad(sum(w[d] * f(q) for d, f in losses.items()), list(q.values())),
                     strict=True))
        traj.append((p, s, g))
        p, s = optimizer_step(p, g, s, lr, name, **kw)
    q = {k: x.detach().requires_grad_(True) for k, x in p.items()}
    lam = dict(zip(q, torch.autograd.grad(target(q), list(q.values())), strict=True))
    out = {d: [] for d in losses}
    for (p, s, g), lr in zip(traj, lrs, strict=True):
        _, vjp = torch.func.vjp(lambda gg, p=p, s=s, lr=lr: optimizer_step(p, gg, s, lr, name, **kw)[0], g)
        (a_g,) = vjp(lam)
        for d, f in losses.items():
            q = {k: x.detach().requires_grad_(True) for k, x in p.items()}
            gk = torch.autograd.grad(f(q), list(q.values()))
            out[d].append(float(sum((a_g[k] * x).sum() for k, x in zip(q, gk, strict=True))))
    return out


# --------------------------------------------------------------------------------------------------
# 1. the full-batch limit is schedule_response
# --------------------------------------------------------------------------------------------------
FULL = [
    ("gd", {}, 0.5, False),
    ("sgd", {"momentum": 0.9, "weight_decay": 0.05}, 0.1, True),
    ("adam", {"eps": 1e-3, "weight_decay": 0.1}, 0.01, False),
    ("adamw", {"betas": (0.8, 0.99)}, 0.01, True),
]


@pytest.mark.parametrize("case", FULL, ids=[f"{c[0]}-{'warm' if c[3] else 'fresh'}" for c in FULL])
def test_full_batch_limit_is_the_exact_response(case) -> None:
    name, kw, lr0, warm = case
    model, data = mlp_problem()
    losses = functional_losses(model, data)
    n = 8
    weights = random_weights(n, "abc")
    lrs = [lr0 * (1 + 0.05 * t) for t in range(n)]
    state = None
    if warm:  # 4 real torch steps; the estimator reads the live optimiser (state and settings)
        opt = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name](model.parameters(), lr=lr0, **kw)
        for _ in range(4):
            opt.zero_grad()
            mixture_loss(model, ({k: 1 / 3 for k in data}, data)).backward()
            opt.step()
        state = OptimizerState.from_torch(opt, dict(model.named_parameters()))
        for p in model.parameters():
            p.grad = None
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    targets = {"a": {"a": 1.0}, "mix": {"a": 0.5, "b": 0.3, "c": 0.2}}
    est = ResponseEstimator(model, ce, {k: itertools.repeat(b) for k, b in data.items()}, lr=lrs,
                            state=opt if warm else None, optimizer=None if warm else name,
                            train_loss_fn=mixture_loss, **({} if warm else kw))
    assert est.optimizer == name
    rep = est.estimate([(w, data) for w in weights], weights, targets, n_groups=3)
    for tname, c in targets.items():
        target = lambda q, c=c: sum(x * losses[d](q) for d, x in c.items())  # noqa: E731
        ref = schedule_response(losses, params, weights, lrs, target, name, state, **kw)
        g0 = direct_G0(losses, target, params, weights, lrs, name, state, kw)
        for d in data:
            assert rel(rep.G(tname)[d], ref.G[d]) <= 1e-10, (tname, d)
            assert rel(rep.G0(tname)[d], g0[d]) <= 1e-10, (tname, d)
            assert np.all(rep.stderr(tname)[d] <= 1e-12 * np.abs(rep.G(tname)[d]).max())
        assert rep.loss(tname).mean == pytest.approx(ref.loss, rel=1e-12)
        # G0 is a different quantity: curvature and the optimiser's carry-over matter over 8 steps
        assert rel(rep.G0(tname)["a"], ref.G["a"]) > 0.05


@pytest.mark.parametrize("name", ["gd", "adam"])
def test_target_data_is_the_held_out_loss(name: str) -> None:
    """``target_data``: the trajectory and every step's quantities from the training domains, the target
    measured on a fixed held-out set of two batches per domain: G is exactly schedule_response's with
    L_k = the mean loss over those batches, and differs from the training-loss target's."""
    model, data = mlp_problem()
    held = {k: [(x + 0.3, y), (x[:5] - 0.2, y[:5])] for k, (x, y) in mlp_problem(seed=7)[1].items()}
    losses = functional_losses(model, data)
    held_losses = {k: (lambda q, b=b: sum(0.5 * ce(lambda x: torch.func.functional_call(model, q, (x,)), bb)
                                          for bb in b)) for k, b in held.items()}
    n, kw, lr = 6, ({} if name == "gd" else {"eps": 1e-3}), (0.5 if name == "gd" else 0.01)
    weights = random_weights(n, "abc")
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    est = ResponseEstimator(model, ce, {k: itertools.repeat(b) for k, b in data.items()}, lr=lr,
                            optimizer=name, train_loss_fn=mixture_loss, **kw)
    rep = est.estimate([(w, data) for w in weights], weights, ["a", "mix"], n_groups=2, target_data=held)
    assert rep.meta["target_data"] == {"a": 2, "b": 2, "c": 2}
    plain = est.estimate([(w, data) for w in weights], weights, ["a"], n_groups=2)
    for tname, c in {"a": {"a": 1.0}, "mix": {k: 1 / 3 for k in "abc"}}.items():
        target = lambda q, c=c: sum(x * held_losses[d](q) for d, x in c.items())  # noqa: E731
        ref = schedule_response(losses, params, weights, lr, target, name, **kw)
        for d in data:
            assert rel(rep.G(tname)[d], ref.G[d]) <= 1e-10, (tname, d)
        assert rep.loss(tname).mean == pytest.approx(ref.loss, rel=1e-12)
    assert rel(plain.G("a")["b"], rep.G("a")["b"]) > 0.05
    with pytest.raises(CommuteError, match="not both"):
        est.estimate([(w, data) for w in weights], weights, ["a"], target_data=held, target_batches=2)
    with pytest.raises(CommuteError, match="non-empty list of batches for domain 'b'"):
        est.estimate([(w, data) for w in weights], weights, ["mix"], target_data={"a": held["a"], "b": []})


@pytest.mark.parametrize("name", ["gd", "adam"])
def test_full_batch_limit_gpt2_tied_embeddings(name: str) -> None:
    from commute.curvature import domain_losses, model_params
    from commute.model import build_model, lm_loss

    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=32, n_layer=1, n_embd=16, n_head=2, n_positions=16, dtype=DT)
    assert model.lm_head.weight is model.transformer.wte.weight
    gen = torch.Generator().manual_seed(0)
    data = {"en": torch.randint(0, 16, (4, 12), generator=gen),
            "ru": torch.randint(12, 32, (4, 12), generator=gen)}
    weights = [{"en": 0.7, "ru": 0.3}, {"en": 0.5, "ru": 0.5}, {"en": 0.2, "ru": 0.8}]
    kw, lr = ({}, 0.5) if name == "gd" else ({"eps": 1e-3}, 0.01)

    def train_loss(m, batch):
        w, d = batch
        return sum(w[k] * lm_loss(m, d[k]) for k in d)

    est = ResponseEstimator(model, lm_loss, {k: itertools.repeat(b) for k, b in data.items()}, lr=lr,
                            optimizer=name, train_loss_fn=train_loss, **kw)
    assert "lm_head.weight" not in est.names and "transformer.wte.weight" in est.names
    rep = est.estimate([(w, data) for w in weights], weights, ["ru"], n_groups=2)
    losses = domain_losses(model, {k: [b] for k, b in data.items()})
    ref = schedule_response(losses, model_params(model), weights, lr, "ru", name, **kw)
    for d in data:
        assert rel(rep.G("ru")[d], ref.G[d]) <= 1e-10, d
    assert model.training  # modes restored


# --------------------------------------------------------------------------------------------------
# 2. unbiased and calibrated on noisy linear regression
# --------------------------------------------------------------------------------------------------
class Regression:
    """K regression domains: x ~ N(0, S_k), y = x . beta_k + noise; L_k = (theta - beta_k)^T S_k
    (theta - beta_k) / 2 + const, g_k = S_k (theta - beta_k), H_k = S_k."""

    def __init__(self, K: int = 3, d: int = 4, noise: float = 1.0, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.names = "abc"[:K]
        self.d, self.noise = d, noise
        self.chol = [torch.randn(d, d, dtype=DT, generator=g) / d**0.5 + 0.5 * torch.eye(d, dtype=DT)
                     for _ in range(K)]
        self.S = [c @ c.T for c in self.chol]
        self.beta = [torch.randn(d, dtype=DT, generator=g) for _ in range(K)]
        self.model = nn.Linear(d, 1, bias=False).to(DT)
        with torch.no_grad():
            self.model.weight.copy_(torch.randn(1, d, dtype=DT, generator=g))
        self.theta0 = self.model.weight.detach().reshape(-1).clone()

    def sample(self, k: int, n: int, gen: torch.Generator):
        X = torch.randn(n, self.d, dtype=DT, generator=gen) @ self.chol[k].T
        return X, X @ self.beta[k] + self.noise * torch.randn(n, dtype=DT, generator=gen)

    def streams(self, n: int, gen: torch.Generator):
        def stream(k):
            while True:
                yield self.sample(k, n, gen)

        return {d: stream(k) for k, d in enumerate(self.names)}

    def train_batch(self, w: dict[str, float], n: int, gen: torch.Generator):
        """Sampling paradigm: each example's domain ~ w."""
        p = torch.tensor([w[d] for d in self.names], dtype=DT)
        counts = torch.bincount(torch.multinomial(p, n, replacement=True, generator=gen), minlength=len(p))
        parts = [self.sample(k, int(c), gen) for k, c in enumerate(counts) if c > 0]
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    @staticmethod
    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        X, y = batch
        return 0.5 * ((model(X).squeeze(-1) - y) ** 2).mean()

    def pop_grad(self, k: int, theta: torch.Tensor) -> torch.Tensor:
        return self.S[k] @ (theta - self.beta[k])

    def mu_sq(self, k: int, theta: torch.Tensor) -> torch.Tensor:
        return self.pop_grad(k, theta) ** 2

    def row_variance(self, k: int, theta: torch.Tensor) -> torch.Tensor:
        """Per-coordinate variance of one row's gradient x (x.u - e), u = theta - beta_k (Isserlis):
        S_ii (u^T S u + noise^2) + (S u)_i^2."""
        S, u = self.S[k], theta - self.beta[k]
        return torch.diagonal(S) * (u @ S @ u + self.noise**2) + (S @ u) ** 2


def regression_truth(prob: Regression, batches, weights, lrs, c, name="gd", kw=None, noise=None):
    """Population G and G0 given the trajectory of the training batches, written out independently: the
    trajectory by plain GD / optimizer_step on the batch gradient X^T (X theta - y) / B, the adjoint with the
    closed-form H_mix = sum_k w_k S_k and g_k. ``noise`` = (mode, B) adds Adam's sampling-noise channel
    < c, dVar(g)/dw_k > with c = diag(d2 <lambda, U_t>/dg2) / 2 from torch.func.hessian (the full matrix:
    its off-diagonal must vanish, U_t being elementwise) and the closed-form row variances and means."""
    kw = kw or {}
    K, n = len(prob.names), len(weights)
    theta, state, traj = prob.theta0.clone(), OptimizerState(), []
    for (X, y), lr in zip(batches, lrs, strict=True):
        g = X.T @ (X @ theta - y) / len(y)
        traj.append((theta, state, g))
        if name == "gd":
            theta = theta - lr * g
        else:
            theta, state = optimizer_step(theta, g, state, lr, name, **kw)
    lam_end = sum(ck * prob.pop_grad(k, theta) for k, ck in enumerate(c))
    G, G0 = np.zeros((K, n)), np.zeros((K, n))
    lam = (lam_end, torch.zeros_like(theta), torch.zeros_like(theta))
    for t in range(n - 1, -1, -1):
        th, st, g = traj[t]
        H = sum(weights[t][d] * prob.S[k] for k, d in enumerate(prob.names))
        gks = [prob.pop_grad(k, th) for k in range(K)]
        if name == "gd":
            a = (lam[0], None, None, -lrs[t] * lam[0])
            a0 = -lrs[t] * lam_end
        else:
            m = st.m if st.m is not None else torch.zeros_like(th)
            v = st.v if st.v is not None else torch.zeros_like(th)

            def U(p, m, v, g, st=st, t=t):
                p2, s2 = optimizer_step(p, g, OptimizerState(st.step, m, v), lrs[t], name, **kw)
                return p2, s2.m, s2.v

            _, vjp = torch.func.vjp(U, th, m, v, g)
            a = vjp(lam)
            a0 = vjp((lam_end, torch.zeros_like(th), torch.zeros_like(th)))[3]
        for k in range(K):
            G[k, t] = float(a[3] @ gks[k])
            G0[k, t] = float(a0 @ gks[k])
        if noise is not None:
            mode, B = noise
            def lam_u(gg, lam=lam, th=th, m=m, v=v):
                return sum((x * y).sum() for x, y in zip(lam, U(th, m, v, gg), strict=True))

            hess = torch.func.hessian(lam_u)(g)
            off = hess - torch.diag(torch.diagonal(hess))
            assert float(off.abs().max()) <= 1e-12 * (1 + float(hess.abs().max()))
            a_n = 0.5 * torch.diagonal(hess)
            mix = sum(weights[t][d] * gks[j] for j, d in enumerate(prob.names))
            for k in range(K):
                dvar = prob.row_variance(k, th)
                if mode == "sample":  # mu_k^2 - 2 mu_mix mu_k, the j = k product being mu_k^2
                    wk = weights[t][prob.names[k]]
                    dvar = dvar + (1 - 2 * wk) * prob.mu_sq(k, th) - 2 * (mix - wk * gks[k]) * gks[k]
                G[k, t] += float(a_n @ dvar) / B
        lam = (a[0] + H @ a[3], a[1], a[2])
    return G, G0


def _calibration(name: str, kw: dict, repeats: int, n: int, lr: float, G: int, seed: int, noise=None):
    prob = Regression(K=3, noise=1.0, seed=seed)
    weights = random_weights(n, prob.names, seed=seed + 1)
    lrs = [lr] * n
    targets = {"a": {"a": 1.0}, "mix": {d: 1 / 3 for d in prob.names}}
    gen = torch.Generator().manual_seed(seed + 2)
    dw = {d: torch.randn(n, generator=gen, dtype=DT).numpy() for d in prob.names}
    est = ResponseEstimator(prob.model, prob.loss_fn, prob.streams(8, gen), lr=lr, optimizer=name, **kw)
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for _ in range(repeats):
        batches = [prob.train_batch(w, 16, gen) for w in weights]
        extra = {} if noise is None else {"noise": noise[0], "train_batch_size": noise[1],
                                          "batches_per_step": 4}
        rep = est.estimate(batches, weights, targets, n_groups=G, **extra)
        for tname, c in targets.items():
            truth, truth0 = regression_truth(prob, batches, weights, lrs, [c.get(d, 0.0) for d in prob.names],
                                             name, kw, noise)
            dwm = np.stack([dw[d] for d in prob.names])
            checks = {
                f"predict {tname}": (rep.predict(tname, dw), float((truth * dwm).sum())),
                f"alignment {tname}": (rep.predict_alignment(tname, dw), float((truth0 * dwm).sum())),
                f"G_b(t=2) {tname}": (rep.at(tname, "b", 2), float(truth[1, 2])),
                f"G_c(t=n-1) {tname}": (rep.at(tname, "c", n - 1), float(truth[2, n - 1])),
            }
            for key, (e, tr) in checks.items():
                rows.setdefault(key, []).append((e.mean, e.stderr, tr))
    return rows


def _check_calibration(rows, G: int, lo: float, hi: float) -> dict[str, tuple[float, float]]:
    expected = 2 * student_t.cdf(2.0, G - 1) - 1
    out, pooled = {}, []
    for key, vals in rows.items():
        a = np.array(vals)
        err = a[:, 0] - a[:, 2]  # estimate - population truth (the truth differs per repeat: its trajectory)
        se = err.std(ddof=1) / math.sqrt(len(err))
        assert abs(err.mean()) < 3 * se, (key, err.mean(), se)
        coverage = float(np.mean(np.abs(err / a[:, 1]) < 2))
        assert lo <= coverage <= hi, (key, coverage, expected)
        # the signal is not buried in the noise of the mean
        assert np.abs(a[:, 2]).mean() > 3 * se, (key, np.abs(a[:, 2]).mean(), se)
        out[key] = (float(err.mean() / se), coverage)
        pooled.append(coverage)
    assert abs(np.mean(pooled) - expected) < 0.04, (np.mean(pooled), expected)
    return out


def test_gd_unbiased_and_calibrated_on_noisy_regression() -> None:
    """150 repeats, each with fresh training batches (so a fresh trajectory and truth) and fresh streams;
    8 groups (t_7: P(|t| < 2) = 0.91)."""
    rows = _calibration("gd", {}, repeats=150, n=6, lr=0.15, G=8, seed=0)
    _check_calibration(rows, G=8, lo=0.84, hi=0.97)


def test_adam_unbiased_and_calibrated_on_noisy_regression() -> None:
    """Adam's Jacobian is taken at the actual training gradient, so G stays multilinear in the fresh
    batches: unbiased for the population adjoint through Adam along the trajectory."""
    rows = _calibration("adam", {"eps": 1e-2, "betas": (0.8, 0.95)}, repeats=100, n=5, lr=0.05, G=8, seed=1)
    _check_calibration(rows, G=8, lo=0.82, hi=0.98)


@pytest.mark.parametrize("mode", ["exact", "sample"])
def test_adam_noise_channel_unbiased_and_calibrated(mode: str) -> None:
    """The sampling-noise channel against closed-form row variances (Isserlis) and means and an independent
    Hessian of the update: unbiased and calibrated given the trajectory (4 fresh batches per step)."""
    kw = {"eps": 1e-2, "betas": (0.8, 0.95)}
    rows = _calibration("adam", kw, repeats=80, n=5, lr=0.05, G=8, seed=2, noise=(mode, 16))
    _check_calibration(rows, G=8, lo=0.80, hi=0.99)


class TwoBatches:
    """A deterministic population for the noise channel: domain k's stream alternates two fixed batches A_k,
    B_k of n rows, so the estimator's every quantity is a function of theta: g_k = (g_A + g_B)/2,
    H_k = (X_A^T X_A + X_B^T X_B)/(2n), and from b = 2 batches s_k^2 = n (g_A - g_B)^2 / 2 and the unbiased
    mu_k^2 = g_A g_B."""

    def __init__(self, prob: Regression, n: int, gen: torch.Generator) -> None:
        self.names, self.theta0, self.noise = prob.names, prob.theta0, prob.noise
        self.batches = [(prob.sample(k, n, gen), prob.sample(k, n, gen)) for k in range(len(prob.names))]
        self.n = n
        self.S = [(a[0].T @ a[0] + b[0].T @ b[0]) / (2 * n) for a, b in self.batches]

    def _g(self, k: int, theta: torch.Tensor) -> list[torch.Tensor]:
        return [X.T @ (X @ theta - y) / self.n for X, y in self.batches[k]]

    def pop_grad(self, k: int, theta: torch.Tensor) -> torch.Tensor:
        ga, gb = self._g(k, theta)
        return (ga + gb) / 2

    def mu_sq(self, k: int, theta: torch.Tensor) -> torch.Tensor:
        ga, gb = self._g(k, theta)
        return ga * gb

    def row_variance(self, k: int, theta: torch.Tensor) -> torch.Tensor:
        ga, gb = self._g(k, theta)
        return self.n * (ga - gb) ** 2 / 2

    def streams(self):
        return {d: itertools.cycle(self.batches[k]) for k, d in enumerate(self.names)}


@pytest.mark.parametrize("mode", ["exact", "sample"])
@pytest.mark.parametrize("betas", [(0.8, 0.95), (0.5, 0.5)], ids=["b2=0.95", "b2=0.5"])
def test_adam_noise_channel_equals_its_definition_deterministically(mode: str, betas) -> None:
    """With two fixed batches per domain the estimator is deterministic and must equal, to rounding, the
    adjoint written out with torch.func (regression_truth on TwoBatches: the update's full g-Hessian, the
    row variance n (g_A - g_B)^2 / 2 and mu_k^2 = g_A g_B): this pins every part of the channel, the `sample`
    terms, the b/(b-1) and Var/b corrections, the curvature of m/sqrt(v) beside v's own (1 - b2)/b2 a_v
    (b2 = 0.5 makes it weigh), from a fresh Adam state. The channel is a real term: it moves G by > 5 %."""
    prob = Regression(K=3, noise=0.3, seed=5)
    gen = torch.Generator().manual_seed(6)
    pop = TwoBatches(prob, 3, gen)
    weights = random_weights(5, prob.names, seed=7)
    batches = [prob.train_batch(w, 16, gen) for w in weights]
    kw = {"eps": 1e-2, "betas": betas}
    targets = {"a": {"a": 1.0}, "mix": {"a": 0.2, "b": 0.5, "c": 0.3}}
    reps = {}
    for noise in (None, (mode, 16)):
        est = ResponseEstimator(prob.model, prob.loss_fn, pop.streams(), lr=0.05, optimizer="adam", **kw)
        extra = {} if noise is None else {"noise": noise[0], "train_batch_size": noise[1]}
        reps[noise] = est.estimate(batches, weights, targets, n_groups=2, batches_per_step=2, **extra)
    for tname, c in targets.items():
        cvec = [c.get(d, 0.0) for d in prob.names]
        plain, _ = regression_truth(pop, batches, weights, [0.05] * 5, cvec, "adam", kw)
        truth, _ = regression_truth(pop, batches, weights, [0.05] * 5, cvec, "adam", kw, (mode, 16))
        got_plain = np.stack([reps[None].G(tname)[d] for d in prob.names])
        got = np.stack([reps[(mode, 16)].G(tname)[d] for d in prob.names])
        assert rel(got_plain, plain) <= 1e-9, tname
        assert rel(got, truth) <= 1e-9, tname
        assert rel(truth, plain) > 0.05, (tname, rel(truth, plain))
        assert np.all(reps[(mode, 16)].stderr(tname)["a"] <= 1e-9 * np.abs(got).max())
        # the channel's own term, kept apart: the rest is the estimate without it, on the same batches
        assert rel(reps[(mode, 16)].samples(tname, part="mean_field"), reps[None].samples(tname)) <= 1e-9


def _adam_swap_branches(theta: torch.Tensor, state: OptimizerState, T: int, B: int, lr: float, kw: dict,
                        R: int, seed: int, rows_grad) -> tuple[torch.Tensor, torch.Tensor]:
    """theta12, theta21 of the eq. (9) swap with one row moved between the two domains of exact-composition
    batches of B rows (dw = 1/B), under common random numbers (each branch takes the first rows of the same
    per-step pools; ``rows_grad(th, k, c, gen)`` draws domain k's pool of B rows and returns the sum of its
    first c rows' gradients / B), R replicates vectorised, Adam by hand."""
    b1, b2 = kw["betas"]

    def branch(shift: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        th = theta.expand(R, -1).clone()
        m, v = state.m.expand(R, -1).clone(), state.v.expand(R, -1).clone()
        for t in range(2 * T):
            s = shift if t < T else -shift
            grad = sum(rows_grad(th, k, c, gen) for k, c in enumerate((B // 2 + s, B // 2 - s)))
            m, v = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad**2
            n = state.step + t + 1
            th = th - lr / (1 - b1**n) * m / (v.sqrt() / math.sqrt(1 - b2**n) + kw["eps"])
        return th

    return branch(1), branch(-1)


def _expected_excess(prob: Regression, theta: torch.Tensor, state: OptimizerState, T: int, B: int, lr: float,
                     kw: dict, R: int, seed: int) -> dict[str, tuple[float, float]]:
    """Monte Carlo truth, written out independently (:func:`_adam_swap_branches`): (E L(theta12) -
    E L(theta21)) / 2 per unit dw. Returns domain -> (mean, stderr) of the per-unit excess of L_k."""

    def rows_grad(th: torch.Tensor, k: int, c: int, gen: torch.Generator) -> torch.Tensor:
        X = torch.randn(R, B, prob.d, dtype=DT, generator=gen) @ prob.chol[k].T
        y = X @ prob.beta[k] + prob.noise * torch.randn(R, B, dtype=DT, generator=gen)
        r = (X[:, :c] @ th.unsqueeze(-1)).squeeze(-1) - y[:, :c]
        return (X[:, :c] * r.unsqueeze(-1)).sum(1) / B

    p12, p21 = _adam_swap_branches(theta, state, T, B, lr, kw, R, seed, rows_grad)
    out = {}
    for k, d in enumerate(prob.names):
        u12, u21 = p12 - prob.beta[k], p21 - prob.beta[k]
        x = 0.25 * B * (((u12 @ prob.S[k]) * u12).sum(-1) - ((u21 @ prob.S[k]) * u21).sum(-1))
        out[d] = (float(x.mean()), float(x.std() / math.sqrt(R)))
    return out


def test_mean_over_trajectories_is_the_derivative_of_the_expected_loss() -> None:
    """What the study's ``response.trajectories`` relies on: over many replays of a noisy Adam window (each
    its own training batches, one estimate each), the mean response to the eq. (9) swap equals the
    derivative of the *expected* loss, measured by Monte Carlo with common random numbers (one row of 20
    moved). The regime is far from local: the no-curvature alignment is ~1/50 of the truth here, so the
    check has power (dropping the Hessian term or the momentum carry-over from the adjoint fails it). The
    sampling-noise channel (moving a row also changes the gradient's variance) is left out of the estimate;
    on this problem it is within the test's tolerance."""
    B, T, lr, kw = 20, 15, 0.1, {"betas": (0.9, 0.95), "eps": 1e-8}
    prob = Regression(K=2, d=4, noise=1.0, seed=3)
    gen = torch.Generator().manual_seed(5)

    def batch(counts: tuple[int, int]):
        parts = [prob.sample(k, c, gen) for k, c in enumerate(counts)]
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    theta, state = prob.theta0.clone(), OptimizerState()  # a warm start: 40 balanced steps
    for _ in range(40):
        X, y = batch((B // 2, B // 2))
        theta, state = optimizer_step(theta, X.T @ (X @ theta - y) / B, state, lr, "adam", **kw)
    truth = _expected_excess(prob, theta, state, T, B, lr, kw, R=10_000, seed=11)

    with torch.no_grad():
        prob.model.weight.copy_(theta.reshape(1, -1))
    named = OptimizerState(state.step, {"weight": state.m.reshape(1, -1)}, {"weight": state.v.reshape(1, -1)})
    est = ResponseEstimator(prob.model, prob.loss_fn, prob.streams(8, gen), lr=lr, optimizer="adam",
                            state=named, **kw)
    unit = {"a": [1.0] * T + [-1.0] * T, "b": [-1.0] * T + [1.0] * T}
    paths: dict[str, list[tuple[float, float, float]]] = {d: [] for d in prob.names}
    for _ in range(200):
        rep = est.estimate([batch((B // 2, B // 2)) for _ in range(2 * T)], [{"a": 0.5, "b": 0.5}] * (2 * T),
                           list(prob.names), n_groups=2)
        for d in prob.names:
            e = rep.predict(d, unit)
            paths[d].append((e.mean, e.stderr, rep.predict_alignment(d, unit).mean))
    for d in prob.names:
        a = np.array(paths[d])
        mean, se = a[:, 0].mean(), a[:, 0].std(ddof=1) / math.sqrt(len(a))
        tol = math.hypot(se, truth[d][1])
        assert abs(mean - truth[d][0]) < 3 * tol, (d, mean, se, truth[d])
        assert abs(truth[d][0]) > 10 * tol, (d, truth[d], tol)  # a real signal ...
        assert abs(a[:, 2].mean() - truth[d][0]) > 0.9 * abs(truth[d][0]), d  # ... that needs the curvature


class NoisyQuadratic:
    """Two domains with per-row losses l_k(theta; y) = sum_j a_kj (theta_j - y_j)^2 / 2, y ~ N(mu, diag
    sd_k^2): fixed per-row curvature and a common optimum, so the schedule acts on E[L] almost only through
    the gradient noise (the effect the fresh estimate leaves out). Batches are (domain index per row, Y)."""

    def __init__(self, d: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.d = d
        self.a = torch.rand(2, d, dtype=DT, generator=g) * 1.5 + 0.25
        self.mu = torch.zeros(d, dtype=DT)
        self.sd = 2.0 * (torch.rand(2, d, dtype=DT, generator=g) + 0.5)
        self.model = nn.Module()
        self.model.theta = nn.Parameter(torch.zeros(d, dtype=DT))

    def loss_fn(self, model: nn.Module, batch) -> torch.Tensor:
        k, Y = batch
        return 0.5 * (self.a[k] * (model.theta - Y) ** 2).sum(-1).mean()

    def rows(self, k: int, n: int, gen: torch.Generator):
        return torch.full((n,), k), self.mu + self.sd[k] * torch.randn(n, self.d, dtype=DT, generator=gen)

    def batch(self, counts: tuple[int, int], gen: torch.Generator):
        parts = [self.rows(k, c, gen) for k, c in enumerate(counts)]
        return torch.cat([k for k, _ in parts]), torch.cat([y for _, y in parts])

    @staticmethod
    def by_domain(batch) -> dict[str, tuple]:
        k, Y = batch
        return {d: (k[k == i], Y[k == i]) for i, d in enumerate("ab")}

    def grad(self, theta: torch.Tensor, Y: torch.Tensor, k: int, B: int) -> torch.Tensor:
        """sum over domain k's rows (the last two dims of Y) of the row gradients, / B."""
        return (self.a[k] * (theta.unsqueeze(-2) - Y)).sum(-2) / B


def _sgd_expected_loss_derivative(prob: NoisyQuadratic, theta: torch.Tensor, T: int, B: int, lr: float
                                  ) -> dict[str, float]:
    """d/dw of (E L_k(theta12) - E L_k(theta21)) / 2 for the eq. (9) swap at (1/2, 1/2), SGD on exact-count
    batches, in closed form: per coordinate the mean m and variance c of theta evolve as
    m' = J m + lr sum_k w_k a_k mu, c' = J^2 c + lr^2 sum_k (w_k / B) a_k^2 sd_k^2, J = 1 - lr sum_k w_k a_k,
    with w_k = n_k / B taken continuous; differentiated by autograd."""
    eps = torch.zeros((), dtype=DT, requires_grad=True)
    m, c = theta.clone(), torch.zeros_like(theta)
    for t in range(2 * T):
        s = eps if t < T else -eps
        w = torch.stack([0.5 + s, 0.5 - s])[:, None]
        J = 1 - lr * (w * prob.a).sum(0)
        m = J * m + lr * (w * prob.a * prob.mu).sum(0)
        c = J**2 * c + lr**2 * (w / B * prob.a**2 * prob.sd**2).sum(0)
    out = {}
    for k, d in enumerate("ab"):
        L = 0.5 * (prob.a[k] * ((m - prob.mu) ** 2 + c)).sum()
        out[d] = float(torch.autograd.grad(L, eps, retain_graph=True)[0])
    return out


def _adam_expected_excess(prob: NoisyQuadratic, theta: torch.Tensor, state: OptimizerState, T: int, B: int,
                          lr: float, kw: dict, R: int, seed: int) -> dict[str, tuple[float, float]]:
    """Monte Carlo truth as in :func:`_expected_excess`: domain -> (mean, stderr) of the per-unit excess."""

    def rows_grad(th: torch.Tensor, k: int, c: int, gen: torch.Generator) -> torch.Tensor:
        Y = prob.mu + prob.sd[k] * torch.randn(R, B, prob.d, dtype=DT, generator=gen)
        return prob.grad(th, Y[:, :c], k, B)

    p12, p21 = _adam_swap_branches(theta, state, T, B, lr, kw, R, seed, rows_grad)
    out = {}
    for k, d in enumerate("ab"):
        x = 0.25 * B * ((prob.a[k] * ((p12 - prob.mu) ** 2 - (p21 - prob.mu) ** 2)).sum(-1))
        out[d] = (float(x.mean()), float(x.std() / math.sqrt(R)))
    return out


def test_rows_noise_channel_is_half_the_training_rows_term() -> None:
    """With a constant per-row Hessian and SGD (U_t linear), the rows channel is by definition the average
    of the fresh estimate and the estimate whose per-step gradients are the training batch's own rows
    (n_k = w_k B here): G_rows(S) = (G(S) + G(own rows)) / 2, to rounding, for every domain and step."""
    prob, T, B = NoisyQuadratic(5), 4, 20
    gen = torch.Generator().manual_seed(1)
    batches = [prob.batch((B // 2, B // 2), gen) for _ in range(2 * T)]
    w = [{"a": 0.5, "b": 0.5}] * (2 * T)
    target = {dn: [(torch.full((1,), k), prob.mu[None])] for k, dn in enumerate("ab")}

    def run(streams, **extra):
        est = ResponseEstimator(prob.model, prob.loss_fn, streams, lr=0.2, optimizer="sgd")
        return est.estimate(batches, w, ["a", "b"], n_groups=2, target_data=target, **extra)

    def fresh(seed):
        g = torch.Generator().manual_seed(seed)

        def stream(k):
            while True:
                yield prob.rows(k, 6, g)

        return {"a": stream(0), "b": stream(1)}

    def own():  # each group walks back from the last step
        def stream(dn):
            for _ in range(2):
                for b in reversed(batches):
                    yield prob.by_domain(b)[dn]

        return {dn: stream(dn) for dn in "ab"}

    rows = run(fresh(7), noise="rows", train_rows=prob.by_domain)
    mean_field, trained = run(fresh(7)), run(own())
    realised = run(fresh(7), adjoint="train", train_rows=prob.by_domain)  # the same Hessians here
    for target_name, d in itertools.product("ab", "ab"):
        got, a, b = (r.G(target_name)[d] for r in (rows, mean_field, trained))
        np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-10, atol=1e-14)
        assert np.abs(got - a).max() > 1e-3 * np.abs(a).max()  # the channel is not empty
        np.testing.assert_array_equal(rows.G0(target_name)[d], mean_field.G0(target_name)[d])
        np.testing.assert_allclose(realised.G(target_name)[d], a, rtol=1e-10, atol=1e-14)
        # the noise term kept apart: the rest is the adjoint-through-the-rows estimate without it
        np.testing.assert_allclose(rows.samples(target_name, part="mean_field"),
                                   realised.samples(target_name), rtol=1e-10, atol=1e-14)
    assert np.abs(rows.gn_groups).max() > 1e-3 * np.abs(rows.g_groups).max()
    assert realised.gn_groups is None and mean_field.gn_groups is None
    with pytest.raises(CommuteError, match="noise channel"):
        realised.predict("a", {"a": np.ones(2 * T)}, part="noise")
    with pytest.raises(CommuteError, match="no noise part"):
        rows.samples("a", baseline=True, part="noise")
    back = ResponseReport.from_dict(json.loads(json.dumps(rows.to_dict())))
    np.testing.assert_array_equal(back.gn_groups, rows.gn_groups)
    old = rows.to_dict()
    del old["gn_groups"]  # a report written before the part was kept: readable, and says to re-estimate
    with pytest.raises(CommuteError, match="re-estimate"):
        ResponseReport.from_dict(old).predict("a", {"a": np.ones(2 * T)}, part="noise")
    iv = Intervention({"a": 0.5, "b": 0.5}, "a", "b", 0.1, t0=0, T=T)
    assert rows.predict_intervention("b", iv, part="noise").mean == pytest.approx(
        rows.predict("b", intervention_delta(iv, 2 * T, 0), part="noise").mean, rel=1e-12)
    assert "noise" in rows.to_dict()["window_sums"]["a"]["b"] and "mean field" in str(rows)
    assert rows.meta["noise"] == "rows" and rows.meta["adjoint"] == "train"
    assert "noise" not in realised.meta and realised.meta["adjoint"] == "train"
    assert "adjoint" not in mean_field.meta


def _over_replays(est: ResponseEstimator, window, modes: dict[str, dict], target, T: int, R: int
                  ) -> dict[str, dict[str, list[float]]]:
    """{mode: {domain: the eq. (9) swap's response per unit dw, one per replay}}: R replays of a balanced
    two-domain window of 2T steps (``window()`` draws its training batches), each estimated on the same
    batches once per mode (``modes``: name -> extra arguments of ``estimate``, in order)."""
    unit = {"a": [1.0] * T + [-1.0] * T, "b": [-1.0] * T + [1.0] * T}
    got: dict[str, dict[str, list[float]]] = {m: {"a": [], "b": []} for m in modes}
    for _ in range(R):
        batches = window()
        for m, extra in modes.items():
            rep = est.estimate(batches, [{"a": 0.5, "b": 0.5}] * (2 * T), ["a", "b"], n_groups=2,
                               target_data=target, **extra)
            for dn in "ab":
                got[m][dn].append(rep.predict(dn, unit).mean)
    return got


def test_rows_noise_channel_written_out() -> None:
    """The rows channel against its definition, written out for SGD on a quadratic with per-row curvature:
    counts 7 + 13 at w = (0.3, 0.7), so n_k / (B w_k) = 7/6 and 13/14; fixed fresh batches F_k (gbar_k their
    mean gradient); lambda pulled back through the training batch's own Hessian sum_i a_i / B (not F's):
    G_k(t) = < -lr lambda_{t+1}, gbar_k + (n_k / (B w_k)) (ghat_k^train - gbar_k) / 2 >, to rounding."""
    d, T, lr, counts, w = 3, 3, 0.2, (7, 13), (0.3, 0.7)
    g = torch.Generator().manual_seed(2)

    def rows(k: int, n: int):
        return (torch.full((n,), k), torch.rand(n, d, dtype=DT, generator=g) * 2 - 0.5,
                torch.randn(n, d, dtype=DT, generator=g))

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        _, a, Y = batch
        return 0.5 * (a * (m.theta - Y) ** 2).sum(-1).mean()

    def mean_grad(batch, th):
        _, a, Y = batch
        return (a * (th - Y)).mean(0)

    def join(parts):
        return tuple(torch.cat([p[i] for p in parts]) for i in range(3))

    train = [join([rows(k, c) for k, c in enumerate(counts)]) for _ in range(2 * T)]
    fixed = [rows(k, 5) for k in range(2)]
    aT = torch.tensor([1.0, 2.0, 0.5], dtype=DT)
    model = nn.Module()
    model.theta = nn.Parameter(torch.tensor([0.3, -0.2, 0.5], dtype=DT))
    streams = {"a": itertools.repeat(fixed[0]), "b": itertools.repeat(fixed[1])}
    est = ResponseEstimator(model, loss_fn, streams,
                            lr=lr, optimizer="sgd")
    target = {"a": [(torch.zeros(1), aT[None], torch.zeros(1, d, dtype=DT))]}

    def by_domain(b):
        return {dn: tuple(x[b[0] == i] for x in b) for i, dn in enumerate("ab")}

    rep = est.estimate(train, [{"a": w[0], "b": w[1]}] * (2 * T), ["a"], n_groups=2, target_data=target,
                       noise="rows", train_rows=by_domain)
    th, traj = model.theta.detach().clone(), []
    for b in train:
        traj.append(th)
        th = th - lr * mean_grad(b, th)
    lam, G = aT * th, np.zeros((2, 2 * T))
    for t in range(2 * T - 1, -1, -1):
        a_g = -lr * lam
        for k in range(2):
            own = by_domain(train[t])["ab"[k]]
            gbar, gown = mean_grad(fixed[k], traj[t]), mean_grad(own, traj[t])
            G[k, t] = float(a_g @ (gbar + 0.5 * counts[k] / (sum(counts) * w[k]) * (gown - gbar)))
        lam = lam + train[t][1].mean(0) * a_g
    for k, dn in enumerate("ab"):
        np.testing.assert_allclose(rep.G("a")[dn], G[k], rtol=1e-10, atol=1e-15)
    # adjoint="train" alone: the same lambda through the training rows, G_k(t) = < -lr lambda_{t+1}, gbar_k >
    rep = est.estimate(train, [{"a": w[0], "b": w[1]}] * (2 * T), ["a"], n_groups=2, target_data=target,
                       adjoint="train", train_rows=by_domain)
    lam, G = aT * th, np.zeros((2, 2 * T))
    for t in range(2 * T - 1, -1, -1):
        a_g = -lr * lam
        for k in range(2):
            G[k, t] = float(a_g @ mean_grad(fixed[k], traj[t]))
        lam = lam + train[t][1].mean(0) * a_g
    for k, dn in enumerate("ab"):
        np.testing.assert_allclose(rep.G("a")[dn], G[k], rtol=1e-10, atol=1e-15)
    with pytest.raises(CommuteError, match="pulls the adjoint back through the training rows"):
        est.estimate(train, [{"a": w[0], "b": w[1]}] * (2 * T), ["a"], n_groups=2, target_data=target,
                     noise="rows", adjoint="fresh", train_rows=by_domain)
    with pytest.raises(CommuteError, match="adjoint='train' needs train_rows"):
        est.estimate(train, [{"a": w[0], "b": w[1]}] * (2 * T), ["a"], n_groups=2, target_data=target,
                     adjoint="train")


def _per_row_curvature(d: int, B: int, kappa: float, lr: float):
    """Two domains with per-row losses sum_j a_j (theta_j - y_j)^2 / 2, a = abar_k (1 + kappa z) (random
    per-row curvature), y ~ N(0, sd_k^2), theta = 0 at the start: (abar, sd, batch(gen) of B/2 + B/2 rows,
    by_domain, an SGD ``ResponseEstimator`` at ``lr`` on fresh batches of 32 rows per domain, the targets
    L_k exactly, and the generator ``gen`` the fresh batches are drawn from). Batches are (domain index per
    row, a, Y)."""
    g = torch.Generator().manual_seed(0)
    abar = torch.rand(2, d, dtype=DT, generator=g) * 1.5 + 0.25
    sd = 0.1 * (torch.rand(2, d, dtype=DT, generator=g) + 0.5)
    model = nn.Module()
    model.theta = nn.Parameter(torch.zeros(d, dtype=DT))

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        _, a, Y = batch
        return 0.5 * (a * (m.theta - Y) ** 2).sum(-1).mean()

    def rows(k: int, n: int, gen: torch.Generator):
        a = abar[k] * (1 + kappa * torch.randn(n, d, dtype=DT, generator=gen))
        return torch.full((n,), k), a, sd[k] * torch.randn(n, d, dtype=DT, generator=gen)

    def batch(gen: torch.Generator):
        parts = [rows(k, B // 2, gen) for k in range(2)]
        return tuple(torch.cat([p[i] for p in parts]) for i in range(3))

    def by_domain(b):
        return {dn: tuple(x[b[0] == i] for x in b) for i, dn in enumerate("ab")}

    gen = torch.Generator().manual_seed(5)

    def stream(k: int):
        while True:
            yield rows(k, 32, gen)

    est = ResponseEstimator(model, loss_fn, {"a": stream(0), "b": stream(1)}, lr=lr, optimizer="sgd")
    target = {dn: [(torch.full((1,), k), abar[k][None], torch.zeros(1, d, dtype=DT))]  # L_k exactly
              for k, dn in enumerate("ab")}
    return abar, sd, batch, by_domain, est, target, gen


def test_rows_noise_channel_with_per_row_curvature() -> None:
    """Per-row Hessians that vary: l(theta; a, y) = sum_j a_j (theta_j - y_j)^2 / 2 with a = abar_k (1 +
    kappa z), y ~ N(0, sd_k^2), SGD from the optimum. E[theta^2] per coordinate evolves in closed form,
    S' = S ((1 - lr Abar)^2 + lr^2 V) + lr^2 Q, Abar = sum_k w_k abar_k, V = sum_k (w_k / B) abar_k^2 kappa^2
    (the Hessian noise), Q = sum_k (w_k / B) abar_k^2 (1 + kappa^2) sd_k^2, differentiated by autograd. The
    rows channel must pull lambda back through the training rows' own Hessian: with the fresh Hessians it was
    8 and 5 stderr off here (its mean then drops the lr^2 V terms); the fresh estimate alone has the wrong
    sign. Measured: rows 0.8 and 1.1 stderr off over 800 replays, fresh 35 and 31."""
    d, B, T, lr, kappa, R = 8, 4, 10, 0.25, 2.5, 300
    abar, sd, batch, by_domain, est, target, gen = _per_row_curvature(d, B, kappa, lr)

    eps = torch.zeros((), dtype=DT, requires_grad=True)
    S = torch.zeros(d, dtype=DT)
    for t in range(2 * T):
        e = eps if t < T else -eps
        w = torch.stack([0.5 + e, 0.5 - e])[:, None]
        V = (w / B * abar**2 * kappa**2).sum(0)
        Q = (w / B * abar**2 * (1 + kappa**2) * sd**2).sum(0)
        S = S * ((1 - lr * (w * abar).sum(0)) ** 2 + lr**2 * V) + lr**2 * Q
    truth = {dn: float(torch.autograd.grad(0.5 * (abar[k] * S).sum(), eps, retain_graph=True)[0])
             for k, dn in enumerate("ab")}

    got = _over_replays(est, lambda: [batch(gen) for _ in range(2 * T)],
                        {"fresh": {}, "rows": {"noise": "rows", "train_rows": by_domain}}, target, T, R)
    for dn in "ab":
        off = {}
        for m in got:
            x = np.array(got[m][dn])
            off[m] = (x.mean() - truth[dn]) / (x.std(ddof=1) / math.sqrt(R))
        assert abs(off["rows"]) < 3, (dn, off, truth)
        assert abs(off["fresh"]) > 10, (dn, off, truth)


def test_train_adjoint_gives_the_mean_field_derivative_with_per_row_curvature() -> None:
    """``adjoint="train"`` without a noise channel is the pathwise derivative of a run in which the schedule
    moves only the mean gradient: theta' = theta - lr (ghat(theta) + delta gbar_k(theta)), the batch (and so
    its noise and its Hessian noise) left as it was. With per-row Hessians a = abar_k (1 + kappa z) and SGD
    from the optimum, E[theta^2] per coordinate evolves in closed form as S' = S ((1 - lr (Abar_0 + delta
    abar_k))^2 + lr^2 V_0) + lr^2 Q_0 (V_0, Q_0: the Hessian and gradient noise at w = 1/2), differentiated by
    autograd. Its mean over replays must match; the fresh adjoint, through the fresh batches' Hessians,
    drops the lr^2 V_0 terms and misses. Measured (300 replays): train -2.7 and -2.4 stderr off, fresh -5.9
    and -5.0. The replays are heavy-tailed (kurtosis ~30, products of 20 random Hessian factors), so the mean
    of a few hundred sits a little low: with other streams and 1000 replays train was +0.9 and -0.7 stderr
    off, fresh -4.3 and -7.1."""
    d, B, T, lr, kappa, R = 8, 4, 10, 0.25, 2.5, 300
    abar, sd, batch, by_domain, est, target, gen = _per_row_curvature(d, B, kappa, lr)

    eps = torch.zeros((), dtype=DT, requires_grad=True)
    w0 = torch.full((2, 1), 0.5, dtype=DT)
    V0 = (w0 / B * abar**2 * kappa**2).sum(0)
    Q0 = (w0 / B * abar**2 * (1 + kappa**2) * sd**2).sum(0)
    S = torch.zeros(d, dtype=DT)
    for t in range(2 * T):
        e = eps if t < T else -eps
        A = ((w0 + torch.stack([e, -e])[:, None]) * abar).sum(0)
        S = S * ((1 - lr * A) ** 2 + lr**2 * V0) + lr**2 * Q0
    truth = {dn: float(torch.autograd.grad(0.5 * (abar[k] * S).sum(), eps, retain_graph=True)[0])
             for k, dn in enumerate("ab")}

    got = _over_replays(est, lambda: [batch(gen) for _ in range(2 * T)],
                        {"fresh": {}, "train": {"adjoint": "train", "train_rows": by_domain}}, target, T, R)
    off = {m: {dn: (np.mean(x) - truth[dn]) / (np.std(x, ddof=1) / math.sqrt(R)) for dn, x in v.items()}
           for m, v in got.items()}
    for dn in "ab":
        assert abs(off["train"][dn]) < 3, (dn, off, truth)
        assert abs(off["fresh"][dn]) > 4, (dn, off, truth)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_rows_noise_channel_gives_the_derivative_of_the_expected_loss(name: str) -> None:
    """``noise="rows"``: near an optimum the schedule moves E[L] mostly through the gradient noise, which the
    fresh estimate (the mean-field linearisation) leaves out. Over many replays the mean response with the
    rows channel equals the derivative of the expected loss (SGD: closed-form moment recursion; Adam: Monte
    Carlo with common random numbers, one row of 20 moved), and the fresh estimate alone is far from it
    (measured here: the rows channel 1.2 and 1.5 combined stderr off for SGD, 0.7 and 0.2 for Adam; the fresh
    estimate 4.0 and 13.5 for SGD, 2.3 and 4.0 for Adam, where it is 2-5x too large)."""
    d, B, T, R = 32, 20, 15, 150
    lr, kw = (0.3, {}) if name == "sgd" else (0.05, {"betas": (0.9, 0.95), "eps": 1e-8})
    prob = NoisyQuadratic(d)
    gen = torch.Generator().manual_seed(5)
    theta, state = torch.zeros(d, dtype=DT), OptimizerState()
    for _ in range(40):  # a warm start: 40 balanced steps into the noise ball
        k, Y = prob.batch((B // 2, B // 2), gen)
        g = prob.grad(theta, Y[k == 0], 0, B) + prob.grad(theta, Y[k == 1], 1, B)
        theta, state = optimizer_step(theta, g, state, lr, name, **kw)
    if name == "sgd":
        truth = {k: (x, 0.0) for k, x in _sgd_expected_loss_derivative(prob, theta, T, B, lr).items()}
    else:
        truth = _adam_expected_excess(prob, theta, state, T, B, lr, kw, R=8_000, seed=11)

    with torch.no_grad():
        prob.model.theta.copy_(theta)
    named = None if name == "sgd" else OptimizerState(state.step, {"theta": state.m}, {"theta": state.v})

    def stream(k: int):
        while True:
            yield prob.rows(k, 32, gen)

    est = ResponseEstimator(prob.model, prob.loss_fn, {"a": stream(0), "b": stream(1)}, lr=lr, optimizer=name,
                            state=named, **kw)
    exact_target = {dn: [(torch.full((1,), k), prob.mu[None])] for k, dn in enumerate("ab")}
    got = _over_replays(est, lambda: [prob.batch((B // 2, B // 2), gen) for _ in range(2 * T)],
                        {"fresh": {}, "rows": {"noise": "rows", "train_rows": prob.by_domain}}, exact_target,
                        T, R)
    off = {m: {} for m in got}  # |mean - truth| in combined stderr
    for m, dn in itertools.product(got, "ab"):
        x = np.array(got[m][dn])
        off[m][dn] = abs(x.mean() - truth[dn][0]) / math.hypot(x.std(ddof=1) / math.sqrt(R), truth[dn][1])
    assert max(off["rows"].values()) < 3, (off, truth)
    assert sum(z**2 for z in off["fresh"].values()) > 9.2, (off, truth)  # the channel matters (p = 0.01)


# --------------------------------------------------------------------------------------------------
# 3. cost: one graph per domain per step per group, nothing across steps
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gd", "adam"])
def test_one_graph_per_domain_per_step_per_group(name: str, monkeypatch) -> None:
    model, data = mlp_problem()
    calls: list[str] = []
    real_grad = torch.autograd.grad

    def spy(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False, **kw):
        calls.append("graph" if create_graph else "vjp" if grad_outputs is not None else "grad")
        return real_grad(outputs, inputs, grad_outputs=grad_outputs, retain_graph=retain_graph,
                         create_graph=create_graph, **kw)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    gen = torch.Generator().manual_seed(0)
    streams = {k: (x + 0.1 * torch.randn(x.shape, generator=gen, dtype=DT), y) for k, (x, y) in data.items()}
    kw = {"eps": 1e-3} if name == "adam" else {}
    est = ResponseEstimator(model, ce, {k: itertools.repeat(b) for k, b in streams.items()}, lr=0.05,
                            optimizer=name, **kw)
    live = LiveSaved()
    peaks = {}
    G, b, bt = 2, 2, 3
    for n in (3, 9):
        weights = [{"a": 0.5, "b": 0.5}] * n  # domain c has weight 0: no graph, no HVP for it
        targets = {"a": {"a": 1.0}, "mix": {"a": 0.5, "b": 0.5}}
        calls.clear()
        out = {}

        def call(n=n, weights=weights, targets=targets, out=out) -> None:
            out["r"] = est.estimate([data["a"]] * n, weights, targets, n_groups=G, batches_per_step=b,
                                    target_batches=bt)

        peaks[n] = live.run(call)
        rep, M = out["r"], 2
        graphs = G * b * 2 * (n - 1)  # domains a, b at steps 1..n-1 (lambda_0 is never needed)
        assert calls.count("graph") == rep.n_graph == graphs
        # plain gradients: the replay, the target batches (domains a, b), step 0 and domain c everywhere
        assert calls.count("grad") == rep.n_grad == n + G * bt * 2 + G * b * (2 + n)
        # HVPs: M per graph; VJPs of U_t: 2M per step per group
        assert rep.n_hvp == M * graphs and rep.n_vjp == 2 * M * G * n
        assert calls.count("vjp") == rep.n_hvp + rep.n_vjp
        assert np.all(rep.g_groups[:, :, 2, 1:] != 0)  # G of the weight-0 domain is still estimated
    assert peaks[9] == peaks[3] > 0, peaks  # autograd memory does not grow with the window


# --------------------------------------------------------------------------------------------------
# 4. the replay is the run
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("source", ["optimizer", "state_dict"])
def test_replay_equals_torch_optimizer(name: str, source: str) -> None:
    """A warm torch optimiser with per-group weight decay (matrices / the rest, as commute.train builds it);
    the estimator reads its state and settings, then replays a window on the same random batches."""
    model, _ = mlp_problem()
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(10, 4, generator=gen, dtype=DT), torch.randint(0, 3, (10,), generator=gen))
               for _ in range(12)]
    mats = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": mats, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    cls, kw = {"sgd": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
               "adam": (torch.optim.Adam, {"betas": (0.85, 0.99)}),
               "adamw": (torch.optim.AdamW, {"eps": 1e-6})}[name]
    lrs = [0.05 * (1 - 0.03 * t) for t in range(12)]
    opt = cls(groups, lr=lrs[0], **kw)

    def train(steps) -> None:
        for t in steps:
            for g in opt.param_groups:
                g["lr"] = lrs[t]
            opt.zero_grad()
            ce(model, batches[t]).backward()
            opt.step()

    train(range(4))  # warm up; the checkpoint is here (start = 4)
    names = [[n for n, p in model.named_parameters() if p.dim() >= 2],
             [n for n, p in model.named_parameters() if p.dim() < 2]]
    if source == "optimizer":
        state: object = opt
        extra = {}
    else:
        state, extra = opt.state_dict(), {"state_names": names}
    assert optimizer_settings(opt, dict(model.named_parameters()))[1]["weight_decay"] == {
        "l1.weight": 0.1, "l2.weight": 0.1, "l1.bias": 0.0, "l2.bias": 0.0}
    est = ResponseEstimator(model, ce, {"x": itertools.repeat(batches[0])}, lr=lambda s: lrs[s], state=state,
                            **extra)
    assert est.optimizer == name
    for p in model.parameters():
        p.grad = None
    res = est.replay(lambda s: batches[s], 8, start=4)
    train(range(4, 12))
    got = OptimizerState.from_torch(opt, dict(model.named_parameters()))
    for k, p in model.named_parameters():
        assert rel(res.params[k], p.detach()) <= 1e-12, k
        assert rel(res.state.m[k], got.m[k]) <= 1e-12, k
        if name != "sgd":
            assert rel(res.state.v[k], got.v[k]) <= 1e-12, k
    assert res.state.step == got.step or name == "sgd"
    assert len(res.losses) == 8


def test_replay_equals_commute_training_on_gpt2() -> None:
    """The window's batches from a MixtureSampler restored from a checkpoint state, commute.train.train_step
    with AdamW in param_group_names groups: the replay reproduces theta_end."""
    from commute.data import MixtureSampler, TokenizedDomain
    from commute.model import build_model, lm_loss
    from commute.train import param_group_names, train_step

    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=32, n_layer=1, n_embd=16, n_head=2, n_positions=16, dtype=DT)
    rng = np.random.default_rng(0)
    domains = {n: TokenizedDomain(n, rng.integers(lo, lo + 16, 400).astype(np.int64),
                                  rng.integers(lo, lo + 16, 50).astype(np.int64))
               for n, lo in (("en", 0), ("ru", 16))}
    named = dict(model.named_parameters())
    groups = [{"params": [named[n] for n in names], "weight_decay": wd}
              for names, wd in zip(param_group_names(model), (0.1, 0.0), strict=True)]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sampler = MixtureSampler(domains, batch_size=4, seq_len=12, seed=7)
    schedule = lambda s: {"en": 0.5 + 0.04 * (s % 5), "ru": 0.5 - 0.04 * (s % 5)}  # noqa: E731
    lr = lambda s: 1e-3 * (1 + 0.1 * s)  # noqa: E731
    for s in range(3):
        train_step(model, opt, [sampler.next_batch(schedule(s))], schedule(s), ["en", "ru"], lr=lr(s))
    ckpt_state, ckpt_sampler = opt.state_dict(), sampler.state_dict()  # the checkpoint at step 3
    for p in model.parameters():
        p.grad = None
    restored = MixtureSampler(domains, batch_size=4, seq_len=12, seed=7)
    restored.load_state_dict(ckpt_sampler)
    est = ResponseEstimator(model, lm_loss, {"en": iter([]), "ru": iter([])}, lr=lr, state=ckpt_state,
                            state_names=param_group_names(model))
    res = est.replay(lambda s: restored.next_batch(schedule(s)), 4, start=3)
    for s in range(3, 7):
        train_step(model, opt, [sampler.next_batch(schedule(s))], schedule(s), ["en", "ru"], lr=lr(s))
    for k, p in model.named_parameters():
        assert rel(res.params[k], p.detach()) <= 1e-12, k


# --------------------------------------------------------------------------------------------------
# 5. report, predictions, errors
# --------------------------------------------------------------------------------------------------
def _small_report(n: int = 6) -> tuple[ResponseReport, Regression]:
    prob = Regression(K=2, seed=5)
    gen = torch.Generator().manual_seed(0)
    weights = [{"a": 0.5, "b": 0.5}] * n
    est = ResponseEstimator(prob.model, prob.loss_fn, prob.streams(8, gen), lr=0.1)
    batches = [prob.train_batch(w, 16, gen) for w in weights]
    return est.estimate(batches, weights, None, start=10, n_groups=4), prob


def test_report_json_roundtrip_and_predictions(tmp_path) -> None:
    rep, _ = _small_report()
    assert set(rep.targets) == {"a", "b", "mix"} and rep.g_groups.shape == (4, 3, 2, 6)
    json.dumps(rep.to_dict(), allow_nan=False)
    back = ResponseReport.from_json(rep.to_json(tmp_path / "r.json"))
    assert back.to_dict() == rep.to_dict()
    np.testing.assert_array_equal(back.g_groups, rep.g_groups)
    # predictions are sums of the per-group samples; a target in the span is a combination
    dw = {"a": np.linspace(-1, 1, 6), "b": np.ones(6)}
    per_group = (rep.samples("mix") * np.stack([dw["a"], dw["b"]])).sum(axis=(1, 2))
    assert rep.predict("mix", dw).mean == pytest.approx(per_group.mean(), rel=1e-12)
    np.testing.assert_allclose(rep.samples({"a": 0.5, "b": 0.5}), rep.samples("mix"), rtol=1e-10)
    np.testing.assert_allclose(rep.samples({"a": 2.0, "b": -1.0}), 2 * rep.samples("a") - rep.samples("b"),
                               rtol=1e-10, atol=1e-15)
    iv = Intervention({"a": 0.5, "b": 0.5}, "a", "b", 0.1, t0=11, T=2)
    d12 = intervention_delta(iv, 6, start=10)
    assert rep.predict_intervention("a", iv).mean == pytest.approx(rep.predict("a", d12).mean, rel=1e-12)
    assert rep.predict_intervention("a", iv.reversed()).mean == pytest.approx(
        -rep.predict_intervention("a", iv).mean, rel=1e-12)
    assert rep.predict_intervention("a", iv, baseline=True).mean == pytest.approx(
        rep.predict_alignment("a", d12).mean, rel=1e-12)
    assert rep.at("b", "a", 3).mean == pytest.approx(rep.G("b")["a"][3])
    assert "alignment" in str(rep) and rep.loss("mix").n == 4


def _one_sentence(exc: pytest.ExceptionInfo) -> None:
    msg = str(exc.value)
    assert msg.endswith(".") and "\n" not in msg, msg


def test_bad_inputs_are_one_sentence_errors() -> None:
    rep, prob = _small_report()
    gen = torch.Generator().manual_seed(1)
    est = ResponseEstimator(prob.model, prob.loss_fn, prob.streams(8, gen), lr=0.1)
    w = [{"a": 0.5, "b": 0.5}] * 3
    b = [prob.train_batch(x, 8, gen) for x in w]
    bad_calls = [
        lambda: est.estimate(b, [{"a": 0.5, "zz": 0.5}] * 3),  # unknown domain in weights
        lambda: est.estimate(b[:2], w),  # wrong number of steps
        lambda: est.estimate(b, w, steps=4),
        lambda: est.estimate(iter(b[:2]), w),  # an iterator that runs out
        lambda: est.estimate(b, lambda s: w[0]),  # a schedule without steps
        lambda: est.estimate(b, w, n_groups=1),
        lambda: est.estimate(b, w, ["nope"]),
        lambda: est.estimate(b, {"a": 1.0}),
        lambda: ResponseEstimator(prob.model, prob.loss_fn, {}, lr=0.1),
        lambda: ResponseEstimator(prob.model, prob.loss_fn, {"a": []}, lr=0.1, optimizer="lion"),
        lambda: ResponseEstimator(prob.model, prob.loss_fn, {"a": []}, lr=0.1, state={"state": {}}),
        lambda: ResponseEstimator(prob.model, prob.loss_fn, {"a": []}, lr=0.1,
                                  state=OptimizerState(3, {"weight": torch.zeros(1, 4, dtype=DT)},
                                                       {"weight": torch.zeros(1, 4, dtype=DT)})),
        lambda: ResponseEstimator(prob.model, prob.loss_fn, {"a": []}, lr=0.1, optimizer="adam",
                                  state=OptimizerState(3, {"weight": torch.zeros(4, dtype=DT)},
                                                       {"weight": torch.zeros(4, dtype=DT)})),
        lambda: ResponseEstimator(prob.model, prob.loss_fn, {"a": [prob.sample(0, 4, gen)], "b": []},
                                  lr=0.1).estimate(b, w),  # a stream that runs out
        lambda: rep.predict("a", {"a": np.ones(5)}),
        lambda: rep.predict("a", {"c": np.ones(6)}),
        lambda: rep.predict("zz", {"a": np.ones(6)}),
        lambda: rep.at("a", "a", 6),
        lambda: rep.predict_intervention("a", Intervention({"a": 0.7, "b": 0.3}, "a", "b", 0.1, t0=11, T=2)),
        lambda: rep.predict_intervention("a", Intervention({"a": 0.5, "b": 0.5}, "a", "b", 0.1, t0=14, T=2)),
        lambda: ResponseReport.from_dict({"format": "commute.response_report/1", "domains": ["a"]}),
        # the sampling-noise channel: Adam only, with B, >= 2 batches per step, a known mode
        lambda: est.estimate(b, w, noise="exact", train_batch_size=8, batches_per_step=2),  # GD
        lambda: adam.estimate(b, w, noise="exact", batches_per_step=2),
        lambda: adam.estimate(b, w, noise="exact", train_batch_size=8),
        lambda: adam.estimate(b, w, noise="poisson", train_batch_size=8, batches_per_step=2),
        lambda: adam.estimate(b, w, train_batch_size=8),
        # the rows channel: needs a splitter returning a mapping of known domains, and no B
        lambda: est.estimate(b, w, noise="rows"),
        lambda: est.estimate(b, w, train_rows=lambda x: {"a": x}),
        lambda: est.estimate(b, w, noise="rows", train_rows=lambda x: {"a": x}, train_batch_size=8),
        lambda: est.estimate(b, w, noise="rows", train_rows=lambda x: [x]),
        lambda: est.estimate(b, w, noise="rows", train_rows=lambda x: {"zz": x}),
    ]
    adam = ResponseEstimator(prob.model, prob.loss_fn, prob.streams(8, gen), lr=0.1, optimizer="adam")
    for call in bad_calls:
        with pytest.raises(CommuteError) as exc:
            call()
        _one_sentence(exc)


def test_model_untouched_and_store_device() -> None:
    """Parameters, .grad and train/eval modes are as before; keeping the trajectory elsewhere changes
    nothing."""
    model, data = mlp_problem()
    model.train()
    model.l2.eval()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    weights = random_weights(4, "abc")
    reps = []
    for dev in (None, "cpu"):
        est = ResponseEstimator(model, ce, {k: itertools.repeat(b) for k, b in data.items()}, lr=0.01,
                                optimizer="adam", train_loss_fn=mixture_loss, store_device=dev, eps=1e-3)
        reps.append(est.estimate([(w, data) for w in weights], weights, ["mix"], n_groups=2))
    np.testing.assert_array_equal(reps[0].g_groups, reps[1].g_groups)
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model.l1.training and not model.l2.training


def test_parameter_subset_schedule_weights_and_progress() -> None:
    """Training only some parameters (the others fixed at the model's values) is the exact response of that
    sub-problem; weights may be a Schedule (with steps), and the progress bar runs."""
    from commute.schedule import Constant

    model, data = mlp_problem()
    sub = {k: p.detach().clone() for k, p in model.named_parameters() if k.startswith("l2.")}
    losses = functional_losses(model, data)  # functional_call with a partial dict: l1 stays the model's
    w = {"a": 0.2, "b": 0.5, "c": 0.3}
    est = ResponseEstimator(model, ce, {k: itertools.repeat(b) for k, b in data.items()}, lr=0.3,
                            parameters=model.l2.parameters(), train_loss_fn=mixture_loss)
    assert est.names == ["l2.weight", "l2.bias"]
    rep = est.estimate(lambda s: (w, data), Constant(w), ["b"], steps=5, start=3, n_groups=2, progress=True)
    assert rep.weights == [w] * 5 and rep.start == 3
    ref = schedule_response(losses, sub, [w] * 5, 0.3, "b")
    for d in data:
        assert rel(rep.G("b")[d], ref.G[d]) <= 1e-10, d
