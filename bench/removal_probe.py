"""What does removing a domain do? Branch a base run at t0 for n steps at constant low-resource weights
w (0 included), then swap parameter blocks between the w = 0 end and the smallest w > 0 end.

Run on the imbalanced study that ``bench/response_horizon.py --base 0.9,0.1`` leaves (its config and base
run); one process, a few minutes:

    python bench/response_horizon.py --out /tmp/edge --T 50 --base 0.9,0.1 --delta-ws 0.09,0.1 \\
        --replicates 2 --groups 2 --optimizer adam
    python bench/removal_probe.py /tmp/edge/T50 --t0 250 --steps 50 --weights 0,0.01,0.02,0.1
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from commute.checkpoint import load_checkpoint
from commute.study import _load_data
from commute.study_config import StudyConfig
from commute.train import evaluate, train

BLOCKS = {"token embeddings (tied output layer)": ["wte", "lm_head"], "position embeddings": ["wpe"],
          "attention": ["attn"], "MLP": ["mlp"], "layer norms": ["ln_"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path, help="a study directory (config.yaml and runs/) with one arm")
    ap.add_argument("--t0", type=int, default=250)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--weights", default="0,0.01,0.02,0.1", help="the low-resource domain's weights")
    a = ap.parse_args()
    cfg = StudyConfig.from_yaml(a.study / "config.yaml")
    base_w = cfg.variants[0].base
    lo, hi = min(base_w, key=base_w.get), max(base_w, key=base_w.get)  # low- and high-resource domains
    domains, val = _load_data(cfg, None)
    base = next((a.study / "runs").glob("*/base-*"))
    ck = base / "checkpoints" / f"step_{a.t0:08d}"
    ws = sorted(float(x) for x in a.weights.split(","))
    ends = {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in ws:
            out = Path(tmp) / f"w{w}"
            train(None, out, branch_from=ck, schedule={hi: 1 - w, lo: w} if w else {hi: 1.0},
                  max_steps=a.t0 + a.steps, domains=domains, progress=False)
            ends[w] = load_checkpoint(out).model
            L = evaluate(ends[w], val)
            print(f"{lo} weight {w:<5}: validation L_{hi} {L[hi]:.4f}  L_{lo} {L[lo]:.4f}", flush=True)
    if 0.0 not in ends or len(ends) < 2:
        return
    s0 = ends[0.0].state_dict()
    w1 = min(w for w in ends if w > 0)
    s1 = ends[w1].state_dict()
    print(f"L_{lo} at the weight-{w1} end with one block taken from the weight-0 end:")
    for name, keys in BLOCKS.items():
        m = load_checkpoint(ck).model
        m.load_state_dict({k: s0[k] if any(p in k for p in keys) else v for k, v in s1.items()})
        print(f"  {name:<38} {evaluate(m, val)[lo]:.4f}")


if __name__ == "__main__":
    main()
