"""The paper's quadratic example (§3.1, §4.1, Table 1, Figures 1-2, Appendix B), with exact flows.

Two domains with quadratic losses ``L_k(θ) = ½ (θ - b_k)ᵀ A_k (θ - b_k)``; Appendix B takes n = 100,
``A_k = C_kᵀ diag(0.7^j) C_k`` with Haar-random orthogonal ``C_k``, ``b_k ~ N(0, I)`` and starts
``θ_0 ~ N(0, I)``. Gradient flow of a quadratic is exact (:meth:`Quadratic.flow`).

Table 1: from ``θ(t)`` on the 50/50 trajectory, ``θ_12 = Φ_2(Δt) ∘ Φ_1(Δt) θ(t)`` (train on domain 1
first), ``θ_21`` the other order and ``θ_base = θ(t + 2Δt)``. With ``L = (L_1 + L_2)/2`` the excess loss
``EL^12 = L(θ_12) - L(θ_base)`` is compared with the prediction of Theorem 3.1 with docs/design.md §1's
conventions, ``(Δt²/2) P(L_1, L_2; L)(θ(t))``, where ``P`` comes from :func:`commute.bracket_projection`
(so this reproduction also exercises the core). The paper prints a factor 1/8 in §4.1; its own Table 1
(ratios → 1 as Δt → 0) is reproduced with 1/2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from commute.bracket import antisymmetric_excess, bracket_projection, grad, lie_bracket, reorder_excess
from commute.errors import CommuteError
from commute.io import atomic_write, write_json
from commute.progress import Progress

__all__ = [
    "PAPER_TABLE1",
    "ToyConfig",
    "ToyResult",
    "Quadratic",
    "make_problem",
    "setup_problem",
    "run_toy",
    "plot_bracket_field",
    "plot_loss_plane",
]

#: Table 1 of the paper: (t, Δt) -> (median of EL^12 / prediction, printed "±" = 10-90 % range).
PAPER_TABLE1: dict[tuple[float, float], tuple[float, float]] = {
    (0.1, 0.001): (0.997, 0.001), (0.1, 0.01): (0.972, 0.010), (0.1, 0.1): (0.763, 0.053),
    (0.3, 0.001): (0.997, 0.001), (0.3, 0.01): (0.973, 0.008), (0.3, 0.1): (0.766, 0.084),
    (1.0, 0.001): (0.997, 0.001), (1.0, 0.01): (0.974, 0.012), (1.0, 0.1): (0.774, 0.135),
    (3.0, 0.001): (0.998, 0.002), (3.0, 0.01): (0.979, 0.022), (3.0, 0.1): (0.834, 0.223),
}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class ToyConfig:
    """Settings of the quadratic reproduction (defaults: the paper's Appendix B).

    n: dimension of θ. decay: eigenvalues are ``decay**j``, j = 0..n-1 (power law spectrum).
    n_starts: random starting points θ_0 ~ N(0, I) (the table reports medians and 10-90 % ranges
    over them). seed: seeds the problem (A_k, b_k) and the starts. ts: times t on the 50/50 trajectory
    where the intervention starts. dts: intervention lengths Δt.
    """

    n: int = 100
    decay: float = 0.7
    n_starts: int = 50
    seed: int = 0
    ts: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
    dts: tuple[float, ...] = (0.001, 0.01, 0.1)

    def __post_init__(self) -> None:
        self.ts = tuple(float(t) for t in self.ts)
        self.dts = tuple(float(d) for d in self.dts)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`CommuteError` with one sentence if a setting is out of range."""
        if int(self.n) != self.n or self.n < 2:
            raise CommuteError(f"n must be an integer >= 2 (got {self.n}).")
        if not (0.0 < self.decay <= 1.0):
            raise CommuteError(f"decay must be in (0, 1] so that the eigenvalues decay**j stay <= 1 "
                               f"(got {self.decay}).")
        if int(self.n_starts) != self.n_starts or self.n_starts < 1:
            raise CommuteError(f"the number of starts must be a positive integer (got {self.n_starts}).")
        if not self.ts or any(not np.isfinite(t) or t < 0 for t in self.ts):
            raise CommuteError(f"times t must be finite and >= 0 (got {list(self.ts)}).")
        if not self.dts or any(not np.isfinite(d) or d <= 0 for d in self.dts):
            raise CommuteError(f"intervention lengths dt must be finite and > 0 (got {list(self.dts)}).")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ts"], d["dts"] = list(self.ts), list(self.dts)
        return d


# --------------------------------------------------------------------------------------------------
# quadratics and their exact flows
# --------------------------------------------------------------------------------------------------
@dataclass
class Quadratic:
    """``L(θ) = ½ θᵀAθ - cᵀθ + e`` with symmetric A = Q diag(λ) Qᵀ (eigendecomposition cached).

    Arrays of points are rows: θ may be ``[n]`` or ``[..., n]``.
    """

    A: np.ndarray
    c: np.ndarray
    e: float
    eigvals: np.ndarray = field(repr=False)
    eigvecs: np.ndarray = field(repr=False)

    @classmethod
    def from_hessian(cls, A: np.ndarray, c: np.ndarray, e: float = 0.0) -> Quadratic:
        A = (A + A.T) / 2
        lam, q = np.linalg.eigh(A)
        return cls(A, np.asarray(c, dtype=np.float64), float(e), lam, q)

    @classmethod
    def from_centre(cls, A: np.ndarray, b: np.ndarray) -> Quadratic:
        """``½ (θ - b)ᵀ A (θ - b)`` (the paper's §3.1 form)."""
        return cls.from_hessian(A, A @ b, 0.5 * float(b @ A @ b))

    @staticmethod
    def mean(qs: Sequence[Quadratic]) -> Quadratic:
        """The average loss Σ L_k / K (for two domains: the 50/50 mixture)."""
        k = len(qs)
        return Quadratic.from_hessian(sum(q.A for q in qs) / k, sum(q.c for q in qs) / k,
                                      sum(q.e for q in qs) / k)

    def value(self, theta: np.ndarray) -> np.ndarray:
        return 0.5 * np.einsum("...i,ij,...j->...", theta, self.A, theta) - theta @ self.c + self.e

    def grad(self, theta: np.ndarray) -> np.ndarray:
        return theta @ self.A - self.c

    def flow(self, theta: np.ndarray, t: float) -> np.ndarray:
        """Exact gradient flow θ' = -∇L(θ) for time t.

        With a minimiser b this is ``b + expm(-tA)(θ - b)``; written without b (A may be singular) as
        ``θ + Q diag((e^{-tλ} - 1)/λ) Qᵀ ∇L(θ)``, the factor taken as -t where λ = 0 (expm1: exact for
        small tλ).
        """
        lam = self.eigvals
        safe = np.where(lam == 0.0, 1.0, lam)
        f = np.where(lam == 0.0, -t, np.expm1(-t * lam) / safe)
        return theta + ((self.grad(theta) @ self.eigvecs) * f) @ self.eigvecs.T

    def excess(self, theta: np.ndarray, base: np.ndarray) -> np.ndarray:
        """L(θ) - L(base), exactly, as ∇L(base)·Δ + ½ ΔᵀAΔ (no cancellation of two large values)."""
        d = theta - base
        return np.sum(self.grad(base) * d, axis=-1) + 0.5 * np.einsum("...i,ij,...j->...", d, self.A, d)

    def torch_loss(self):
        """The same loss as a callable on a float64 tensor ``[n]`` (or ``[m, n]``: summed over rows)."""
        A, c, e = (torch.from_numpy(self.A), torch.from_numpy(self.c), self.e)

        def loss(theta: torch.Tensor) -> torch.Tensor:
            return (0.5 * ((theta @ A) * theta).sum(-1) - theta @ c + e).sum()

        return loss


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """Haar-distributed orthogonal matrix (QR of a Gaussian matrix with the sign of diag R fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def make_problem(n: int, decay: float, rng: np.random.Generator) -> tuple[Quadratic, Quadratic]:
    """Appendix B: ``A_k = C_kᵀ diag(decay^j) C_k`` (C_k random orthogonal), ``b_k ~ N(0, I)``."""
    lam = decay ** np.arange(n, dtype=np.float64)
    out = []
    for _ in range(2):
        c = random_orthogonal(n, rng)
        b = rng.standard_normal(n)
        a = c.T @ (lam[:, None] * c)
        q = Quadratic.from_centre(a, b)
        q.eigvals, q.eigvecs = lam.copy(), c.T.copy()  # exact eigendecomposition, no eigh round-off
        out.append(q)
    return out[0], out[1]


def setup_problem(cfg: ToyConfig) -> tuple[Quadratic, Quadratic, np.ndarray]:
    """The two quadratics and the starts ``θ_0`` (``[n_starts, n]``) that :func:`run_toy` uses for ``cfg``."""
    rng = np.random.default_rng(cfg.seed)
    q1, q2 = make_problem(cfg.n, cfg.decay, rng)
    return q1, q2, rng.standard_normal((cfg.n_starts, cfg.n))


# --------------------------------------------------------------------------------------------------
# Table 1
# --------------------------------------------------------------------------------------------------
@dataclass
class ToyResult:
    """Rows of the reproduced Table 1 (one per (t, Δt)); see :func:`run_toy`.

    ``samples`` holds the per-start ratios (``"ratio@t=0.1,dt=0.001"``, ``"antisym@..."``); not in the JSON.
    """

    rows: list[dict[str, float]]
    config: ToyConfig
    samples: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows], "config": self.config.to_dict()}

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON, atomically (a temporary file renamed into place)."""
        path = Path(path)
        try:
            write_json(path, self.to_dict(), indent=2)
        except OSError as exc:
            raise CommuteError(f"cannot write {path}: {exc.strerror or exc}.") from exc
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ToyResult:
        cfg = dict(d["config"])
        cfg["ts"], cfg["dts"] = tuple(cfg["ts"]), tuple(cfg["dts"])
        return cls(rows=[dict(r) for r in d["rows"]], config=ToyConfig(**cfg))

    def table(self):
        """A rich Table: our median [10 %, 90 %] of EL^12 / prediction beside the paper's Table 1."""
        from rich.table import Table

        c = self.config
        tab = Table(
            title=f"EL^12 / ((Δt²/2) P(L1, L2; L)), L = (L1+L2)/2 — n={c.n}, decay={c.decay}, "
            f"{c.n_starts} starts, seed {c.seed}",
            caption="ratio: median [10 %, 90 %] over starts; antisym: ((EL^12 - EL^21)/2) / prediction; "
            "paper: Table 1, median ± printed range",
        )
        for name, just in [("t", "right"), ("Δt", "right"), ("ratio (ours)", "left"),
                           ("antisym (ours)", "right"), ("paper", "right")]:
            tab.add_column(name, justify=just)  # type: ignore[arg-type]
        for r in self.rows:
            paper = PAPER_TABLE1.get((r["t"], r["dt"]))
            tab.add_row(
                f"{r['t']:g}", f"{r['dt']:g}",
                f"{r['median_ratio']:.3f} [{r['p10']:.3f}, {r['p90']:.3f}]",
                f"{r['median_antisym_ratio']:.3f}",
                "—" if paper is None else f"{paper[0]:.3f} ± {paper[1]:.3f}",
            )
        return tab

    def markdown(self) -> str:
        """The same table in markdown."""
        lines = ["| t | Δt | ratio: median [p10, p90] | antisym: median | paper (Table 1) |",
                 "|---:|---:|:---|---:|---:|"]
        for r in self.rows:
            paper = PAPER_TABLE1.get((r["t"], r["dt"]))
            lines.append(
                f"| {r['t']:g} | {r['dt']:g} | {r['median_ratio']:.4f} [{r['p10']:.4f}, {r['p90']:.4f}] | "
                f"{r['median_antisym_ratio']:.4f} | "
                + ("—" if paper is None else f"{paper[0]:.3f} ± {paper[1]:.3f}") + " |"
            )
        return "\n".join(lines)


def run_toy(
    cfg: ToyConfig | None = None,
    out_dir: Path | str | None = None,
    json_path: Path | str | None = None,
    progress: bool = True,
) -> ToyResult:
    """Reproduce Table 1 (and, with ``out_dir``, Figures 1-2 and ``toy_report.md``).

    For every start θ_0 and time t: θ(t) = Φ_mix(t) θ_0 (50/50 flow); for every Δt the exact
    ``θ_12 = Φ_2(Δt) Φ_1(Δt) θ(t)``, ``θ_21`` and ``θ_base = Φ_mix(2Δt) θ(t)``; ``EL^12 = L(θ_12) -
    L(θ_base)`` with L = (L_1 + L_2)/2, over the prediction ``(Δt²/2) P(L_1, L_2; L)(θ(t))`` (Theorem 3.1,
    docs/design.md §1; P from :func:`commute.bracket_projection`). The antisymmetric ratio
    ``((EL^12 - EL^21)/2) / prediction`` cancels the terms even under swapping the order.

    Writes ``json_path`` if given; with ``out_dir``: ``toy.json``, ``fig1_bracket_field.png``,
    ``fig2_loss_plane.png`` and ``toy_report.md`` there. Returns a :class:`ToyResult`.
    """
    cfg = cfg or ToyConfig()
    cfg.validate()
    q1, q2, theta0 = setup_problem(cfg)
    mix = Quadratic.mean([q1, q2])
    l1, l2, lmix = q1.torch_loss(), q2.torch_loss(), mix.torch_loss()

    ratio: dict[tuple[float, float], np.ndarray] = {}
    antisym: dict[tuple[float, float], np.ndarray] = {}
    with Progress("quadratic: brackets along the 50/50 flow", len(cfg.ts) * cfg.n_starts, enabled=progress,
                  eta=False, transient=True) as bar:
        for t in cfg.ts:
            theta = mix.flow(theta0, t)  # [S, n]
            p = np.empty(cfg.n_starts)
            for s in range(cfg.n_starts):
                p[s] = bracket_projection(l1, l2, lmix, torch.from_numpy(theta[s]))
                bar.advance()
            for dt in cfg.dts:
                base = mix.flow(theta, 2 * dt)
                th12 = q2.flow(q1.flow(theta, dt), dt)
                th21 = q1.flow(q2.flow(theta, dt), dt)
                el12, el21 = mix.excess(th12, base), mix.excess(th21, base)
                pred = reorder_excess(p, dt)
                ratio[(t, dt)] = el12 / pred
                antisym[(t, dt)] = antisymmetric_excess(el12, el21) / pred

    rows = []
    for t in cfg.ts:
        for dt in cfg.dts:
            r, a = ratio[(t, dt)], antisym[(t, dt)]
            paper = PAPER_TABLE1.get((t, dt))
            rows.append({
                "t": t, "dt": dt,
                "median_ratio": float(np.median(r)),
                "p10": float(np.percentile(r, 10)), "p90": float(np.percentile(r, 90)),
                "median_antisym_ratio": float(np.median(a)),
                "p10_antisym": float(np.percentile(a, 10)), "p90_antisym": float(np.percentile(a, 90)),
                "n_starts": cfg.n_starts,
                "paper_median": None if paper is None else paper[0],
                "paper_range": None if paper is None else paper[1],
            })  # fmt: skip
    samples = {f"ratio@t={t:g},dt={dt:g}": v for (t, dt), v in ratio.items()}
    samples.update({f"antisym@t={t:g},dt={dt:g}": v for (t, dt), v in antisym.items()})
    result = ToyResult(rows=rows, config=cfg, samples=samples)

    if json_path is not None:
        result.to_json(json_path)
    if out_dir is not None:
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CommuteError(f"cannot create the output directory {out}: {exc.strerror}.") from exc
        result.to_json(out / "toy.json")
        plot_bracket_field(out / "fig1_bracket_field.png")
        plot_loss_plane(q1, q2, out / "fig2_loss_plane.png", n_starts=8, seed=cfg.seed)
        _write_report(result, out)
    return result


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------
#: Figure 1's two 2-D quadratics: (A_1, b_1), (A_2, b_2).
FIG1_PROBLEM = (
    (np.array([[3.0, 0.0], [0.0, 0.5]]), np.array([-1.0, 0.0])),
    (np.array([[1.0, 1.2], [1.2, 2.0]]), np.array([1.0, 0.5])),
)


def plot_bracket_field(path: str | Path, extent: float = 3.0, grid: int = 21, fine: int = 300) -> Path:
    """Figure 1: level curves and gradient fields of two 2-D quadratics, and their Lie bracket.

    Panel (c) shows R(L_1, L_2) = H_2 ∇L_1 - H_1 ∇L_2 (via :func:`commute.lie_bracket`, one batched call:
    the loss summed over grid points has a block-diagonal Hessian) over the regions where
    ⟨R, ∇L_1⟩ and ⟨R, ∇L_2⟩ are both positive (green: θ_12 = "1 then 2" is worse on both losses, so
    "2 then 1" gains on both) or both negative (purple: "1 then 2" gains on both).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    qs = [Quadratic.from_centre(a, b) for a, b in FIG1_PROBLEM]
    losses = [q.torch_loss() for q in qs]

    def fields(n: int):
        xs = np.linspace(-extent, extent, n)
        xx, yy = np.meshgrid(xs, xs)
        pts = torch.from_numpy(np.stack([xx.ravel(), yy.ravel()], axis=1))
        r = lie_bracket(losses[0], losses[1], pts).numpy()
        g = [grad(lf, pts).numpy() for lf in losses]
        return xx, yy, r, g

    xx, yy, r, g = fields(grid)
    fx, fy, fr, fg = fields(fine)
    p1 = np.sum(fr * fg[0], axis=1).reshape(fx.shape)
    p2 = np.sum(fr * fg[1], axis=1).reshape(fx.shape)
    region = np.where((p1 > 0) & (p2 > 0), 1.0, np.where((p1 < 0) & (p2 < 0), -1.0, np.nan))

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    fig, axes = plt.subplots(1, 3, figsize=(15, 5), constrained_layout=True)
    vals = [q.value(np.stack([fx, fy], axis=-1)) for q in qs]
    for k, ax in enumerate(axes[:2]):
        ax.contour(fx, fy, vals[k], levels=np.geomspace(0.05, 30, 12), cmap="viridis", linewidths=1)
        u = unit(g[k])
        ax.quiver(xx, yy, u[:, 0], u[:, 1], color="black", angles="xy", scale=28, width=0.004)
        ax.plot(*FIG1_PROBLEM[k][1], "r*", ms=14, label=f"minimum of $L_{k + 1}$")
        ax.set_title(f"({'ab'[k]}) level curves of $L_{k + 1}$ and $\\nabla L_{k + 1}$ (unit arrows)")
        ax.legend(loc="upper left")
    ax = axes[2]
    ax.pcolormesh(fx, fy, region, cmap=ListedColormap(["#9b59b6", "#2ecc71"]), vmin=-1, vmax=1,
                  shading="auto", alpha=0.55)
    u = unit(r)
    ax.quiver(xx, yy, u[:, 0], u[:, 1], color="black", angles="xy", scale=28, width=0.004)
    for k in range(2):
        ax.plot(*FIG1_PROBLEM[k][1], "r*", ms=14)
    ax.set_title("(c) Lie bracket $R(L_1, L_2) = H_2\\nabla L_1 - H_1\\nabla L_2$ (unit arrows)")
    ax.legend(handles=[Patch(color="#2ecc71", alpha=0.55, label="R·∇L1 > 0 and R·∇L2 > 0"),
                       Patch(color="#9b59b6", alpha=0.55, label="R·∇L1 < 0 and R·∇L2 < 0")],
              loc="lower right", framealpha=0.9)
    for ax in axes:
        ax.set_xlabel(r"$\theta_1$")
        ax.set_ylabel(r"$\theta_2$")
        ax.set_aspect("equal")
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
    fig.suptitle("Figure 1: gradient fields of two quadratics and their Lie bracket "
                 "(green: training 2 then 1 beats 1 then 2 on both losses; purple: the reverse)")
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss_plane(
    q1: Quadratic, q2: Quadratic, path: str | Path, n_starts: int = 8, seed: int = 0,
    t_max: float = 1e12, marks: Sequence[float] = (0.1, 0.3, 1.0, 3.0),
) -> Path:
    """Figure 2: trajectories of the 50/50 flow in the (L_1, L_2) plane from several starts θ_0 ~ N(0, I).

    Log-log axes, t from 0 to ``t_max`` (the smallest eigenvalues of (A_1 + A_2)/2 are ~1e-9 for the
    default problem, so the flows meet at the optimum only for t ≳ 1e10).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mix = Quadratic.mean([q1, q2])
    rng = np.random.default_rng(seed + 10_000)
    theta0 = rng.standard_normal((n_starts, q1.A.shape[0]))
    ts = np.concatenate([[0.0], np.geomspace(1e-3, t_max, 600)])
    traj = np.stack([mix.flow(theta0, t) for t in ts])  # [T, S, n]
    l1, l2 = q1.value(traj), q2.value(traj)

    fig, ax = plt.subplots(figsize=(7.5, 6.5), constrained_layout=True)
    colors = plt.get_cmap("tab10")
    for s in range(n_starts):
        ax.plot(l1[:, s], l2[:, s], color=colors(s % 10), lw=1.5)
        ax.plot(l1[0, s], l2[0, s], "o", color=colors(s % 10), ms=6)
        for t in marks:
            th = mix.flow(theta0[s], t)
            ax.plot(q1.value(th), q2.value(th), ".", color="black", ms=4)
    ax.plot(l1[-1, 0], l2[-1, 0], "k*", ms=15, label=f"θ(t = {t_max:g}): the optimum of $(L_1+L_2)/2$")
    ax.plot([], [], "o", color="gray", label="start θ(0) ~ N(0, I)")
    ax.plot([], [], ".", color="black", label="t = " + ", ".join(f"{t:g}" for t in marks))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"$L_1(\theta(t))$")
    ax.set_ylabel(r"$L_2(\theta(t))$")
    ax.set_title(f"Figure 2: 50/50 gradient flow in the $(L_1, L_2)$ plane (n = {q1.A.shape[0]})")
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write_report(result: ToyResult, out: Path) -> Path:
    c = result.config
    text = f"""# Quadratic reproduction (paper §4.1, Table 1, Figures 1-2)

Setting (Appendix B): n = {c.n}, eigenvalues {c.decay}^j, A_k = C_kᵀ diag C_k with random orthogonal C_k,
b_k ~ N(0, I), {c.n_starts} starts θ_0 ~ N(0, I), seed {c.seed}. Exact flows. From θ(t) on the 50/50 flow:
θ_12 = Φ_2(Δt) Φ_1(Δt) θ(t), θ_21 the opposite order, θ_base = θ(t + 2Δt), L = (L_1 + L_2)/2,
EL^12 = L(θ_12) - L(θ_base), prediction (Δt²/2) P(L_1, L_2; L)(θ(t)) (docs/design.md §1; P from
`commute.bracket_projection`). Ratio = EL^12 / prediction; antisym = ((EL^12 - EL^21)/2) / prediction.

{result.markdown()}

The ratio approaches 1 like 1 + O(Δt), as in the paper's Table 1; with the paper's printed factor 1/8
instead of 1/2 every ratio would be about 4.

![Figure 1](fig1_bracket_field.png)

Figure 1: two 2-D quadratics, their gradient fields and the Lie bracket R(L_1, L_2) = H_2∇L_1 - H_1∇L_2.
Green: R has a positive dot product with both gradients, so training on domain 2 then 1 beats 1 then 2
on both losses; purple: the reverse.

![Figure 2](fig2_loss_plane.png)

Figure 2: trajectories of the 50/50 flow in the (L_1, L_2) plane from several starts; (L_1 + L_2)/2 falls
monotonically, L_1 and L_2 need not.
"""
    return atomic_write(out / "toy_report.md", text)
