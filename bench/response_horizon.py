"""How far does the linear response hold? Observed/predicted against the window length on real (noisy) runs.

The tiny study's base runs (seed 0) with one intervention start t0 and one base mix, re-run for several
half-windows T: each (T, Δw) cell's θ12/θ21 pair under R sampler seeds (the observation, mean ± stderr) beside
the response estimate Σδw·G over the same window (G in more groups than the preset, for a smaller stderr).
If observed/predicted is 1 at small T and falls as T grows, the response is exact but its first-order
regime shrinks with the horizon (Adam's and SGD's linearised maps amplify perturbations the real, nonlinear
dynamics damp); if it is off at every T, the estimator itself is biased.

    python bench/response_horizon.py --out /tmp/horizon                 # T = 3, 8, 20, 50 (~25 min on 1 core)
    python bench/response_horizon.py --out /tmp/horizon --T 3,8 --optimizer adam
    python bench/response_horizon.py --out /tmp/edge --T 50 --base 0.9,0.1 --delta-ws 0.03,0.06,0.09,0.1 \
        --replicates 6 --groups 2 --trajectories 2 --optimizer adam    # where the imbalanced arm breaks
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from commute.study import run_bilingual_study
from commute.study_config import get_preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="reports/horizon", help="one study directory per T under this one")
    ap.add_argument("--T", default="3,8,20,50", help="half-window lengths (comma-separated)")
    ap.add_argument("--t0", type=int, default=250)
    ap.add_argument("--delta-ws", default="0.15,0.3")
    ap.add_argument("--base", default="0.5,0.5",
                    help="the base mix (en, ru), e.g. 0.9,0.1 for the imbalanced arm")
    ap.add_argument("--replicates", type=int, default=4)
    ap.add_argument("--groups", type=int, default=4, help="response estimator groups")
    ap.add_argument("--trajectories", type=int, default=1,
                    help="replays of each window under other sampler seeds; the response is their mean ± se")
    ap.add_argument("--optimizer", default="adam,sgd")
    ap.add_argument("--cache-dir", default=None)
    a = ap.parse_args()
    dws = [float(x) for x in a.delta_ws.split(",")]
    en, ru = (float(x) for x in a.base.split(","))
    variant = {"name": "balanced" if en == ru else "imbalanced", "base": {"en": en, "ru": ru},
               "delta_ws": dws}
    rows = []
    for T in (int(x) for x in a.T.split(",")):
        cfg = get_preset(
            "tiny", T=T, t0s=[a.t0], extra_p_steps=[], replicates=a.replicates,
            optimizers=a.optimizer.split(","),
            variants=[variant],
            n_groups=2, n_grad_batches=4, n_hvp_batches=2,  # the bracket is not the point here: keep it cheap
            response={"n_groups": a.groups, "batch_size": 10, "trajectories": a.trajectories},
            locality={"enabled": False},
        )
        res = run_bilingual_study(config=cfg, out_dir=Path(a.out) / f"T{T}", cache_dir=a.cache_dir,
                                  progress=False)
        for arm in res.data["arms"]:
            for c in arm["cells"]:
                for d, p in c["per_domain"].items():
                    o, r = p["observed"], p["predictions"]["response"]
                    rows.append((arm["optimizer"], T, c["delta_w"], d, o["mean"], o["stderr"],
                                 o["significant"], r["mean"], r["stderr"], c.get("tokens_match")))
    print("optimizer  T   Δw    target  observed ± se            response ± se            obs/resp  "
          "observed per unit Δw  tokens")
    for opt, T, dw, d, om, ose, sig, rm, rse, tok in rows:
        ratio = om / rm if rm else math.nan
        print(f"{opt:<9} {T:>3} {dw:<5} {d:<7} {om:+.4f} ± {ose:.4f}{'*' if sig else ' '}   "
              f"{rm:+.4f} ± {rse:.4f}   {ratio:6.2f}    {om / dw:+.3f} ± {ose / dw:.3f}       "
              f"{'match' if tok else 'DIFFER'}")
    print("* = observation significant at the 95 % t level (R - 1 dof)")


if __name__ == "__main__":
    main()
