"""The math core against independent truth.

* closed forms on random dense quadratics (float64, relative error <= 1e-8);
* finite differences of gradients on a small non-quadratic network (tanh MLP + cross-entropy);
* the two HVP modes agreeing, and ``hvps`` on a shared graph equal to separate ``hvp`` calls;
* Theorem 3.1 itself, by integrating the gradient flows (scipy ``solve_ivp``, tight tolerances) in both
  orders: the commutator of the flows is t^2 R(L_1, L_2) with an error shrinking like t^3, and
  L(theta_12) - L(theta_base) = (dt^2/2) P(L_1, L_2; L) with a relative error shrinking like dt.
  The signs are whatever the simulation says; the core must agree with it (docs/design.md §1).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from commute import bracket_projection, grad, hvp, hvps, lie_bracket
from commute.bracket import tree_add, tree_dot, tree_scale, tree_sub

DT = torch.float64
MODES = ["rev-rev", "fwd-rev"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def flat(p: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(p, torch.Tensor):
        return p.reshape(-1)
    return torch.cat([p[k].reshape(-1) for k in sorted(p)])


# --------------------------------------------------------------------------------------------------
# closed forms on dense quadratics
# --------------------------------------------------------------------------------------------------
N = 12
SHAPES = {"a": (3, 2), "b": (6,)}  # a dict-of-tensors view of the same R^12


def random_quadratic(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random dense symmetric (indefinite) matrix A and centre b for L = 1/2 (x-b)^T A (x-b)."""
    m = torch.randn(N, N, generator=gen, dtype=DT)
    return (m + m.T) / 2, torch.randn(N, generator=gen, dtype=DT)


def to_dict(x: torch.Tensor) -> dict[str, torch.Tensor]:
    out, k = {}, 0
    for name in sorted(SHAPES):
        size = math.prod(SHAPES[name])
        out[name] = x[k : k + size].reshape(SHAPES[name])
        k += size
    return out


def quad_loss(a: torch.Tensor, b: torch.Tensor, as_dict: bool):
    def loss(p):
        x = flat(p) if as_dict else p
        return 0.5 * (x - b) @ a @ (x - b)

    return loss


@pytest.fixture(params=[False, True], ids=["tensor", "dict"])
def quadratics(request):
    gen = torch.Generator().manual_seed(1234)
    (a1, b1), (a2, b2), (a3, b3) = (random_quadratic(gen) for _ in range(3))
    x = torch.randn(N, generator=gen, dtype=DT)
    v = torch.randn(N, generator=gen, dtype=DT)
    as_dict = request.param
    wrap = to_dict if as_dict else (lambda t: t)
    losses = [quad_loss(a, b, as_dict) for a, b in ((a1, b1), (a2, b2), (a3, b3))]
    return dict(A=(a1, a2, a3), b=(b1, b2, b3), x=x, v=v, wrap=wrap, losses=losses, as_dict=as_dict)


def test_grad_quadratic(quadratics):
    q = quadratics
    g = grad(q["losses"][0], q["wrap"](q["x"]))
    assert isinstance(g, dict) == q["as_dict"]
    assert rel_err(flat(g), q["A"][0] @ (q["x"] - q["b"][0])) <= 1e-8


@pytest.mark.parametrize("mode", MODES)
def test_hvp_quadratic(quadratics, mode):
    q = quadratics
    hv = hvp(q["losses"][0], q["wrap"](q["x"]), q["wrap"](q["v"]), mode=mode)
    assert isinstance(hv, dict) == q["as_dict"]
    if q["as_dict"]:
        assert {k: t.shape for k, t in hv.items()} == {k: torch.Size(s) for k, s in SHAPES.items()}
    assert rel_err(flat(hv), q["A"][0] @ q["v"]) <= 1e-8


@pytest.mark.parametrize("mode", MODES)
def test_lie_bracket_and_projection_quadratic(quadratics, mode):
    q = quadratics
    (a1, a2, a3), (b1, b2, b3), x = q["A"], q["b"], q["x"]
    r_true = a2 @ a1 @ (x - b1) - a1 @ a2 @ (x - b2)  # H_2 g_1 - H_1 g_2
    r = lie_bracket(q["losses"][0], q["losses"][1], q["wrap"](x), mode=mode)
    assert rel_err(flat(r), r_true) <= 1e-8
    p_true = float(a3 @ (x - b3) @ r_true)
    p = bracket_projection(q["losses"][0], q["losses"][1], q["losses"][2], q["wrap"](x), mode=mode)
    assert isinstance(p, float)
    assert abs(p - p_true) <= 1e-8 * abs(p_true)
    # antisymmetry, and a target equal to one of the pair
    p_swap = bracket_projection(q["losses"][1], q["losses"][0], q["losses"][2], q["wrap"](x), mode=mode)
    assert abs(p_swap + p_true) <= 1e-8 * abs(p_true)
    p_self = bracket_projection(q["losses"][0], q["losses"][1], q["losses"][0], q["wrap"](x), mode=mode)
    p_self_true = float(a1 @ (x - b1) @ r_true)
    assert abs(p_self - p_self_true) <= 1e-8 * abs(p_self_true)


def test_callers_tensors_untouched(quadratics):
    q = quadratics
    x = q["wrap"](q["x"].clone())
    before = flat(x).clone()
    lie_bracket(q["losses"][0], q["losses"][1], x)
    assert torch.equal(flat(x), before)
    leaves = [x] if isinstance(x, torch.Tensor) else list(x.values())
    assert all(t.grad is None and not t.requires_grad for t in leaves)


def test_tree_ops():
    gen = torch.Generator().manual_seed(0)
    a = {"u": torch.randn(3, generator=gen, dtype=DT), "w": torch.randn(2, 2, generator=gen, dtype=DT)}
    b = {"w": torch.randn(2, 2, generator=gen, dtype=DT), "u": torch.randn(3, generator=gen, dtype=DT)}
    assert torch.allclose(tree_dot(a, b), flat(a) @ flat(b), rtol=1e-14, atol=0)
    assert torch.allclose(flat(tree_add(a, b)), flat(a) + flat(b), rtol=1e-14, atol=0)
    assert torch.allclose(flat(tree_sub(a, b)), flat(a) - flat(b), rtol=1e-14, atol=0)
    assert torch.allclose(flat(tree_scale(a, 2.5)), 2.5 * flat(a), rtol=1e-14, atol=0)


def test_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        hvp(lambda x: (x**2).sum(), torch.ones(2, dtype=DT), torch.ones(2, dtype=DT), mode="fwd-fwd")


# --------------------------------------------------------------------------------------------------
# a small non-quadratic network: tanh MLP + cross-entropy, float64, against finite differences
# --------------------------------------------------------------------------------------------------
def mlp_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(DT)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT) * 0.7)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}

    def make_loss(n: int):
        x = torch.randn(n, 5, generator=gen, dtype=DT)
        y = torch.randint(0, 3, (n,), generator=gen)

        def loss(p):
            logits = torch.func.functional_call(net, p, (x,))
            return torch.nn.functional.cross_entropy(logits, y)

        return loss

    return params, make_loss(16), make_loss(16), make_loss(32), gen


def fd_directional(f, params, v, eps: float = 1e-5):
    """Central difference (f(p + eps v) - f(p - eps v)) / (2 eps), leaf-wise."""
    plus = f(tree_add(params, tree_scale(v, eps)))
    minus = f(tree_add(params, tree_scale(v, -eps)))
    return tree_scale(tree_sub(plus, minus), 1 / (2 * eps))


def test_grad_mlp_finite_differences():
    params, l1, _, _, gen = mlp_problem()
    g = grad(l1, params)
    for _ in range(3):
        v = {k: torch.randn(t.shape, generator=gen, dtype=DT) for k, t in params.items()}
        fd = fd_directional(lambda p: l1(p).detach(), params, v)
        assert abs(float(tree_dot(g, v)) - float(fd)) <= 1e-8 * abs(float(fd))


@pytest.mark.parametrize("mode", MODES)
def test_hvp_mlp_finite_differences(mode):
    params, l1, _, _, gen = mlp_problem()
    v = {k: torch.randn(t.shape, generator=gen, dtype=DT) for k, t in params.items()}
    hv = hvp(l1, params, v, mode=mode)
    fd = fd_directional(lambda p: grad(l1, p), params, v)
    assert rel_err(flat(hv), flat(fd)) <= 1e-7


def test_lie_bracket_mlp_finite_differences():
    """R = H_2 g_1 - H_1 g_2 as directional derivatives of the gradient fields: d g_2[g_1] - d g_1[g_2]."""
    params, l1, l2, lt, _ = mlp_problem()
    g1, g2 = grad(l1, params), grad(l2, params)
    fd = tree_sub(fd_directional(lambda p: grad(l2, p), params, g1),
                  fd_directional(lambda p: grad(l1, p), params, g2))
    r = lie_bracket(l1, l2, params)
    assert rel_err(flat(r), flat(fd)) <= 1e-7
    p = bracket_projection(l1, l2, lt, params)
    p_fd = float(tree_dot(fd, grad(lt, params)))
    assert abs(p - p_fd) <= 1e-7 * abs(p_fd)


def test_hvp_modes_agree_mlp():
    params, l1, _, _, gen = mlp_problem(seed=3)
    for _ in range(3):
        v = {k: torch.randn(t.shape, generator=gen, dtype=DT) for k, t in params.items()}
        a = hvp(l1, params, v, mode="rev-rev")
        b = hvp(l1, params, v, mode="fwd-rev")
        assert rel_err(flat(a), flat(b)) <= 1e-12


def test_hvps_shared_graph_equals_separate():
    params, l1, _, _, gen = mlp_problem(seed=5)
    vs = [{k: torch.randn(t.shape, generator=gen, dtype=DT) for k, t in params.items()} for _ in range(4)]
    shared = hvps(l1, params, vs)
    assert len(shared) == len(vs)
    for v, hv in zip(vs, shared, strict=True):
        assert rel_err(flat(hv), flat(hvp(l1, params, v))) <= 1e-13
    assert hvps(l1, params, []) == []


# --------------------------------------------------------------------------------------------------
# Theorem 3.1 by simulation of the gradient flows
# --------------------------------------------------------------------------------------------------
D = 4


def theorem_problem():
    """Two non-quadratic losses on R^4 (logistic regression; log-cosh regression + quartic) and targets."""
    gen = torch.Generator().manual_seed(7)
    x1 = torch.randn(20, D, generator=gen, dtype=DT)
    y1 = torch.sign(torch.randn(20, generator=gen, dtype=DT))
    x2 = torch.randn(20, D, generator=gen, dtype=DT)
    y2 = torch.randn(20, generator=gen, dtype=DT)

    def l1(th: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-y1 * (x1 @ th)).mean()

    def l2(th: torch.Tensor) -> torch.Tensor:
        r = x2 @ th - y2
        return (torch.log(torch.cosh(r))).mean() + 0.05 * (th**4).sum()

    theta0 = torch.randn(D, generator=gen, dtype=DT)
    return l1, l2, theta0


def flow(loss, theta: np.ndarray, t: float) -> np.ndarray:
    """Gradient flow theta' = -grad L(theta) for time t (DOP853, rtol 1e-13); gradient by torch.func."""
    g = torch.func.grad(loss)

    def rhs(_, y):
        return -g(torch.from_numpy(y)).numpy()

    sol = solve_ivp(rhs, (0.0, t), theta, method="DOP853", rtol=1e-13, atol=1e-15)
    assert sol.success
    return sol.y[:, -1]


def test_flow_commutator_is_t2_bracket():
    """phi_2(t) o phi_1(t) - phi_1(t) o phi_2(t) = t^2 R(L_1, L_2) + O(t^3), R = H_2 g_1 - H_1 g_2."""
    l1, l2, th = theorem_problem()
    r = lie_bracket(l1, l2, th).numpy()
    x = th.numpy()
    errs = []
    ts = [0.04, 0.02, 0.01]
    for t in ts:
        th12 = flow(l2, flow(l1, x, t), t)  # train on 1 first, then on 2
        th21 = flow(l1, flow(l2, x, t), t)
        errs.append(np.linalg.norm(th12 - th21 - t**2 * r) / np.linalg.norm(t**2 * r))
    # relative error (error / t^2) shrinks like t, i.e. the absolute error like t^3
    assert errs[-1] < 0.05
    for e_big, e_small in zip(errs, errs[1:], strict=False):
        assert 1.6 < e_big / e_small < 2.5, errs


@pytest.mark.parametrize("target", ["mix", "l1", "l2"])
def test_reordering_excess_loss(target):
    """L(theta_12) - L(theta_base) = (dt^2/2) P(L_1, L_2; L) + O(dt^3); theta_base: 2 dt of the 50/50 flow."""
    l1, l2, th = theorem_problem()

    def mix(p):
        return 0.5 * (l1(p) + l2(p))

    loss = {"mix": mix, "l1": l1, "l2": l2}[target]
    p = bracket_projection(l1, l2, loss, th)
    x = th.numpy()

    def value(y: np.ndarray) -> float:
        return float(loss(torch.from_numpy(y)))

    rel = []
    dts = [0.04, 0.02, 0.01]
    for dt in dts:
        th12 = flow(l2, flow(l1, x, dt), dt)
        th21 = flow(l1, flow(l2, x, dt), dt)
        base = flow(mix, x, 2 * dt)
        pred = dt**2 / 2 * p
        rel.append((value(th12) - value(base)) / pred - 1)
        # the opposite order gives the opposite excess to the same order
        assert abs((value(th21) - value(base)) / -pred - 1) < 10 * dt
    assert abs(rel[-1]) < 0.1
    for e_big, e_small in zip(rel, rel[1:], strict=False):
        assert 1.6 < e_big / e_small < 2.5, rel


def test_hvps_with_unused_and_linear_parameters():
    """A frozen/unused leaf and a leaf entering linearly have zero Hessian rows (no autograd error)."""
    gen = torch.Generator().manual_seed(7)
    A = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    A = A @ A.T
    c = torch.randn(3, generator=gen, dtype=torch.float64)
    p = {"x": torch.randn(4, generator=gen, dtype=torch.float64),
         "lin": torch.randn(3, generator=gen, dtype=torch.float64),
         "unused": torch.randn(2, generator=gen, dtype=torch.float64)}

    def loss(q):
        return 0.5 * q["x"] @ A @ q["x"] + c @ q["lin"]

    v = {k: torch.randn_like(t) for k, t in p.items()}
    hv = hvp(loss, p, v)
    torch.testing.assert_close(hv["x"], A @ v["x"], rtol=1e-12, atol=0)
    assert torch.count_nonzero(hv["lin"]) == 0 and torch.count_nonzero(hv["unused"]) == 0
    # a loss linear in every parameter: H = 0
    (h0,) = hvps(lambda q: c @ q["lin"], p, [v])
    assert all(torch.count_nonzero(t) == 0 for t in h0.values())
