"""Tests of commute.curvature: λ_max by power iteration against dense eigendecompositions (eigvalsh)."""

from __future__ import annotations

import pytest
import torch

from commute.curvature import hessian_lambda_max, top_eigenvalue


# --------------------------------------------------------------------------------------------------
# λ_max by power iteration
# --------------------------------------------------------------------------------------------------
def _spd(n: int, seed: int, top: float = 10.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    rest = torch.rand(n - 1, generator=g, dtype=torch.float64) * top * 0.7
    ev = torch.cat([torch.tensor([top], dtype=torch.float64), rest])
    return q @ torch.diag(ev) @ q.T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_eigenvalue_matches_eigvalsh(seed: int) -> None:
    A = _spd(30, seed)
    lam, v = top_eigenvalue(lambda x: A @ x, torch.zeros(30, dtype=torch.float64), iters=200, tol=1e-12)
    truth = torch.linalg.eigvalsh(A).max().item()
    assert lam == pytest.approx(truth, rel=1e-8)
    assert torch.allclose(A @ v, lam * v, atol=1e-5)


def test_top_eigenvalue_finds_dominant_negative() -> None:
    A = -_spd(20, 3)  # all eigenvalues negative: the dominant one is the most negative
    lam, _ = top_eigenvalue(lambda x: A @ x, torch.zeros(20, dtype=torch.float64), iters=300, tol=1e-12)
    assert lam == pytest.approx(torch.linalg.eigvalsh(A).min().item(), rel=1e-8)


def test_hessian_lambda_max_with_and_without_adam_preconditioner() -> None:
    A = _spd(12, 4)
    w = torch.arange(12.0, dtype=torch.float64)

    def loss(p):  # Hessian of 0.5 xᵀAx + cubic-free linear term is A, on a dict pytree
        x = torch.cat([p["a"], p["b"]])
        return 0.5 * x @ A @ x + w @ x

    params = {"a": torch.randn(5, dtype=torch.float64), "b": torch.randn(7, dtype=torch.float64)}
    lam = hessian_lambda_max(loss, params, iters=300, tol=1e-12)
    assert lam == pytest.approx(torch.linalg.eigvalsh(A).max().item(), rel=1e-6)
    d = torch.rand(12, dtype=torch.float64) + 0.1
    D = {"a": d[:5], "b": d[5:]}
    s = d.rsqrt()
    lam_pre = hessian_lambda_max(loss, params, D, iters=300, tol=1e-12)
    truth = torch.linalg.eigvalsh(s[:, None] * A * s[None, :]).max().item()
    assert lam_pre == pytest.approx(truth, rel=1e-6)
