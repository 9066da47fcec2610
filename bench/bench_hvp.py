"""What does a Hessian-vector product cost, as a multiple of one gradient of the same loss? (issue 11 §3)

Every variant computes H v for K vectors v of a GPT-2 preset's mean next-token loss over one fixed batch,
through :func:`commute.bracket.hvp_function` (the library's own code), and is timed against
:func:`commute.bracket.grad` of the same loss in the same process:

* ``rev-rev``: reverse-over-reverse, one ``create_graph`` gradient then one ``autograd.grad`` per vector
  (``hvps``, what the estimator's ``graph_hvps`` does);
* ``fwd-rev``: forward-over-reverse, ``torch.func.jvp(torch.func.grad(f))`` over a ``functional_call`` of the
  model, once per vector;
* ``fwd-rev-vmap``: the same jvp batched over the K vectors with ``torch.func.vmap``;
* ``compiled``: ``torch.compile`` of the torch.func product (``fwd-rev`` for K = 1, ``fwd-rev-vmap`` for
  K > 1); its compile time (first call minus a steady call, with a fresh inductor cache unless
  ``--keep-compile-cache``) is reported separately, and a failing compile is reported and skipped;
* ``grad-compiled`` (with the first K): ``torch.compile(torch.func.grad(f))``, for scale only: the ratios are
  against the eager gradient, which is what the estimator computes;
* ``bracket``: ``lie_bracket`` (g_i, g_j taken from the HVPs' own passes) against the textbook composition
  ``grad``, ``grad``, ``hvp``, ``hvp`` it replaced, on two batches.

Measurement: the variants of one (preset, K) alternate in a rotating order within each round, and every
variant call sits between two gradient calls; its ratio for the round is its time over the mean of those two
gradients (paired, so load from other processes hits both alike). Reported: median and [p10, p90] over the
rounds, of CPU time of the process (``time.process_time``, robust on a loaded machine; use ``--threads 1``)
and of wall time; on CUDA the ratio uses wall time with ``torch.cuda.synchronize()`` around each call.
Peak memory of one untimed call above what was allocated before it: ``torch.cuda.max_memory_allocated``
on CUDA; on CPU, the running total of torch's CPU allocator as recorded by ``torch.profiler``
(``profile_memory=True``; tensors only, not Python or allocator slack), or ``--no-mem`` for n/a.
``err`` is the largest relative error of a variant's products against ``rev-rev`` in the run's dtype.

    python bench/bench_hvp.py --quick                   # tiny and small, no compile, ~2 min on 2 CPU cores
    python bench/bench_hvp.py --json hvp.json           # tiny 8x128, small 8x128, gpt2 1x128, with compile
    python bench/bench_hvp.py --device cuda --presets small,gpt2 --shape gpt2=8x1024
    python bench/bench_hvp.py --presets tiny --profile  # also: where the time of one HVP goes
"""

from __future__ import annotations

import os
import sys
import tempfile

if "--keep-compile-cache" not in sys.argv and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_hvp_inductor_")  # cold compiles

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from commute.bracket import grad, hvp, hvp_function, lie_bracket, tree_sub  # noqa: E402
from commute.curvature import domain_losses, math_attention  # noqa: E402
from commute.model import PRESETS, build_model  # noqa: E402

DEFAULT_SHAPES = {"tiny": (8, 128), "small": (8, 128), "gpt2": (1, 128)}
DEFAULT_VOCAB = {"tiny": 256, "small": 256, "gpt2": 50257}  # gpt2: the 124M model, GPT-2's own vocabulary
EAGER = ("rev-rev", "fwd-rev", "fwd-rev-vmap")


# --------------------------------------------------------------------------------------------------
# timing and memory
# --------------------------------------------------------------------------------------------------
class Clock:
    """Times one call: (CPU seconds of the process, wall seconds), synchronising CUDA around it."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, f: Callable[[], Any]) -> tuple[float, float]:
        self.sync()
        c0, w0 = time.process_time(), time.perf_counter()
        out = f()
        self.sync()
        c1, w1 = time.process_time(), time.perf_counter()
        del out
        return c1 - c0, w1 - w0


def peak_bytes(f: Callable[[], Any], device: torch.device) -> float | None:
    """Peak tensor memory of one call of f above what was allocated before it (None if not measurable)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = f()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return float(peak)
    if device.type != "cpu":
        return None
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = f()
        del out
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            allocs.append((e.start_time_ns, e.extra_fields.total_allocated, e.extra_fields.alloc_size))
        stack.extend(e.children)
    if not allocs:
        return None
    allocs.sort(key=lambda a: a[0])
    base = allocs[0][1] - allocs[0][2]  # the running total just before the first event
    return float(max(a[1] for a in allocs) - base)


def stats(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)),
            "p90": float(np.percentile(a, 90)), "n": len(xs)}


def flat(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([p[k].reshape(-1).double() for k in sorted(p)])


def rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    fb = flat(b)
    return float(torch.linalg.vector_norm(flat(a) - fb) / torch.linalg.vector_norm(fb))


# --------------------------------------------------------------------------------------------------
# one preset
# --------------------------------------------------------------------------------------------------
def bench_preset(preset: str, shape: tuple[int, int], args: argparse.Namespace, device: torch.device,
                 log: Callable[[str], None]) -> list[dict[str, Any]]:
    B, T = shape
    vocab = args.vocab or DEFAULT_VOCAB[preset]
    t_setup = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(preset, vocab_size=vocab, n_ctx=max(T, PRESETS[preset]["n_positions"]),
                        dtype=args.dtype).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, vocab, (B, T), generator=gen).to(device) for _ in range(2)]
    losses = domain_losses(model, {"a": [ids[0]], "b": [ids[1]]})
    loss = losses["a"]
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    n_params = sum(p.numel() for p in params.values())
    del model  # the losses keep it as the functional_call template; params are passed explicitly
    vgen = torch.Generator().manual_seed(2)
    vectors = [{k: torch.randn(p.shape, generator=vgen, dtype=p.dtype).to(device) for k, p in params.items()}
               for _ in range(max(args.ks))]
    clock = Clock(device)
    log(f"{preset}: {n_params / 1e6:.1f}M parameters, batch {B}x{T}, vocab {vocab}, "
        f"setup {time.perf_counter() - t_setup:.1f} s")
    rows: list[dict[str, Any]] = []
    base = {"preset": preset, "batch": f"{B}x{T}", "params_M": round(n_params / 1e6, 2),
            "device": str(device), "dtype": str(args.dtype).removeprefix("torch.")}

    def gradient() -> Any:
        return grad(loss, params)

    def timed_group(K: int | str, variants: dict[str, Callable[[], Any]], extra: dict[str, dict[str, Any]],
                    repeats: int) -> None:
        names = list(variants)
        ratios_c: dict[str, list[float]] = {n: [] for n in names}
        ratios_w: dict[str, list[float]] = {n: [] for n in names}
        abs_c: dict[str, list[float]] = {n: [] for n in names}
        grad_c: list[float] = []
        t0 = time.perf_counter()
        for r in range(repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            if r % 2:
                order.reverse()
            prev = clock(gradient)
            grad_c.append(prev[0])
            for n in order:
                c, w = clock(variants[n])
                nxt = clock(gradient)
                grad_c.append(nxt[0])
                ratios_c[n].append(c / (0.5 * (prev[0] + nxt[0])))
                ratios_w[n].append(w / (0.5 * (prev[1] + nxt[1])))
                abs_c[n].append(w if clock.cuda else c)
                prev = nxt
        log(f"  {preset} K={K}: {repeats} rounds in {time.perf_counter() - t0:.1f} s")
        peak_grad = None if args.no_mem else peak_bytes(gradient, device)
        g_ms = 1e3 * float(np.median(grad_c))
        rows.append({**base, "K": K, "variant": "grad", "ratio_cpu": stats([1.0]), "ratio_wall": stats([1.0]),
                     "ms": g_ms, "peak_MiB": None if peak_grad is None else peak_grad / 2**20,
                     "peak_x_grad": None if peak_grad is None else 1.0, "repeats": repeats})
        for n in names:
            peak = None if args.no_mem else peak_bytes(variants[n], device)
            rows.append({**base, "K": K, "variant": n, "ratio_cpu": stats(ratios_c[n]),
                         "ratio_wall": stats(ratios_w[n]), "ms": 1e3 * float(np.median(abs_c[n])),
                         "peak_MiB": None if peak is None else peak / 2**20,
                         "peak_x_grad": None if peak is None or not peak_grad else peak / peak_grad,
                         "repeats": repeats, **extra.get(n, {})})

    with math_attention(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*torch\.jit\.script.* is deprecated", DeprecationWarning)
        for K in args.ks:
            vs = vectors[:K]
            variants: dict[str, Callable[[], Any]] = {}
            extra: dict[str, dict[str, Any]] = {}
            ref = hvp_function(loss, "rev-rev")(params, vs)
            for mode in EAGER:
                fn = hvp_function(loss, mode)
                out = fn(params, vs)  # warm-up, and the check against rev-rev
                extra[mode] = {"err": max(rel_err(o, r) for o, r in zip(out, ref, strict=True))}
                variants[mode] = (lambda fn=fn, vs=vs: fn(params, vs))
            if args.compile and preset in args.compile_presets:
                mode = "fwd-rev" if K == 1 else "fwd-rev-vmap"
                torch._dynamo.reset()
                fn = hvp_function(loss, mode, compile=True, dynamic=False)
                try:
                    first = clock(lambda fn=fn, vs=vs: fn(params, vs))[1]
                    out = fn(params, vs)
                    steady = min(clock(lambda fn=fn, vs=vs: fn(params, vs))[1] for _ in range(2))
                    extra["compiled"] = {"err": max(rel_err(o, r) for o, r in zip(out, ref, strict=True)),
                                         "compile_s": first - steady, "compiled_mode": mode}
                    variants["compiled"] = (lambda fn=fn, vs=vs: fn(params, vs))
                    log(f"  {preset} K={K}: compiled {mode} in {first - steady:.1f} s")
                except Exception as e:  # report and skip: compile needs a C++ toolchain on CPU, etc.
                    reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''}"
                    log(f"  {preset} K={K}: torch.compile failed, skipped ({reason})")
                    rows.append({**base, "K": K, "variant": "compiled", "skipped": reason})
                if K == args.ks[0]:  # a compiled gradient, for scale: what compile alone buys a gradient
                    gfn = torch.compile(torch.func.grad(loss), dynamic=False)
                    try:
                        first = clock(lambda gfn=gfn: gfn(params))[1]
                        gfn(params)
                        steady = min(clock(lambda gfn=gfn: gfn(params))[1] for _ in range(2))
                        variants["grad-compiled"] = (lambda gfn=gfn: gfn(params))
                        extra["grad-compiled"] = {"compile_s": first - steady}
                    except Exception as e:
                        log(f"  {preset}: torch.compile of the gradient failed ({type(e).__name__})")
            del ref
            timed_group(K, variants, extra, args.repeats)
            torch._dynamo.reset()

        if args.bracket and not (args.quick and preset != args.presets[0]):
            la, lb = losses["a"], losses["b"]

            def composed() -> Any:  # the formula lie_bracket evaluated before it reused the HVP passes
                return tree_sub(hvp(lb, params, grad(la, params)), hvp(la, params, grad(lb, params)))

            new = lie_bracket(la, lb, params)
            extra = {"lie_bracket": {"err": rel_err(new, composed())}}
            timed_group("bracket", {"composed": composed, "lie_bracket": lambda: lie_bracket(la, lb, params)},
                        extra, args.repeats)
    return rows


# --------------------------------------------------------------------------------------------------
# profile of one HVP
# --------------------------------------------------------------------------------------------------
def profile_one(preset: str, shape: tuple[int, int], args: argparse.Namespace, device: torch.device) -> str:
    from torch.profiler import ProfilerActivity, profile

    B, T = shape
    vocab = args.vocab or DEFAULT_VOCAB[preset]
    torch.manual_seed(0)
    model = build_model(preset, vocab_size=vocab, n_ctx=max(T, PRESETS[preset]["n_positions"]),
                        dtype=args.dtype).to(device).eval()
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1)).to(device)
    loss = domain_losses(model, {"a": [ids]})["a"]
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    v = {k: torch.randn(p.shape, generator=torch.Generator().manual_seed(2), dtype=p.dtype).to(device)
         for k, p in params.items()}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out = []
    with math_attention(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*torch\.jit\.script.* is deprecated", DeprecationWarning)
        fns = {"grad": lambda: grad(loss, params)}
        fns.update({f"hvp {m}": (lambda fn=hvp_function(loss, m): fn(params, [v])) for m in EAGER})
        for name, f in fns.items():
            for _ in range(2):
                f()
            with profile(activities=acts) as prof:
                for _ in range(args.profile_calls):
                    f()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows,
                                              max_name_column_width=44)
            out.append(f"### {name} ({preset} {B}x{T}, {args.profile_calls} calls)\n\n```\n{table}\n```\n")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------
def fmt_ratio(s: dict[str, float], div: float = 1.0) -> str:
    return f"{s['median'] / div:.2f} [{s['p10'] / div:.2f}, {s['p90'] / div:.2f}]"


def markdown(rows: list[dict[str, Any]], device: torch.device) -> str:
    basis, other = ("wall", "CPU") if device.type == "cuda" else ("CPU", "wall")
    mem = "peak mem MiB (× grad)" + ("" if device.type == "cuda" else ", CPU allocator")
    head = ["preset", "B×T", "K", "variant", f"× grad ({basis}) med [p10, p90]", "per HVP",
            f"× grad ({other}) med [p10, p90]", f"ms ({basis})", mem, "compile s", "err vs rev-rev"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['preset']} | {r['batch']} | {r['K']} | {r['variant']} | skipped: "
                         f"{r['skipped']} | | | | | | |")
            continue
        main, second = ((r["ratio_wall"], r["ratio_cpu"]) if device.type == "cuda"
                        else (r["ratio_cpu"], r["ratio_wall"]))
        k = r["K"] if isinstance(r["K"], int) else 1
        per = f"{main['median'] / k:.2f}" if r["variant"] != "grad" and isinstance(r["K"], int) else ""
        peak = "n/a" if r["peak_MiB"] is None else (
            f"{r['peak_MiB']:.0f} ({r['peak_x_grad']:.2f})" if r["peak_x_grad"] is not None else
            f"{r['peak_MiB']:.0f}")
        variant = r["variant"] + (f" ({r['compiled_mode']})" if "compiled_mode" in r else "")
        lines.append("| " + " | ".join([
            r["preset"], r["batch"], str(r["K"]), variant,
            "1" if r["variant"] == "grad" else fmt_ratio(main), per,
            "1" if r["variant"] == "grad" else fmt_ratio(second), f"{r['ms']:.1f}", peak,
            f"{r['compile_s']:.1f}" if "compile_s" in r else "",
            f"{r['err']:.1e}" if "err" in r else "",
        ]) + " |")
    return "\n".join(lines)


def parse_shapes(items: list[str]) -> dict[str, tuple[int, int]]:
    shapes = dict(DEFAULT_SHAPES)
    for it in items:
        name, _, bt = it.partition("=")
        b, _, t = bt.lower().partition("x")
        shapes[name] = (int(b), int(t))
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    ap.add_argument("--presets", default=None, help="Comma-separated presets (default tiny,small,gpt2).")
    ap.add_argument("--shape", action="append", default=[], metavar="PRESET=BxT",
                    help=f"Batch shape per preset (default {DEFAULT_SHAPES}).")
    ap.add_argument("--ks", default="1,4", help="Numbers of vectors K (default 1,4).")
    ap.add_argument("--repeats", type=int, default=None,
                    help="Rounds per (preset, K) (default 15 tiny, 9 small, 3 gpt2; --quick 5, 3).")
    ap.add_argument("--vocab", type=int, default=None, help="Vocabulary (default 256; 50257 for gpt2).")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1; 0 = torch's).")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="Skip torch.compile.")
    ap.add_argument("--compile", dest="force_compile", action="store_true", help="Compile even with --quick.")
    ap.add_argument("--compile-presets", default=None, help="Presets to compile for (default: all run).")
    ap.add_argument("--keep-compile-cache", action="store_true",
                    help="Use inductor's usual cache (compile times then may be warm).")
    ap.add_argument("--no-bracket", dest="bracket", action="store_false", help="Skip the lie_bracket rows.")
    ap.add_argument("--no-mem", action="store_true", help="Skip the peak-memory calls.")
    ap.add_argument("--quick", action="store_true",
                    help="tiny and small, 5/3 rounds, no compile, bracket rows for the first preset only: "
                         "about 2 min of CPU time.")
    ap.add_argument("--profile", action="store_true", help="Also profile one HVP of the first preset.")
    ap.add_argument("--profile-calls", type=int, default=5)
    ap.add_argument("--profile-rows", type=int, default=15)
    ap.add_argument("--json", type=Path, default=None, help="Also write the rows (and profile) here.")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch.")
    if args.quick:
        args.compile = args.force_compile
        presets = args.presets or "tiny,small"
    else:
        presets = args.presets or "tiny,small,gpt2"
    args.presets = [p for p in presets.split(",") if p]
    args.compile_presets = args.compile_presets.split(",") if args.compile_presets else args.presets
    args.ks = [int(k) for k in args.ks.split(",")]
    args.dtype = getattr(torch, args.dtype)
    shapes = parse_shapes(args.shape)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    load0 = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for preset in args.presets:
        saved = args.repeats
        if args.repeats is None:
            args.repeats = {"tiny": 5, "small": 3, "gpt2": 2}[preset] if args.quick else \
                {"tiny": 15, "small": 9, "gpt2": 3}[preset]
        rows += bench_preset(preset, shapes[preset], args, device, log)
        args.repeats = saved
    prof = profile_one(args.presets[0], shapes[args.presets[0]], args, device) if args.profile else None
    elapsed = time.perf_counter() - t0
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "loadavg_start": load0,
        "loadavg_end": os.getloadavg(), "elapsed_s": elapsed,
        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
    }
    table = markdown(rows, device)
    print(table)
    print(f"\n{meta['command']}: {elapsed:.0f} s on {meta['device_name']} ({device}), "
          f"torch {torch.__version__}, "
          f"{meta['threads']} thread(s); load average {load0[0]:.1f} -> {meta['loadavg_end'][0]:.1f}. Ratios "
          f"are paired with the gradients timed around each call; peak memory is above what was allocated "
          f"before the call.")
    if prof:
        print("\n" + prof)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "table": table, "profile": prof},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
