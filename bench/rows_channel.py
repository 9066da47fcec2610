"""Does the rows noise channel give the derivative of the expected loss? A noisy quadratic near its optimum.

Two domains with per-row losses l_k(theta; y) = sum_j a_kj (theta_j - y_j)^2 / 2, y = mu + sd_k * noise (a
common optimum, so the schedule acts on E[L] mostly through the gradient noise), exact-count batches of 20
rows, the eq. (9) swap at (1/2, 1/2). The truth: for SGD the closed-form moment recursion (any noise law:
the dynamics are linear) and a Monte Carlo with common random numbers (one row moved); for Adam the Monte
Carlo. Against it, the mean over ``--replays`` replays of the ResponseEstimator's prediction, fresh and with
``noise="rows"``. ``--noise t3`` draws Student-t(3) row noise (same variance) to see whether Stein's lemma,
exact for Gaussian noise, still holds with heavy tails (it matters only for the nonlinear Adam map).

    python bench/rows_channel.py --optimizer adam              # ~1.5 min
    python bench/rows_channel.py --optimizer adam --noise t3   # ~6 min (the Monte Carlo truth)
    python bench/rows_channel.py --optimizer sgd --lr 0.3
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn

from commute.response import OptimizerState, ResponseEstimator

DT = torch.float64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--T", type=int, default=15)
    ap.add_argument("--replays", type=int, default=200)
    ap.add_argument("--mc", type=int, default=20_000, help="Monte Carlo replicates of the truth")
    ap.add_argument("--noise", default="gauss", choices=["gauss", "t3"])
    a = ap.parse_args()
    torch.set_num_threads(1)
    d, B, T, lr = a.d, 20, a.T, a.lr
    g = torch.Generator().manual_seed(0)
    curv = torch.rand(2, d, dtype=DT, generator=g) * 1.5 + 0.25
    mu = torch.zeros(d, dtype=DT)
    sd = 2.0 * (torch.rand(2, d, dtype=DT, generator=g) + 0.5)
    kw = {"betas": (0.9, 0.95), "eps": 1e-8} if a.optimizer == "adam" else {}

    def noise(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        z = torch.randn(shape, dtype=DT, generator=gen)
        if a.noise == "gauss":
            return z
        chi2 = sum(torch.randn(shape, dtype=DT, generator=gen) ** 2 for _ in range(3))
        return z / (chi2 / 3).sqrt() / math.sqrt(3.0)  # Student t(3), unit variance

    def rows(k: int, n: int, gen: torch.Generator):
        return torch.full((n,), k), mu + sd[k] * noise((n, d), gen)

    def batch(gen: torch.Generator):
        parts = [rows(k, B // 2, gen) for k in range(2)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def loss_fn(model: nn.Module, b) -> torch.Tensor:
        k, Y = b
        return 0.5 * (curv[k] * (model.theta - Y) ** 2).sum(-1).mean()

    def update(th, m, v, grad, step):
        if a.optimizer == "sgd":
            return th - lr * grad, m, v
        b1, b2 = kw["betas"]
        m, v = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad**2
        return th - lr / (1 - b1**step) * m / (v.sqrt() / math.sqrt(1 - b2**step) + kw["eps"]), m, v

    gen = torch.Generator().manual_seed(5)
    theta, m, v = torch.zeros(d, dtype=DT), torch.zeros(d, dtype=DT), torch.zeros(d, dtype=DT)
    for s in range(40):  # a warm start into the noise ball
        k, Y = batch(gen)
        theta, m, v = update(theta, m, v, (curv[k] * (theta - Y)).sum(0) / B, s + 1)

    t = time.perf_counter()
    out = []
    for shift in (1, -1):  # Monte Carlo truth: one row moved, common random numbers
        gg = torch.Generator().manual_seed(11)
        th, mm, vv = (x.expand(a.mc, d).clone() for x in (theta, m, v))
        for s in range(2 * T):
            sh = shift if s < T else -shift
            grad = torch.zeros_like(th)
            for k, c in enumerate((B // 2 + sh, B // 2 - sh)):
                Y = mu + sd[k] * noise((a.mc, B, d), gg)
                grad = grad + (curv[k] * (th.unsqueeze(1) - Y[:, :c])).sum(1) / B
            th, mm, vv = update(th, mm, vv, grad, 40 + s + 1)
        out.append(th)
    truth = {}
    for k, dn in enumerate("ab"):
        x = 0.25 * B * (curv[k] * ((out[0] - mu) ** 2 - (out[1] - mu) ** 2)).sum(-1)
        truth[dn] = (float(x.mean()), float(x.std() / math.sqrt(a.mc)))
    print(f"{a.optimizer}, lr {lr}, {a.noise} row noise, window {2 * T} steps; Monte Carlo truth "
          f"({time.perf_counter() - t:.0f} s): " + ", ".join(f"L_{k} {m_:+.4f} ± {s_:.4f}"
                                                            for k, (m_, s_) in truth.items()))
    if a.optimizer == "sgd":  # the closed-form moment recursion (exact for any noise law)
        eps = torch.zeros((), dtype=DT, requires_grad=True)
        mean, var = theta.clone(), torch.zeros(d, dtype=DT)
        for s in range(2 * T):
            e = eps if s < T else -eps
            w = torch.stack([0.5 + e, 0.5 - e])[:, None]
            J = 1 - lr * (w * curv).sum(0)
            mean = J * mean + lr * (w * curv * mu).sum(0)
            var = J**2 * var + lr**2 * (w / B * curv**2 * sd**2).sum(0)
        exact = [float(torch.autograd.grad(0.5 * (curv[k] * ((mean - mu) ** 2 + var)).sum(), eps,
                                           retain_graph=True)[0]) for k in range(2)]
        print("closed form: " + ", ".join(f"L_{dn} {x:+.4f}" for dn, x in zip("ab", exact, strict=True)))

    model = nn.Module()
    model.theta = nn.Parameter(theta.clone())
    state = (OptimizerState(40, {"theta": m}, {"theta": v}) if a.optimizer == "adam" else None)

    def stream(k: int):
        while True:
            yield rows(k, 32, gen)

    est = ResponseEstimator(model, loss_fn, {"a": stream(0), "b": stream(1)}, lr=lr, optimizer=a.optimizer,
                            state=state, **kw)
    target = {dn: [(torch.full((1,), k), mu[None])] for k, dn in enumerate("ab")}
    unit = {"a": [1.0] * T + [-1.0] * T, "b": [-1.0] * T + [1.0] * T}

    def by_domain(b):
        k, Y = b
        return {dn: (k[k == i], Y[k == i]) for i, dn in enumerate("ab")}

    got: dict[str, dict[str, list[float]]] = {m_: {"a": [], "b": []} for m_ in ("fresh", "rows")}
    t = time.perf_counter()
    for _ in range(a.replays):
        bs = [batch(gen) for _ in range(2 * T)]
        for m_, extra in (("fresh", {}), ("rows", {"noise": "rows", "train_rows": by_domain})):
            rep = est.estimate(bs, [{"a": 0.5, "b": 0.5}] * (2 * T), ["a", "b"], n_groups=2,
                               target_data=target, **extra)
            for dn in "ab":
                got[m_][dn].append(rep.predict(dn, unit).mean)
    print(f"mean response over {a.replays} replays ({time.perf_counter() - t:.0f} s), per unit Δw, and "
          "|mean - truth| in combined stderr:")
    for m_ in got:
        cols = []
        for dn in "ab":
            x = np.array(got[m_][dn])
            se = x.std(ddof=1) / math.sqrt(len(x))
            off = abs(x.mean() - truth[dn][0]) / math.hypot(se, truth[dn][1])
            cols.append(f"L_{dn} {x.mean():+.4f} ± {se:.4f} ({off:.1f})")
        print(f"  {m_:6s} " + ", ".join(cols))


if __name__ == "__main__":
    main()
