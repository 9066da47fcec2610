"""Ground truth for the noise channel on a real model: the eq. (9) swap run under four paradigms.

A schedule w(t) can act on a training batch in several ways that move the gradient's noise differently
(docs/design.md §1b, "the rows noise channel"; M: the mean gradient's part of the derivative, N: the
noise's):

* ``sample`` (what ``commute study`` runs, ``sampler_mode: exact``): the batch *holds* n_k = w_k B rows of
  domain k. The noise of domain k has variance ∝ w_k, so its derivative is the mean field M plus the noise
  effect N (what ``response.noise: rows`` estimates: M + N);
* ``reweight``: the batch keeps the base composition and the loss weighs domain k's mean by w_k
  (``loss_weighting: domain``). The noise's standard deviation is ∝ w_k, so its variance moves twice as
  fast: M + 2N (what ``bench/response_window.py --batches train`` estimates along one path);
* ``mean``: the base rows and loss, plus Σ_k δw_k(t)·L_k on ``--mean-rows`` fresh rows per domain per step:
  the schedule moves the mean gradient and leaves the noise as it was, M alone (what the default, fresh
  response estimates);
* ``noise``: the base rows and loss, plus, for each domain whose weight the schedule raises (δw_k > 0),
  √(δw_k m/B)·(L_k(a) − L_k(b)) on two independent sets a, b of m = ``--mean-rows``/2 fresh rows: a zero-mean
  gradient term of covariance 2δw_k C_k/B (C_k: domain k's per-row gradient covariance). The mean gradient
  does not move; the arms θ12 − θ21 differ in noise covariance by 2·δw(t)·C/B, which is what moving rows
  does to θ12 − θ21, so to first order in the covariance the excess is N alone — the premise of the rows
  channel (noise enters through its covariance) put to the test: ``sample − mean`` should equal it. Both
  arms also carry a common extra covariance Δw(C_1 + C_2)/B that moving rows does not add; its effect on
  the per-unit excess is O(Δw), so compare two Δw before reading a small difference.

All run from one study checkpoint, θ12 and θ21 under the same replicate sampler seeds (common random
numbers, replicate r = the study's replicate r, 0 = the run's own batches). The antisymmetric excess
(EL^12 − EL^21)/2 per unit Δw, mean ± stderr over replicates, of each paradigm is the truth, without any
estimator, that the fresh estimate (M), the rows channel (M + N) and ``--batches train`` (M + 2N along one
path) are checked against; differences between paradigms are paired over the same seeds.

    python bench/noise_paradigms.py --preset tiny --t0 250 --replicates 12 --out /tmp/rw_tiny
    python bench/noise_paradigms.py --preset tiny --t0 250 --delta-w 0.1 --replicates 12 \\
        --paradigms noise,mean,sample
    python bench/noise_paradigms.py --preset tiny --t0 250 --delta-w 0.1 --replicates 12 --first 12 \\
        --paradigms noise,mean,sample   # replicates 12-23, to pool with the run above
    python bench/noise_paradigms.py --preset small --t0 1200 --delta-w 0.15 --replicates 6 \\
        --paradigms noise,mean,sample

The base run is trained on first use and cached under ``--out`` (the same cache as
``bench/response_window.py``); on one CPU core 12 ``tiny`` replicates take 1–2 min per paradigm, ``mean``
and ``noise`` ~5 min each; a ``small`` replicate of noise, mean and sample ~5 min. ``--first`` extends an
earlier run with new replicates (pool the printed per-replicate lines).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _study_window import window_arm

from commute import study as S
from commute.checkpoint import load_optimizer_state
from commute.model import sequence_losses
from commute.schedule import Intervention
from commute.train import _apply_hparams, _build_optimizer, evaluate, load_checkpoint, lr_at, train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    ap.add_argument("--variant", default="balanced")
    ap.add_argument("--t0", type=int, default=250)
    ap.add_argument("--delta-w", type=float, default=0.3)
    ap.add_argument("--replicates", type=int, default=16, help="sampler seeds (replicate 0: the run's own)")
    ap.add_argument("--first", type=int, default=0, help="first replicate (to extend an earlier run: "
                    "replicates first .. first + replicates − 1)")
    ap.add_argument("--paradigms", default="sample,reweight", help="which to run, comma-separated: sample, "
                    "reweight, mean, noise")
    ap.add_argument("--mean-rows", type=int, default=64,
                    help="'mean', 'noise': fresh rows per domain per step")
    ap.add_argument("--out", default="reports/response_window", help="base run cache (shared with "
                    "bench/response_window.py)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", default=None)
    a = ap.parse_args()
    chosen = a.paradigms.split(",")
    if not chosen or set(chosen) - {"sample", "reweight", "mean", "noise"}:
        ap.error("--paradigms takes sample, reweight, mean and/or noise, comma-separated.")
    if a.first < 0:
        ap.error("--first must be 0 or more.")
    if a.replicates < 2:
        ap.error("--replicates must be at least 2 to give a standard error.")
    torch.set_num_threads(1)

    cfg, domains, val, arm = window_arm(a.preset, a.optimizer, a.variant, a.t0, a.out, a.device, a.cache_dir)
    tc, names, T = arm.tc, list(cfg.domain_names), cfg.T
    d1, d2 = cfg.pair_names  # θ12 boosts d1 first, as the study
    base = dict(arm.variant.base)
    swap = {"12": Intervention(base, d1, d2, a.delta_w, a.t0, T)}  # eq. (9), as the study's branches
    swap["21"] = swap["12"].reversed()

    def branch(order: str, r: int, paradigm: str) -> dict[str, float]:
        ck = load_checkpoint(arm.checkpoint(a.t0), device=a.device)
        model = ck.model.train()
        opt = _build_optimizer(model, tc)
        opt.load_state_dict(load_optimizer_state(arm.checkpoint(a.t0), a.device))
        _apply_hparams(opt, tc)
        sampler = S.replicate_sampler(domains, tc, ck.state["sampler"], cfg.seed, a.t0, r)
        fresh = {k: domains[k].batches(a.mean_rows, tc.seq_len, seed=7_919 * (r + 1) + i)  # same in θ12, θ21
                 for i, k in enumerate(names)}
        for step in range(a.t0, a.t0 + 2 * T):
            w = swap[order](step)
            batch = sampler.next_batch(w if paradigm == "sample" else base)
            if paradigm in ("mean", "noise"):
                _mean_step(model, opt, batch, {k: w[k] - base[k] for k in names},
                           {k: next(fresh[k]) for k in names}, lr_at(tc, step), tc.grad_clip,
                           noise_only=paradigm == "noise", batch_size=tc.batch_size)
                continue
            train_step(model, opt, [batch], w, names, lr=lr_at(tc, step), grad_clip=tc.grad_clip, step=step,
                       loss_weighting="sample" if paradigm == "sample" else "domain")
        return evaluate(model, val)

    out: dict[str, list[dict[str, float]]] = {p: [] for p in chosen}
    t = time.perf_counter()
    for r in range(a.first, a.first + a.replicates):
        for p in out:
            l12, l21 = branch("12", r, p), branch("21", r, p)
            out[p].append({k: (l12[k] - l21[k]) / (2 * a.delta_w) for k in names})
        print(f"replicate {r}: " + "; ".join(f"{p} " + ", ".join(f"{k} {v[-1][k]:+.4f}" for k in names)
                                             for p, v in out.items()), flush=True)
    print(f"{a.preset} {arm.label} t0={a.t0} T={T} Δw={a.delta_w}, {a.replicates} replicates "
          f"({time.perf_counter() - t:.0f} s): antisymmetric excess per unit Δw, mean ± stderr")

    def ms(y: np.ndarray) -> str:
        return f"{y.mean():+.4f} ± {y.std(ddof=1) / np.sqrt(len(y)):.4f}"

    label = {"sample": "sample (M + N)", "reweight": "reweight (M + 2N)", "mean": "mean (M)",
             "noise": "noise (N)"}
    for k in names:
        x = {p: np.array([v[k] for v in vs]) for p, vs in out.items()}
        line = "; ".join(f"{label[p]} {ms(y)}" for p, y in x.items())
        if "sample" in x and "reweight" in x:  # paired over the same seeds
            line += f"; N {ms(x['reweight'] - x['sample'])}; M {ms(2 * x['sample'] - x['reweight'])}"
        for p, y in x.items():
            if "mean" in x and p not in ("mean", "noise"):
                line += f"; {p} − mean {ms(y - x['mean'])}"
        if "noise" in x and "mean" in x:  # the premise: sample = mean + noise
            for p, c in (("sample", 1), ("reweight", 2)):
                if p in x:
                    line += f"; {p} − mean − {c}·noise {ms(x[p] - x['mean'] - c * x['noise'])}"
        print(f"  L={k}: {line}")


def _mean_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: object, dw: dict[str, float],
               fresh: dict[str, torch.Tensor], lr: float, clip: float, noise_only: bool = False,
               batch_size: int = 1) -> None:
    """One step of the 'mean' paradigm: the base batch's loss plus Σ_k δw_k · L_k(fresh rows), i.e. the
    schedule moves the mean gradient (by δw_k·ĝ_k from many fresh rows) and leaves the noise as it was.
    With ``noise_only`` (the 'noise' paradigm) the added term is instead Σ_{δw_k > 0} √(δw_k m/B)·(L_k(a) −
    L_k(b)), the fresh rows split into halves a, b of m rows: zero mean, covariance 2δw_k C_k/B."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss = sequence_losses(model, batch.input_ids).mean()
    for k, x in dw.items():
        if noise_only and x > 0:
            m = len(fresh[k]) // 2
            per_row = sequence_losses(model, fresh[k][: 2 * m])
            loss = loss + (x * m / batch_size) ** 0.5 * (per_row[:m].mean() - per_row[m:].mean())
        elif x and not noise_only:
            loss = loss + x * sequence_losses(model, fresh[k]).mean()
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


if __name__ == "__main__":
    main()
