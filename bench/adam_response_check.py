"""Why is the Adam response ~3x too large in the study? A deterministic check on the study's own checkpoint.

From a base checkpoint of the tiny study (Adam arm), full-batch float64 Adam steps on fixed batches (no
sampling noise) carry the checkpoint's optimiser state through the eq. (9) intervention; the observed
antisymmetric excess is compared with the exact linear response of that Adam map for several Δw. If the
ratio is 1 at small Δw and falls at the study's Δw, the first-order answer is the limit (nonlinearity in
Δw); if it is 1 throughout, the gap in the study comes from the noisy setting.

    python bench/adam_response_check.py reports/demo/study   # a finished tiny study (adam arm)
    python bench/adam_response_check.py reports/demo/study --t0 250 --T 20 --dws 1e-6,1e-4,1e-2 --profile
"""

from __future__ import annotations

import argparse
import glob
import time

import torch

from commute.bracket import grad
from commute.curvature import domain_losses, math_attention, model_params
from commute.data import load_domains
from commute.response import OptimizerState, antisymmetric_excess, optimizer_step, schedule_gradient
from commute.schedule import Intervention
from commute.train import load_checkpoint, param_group_names


def run(losses, p, st, weights, lr, betas, eps, trace=None):
    for w in weights:
        if trace is not None:
            trace.append({k: float(losses[k](p)) for k in losses})
        g = grad(lambda q, w=w: sum(w[k] * losses[k](q) for k in losses), p)
        p, st = optimizer_step(p, g, st, lr, "adam", betas=betas, eps=eps)
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("study")
    ap.add_argument("--t0", type=int, default=100)
    ap.add_argument("--T", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dws", default="0.01,0.05,0.15,0.45")
    ap.add_argument("--profile", action="store_true",
                    help="also print G_en(t) - G_ru(t) per window step and target beside the base losses")
    a = ap.parse_args()
    torch.set_num_threads(1)
    (ck_dir,) = glob.glob(f"{a.study}/runs/adam-balanced-*/base-*/checkpoints/step_{a.t0:08d}")
    ck = load_checkpoint(ck_dir, with_optimizer=True, dtype=torch.float64)
    cfg = ck.config
    doms = load_domains(cfg.domains, tokenizer=cfg.tokenizer)
    batches = {k: [next(doms[k].batches(a.batch, cfg.seq_len, seed=99))] for k in cfg.domains}
    losses = domain_losses(ck.model, batches, torch.float64)
    p0 = model_params(ck.model, torch.float64)
    st0 = OptimizerState.from_state_dict(ck.optimizer_state, param_group_names(ck.model))
    st0 = OptimizerState(step=st0.step, m={k: v.double() for k, v in st0.m.items()},
                         v={k: v.double() for k, v in st0.v.items()})
    base = {"en": 0.5, "ru": 0.5}
    betas, eps, lr = tuple(cfg.betas), cfg.eps, cfg.lr
    n = 2 * a.T
    t = time.time()
    with math_attention():
        G = {k: schedule_gradient(losses, p0, [base] * n, lr, losses[k], "adam", st0, betas=betas, eps=eps)
             for k in losses}
        trace: list[dict[str, float]] = []
        pb = run(losses, p0, st0, [base] * n, lr, betas, eps, trace)
        lb = {k: float(losses[k](pb)) for k in losses}
        print(f"Adam state step {st0.step}, lr {lr}, window {n} steps, response in {time.time() - t:.0f} s")
        if a.profile:  # where in the window the response comes from, and what the base run does there
            print("step  " + "  ".join(f"G_en-G_ru (L={k})" for k in losses) + "  " +
                  "  ".join(f"base L_{k}" for k in losses))
            for s in range(n):
                print(f"{s:<5} " + "  ".join(f"{float(G[k]['en'][s] - G[k]['ru'][s]):+17.3e}" for k in losses)
                      + "  " + "  ".join(f"{trace[s][k]:9.4f}" for k in losses))
        print("dw     target  observed     response    obs/resp")
        for dw in (float(x) for x in a.dws.split(",")):
            iv = Intervention(base, "en", "ru", dw, 0, a.T)
            p12 = run(losses, p0, st0, [iv(s) for s in range(n)], lr, betas, eps)
            p21 = run(losses, p0, st0, [iv.reversed()(s) for s in range(n)], lr, betas, eps)
            for k in losses:
                obs = 0.5 * (float(losses[k](p12)) - float(losses[k](p21)))
                pred = antisymmetric_excess(G[k], iv)
                print(f"{dw:<6} {k:<7} {obs:+.4e}  {pred:+.4e}  {obs / pred:.4f}   (base L {lb[k]:.4f})")


if __name__ == "__main__":
    main()
