"""The quadratic reproduction against independent truth.

* exact flows against ``scipy.linalg.expm`` and against ``solve_ivp`` of the ODE;
* the Table 1 ratios against a truncated power series in Δt of the whole experiment (flows, losses and
  the excess loss expanded exactly in polynomial arithmetic): its Δt^0 and Δt^1 terms vanish, its Δt^2
  term must equal the core's prediction, and the Δt^3, Δt^4 terms give the tolerance of the table
  (Δt = 0.001) — no hand-picked band;
* JSON schema and round trip; the CLI (exit code 0, files written) and clean errors for bad options.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.integrate import solve_ivp
from scipy.linalg import expm

from commute.cli import main
from commute.errors import CommuteError
from commute.toy import PAPER_TABLE1, Quadratic, ToyConfig, ToyResult, make_problem, run_toy, setup_problem


@pytest.fixture(scope="module")
def problem():
    q1, q2 = make_problem(8, 0.7, np.random.default_rng(3))
    return q1, q2, np.random.default_rng(4).standard_normal((3, 8))


def test_make_problem_appendix_b(problem):
    q1, q2, _ = problem
    lam = 0.7 ** np.arange(8)
    for q in (q1, q2):
        assert np.allclose(q.A, q.A.T, rtol=0, atol=1e-15)
        assert np.allclose(np.sort(np.linalg.eigvalsh(q.A)), np.sort(lam), rtol=0, atol=1e-13)
        assert np.allclose(q.eigvecs.T @ q.eigvecs, np.eye(8), rtol=0, atol=1e-13)
        assert np.allclose(q.eigvecs @ np.diag(q.eigvals) @ q.eigvecs.T, q.A, rtol=0, atol=1e-13)
    assert not np.allclose(q1.A @ q2.A, q2.A @ q1.A, atol=1e-3)  # the Hessians do not commute


@pytest.mark.parametrize("t", [0.0, 0.05, 1.0, 7.0])
def test_flow_matches_expm(problem, t):
    """Φ(t)θ = b + expm(-tA)(θ - b) for each domain, with b = A^{-1} c."""
    q1, q2, th = problem
    for q in (q1, q2):
        b = np.linalg.solve(q.A, q.c)
        truth = b + (th - b) @ expm(-t * q.A).T
        assert np.allclose(q.flow(th, t), truth, rtol=0, atol=1e-10 * (1 + np.abs(truth).max()))


@pytest.mark.parametrize("t", [0.1, 2.0])
def test_mixture_flow_matches_ode(problem, t):
    """The 50/50 flow against a numerical solution of θ' = -(∇L_1 + ∇L_2)/2."""
    q1, q2, th = problem
    mix = Quadratic.mean([q1, q2])
    for x in th:
        sol = solve_ivp(lambda _, y: -(q1.grad(y) + q2.grad(y)) / 2, (0, t), x, method="DOP853",
                        rtol=1e-12, atol=1e-14)
        assert np.allclose(mix.flow(x, t), sol.y[:, -1], rtol=0, atol=1e-9)
    # values of the mixture are the average, and the semigroup property holds
    assert np.allclose(mix.value(th), (q1.value(th) + q2.value(th)) / 2, rtol=1e-13, atol=0)
    assert np.allclose(mix.flow(mix.flow(th, t), t), mix.flow(th, 2 * t), rtol=0, atol=1e-12)


def test_excess_is_exact_difference(problem):
    q1, _, th = problem
    other = th + 0.3
    assert np.allclose(q1.excess(other, th), q1.value(other) - q1.value(th), rtol=1e-12, atol=1e-13)


# --------------------------------------------------------------------------------------------------
# Table 1 against a power series of the experiment in Δt
# --------------------------------------------------------------------------------------------------
DEG = 5


def series_flow(q: Quadratic, poly: np.ndarray, speed: float) -> np.ndarray:
    """Φ(speed·Δt) applied to a vector polynomial in Δt (``poly[k]`` = coefficient of Δt^k), truncated.

    Φ(s)θ = θ + Σ_{k>=1} (-s)^k / k! A^{k-1} ∇L(θ)  (the exponential series of the exact flow).
    """
    g = poly @ q.A
    g[0] -= q.c
    out, term = poly.copy(), g
    for k in range(1, DEG + 1):
        nxt = np.zeros_like(poly)
        nxt[1:] = term[:-1] * (-speed / k)
        out += nxt
        term = nxt @ q.A
    return out


def series_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros(DEG + 1)
    for i in range(DEG + 1):
        out[i:] += np.einsum("n,kn->k", a[i], b[: DEG + 1 - i])
    return out


def excess_series(q1: Quadratic, q2: Quadratic, theta: np.ndarray, first: int) -> np.ndarray:
    """Power series in Δt of L(θ_ij) - L(θ_base), L = (L_1 + L_2)/2, θ_base = Φ_mix(2Δt) θ."""
    mix = Quadratic.mean([q1, q2])
    p = np.zeros((DEG + 1, theta.size))
    p[0] = theta
    qa, qb = (q1, q2) if first == 1 else (q2, q1)
    end = series_flow(qb, series_flow(qa, p, 1.0), 1.0)
    base = series_flow(mix, p, 2.0)
    d = end - base
    g = base @ mix.A
    g[0] -= mix.c
    return series_dot(g, d) + 0.5 * series_dot(d @ mix.A, d)


CFG = ToyConfig(n=20, n_starts=30, seed=11, ts=(0.1, 1.0), dts=(0.001, 0.01))


@pytest.fixture(scope="module")
def small_run():
    return run_toy(CFG, progress=False)


@pytest.mark.parametrize("t", CFG.ts)
def test_table_against_series(small_run, t):
    q1, q2, theta0 = setup_problem(CFG)
    theta = Quadratic.mean([q1, q2]).flow(theta0, t)
    s12 = np.array([excess_series(q1, q2, x, 1) for x in theta])  # [S, DEG+1]
    s21 = np.array([excess_series(q1, q2, x, 2) for x in theta])
    scale = np.abs(s12[:, 2:]).max()
    # no Δt^0, Δt^1 terms: the excess is second order, as Theorem 3.1 says
    assert np.abs(s12[:, :2]).max() <= 1e-12 * scale
    # the Δt^2 term is antisymmetric under swapping the order
    assert np.allclose(s21[:, 2], -s12[:, 2], rtol=1e-9, atol=0)
    for dt in CFG.dts:
        for name, series in (("ratio", s12), ("antisym", (s12 - s21) / 2)):
            r = small_run.samples[f"{name}@t={t:g},dt={dt:g}"]
            # ratio = 1 + a Δt + (higher terms); the core's prediction must be the Δt^2 coefficient
            rel = series[:, 3:] / series[:, 2:3]  # [S, DEG-2]: a, b, ...
            linear = 1 + rel[:, 0] * dt
            # medians are 1-Lipschitz in the max norm, so the tolerance is the largest higher-order term
            tol = sum(np.abs(rel[:, k]).max() * dt ** (k + 1) for k in range(1, rel.shape[1]))
            assert abs(np.median(r) - np.median(linear)) <= tol, (name, t, dt)
            assert np.max(np.abs(r - linear)) <= tol, (name, t, dt)
            if name == "ratio" and dt == 0.001:
                # hence the table's band around 1: |median - 1| <= |median a| dt + tol (~0.003 here)
                row = next(x for x in small_run.rows if x["t"] == t and x["dt"] == dt)
                assert abs(row["median_ratio"] - 1) <= abs(np.median(rel[:, 0])) * dt + tol


def test_ratio_below_one_like_the_paper(small_run):
    """The paper's Table 1: medians below 1, approaching 1 linearly as Δt shrinks."""
    for t in CFG.ts:
        r1, r2 = (next(r["median_ratio"] for r in small_run.rows if r["t"] == t and r["dt"] == d)
                  for d in (0.001, 0.01))
        assert r1 < 1 and r2 < r1
        assert 7 < (1 - r2) / (1 - r1) < 13


def test_default_config_matches_appendix_b():
    cfg = ToyConfig()
    assert (cfg.n, cfg.decay, cfg.n_starts) == (100, 0.7, 50)
    assert cfg.ts == (0.1, 0.3, 1.0, 3.0) and cfg.dts == (0.001, 0.01, 0.1)
    assert set(PAPER_TABLE1) == {(t, d) for t in cfg.ts for d in cfg.dts}


@pytest.mark.parametrize(
    "kwargs", [{"n": 1}, {"decay": 0.0}, {"decay": 1.5}, {"n_starts": 0}, {"dts": (0.0,)}, {"ts": (-1.0,)}]
)
def test_config_validation(kwargs):
    with pytest.raises(CommuteError):
        ToyConfig(**kwargs)


# --------------------------------------------------------------------------------------------------
# JSON and CLI
# --------------------------------------------------------------------------------------------------
def test_json_schema_round_trip(small_run, tmp_path):
    path = small_run.to_json(tmp_path / "sub" / "toy.json")
    d = json.loads(path.read_text())
    assert set(d) >= {"rows", "config"}
    assert len(d["rows"]) == len(CFG.ts) * len(CFG.dts)
    for row in d["rows"]:
        assert {"t", "dt", "median_ratio", "p10", "p90", "median_antisym_ratio"} <= set(row)
        assert row["p10"] <= row["median_ratio"] <= row["p90"]
    assert d["config"] == CFG.to_dict()
    again = ToyResult.from_dict(d)
    assert again.to_dict() == d
    assert again.config == CFG


def test_cli_writes_table_json_and_figures(tmp_path, capsys):
    out, js = tmp_path / "figs", tmp_path / "table.json"
    code = main(["toy", "--n", "12", "--starts", "6", "--seed", "2", "--json", str(js), "--out", str(out),
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "paper" in printed and "0.997" in printed
    d = json.loads(js.read_text())
    assert d["config"]["n"] == 12 and d["config"]["n_starts"] == 6 and d["config"]["seed"] == 2
    assert json.loads((out / "toy.json").read_text()) == d
    for name in ("fig1_bracket_field.png", "fig2_loss_plane.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    report = (out / "toy_report.md").read_text()
    assert "fig1_bracket_field.png" in report and "| t | Δt |" in report


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--starts", "0"], "starts"), (["--decay", "1.5"], "decay"), (["--n", "1"], "n must be")],
)
def test_cli_bad_options_give_one_clean_sentence(args, message, capsys):
    code = main(["toy", *args, "--no-progress"])
    assert code != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_unwritable_json_is_a_clean_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = main(["toy", "--n", "4", "--starts", "2", "--json", str(blocker / "t.json"), "--no-progress"])
    assert code != 0
    err = capsys.readouterr().err
    assert "cannot write" in err and "Traceback" not in err
