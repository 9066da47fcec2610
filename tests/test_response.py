"""The schedule gradient G_k(t) = dL(theta_end)/dw_k(t) against independent truth (docs/design.md §1b).

* unrolled autograd through the real update (one graph through the whole window, w(t) a leaf), with torch's
  own functional ``torch.optim.sgd.sgd`` / ``torch.optim.adam.adam`` in ``differentiable`` mode for SGD,
  Adam and AdamW, fresh and warm states: equal to <= 1e-8 relative;
* the forward trajectory equal to the real ``torch.optim`` optimisers; central differences of the real
  optimisers' end loss equal to the first-order prediction sum dw G;
* far outside the local regime (gamma T lambda_max = 15): the real eq. 9 branches' antisymmetric excess
  equals sum dw G, while the bracket's gamma^2 dw T^2 P is off by a large factor;
* gamma T -> 0: sum dw G -> gamma^2 dw T^2 P(X, Y; L) (Cor. 3.2a) with a relative error linear in gamma T;
* cost: one graph per domain and one VJP per step, and the autograd memory alive does not grow with the
  window (unlike unrolling).

Everything float64 on a tiny tanh MLP with softmax-regression losses on three synthetic domains.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torch.optim.adam as torch_adam
import torch.optim.sgd as torch_sgd
from conftest import LiveSaved

import commute
from commute.bracket import bracket_projection, hvp, tree_dot
from commute.errors import CommuteError
from commute.response import (
    OptimizerState,
    antisymmetric_excess,
    antisymmetric_excess_cubic,
    cubic_nodes,
    intervention_delta,
    optimizer_step,
    predicted_change,
    schedule_gradient,
    schedule_response,
)
from commute.schedule import Intervention

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")

Params = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------
# a tiny model: tanh MLP, cross-entropy on K domains (different input means and teachers) + validation
# --------------------------------------------------------------------------------------------------
def problem(K: int, seed: int = 0, n: int = 16, d: int = 4, h: int = 6, c: int = 3):
    gen = torch.Generator().manual_seed(seed)
    params = {
        "W1": torch.randn(d, h, generator=gen, dtype=DT) / math.sqrt(d),
        "b1": torch.zeros(h, dtype=DT),
        "W2": torch.randn(h, c, generator=gen, dtype=DT) / math.sqrt(h),
        "b2": torch.zeros(c, dtype=DT),
    }
    data = []
    for _ in range(K + 1):
        x = torch.randn(n, d, generator=gen, dtype=DT) + torch.randn(d, generator=gen, dtype=DT)
        y = (x @ (2 * torch.randn(d, c, generator=gen, dtype=DT))).argmax(1)
        data.append((x, y))

    def loss(i: int):
        x, y = data[i]
        return lambda q: F.cross_entropy(torch.tanh(x @ q["W1"] + q["b1"]) @ q["W2"] + q["b2"], y)

    return params, {f"d{i}": loss(i) for i in range(K)}, loss(K)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def mix_grad(losses, w: dict[str, float], q: Params) -> list[torch.Tensor]:
    keys = list(q)
    leaves = [q[k].detach().requires_grad_(True) for k in keys]
    value = sum(w[d] * f(dict(zip(keys, leaves, strict=True))) for d, f in losses.items())
    return list(torch.autograd.grad(value, leaves))


def torch_optimizer(name: str, leaves: list[torch.Tensor], keys: list[str], kw: dict):
    """The real torch optimiser; a weight_decay mapping becomes one param group per parameter."""
    kw = dict(kw)
    wd = kw.pop("weight_decay", None)
    if isinstance(wd, dict):
        groups = [{"params": [x], "weight_decay": wd.get(k, 0.0)} for k, x in zip(keys, leaves, strict=True)]
    else:
        groups = [{"params": leaves}] if wd is None else [{"params": leaves, "weight_decay": wd}]
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    return cls(groups, lr=1.0, **kw)


def run_torch(name, kw, losses, params: Params, weights, lrs, state: OptimizerState | None = None,
              opt: torch.optim.Optimizer | None = None) -> tuple[Params, torch.optim.Optimizer]:
    """Train with the real ``torch.optim`` optimiser from ``params`` and ``state`` (or continue ``opt``)."""
    keys = list(params)
    if opt is None:
        leaves = [params[k].detach().clone().requires_grad_(True) for k in keys]
        opt = torch_optimizer(name, leaves, keys, kw)
        for k, x in zip(keys, leaves, strict=True):  # load the given state as torch keeps it
            if state is not None and name == "sgd":
                opt.state[x] = {"momentum_buffer": state.m[k].clone()}
            elif state is not None:
                opt.state[x] = {"step": torch.tensor(float(state.step)), "exp_avg": state.m[k].clone(),
                                "exp_avg_sq": state.v[k].clone()}
    leaves = [x for g in opt.param_groups for x in g["params"]]
    for w, lr in zip(weights, lrs, strict=True):
        for x, g in zip(leaves, mix_grad(losses, w, dict(zip(keys, leaves, strict=True))), strict=True):
            x.grad = g
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    return {k: x.detach().clone() for k, x in zip(keys, leaves, strict=True)}, opt


def unrolled_G(name, kw, losses, target, params: Params, weights, lrs, state: OptimizerState | None):
    """dL(theta_end)/dw by one autograd graph through the whole window of torch's own update code."""
    keys, domains = list(params), list(losses)
    W = torch.tensor([[w[d] for d in domains] for w in weights], dtype=DT, requires_grad=True)
    th = [params[k].clone().requires_grad_(True) for k in keys]
    state = state or OptimizerState()
    m = None if state.m is None else [state.m[k].clone() for k in keys]
    v = None if state.v is None else [state.v[k].clone() for k in keys]
    wd = kw.get("weight_decay", 0.0 if name != "adamw" else 1e-2)
    wds = [wd.get(k, 0.0) for k in keys] if isinstance(wd, dict) else [wd] * len(keys)
    for t, lr in enumerate(lrs):
        gks = [torch.autograd.grad(f(dict(zip(keys, th, strict=True))), th, create_graph=True)
               for f in losses.values()]
        g = [sum(W[t, i] * gk[j] for i, gk in enumerate(gks)) for j in range(len(keys))]
        if name == "gd":
            th = [x - lr * gj for x, gj in zip(th, g, strict=True)]
            continue
        new = []
        for j in range(len(keys)):  # torch's code, on clones (it updates in place), differentiable mode
            p = th[j].clone()
            if name == "sgd":
                buf = torch.zeros_like(p) if m is None else m[j].clone()  # zero buffer: b' = d as when fresh
                torch_sgd.sgd([p], [g[j]], [buf], foreach=False, weight_decay=wds[j], lr=lr, maximize=False,
                              momentum=kw["momentum"], dampening=kw.get("dampening", 0.0),
                              nesterov=kw.get("nesterov", False))
                new.append((p, buf, None))
            else:
                mj = torch.zeros_like(p) if m is None else m[j].clone()
                vj = torch.zeros_like(p) if v is None else v[j].clone()
                b1, b2 = kw.get("betas", (0.9, 0.999))
                torch_adam.adam([p], [g[j]], [mj], [vj], [], [torch.tensor(float(state.step + t), dtype=DT)],
                                foreach=False, differentiable=True, amsgrad=False, beta1=b1, beta2=b2, lr=lr,
                                weight_decay=wds[j], eps=kw.get("eps", 1e-8), maximize=False,
                                decoupled_weight_decay=name == "adamw")
                new.append((p, mj, vj))
        th = [x[0] for x in new]
        m = [x[1] for x in new]
        v = None if name == "sgd" else [x[2] for x in new]
    (gw,) = torch.autograd.grad(target(dict(zip(keys, th, strict=True))), W)
    return {d: gw[:, i] for i, d in enumerate(domains)}


# name, kwargs, warm state (5 steps of the real torch optimiser first), lr scale
CASES = [
    ("gd", {}, False, 0.5),
    ("sgd", {"momentum": 0.9}, False, 0.1),
    ("sgd", {"momentum": 0.8, "dampening": 0.1, "weight_decay": 0.05}, True, 0.1),
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": {"W1": 0.1, "W2": 0.05}}, True, 0.1),
    ("adam", {"eps": 1e-3, "weight_decay": 0.1}, False, 0.01),
    ("adamw", {"betas": (0.8, 0.99), "eps": 1e-3, "weight_decay": 0.1}, False, 0.01),
    ("adam", {}, True, 0.01),
    ("adamw", {"weight_decay": {"W1": 0.2, "W2": 0.1}}, True, 0.01),
]
IDS = [f"{n}-{'warm' if warm else 'fresh'}-{i}" for i, (n, _, warm, _) in enumerate(CASES)]


def setup(case, steps: int = 15):
    """Random per-step weights and learning rates; a warm state from the real optimiser if asked."""
    name, kw, warm, lr_scale = case
    params, losses, target = problem(K=3)
    gen = torch.Generator().manual_seed(1)
    raw = torch.rand(steps, 3, generator=gen, dtype=DT) + 0.2
    raw = raw / raw.sum(1, keepdim=True)
    weights = [{d: float(x) for d, x in zip(losses, row, strict=True)} for row in raw]
    lrs = [lr_scale * (1 + 0.05 * t) for t in range(steps)]
    state = None
    if warm:  # 5 real torch steps at the uniform mix; its state, read by OptimizerState.from_torch
        assert name != "gd"
        keys = list(params)
        leaves = [params[k].clone().requires_grad_(True) for k in keys]
        opt = torch_optimizer(name, leaves, keys, kw)
        params, _ = run_torch(name, kw, losses, params, [dict.fromkeys(losses, 1 / 3)] * 5, [lr_scale] * 5,
                              opt=opt)
        state = OptimizerState.from_torch(opt, dict(zip(keys, leaves, strict=True)))
        assert state.step == (5 if name != "sgd" else 0) and state.m is not None
    return name, kw, params, losses, target, weights, lrs, state


# --------------------------------------------------------------------------------------------------
# 1. the exact derivative of the actual update
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradient_equals_unrolled_autograd(case) -> None:
    name, kw, params, losses, target, weights, lrs, state = setup(case)
    res = schedule_response(losses, params, weights, lrs, target, name, state, **kw)
    ref = unrolled_G(name, kw, losses, target, params, weights, lrs, state)
    for d in losses:
        assert res.G[d].shape == (len(weights),)
        assert rel(res.G[d], ref[d]) <= 1e-8, (d, rel(res.G[d], ref[d]))
    # the schedule matters: G is not a constant per domain, nor tiny
    assert all(float(res.G[d].std()) > 1e-3 * float(res.G[d].abs().max()) for d in losses)


@pytest.mark.parametrize("case", CASES[1:], ids=IDS[1:])
def test_forward_equals_torch_optimizer(case) -> None:
    name, kw, params, losses, target, weights, lrs, state = setup(case)
    res = schedule_response(losses, params, weights, lrs, target, name, state, **kw)
    keys = list(params)
    end, opt = run_torch(name, kw, losses, params, weights, lrs, state)
    leaves = [x for g in opt.param_groups for x in g["params"]]
    got = OptimizerState.from_torch(opt, dict(zip(keys, leaves, strict=True)))
    for k in keys:
        assert rel(res.params[k], end[k]) <= 1e-12, (k, rel(res.params[k], end[k]))
        assert rel(res.state.m[k], got.m[k]) <= 1e-12
        if name != "sgd":
            assert rel(res.state.v[k], got.v[k]) <= 1e-12
    assert res.state.step == got.step or name == "sgd"
    assert res.loss == pytest.approx(float(target(end)), rel=1e-12)


@pytest.mark.parametrize("case", [CASES[i] for i in (3, 4, 5, 7)], ids=[IDS[i] for i in (3, 4, 5, 7)])
def test_prediction_equals_central_differences_of_torch_optimizer(case) -> None:
    """(L(w + h dw) - L(w - h dw)) / 2h of the real torch optimiser's trajectories = sum dw G + O(h^2)."""
    name, kw, params, losses, target, weights, lrs, state = setup(case)
    G = schedule_gradient(losses, params, weights, lrs, target, name, state, **kw)
    gen = torch.Generator().manual_seed(7)
    dw = {d: torch.randn(len(weights), generator=gen, dtype=DT) for d in losses}
    h = 1e-5

    def end_loss(sign: float) -> float:
        ws = [{d: w[d] + sign * h * float(dw[d][t]) for d in losses} for t, w in enumerate(weights)]
        return float(target(run_torch(name, kw, losses, params, ws, lrs, state)[0]))

    fd = (end_loss(1.0) - end_loss(-1.0)) / (2 * h)
    pred = predicted_change(G, dw)
    assert abs(fd - pred) <= 1e-7 * abs(pred), (fd, pred)


def test_optimizer_step_and_api() -> None:
    params, losses, target = problem(K=2)
    g = {k: torch.ones_like(x) for k, x in params.items()}
    p1, s1 = optimizer_step(params, g, None, 0.1, "gd")
    assert s1.step == 1 and s1.m is None and torch.equal(p1["b1"], params["b1"] - 0.1)
    _, s2 = optimizer_step(params, g, s1, 0.1, "adam")
    assert s2.step == 2 and torch.allclose(s2.v["W1"], torch.full_like(params["W1"], 1e-3))
    assert commute.schedule_gradient is schedule_gradient and commute.schedule_response is schedule_response
    w = [{"d0": 0.5, "d1": 0.5}] * 3
    assert set(schedule_gradient(losses, params, w, 0.1, "d0")) == {"d0", "d1"}
    bad = [
        dict(optimizer="lion"),
        dict(optimizer="adam", momentum=0.9),
        dict(optimizer="sgd", nesterov=True),
        dict(lr=[0.1, 0.1]),
        dict(weights=[{"d0": 1.0, "d9": 0.0}] * 3),
        dict(weights={"d0": 1.0}),
        dict(target="val"),
    ]
    for b in bad:
        args = {"losses": losses, "params": params, "weights": w, "lr": 0.1, "target": target} | b
        with pytest.raises(CommuteError):
            schedule_response(**args)


@pytest.mark.parametrize("name", ["gd", "adam"])
def test_unused_parameter(name: str) -> None:
    """A parameter no loss touches (Adam: v stays 0, where sqrt has no derivative) changes nothing."""
    params, losses, val = problem(K=2)
    w, kw = [{"d0": 0.3, "d1": 0.7}] * 6, {"eps": 1e-3} if name == "adam" else {}
    res = schedule_response(losses, params | {"unused": torch.ones(3, dtype=DT)}, w, 0.01, val, name, **kw)
    ref = schedule_response(losses, params, w, 0.01, val, name, **kw)
    assert torch.equal(res.params["unused"], torch.ones(3, dtype=DT))
    for d in losses:
        assert rel(res.G[d], ref.G[d]) <= 1e-14


# --------------------------------------------------------------------------------------------------
# the eq. 9/10 intervention helpers
# --------------------------------------------------------------------------------------------------
def test_intervention_delta() -> None:
    iv = Intervention({"a": 0.6, "b": 0.3, "c": 0.1}, "b", "a", 0.2, t0=13, T=3)
    dw = intervention_delta(iv, steps=10, start=10)
    assert dw["b"].tolist() == pytest.approx([0, 0, 0, 0.2, 0.2, 0.2, -0.2, -0.2, -0.2, 0])
    assert torch.allclose(dw["a"], -dw["b"], rtol=0, atol=1e-15) and not dw["c"].any()
    rev = intervention_delta(iv.reversed(), steps=10, start=10)
    # the mirror image is -dw: hence the antisymmetry of the first-order term
    assert all(torch.allclose(rev[k], -dw[k], rtol=0, atol=1e-15) for k in dw)
    G = {"a": torch.arange(10.0, dtype=DT), "b": torch.ones(10, dtype=DT), "c": torch.zeros(10, dtype=DT)}
    assert antisymmetric_excess(G, iv, start=10) == pytest.approx(-0.2 * (3 + 4 + 5) + 0.2 * (6 + 7 + 8))
    for steps, start in [(10, 14), (8, 10)]:  # the window must hold [t0, t0 + 2T)
        with pytest.raises(CommuteError):
            intervention_delta(iv, steps, start)


# --------------------------------------------------------------------------------------------------
# 2. far outside the local regime: response exact to first order, bracket off
# --------------------------------------------------------------------------------------------------
def lambda_max(loss, params: Params, iters: int = 300) -> float:
    """Top Hessian eigenvalue by power iteration on HVPs (it is positive and dominant here)."""
    gen = torch.Generator().manual_seed(3)
    v = {k: torch.randn(x.shape, generator=gen, dtype=DT) for k, x in params.items()}
    lam = 0.0
    for _ in range(iters):
        norm = float(tree_dot(v, v)) ** 0.5
        v = {k: x / norm for k, x in v.items()}
        hv = hvp(loss, params, v)
        lam, v = float(tree_dot(v, hv)), hv
    return lam


def gd(losses, params: Params, weights, lr: float) -> Params:
    """The plain GD map, written out (independent of commute.response)."""
    q = params
    for w in weights:
        g = dict(zip(q, mix_grad(losses, w, q), strict=True))
        q = {k: q[k] - lr * g[k] for k in q}
    return q


def test_far_regime_response_exact_bracket_off() -> None:
    params, losses, val = problem(K=2)
    base = {"d0": 0.5, "d1": 0.5}
    theta0 = gd(losses, params, [base] * 20, 0.5)  # t0 = 20: a trained-for-a-while checkpoint
    lam = lambda_max(lambda q: 0.5 * losses["d0"](q) + 0.5 * losses["d1"](q), theta0)
    T, lr = 30, 0.5 / lam
    assert lr * T * lam >= 10  # = 15: far outside the bracket's regime (gamma T lambda_max << 1)
    targets = {"val": val, **losses}
    G = {name: schedule_gradient(losses, theta0, [base] * (2 * T), lr, f) for name, f in targets.items()}
    err = {}
    for dw in (0.01, 0.02):
        iv = Intervention(base, "d0", "d1", dw, t0=0, T=T)  # window step 0 = training step t0
        th12 = gd(losses, theta0, [iv(t) for t in range(2 * T)], lr)
        th21 = gd(losses, theta0, [iv.reversed()(t) for t in range(2 * T)], lr)
        for name, f in targets.items():
            observed = (float(f(th12)) - float(f(th21))) / 2
            err[name, dw] = antisymmetric_excess(G[name], iv) / observed - 1
            if dw == 0.01:
                bracket = lr**2 * dw * T**2 * bracket_projection(losses["d0"], losses["d1"], f, theta0)
                # measured: bracket / observed = 5.5 (val), 18 (d0), 20 (d1); response within 2e-4
                assert bracket / observed > 4, (name, bracket / observed)
    for name in targets:
        assert abs(err[name, 0.01]) < 1e-3, err
        # the antisymmetric part is odd in dw: the first-order prediction's relative error is O(dw^2)
        assert 3 < err[name, 0.02] / err[name, 0.01] < 5, err


def test_cubic_nodes_take_the_excess_through_the_cubic_term() -> None:
    """At larger Δw (same far regime, γTλ_max = 15) the first-order excess is off by its Δw³ term, O(Δw²)
    relative; the mean of Σ δw·G at the two Gauss nodes ±Δw/√3 (G along each node schedule's own
    trajectory) is off by O(Δw⁴): about 16× less per doubling of Δw, and far closer at every Δw. Truth:
    the real GD branches θ12/θ21 simulated exactly."""
    params, losses, val = problem(K=2)
    base = {"d0": 0.5, "d1": 0.5}
    theta0 = gd(losses, params, [base] * 20, 0.5)
    lam = lambda_max(lambda q: 0.5 * losses["d0"](q) + 0.5 * losses["d1"](q), theta0)
    T, lr = 30, 0.5 / lam
    G0 = schedule_gradient(losses, theta0, [base] * (2 * T), lr, val)
    first, cubic = {}, {}
    for dw in (0.05, 0.1, 0.2):
        iv = Intervention(base, "d0", "d1", dw, t0=0, T=T)
        observed = (float(val(gd(losses, theta0, [iv(t) for t in range(2 * T)], lr)))
                    - float(val(gd(losses, theta0, [iv.reversed()(t) for t in range(2 * T)], lr)))) / 2
        plus, minus = cubic_nodes(iv)
        assert plus.delta_w == pytest.approx(dw / math.sqrt(3)) and minus(0)["d0"] == pytest.approx(
            0.5 - dw / math.sqrt(3))
        Gp, Gm = (schedule_gradient(losses, theta0, [s(t) for t in range(2 * T)], lr, val)
                  for s in (plus, minus))
        first[dw] = antisymmetric_excess(G0, iv) / observed - 1
        cubic[dw] = antisymmetric_excess_cubic(Gp, Gm, iv) / observed - 1
    # measured: first-order 0.15 %, 0.63 %, 2.8 %; through the cubic term 5e-6, 8e-5, 1.4e-3
    for dw in first:
        assert abs(cubic[dw]) < 0.1 * abs(first[dw]), (first, cubic)
    assert 3 < first[0.1] / first[0.05] < 5, first  # O(Δw²)
    assert 10 < cubic[0.1] / cubic[0.05] < 22, cubic  # O(Δw⁴)


# --------------------------------------------------------------------------------------------------
# 3. gamma T -> 0: the response tends to the bracket (Cor. 3.2a, three domains)
# --------------------------------------------------------------------------------------------------
def test_small_step_limit_is_the_bracket() -> None:
    params, losses, val = problem(K=3)
    base = {"d0": 0.5, "d1": 0.3, "d2": 0.2}
    mix = lambda q: sum(base[d] * f(q) for d, f in losses.items())  # noqa: E731
    X = lambda q: losses["d0"](q) - losses["d1"](q)  # noqa: E731
    lam = lambda_max(mix, params)
    T, dw = 5, 0.1
    iv = Intervention(base, "d0", "d1", dw, t0=0, T=T)
    for target in (val, mix):
        P = bracket_projection(X, mix, target, params)  # Delta L = dw eps^2 P(X, Y; L), eps = gamma T
        errs = []
        for c in (0.004, 0.002, 0.001):  # gamma T lambda_max = 0.02, 0.01, 0.005
            lr = c / lam
            G = schedule_gradient(losses, params, [base] * (2 * T), lr, target)
            errs.append(antisymmetric_excess(G, iv) / (lr**2 * dw * T**2 * P) - 1)
            # measured |error| / (gamma T lambda_max) = 3.9 (val), 1.9 (mix)
            assert abs(errs[-1]) <= 5 * c * T
        # the error is O(gamma T): it halves with gamma (measured ratios 1.97-1.99), and the Richardson
        # extrapolation to gamma T = 0 equals the bracket (measured 2.6e-4 (val), 1.2e-4 (mix))
        assert 1.95 < errs[0] / errs[1] < 2.05 and 1.95 < errs[1] / errs[2] < 2.05, errs
        assert abs(2 * errs[2] - errs[1]) < 1e-3, errs


# --------------------------------------------------------------------------------------------------
# 4. cost and memory
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gd", "adam"])
def test_one_step_graph_at_a_time(name: str, monkeypatch) -> None:
    params, losses, val = problem(K=3)
    w = dict.fromkeys(losses, 1 / 3)
    calls: list[str] = []
    real_grad = torch.autograd.grad

    def spy(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False, **kw):
        calls.append("graph" if create_graph else "vjp" if grad_outputs is not None else "grad")
        return real_grad(outputs, inputs, grad_outputs=grad_outputs, retain_graph=retain_graph,
                         create_graph=create_graph, **kw)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    live = LiveSaved()
    peaks = {}
    for n in (4, 16):
        calls.clear()
        res: dict[str, object] = {}

        def call(n: int = n, res: dict = res) -> None:
            res["r"] = schedule_response(losses, params, [w] * n, 0.05, val, name)

        peaks[n] = live.run(call)
        K = len(losses)
        # forward: one mixture gradient per step; backward: K gradient graphs and one VJP per step; target
        assert calls.count("grad") == n + 1 and calls.count("graph") == K * n and calls.count("vjp") == n
        assert res["r"].n_grad == n * (K + 1) + 1 and res["r"].n_vjp == n
    assert peaks[16] == peaks[4] > 0, peaks  # autograd memory does not grow with the window

    def unroll(n: int) -> None:  # the probe sees a graph through the window grow
        th = {k: x.clone().requires_grad_(True) for k, x in params.items()}
        q = th
        for _ in range(n):
            gs = real_grad(sum(f(q) for f in losses.values()) / K, list(q.values()), create_graph=True)
            q = {k: q[k] - 0.05 * g for k, g in zip(q, gs, strict=True)}
        real_grad(val(q), list(th.values()))

    assert live.run(lambda: unroll(16)) > 3 * live.run(lambda: unroll(4))
