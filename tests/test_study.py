"""Tests of the bilingual study: sign counting, the report, the locality sweep, caching, end to end.

Independent truths: counting by numpy, the exact
reordering effect simulated with deterministic gradient descent, and a re-run that must not train.
"""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from commute.bracket import intervention_excess
from commute.errors import CommuteError
from commute.locality import locality_sweep
from commute.report import render_report, summarise
from commute.scores import score_predictors, sign_agreement
from commute.study import PRESETS, StudyConfig, get_preset, run_bilingual_study

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# sign agreement and predictions
# --------------------------------------------------------------------------------------------------
def test_sign_agreement_counts_against_numpy() -> None:
    rng = np.random.default_rng(0)
    pred, se, obs = rng.normal(size=200), rng.uniform(0.1, 2, size=200), rng.normal(size=200)
    obs[:5] = 0.0  # a zero observation never agrees
    cells = [{"pred": a, "pred_stderr": b, "antisym": c} for a, b, c in zip(pred, se, obs, strict=True)]
    got = sign_agreement(cells)
    agree = np.sign(pred) == np.sign(obs)
    agree[:5] = False
    sig = np.abs(pred / se) > 2
    assert got == {"n": 200, "agree": int(agree.sum()), "n_significant": int(sig.sum()),
                   "agree_significant": int((agree & sig).sum())}


def test_predicted_excess_is_gamma2_dw_T2_P() -> None:
    assert intervention_excess(2.0, 0.3, 10, 0.01) == pytest.approx(0.01**2 * 0.3 * 100 * 2.0)
    assert intervention_excess(-1.0, 0.3, 10, 0.01) < 0


# --------------------------------------------------------------------------------------------------
# the report from synthetic results
# --------------------------------------------------------------------------------------------------
def _synthetic(seed: int = 0) -> dict:
    rng = random.Random(seed)
    d = ["en", "ru"]
    arms = []
    for opt in ("adam", "sgd"):
        for var, base in (("balanced", {"en": 0.5, "ru": 0.5}), ("imbalanced", {"en": 0.9, "ru": 0.1})):
            cells, cks = [], []
            for t0 in (10, 20):
                L = {k: 3 - t0 / 100 + rng.random() for k in d}
                P = {k: {"mean": rng.gauss(0, 1), "stderr": rng.uniform(0.1, 1), "n": 6} for k in d}
                cks.append({"step": t0, "L": L, "P": P, "gamma": 0.01, "lambda_max": 5.0})
                for dw in (0.1, 0.2):
                    Lb = {k: L[k] - 0.1 for k in d}
                    L12 = {k: Lb[k] + rng.gauss(0, 0.01) for k in d}
                    L21 = {k: Lb[k] + rng.gauss(0, 0.01) for k in d}
                    pd = {}
                    for k in d:
                        pred = intervention_excess(P[k]["mean"], dw, 5, 0.01)
                        anti = 0.5 * ((L12[k] - Lb[k]) - (L21[k] - Lb[k]))
                        se = abs(anti) / rng.uniform(0.5, 10)
                        pd[k] = {"EL12": L12[k] - Lb[k], "EL21": L21[k] - Lb[k], "antisym": anti,
                                 "pred": pred,
                                 "pred_stderr": intervention_excess(P[k]["stderr"], dw, 5, 0.01),
                                 "z": P[k]["mean"] / P[k]["stderr"], "agree": pred * anti > 0,
                                 "observed": {"mean": anti, "stderr": se, "n": 3, "t": anti / se,
                                              "significant": abs(anti / se) > 4.303},
                                 "predictions": {
                                     "bracket": {"mean": pred, "stderr": abs(pred) / 3},
                                     "response": {"mean": anti * rng.uniform(0.3, 3) * rng.choice([1, 1, -1]),
                                                  "stderr": abs(anti) / 5},
                                     "alignment": {"mean": rng.gauss(0, 0.01), "stderr": 0.001},
                                     "recency": {"mean": 1.0 if k == "en" else -1.0, "stderr": None}}}
                    cells.append({"t0": t0, "delta_w": dw, "T": 5, "L_t0": L, "L_base": Lb, "L12": L12,
                                  "L21": L21, "tokens_match": True, "locality": 0.25, "per_domain": pd})
            curve = [{"step": s, "L": {k: 3 - s / 100 for k in d}} for s in (10, 20, 30)]
            arms.append({"optimizer": opt, "variant": var, "base": base, "lr": 0.01, "T": 5,
                         "gamma_rule": "test", "base_curve": curve, "checkpoints": cks, "cells": cells})
    loc = {"lr": 1e-3, "lambda_max": 5.0, "delta_w": 0.3, "base": {"en": 0.5, "ru": 0.5},
           "P": {"en": 1.0, "ru": -1.0}, "domains": d,
           "rows": [{"T": T, "gammaT": 1e-3 * T, "locality": 5e-3 * T,
                     **{k: {"EL12": 1e-6, "EL21": -1e-6, "antisym": 1e-6, "pred": 1e-6 * (1 - 0.01 * T),
                            "ratio": 1 / (1 - 0.01 * T)} for k in d}} for T in (8, 4, 2)]}
    return {"config": {"preset": "synthetic", "T": 5}, "domains": d, "arms": arms, "locality": loc}


def test_report_renders_every_table_figure_and_csv(tmp_path: Path) -> None:
    data = _synthetic()
    data["summary"] = summarise(data)
    path = render_report(data, tmp_path)
    md = path.read_text()
    for needle in ("## Which predictor to trust", "## The bracket in detail", "EL^12", "EL^21",
                   "observed (EL^12−EL^21)/2 ± se (R)", "response ± se", "bracket ± se", "γTλ_max",
                   "Table 4 analogue", "Locality sweep", "Table 2", "Table 3", "adam / imbalanced (0.9, 0.1)",
                   "linear response Σδw·G", "Spearman ρ",
                   "where \\|pred\\| > 2 se: sign · ρ · obs/pred · worst",  # a cell's | escaped
                   "second order in γT; g_L from training-split batches",  # results without a target
                   "sign if unbiased (5–95 %)", "ρ if unbiased", "ρ if exact", "obs/pred if unbiased",
                   "an unbiased predictor with the stderrs it states would give",
                   "an exact one, against observations this noisy"):
        assert needle in md, needle
    # a summary from before the Spearman bands (results.json of an older version) is re-scored, not shown bare
    old = copy.deepcopy(data["summary"])
    for by in old["predictors"]["groups"].values():
        for sc in by.values():
            for k in [k for k in sc if k.startswith(("spearman_ceiling", "spearman_unb", "sign_right_unb"))]:
                del sc[k]
    assert "an exact one, against" in render_report({**data, "summary": old}, tmp_path / "old").read_text()
    # interventions that remove a domain (Δw ≥ its base weight) are named: once per imbalanced arm, and
    # counted over the significant cells (here every imbalanced cell: ru's base weight is 0.1)
    assert md.count("Δw = 0.1, 0.2 takes `ru` to weight 0 for T steps") == 2
    assert "Δw = 0.1 takes" not in md and "`en` to weight 0" not in md
    edge = sum(pd["observed"]["significant"] for a in data["arms"] if a["variant"] == "imbalanced"
               for c in a["cells"] for pd in c["per_domain"].values())
    n_sig = sum(pd["observed"]["significant"] for a in data["arms"] for c in a["cells"]
                for pd in c["per_domain"].values())
    assert 0 < edge < n_sig
    assert f"{edge} of the {n_sig} significant cells take a domain's weight to 0" in md
    for f in ("loss_planes.png", "pred_vs_obs.png", "locality.png", "predictors.png"):
        assert (tmp_path / f).stat().st_size > 10_000, f
    rows = (tmp_path / "cells.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4 * 2 * 2 * 2  # header + arms × t0 × Δw × domains
    # the summary row of each arm equals an independent count over the CSV
    for arm in data["arms"]:
        key = f"{arm['optimizer']}/{arm['variant']}"
        mine = [r.split(",") for r in rows[1:] if r.startswith(f"{arm['optimizer']},{arm['variant']},")]
        agree = sum(float(r[13]) * float(r[12]) > 0 for r in mine)
        assert data["summary"]["arms"][key]["agree"] == agree
        assert data["summary"]["arms"][key]["n"] == len(mine)


def test_predictor_scores_against_an_independent_count() -> None:
    """score_predictors on significant cells: sign counts, Spearman as the Pearson correlation of ranks,
    median and worst fold of observed/predicted, recomputed here with numpy."""
    data = _synthetic(3)
    sp = summarise(data)["predictors"]
    partial = 0  # (group, predictor) pairs where the confident cells are a proper subset of 3 or more
    for group, keep in (("all", lambda arm, d: True), ("sgd", lambda arm, d: arm["optimizer"] == "sgd"),
                        ("all: L=ru", lambda arm, d: d == "ru")):
        cells = [pd for arm in data["arms"] for c in arm["cells"] for d, pd in c["per_domain"].items()
                 if keep(arm, d) and pd["observed"]["significant"]]
        assert 3 <= len(cells) < sum(len(a["cells"]) * 2 for a in data["arms"])
        obs = np.array([pd["observed"]["mean"] for pd in cells])
        for name in ("response", "bracket", "alignment", "recency"):
            pred = np.array([pd["predictions"][name]["mean"] for pd in cells])
            got = sp["groups"][group][name]
            assert got["n"] == len(cells) and got["sign_right"] == int((pred * obs > 0).sum())
            rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731  (no ties in these data)
            if name != "recency":
                assert got["spearman"] == pytest.approx(np.corrcoef(rank(pred), rank(obs))[0, 1])
                assert got["median_ratio"] == pytest.approx(np.median(obs / pred))
                r = np.abs(obs / pred)
                assert got["max_fold"] == pytest.approx(max(r.max(), (1 / r).max()))
                # does the stderr tell the truth: confident predictions, observations within 2 combined se
                pse = np.array([pd["predictions"][name]["stderr"] for pd in cells])
                ose = np.array([pd["observed"]["stderr"] for pd in cells])
                conf = np.abs(pred) > 2 * pse
                assert got["n_with_se"] == len(cells) and got["n_confident"] == int(conf.sum())
                assert got["sign_right_confident"] == int((pred * obs > 0)[conf].sum())
                assert got["within_2se"] == int((np.abs(obs - pred) <= 2 * np.sqrt(pse**2 + ose**2)).sum())
                # the same scores on the confident cells only
                pc, oc = pred[conf], obs[conf]
                if conf.sum() >= 3:
                    assert got["spearman_confident"] == pytest.approx(np.corrcoef(rank(pc), rank(oc))[0, 1])
                    partial += conf.sum() < len(cells)
                if conf.any():
                    assert got["median_ratio_confident"] == pytest.approx(np.median(oc / pc))
                    rc = np.abs(oc / pc)
                    assert got["max_fold_confident"] == pytest.approx(max(rc.max(), (1 / rc).max()))
                else:
                    assert math.isnan(got["median_ratio_confident"])
            else:
                assert math.isnan(got["median_ratio"]) and "within_2se" not in got
        # the synthetic response is off by up to 3x or in sign with a 20 % stderr: some cells are outside
        resp = sp["groups"][group]["response"]
        assert 0 < resp["within_2se"] < resp["n"] and resp["n_confident"] == resp["n"]
    assert partial > 0


def test_unbiased_bands_cover_an_unbiased_predictor_and_flag_a_biased_one() -> None:
    """The bands of scores an unbiased predictor would get, checked by simulation (mixed signs, sizes over a
    5x range, as in the study): cells whose predictions really are unbiased with their stated stderr
    (Student t, 2 dof, as 3 replays) land inside the 5-95 % band of the median observed/predicted in about
    90 % of studies although that median is well below 1 (a noisy denominator), on all cells and on the
    confident ones, and inside the bands of Spearman's ρ and of the sign count; predictions 3x too large
    with a small stderr land below the median's band in most studies, and right signs with scrambled sizes
    and a small stderr below the ρ band; the exact truths' ρ with the observations lands inside the ceiling
    band, which is the same for every predictor; and the band still covers when the observation is the
    noisier one."""
    from scipy.stats import spearmanr

    from commute.scores import score

    rng = np.random.default_rng(1)
    inside, inside_conf, n_conf, inside_noisy_obs, below, medians = 0, 0, 0, 0, 0, []
    inside_rho = inside_sign = inside_ceiling = below_rho = 0
    n_studies = 120
    for _ in range(n_studies):
        truth = rng.choice([-1, 1], 25) * rng.uniform(0.01, 0.05, 25)
        sp = np.abs(truth) * rng.uniform(0.3, 1.2, 25)  # prediction stderr comparable to the effect
        so = np.abs(truth) * 0.3
        pred = truth + sp * rng.standard_t(2, 25)
        obs = truth + so * rng.standard_t(4, 25)
        sc = score([(p, o, a, b, 2, 4) for p, o, a, b in zip(pred, obs, sp, so, strict=True)])
        medians.append(sc["median_ratio"])
        inside += sc["median_ratio_unbiased_lo"] <= sc["median_ratio"] <= sc["median_ratio_unbiased_hi"]
        inside_rho += sc["spearman_unbiased_lo"] <= sc["spearman"] <= sc["spearman_unbiased_hi"]
        inside_sign += sc["sign_right_unbiased_lo"] <= sc["sign_right"] <= sc["sign_right_unbiased_hi"]
        assert sc["spearman_unbiased"] < sc["spearman_ceiling"]  # prediction noise costs rank correlation
        exact = spearmanr(truth, obs).statistic  # an exact predictor: its ρ is the observations' noise alone
        inside_ceiling += sc["spearman_ceiling_lo"] <= exact <= sc["spearman_ceiling_hi"]
        scrambled = np.sign(truth) * rng.permutation(np.abs(truth))  # right signs, sizes of other cells
        wrong = score([(p, o, 0.05 * abs(p), b, 2, 4) for p, o, b in zip(scrambled, obs, so, strict=True)])
        below_rho += wrong["spearman"] < wrong["spearman_unbiased_lo"]
        # the ceiling is the observations' own: the same for any predictor of these cells
        assert all(wrong[k] == sc[k] for k in ("spearman_ceiling_lo", "spearman_ceiling_hi"))
        if sc["n_confident"] >= 3:
            n_conf += 1
            inside_conf += (sc["median_ratio_confident_unbiased_lo"] <= sc["median_ratio_confident"]
                            <= sc["median_ratio_confident_unbiased_hi"])
        # the observation the noisier one: truth is then closer to the prediction than to the observation
        so2, sp2 = np.abs(truth) * 0.8, np.abs(truth) * 0.2
        sc2 = score([(t + a * rng.standard_t(2), t + b * rng.standard_t(4), a, b, 2, 4)
                     for t, a, b in zip(truth, sp2, so2, strict=True)])
        lo2, hi2 = sc2["median_ratio_unbiased_lo"], sc2["median_ratio_unbiased_hi"]
        inside_noisy_obs += lo2 <= sc2["median_ratio"] <= hi2
        biased = score([(3 * t + 0.05 * abs(t) * rng.standard_normal(), o, 0.05 * abs(t), b, 2, 4)
                        for t, o, b in zip(truth, obs, so, strict=True)])
        below += biased["median_ratio"] < biased["median_ratio_unbiased_lo"]
    assert np.median(medians) < 0.85  # the plain median ratio of an unbiased predictor is biased low
    for hits, n in ((inside, n_studies), (inside_conf, n_conf), (inside_noisy_obs, n_studies)):
        assert n >= 0.5 * n_studies and 0.8 * n <= hits <= 0.98 * n, (hits, n)
    assert below >= 0.9 * n_studies, below
    for hits in (inside_rho, inside_sign, inside_ceiling):
        assert 0.8 * n_studies <= hits <= 0.98 * n_studies, (inside_rho, inside_sign, inside_ceiling)
    assert below_rho >= 0.85 * n_studies, below_rho
    # seeded: the same cells give the same band; without stderrs there is none
    rows = [(0.02, 0.01, 0.01, 0.002, 2, 2), (-0.03, -0.02, 0.02, 0.004, 2, 2)]
    assert score(rows) == score(rows)
    assert math.isnan(score([(0.02, 0.01)])["median_ratio_unbiased"])


def test_truth_draws_have_the_truths_spread_not_the_measurements() -> None:
    """The truths behind the bands (normal hierarchical model, BDA §5.4): measured with noise of variance 1,
    truths spread with σ = 0.5 are drawn with a spread near 0.5 (the measurements have sqrt(1.25) = 1.12),
    equal truths with a spread near 0, and exact cells (variance 0) are kept; cells of one group move
    together."""
    from commute.scores import _truth_draws

    rng = np.random.default_rng(3)
    n = 2000
    for sigma in (0.5, 0.0):
        theta = 0.3 + sigma * rng.standard_normal(n)
        y = theta + rng.standard_normal(n)
        draws = _truth_draws(y, np.ones(n), np.arange(n), 500, np.random.default_rng(0))
        spread = float(np.median(draws.std(axis=1)))
        assert abs(spread - sigma) < 0.1 if sigma else spread < 0.25, (sigma, spread, float(y.std()))
        assert abs(float(draws.mean()) - 0.3) < 0.1
    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    d = _truth_draws(y, np.array([0.0, 1.0, 1.0, 1.0, 1.0]), np.array([0, 1, 1, 2, 3]), 200, rng)
    assert np.all(d[:, 0] == 1.0)  # exact
    dev = d - d.mean(axis=0)
    assert np.corrcoef(dev[:, 1], dev[:, 2])[0, 1] > 0.9 > abs(np.corrcoef(dev[:, 1], dev[:, 3])[0, 1]) + 0.5


def test_unbiased_band_draws_one_error_per_shared_prediction() -> None:
    """The study's Δw cells of one (arm, t0, target) are one estimate times Δw: their prediction errors are
    one draw. With ``groups`` saying so the band covers such an unbiased predictor about as often as it
    should; drawn as independent cells it is too narrow. score_predictors groups them and reads each
    prediction's dof from the arm (replays − 1, the bracket's groups − 1) and the observation's (R − 1)."""
    from commute.scores import _pair, _prediction_dof, score

    rng = np.random.default_rng(2)
    grouped = independent = 0
    n_studies = 100
    dws = np.array([0.15, 0.3, 0.45])
    for _ in range(n_studies):
        units = rng.choice([-1, 1], 8) * rng.uniform(0.05, 0.2, 8)  # per unit Δw
        usp = np.abs(units) * rng.uniform(0.3, 1.0, 8)
        pred = ((units + usp * rng.standard_t(3, 8))[:, None] * dws).ravel()
        truth, sp = (units[:, None] * dws).ravel(), (usp[:, None] * dws).ravel()
        so = np.abs(truth) * 0.3
        obs = truth + so * rng.standard_t(4, 24)
        rows = [(p, o, a, b, 3, 4) for p, o, a, b in zip(pred, obs, sp, so, strict=True)]
        for hit, sc in (("g", score(rows, groups=list(np.repeat(np.arange(8), 3)))), ("i", score(rows))):
            ok = sc["median_ratio_unbiased_lo"] <= sc["median_ratio"] <= sc["median_ratio_unbiased_hi"]
            grouped += ok and hit == "g"
            independent += ok and hit == "i"
    assert grouped >= 0.75 * n_studies and grouped >= independent + 0.08 * n_studies, (grouped, independent)
    with pytest.raises(ValueError, match="one group key per tuple"):
        score([(1.0, 1.0, 0.1, 0.1)], groups=[0, 1])
    # the dofs score_predictors uses: from the arm's stored estimates
    data = _synthetic(3)
    arm = data["arms"][0]
    arm["responses"] = [{"step": 10, "unit": {"en": {"response": {"mean": 1.0, "stderr": 0.5, "n": 4},
                                                     "alignment": {"mean": 1.0, "stderr": 0.5, "n": 4}}}}]
    assert _prediction_dof(arm, 10, "en", "response") == 3 == _prediction_dof(arm, 10, "en", "alignment")
    assert _prediction_dof(arm, 10, "en", "bracket") == 5  # P from 6 groups
    assert _prediction_dof(arm, 20, "en", "response") is None  # no estimate stored at that step
    pd = arm["cells"][0]["per_domain"]["en"]
    assert _pair(pd, "response", 3)[4:] == (3, 2)  # 3 replicates: 2 dof


def test_confident_scores_are_nan_without_enough_confident_cells() -> None:
    """score(): the confident-cell magnitudes are NaN with no confident cell, Spearman NaN with two."""
    from commute.scores import score

    none = score([(1.0, 2.0, 1.0, 0.1), (-1.0, -0.5, 2.0, 0.1), (0.5, 0.1, 1.0, 0.1)])
    assert none["n_confident"] == 0 and math.isnan(none["median_ratio_confident"])
    assert math.isnan(none["max_fold_confident"]) and math.isnan(none["spearman_confident"])
    two = score([(1.0, 2.0, 0.1, 0.1), (-1.0, -0.5, 0.1, 0.1), (0.5, 0.1, 1.0, 0.1)])
    assert two["n_confident"] == 2 and math.isnan(two["spearman_confident"])
    assert two["median_ratio_confident"] == pytest.approx(1.25)  # obs/pred 2 and 0.5
    assert two["max_fold_confident"] == pytest.approx(2)


def test_edge_note_names_only_the_pair_domain_taken_to_zero() -> None:
    """K = 3: the intervention moves Δw between the pair (en, ru) only; at base (0.8, 0.1, 0.1) Δw = 0.1
    takes ru to 0 (not de, whose weight does not move), Δw = 0.05 nothing; at (0.4, 0.4, 0.2) Δw = 0.4
    takes both en and ru to 0 in their phases."""
    from commute.report import _edge_md

    def arm(base, dws):
        return {"base": base, "cells": [{"delta_w": dw, "per_domain": {}} for dw in dws]}

    imb = arm({"en": 0.8, "ru": 0.1, "de": 0.1}, [0.05, 0.1])
    assert _edge_md({}, ("en", "ru"), imb)[0].startswith("Δw = 0.1 takes `ru` to weight 0")
    assert _edge_md({}, ("en", "ru"), arm({"en": 0.8, "ru": 0.1, "de": 0.1}, [0.05])) == []
    assert _edge_md({}, ("en", "ru"), arm({"en": 0.4, "ru": 0.4, "de": 0.2}, [0.2, 0.4]))[0].startswith(
        "Δw = 0.4 takes `en`, `ru` to weight 0")


def test_summary_checkpoint_criterion() -> None:
    data = _synthetic(1)
    s = summarise(data)
    for arm in data["arms"]:
        want = sum(all(pd["agree"] for c in arm["cells"] if c["t0"] == t0
                       for pd in c["per_domain"].values()) for t0 in (10, 20))
        assert s["arms"][f"{arm['optimizer']}/{arm['variant']}"]["checkpoints_right"] == want
    assert s["all"]["n"] == 4 * 8


def _set_cells(arm: dict, pattern: dict, se: dict, locality: float) -> None:
    """Overwrite an arm's cells: pattern[(t0, domain)] = (pred sign, [antisym sign per Δw in order])."""
    for c in sorted(arm["cells"], key=lambda c: (c["t0"], c["delta_w"])):
        i = sorted(x["delta_w"] for x in arm["cells"] if x["t0"] == c["t0"]).index(c["delta_w"])
        c["locality"] = locality
        for d, pd in c["per_domain"].items():
            sp, obs = pattern[(c["t0"], d)]
            pd.update({"pred": float(sp), "pred_stderr": se[d], "antisym": float(obs[i]), "z": sp / se[d],
                       "agree": sp * obs[i] > 0})


def test_summary_per_prediction_count_recency_baseline_and_t_threshold(tmp_path: Path) -> None:
    data = _synthetic(2)
    a0, a1 = data["arms"][0], data["arms"][1]  # adam/balanced, adam/imbalanced; t0 10, 20; Δw 0.1, 0.2
    # en (domain 1) cells |z| = 2.3: significant at |z| > 2 but not at t_0.975(5) = 2.571; ru cells |z| = 3
    se = {"en": 1 / 2.3, "ru": 1 / 3}
    _set_cells(a0, {(10, "en"): (+1, [+1, +1]),  # P right 2/2; recency (en: antisym > 0) right 2/2
                    (10, "ru"): (+1, [-1, +1]),  # P 1/2 (tie); recency (ru: antisym < 0) 1/2 (tie)
                    (20, "en"): (-1, [-1, -1]),  # P right 2/2; recency wrong 0/2
                    (20, "ru"): (-1, [-1, -1])},  # P right 2/2; recency right 2/2
               se, locality=0.005)
    _set_cells(a1, {(10, "en"): (+1, [-1, -1]), (10, "ru"): (+1, [-1, -1]),  # P wrong; recency en ✗, ru ✓
                    (20, "en"): (+1, [-1, -1]), (20, "ru"): (+1, [-1, -1])}, se, locality=0.04)
    s = summarise(data)
    c0, c1, adam = s["arms"]["adam/balanced"], s["arms"]["adam/imbalanced"], s["optimizers"]["adam"]
    assert (c0["predictions"], c0["predictions_right"], c0["predictions_tied"]) == (4, 3, 1)
    assert (c0["recency_predictions_right"], c0["recency_predictions_tied"]) == (2, 1)
    assert (c0["agree"], c0["recency_observed"], c0["n"]) == (7, 5, 8)
    assert (c1["predictions_right"], c1["recency_predictions_right"], c1["predictions_tied"]) == (0, 2, 0)
    assert (c1["agree"], c1["recency_observed"]) == (0, 4)
    assert (adam["predictions"], adam["predictions_right"], adam["recency_predictions_right"]) == (8, 3, 4)
    assert (adam["agree"], adam["recency_observed"], adam["n"]) == (7, 9, 16)
    assert s["all"]["predictions"] == 16 and s["all"]["n"] == 32
    for k in ("predictions_right", "recency_predictions_right", "agree", "recency_observed", "n_significant"):
        assert s["all"][k] == sum(c[k] for c in s["arms"].values()), k
    # significance: t_0.975 with dof = groups − 1 = 5 (P's "n" is 6), the former |z| > 2 kept alongside
    assert c0["dof"] == [5] and c0["thresholds"] == [pytest.approx(2.5705818, rel=1e-6)]
    assert (c0["n_significant"], c0["agree_significant"]) == (4, 3)  # the ru cells only
    assert (c0["n_significant_z2"], c0["agree_significant_z2"]) == (8, 7)
    assert c0["lambda_of"] == "D^-1/2 H D^-1/2 (Adam)" and s["arms"]["sgd/balanced"]["lambda_of"] == "H"

    data["summary"] = s
    md = render_report(data, tmp_path, figures=False).read_text()
    assert "| adam/balanced | 3/4 | 2/4 | 7/8 | 5/8 | 3/4 | " in md
    assert "| **adam (all)** | 7/8 | " not in md and "| **adam (all)** | 3/8 | 4/8 | 7/16 | 9/16 | " in md
    for needle in ("predictions right (per t0×domain)", "recency baseline (per t0×domain)",
                   "t_0.975(5) = 2.571", "strict majority", "local: magnitude within a few %",
                   "near-local: magnitude within ~20 %", "far outside the local regime",
                   "λ_max of D^-1/2 H D^-1/2", "λ_max of H"):
        assert needle in md, needle
    a = s["all"]
    verdict = ("P beats" if a["predictions_right"] > a["recency_predictions_right"] else
               "P does no better than" if a["predictions_right"] == a["recency_predictions_right"] else
               "P does worse than")
    assert f"{verdict} the naive recency baseline" in md
    assert "|P/se| > 2 " not in md and "falls back" not in md

    # no group count stored: the threshold falls back to |P/se| > 2, and the report says so
    for ck in a0["checkpoints"]:
        for p in ck["P"].values():
            del p["n"]
    s2 = summarise(data)
    c0 = s2["arms"]["adam/balanced"]
    assert c0["dof_missing"] and c0["thresholds"] == [2.0]
    assert (c0["n_significant"], c0["agree_significant"]) == (8, 7)
    data["summary"] = s2
    md = render_report(data, tmp_path, figures=False).read_text()
    assert "falls back to |P/se| > 2" in md


# --------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_yaml_files_match_presets_and_round_trip(name: str, tmp_path: Path) -> None:
    cfg = get_preset(name)
    cfg.to_yaml(tmp_path / "c.yaml")
    assert StudyConfig.from_yaml(tmp_path / "c.yaml") == cfg
    shipped = REPO / "configs" / f"study_{name}.yaml"
    assert StudyConfig.from_yaml(shipped) == cfg, f"{shipped} is out of date with PRESETS[{name!r}]"


def test_bad_configs_raise_one_sentence() -> None:
    with pytest.raises(CommuteError, match="at least 2 domains"):
        StudyConfig(domains={"en": "x"})
    with pytest.raises(CommuteError, match="pair must name"):
        StudyConfig(domains={"en": "x", "ru": "y", "de": "z"}, pair=["en", "fr"])
    with pytest.raises(CommuteError, match="replicates"):
        StudyConfig(replicates=0)
    with pytest.raises(CommuteError, match="outside"):
        StudyConfig(variants=[{"name": "v", "base": {"en": 0.9, "ru": 0.1}, "delta_ws": [0.2]}])
    with pytest.raises(CommuteError, match="Unknown study config field"):
        StudyConfig.from_dict({"bogus": 1})
    with pytest.raises(CommuteError, match="Unknown study preset"):
        get_preset("huge")


# --------------------------------------------------------------------------------------------------
# the locality sweep on a micro GPT-2: observed / predicted -> 1 as γT -> 0
# --------------------------------------------------------------------------------------------------
def test_locality_sweep_ratio_tends_to_one() -> None:
    from commute.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny", n_layer=1, n_embd=16, n_head=2, n_positions=16)
    g = torch.Generator().manual_seed(1)
    batches = {"a": [torch.randint(0, 128, (3, 16), generator=g)],
               "b": [torch.randint(96, 256, (3, 16), generator=g)]}
    res = locality_sweep(model, batches, {"a": 0.5, "b": 0.5}, 0.3, [8, 4, 2], lr_times_lambda=1e-3,
                         lambda_iters=15)
    for k in ("a", "b"):
        dev = [abs(r[k]["ratio"] - 1) for r in res["rows"]]  # T = 8, 4, 2
        assert dev[0] > dev[1] > dev[2], (k, dev)  # the error shrinks with γT (it is O(γT))
        assert dev[2] < 0.1, (k, dev)
        assert all(r[k]["pred"] == pytest.approx(res["lr"] ** 2 * 0.3 * r["T"] ** 2 * res["P"][k])
                   for r in res["rows"])


def test_locality_sweep_response_holds_where_the_bracket_fails() -> None:
    """Far outside the local regime (γTλ_max = 10, deterministic float64 GD from a trained point), the
    exact linear response predicts the observed antisymmetric excess within 0.1 % at Δw = 0.02, while the
    bracket's ratio is near 0 (the expansion has long broken down)."""
    from commute.model import build_model, lm_loss

    torch.manual_seed(0)
    model = build_model("tiny", n_layer=1, n_embd=16, n_head=2, n_positions=16, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    batches = {"a": [torch.randint(0, 128, (3, 16), generator=g)],
               "b": [torch.randint(96, 256, (3, 16), generator=g)]}
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(60):  # to a point where the top curvature is positive (a minimum's neighbourhood)
        opt.zero_grad()
        (0.5 * lm_loss(model, batches["a"][0]) + 0.5 * lm_loss(model, batches["b"][0])).backward()
        opt.step()
    res = locality_sweep(model, batches, {"a": 0.5, "b": 0.5}, 0.02, [10], lr_times_lambda=[1.0],
                         lambda_iters=30)
    (row,) = res["rows"]
    assert res["lambda_max"] > 0 and row["locality"] == pytest.approx(10.0)
    for k in ("a", "b"):
        assert row[k]["ratio_response"] == pytest.approx(1.0, abs=1e-3), k
        assert abs(row[k]["ratio"]) < 0.1, k


# --------------------------------------------------------------------------------------------------
# micro end to end, then a cached re-run that must not train
# --------------------------------------------------------------------------------------------------
def _micro_config(root: Path) -> StudyConfig:
    rng = random.Random(0)
    for name, alphabet in (("a", "abcde fgh"), ("b", "uvwxyz  ")):
        docs = ["".join(rng.choice(alphabet) for _ in range(rng.randint(40, 120))) for _ in range(120)]
        (root / f"{name}.txt").write_text("\n\n".join(docs))
    return StudyConfig.from_dict(dict(
        preset="micro", threads=1, domains={"a": str(root / "a.txt"), "b": str(root / "b.txt")},
        model_overrides={"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16},
        seq_len=16, batch_size=4, sampler_mode="exact", lr={"adam": 3e-3, "sgd": 0.3},
        t0s=[4], T=2, extra_p_steps=[2],
        variants=[{"name": "balanced", "base": {"a": 0.5, "b": 0.5}, "delta_ws": [0.25]}],
        n_val_batches=2, val_batch_size=4, n_grad_batches=4, n_hvp_batches=2, est_batch_size=4, n_groups=2,
        lambda_iters=3, lambda_batch_size=4, replicates=2, response={"n_groups": 2, "batch_size": 2},
        locality={"T_grid": [2, 1], "batch_size": 2, "lr_times_lambda": [0.01, 0.5]}))


def test_micro_study_end_to_end_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _micro_config(tmp_path)
    out = tmp_path / "out"
    res = run_bilingual_study(config=cfg, out_dir=out, cache_dir=tmp_path / "cache", progress=False)
    assert res.report_path == out / "report.md" and res.report_path.is_file()
    for f in ("results.json", "config.yaml", "cells.csv", "checkpoints.csv", "locality.csv",
              "loss_planes.png", "pred_vs_obs.png", "locality.png", "linearity.png"):
        assert (out / f).is_file(), f
    data = json.loads((out / "results.json").read_text())
    arms = [(a["optimizer"], a["variant"]) for a in data["arms"]]
    assert arms == [("adam", "balanced"), ("sgd", "balanced")]
    for arm in data["arms"]:
        (cell,) = arm["cells"]
        # eq. (9) moves tokens between phases only: every domain's total is the base run's
        assert cell["tokens_match"] and cell["tokens"]["12"] == cell["tokens"]["base"] == cell["tokens"]["21"]
        assert cell["tokens"]["base"]["a"] == 2 * 2 * 2 * 16  # 2T steps × 2 rows × 16 tokens
        for k in ("a", "b"):
            p = cell["per_domain"][k]
            assert p["EL12"] == pytest.approx(cell["L12"][k] - cell["L_base"][k])
            # the observation: mean ± stderr over the replicates (the run's own sampler seed, then fresh)
            reps = cell["replicates"]
            assert [r["seed"] is None for r in reps] == [True, False] and reps[0]["L12"] == cell["L12"]
            antis = [0.5 * (r["L12"][k] - r["L21"][k]) for r in reps]
            assert antis[0] == pytest.approx(0.5 * (p["EL12"] - p["EL21"]))
            assert antis[0] != antis[1]  # a fresh sampler seed is another realisation of the window
            assert p["antisym"] == pytest.approx(np.mean(antis))
            assert p["observed"]["stderr"] == pytest.approx(np.std(antis, ddof=1) / math.sqrt(2))
            preds = p["predictions"]
            assert set(preds) == {"bracket", "response", "alignment", "recency"}
            assert preds["recency"]["mean"] == (1.0 if k == "a" else -1.0)
            resp = next(r for r in arm["responses"] if r["step"] == 4)
            # the response's window is the base run's: its replay ends on the base checkpoint at t0 + 2T
            assert 0 <= resp["replay_rel_error"] < 1e-5
            for name in ("response", "alignment"):  # linear in Δw = 0.25, per unit from the response stage
                assert preds[name]["mean"] == pytest.approx(0.25 * resp["unit"][k][name]["mean"])
                assert preds[name]["stderr"] == pytest.approx(0.25 * resp["unit"][k][name]["stderr"])
            ck = next(c for c in arm["checkpoints"] if c["step"] == 4)
            assert p["pred"] == pytest.approx(ck["gamma"] ** 2 * 0.25 * 4 * ck["P"][k]["mean"])
            assert math.isfinite(p["pred_stderr"]) and p["pred_stderr"] >= 0
        assert {c["step"] for c in arm["checkpoints"]} == {2, 4}
    assert StudyConfig.from_yaml(out / "config.yaml") == cfg  # reproducible from the saved config
    assert "reproduce the base checkpoint at t0 + 2T" in res.report_path.read_text()

    # a re-run finds everything cached: no training, no estimation, same numbers
    import commute.estimate
    import commute.response
    import commute.train

    def boom(*a, **k):
        raise AssertionError("a cached study must not train or estimate again")

    monkeypatch.setattr(commute.train, "train", boom)
    monkeypatch.setattr(commute.estimate.BracketEstimator, "estimate", boom)
    monkeypatch.setattr(commute.response.ResponseEstimator, "estimate", boom)
    again = run_bilingual_study(config=cfg, out_dir=out, cache_dir=tmp_path / "cache", progress=False)
    assert again.data["arms"] == json.loads(json.dumps(res.data["arms"]))
    assert again.data["summary"] == res.data["summary"]

    # an unfinished branch (its result missing, e.g. killed mid-run) is the only thing redone, identically
    monkeypatch.undo()
    (branch,) = [p for p in (out / "runs").glob("sgd-*/branches/*-21-s*") if (p / "result.json").is_file()]
    (branch / "result.json").unlink()
    calls: list[str] = []
    real_train = commute.train.train

    def counting(*a, **k):
        calls.append(str(a[1]))
        return real_train(*a, **k)

    monkeypatch.setattr(commute.train, "train", counting)
    third = run_bilingual_study(config=cfg, out_dir=out, cache_dir=tmp_path / "cache", progress=False)
    assert calls == [str(branch)]
    assert third.data["arms"] == again.data["arms"]


def test_response_over_trajectories_is_the_mean_of_per_trajectory_estimates(tmp_path: Path) -> None:
    """response.trajectories = 3: trajectory 0 is the one-trajectory estimate (the run's own batches, same
    fresh streams), the others replay the window under the replicates' sampler seeds (other G), and the
    prediction is their mean with stderr std/√3 (not the within-trajectory stderr)."""
    one = _micro_config(tmp_path)
    one = StudyConfig.from_dict({**one.to_dict(), "optimizers": ["sgd"], "locality": {"enabled": False}})
    three = StudyConfig.from_dict({**one.to_dict(), "response": {"n_groups": 2, "batch_size": 2,
                                                                  "trajectories": 3}})
    res1 = run_bilingual_study(config=one, out_dir=tmp_path / "one", cache_dir=tmp_path / "cache",
                               progress=False)
    res3 = run_bilingual_study(config=three, out_dir=tmp_path / "three", cache_dir=tmp_path / "cache",
                               progress=False)
    (r1,), (r3,) = res1.data["arms"][0]["responses"], res3.data["arms"][0]["responses"]
    assert r1["trajectories"] == 1 and "per_trajectory" not in r1 and r3["trajectories"] == 3
    per = r3["per_trajectory"]
    assert per[0] == r1["unit"]  # trajectory 0 is the run's own window, as with one trajectory
    assert r3["replay_rel_error"] == r1["replay_rel_error"] < 1e-5
    for k in ("a", "b"):
        for name in ("response", "alignment"):
            x = np.array([t[k][name]["mean"] for t in per])
            assert len(set(x.tolist())) == 3  # other batches, other G
            got = r3["unit"][k][name]
            assert got["mean"] == pytest.approx(x.mean()) and got["n"] == 3
            assert got["stderr"] == pytest.approx(x.std(ddof=1) / math.sqrt(3))
        # the cells' predictions use the combined estimate
        cell = res3.data["arms"][0]["cells"][0]
        assert cell["per_domain"][k]["predictions"]["response"]["mean"] == pytest.approx(
            0.25 * r3["unit"][k]["response"]["mean"])
    with pytest.raises(CommuteError, match="response.trajectories must be an integer >= 1"):
        StudyConfig.from_dict({**one.to_dict(), "response": {"trajectories": 0}})


def test_response_rows_noise_channel_in_the_study(tmp_path: Path) -> None:
    """response.noise: rows reaches the estimator (recorded, cached under its own key beside the plain
    estimate) and moves the response only: the curvature-free alignment, which has no noise channel, is the
    plain estimate's bit for bit (same fresh streams)."""
    plain = _micro_config(tmp_path)  # two trajectories: the parts are combined over them as the response is
    plain = StudyConfig.from_dict({**plain.to_dict(), "optimizers": ["sgd"], "locality": {"enabled": False},
                                   "response": {**plain.to_dict()["response"], "trajectories": 2}})
    rows = StudyConfig.from_dict({**plain.to_dict(), "response": {**plain.to_dict()["response"],
                                                                   "noise": "rows"}})
    cache = tmp_path / "cache"
    r0 = run_bilingual_study(config=plain, out_dir=tmp_path / "plain", cache_dir=cache, progress=False)
    r1 = run_bilingual_study(config=rows, out_dir=tmp_path / "rows", cache_dir=cache, progress=False)
    (a,), (b,) = r0.data["arms"][0]["responses"], r1.data["arms"][0]["responses"]
    assert a["noise"] is False and b["noise"] == "rows"
    for k in ("a", "b"):
        assert b["unit"][k]["alignment"] == a["unit"][k]["alignment"]
        assert b["unit"][k]["response"]["mean"] != a["unit"][k]["response"]["mean"]
    assert len(list(tmp_path.rglob("response_*.json"))) == 2  # both estimates kept, under their own keys
    assert "`response.noise: rows`" in r1.report_path.read_text()
    assert "response.noise" not in r0.report_path.read_text()
    assert a["adjoint"] == "fresh" and b["adjoint"] == "train"
    # response.adjoint: train (no noise term) reaches the estimator too, under a third key
    train = StudyConfig.from_dict({**plain.to_dict(), "response": {**plain.to_dict()["response"],
                                                                    "adjoint": "train"}})
    r2 = run_bilingual_study(config=train, out_dir=tmp_path / "train", cache_dir=cache, progress=False)
    (c,) = r2.data["arms"][0]["responses"]
    assert c["noise"] is False and c["adjoint"] == "train"
    for k in ("a", "b"):
        assert c["unit"][k]["alignment"] == a["unit"][k]["alignment"]
        assert c["unit"][k]["response"]["mean"] not in (a["unit"][k]["response"]["mean"],
                                                        b["unit"][k]["response"]["mean"])
    assert len(list(tmp_path.rglob("response_*.json"))) == 3
    assert "`response.adjoint: train`" in r2.report_path.read_text()
    # the rows channel's two parts: the rest of it is the training-rows adjoint's mean field, estimated on
    # the same batches (truth: the third run), and its noise term; only the channel records them
    for k in ("a", "b"):
        u = b["unit"][k]
        assert u["mean_field"]["mean"] == pytest.approx(c["unit"][k]["response"]["mean"], rel=1e-9, abs=1e-15)
        assert u["mean_field"]["mean"] + u["noise"]["mean"] == pytest.approx(u["response"]["mean"], rel=1e-9)
        assert abs(u["noise"]["mean"]) > 0 and "noise" not in a["unit"][k] and "noise" not in c["unit"][k]
    assert "The response's two parts" in r1.report_path.read_text()
    assert "two parts" not in r0.report_path.read_text() + r2.report_path.read_text()
    for bad, match in (({"adjoint": "realised"}, "response.adjoint must be"),
                       ({"adjoint": "train", "noise": "variance", "batches_per_step": 2}, "not with the")):
        with pytest.raises(CommuteError, match=match):
            StudyConfig.from_dict({**plain.to_dict(), "response": {**plain.to_dict()["response"], **bad}})


def test_response_cubic_averages_the_gauss_nodes_along_the_replicates_branches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """response.cubic: per Δw and trajectory r the estimate is made along replicate r's branches at base ±
    (Δw/√3)·δw(t) (truth: a second study whose Δws are those nodes ends its θ12 / θ21 branches of replicate
    r exactly where those estimates put L(θ_end)), and the cell's prediction is Δw times the mean over
    trajectories of the two nodes' mean, with stderr std/√R."""
    import commute.response_estimator as re_mod

    seen: list[tuple[list, object]] = []
    real = re_mod.ResponseEstimator.estimate

    def spy(self, train_batches, weights, *args, **kwargs):
        rep = real(self, train_batches, weights, *args, **kwargs)
        seen.append((list(weights), rep))
        return rep

    monkeypatch.setattr(re_mod.ResponseEstimator, "estimate", spy)
    plain = _micro_config(tmp_path)
    dws = [0.2, 0.4]
    cfg = StudyConfig.from_dict({**plain.to_dict(), "optimizers": ["sgd"], "locality": {"enabled": False},
                                 "variants": [{"name": "balanced", "base": {"a": 0.5, "b": 0.5},
                                               "delta_ws": dws}],
                                 "response": {"n_groups": 2, "batch_size": 2, "trajectories": 2,
                                              "cubic": True}})
    res = run_bilingual_study(config=cfg, out_dir=tmp_path / "cubic", cache_dir=tmp_path / "cache",
                              progress=False)
    (r,) = res.data["arms"][0]["responses"]
    assert r["cubic"] is True and "unit" not in r and set(r["by_delta_w"]) == {"0.2", "0.4"}
    nodes = [s * dw / math.sqrt(3) for dw in dws for s in (1, -1)]
    assert len(seen) == 2 * len(nodes)  # trajectory after trajectory, every node
    for i, (weights, _) in enumerate(seen):
        eps = nodes[i % len(nodes)]
        assert weights[0]["a"] == pytest.approx(0.5 + eps) and weights[-1]["a"] == pytest.approx(0.5 - eps)
    per = r["per_trajectory"]
    for dw in dws:
        a = dw / math.sqrt(3)
        for k in ("a", "b"):
            x = np.array([0.5 * (t[f"{a:.6g}"][k]["response"]["mean"] + t[f"{-a:.6g}"][k]["response"]["mean"])
                          for t in per])
            got = r["by_delta_w"][f"{dw:.6g}"][k]["response"]
            assert got["mean"] == pytest.approx(x.mean()) and got["n"] == 2
            assert got["stderr"] == pytest.approx(x.std(ddof=1) / math.sqrt(2))
            cell = next(c for c in res.data["arms"][0]["cells"] if c["delta_w"] == dw)
            assert cell["per_domain"][k]["predictions"]["response"]["mean"] == pytest.approx(dw * x.mean())
    # the node trajectories are the branches of Δw/√3, replicate by replicate
    at_nodes = StudyConfig.from_dict({**cfg.to_dict(), "response": {"enabled": False},
                                      "variants": [{"name": "balanced", "base": {"a": 0.5, "b": 0.5},
                                                    "delta_ws": [dw / math.sqrt(3) for dw in dws]}]})
    ref = run_bilingual_study(config=at_nodes, out_dir=tmp_path / "nodes", cache_dir=tmp_path / "cache",
                              progress=False)
    for j, c in enumerate(ref.data["arms"][0]["cells"]):
        for rr, rep_r in enumerate(c["replicates"]):
            for sign, branch in ((0, "L12"), (1, "L21")):
                _, rep = seen[rr * len(nodes) + 2 * j + sign]
                for k in ("a", "b"):
                    assert rep.loss(k).mean == pytest.approx(rep_r[branch][k], rel=1e-5), (j, rr, branch, k)
    # one trajectory: the stderr is over groups of the two nodes' mean, group by group (the nodes share
    # their fresh batches, so their estimates are correlated and their stderrs do not add in quadrature)
    seen.clear()
    single = StudyConfig.from_dict({**cfg.to_dict(),
                                    "response": {**cfg.to_dict()["response"], "trajectories": 1}})
    (r1,) = run_bilingual_study(config=single, out_dir=tmp_path / "one", cache_dir=tmp_path / "cache",
                                progress=False).data["arms"][0]["responses"]
    unit = {"a": [1.0, 1.0, -1.0, -1.0], "b": [-1.0, -1.0, 1.0, 1.0]}
    for j, dw in enumerate(dws):
        (_, plus), (_, minus) = seen[2 * j], seen[2 * j + 1]
        for k in ("a", "b"):
            g = 0.5 * (plus.predict_samples(k, unit) + minus.predict_samples(k, unit))
            got = r1["by_delta_w"][f"{dw:.6g}"][k]["response"]
            assert got["mean"] == pytest.approx(g.mean()) and got["n"] == 2
            assert got["stderr"] == pytest.approx(g.std(ddof=1) / math.sqrt(2))
    text = res.report_path.read_text()
    assert "through the Δw³ term (`response.cubic`" in text
    assert (tmp_path / "cubic" / "linearity.png").stat().st_size > 5000
    with pytest.raises(CommuteError, match="response.cubic must be true or false"):
        StudyConfig.from_dict({**plain.to_dict(), "response": {"cubic": "yes"}})


def test_predictors_target_the_observed_validation_loss(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The response's and the bracket's targets are the losses the observation measures: the study's fixed
    validation batches (``target_data``), not fresh draws from the training split; the response's reported
    L(theta_end) is then the base run's validation loss at t0 + 2T (the replay ends on that checkpoint)."""
    import commute.estimate as est_mod
    import commute.response_estimator as re_mod

    seen, seen_p = [], []
    real, real_p = re_mod.ResponseEstimator.estimate, est_mod.BracketEstimator.estimate

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("target_data"))
        rep = real(self, *args, **kwargs)
        seen.append(rep)
        return rep

    def spy_p(self, *args, **kwargs):
        seen_p.append(kwargs.get("target_data"))
        return real_p(self, *args, **kwargs)

    monkeypatch.setattr(re_mod.ResponseEstimator, "estimate", spy)
    monkeypatch.setattr(est_mod.BracketEstimator, "estimate", spy_p)
    cfg = _micro_config(tmp_path)
    cfg = StudyConfig.from_dict({**cfg.to_dict(), "optimizers": ["adam"], "locality": {"enabled": False}})
    res = run_bilingual_study(config=cfg, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
                              progress=False)
    from commute.data import load_domains

    doms = load_domains(cfg.domains, tokenizer=cfg.tokenizer, cache_dir=tmp_path / "cache")
    target_data, rep = seen
    assert len(seen_p) == len({*cfg.t0s, *cfg.extra_p_steps}) >= 1  # one bracket estimate per P step
    for k in ("a", "b"):
        val = doms[k].val_batches(cfg.n_val_batches, cfg.val_batch_size, cfg.seq_len)
        for td in (target_data, *seen_p):
            assert len(td[k]) == len(val)
            assert all(torch.equal(x, y) for x, y in zip(td[k], val, strict=True))
        base_end = next(c for c in res.data["arms"][0]["base_curve"] if c["step"] == 8)
        assert rep.loss(k).mean == pytest.approx(base_end["L"][k], rel=1e-4)
        assert rep.loss(k).stderr == 0  # an exact target: the same in every group
    assert all(r["target"] == "val" for r in res.data["arms"][0]["responses"])
    assert "L measured on the same validation batches as the observation" in res.report_path.read_text()


def test_study_cli_report_rerender(tmp_path: Path) -> None:
    from commute.cli import main

    data = _synthetic()
    (tmp_path / "results.json").write_text(json.dumps(data))
    assert main(["study", "report", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").is_file()
    assert main(["study", "report", str(tmp_path / "nowhere")]) != 0


def _with_runs(data: dict, seed: int) -> dict:
    """A synthetic study as the study writes it: its seed in the config, each arm's run directory."""
    data["config"] = {**data["config"], "seed": seed}
    for arm in data["arms"]:
        arm["run_dir"] = f"/x/runs/{arm['optimizer']}-{arm['variant']}-seed{seed}"
    return data


def test_pooled_scores_are_those_of_the_union_of_cells(tmp_path: Path) -> None:
    """Pooling two studies scores every predictor on the union of their significant cells (an independent
    numpy count) and keeps each study's own score in the pooled report."""
    from commute.cli import main
    from commute.scores import pool_studies

    a, b = _with_runs(_synthetic(1), 1), _with_runs(_synthetic(2), 2)
    pooled = pool_studies({"s1": a, "s2": b})
    sp = score_predictors(pooled)
    cells = [pd for data in (a, b) for arm in data["arms"] for c in arm["cells"]
             for pd in c["per_domain"].values() if pd["observed"]["significant"]]
    obs = np.array([pd["observed"]["mean"] for pd in cells])
    for name in ("response", "bracket"):
        pred = np.array([pd["predictions"][name]["mean"] for pd in cells])
        got = sp["groups"]["all"][name]
        assert got["n"] == len(cells) == score_predictors(a)["n_significant"] + score_predictors(b)[
            "n_significant"]
        assert got["sign_right"] == int((pred * obs > 0).sum())
        assert got["median_ratio"] == pytest.approx(np.median(obs / pred))
    with pytest.raises(ValueError, match="two arms are named"):  # summarise takes one study
        summarise(pooled)
    # the CLI: two study directories -> pooled.md with each study's own row, and the figure
    for name, data in (("s1", a), ("s2", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(data))
    out = tmp_path / "pooled"
    assert main(["study", "pool", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(out)]) == 0
    md = (out / "pooled.md").read_text()
    assert (out / "pooled_predictors.png").stat().st_size > 10_000
    resp = sp["groups"]["all"]["response"]
    assert f"{resp['sign_right']}/{resp['n']}" in md
    for name, data in (("s1", a), ("s2", b)):
        one = score_predictors(data)
        r = one["groups"]["all"]["response"]
        assert f"| {tmp_path / name} | `synthetic` | {data['config']['seed']} | {one['n_significant']}/" \
               f"{one['n_cells']} | {r['sign_right']}/{r['n']} · " in md


def test_pooling_refuses_what_would_count_a_cell_twice_or_mix_studies(tmp_path: Path) -> None:
    """Each refusal is one sentence naming the study, from the library and from the CLI (non-zero exit,
    nothing written)."""
    import copy

    from commute.cli import main
    from commute.scores import pool_studies

    a = _with_runs(_synthetic(1), 1)
    rerun = copy.deepcopy(a)  # the same runs re-estimated with other settings: same cells
    rerun["config"]["threads"] = 2
    other = _with_runs(_synthetic(4), 4)
    other["domains"] = ["en", "de"]
    for c in (c for arm in other["arms"] for c in arm["cells"]):
        c["per_domain"] = {"de" if k == "ru" else k: v for k, v in c["per_domain"].items()}
    old = _with_runs(_synthetic(5), 5)  # results from before replicates: no observation to score
    for c in (c for arm in old["arms"] for c in arm["cells"]):
        for pd in c["per_domain"].values():
            pd.pop("observed")
    stray = _with_runs(_synthetic(6), 6)  # a cell whose target is not one of the domains
    stray["arms"][0]["cells"][0]["per_domain"]["de"] = stray["arms"][0]["cells"][0]["per_domain"]["ru"]
    cases = {"rerun": (rerun, "share the cell"), "other": (other, "same domains"),
             "old": (old, "no replicated observations"), "stray": (stray, "not a cell of its domains"),
             "shape": ({"domains": 5, "arms": []}, "not a list of domain names")}
    for name, (data, msg) in cases.items():
        with pytest.raises(ValueError, match=msg):
            pool_studies({"a": a, name: data})
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(data))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(a))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    out = tmp_path / "out"
    for args in (["a"], ["a", "a"], ["a", "bad"], ["a", "nowhere"], *(["a", n] for n in cases)):
        assert main(["study", "pool", *(str(tmp_path / x) for x in args), "--out", str(out)]) != 0, args
    assert not out.exists()


def test_seed_option_replaces_the_study_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import commute.study as study
    from commute.cli import main

    seen = []
    monkeypatch.setattr(study, "_run_study", lambda cfg, *a, **k: seen.append(cfg))
    study.run_bilingual_study("tiny", tmp_path, seed=7, progress=False)
    assert seen[-1].seed == 7 and get_preset("tiny").seed == 0
    assert StudyConfig.from_yaml(tmp_path / "config.yaml").seed == 7  # re-running the config keeps it
    monkeypatch.setattr("commute.cli.study._print_summary", lambda data: None)
    monkeypatch.setattr(study, "_run_study", lambda cfg, out, *a, **k: seen.append(cfg) or type(
        "R", (), {"data": {}, "report_path": out / "report.md"})())
    assert main(["study", "run", "--seed", "3", "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    assert seen[-1].seed == 3
    assert main(["study", "run", "--seed", "-1", "--out", str(tmp_path / "neg")]) != 0
    with pytest.raises(CommuteError, match="seed must be >= 0"):
        get_preset("tiny", seed=-1)


def test_three_domain_micro_study(tmp_path: Path) -> None:
    """K = 3: interventions trade weight between the chosen pair and leave the third domain's tokens alone;
    every domain is a target of every predictor (recency has none for the third); the report renders."""
    cfg = _micro_config(tmp_path)
    (tmp_path / "c.txt").write_text("\n\n".join("".join(random.Random(i).choice("klmn op") for _ in range(90))
                                                for i in range(120)))
    cfg = StudyConfig.from_dict({
        **cfg.to_dict(), "domains": {**cfg.domains, "c": str(tmp_path / "c.txt")}, "pair": ["b", "c"],
        "optimizers": ["sgd"],
        "variants": [{"name": "balanced", "base": {"a": 0.5, "b": 0.25, "c": 0.25}, "delta_ws": [0.25]}],
        "locality": {**cfg.to_dict()["locality"], "optimizer": "sgd", "lr_times_lambda": 0.01,
                     "delta_w": 0.2},
    })
    res = run_bilingual_study(config=cfg, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
                              progress=False)
    data = res.data
    assert data["domains"] == ["a", "b", "c"] and data["pair"] == ["b", "c"]
    (arm,) = data["arms"]
    (cell,) = arm["cells"]
    assert set(cell["per_domain"]) == {"a", "b", "c"}
    rec = {k: cell["per_domain"][k]["predictions"]["recency"]["mean"] for k in "abc"}
    assert rec == {"a": None, "b": 1.0, "c": -1.0}
    # the tokens of the third domain are untouched by a b/c intervention
    assert cell["tokens"]["12"]["a"] == cell["tokens"]["base"]["a"] == cell["tokens"]["21"]["a"]
    for k in "abc":
        assert math.isfinite(cell["per_domain"][k]["predictions"]["response"]["mean"])
    loc = data["locality"]
    assert loc["pair"] == ["b", "c"] and set(loc["P"]) == {"a", "b", "c"}
    md = res.report_path.read_text()
    assert "interventions trade weight between 1 = `b` and 2 = `c`" in md


def test_observation_is_significant_only_beyond_the_t_quantile() -> None:
    """R = 3 replicates: t_0.975(2) = 4.303; a mean 4.2 stderrs away is not significant, 4.4 is."""
    from commute.study import _observed

    def reps(t: float) -> list[float]:  # three values with mean 1 and stderr 1/t
        d = math.sqrt(3) / t  # std of (1 - d, 1, 1 + d) is d, so stderr = d / sqrt(3)
        return [1 - d, 1.0, 1 + d]

    for t, sig in ((4.2, False), (4.4, True)):
        o = _observed(reps(t))
        assert o["n"] == 3 and o["mean"] == pytest.approx(1.0) and o["t"] == pytest.approx(t)
        assert o["significant"] is sig
    assert _observed([0.3])["significant"] is False and math.isnan(_observed([0.3])["stderr"])


def test_response_unit_delta_is_the_interventions_own_schedule_change() -> None:
    """The study's δw per unit Δw is θ12's (pair[0] boosted first) change of the schedule, from the
    tested Intervention / intervention_delta, for every domain of a three-domain config."""
    from commute.response import intervention_delta
    from commute.schedule import Intervention
    from commute.study import _unit_delta

    cfg = StudyConfig.from_yaml(REPO / "configs" / "study_tiny_3lang.yaml")
    base = cfg.variants[0].base
    d1, d2 = cfg.pair_names
    dw, t0 = 0.15, 250
    ref = intervention_delta(Intervention(base, d1, d2, dw, t0, cfg.T), 2 * cfg.T, start=t0)
    unit = _unit_delta(cfg)
    for k in cfg.domain_names:
        mine = torch.tensor(unit.get(k, [0.0] * 2 * cfg.T), dtype=torch.float64) * dw
        assert torch.allclose(mine, ref[k], atol=1e-12), k


def test_study_config_types_and_replay_fields_are_one_sentence() -> None:
    for bad, match in (({"pair": [["en"], "ru"]}, "pair must be a list of two domain names"),
                       ({"pair": {"en": 1, "ru": 2}}, "pair must be a list"),
                       ({"replicates": True}, "replicates must be an integer"),
                       ({"T": None}, "T must be an integer"),
                       ({"t0s": "x"}, "t0s must be a list"),
                       ({"lr": {"adam": "fast", "sgd": 0.1}}, "lr must map"),
                       ({"domains": ["en", "ru"]}, "domains must map"),
                       ({"train_overrides": {"grad_accum": 2}}, "response replay"),
                       ({"train_overrides": {"loss_weighting": "domain"}}, "response replay"),
                       ({"response": {"batches_per_step": 0}}, "batches_per_step must be an integer"),
                       ({"response": {"noise": "yes"}}, "response.noise must be false, 'rows' or 'variance'"),
                       ({"response": {"noise": 1}}, "response.noise must be false, 'rows' or 'variance'"),
                       ({"response": {"noise": "rows"}, "sampler_mode": "sample"},
                        "rows needs sampler_mode: exact"),
                       ({"response": {"noise": True}}, "noise needs response.batches_per_step >= 2")):
        with pytest.raises(CommuteError, match=match):
            StudyConfig.from_dict({**get_preset("tiny").to_dict(), **bad})


# --------------------------------------------------------------------------------------------------
# arms in parallel processes (jobs > 1)
# --------------------------------------------------------------------------------------------------
def _two_variant_config(root: Path, optimizer: str) -> StudyConfig:
    """The micro study for one optimiser with a slow first arm (two Δw, twice the branches) and a fast
    second one: in two processes the arms finish out of the config's order."""
    d = _micro_config(root).to_dict()
    even = {"a": 0.5, "b": 0.5}
    return StudyConfig.from_dict({**d, "optimizers": [optimizer],
                                  "locality": {**d["locality"], "optimizer": optimizer},
                                  "variants": [{"name": "balanced", "base": even, "delta_ws": [0.25, 0.125]},
                                               {"name": "fast", "base": even, "delta_ws": [0.25]}]})


def _results_without_timing(out: Path) -> str:
    """results.json with its wall-clock fields (the responses' ``seconds``) dropped and the run directories
    made relative to ``out``, as canonical JSON (NaN compares equal to NaN as text)."""
    def strip(x: object) -> object:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "seconds"}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x.replace(str(out), "<out>") if isinstance(x, str) else x

    return json.dumps(strip(json.loads((out / "results.json").read_text())), sort_keys=True)


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_study_jobs_gives_the_one_process_results_and_resumes(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Two arms in two processes: results.json equals the one-process run's (another directory) apart
    from timings, arms in the config's order although they finish out of it; a re-run trains nothing."""
    cfg = _two_variant_config(tmp_path, "adam")
    kw = dict(config=cfg, cache_dir=tmp_path / "cache", progress=False)
    run_bilingual_study(out_dir=tmp_path / "one", jobs=1, **kw)
    lines: list[str] = []
    with caplog.at_level("INFO", logger="commute"):  # stderr is no terminal: the bar logs its stages
        two = run_bilingual_study(out_dir=tmp_path / "two", jobs=2, log=lines.append,
                                  **{**kw, "progress": True})
    assert "study: 2 arms in 2 processes" in caplog.messages
    assert any(m.startswith("adam/fast: θ21 t0=4") for m in caplog.messages)  # a worker's stage, relayed
    assert [a["variant"] for a in two.data["arms"]] == ["balanced", "fast"]
    assert _results_without_timing(tmp_path / "two") == _results_without_timing(tmp_path / "one")
    # each arm's token checks come back from its worker, one line per (t0, Δw)
    assert sorted(s.split(" t0=")[0] for s in lines if "tokens per domain" in s) == [
        "adam/balanced", "adam/balanced", "adam/fast"]

    # a re-run in processes finds everything cached: no file under runs/ is written again
    runs = _files(tmp_path / "two" / "runs")
    again = run_bilingual_study(out_dir=tmp_path / "two", jobs=2, **kw)
    assert _files(tmp_path / "two" / "runs") == runs
    assert again.data["arms"] == json.loads(json.dumps(two.data["arms"]))


def test_study_jobs_failure_is_one_sentence_naming_the_arm(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A damaged checkpoint that one arm must read again stops the study with one sentence naming that arm;
    every cached file stays, and once the checkpoint is repaired a re-run redoes only what was missing."""
    from commute.cli import main

    cfg = _two_variant_config(tmp_path, "sgd")
    cfg.locality.enabled = False
    out = tmp_path / "out"
    run_bilingual_study(config=cfg, out_dir=out, cache_dir=tmp_path / "cache", progress=False)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(CommuteError, match=r"^jobs must be an integer >= 1 .*got"):
            run_bilingual_study(config=cfg, out_dir=out, jobs=bad)  # type: ignore[arg-type]

    (run,) = (out / "runs").glob("sgd-fast-*")
    weights = next(run.glob("base-*/checkpoints/step_00000004")) / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-8] + bytes(8))  # its sha256 no longer matches state.json
    (p4,) = run.glob("cache/P_00000004_*.json")
    p4.unlink()  # so the arm must load that checkpoint again
    before = _files(out / "runs")
    capsys.readouterr()
    code = main(["study", "run", "--config", str(out / "config.yaml"), "--out", str(out), "--cache-dir",
                 str(tmp_path / "cache"), "--quiet", "--jobs", "8"])  # capped at the two arms
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, err
    assert "sgd/fast t0=4 Δw=0.25 tokens per domain" in captured.out  # the failed arm's own lines, printed
    assert err.startswith("error: study arm sgd/fast failed, so the study stopped") and "step_00000004" in err
    assert "\n" not in err and "Traceback" not in err
    assert _files(out / "runs") == before  # nothing cached is lost (and nothing half-written is left)

    weights.write_bytes(good)  # repaired: a re-run (in one process, the same caches) redoes only the lost P
    before = _files(out / "runs")
    run_bilingual_study(config=cfg, out_dir=out, cache_dir=tmp_path / "cache", progress=False)
    after = _files(out / "runs")
    assert [k for k in after if after[k] != before.get(k)] == [str(p4.relative_to(out / "runs"))]


def test_replay_sentence_says_how_exactly_the_windows_were_reproduced() -> None:
    """The report's replay sentence: bit for bit, the worst relative error, or not measurable; none without
    measurements."""
    from commute.report import _replay_md

    def data(*errs: float) -> dict:
        return {"arms": [{"responses": [{"replay_rel_error": e} for e in errs]}]}

    assert "bit for bit (2 windows)" in _replay_md(data(0.0, 0.0))[1]
    assert "at most 3.0e-07 (2 windows)" in _replay_md(data(0.0, 3e-7))[1]
    assert "could not be measured" in _replay_md(data(1e-8, math.nan))[1]
    assert _replay_md({"arms": [{"responses": [{}]}]}) == []


def test_parts_table_names_windows_estimated_before_the_parts_were_kept() -> None:
    """A noise-channel window whose record has no parts (an older cache) is not dropped silently."""
    from commute.report import _parts_md

    est = {"mean": 0.1, "stderr": 0.01, "n": 2}
    new = {"step": 4, "noise": "rows", "unit": {"a": {"response": est, "alignment": est, "mean_field": est,
                                                       "noise": est}}}
    old = {"step": 8, "noise": "rows", "unit": {"a": {"response": est, "alignment": est}}}
    plain = {"step": 8, "noise": False, "unit": {"a": {"response": est, "alignment": est}}}
    arm = {"optimizer": "adam", "variant": "balanced"}
    md = "\n".join(_parts_md({"arms": [{**arm, "responses": [new, old]}]}))
    assert "| adam/balanced | 4 | `a` |" in md and "1 window(s) with a noise channel" in md
    assert "| adam/balanced | 8 |" not in md
    assert _parts_md({"arms": [{**arm, "responses": [plain]}]}) == []
    assert "1 window(s)" in "\n".join(_parts_md({"arms": [{**arm, "responses": [old]}]}))
