"""Scores of the study's predictions against its observations (computation; :mod:`commute.report` renders).

Every function here is pure over the JSON-able ``data`` of ``results.json`` (layout in
:mod:`commute.report`), so a report can be re-scored without re-training.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from commute.study_config import config_hash

__all__ = ["sign_agreement", "t_threshold", "summarise", "FALLBACK_THRESHOLD", "lambda_of", "p_dof", "score",
           "score_predictors", "pool_studies", "PREDICTORS"]


def sign_agreement(
    cells: Sequence[Mapping[str, float]], z_threshold: float = 2.0
) -> dict[str, int]:
    """Count cells whose predicted sign matches the observed antisymmetric excess loss.

    Each cell has ``pred`` (predicted EL^12), ``pred_stderr`` and ``antisym`` ((EL^12 − EL^21)/2).
    Returns ``{"n", "agree", "n_significant", "agree_significant"}``; a cell is significant when
    |pred / pred_stderr| > ``z_threshold``. Cells with a zero prediction or observation never agree.
    """
    out = {"n": 0, "agree": 0, "n_significant": 0, "agree_significant": 0}
    for c in cells:
        pred, se, obs = float(c["pred"]), float(c.get("pred_stderr", math.nan)), float(c["antisym"])
        ok = pred * obs > 0
        out["n"] += 1
        out["agree"] += int(ok)
        if se > 0 and abs(pred / se) > z_threshold:
            out["n_significant"] += 1
            out["agree_significant"] += int(ok)
    return out


#: Fallback significance threshold on |P/se| when a checkpoint stores no group count (normal approximation).
FALLBACK_THRESHOLD = 2.0

#: Per-cell keys that add up over arms (the optimiser and overall rows are sums of the arm rows).
_ADDITIVE = ("n", "agree", "n_significant", "agree_significant", "n_significant_z2", "agree_significant_z2",
             "predictions", "predictions_right", "predictions_tied", "recency_observed", "recency_predicted",
             "recency_predictions_right", "recency_predictions_tied", "checkpoints", "checkpoints_right")


def t_threshold(dof: int | None) -> float:
    """Two-sided 95 % Student-t quantile t_{0.975}(dof); :data:`FALLBACK_THRESHOLD` when dof is unknown."""
    if dof is None or dof < 1:
        return FALLBACK_THRESHOLD
    from scipy.stats import t as student_t

    return float(student_t.ppf(0.975, dof))


def lambda_of(arm: Mapping[str, Any]) -> str:
    """Which operator the arm's λ_max is of: H (SGD) or D^-1/2 H D^-1/2 (Adam)."""
    for ck in arm.get("checkpoints", []):
        if ck.get("lambda_of"):
            return str(ck["lambda_of"])
    return "D^-1/2 H D^-1/2 (Adam)" if arm.get("optimizer") == "adam" else "H"


def p_dof(arm: Mapping[str, Any], t0: Any, domain: str) -> int | None:
    """Degrees of freedom of P(1,2; domain) at checkpoint t0: a stored ``dof``/``df``, else groups − 1."""
    for ck in arm.get("checkpoints", []):
        if ck.get("step") == t0:
            p = ck.get("P", {}).get(domain, {})
            for k in ("dof", "df"):
                if p.get(k) is not None:
                    return int(p[k])
            if p.get("n") is not None:
                return int(p["n"]) - 1
    return None


def _majority(flags: Sequence[bool]) -> tuple[bool, bool]:
    """(right, tied): right when a strict majority of the flags are true; tied when exactly half are."""
    k = sum(bool(f) for f in flags)
    return 2 * k > len(flags), 2 * k == len(flags)


def _arm_counts(arm: Mapping[str, Any], d1: str, d2: str, z_threshold: float | None) -> dict[str, Any]:
    """Every count of one arm (see :func:`summarise`)."""
    cells = [dict(pd) for c in arm["cells"] for pd in c["per_domain"].values()]
    counts: dict[str, Any] = dict(sign_agreement(cells, z_threshold if z_threshold is not None else 2.0))
    z2 = sign_agreement(cells, 2.0)
    counts.update({"n_significant_z2": z2["n_significant"], "agree_significant_z2": z2["agree_significant"]})
    # significance per cell at the two-sided 95 % t quantile of its P estimate's dof
    dofs: set[int | None] = set()
    n_sig = agree_sig = 0
    for c in arm["cells"]:
        for d, pd in c["per_domain"].items():
            dof = p_dof(arm, c["t0"], d)
            dofs.add(dof)
            thr = z_threshold if z_threshold is not None else t_threshold(dof)
            pred, se = float(pd["pred"]), float(pd.get("pred_stderr", math.nan))
            if se > 0 and abs(pred / se) > thr:
                n_sig += 1
                agree_sig += int(pred * float(pd["antisym"]) > 0)
    counts.update({"n_significant": n_sig, "agree_significant": agree_sig})
    known = sorted(x for x in dofs if x is not None)
    counts["dof"] = known
    counts["dof_missing"] = None in dofs
    counts["thresholds"] = ([float(z_threshold)] if z_threshold is not None else
                            sorted({t_threshold(x) for x in dofs}))

    t0s = sorted({c["t0"] for c in arm["cells"]})
    right = sum(
        all(pd["agree"] for c in arm["cells"] if c["t0"] == t0 for pd in c["per_domain"].values())
        for t0 in t0s
    )
    # one prediction per (t0, domain): every Δw there shares one P estimate and one base trajectory.
    # recency baseline: the domain boosted last ends better, i.e. antisym > 0 for domain 1, < 0 for domain 2
    # (no prediction for a third domain's loss)
    groups: dict[tuple[Any, str], list[tuple[bool, bool]]] = {}
    for c in arm["cells"]:
        for d, pd in c["per_domain"].items():
            if d not in (d1, d2):
                continue
            s = 1 if d == d1 else -1
            groups.setdefault((c["t0"], d), []).append((bool(pd["pred"] * pd["antisym"] > 0),
                                                        bool(s * pd["antisym"] > 0)))
    p_major = [_majority([a for a, _ in g]) for g in groups.values()]
    r_major = [_majority([b for _, b in g]) for g in groups.values()]
    sgn = [(1 if d == d1 else -1, pd) for c in arm["cells"] for d, pd in c["per_domain"].items()
           if d in (d1, d2)]
    ratios = [c["antisym"] / c["pred"] for c in cells if c["pred"] != 0]
    locs = [c.get("locality", math.nan) for c in arm["cells"]]
    counts.update({"predictions": len(groups),
                   "predictions_right": sum(r for r, _ in p_major),
                   "predictions_tied": sum(t for _, t in p_major),
                   "recency_predictions_right": sum(r for r, _ in r_major),
                   "recency_predictions_tied": sum(t for _, t in r_major),
                   "recency_observed": sum(s * pd["antisym"] > 0 for s, pd in sgn),
                   "recency_predicted": sum(s * pd["pred"] > 0 for s, pd in sgn),
                   "locality_min": float(np.nanmin(locs)) if locs else math.nan,
                   "locality_max": float(np.nanmax(locs)) if locs else math.nan,
                   "lambda_of": lambda_of(arm)})
    counts.update({"median_obs_over_pred": float(np.median(ratios)) if ratios else math.nan,
                   "checkpoints": len(t0s), "checkpoints_right": right,
                   "tokens_match": all(c.get("tokens_match", False) for c in arm["cells"])})
    return counts


def summarise(data: Mapping[str, Any], z_threshold: float | None = None) -> dict[str, Any]:
    """Sign-agreement counts per arm, per optimiser and overall (see :func:`commute.study.sign_agreement`).

    Per arm and summed per optimiser and overall:

    * ``n``, ``agree``: cells (t0, Δw, domain) and those with the predicted sign. The Δw at one
      (t0, domain) share one P estimate and one trajectory, so cells are not independent evidence;
    * ``predictions``, ``predictions_right``, ``predictions_tied``: one prediction per (t0, domain); it is
      right when a strict majority of its Δw cells have the predicted sign (a tie, possible with an even
      number of Δw, counts as not right and is counted in ``predictions_tied``);
    * ``recency_observed``, ``recency_predictions_right`` (``recency_predictions_tied``): the same counts for
      the naive recency baseline "the domain boosted last ends better" (antisym EL_1 > 0, antisym EL_2 < 0);
      ``recency_predicted``: cells where P itself predicts the recency sign;
    * ``n_significant``, ``agree_significant``: cells with |P/se| above the two-sided 95 % Student-t
      quantile for the estimate's dof (groups − 1; :data:`FALLBACK_THRESHOLD` when the group count is
      missing), or above ``z_threshold`` when one is given; ``dof``, ``dof_missing`` and ``thresholds`` say
      which were used; ``n_significant_z2``, ``agree_significant_z2``: the former fixed |z| > 2 counts;
    * ``checkpoints_right``: the paper's per-checkpoint criterion, a t0 counts as right when every one of
      its cells (both domains, all Δw) has the predicted sign (the paper: 3 of 4 checkpoints).
    """
    out: dict[str, Any] = {"arms": {}, "optimizers": {}, "all": None}
    d1, d2 = data.get("pair") or data["domains"][:2]
    for arm in data["arms"]:
        key = f"{arm['optimizer']}/{arm['variant']}"
        if key in out["arms"]:
            raise ValueError(f"two arms are named {key}: summarise takes one study (pooled studies: "
                             "score_predictors).")
        out["arms"][key] = _arm_counts(arm, d1, d2, z_threshold)

    def total(keys: Sequence[str]) -> dict[str, Any]:
        rows = [out["arms"][k] for k in keys]
        agg: dict[str, Any] = {k: sum(int(r[k]) for r in rows) for k in _ADDITIVE}
        agg["dof"] = sorted({x for r in rows for x in r["dof"]})
        agg["dof_missing"] = any(r["dof_missing"] for r in rows)
        agg["thresholds"] = sorted({x for r in rows for x in r["thresholds"]})
        return agg

    by_opt: dict[str, list[str]] = {}
    for arm in data["arms"]:
        by_opt.setdefault(arm["optimizer"], []).append(f"{arm['optimizer']}/{arm['variant']}")
    out["optimizers"] = {k: total(v) for k, v in by_opt.items()}
    out["all"] = total(list(out["arms"]))
    out["significance"] = {"rule": "fixed" if z_threshold is not None else "student_t_0.975",
                           "dof": out["all"]["dof"], "dof_missing": out["all"]["dof_missing"],
                           "thresholds": out["all"]["thresholds"]}
    out["predictors"] = score_predictors(data)
    loc = data.get("locality")
    if loc:
        out["locality_ratio_smallest_T"] = {d: loc["rows"][-1][d]["ratio"] for d in loc["domains"]}
    return out




# --------------------------------------------------------------------------------------------------
# every predictor against the replicated observations
# --------------------------------------------------------------------------------------------------
#: The predictors of a study cell (see :func:`commute.study.predict`); recency predicts a sign only.
PREDICTORS = ("response", "bracket", "alignment", "recency")


def score(pairs: Sequence[tuple[Any, ...]], magnitude: bool = True,
          groups: Sequence[Any] | None = None) -> dict[str, Any]:
    """Scores of (predicted, observed[, predicted se, observed se[, predicted dof, observed dof]]) tuples
    (the caller keeps only significant observations): ``n``; ``sign_right``; ``spearman`` (rank
    correlation, needs n ≥ 3 and magnitudes); ``median_ratio`` (median observed/predicted); ``max_fold``
    (the largest of |obs/pred| and |pred/obs|: how far the worst cell's magnitude is off, whatever its
    sign). Where the stderrs are given, does the predictor tell the truth about its uncertainty:
    ``n_confident`` / ``sign_right_confident`` (cells whose prediction is itself beyond 2 stderr, and how
    many of those have the right sign), ``spearman_confident``, ``median_ratio_confident`` and
    ``max_fold_confident`` (the same scores on those cells only: what a user who acts only on confident
    predictions gets) and ``within_2se`` (cells where |observed − predicted| ≤ 2·sqrt(se_pred² + se_obs²),
    of ``n_with_se``). And what the scores would be if the predictor were *unbiased* with the stderr
    it states (:func:`_unbiased_bands`; only when every cell has stderrs): ``median_ratio_unbiased`` with
    its 5–95 % band ``median_ratio_unbiased_lo``/``_hi`` (and ``median_ratio_confident_unbiased...``): a
    noisy denominator pulls the median of observed/predicted below 1 by itself, so compare the median with
    this band, not with 1; likewise ``spearman_unbiased...`` and ``sign_right_unbiased...`` for ρ and the
    sign count, and ``spearman_ceiling...``, the ρ an exact predictor would get against observations this
    noisy (from the observations alone: a ranking target above it needs more replicates, whatever the
    predictor). The dofs give Student-t noise (normal without). ``groups``: one key per tuple; cells with
    the same key share one prediction estimate (the study's Δw cells of one arm, t0 and target are one
    estimate times Δw), so their prediction errors are drawn together. ``magnitude=False`` (a sign-only
    predictor): counts only."""

    def fin(x: Any) -> bool:
        return x is not None and math.isfinite(x)

    if any(len(t) not in (2, 4, 6) for t in pairs):
        raise ValueError("score takes (pred, obs), (pred, obs, pred se, obs se) or (pred, obs, pred se, "
                         "obs se, pred dof, obs dof) tuples.")
    keys = list(groups) if groups is not None else list(range(len(pairs)))
    if len(keys) != len(pairs):
        raise ValueError("score needs one group key per tuple.")
    rows = [(float(t[0]), float(t[1]), *(t[2:4] if len(t) >= 4 else (None, None)),
             *(t[4:6] if len(t) == 6 else (None, None)), g)
            for t, g in zip(pairs, keys, strict=True) if fin(t[0]) and fin(t[1])]
    n = len(rows)
    out: dict[str, Any] = {"n": n, "sign_right": sum(p * o > 0 for p, o, *_ in rows),
                           "spearman": math.nan, "median_ratio": math.nan, "max_fold": math.nan}
    if not magnitude:
        return out
    out.update(_magnitudes([(p, o) for p, o, *_ in rows], ""))
    with_se = [(p, o, abs(float(sp)), abs(float(so)), dp, do, g) for p, o, sp, so, dp, do, g in rows
               if fin(sp) and fin(so)]
    confident = [(p, o) for p, o, sp, *_ in with_se if abs(p) > 2 * sp]
    out.update(n_with_se=len(with_se), n_confident=len(confident),
               sign_right_confident=sum(p * o > 0 for p, o in confident),
               within_2se=sum(abs(o - p) <= 2 * math.hypot(sp, so) for p, o, sp, so, *_ in with_se))
    out.update(_magnitudes(confident, "_confident"))
    out.update(_unbiased_bands(with_se if len(with_se) == n else []))  # the band of the same cells
    return out


def _unbiased_bands(rows: Sequence[tuple[Any, ...]], draws: int = 2000, seed: int = 0) -> dict[str, float]:
    """What an *unbiased* predictor with the stated stderrs would score on these cells, rows
    (p, o, s_p, s_o, dof_p, dof_o, group); a parametric bootstrap, seeded so that a report is reproducible.
    Under this hypothesis prediction and observation are two unbiased measurements of each cell's truth;
    their precision-weighted mean τ = (p/s_p² + o/s_o²)/(1/s_p² + 1/s_o²) has variance 1/(1/s_p² + 1/s_o²).
    Each draw takes the truths from their posterior given the τ (:func:`_truth_draws`: a normal model across
    cells, so that drawn truths are as spread out as the truths, not as the noisier τ), then a prediction
    truth + s_p·ε_p and an observation truth + s_o·ε_o (ε Student t with the given dof, standard normal
    without; one ε_p per group: cells of a group share their prediction's error), and scores the drawn
    pairs. Returns the median over draws and its 5 % and 95 % quantiles (keys ``…_unbiased``, ``…_lo``,
    ``…_hi``; NaN without cells) of:

    * ``median_ratio`` — the median observed/predicted, over the cells and over those whose drawn prediction
      is beyond 2 s_p (``median_ratio_confident``; that subset is drawn anew each time);
    * ``spearman`` — the rank correlation of drawn predictions with drawn observations (n ≥ 3);
    * ``sign_right`` — the count of cells whose drawn signs agree;
    * ``spearman_ceiling`` — the rank correlation an *exact* predictor would get against observations this
      noisy: truths drawn from the observations alone, ρ(truth, truth + s_o·ε_o); the same for every
      predictor of the same cells (keys ``spearman_ceiling``, ``…_lo``, ``…_hi``).

    The cells themselves, those with a significant observation, are held fixed. Not modelled: the
    observations' errors, correlated across a group's Δw by common sampler seeds (drawn independently here:
    the bands are somewhat too narrow); and the selection of cells on a significant observation, which keeps
    observations away from 0 where redrawn ones need not be, so that a real predictor's median ratio, sign
    count and ρ can sit *above* their bands without being better than its noise. A score below its band is
    the finding the bands are for: an error beyond the noise the predictor states."""
    keys = ("median_ratio_unbiased", "median_ratio_confident_unbiased", "spearman_unbiased",
            "sign_right_unbiased", "spearman_ceiling")
    out = {k + x: math.nan for k in keys for x in ("", "_lo", "_hi")}
    if not rows:
        return out
    p, o, sp, so = (np.array([r[i] for r in rows], dtype=float) for i in range(4))
    dp, do = (np.array([r[i] if r[i] is not None and r[i] >= 1 else np.inf for r in rows], dtype=float)
              for i in (4, 5))
    gid = {g: k for k, g in enumerate(dict.fromkeys(r[6] for r in rows))}
    cell_group = np.array([gid[r[6]] for r in rows])
    with np.errstate(divide="ignore", invalid="ignore"):
        wp, wo = 1 / sp**2, 1 / so**2
        tau = np.where(sp == 0, p, np.where(so == 0, o, (p * wp + o * wo) / (wp + wo)))
        var = np.where((sp == 0) | (so == 0), 0.0, 1 / (wp + wo))
    rng = np.random.default_rng(seed)

    def noise(dof: np.ndarray, gen: np.random.Generator) -> np.ndarray:
        t = np.isfinite(dof)
        out = np.empty((draws, len(dof)))
        out[:, ~t] = gen.standard_normal((draws, int((~t).sum())))
        out[:, t] = gen.standard_t(dof[t], (draws, int(t.sum())))
        return out

    first = np.array([np.flatnonzero(cell_group == k)[0] for k in range(len(gid))])
    truth = _truth_draws(tau, var, cell_group, draws, rng)
    ps = truth + sp * noise(dp[first], rng)[:, cell_group]  # one prediction error per group
    os_ = truth + so * noise(do, rng)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw without confident cells: its median is NaN
        ratio = np.where(ps != 0, os_ / ps, np.nan)
        med = np.nanmedian(ratio, axis=1) if np.isnan(ratio).any() else np.median(ratio, axis=1)
        medc = np.nanmedian(np.where(np.abs(ps) > 2 * sp, ratio, np.nan), axis=1)
    rho = ceiling = np.full(draws, np.nan)
    if len(rows) >= 3:
        rho = _row_spearman(ps, os_)
        own = np.random.default_rng([seed, 1])  # its own stream: the same ceiling for every predictor
        exact = _truth_draws(o, so**2, cell_group, draws, own)  # from the observations alone
        ceiling = _row_spearman(exact, exact + so * noise(do, own))
    signs = (ps * os_ > 0).sum(axis=1).astype(float)
    for k, m in zip(keys, (med, medc, rho, signs, ceiling), strict=True):
        m = m[np.isfinite(m)]
        if len(m):
            method = "inverted_cdf" if k == "sign_right_unbiased" else "linear"  # a count stays a count
            out[k], out[k + "_lo"], out[k + "_hi"] = (float(np.quantile(m, q, method=method))
                                                      for q in (0.5, 0.05, 0.95))
    return out


def _truth_draws(y: np.ndarray, var: np.ndarray, group: np.ndarray, draws: int,
                 rng: np.random.Generator) -> np.ndarray:
    """``[draws, n]`` draws of the cells' true values given unbiased measurements ``y`` with variances
    ``var`` (0: exact), under the normal hierarchical model θ_j ~ N(μ, σ²), y_j ~ N(θ_j, var_j) with flat
    priors on μ and σ (Gelman et al., *Bayesian Data Analysis*, 3rd ed., §5.4, eqs. 5.17–5.21): σ from its
    marginal posterior on a grid, p(σ|y) ∝ V_μ^½ Π_j (var_j + σ²)^-½ exp(−(y_j − μ̂)²/(2(var_j + σ²))) with
    μ̂ = V_μ Σ_j y_j/(var_j + σ²), V_μ = 1/Σ_j 1/(var_j + σ²); μ ~ N(μ̂, V_μ); θ_j ~ N(θ̂_j, V_j) with
    θ̂_j = V_j (y_j/var_j + μ/σ²), V_j = 1/(1/var_j + 1/σ²). Drawing σ, not plugging in an estimate, keeps
    the truths' spread honest when the noise dominates it. Cells of one ``group`` share one standard normal
    deviate (their truths are one effect times Δw in the study)."""
    noisy = var > 0
    out = np.broadcast_to(y, (draws, len(y))).copy()
    if noisy.sum() < 2:
        return out
    yv, vv = y[noisy], var[noisy]
    span = float(np.std(yv)) + float(np.sqrt(vv.max()))
    grid = np.linspace(0.0, 10 * span, 2001)[:, None]  # σ; the posterior's tail is ~σ^-(n-1)
    w = 1 / (vv + grid**2)
    v_mu = 1 / w.sum(axis=1)
    mu_hat = v_mu * (w * yv).sum(axis=1)
    logp = (0.5 * np.log(v_mu) + 0.5 * np.log(w).sum(axis=1)
            - 0.5 * (w * (yv - mu_hat[:, None]) ** 2).sum(axis=1))
    prob = np.exp(logp - logp.max())
    k = rng.choice(len(grid), size=draws, p=prob / prob.sum())
    sigma2 = grid[k, 0][:, None] ** 2
    mu = (mu_hat[k] + np.sqrt(v_mu[k]) * rng.standard_normal(draws))[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        v_j = np.where(sigma2 > 0, 1 / (1 / vv + 1 / sigma2), 0.0)
        theta_hat = np.where(sigma2 > 0, v_j * (yv / vv + mu / sigma2), mu)
    gids = group[noisy]
    z = rng.standard_normal((draws, int(group.max()) + 1))[:, gids]
    out[:, noisy] = theta_hat + np.sqrt(v_j) * z
    return out


def _row_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's ρ of each row of ``a`` with the same row of ``b`` (average ranks for ties; NaN where a row
    is constant)."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra, rb = ra - ra.mean(axis=1, keepdims=True), rb - rb.mean(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (ra * rb).sum(axis=1) / np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))


def _magnitudes(rows: Sequence[tuple[float, float]], suffix: str) -> dict[str, float]:
    """``spearman``, ``median_ratio`` and ``max_fold`` (see :func:`score`) of (predicted, observed) pairs,
    NaN where undefined (Spearman: fewer than 3 cells or constant predictions), keys ending in ``suffix``."""
    from scipy.stats import spearmanr

    out = {"spearman": math.nan, "median_ratio": math.nan, "max_fold": math.nan}
    if len(rows) >= 3 and len({p for p, _ in rows}) > 1:
        out["spearman"] = float(spearmanr([p for p, _ in rows], [o for _, o in rows]).statistic)
    r = [o / p for p, o in rows if p != 0]
    if r:
        out["median_ratio"] = float(np.median(r))
        out["max_fold"] = float(max(max(abs(x), 1 / abs(x)) if x != 0 else math.inf for x in r))
    return {k + suffix: v for k, v in out.items()}


def score_predictors(data: Mapping[str, Any]) -> dict[str, Any]:
    """Every predictor scored on the cells whose observation is significant (replicated mean of
    (EL^12 − EL^21)/2 beyond the 95 % t threshold), per arm, per optimiser, overall, and per target domain
    within each of those. Returns ``{"groups": {group: {predictor: score}}, "n_cells", "n_significant"}``
    with groups named ``adam/balanced``, ``adam``, ``all``, ``adam: L=en``, ``all: L=en``, ..."""
    groups: dict[str, list[tuple[dict[str, tuple[Any, ...]], tuple[Any, ...]]]] = {}
    n_cells = 0
    for arm in data["arms"]:
        for c in arm["cells"]:
            for d, pd in c["per_domain"].items():
                if "observed" not in pd:
                    continue
                n_cells += 1
                if not pd["observed"]["significant"]:
                    continue
                pairs = {p: _pair(pd, p, _prediction_dof(arm, c["t0"], d, p)) for p in PREDICTORS}
                # the Δw cells of one (study, arm, t0, target) share one prediction estimate
                key = (arm.get("study"), arm["optimizer"], arm["variant"], c["t0"], d)
                for g in (f"{arm['optimizer']}/{arm['variant']}", arm["optimizer"], "all",
                          f"{arm['optimizer']}: L={d}", f"all: L={d}"):
                    groups.setdefault(g, []).append((pairs, key))
    out: dict[str, Any] = {"groups": {}, "n_cells": n_cells,
                           "n_significant": len(groups.get("all", []))}
    # arms, optimisers, all, then per target domain
    def rank(g: str) -> tuple[int, str]:
        return (3 if ":" in g else 0 if "/" in g else 2 if g == "all" else 1), g

    order = sorted(groups, key=rank)
    for g in order:
        out["groups"][g] = {
            p: score([pairs[p] for pairs, _ in groups[g]], magnitude=p != "recency",
                     groups=[key for _, key in groups[g]])
            for p in PREDICTORS}
    return out


def pool_studies(studies: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Several studies' ``results.json`` data (name -> data; e.g. one preset under several seeds) as one
    mapping for :func:`score_predictors` and :func:`commute.report.plot_predictors` (not for
    :func:`summarise`, which keys arms by name): the union of their arms, each tagged with its ``study``.
    Cells stay what they were (each is significant or not on its own replicates); pooling only adds cells,
    so the scores rest on more of them. The studies must share the domains and the intervention pair and
    have replicated observations, and no cell may be in two of them: a cell is its arm's run (the directory
    name hashes everything that decides the trajectory, the seed included), t0, Δw and T, so the same
    study twice, or a re-run of it with other estimator settings, is refused.

    Raises ``ValueError`` with one sentence naming the offending study."""
    if len(studies) < 2:
        raise ValueError("pooling needs at least two studies.")
    arms: list[dict[str, Any]] = []
    first: tuple[list[str], list[str]] | None = None
    owner: dict[tuple[Any, ...], str] = {}
    for name, data in studies.items():
        domains, pair = _pool_check(name, data)
        if first is None:
            first = (domains, pair)
        elif (domains, pair) != first:
            raise ValueError(f"study {name} has domains {domains} and pair {pair}, the first has {first[0]} "
                             f"and {first[1]}: only studies of the same domains pool.")
        for arm in data["arms"]:
            run = str(arm.get("run_dir", "")).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or \
                f"{arm['optimizer']}/{arm['variant']}/{config_hash(data.get('config', {}))}"
            for c in arm["cells"]:
                key = (run, c["t0"], c["delta_w"], c.get("T"))
                if key in owner:
                    raise ValueError(f"studies {owner[key]} and {name} share the cell {arm['optimizer']}/"
                                     f"{arm['variant']} t0 = {c['t0']}, Δw = {c['delta_w']} (the same runs): "
                                     "it would count twice. Pool studies run under different seeds or "
                                     "settings.")
                owner[key] = name
            arms.append({**arm, "study": name})
    assert first is not None
    return {"domains": first[0], "pair": first[1], "arms": arms, "studies": list(studies),
            "configs": {name: data.get("config", {}) for name, data in studies.items()}}


def _pool_check(name: str, data: Any) -> tuple[list[str], list[str]]:
    """(domains, pair) of one study to pool, after checking the shape :func:`pool_studies` relies on."""
    def bad(why: str) -> ValueError:
        return ValueError(f"study {name} cannot be pooled: {why}.")

    if not isinstance(data, Mapping):
        raise bad("its results are not a JSON object")
    domains = data.get("domains")
    if not isinstance(domains, list) or len(domains) < 2 or not all(isinstance(d, str) for d in domains):
        raise bad("'domains' is not a list of domain names")
    pair = data.get("pair") or domains[:2]
    if not isinstance(pair, list) or len(pair) != 2 or not set(pair) <= set(domains):
        raise bad("'pair' is not two of its domains")
    if not isinstance(data.get("config", {}), Mapping):
        raise bad("'config' is not an object")
    arms = data.get("arms")
    if not isinstance(arms, list) or not all(isinstance(a, Mapping) and isinstance(a.get("cells"), list)
                                             and {"optimizer", "variant"} <= set(a) for a in arms):
        raise bad("'arms' is not a list of arms with cells")
    n_obs = 0
    for a in arms:
        for c in a["cells"]:
            pds = c.get("per_domain") if isinstance(c, Mapping) else None
            if not isinstance(pds, Mapping) or not {"t0", "delta_w"} <= set(c) or not set(pds) <= {*domains}:
                raise bad(f"a cell of {a['optimizer']}/{a['variant']} is not a cell of its domains")
            n_obs += sum(isinstance(pd, Mapping) and "observed" in pd for pd in pds.values())
    if not n_obs:
        raise bad("it has no replicated observations (an empty study, or results from before replicates; "
                  "re-run it with this version)")
    return list(domains), list(pair)


def _pair(pd: Mapping[str, Any], predictor: str, dof: int | None = None) -> tuple[Any, ...]:
    """(predicted, observed, predicted se, observed se, predicted dof, observed dof) of one cell and target
    for :func:`score` (a dof is None where unknown)."""
    e = pd.get("predictions", {}).get(predictor) or {}
    n = pd["observed"].get("n")
    return (e.get("mean"), pd["observed"]["mean"], e.get("stderr"), pd["observed"].get("stderr"), dof,
            int(n) - 1 if isinstance(n, int) else None)


def delta_w_key(delta_w: float) -> str:
    """The key of one Δw in a response record's ``by_delta_w``."""
    return f"{float(delta_w):.6g}"


def response_unit(record: Mapping[str, Any], delta_w: float | None = None) -> Mapping[str, Any]:
    """{domain: {"response", "alignment"}} per unit Δw from one window's response record: with
    ``response.cubic`` the two-point Gauss estimate of that Δw (``by_delta_w``; without ``delta_w`` the
    first), else the window's one estimate, the same for every Δw ({} where there is none)."""
    by = record.get("by_delta_w")
    if by:
        return (next(iter(by.values())) if delta_w is None else by.get(delta_w_key(delta_w))) or {}
    return record.get("unit") or {}


def _prediction_dof(arm: Mapping[str, Any], t0: Any, domain: str, predictor: str) -> int | None:
    """Degrees of freedom of a cell's prediction: the bracket's P (:func:`p_dof`); the response's and the
    alignment's, replays − 1 (groups − 1 with one replay) as stored with the window's estimate."""
    if predictor == "bracket":
        return p_dof(arm, t0, domain)
    for r in arm.get("responses", []):
        if r.get("step") == t0:
            n = (response_unit(r).get(domain) or {}).get(predictor, {}).get("n")
            return int(n) - 1 if isinstance(n, int) else None
    return None
