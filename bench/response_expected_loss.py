"""Does the response, averaged over replays, predict the EXPECTED loss at long horizons? A regression truth.

Two regression domains (x ~ N(0, S_k) with condition number ``--cond``, optionally a rare-feature block in
the second domain, y = x.beta_k + noise), trained by Adam (or SGD) on exact-composition batches of B rows from
one warm checkpoint. The truth is Monte Carlo of the real map (commute's ``optimizer_step``, torch's
arithmetic; tests/test_response_estimator.py writes Adam out by hand): (E L(theta12) - E L(theta21)) / 2 per
unit dw for 1 and 4 rows moved between the domains in the eq. (9) swap, ``--R`` replicates vectorised with
common random numbers; the sampling-noise channel is left out of the prediction. The prediction is
:class:`commute.response.ResponseEstimator` along ``--paths`` independent replays of the base window (each
its own training batches, 2 groups of fresh batches), their mean +- stderr, beside the median path, the
spread of single paths and the no-curvature alignment baseline.

    python bench/response_expected_loss.py                                  # T = 5, 20, 50 (~3 min)
    python bench/response_expected_loss.py --lr 0.5 --betas 0.9,0.95 --T 50 --sparse 0.02
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn

from commute.response import OptimizerState, ResponseEstimator, optimizer_step

DT = torch.float64


class Problem:
    """L_k(theta) = (theta - beta_k)^T S_k (theta - beta_k) / 2 + const, S_k = E[x x^T] (with the rare block's
    Bernoulli mask in it)."""

    def __init__(self, d: int, cond: float, sparse: float, noise: float, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.d, self.noise = d, noise
        self.keep = torch.ones(2, d, dtype=DT)
        self.keep[1, d // 2:] = sparse
        self.chol, self.S, self.beta = [], [], []
        for k in range(2):
            q, _ = torch.linalg.qr(torch.randn(d, d, dtype=DT, generator=g))
            s = (q * torch.logspace(0, -math.log10(cond), d, dtype=DT)) @ q.T
            kk = self.keep[k]
            self.chol.append(torch.linalg.cholesky(s))
            self.S.append(s * (torch.outer(kk, kk) + torch.diag(kk - kk**2)))
            self.beta.append(torch.randn(d, dtype=DT, generator=g))

    def rows(self, k: int, shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        X = torch.randn(*shape, self.d, dtype=DT, generator=gen) @ self.chol[k].T
        X = X * torch.bernoulli(self.keep[k].expand(*shape, self.d), generator=gen)
        return X, X @ self.beta[k] + self.noise * torch.randn(*shape, dtype=DT, generator=gen)

    def loss(self, k: int, th: torch.Tensor) -> torch.Tensor:
        u = th - self.beta[k]
        return 0.5 * ((u @ self.S[k]) * u).sum(-1)


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    X, y = batch
    return 0.5 * ((model(X).squeeze(-1) - y) ** 2).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", default="5,20,50", help="half-window lengths")
    ap.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--betas", default="0.9,0.999")
    ap.add_argument("--B", type=int, default=20, help="training batch rows (one row = dw 1/B)")
    ap.add_argument("--d", type=int, default=10)
    ap.add_argument("--cond", type=float, default=30.0)
    ap.add_argument("--sparse", type=float, default=1.0, help="the rare block's feature probability")
    ap.add_argument("--t0", type=int, default=200, help="warm-up steps before the window")
    ap.add_argument("--R", type=int, default=8000, help="Monte Carlo replicates")
    ap.add_argument("--paths", type=int, default=300, help="replays for the response")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    prob = Problem(a.d, a.cond, a.sparse, 1.0, a.seed)
    B, half = a.B, a.B // 2
    kw = {"betas": tuple(float(x) for x in a.betas.split(",")), "eps": 1e-8} if a.optimizer == "adam" else {}
    gen = torch.Generator().manual_seed(a.seed + 1)

    def batch(counts: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [prob.rows(k, (c,), gen) for k, c in enumerate(counts)]
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    theta, state = torch.randn(a.d, dtype=DT, generator=gen), OptimizerState()
    for _ in range(a.t0):
        X, y = batch((half, B - half))
        theta, state = optimizer_step(theta, X.T @ (X @ theta - y) / B, state, a.lr, a.optimizer, **kw)

    def branch(T: int, shift: int, seed: int) -> torch.Tensor:
        """theta at the window's end for R replicates (vectorised; the branches share the row pools)."""
        g = torch.Generator().manual_seed(seed)
        th = theta.expand(a.R, -1).clone()
        st = OptimizerState(state.step, None if state.m is None else state.m.expand(a.R, -1).clone(),
                            None if state.v is None else state.v.expand(a.R, -1).clone())
        for t in range(2 * T):
            s = shift if t < T else -shift
            grad = torch.zeros_like(th)
            for k, c in enumerate((half + s, B - half - s)):
                X, y = prob.rows(k, (a.R, B), g)
                r = (X[:, :c] @ th.unsqueeze(-1)).squeeze(-1) - y[:, :c]
                grad = grad + (X[:, :c] * r.unsqueeze(-1)).sum(1) / B
            th, st = optimizer_step(th, grad, st, a.lr, a.optimizer, **kw)
        return th

    model = nn.Linear(a.d, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(theta.reshape(1, -1))
    named = OptimizerState(state.step, None if state.m is None else {"weight": state.m.reshape(1, -1)},
                           None if state.v is None else {"weight": state.v.reshape(1, -1)})

    def streams():
        def one(k: int):
            while True:
                yield prob.rows(k, (8,), gen)
        return {"a": one(0), "b": one(1)}

    est = ResponseEstimator(model, loss_fn, streams(), lr=a.lr, optimizer=a.optimizer, state=named, **kw)
    H = 0.5 * (prob.S[0] + prob.S[1])
    sharp = a.lr * float(torch.linalg.eigvalsh(H)[-1])
    print(f"{a.optimizer} lr {a.lr} {kw}: lr lambda_max(H_mix) = {sharp:.3f}, {a.t0} warm-up steps, B = {B}, "
          f"sparse {a.sparse}")
    print("T    target  truth/dw (1 row)     truth/dw (4 rows)    response (mean over paths)   median   "
          "sd(path)  alignment")
    for T in (int(x) for x in a.T.split(",")):
        t = time.time()
        truth = {}
        for rows in (1, 4):
            p12, p21 = branch(T, rows, 11), branch(T, -rows, 11)
            for k, d in enumerate("ab"):
                x = 0.5 * (prob.loss(k, p12) - prob.loss(k, p21)) * B / rows
                truth[d, rows] = (float(x.mean()), float(x.std() / math.sqrt(a.R)))
        unit = {"a": [1.0] * T + [-1.0] * T, "b": [-1.0] * T + [1.0] * T}
        paths = {d: [] for d in "ab"}
        for _ in range(a.paths):
            rep = est.estimate([batch((half, B - half)) for _ in range(2 * T)],
                               [{"a": 0.5, "b": 0.5}] * (2 * T), ["a", "b"], n_groups=2)
            for d in "ab":
                paths[d].append((rep.predict(d, unit).mean, rep.predict_alignment(d, unit).mean))
        for d in "ab":
            x = np.array(paths[d])
            r, al = x[:, 0], x[:, 1]
            print(f"{T:<4} L_{d}     {truth[d, 1][0]:+.4f} ± {truth[d, 1][1]:.4f}    "
                  f"{truth[d, 4][0]:+.4f} ± {truth[d, 4][1]:.4f}    "
                  f"{r.mean():+.4f} ± {r.std(ddof=1) / math.sqrt(len(r)):.4f} "
                  f"({r.mean() / truth[d, 1][0]:.2f}x)   "
                  f"{np.median(r):+.4f}  {r.std(ddof=1):.4f}    {al.mean():+.4f}")
        print(f"     ({time.time() - t:.0f} s)")


if __name__ == "__main__":
    main()
