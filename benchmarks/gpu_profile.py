"""Per-kernel profile of one forward + backward per competitor at the gate_proj shape (torch.profiler).

    python -m benchmarks.gpu_profile [--competitors base,peft,reference,triton,cuda] [--dropouts 0,0.1]
                                     [--out-txt F] [--out-json F] [--dry-run]

The competitors of the GPU suite (``benchmarks/competitors.py``, the same inputs and autograd), bf16, gate_proj
3584 -> 18944, N = 4096, r = 128, K = 3. Each is warmed up (compilation, autotuning), then one fwd+bwd runs under
``torch.profiler``; the table lists every CUDA kernel (and memcpy / memset) with its GPU time, sorted, plus the sum
(GPU busy time), the kernel count (launches) and the host wall time of the profiled call. A dry run profiles a tiny
CPU stand-in (the cpu backend for cuda): ATen ops by self CPU time, no CUDA kernels.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List, Optional, Sequence

from . import gpu_common as G

NAME_WIDTH = 96


def _kernel_rows(prof, cuda: bool) -> List[Dict]:
    """(name, calls, self time us) of the GPU kernels (CUDA) or the ATen ops (CPU), slowest first."""
    import torch

    rows = []
    for e in prof.key_averages():
        if cuda:
            if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(e, "self_device_time_total", None)
            if us is None:
                us = getattr(e, "self_cuda_time_total", 0.0)
        else:
            us = e.self_cpu_time_total
        if us and us > 0:
            rows.append({"name": e.key, "calls": e.count, "us": float(us)})
    rows.sort(key=lambda r: -r["us"])
    return rows


def profile_one(name: str, case, dev, dtype) -> Dict:
    """One fwd+bwd of competitor ``name`` under the profiler (after two warm-up calls)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from . import competitors as C

    inp = C.make_inputs(case, dev, dtype, seed=0)
    runner = C.build(name, inp, case)
    for _ in range(2):
        runner.fwdbwd()
    G.sync(dev)
    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        runner.fwdbwd()
        G.sync(dev)
        wall_ms = (time.perf_counter() - t0) * 1e3
    kernels = _kernel_rows(prof, cuda)
    del runner, inp
    if cuda:
        torch.cuda.empty_cache()
    return {"competitor": name, "wall_ms": wall_ms, "kernels": kernels,
            "busy_us": sum(k["us"] for k in kernels), "launches": sum(k["calls"] for k in kernels)}


def render(results: Sequence[Dict], header: Sequence[str], cuda: bool, top: int = 25) -> List[str]:
    lines = list(header)
    what = "GPU kernels" if cuda else "ATen ops (self CPU time)"
    for r in results:
        lines += ["", f"== {r['competitor']} ({r['case']}): "
                  + (r["error"] if "error" in r else
                     f"{len(r['kernels'])} distinct {what}, {r['launches']} {'launches' if cuda else 'op calls'}, "
                     f"busy {r['busy_us'] / 1e3:.3f} ms, host wall {r['wall_ms']:.3f} ms")]
        if "error" in r:
            continue
        lines.append(f"{'us':>10} {'share':>7} {'calls':>6}  name")
        for k in r["kernels"][:top]:
            lines.append(f"{k['us']:>10.1f} {100 * k['us'] / max(r['busy_us'], 1e-9):>6.1f}% {k['calls']:>6}  "
                         f"{k['name'][:NAME_WIDTH]}")
        if len(r["kernels"]) > top:
            rest = r["kernels"][top:]
            lines.append(f"{sum(k['us'] for k in rest):>10.1f} {'':>7} {sum(k['calls'] for k in rest):>6}  "
                         f"({len(rest)} more)")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_profile", description=__doc__.splitlines()[0])
    ap.add_argument("--competitors", default="base,peft,reference,triton,cuda")
    ap.add_argument("--dropouts", default="0,0.1", help="dropout p values to profile (ours only for p > 0)")
    ap.add_argument("--out-txt", default=None)
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--dry-run", action="store_true", help="a tiny CPU stand-in, no CUDA device needed")
    args = ap.parse_args(argv)
    G.prepare(args.dry_run)
    G.install_sigterm()
    import torch

    from . import competitors as C
    from . import suites as S
    from .run import cpu_name

    dev = G.device(args.dry_run)
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    if args.dry_run:
        C.ALLOW_INTERPRETED_TRITON = True
    dev_name = cpu_name() if args.dry_run else torch.cuda.get_device_name()
    names = [G.backend_for_run(c.strip(), args.dry_run) for c in args.competitors.split(",") if c.strip()]
    dropouts = [float(p) for p in args.dropouts.split(",") if p.strip()]
    header = [f"Per-kernel profile of one fwd+bwd (torch.profiler): {dev_name}, {str(dtype).split('.')[1]}"
              + (" (DRY RUN: tiny CPU stand-in, ATen ops, no CUDA kernels)" if args.dry_run else ""),
              "Competitors as in the GPU suite (benchmarks/competitors.py), after two warm-up calls; times are "
              "each kernel's GPU time summed over its calls; 'busy' is their sum."]
    results: List[Dict] = []
    rc = 0
    try:
        for p in dropouts:
            case = S._case("qwen.gate_proj", 4096, S.RANKS["crab+"], dropout=p)
            if args.dry_run:
                case = S.dry_run_stand_in(case)
            for name in names:
                if p > 0 and name in ("base",):
                    continue  # no dropout in the frozen layer: its p = 0 profile stands
                try:
                    res = profile_one(name, case, dev, dtype)
                except C.Unavailable as exc:
                    res = {"competitor": name, "error": f"unavailable: {exc}"}
                except G.Terminated:
                    raise
                except Exception as exc:
                    res = {"competitor": name, "error": G.error_text(exc)}
                    rc = 1
                res["case"] = case.label
                results.append(res)
                G.log(f"profile {case.label} {name}: " + (res.get("error") or f"busy {res['busy_us'] / 1e3:.3f} ms"))
    except G.Terminated as exc:
        G.log(f"terminated ({exc}): writing the profiles so far")
        rc = 130
    lines = render(results, header, dev.type == "cuda")
    G.write_text(args.out_txt, lines)
    G.write_json(args.out_json, {"device": dev_name, "dry_run": args.dry_run,
                                 "results": [{k: v for k, v in r.items() if k != "kernels"}
                                             | {"top": r.get("kernels", [])[:5]} for r in results]})
    print("\n".join(lines))
    return rc


if __name__ == "__main__":
    sys.exit(main())
