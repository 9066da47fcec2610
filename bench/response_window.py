"""Where in a window does the response come from, and is it the estimator's noise or the run's own map?

One study window [t0, t0 + 2T) of a preset's base run (trained on first use, cached under --out), replayed
under the study's replicate sampler seeds exactly as ``commute study`` does (trajectory r = replicate r),
with the response Σ_t δw(t)·G(t) of the eq. (9) swap per unit Δw for every target, printed per estimator
group, and the share of Σ_t |δw(t)·G(t)| in each quarter of the window (an adjoint that grows going back
in time puts it in the first quarter). Two ways to get the per-step domain gradients and Hessians:

* ``fresh`` (what the study uses): independent batches per group, the population linearisation along the
  trajectory; groups of one trajectory differ only by those batches;
* ``train``: the replayed training batch's own rows, split by domain, so the adjoint is the exact
  derivative of the *realised* map (the pathwise derivative); every group is the same.

If ``fresh`` groups disagree wildly while ``train`` is tame, the spread is the estimator's; if ``train``
also varies by orders of magnitude from trajectory to trajectory, the run's own map expands perturbations
over the window and any derivative-based prediction is heavy-tailed there. Reweighting rows moves the
gradient's noise twice as much as moving rows does, so over trajectories ``train`` estimates the mean-field
response plus twice the noise effect, ``fresh`` the first alone, and ``fresh --noise rows`` (the study's
``response.noise: rows``) their average, the derivative of the expected loss (docs/design.md §1b).

    python bench/response_window.py --preset small --t0 200 --trajectories 0,1,2,3 --batches train
    python bench/response_window.py --preset tiny --t0 100 --groups 4
    python bench/response_window.py --preset small --t0 1200 --trajectories 0,2 --noise   # v's noise channel
    python bench/response_window.py --preset small --t0 1200 --trajectories 0,1,2,3 --noise rows
    python bench/response_window.py --preset tiny --t0 250 --trajectories 0,1,2,3 --adjoint train

``--adjoint train`` pulls the fresh estimate's adjoint back through the training batch's own rows (the
realised map's Hessian) instead of the fresh batches' (``response.adjoint: train``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _study_window import window_arm

from commute import study as S
from commute.curvature import math_attention
from commute.data import MixtureSampler
from commute.model import lm_loss
from commute.response import ResponseEstimator
from commute.train import load_checkpoint, lr_at, param_group_names


def _rows_backwards(batches: list, i: int, groups: int):
    """Domain i's rows of each training batch, last step first, once per group."""
    for _ in range(groups):
        for b in reversed(batches):
            yield b.input_ids[b.domain == i]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    ap.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    ap.add_argument("--variant", default="balanced")
    ap.add_argument("--t0", type=int, default=200)
    ap.add_argument("--trajectories", default="0,1", help="replicate indices (0: the run's own batches)")
    ap.add_argument("--groups", type=int, default=2, help="estimator groups (fresh batches)")
    ap.add_argument("--batches", default="fresh", choices=["fresh", "train"])
    ap.add_argument("--noise", nargs="?", const="variance", choices=["variance", "rows"], default=None,
                    help="add a sampling-noise channel: 'variance' (Adam's v only, 2 fresh batches per "
                         "step; the default of a bare --noise) or 'rows' (the whole channel, from the "
                         "training batch's own rows); response.noise in a study config")
    ap.add_argument("--at", type=float, default=0.0,
                    help="replay the branch at schedule base + AT·δw(t) (the θ12 branch of Δw = AT; "
                         "negative: θ21) and estimate there; the two-point Gauss rule ½[at +Δw/√3, −Δw/√3] "
                         "is (EL^12 − EL^21)/(2Δw) up to O(Δw⁴)")
    ap.add_argument("--out", default="reports/response_window", help="base run cache")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--adjoint", default=None, choices=["fresh", "train"],
                    help="pull the adjoint back through the fresh batches' Hessians or the training rows' "
                         "(default: train with --noise rows, else fresh); response.adjoint in a study config")
    a = ap.parse_args()
    if a.adjoint == "train" and (a.batches == "train" or a.noise == "variance"):
        ap.error("--adjoint train is for fresh batches, with no noise channel or --noise rows.")
    if a.adjoint == "fresh" and a.noise == "rows":
        ap.error("--noise rows pulls the adjoint back through the training rows: leave --adjoint unset.")
    if a.noise and a.batches == "train":
        ap.error("--noise is for fresh batches (with --batches train the noise is already in the rows).")
    if a.noise == "variance" and a.optimizer != "adam":
        ap.error("--noise variance is for Adam (the channel needs 2 independent batches per step).")
    torch.set_num_threads(1)

    cfg, domains, val, arm = window_arm(a.preset, a.optimizer, a.variant, a.t0, a.out, a.device, a.cache_dir)
    rc, tc, names, n = cfg.response, arm.tc, list(cfg.domain_names), 2 * cfg.T
    base, unit, G = dict(arm.variant.base), S._unit_delta(cfg), a.groups
    sched = S.shifted_schedule(base, unit, a.at)
    if any(not 0.0 <= w <= 1.0 for ws in sched for w in ws.values()):
        ap.error(f"--at {a.at} takes a weight outside [0, 1].")
    print(f"{a.preset} {arm.label} t0={a.t0} T={cfg.T}: response per unit Δw, {a.batches} batches, "
          f"{G} groups" + (f", at base {a.at:+g}·δw(t)" if a.at else ""))
    per_path: dict[str, list[float]] = {k: [] for k in names}
    for r in (int(x) for x in a.trajectories.split(",")):
        ck = load_checkpoint(arm.checkpoint(a.t0), device=a.device, with_optimizer=True)

        def sampler(state: dict = ck.state["sampler"], r: int = r) -> MixtureSampler:
            return S.replicate_sampler(domains, tc, state, cfg.seed, a.t0, r)

        seed = cfg.seed * 1_000_003 + a.t0 + 13 + 7919 * r  # the study's fresh streams
        streams = {k: domains[k].batches(rc.batch_size, cfg.seq_len, seed=seed) for k in names}
        if a.batches == "train":  # the estimator walks back step by step, group after group
            tb = [b for s in [sampler()] for b in (s.next_batch(sched[t]) for t in range(n))]
            streams = {k: _rows_backwards(tb, i, G) for i, k in enumerate(names)}
        train = sampler()
        rows = {"train_rows": lambda b: b.by_domain(names)}
        noise = ({"noise": tc.sampler_mode, "train_batch_size": tc.batch_size, "batches_per_step": 2}
                 if a.noise == "variance" else
                 {"noise": "rows", **rows} if a.noise == "rows" else
                 {"adjoint": "train", **rows} if a.adjoint == "train" else {})
        est = ResponseEstimator(ck.model, lm_loss, streams, lr=lambda step: lr_at(tc, step),
                                state=ck.optimizer_state, state_names=param_group_names(ck.model))
        t = time.perf_counter()
        with math_attention():
            rep = est.estimate(lambda step, s=train: s.next_batch(sched[step - a.t0]), sched, targets=names,
                               steps=n, start=a.t0, n_groups=G, target_data={k: val[k] for k in names},
                               progress=True, **noise)
        delta = rep._delta(unit)
        for k in names:
            c = np.einsum("gkt,kt->gt", rep.samples(k), delta)  # per group, per step
            q = np.abs(c).reshape(G, 4, -1).sum(-1)
            share = q / q.sum(-1, keepdims=True)
            per_path[k].append(float(c.sum(-1).mean()))
            print(f"  trajectory {r} L={k}: per group {np.array2string(c.sum(-1), precision=4)}; share of "
                  f"|δw·G| by quarter (first..last) {np.array2string(share.mean(0), precision=3)}")
        print(f"  trajectory {r}: {time.perf_counter() - t:.0f} s", flush=True)
    if len(per_path[names[0]]) > 1:  # what the study's prediction is: the mean over trajectories
        for k, x in per_path.items():
            sd = float(np.std(x, ddof=1))
            print(f"L={k}: mean over {len(x)} trajectories {np.mean(x):+.4f} ± {sd / np.sqrt(len(x)):.4f}"
                  f" per unit Δw (sd over trajectories {sd:.4f})")


if __name__ == "__main__":
    main()
