"""What does the mixture sampler cost? Steps/s of the training loop, sampler vs pre-built tensors.

Both arms run the same :func:`commute.train.train` loop, same model, same batches: arm ``sampler`` draws
each batch with :class:`commute.data.MixtureSampler` (per-example domain draws, counter-based streams,
window gathering from memmaps), arm ``prebuilt`` is fed the very same batches drawn beforehand
(``batch_source=list``). Step times are taken from a per-step callback, skipping warm-up steps; the arms
alternate ``--repeats`` times (in alternating order) so that load from other processes hits both alike.
A paired figure alternates sampler and pre-built batches step by step within one run, and a low-noise
one times ``next_batch`` alone and divides by the median step time.

    python bench/bench_sampler.py                      # tiny preset on en/ru fortunes (fetched if needed)
    python bench/bench_sampler.py --synthetic --steps 60 --preset tiny --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from commute.data import MixtureSampler, load_domains
from commute.train import TrainConfig, train


def synthetic_sources(root: Path) -> dict[str, str]:
    out = {}
    for name, alphabet, seed in (("en", "etaoin shrdlu", 0), ("ru", "оеаинтсрвл", 1)):
        r = random.Random(seed)
        docs = ["".join(r.choice(alphabet) for _ in range(r.randint(100, 400))) for _ in range(3000)]
        p = root / f"{name}.txt"
        p.write_text("\n\n".join(docs), encoding="utf-8")
        out[name] = str(p)
    return out


def step_times(cfg: TrainConfig, out: Path, domains, batch_source=None) -> list[float]:
    stamps: list[float] = []
    train(cfg, out, domains=domains, batch_source=batch_source, progress=False,
          callbacks=[lambda info: stamps.append(time.perf_counter())])
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=60, help="Steps per arm and repeat.")
    ap.add_argument("--warmup", type=int, default=5, help="Leading steps not timed.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--sampler-mode", default="sample", choices=["sample", "exact"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default).")
    ap.add_argument("--synthetic", action="store_true", help="Use synthetic corpora instead of fortunes.")
    ap.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = synthetic_sources(tmp) if args.synthetic else {"en": "fortunes:en", "ru": "fortunes:ru"}
        domains = load_domains(sources, cache_dir=tmp / "cache" if args.synthetic else None)
        cfg = TrainConfig(model=args.preset, domains=sources, seq_len=args.seq_len,
                          batch_size=args.batch_size, sampler_mode=args.sampler_mode, steps=args.steps,
                          eval_every=0, ckpt_every=0, log_every=10, tensorboard=False)
        sampler = MixtureSampler(domains, cfg.batch_size, cfg.seq_len, cfg.seed, cfg.sampler_mode)
        w = {n: 1.0 / len(domains) for n in domains}
        prebuilt = [sampler.next_batch(w) for _ in range(cfg.steps)]

        per_arm: dict[str, list[float]] = {"sampler": [], "prebuilt": []}
        for r in range(args.repeats):
            for arm in ("sampler", "prebuilt") if r % 2 == 0 else ("prebuilt", "sampler"):  # no order bias
                src = None if arm == "sampler" else list(prebuilt)
                ts = step_times(cfg, tmp / f"{arm}{r}", domains, src)[args.warmup:]
                per_arm[arm].extend(ts)
                print(f"repeat {r} {arm:8s}: {1 / statistics.median(ts):6.2f} steps/s")

        # paired, within one run: even steps draw from a sampler, odd steps take a pre-built batch, so
        # load from other processes hits both alike at the finest grain
        s1 = MixtureSampler(domains, cfg.batch_size, cfg.seq_len, cfg.seed, cfg.sampler_mode)
        pcfg = cfg.replace(steps=2 * args.steps)

        def paired_src(t: int):
            return s1.next_batch(w) if t % 2 == 0 else prebuilt[(t // 2) % len(prebuilt)]

        pt = step_times(pcfg, tmp / "paired", domains, paired_src)  # pt[i] is the time of step i + 1
        even = [x for i, x in enumerate(pt) if (i + 1) % 2 == 0 and i >= args.warmup]
        odd = [x for i, x in enumerate(pt) if (i + 1) % 2 == 1 and i >= args.warmup]

        # next_batch alone (what the sampler adds to a step)
        s2 = MixtureSampler(domains, cfg.batch_size, cfg.seq_len, cfg.seed + 1, cfg.sampler_mode)
        nb = []
        for _ in range(200):
            t0 = time.perf_counter()
            s2.next_batch(w)
            nb.append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in per_arm.items()}
    res = {
        "preset": args.preset,
        "batch": [args.batch_size, args.seq_len],
        "threads": torch.get_num_threads(),
        "steps_per_s_sampler": 1 / med["sampler"],
        "steps_per_s_prebuilt": 1 / med["prebuilt"],
        "overhead_loop": med["sampler"] / med["prebuilt"] - 1,
        "overhead_paired": statistics.median(even) / statistics.median(odd) - 1,
        "next_batch_ms": 1e3 * statistics.median(nb),
        "overhead_next_batch": statistics.median(nb) / med["prebuilt"],
        "tokens_per_s_prebuilt": args.batch_size * args.seq_len / med["prebuilt"],
    }
    print(json.dumps(res, indent=1))
    print(f"sampler overhead: {100 * res['overhead_loop']:+.1f}% (separate runs, median of "
          f"{len(per_arm['sampler'])} steps per arm), {100 * res['overhead_paired']:+.1f}% (paired steps "
          f"in one run); next_batch alone {res['next_batch_ms']:.2f} ms = "
          f"{100 * res['overhead_next_batch']:.2f}% of a step")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
