"""Tables and figures of the bilingual study (paper Tables 2–4, Figures 3–4) from its JSON-able results.

Everything here is a pure function of the ``data`` dict that :func:`commute.study.run_bilingual_study`
writes to ``results.json``, so a report can be re-rendered (``commute study report DIR``) without
re-training. Layout of ``data``::

    {"config": {...}, "domains": [d1, d2],
     "arms": [{"optimizer", "variant", "base", "lr", "T", "gamma_rule",
               "base_curve": [{"step", "L": {d: loss}}],
               "checkpoints": [{"step", "L", "P": {target: {"mean", "stderr", "n"}}, "gamma", "lambda_max",
                                "target": "val" (g_L on the validation batches; absent in older results)}],
               "responses": [{"step", "target": "val", "unit": {d: {"response", "alignment"}}, ...}
                             (with response.cubic "by_delta_w": {Δw: {d: {...}}} instead of "unit"; with a
                             noise channel also "mean_field" and "noise" beside "response")],
               "cells": [{"t0", "delta_w", "T", "L_t0", "L_base", "L12", "L21", "tokens", "tokens_match",
                          "locality", "per_domain": {d: {"EL12", "EL21", "antisym", "pred",
                                                         "pred_stderr", "z", "agree"}}}]}],
     "locality": {... commute.study.locality_sweep ...} | None,
     "summary": {...}}

P is P(L_1, L_2; L_i) in docs/design.md's sign (d1 boosted first); the paper's tables print
P_{2,1;i} = −P(L_1, L_2; L_i).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from commute.io import atomic_write, write_csv
from commute.scores import (
    FALLBACK_THRESHOLD,
    PREDICTORS,
    lambda_of,
    response_unit,
    score_predictors,
    summarise,
    t_threshold,
)

__all__ = ["render_report", "render_pooled", "write_csvs", "summary_table", "predictors_table",
           "plot_loss_planes", "plot_pred_vs_obs",
           "plot_predictors", "plot_linearity",
           "plot_locality", "summarise", "PAPER_TABLES"]

#: The paper's Tables 2 (balanced) and 3 (imbalanced): t, L1, L2, EL1^12, EL2^12, EL1^21, EL2^21,
#: P_{2,1;1}, P_{2,1;2} (GPT-2 124M, Adam, T = 4000, batch 512×1024).
PAPER_TABLES: dict[str, list[tuple[float, ...]]] = {
    "balanced": [
        (2000, 3.44, 3.04, -0.0191, 0.0286, 0.0352, -0.0289, 0.0195, -0.0289),
        (8000, 3.32, 2.92, -0.0201, 0.0179, 0.0129, -0.0211, -0.0020, -0.0074),
        (14000, 3.25, 2.86, -0.0065, 0.0169, 0.0168, -0.0151, 0.0014, -0.0048),
        (20000, 3.21, 2.81, -0.0038, 0.0049, 0.0131, -0.0079, 0.0049, -0.0072),
    ],
    "imbalanced": [
        (2000, 3.26, 3.70, -0.0006, 0.0352, 0.0037, -0.0394, 0.0225, -0.1454),
        (8000, 3.18, 3.48, -0.0010, 0.0216, 0.0023, -0.0297, 0.0053, -0.0076),
        (14000, 3.12, 3.33, -0.0012, 0.0174, 0.0009, -0.0233, 0.0027, -0.0048),
        (20000, 3.09, 3.22, -0.0017, 0.0144, 0.0007, -0.0199, 0.0020, -0.0317),
    ],
}


def _f(x: Any, fmt: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(float(x), fmt)


def _e(x: Any) -> str:
    return _f(x, ".2e")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table; a ``|`` inside a cell (e.g. ``|pred|``) is escaped so it does not split the cell."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows)])


def _arm_name(arm: Mapping[str, Any]) -> str:
    w = ", ".join(f"{v:g}" for v in arm["base"].values())
    return f"{arm['optimizer']} / {arm['variant']} ({w})"


# --------------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------------
def _lambda_op(arm: Mapping[str, Any]) -> str:
    """The operator of the arm's λ_max, short: ``H`` or ``D^-1/2 H D^-1/2``."""
    return lambda_of(arm).replace(" (Adam)", "")


def _summary(data: Mapping[str, Any]) -> dict[str, Any]:
    """The stored summary if it has the current keys, else a fresh :func:`summarise`."""
    s = data.get("summary")
    resp = (((s or {}).get("predictors") or {}).get("groups") or {}).get("all", {}).get("response", {})
    if not s or "predictions_right" not in (s.get("all") or {}) or "significance" not in s \
            or ("n_with_se" in resp and "spearman_ceiling" not in resp):
        s = summarise(data)
    return dict(s)


def _frac(c: Mapping[str, Any], k: str, n: str) -> str:
    return f"{c[k]}/{c[n]}"


def _target_clause(data: Mapping[str, Any], key: str, on_val: str, on_train: str) -> str:
    """What a predictor's target was measured on, as a clause: ``on_val`` when every entry of the arms'
    ``key`` list (``responses``, ``checkpoints``) says ``target: val``, else ``on_train`` (older results)."""
    xs = [x for a in data.get("arms", []) for x in a.get(key, [])]
    if not xs:
        return ""
    return on_val if all(x.get("target") == "val" for x in xs) else on_train


def _response_target(data: Mapping[str, Any]) -> str:
    """What the response's L was measured on (older results, without ``target``: training), and which
    sampling-noise channel it has."""
    where = _target_clause(
        data, "responses", ", L measured on the same validation batches as the observation",
        ", L from fresh training-split batches (not the validation loss the observation uses)")
    channels = {x.get("noise") for a in data.get("arms", []) for x in a.get("responses", [])}
    noise = (", with the gradient noise's own effect from the training batches' rows (`response.noise: rows`)"
             if channels == {"rows"} else
             ", with Adam's variance channel in some arms" if channels & {True, "variance"} else
             ", with the rows noise channel in some arms" if "rows" in channels else "")
    adjoints = {x.get("adjoint") for a in data.get("arms", []) for x in a.get("responses", [])
                if x.get("noise") != "rows"}
    if "train" in adjoints:
        noise += (", the adjoint through the training rows' own Hessians (`response.adjoint: train`)"
                  if adjoints == {"train"} else ", the adjoint through the training rows in some arms")
    cubic = {bool(x.get("cubic")) for a in data.get("arms", []) for x in a.get("responses", [])}
    if True in cubic:
        noise += (", through the Δw³ term (`response.cubic`: per Δw the mean of the estimates along the "
                  "branches at base ± (Δw/√3)·δw(t))" if cubic == {True} else
                  ", through the Δw³ term in some arms")
    return where + noise


def _cubic(data: Mapping[str, Any]) -> bool:
    """Whether every response was estimated through the Δw³ term (``response.cubic``)."""
    recs = [x for a in data.get("arms", []) for x in a.get("responses", [])]
    return bool(recs) and all(x.get("cubic") for x in recs)


def _where_estimated(data: Mapping[str, Any]) -> str:
    return ("branches at base ± (Δw/√3)·δw(t) of each Δw (`response.cubic`)" if _cubic(data) else
            "base window")


def _linearity_caption(data: Mapping[str, Any]) -> str:
    head = ("Is the observation first order in Δw? The observed antisymmetric excess per unit Δw (± stderr "
            "over the replicates) against Δw, and ")
    if _cubic(data):
        return head + ("the response's per-unit prediction through its Δw³ term (`response.cubic`: "
                       "dashed, band ± stderr, one estimate per Δw). The even terms cancel in the "
                       "antisymmetric part; a slope in Δw is the cubic term, which this prediction has, and "
                       "a gap at every Δw is an error of the response itself.")
    return head + ("the linear response's per-unit prediction (dashed, band ± stderr). A first-order "
                   "answer is flat and on its dashed line; a slope in Δw is the cubic term (the even terms "
                   "cancel in the antisymmetric part) that no first-order predictor has (`response.cubic` "
                   "adds it), and a flat line away from the dashed one is an error of the response itself.")


def _parts_md(data: Mapping[str, Any]) -> list[str]:
    """With a noise channel: the response per unit Δw split into its mean field and its noise term, per arm,
    t0 (and Δw, with ``response.cubic``) and target; nothing where no window recorded the parts."""
    recs = [(a, r) for a in data.get("arms", []) for r in a.get("responses", [])]
    by_dw = any(r.get("by_delta_w") for _, r in recs)
    rows, stale = [], 0
    for a, r in recs:
        found = [[f"{a['optimizer']}/{a['variant']}", str(r["step"]), *([dw] if by_dw else []), f"`{k}`",
                  _pm(u["response"]), _pm(u["mean_field"]), _pm(u["noise"])]
                 for dw, unit in (r.get("by_delta_w") or {"": r.get("unit") or {}}).items()
                 for k, u in unit.items() if "noise" in u and "mean_field" in u]
        stale += bool(r.get("noise")) and not found
        rows += found
    note = ([f"({stale} window(s) with a noise channel were estimated before its part was kept apart: "
             "delete their `response_*.json` cache files to see them here.)", ""] if stale else [])
    if not rows:
        return ["### The response's two parts", "", *note] if note else []
    cols = ["arm", "t0", *(["Δw"] if by_dw else []), "target", "response per unit Δw",
            "through the gradient's mean", "through its noise"]
    return ["### The response's two parts", "",
            "The noise channel splits the response into what the schedule does through the training "
            "gradient's mean (the mean field: with the rows channel the estimate of `response.adjoint: "
            "train`, with Adam's variance channel the default estimate) and through its noise (boosting a "
            "domain also puts more of its gradient noise into those steps). Per unit Δw, mean ± stderr; the "
            "two add up to the response. Where they are of opposite sign and similar size, the order matters "
            "less than the mean field alone would say.", "",
            _table(cols, rows), "", *note]


def _bracket_target(data: Mapping[str, Any]) -> str:
    """What the bracket's target gradient was measured on (older results: training draws)."""
    return _target_clause(data, "checkpoints", "; g_L on the same validation batches",
                          "; g_L from training-split batches")


def _edge_md(data: Mapping[str, Any], pair: Sequence[str], arm: Mapping[str, Any] | None = None) -> list[str]:
    """Where an intervention takes a domain's weight to 0 for T steps (Δw ≥ its base weight): the domain is
    removed, and the observation can be far from first order in Δw (README, "What limits the response").
    One sentence for one arm, or with ``arm=None`` a count over every arm's significant cells."""
    def removed(a: Mapping[str, Any], dw: float) -> list[str]:
        return [d for d in pair if float(a["base"].get(d, 0.0)) - float(dw) <= 1e-12]

    why = ("the domain is removed, and the observation can be far from first order in Δw (README, \"What "
           "limits the response\"): a first-order predictor's miss there is expected")
    if arm is not None:
        dws = sorted({float(c["delta_w"]) for c in arm.get("cells", []) if removed(arm, c["delta_w"])})
        if not dws:
            return []
        doms = sorted({d for dw in dws for d in removed(arm, dw)})
        return [f"Δw = {', '.join(f'{x:g}' for x in dws)} takes {', '.join(f'`{d}`' for d in doms)} to "
                f"weight 0 for T steps in one phase: {why}.", ""]
    sig = [(a, c) for a in data.get("arms", []) for c in a.get("cells", [])
           for pd in c.get("per_domain", {}).values() if (pd.get("observed") or {}).get("significant")]
    edge = sum(bool(removed(a, c["delta_w"])) for a, c in sig)
    if not edge:
        return []
    return [f"{edge} of the {len(sig)} significant cells take a domain's weight to 0 for T steps (Δw at "
            f"least its base weight): {why}.", ""]


def _replay_md(data: Mapping[str, Any]) -> list[str]:
    """One sentence: how closely each response window's replay reproduced the base run (when measured)."""
    errs = [float(r["replay_rel_error"]) for a in data.get("arms", []) for r in a.get("responses", [])
            if r.get("replay_rel_error") is not None]
    if not errs:
        return []
    if any(not math.isfinite(e) for e in errs):
        how = "to a relative parameter error that could not be measured in some windows (not finite)"
    elif max(errs) == 0:
        how = "bit for bit"
    else:
        how = f"to a relative parameter error of at most {max(errs):.1e}"
    return ["", f"The response windows are replays of the base run from its checkpoint at t0: they reproduce "
            f"the base checkpoint at t0 + 2T {how} ({len(errs)} windows)."]


def _threshold_text(s: Mapping[str, Any]) -> str:
    """One sentence: the significance threshold(s) used."""
    sig = s.get("significance", {})
    thr = sig.get("thresholds", [])
    if sig.get("rule") == "fixed":
        return f"significant means |P/se| > {', '.join(f'{x:g}' for x in thr)} (a fixed threshold)"
    parts = [f"t_0.975({d}) = {t_threshold(d):.3f}" for d in sig.get("dof", [])]
    txt = ("significant means |P/se| above the two-sided 95 % Student-t quantile for the estimate's degrees "
           "of freedom (P is a mean over G estimator groups, so P/se is t with G − 1 dof): "
           + (", ".join(parts) if parts else "no dof stored"))
    if sig.get("dof_missing"):
        txt += (f"; where a checkpoint stores no group count the threshold falls back to "
                f"|P/se| > {FALLBACK_THRESHOLD:g} (normal approximation, anti-conservative for few groups)")
    return txt


#: Column headers of the summary (the rich table and report.md share them).
SUMMARY_COLUMNS = ("predictions right (per t0×domain)", "recency baseline (per t0×domain)",
                   "sign agreement (cells)", "recency baseline (cells)",
                   "significant cells agreeing (95 % t)",
                   "t0 with all cells right", "median observed/predicted", "token totals equal")


def _summary_row(c: Mapping[str, Any], per_arm: bool) -> list[str]:
    row = [_frac(c, "predictions_right", "predictions"), _frac(c, "recency_predictions_right", "predictions"),
           _frac(c, "agree", "n"), _frac(c, "recency_observed", "n"),
           _frac(c, "agree_significant", "n_significant"), _frac(c, "checkpoints_right", "checkpoints")]
    if per_arm:
        row += [_f(c.get("median_obs_over_pred"), ".2g"), "yes" if c["tokens_match"] else "NO"]
    else:
        row += ["", ""]
    return row


def _summary_rows(s: Mapping[str, Any], bold: bool) -> list[list[str]]:
    rows = [[k, *_summary_row(c, True)] for k, c in s["arms"].items()]
    for k, c in s["optimizers"].items():
        rows.append([f"**{k} (all)**" if bold else f"{k} (all)", *_summary_row(c, False)])
    rows.append(["**everything**" if bold else "all", *_summary_row(s["all"], False)])
    return rows


def predictors_table(data: Mapping[str, Any], predictors: Mapping[str, Any] | None = None,
                     details: str = "report.md") -> Any:
    """The predictors' scores on significant cells (arms, optimisers, all) as a :class:`rich.table.Table`;
    ``predictors``: :func:`commute.scores.score_predictors`'s answer if already computed (pooled studies);
    ``details``: the file the caption points to for the per-target table."""
    from rich.table import Table

    pr = predictors if predictors is not None else _summary(data).get("predictors") or {}
    t = Table(title="Predictors vs the replicated observation (EL^12 − EL^21)/2, significant cells only")
    t.add_column("cells", no_wrap=True)
    for p in PREDICTORS:
        t.add_column(PREDICTOR_NAMES[p].replace(" (sign only)", "")
                     + ("\nsign right" if p == "recency" else "\nsign · ρ · obs/pred"), no_wrap=True)
    for g, by in pr.get("groups", {}).items():
        if ":" in g:
            continue
        row = [g]
        for p in PREDICTORS:
            sc = by[p]
            row.append(f"{sc['sign_right']}/{sc['n']}" + ("" if p == "recency" else
                       f" · {_f(sc['spearman'], '.2f')} · {_f(sc['median_ratio'], '.2g')}"))
        t.add_row(*row)
    from rich.console import Console
    from rich.measure import Measurement

    wide = Console(width=1000)  # never cropped in a narrow or non-terminal console: lines soft-wrap instead
    t.width = Measurement.get(wide, wide.options, t).maximum
    t.caption = (f"{pr.get('n_significant', 0)} of {pr.get('n_cells', 0)} cells (arm, t0, Δw, target) have a "
                 "significant observation (95 % t over the replicates); ρ = Spearman rank correlation, "
                 f"obs/pred = median observed/predicted. Per target domain and the verdict: {details}.")
    return t


def summary_table(data: Mapping[str, Any]) -> Any:
    """The predictors' scores, then the bracket's sign agreement (for the CLI and ``commute demo``)."""
    from rich.console import Group

    s = _summary(data)  # once (an older results.json is re-summarised here, not once per table)
    return Group(predictors_table(data, s.get("predictors") or {}), bracket_table({**data, "summary": s}))


def bracket_table(data: Mapping[str, Any]) -> Any:
    """The bracket's sign-agreement summary beside the recency baseline, as a :class:`rich.table.Table`."""
    from rich.table import Table

    s = _summary(data)
    from rich.console import Console
    from rich.measure import Measurement

    t = Table(title="Sign agreement: predicted γ²ΔwT²P vs observed (EL^12 − EL^21)/2")
    t.add_column("run", no_wrap=True)
    for c in SUMMARY_COLUMNS:  # headers broken into short lines and never cropped; the numbers stay whole
        h = textwrap.fill(c.replace("observed/predicted", "obs/pred").replace("95 % t", "95%\u00a0t"), 11,
                          break_long_words=False)
        t.add_column(h.replace("\u00a0", " "), no_wrap=True)
    for row in _summary_rows(s, bold=False):
        t.add_row(*row)
    # wider than an 80-column console when it must be (lines are soft-wrapped, never cropped)
    wide = Console(width=1000)
    t.width = Measurement.get(wide, wide.options, t).maximum
    t.caption = ("A prediction is one (arm, t0, domain), right when a strict majority of its Δw cells are "
                 "(ties count as not right); recency baseline: the domain boosted last ends better; "
                 f"{_threshold_text(s)}. Paper (Table 2, Adam): right sign at 3 of 4 checkpoints")
    if "locality_ratio_smallest_T" in s:
        t.caption += "; locality sweep at the smallest γT: observed/predicted = " + ", ".join(
            f"{k} {v:.3f}" for k, v in s["locality_ratio_smallest_T"].items())
    return t


# --------------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------------
def _pm(e: Mapping[str, Any] | None) -> str:
    """``mean ± stderr`` of a prediction or observation dict (– when absent)."""
    if not e or e.get("mean") is None:
        return "–"
    se = e.get("stderr")
    bad = se is None or (isinstance(se, float) and math.isnan(se))
    return _e(e["mean"]) + ("" if bad else f" ± {_e(se)}")


def _cells_table(arm: Mapping[str, Any]) -> str:
    """One row per (t0, Δw, target): the replicated observation beside every predictor."""
    header = ["t0", "Δw", "target L", "L(t0)", "EL^12", "EL^21", "observed (EL^12−EL^21)/2 ± se (R)",
              "response ± se", "bracket ± se", "alignment ± se", "recency", "γTλ_max", "tokens equal"]
    rows = []
    for c in sorted(arm["cells"], key=lambda c: (c["t0"], c["delta_w"])):
        for d, p in c["per_domain"].items():
            obs = p.get("observed") or {"mean": p["antisym"], "stderr": None, "n": 1, "significant": False}
            pr = p.get("predictions") or {"bracket": {"mean": p["pred"], "stderr": p.get("pred_stderr")}}
            rec = (pr.get("recency") or {}).get("mean")
            rows.append([
                str(c["t0"]), _f(c["delta_w"], "g"), d, _f(c["L_t0"][d], ".4f"), _e(p["EL12"]), _e(p["EL21"]),
                f"{_pm(obs)} ({obs['n']})" + (" **sig**" if obs.get("significant") else ""),
                _pm(pr.get("response")), _pm(pr.get("bracket")), _pm(pr.get("alignment")),
                "–" if rec is None else ("+" if rec > 0 else "−"),
                _f(c.get("locality"), ".2g"), "yes" if c.get("tokens_match") else "NO",
            ])
    return _table(header, rows)


def _p_table(arm: Mapping[str, Any], pair: Sequence[str]) -> str:
    """The bracket's P per target along the base run (with γ, γ_eff, λ_max)."""
    d1, d2 = pair
    header = ["step", "target L", "L", f"P({d1},{d2}; L) ± se", "z", "γ used", "γ_eff (Adam)",
              f"λ_max of {_lambda_op(arm)}"]
    rows = []
    for ck in sorted(arm["checkpoints"], key=lambda c: c["step"]):
        for d, P in ck["P"].items():
            z = P["mean"] / P["stderr"] if P["stderr"] > 0 else math.nan
            rows.append([str(ck["step"]), d, _f(ck["L"][d], ".4f"), f"{_e(P['mean'])} ± {_e(P['stderr'])}",
                         _f(z, ".2f"), _e(ck.get("gamma")), _e(ck.get("gamma_eff")),
                         _f(ck.get("lambda_max"), ".3g")])
    return _table(header, rows)


#: How each predictor is named in the report.
PREDICTOR_NAMES = {"response": "linear response Σδw·G", "bracket": "bracket γ²ΔwT²P",
                   "alignment": "first-order alignment (no curvature)", "recency": "recency rule (sign only)"}


def _predictors_md(s: Mapping[str, Any]) -> str:
    """The predictors' scores on significant cells, per group (long format)."""
    pr = s.get("predictors") or {}
    groups = pr.get("groups", {})
    header = ["cells", "predictor", "significant cells", "sign right", "sign if unbiased (5–95 %)",
              "Spearman ρ", "ρ if unbiased", "ρ if exact", "median obs/pred", "obs/pred if unbiased",
              "worst fold off", "where |pred| > 2 se: sign · ρ · obs/pred · worst", "obs within 2 se of pred"]
    rows = []
    for g, by in groups.items():
        for p, sc in by.items():
            if sc["n"] == 0 and p != "recency":
                continue
            conf = ("–" if not sc.get("n_with_se") else "0/0" if not sc["n_confident"] else
                    f"{sc['sign_right_confident']}/{sc['n_confident']} · "
                    f"{_f(sc['spearman_confident'], '.2f')} · {_f(sc['median_ratio_confident'], '.2g')} · "
                    f"{_f(sc['max_fold_confident'], '.2g')}")
            within = (f"{sc['within_2se']}/{sc['n_with_se']}" if sc.get("n_with_se") else "–")
            rows.append([g, PREDICTOR_NAMES.get(p, p), str(sc["n"]),
                         f"{sc['sign_right']}/{sc['n']}" if sc["n"] else "–",
                         _band(sc, "sign_right_unbiased", ".0f"),
                         _f(sc["spearman"], ".2f"), _band(sc, "spearman_unbiased", ".2f"),
                         _band(sc, "spearman_ceiling", ".2f"), _f(sc["median_ratio"], ".2g"),
                         _band(sc, "median_ratio_unbiased"), _f(sc["max_fold"], ".2g"), conf, within])
    return _table(header, rows)


def _band(sc: Mapping[str, Any], key: str, fmt: str = ".2g") -> str:
    """``[lo, hi]`` of a score's 5–95 % band (– when absent, as in results from older versions)."""
    lo, hi = sc.get(key + "_lo"), sc.get(key + "_hi")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "–"
    return f"[{_f(lo, fmt)}, {_f(hi, fmt)}]"


def _bias_clause(sc: Mapping[str, Any], key: str) -> str:
    """Whether a median observed/predicted is what noise alone would give: a clause comparing it with the
    band of an unbiased predictor with the same stderrs (empty when the band is absent)."""
    band, med = _band(sc, key + "_unbiased"), sc.get(key)
    if band == "–" or med is None or not math.isfinite(med):
        return ""
    lo, hi = sc[key + "_unbiased_lo"], sc[key + "_unbiased_hi"]
    verdict = ("within it: no evidence of a bias in size" if lo <= med <= hi else
               "below it, and negative: mostly the wrong sign" if med <= 0 < lo else
               "below it: predictions too large beyond their noise" if med < lo else
               "above it: predictions too small beyond their noise, or observations selected for being "
               "large")
    return (f" (an unbiased predictor with the stderrs it states would give {band} in 90 % of draws; "
            f"{verdict})")


def _rank_clause(sc: Mapping[str, Any]) -> str:
    """How a Spearman ρ compares with what noise allows: the band of an unbiased predictor with the stated
    stderrs and that of an exact one against these observations (empty when the bands are absent)."""
    band, ceiling, rho = (_band(sc, "spearman_unbiased", ".2f"), _band(sc, "spearman_ceiling", ".2f"),
                          sc.get("spearman"))
    if band == "–" or rho is None or not math.isfinite(rho):
        return ""
    # compared as shown (2 decimals)
    rho, lo, hi = (round(x, 2) for x in (rho, sc["spearman_unbiased_lo"], sc["spearman_unbiased_hi"]))
    verdict = ("below the first: it ranks worse than its stated noise explains" if rho < lo else
               "above the first: better than its stated noise (a stderr too large, cells selected on a "
               "significant observation, or luck)" if rho > hi else
               "within the first: consistent with the noise it states")
    return (f"; an unbiased predictor with the stderrs it states would get {band}, an exact one, against "
            f"observations this noisy, {ceiling}; {verdict}")


def _trust_md(s: Mapping[str, Any]) -> list[str]:
    """Plain words: which predictor to trust for the sign, the ranking and the size, from the scores."""
    pr = (s.get("predictors") or {}).get("groups", {}).get("all")
    if not pr:
        return ["No cell's observation is significant (replicate the windows more, see `replicates`): no "
                "predictor can be scored.", ""]
    n = pr["bracket"]["n"]

    def acc(p: str) -> float:
        return pr[p]["sign_right"] / pr[p]["n"] if pr.get(p) and pr[p]["n"] else math.nan

    avail = [p for p in ("response", "bracket", "alignment", "recency") if p in pr and pr[p]["n"]]
    top = max(acc(p) for p in avail)
    best = [p for p in avail if acc(p) == top]
    mag = [p for p in avail if p != "recency"]
    best_rank = max(mag, key=lambda p: pr[p]["spearman"] if math.isfinite(pr[p]["spearman"]) else -9) \
        if mag else None
    out = [f"On the {n} significant cells: the sign is best predicted by the "
           + (" and the ".join(f"**{PREDICTOR_NAMES[p]}** ({pr[p]['sign_right']}/{pr[p]['n']})" for p in best)
              + (" (a tie)" if len(best) > 1 else ""))]
    if best_rank:
        out[0] += (f"; the ranking of interventions by the **{PREDICTOR_NAMES[best_rank]}** "
                   f"(Spearman ρ = {_f(pr[best_rank]['spearman'], '.2f')}{_rank_clause(pr[best_rank])})")
    if "response" in pr and pr["response"]["n"]:
        r = pr["response"]
        out[0] += (f"; the size of a trade-off by the linear response only within its measured spread: "
                   f"median observed/predicted {_f(r['median_ratio'], '.2g')}"
                   f"{_bias_clause(r, 'median_ratio')}, worst cell off by {_f(r['max_fold'], '.2g')}×")
    if "response" in pr and pr["response"].get("n_with_se"):
        r = pr["response"]
        out[0] += (f". Does the response's stderr tell the truth? Where its prediction is itself beyond 2 "
                   f"stderr its sign is right in {r['sign_right_confident']}/{r['n_confident']} cells"
                   + (f" (there ρ = {_f(r['spearman_confident'], '.2f')}, median observed/predicted "
                      f"{_f(r['median_ratio_confident'], '.2g')}"
                      + (_bias_clause(r, "median_ratio_confident").replace(" (", ", ", 1).rstrip(")")
                         if r["n_confident"] >= 3 else "")  # a band for one or two cells says little
                      + f", worst cell off by {_f(r['max_fold_confident'], '.2g')}×)"
                      if r["n_confident"] else "")
                   + ", and "
                   f"the observation lies within 2 combined stderr of it in "
                   f"{r['within_2se']}/{r['n_with_se']} (compare the predictors with each other, not with "
                   f"95 %: both stderrs have few degrees of freedom, R − 1 and G − 1, and keeping only "
                   f"significant observations pushes them away from zero)")
    out[0] += (". The recency rule has no magnitude; when every significant cell follows it, the sign alone "
               "does not separate the predictors, and the rank correlation and magnitudes do.")
    return [out[0], ""]


def _paper_table(variant: str) -> str:
    header = ["t", "L1", "L2", "EL1^12", "EL2^12", "EL1^21", "EL2^21", "P_{2,1;1}", "P_{2,1;2}",
              "antisym 1", "antisym 2", "sign ok (1, 2)"]
    rows = []
    for r in PAPER_TABLES.get(variant, []):
        t, l1, l2, a, b, c, d, p1, p2 = r
        an1, an2 = (a - c) / 2, (b - d) / 2
        # the paper's P_{2,1;i} = -P(L1, L2; L_i) predicts -EL^12, i.e. sign(antisym_i) = -sign(P_{2,1;i})
        ok1, ok2 = an1 * -p1 > 0, an2 * -p2 > 0
        rows.append([f"{t:g}", f"{l1:g}", f"{l2:g}", f"{a:g}", f"{b:g}", f"{c:g}", f"{d:g}", f"{p1:g}",
                     f"{p2:g}", f"{an1:.4f}", f"{an2:.4f}", f"{'✓' if ok1 else '✗'} {'✓' if ok2 else '✗'}"])
    return _table(header, rows)


def _locality_md(loc: Mapping[str, Any]) -> str:
    names = loc["domains"]
    d1, d2 = loc.get("pair") or names[:2]
    resp = any("ratio_response" in r[names[0]] for r in loc["rows"])
    header = ["T", "γ", "γTλ_max"]
    for d in names:
        header += [f"antisym {d}", f"bracket ratio {d}"] + ([f"response ratio {d}"] if resp else [])
    rows = []
    for r in loc["rows"]:
        row = [str(r["T"]), _e(r.get("lr", loc["lr"])), _f(r["locality"], ".3g")]
        for d in names:
            row += [_e(r[d]["antisym"]), _f(r[d]["ratio"], ".4f")]
            if resp:
                row += [_f(r[d].get("ratio_response"), ".4f")]
        rows.append(row)
    src = loc.get("source", "a base checkpoint")
    return (
        f"Deterministic gradient descent in float64 from {src} on fixed batches "
        f"({loc.get('batch_size', '?')} sequences per domain), λ_max = {_f(loc['lambda_max'], '.4g')}, "
        f"Δw = {loc['delta_w']:g} between {d1} and {d2}, base {loc['base']}; exact P: "
        + ", ".join(f"{d} {_e(v)}" for d, v in loc["P"].items())
        + ". ratio = observed (EL^12 − EL^21)/2 over a prediction: the bracket γ²ΔwT²P (→ 1 as γTλ_max → 0 "
        "only)" + (" and the exact linear response of the GD map, Σδw·G (→ 1 as Δw → 0 at any γTλ_max)"
                   if resp else "") + ".\n\n" + _table(header, rows)
    )


def render_report(data: Mapping[str, Any], out_dir: str | Path, figures: bool = True) -> Path:
    """Write ``report.md`` (and, with ``figures``, the PNGs and CSVs) into ``out_dir``; return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d1, d2 = data.get("pair") or data["domains"][:2]
    summary = _summary(data)
    cfg = data.get("config", {})
    figs: dict[str, str] = {}
    if figures:
        figs["planes"] = plot_loss_planes(data, out / "loss_planes.png").name
        figs["pred"] = plot_pred_vs_obs(data, out / "pred_vs_obs.png").name
        figs["predictors"] = plot_predictors(data, out / "predictors.png").name
        lin = plot_linearity(data, out / "linearity.png")
        if lin is not None:
            figs["linearity"] = lin.name
        if data.get("locality"):
            figs["locality"] = plot_locality(data["locality"], out / "locality.png").name
    write_csvs(data, out)

    R = cfg.get("replicates", 1)
    md: list[str] = [f"# Order study (preset `{cfg.get('preset', '?')}`)", ""]
    md += [
        f"Domains {', '.join(f'`{d}`' for d in data['domains'])}; interventions trade weight between "
        f"1 = `{d1}` and 2 = `{d2}`; every domain's loss is a target. Model `{cfg.get('model_preset')}` "
        f"{cfg.get('model_overrides', {})}, batch {cfg.get('batch_size')}×{cfg.get('seq_len')} tokens, "
        f"T = {cfg.get('T')} steps, t0 ∈ {cfg.get('t0s')}, lr {cfg.get('lr')}, "
        f"sampler `{cfg.get('sampler_mode')}`, seed {cfg.get('seed')}; each θ12/θ21 pair under {R} sampler "
        "seed(s) for its window (common random numbers inside a replicate).",
        "",
        "## Which predictor to trust",
        "",
        "Observed: the antisymmetric excess (EL^12 − EL^21)/2, mean ± stderr over the replicates; a cell "
        "(arm, t0, Δw, target) counts only where that mean is significant (two-sided 95 % Student-t, R − 1 "
        "dof). Predictors, each with its stderr: the schedule's **linear response** Σ_t δw(t)·G(t) "
        f"(docs/design.md §1b; G estimated along the replayed {_where_estimated(data)}, the mean over the "
        f"replays with `response.trajectories` > 1{_response_target(data)}), the **bracket** γ²ΔwT²P "
        f"(second order in γT{_bracket_target(data)}), the **first-order alignment** (the response without "
        "curvature: the target gradient at the window's end against each step's domain gradients) and the "
        "**recency rule** (the domain boosted last ends better; sign only).",
        *_replay_md(data),
        "",
        *_trust_md(summary),
        *_edge_md(data, (d1, d2)),
        _predictors_md(summary),
        "",
        *([f"![predictors]({figs['predictors']})", "",
           "Each predictor against the replicated observation (both with ± stderr bars; filled: significant "
           "observation). Both axes share one symmetric-log scale per panel; the dashed line is "
           "observed = predicted.", ""] if figures else []),
        *([f"![linearity]({figs['linearity']})", "", _linearity_caption(data), ""]
          if "linearity" in figs else []),
        *_parts_md(data),
        "## The bracket in detail",
        "",
        "EL_i^12 = L_i(θ12) − L_i(θ_base(t0+2T)) on fixed validation batches; θ12 boosts domain 1 first "
        "(paper eq. 9/10). *Predicted* EL_i^12 = γ²ΔwT²·P(L_1, L_2; L_i) (docs/design.md §1), compared in "
        "sign "
        "with the antisymmetric part (EL^12 − EL^21)/2, which removes the discrete-step term even in Δw. "
        f"A ✓* marks a significant prediction: {_threshold_text(summary)}. "
        "γTλ_max says how local the prediction is (λ_max is of H for SGD and of Adam's preconditioned "
        "D^-1/2 H D^-1/2 for Adam): below 0.01 the predicted magnitude should hold within a few %, below 0.1 "
        "within ~20 %, beyond that trust signs at most.",
        "",
    ]
    md += [_table(["run", *SUMMARY_COLUMNS], _summary_rows(summary, bold=True)), ""]
    a = summary["all"]
    verdict = ("P beats" if a["predictions_right"] > a["recency_predictions_right"] else
               "P does no better than" if a["predictions_right"] == a["recency_predictions_right"] else
               "P does worse than")
    ties = a["predictions_tied"] + a["recency_predictions_tied"]
    md += [
        "All Δw at one (arm, t0, domain) share one P estimate and one base trajectory, so the cells are not "
        f"independent evidence: the {a['n']} cells are {a['predictions']} distinct predictions. "
        "**Predictions right (per t0×domain)** counts a prediction as right when a strict majority of its Δw "
        "cells have the predicted sign; a tie (possible with an even number of Δw) counts as not right"
        + (f" ({a['predictions_tied']} P ties, {a['recency_predictions_tied']} recency ties here)." if ties
           else " (no ties here).")
        + " The **recency baseline** is the naive predictor \"the domain boosted last ends better\" "
        "(θ12 boosts domain 1 first, so it predicts antisym EL_1 > 0 and antisym EL_2 < 0), scored on "
        "the same cells with the same rule.",
        "",
        f"**P was right for {a['predictions_right']}/{a['predictions']} predictions "
        f"({a['agree']}/{a['n']} cells), the recency baseline for {a['recency_predictions_right']}/"
        f"{a['predictions']} ({a['recency_observed']}/{a['n']} cells): {verdict} the naive recency "
        "baseline.**",
        "",
        f"Significant cells use the 95 % t threshold above; with the former fixed |z| > 2 it was "
        f"{a['agree_significant_z2']}/{a['n_significant_z2']}. The paper (Table 2, Adam, GPT-2 124M) reports "
        "the right sign at 3 of 4 checkpoints (its criterion is the \"t0 with all cells right\" column). "
        "A cell is one (t0, Δw, domain).",
        "",
    ]
    md += ["### Reading", ""]
    for key, c in summary["arms"].items():
        lm = c["locality_max"]
        how = ("local: magnitude within a few %" if lm < 0.01 else
               "near-local: magnitude within ~20 %" if lm < 0.1 else
               "far outside the local regime: trust signs at most")
        md.append(
            f"- **{key}**: γTλ_max = {_f(c['locality_min'], '.2g')}–{_f(lm, '.2g')} "
            f"(λ_max of {str(c.get('lambda_of', '?')).replace(' (Adam)', '')}; {how}); "
            f"P's sign was right for {c['predictions_right']}/{c['predictions']} predictions, the recency "
            f"baseline for {c['recency_predictions_right']}/{c['predictions']}; "
            f"the domain boosted last ended better in {c['recency_observed']}/{c['n']} cells, "
            f"and P predicted that in {c['recency_predicted']}/{c['n']}."
        )
    md.append("")
    if "locality_ratio_smallest_T" in summary:
        r = summary["locality_ratio_smallest_T"]
        md += ["Locality sweep, smallest T: observed/predicted = "
               + ", ".join(f"{k} {_f(v, '.3f')}" for k, v in r.items()) + " (→ 1 is the theory).", ""]
    if data.get("notes"):
        md += ["### Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]

    for arm in data["arms"]:
        md += [f"## {_arm_name(arm)}", "", f"γ: {arm.get('gamma_rule', '')}", ""]
        md += ["### Interventions (paper Tables 2–3 columns, plus ours)", "", _cells_table(arm), "",
               *_edge_md(data, (d1, d2), arm)]
        md += ["### P along the base run (Table 4 analogue)", "", _p_table(arm, (d1, d2)), ""]
    if figures:
        md += ["## Figures", "",
               f"![loss planes]({figs['planes']})", "",
               "Loss planes (Figs 3–4 analogue): blue, the base trajectory; coloured, θ12/θ21 for every Δw, "
               "grouped by token budget (same marker = same t0, same tokens per domain).", "",
               f"![predicted vs observed]({figs['pred']})", "",
               "Predicted EL^12 (± stderr) against the observed antisymmetric excess (each axis on its own "
               "symmetric-log scale); in the shaded quadrants the predicted sign is right.", ""]
    if data.get("locality"):
        md += ["## Locality sweep: where the local theory holds", "", _locality_md(data["locality"]), ""]
        if figures:
            md += [f"![locality]({figs['locality']})", ""]
    md += ["## The paper's tables, for comparison", "",
           "Paper signs: P_{2,1;i} = −P(L_1, L_2; L_i) predicts EL_i^21 (and −EL_i^12).", "",
           "### Table 2 (balanced 0.5/0.5)", "", _paper_table("balanced"), "",
           "### Table 3 (imbalanced 0.9/0.1)", "", _paper_table("imbalanced"), "",
           "Files: `results.json` (every number), `cells.csv`, `checkpoints.csv`, `locality.csv`, "
           "`config.yaml` (re-run with `commute study bilingual --config config.yaml`).", ""]
    return atomic_write(out / "report.md", "\n".join(md))


def render_pooled(pooled: Mapping[str, Any], out_dir: str | Path, figures: bool = True,
                  predictors: Mapping[str, Any] | None = None) -> Path:
    """Write ``pooled.md`` (and ``pooled_predictors.png``) for :func:`commute.scores.pool_studies`'s
    answer: the predictors scored over the significant cells of all the studies, and each study's own score
    beside it (how much the verdict moves from one seed to another); return its path. ``predictors``:
    :func:`commute.scores.score_predictors` of ``pooled`` if the caller already has it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = {"predictors": predictors if predictors is not None else score_predictors(pooled)}
    rows = []
    for name in pooled["studies"]:
        cfg = pooled["configs"].get(name, {})
        one = score_predictors({"arms": [a for a in pooled["arms"] if a["study"] == name]})
        by = one["groups"].get("all", {})

        def cell(p: str, by: Mapping[str, Any] = by) -> str:
            sc = by.get(p)
            if not sc or not sc["n"]:
                return "–"
            return f"{sc['sign_right']}/{sc['n']}" + ("" if p == "recency" else
                   f" · {_f(sc['spearman'], '.2f')} · {_f(sc['median_ratio'], '.2g')}")

        rows.append([name, f"`{cfg.get('preset', '?')}`", str(cfg.get("seed", "?")),
                     f"{one['n_significant']}/{one['n_cells']}", *(cell(p) for p in PREDICTORS)])
    md = [f"# {len(pooled['studies'])} order studies pooled", "",
          f"Domains {', '.join(f'`{d}`' for d in pooled['domains'])}; interventions between "
          f"`{pooled['pair'][0]}` and `{pooled['pair'][1]}`. Every cell keeps its own observation (mean ± "
          "stderr over its replicates, significant at the two-sided 95 % t level or not); pooling adds "
          "cells, it does not re-test them. Each study alone (all its significant cells; sign right · "
          "Spearman ρ · median observed/predicted):", "",
          _table(["study", "preset", "seed", "significant cells",
                  *(PREDICTOR_NAMES[p].replace(" (sign only)", "") for p in PREDICTORS)], rows), "",
          "## Pooled", "", *_trust_md(s), _predictors_md(s), ""]
    if figures:
        name = plot_predictors(pooled, out / "pooled_predictors.png").name  # never a study's own figure
        md += [f"![predictors]({name})", "",
               "Each predictor against the replicated observation over all the studies (± stderr bars; "
               "filled: significant observation), one symmetric-log scale per panel; the dashed line is "
               "observed = predicted.", ""]
    return atomic_write(out / "pooled.md", "\n".join(md))


# --------------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------------
_CELLS_CSV = ["optimizer", "variant", "t0", "T", "delta_w", "domain", "L_t0", "L_base", "L12", "L21", "EL12",
              "EL21", "antisym", "pred", "pred_stderr", "z", "agree", "locality", "tokens_match"]
_CKPT_CSV = ["optimizer", "variant", "step", "target", "L", "P_mean", "P_stderr", "P_n", "gamma",
             "lambda_max"]
_LOC_CSV = ["T", "gammaT", "locality", "domain", "EL12", "EL21", "antisym", "pred", "ratio"]


def write_csvs(data: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """``cells.csv`` (one row per arm, t0, Δw, domain), ``checkpoints.csv`` and ``locality.csv``."""
    out = Path(out_dir)
    cells = [[arm["optimizer"], arm["variant"], c["t0"], c["T"], c["delta_w"], d, c["L_t0"][d],
              c["L_base"][d], c["L12"][d], c["L21"][d], p["EL12"], p["EL21"], p["antisym"], p["pred"],
              p["pred_stderr"], p.get("z"), p["agree"], c.get("locality"), c.get("tokens_match")]
             for arm in data["arms"] for c in arm["cells"] for d, p in c["per_domain"].items()]
    cks = [[arm["optimizer"], arm["variant"], ck["step"], d, ck["L"].get(d), p["mean"], p["stderr"],
            p.get("n"), ck.get("gamma"), ck.get("lambda_max")]
           for arm in data["arms"] for ck in arm["checkpoints"] for d, p in ck["P"].items()]
    paths = [write_csv(out / "cells.csv", _CELLS_CSV, cells),
             write_csv(out / "checkpoints.csv", _CKPT_CSV, cks)]
    loc = data.get("locality")
    if loc:
        rows = [[r["T"], r["gammaT"], r["locality"], d, *(r[d][k] for k in _LOC_CSV[4:])]
                for r in loc["rows"] for d in loc["domains"]]
        paths.append(write_csv(out / "locality.csv", _LOC_CSV, rows))
    return paths


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | Path, rect: tuple[float, ...] | None = None) -> Path:
    """Lay out (within ``rect`` of the figure, leaving room for a figure legend), write the PNG, free it."""
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_loss_planes(data: Mapping[str, Any], path: str | Path) -> Path:
    """Figures 3–4 analogue: per arm, the (L1, L2) plane with the base trajectory and the branches.

    Colour: θ12 (red) / θ21 (orange) / base at t0 + 2T (blue, black edge); marker shape: t0; marker size:
    Δw (larger = stronger intervention). One shared legend under the panels, so no data are hidden.
    """
    from matplotlib.lines import Line2D

    plt = _plt()
    arms = data["arms"]
    d1, d2 = data.get("pair") or data["domains"][:2]
    fig, axes = plt.subplots(1, len(arms), figsize=(4.6 * len(arms), 4.9), squeeze=False)
    markers = ["o", "P", "s", "*", "D", "^", "v", "X"]
    t0s_all = sorted({c["t0"] for arm in arms for c in arm["cells"]})
    dws_all = sorted({c["delta_w"] for arm in arms for c in arm["cells"]})
    dw_max = max(dws_all, default=1.0)

    def size(dw: float) -> float:
        return 12 + 60 * dw / dw_max

    for ax, arm in zip(axes[0], arms, strict=True):
        curve = sorted(arm["base_curve"], key=lambda r: r["step"])
        ax.plot([r["L"][d1] for r in curve], [r["L"][d2] for r in curve], "-o", color="tab:blue", ms=3, lw=1)
        for t0 in sorted({c["t0"] for c in arm["cells"]}):
            cs = sorted((c for c in arm["cells"] if c["t0"] == t0), key=lambda c: c["delta_w"])
            m = markers[t0s_all.index(t0) % len(markers)]
            base = cs[0]["L_base"]
            xs = [c["L12"][d1] for c in cs][::-1] + [base[d1]] + [c["L21"][d1] for c in cs]
            ys = [c["L12"][d2] for c in cs][::-1] + [base[d2]] + [c["L21"][d2] for c in cs]
            ax.plot(xs, ys, "-", color="tab:red", lw=0.8, alpha=0.6)
            sz = [size(c["delta_w"]) for c in cs]
            ax.scatter([c["L12"][d1] for c in cs], [c["L12"][d2] for c in cs], marker=m, color="tab:red",
                       s=sz, zorder=3)
            ax.scatter([c["L21"][d1] for c in cs], [c["L21"][d2] for c in cs], marker=m, color="tab:orange",
                       s=sz, zorder=3)
            ax.scatter([base[d1]], [base[d2]], marker=m, color="tab:blue", edgecolor="k", s=40, zorder=4)
        ax.set_xlabel(f"L1 = validation NLL, {d1}")
        ax.set_ylabel(f"L2 = validation NLL, {d2}")
        ax.set_title(_arm_name(arm), fontsize=9)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color="tab:blue", marker="o", ms=3, lw=1, label="base trajectory"),
               Line2D([], [], color="tab:red", marker="o", ls="", label=f"θ12 ({d1} boosted first)"),
               Line2D([], [], color="tab:orange", marker="o", ls="", label=f"θ21 ({d2} boosted first)"),
               Line2D([], [], color="tab:blue", marker="o", mec="k", ls="", label="base at t0 + 2T")]
    handles += [Line2D([], [], color="0.4", marker=markers[n % len(markers)], ls="", label=f"t0 = {t0}")
                for n, t0 in enumerate(t0s_all)]
    handles += [Line2D([], [], color="0.4", marker="o", ls="", ms=math.sqrt(size(dw)), label=f"Δw = {dw:g}")
                for dw in dws_all]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 12), fontsize=8, frameon=False)
    return _save(plt, fig, path, rect=(0, 0.08, 1, 1))


def _symlog(ax: Any, axis: str, lim: float, linthresh: float) -> None:
    """A symmetric-log axis on [−lim, lim] with ticks 0 and ±10^k only, at most 3 decades per side, none
    inside the linear band around 0 (so no label collides with "0")."""
    lo = math.ceil(math.log10(linthresh) + 1e-9)
    hi = math.floor(math.log10(lim))
    ks = list(range(max(lo, hi - 6), hi + 1)) or [hi]
    ks = ks[::-1][:: max(1, math.ceil(len(ks) / 3))][::-1]
    ticks = [-(10.0**k) for k in ks[::-1]] + [0.0] + [10.0**k for k in ks]
    labels = [f"−1e{k}" for k in ks[::-1]] + ["0"] + [f"1e{k}" for k in ks]
    getattr(ax, f"set_{axis}scale")("symlog", linthresh=linthresh)
    getattr(ax, f"set_{axis}lim")(-lim, lim)
    getattr(ax, f"set_{axis}ticks")(ticks, labels)
    getattr(ax, f"{axis}axis").set_minor_locator(__import__("matplotlib.ticker").ticker.NullLocator())


def plot_pred_vs_obs(data: Mapping[str, Any], path: str | Path) -> Path:
    """Predicted EL^12 (± stderr) vs the observed antisymmetric excess, one panel per optimiser.

    Both axes are symmetric-log with their own scale (at these horizons the magnitudes can differ by
    orders of magnitude); the shaded quadrants are where the predicted sign is right.
    """
    plt = _plt()
    opts = list(dict.fromkeys(a["optimizer"] for a in data["arms"]))
    fig, axes = plt.subplots(1, len(opts), figsize=(5 * len(opts), 5.0), squeeze=False)
    colors = {"balanced": "tab:blue", "imbalanced": "tab:green"}

    def span(vals: list[float]) -> tuple[float, float]:
        v = [abs(x) for x in vals if x == x and x != 0]
        if not v:
            return 1.0, 1e-3
        hi = max(v) * 1.5
        return hi, max(min(v), hi * 1e-4)

    for ax, opt in zip(axes[0], opts, strict=True):
        xs_all: list[float] = []
        ys_all: list[float] = []
        for arm in data["arms"]:
            if arm["optimizer"] != opt:
                continue
            for d, mk in zip(data["domains"], ("o", "s", "^", "v", "D", "P"), strict=False):
                xs = [c["per_domain"][d]["pred"] for c in arm["cells"]]
                es = [c["per_domain"][d]["pred_stderr"] for c in arm["cells"]]
                ys = [c["per_domain"][d]["antisym"] for c in arm["cells"]]
                xs_all += xs
                ys_all += ys
                ax.errorbar(xs, ys, xerr=es, fmt=mk, ms=4, color=colors.get(arm["variant"], "k"), alpha=0.8,
                            label=f"{arm['variant']}, L={d}", elinewidth=0.8)
        xlim, xlt = span(xs_all)
        ylim, ylt = span(ys_all)
        _symlog(ax, "x", xlim, xlt)
        _symlog(ax, "y", ylim, ylt)
        ax.fill_between([0, xlim], 0, ylim, color="tab:green", alpha=0.08, label="sign right")
        ax.fill_between([-xlim, 0], -ylim, 0, color="tab:green", alpha=0.08)
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
        ax.set_xlabel("predicted EL^12 = γ²ΔwT²P (± stderr)")
        ax.set_ylabel("observed (EL^12 − EL^21)/2")
        ax.set_title(f"{opt}: prediction vs observation", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    return _save(plt, fig, path, rect=(0, 0.07, 1, 1))


def plot_predictors(data: Mapping[str, Any], path: str | Path) -> Path:
    """Every predictor with magnitudes (response, bracket, alignment; columns) against the replicated
    observation, one row per optimiser: x = predicted ± stderr, y = observed mean ± stderr; filled markers
    are significant observations; one symmetric-log scale for both axes of a panel, and the diagonal."""
    plt = _plt()
    opts = list(dict.fromkeys(a["optimizer"] for a in data["arms"]))
    preds = [p for p in ("response", "bracket", "alignment")
             if any(p in (pd.get("predictions") or {}) for a in data["arms"] for c in a["cells"]
                    for pd in c["per_domain"].values())] or ["bracket"]
    fig, axes = plt.subplots(len(opts), len(preds), figsize=(4.4 * len(preds), 4.0 * len(opts) + 0.5),
                             squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"]
    names = list(data["domains"])
    for row, opt in zip(axes, opts, strict=True):
        for ax, p in zip(row, preds, strict=True):
            vals: list[float] = []
            for arm in (a for a in data["arms"] if a["optimizer"] == opt):
                mk = "o" if arm["variant"] == "balanced" else "s"
                for c in arm["cells"]:
                    for d, pd in c["per_domain"].items():
                        e = (pd.get("predictions") or {}).get(p) or (
                            {"mean": pd["pred"], "stderr": pd.get("pred_stderr")} if p == "bracket" else None)
                        if not e:
                            continue
                        obs = pd.get("observed") or {"mean": pd["antisym"], "stderr": 0.0,
                                                     "significant": False}
                        col = colors[names.index(d) % len(colors)]
                        x, y = e["mean"], obs["mean"]
                        xe = e.get("stderr") or 0.0
                        ye = obs.get("stderr") or 0.0
                        ye = 0.0 if not math.isfinite(ye) else ye
                        vals += [x, y]
                        ax.errorbar([x], [y], xerr=[xe], yerr=[ye], fmt=mk, ms=4, color=col, elinewidth=0.7,
                                    mfc=col if obs.get("significant") else "white", alpha=0.85)
            v = [abs(x) for x in vals if math.isfinite(x) and x != 0]
            lim = max(v) * 1.5 if v else 1.0
            lt = max(min(v), lim * 1e-4) if v else 1e-3
            _symlog(ax, "x", lim, lt)
            _symlog(ax, "y", lim, lt)
            ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.6)
            ax.axhline(0, color="k", lw=0.4)
            ax.axvline(0, color="k", lw=0.4)
            ax.set_title(f"{opt}: {PREDICTOR_NAMES.get(p, p)}", fontsize=9)
            ax.set_xlabel("predicted (EL^12 − EL^21)/2", fontsize=8)
            ax.set_ylabel("observed, mean over replicates", fontsize=8)
            ax.tick_params(labelsize=7)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[n % len(colors)], marker="o", ls="", label=f"target L = {d}")
               for n, d in enumerate(names)]
    handles += [Line2D([], [], color="0.3", marker="o", ls="", label="balanced"),
                Line2D([], [], color="0.3", marker="s", ls="", label="imbalanced"),
                Line2D([], [], color="0.3", marker="o", mfc="white", ls="",
                       label="observation not significant")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    return _save(plt, fig, path, rect=(0, 0.5 / (4.0 * len(opts) + 0.5), 1, 1))


def plot_linearity(data: Mapping[str, Any], path: str | Path) -> Path | None:
    """Is the observation first order in Δw? Observed (EL^12 − EL^21)/2 per unit Δw (mean ± stderr over the
    replicates) against Δw, one line per t0, one panel per (arm, target), on a linear scale set by the
    observations; the linear response's per-unit prediction Σδw·G/Δw (± stderr band) as a dashed line of
    the same colour, or, when it lies far outside, its value written in the panel. A first-order answer is
    flat in Δw and on its dashed line; a slope in Δw is the cubic term no first-order predictor has. None
    without response predictions."""
    arms = [a for a in data["arms"] if a.get("responses")]
    if not arms:
        return None
    plt = _plt()
    from matplotlib.lines import Line2D

    names = list(data["domains"])
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:red"]
    handles = [Line2D([], [], color=colors[n % len(colors)], marker="o", label=f"observed, t0 = {t0}")
               for n, t0 in enumerate(sorted({c["t0"] for a in arms for c in a["cells"]}))]
    cubic = any(r.get("by_delta_w") for a in arms for r in a["responses"])
    what = "response through Δw³" if cubic else "linear response"
    handles += [Line2D([], [], color="0.3", ls="--", label=f"{what} (dashed, ± stderr band)")]
    width = 3.6 * len(arms)
    # as many legend columns as fit the width (about 15 characters per inch at size 8, plus the marker)
    cell = max(len(h.get_label()) for h in handles) / 15 + 0.5
    ncol = max(1, min(len(handles), int(width // cell)))
    bottom = 0.3 + 0.22 * math.ceil(len(handles) / ncol)  # inches under the panels for the legend
    height = 3.0 * len(names) + bottom
    fig, axes = plt.subplots(len(names), len(arms), figsize=(width, height), squeeze=False)
    for col, arm in enumerate(arms):
        t0s = sorted({c["t0"] for c in arm["cells"]})
        records = {r["step"]: r for r in arm["responses"]}
        dws_all = sorted({c["delta_w"] for c in arm["cells"]})
        lo, hi = dws_all[0], dws_all[-1]
        span_x = [lo, hi] if hi > lo else [lo * 0.9, lo * 1.1]
        for row, d in enumerate(names):
            ax = axes[row][col]
            ext: list[float] = []
            lines = []
            for n, t0 in enumerate(t0s):
                color = colors[n % len(colors)]
                cs = sorted((c for c in arm["cells"] if c["t0"] == t0 and d in c["per_domain"]),
                            key=lambda c: c["delta_w"])
                dws = [c["delta_w"] for c in cs]
                obs = [c["per_domain"][d].get("observed") or {"mean": c["per_domain"][d]["antisym"]}
                       for c in cs]
                ys = [o["mean"] / w for o, w in zip(obs, dws, strict=True)]
                es = [(o.get("stderr") or 0.0) / w for o, w in zip(obs, dws, strict=True)]
                es = [e if math.isfinite(e) else 0.0 for e in es]
                ext += [abs(y) + e for y, e in zip(ys, es, strict=True)]
                ax.errorbar(dws, ys, yerr=es, fmt="o-", ms=4, lw=1, color=color, elinewidth=0.8,
                            label=f"observed, t0 = {t0}")
                rec = records.get(t0)
                if rec is None:
                    continue
                # one estimate per window (flat in Δw), or with response.cubic one per Δw (a curve)
                xs = dws if rec.get("by_delta_w") else span_x
                us = [(response_unit(rec, w).get(d) or {}).get("response") for w in xs]
                if us and all(u and math.isfinite(u["mean"]) for u in us):
                    se = [u.get("stderr") or 0.0 for u in us]
                    lines.append((color, t0, xs, [u["mean"] for u in us],
                                  [x if math.isfinite(x) else 0.0 for x in se]))
            lim = 1.25 * max([x for x in ext if math.isfinite(x)] or [1e-12])
            off = []
            for color, t0, xs, mean, se in lines:
                big = max(mean, key=abs)
                if abs(big) > 3 * lim:
                    off.append((color, t0, big, se[mean.index(big)]))
                    continue
                lim = max(lim, 1.15 * abs(big))
                ax.plot(xs, mean, "x--" if len(xs) == 1 else "--", color=color, lw=1,
                        label=f"response, t0 = {t0}")
                if any(x > 0 for x in se):
                    ax.fill_between(xs, [m - e for m, e in zip(mean, se, strict=True)],
                                    [m + e for m, e in zip(mean, se, strict=True)], color=color, alpha=0.12,
                                    lw=0)
            for k, (color, t0, mean, se) in enumerate(off):
                ax.text(0.02, 0.03 + 0.08 * k, f"response t0={t0}: {mean:+.3g} ± {se:.2g} (off scale)",
                        transform=ax.transAxes, fontsize=6.5, color=color)
            ax.set_ylim(-lim, lim)
            ax.axhline(0, color="k", lw=0.4)
            ax.set_xticks(dws_all)
            ax.set_title(f"{_arm_name(arm)}: L = {d}", fontsize=9)
            ax.set_xlabel("Δw", fontsize=8)
            ax.set_ylabel("antisym. excess / Δw", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    return _save(plt, fig, path, rect=(0, bottom / height, 1, 1))


def plot_locality(loc: Mapping[str, Any], path: str | Path) -> Path:
    """Observed antisymmetric excess / prediction against γTλ_max (log x), for the bracket (→ 1 only as
    γT → 0) and, when present, the exact linear response (→ 1 at any γT as Δw → 0)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    rows = sorted(loc["rows"], key=lambda r: r["locality"])
    xs = [r["locality"] for r in rows]
    styles = ("o", "s", "^", "v", "D", "P")
    ys_all: list[float] = []
    for n, d in enumerate(loc["domains"]):
        mk = styles[n % len(styles)]
        ys = [r[d]["ratio"] for r in rows]
        ys_all += ys
        ax.plot(xs, ys, f"{mk}--", color="tab:red", ms=4, lw=0.8, alpha=0.8, label=f"bracket, L = {d}")
        if "ratio_response" in rows[0][d]:
            yr = [r[d]["ratio_response"] for r in rows]
            ys_all += yr
            ax.plot(xs, yr, f"{mk}-", color="tab:blue", ms=4, lw=1, label=f"linear response, L = {d}")
    ax.axhline(1.0, color="k", ls=":", lw=0.8, label="observed = predicted")
    ax.set_xscale("log")
    fin = [y for y in ys_all if math.isfinite(y)]
    lo, hi = (min(fin + [0.0]), max(fin + [1.2])) if fin else (0.0, 1.2)
    ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
    ax.set_xlabel("γ·T·λ_max (how far from the local regime)")
    ax.set_ylabel("observed (EL^12 − EL^21)/2 / predicted")
    ax.set_title("Locality sweep (deterministic GD, float64)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    return _save(plt, fig, path)
