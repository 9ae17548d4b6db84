"""Measured ceilings of the machine: bf16 GEMM TFLOP/s (torch.mm, cuBLAS) and device copy TB/s.

    python -m benchmarks.gpu_ceilings [--out-md F] [--out-json F] [--dry-run]

GEMMs: 8192^3 (the usual peak probe) and the two GEMMs of the frozen gate_proj layer at the Crab+ training shape
(forward x W^T: 4096 x 3584 -> 18944, backward dy W: 4096 x 18944 -> 3584); TFLOP/s = 2 M N K / time. Copy: a 1 GiB
``dst.copy_(src)``; TB/s counts the bytes read plus the bytes written. Times are the best of 3 rounds of back-to-back
calls measured with CUDA events (after a warm-up). A dry run measures tiny fp32 stand-ins on the CPU.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Sequence

from . import gpu_common as G


def _gemm_row(name: str, m: int, n: int, k: int, dtype, dev, transpose_b: bool) -> Dict:
    import torch

    a = torch.randn(m, k, device=dev, dtype=dtype)
    b = torch.randn(n, k, device=dev, dtype=dtype) if transpose_b else torch.randn(k, n, device=dev, dtype=dtype)
    rhs = b.t() if transpose_b else b
    out = torch.empty(m, n, device=dev, dtype=dtype)

    def fn():
        torch.mm(a, rhs, out=out)

    for _ in range(3):
        fn()
    G.sync(dev)
    one = G.time_ms(fn, dev, reps=1, rounds=1)
    reps = max(3, min(200, int(100.0 / max(one, 1e-3))))    # about 100 ms per round
    ms = G.time_ms(fn, dev, reps=reps)
    return {"name": name, "shape": f"{m}x{k} @ {k}x{n}", "dtype": str(dtype).split(".")[1], "ms": ms,
            "value": 2.0 * m * n * k / (ms * 1e-3) / 1e12, "unit": "TFLOP/s"}


def _copy_row(nbytes: int, dev) -> Dict:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)

    def fn():
        dst.copy_(src)

    for _ in range(3):
        fn()
    G.sync(dev)
    one = G.time_ms(fn, dev, reps=1, rounds=1)
    reps = max(3, min(200, int(100.0 / max(one, 1e-3))))
    ms = G.time_ms(fn, dev, reps=reps)
    return {"name": "device copy (read + write)", "shape": f"{nbytes / 2**20:.0f} MiB", "dtype": "uint8", "ms": ms,
            "value": 2.0 * nbytes / (ms * 1e-3) / 1e12, "unit": "TB/s"}


def measure(dry_run: bool) -> List[Dict]:
    """One row per probe: name, shape, dtype, ms, value, unit (errors become rows with ``error``)."""
    import torch

    dev = G.device(dry_run)
    if dry_run:
        dt = torch.float32
        probes = [("GEMM (CPU stand-in of 8192^3)", 256, 256, 256, False),
                  ("GEMM (CPU stand-in of gate_proj fwd)", 64, 296, 56, True)]
        copy_bytes = 16 * 2**20
    else:
        dt = torch.bfloat16
        probes = [("bf16 GEMM 8192^3", 8192, 8192, 8192, False),
                  ("bf16 GEMM gate_proj fwd x W^T", 4096, 18944, 3584, True),
                  ("bf16 GEMM gate_proj bwd dy W", 4096, 3584, 18944, False)]
        copy_bytes = 2**30
    rows: List[Dict] = []
    for name, m, n, k, tb in probes:
        try:
            rows.append(_gemm_row(name, m, n, k, dt, dev, tb))
        except Exception as exc:
            rows.append({"name": name, "error": G.error_text(exc)})
    try:
        rows.append(_copy_row(copy_bytes, dev))
    except Exception as exc:
        rows.append({"name": "device copy (read + write)", "error": G.error_text(exc)})
    return rows


def render(rows: Sequence[Dict], device_name: str, dry_run: bool) -> List[str]:
    lines = [f"## Measured ceilings: {device_name}" + (" (DRY RUN: CPU stand-ins, meaningless)" if dry_run else ""),
             "", "Best of 3 rounds of back-to-back calls (CUDA events; perf_counter in a dry run), after a warm-up.",
             ""]
    lines += G.md_table(["probe", "shape", "dtype", "ms", "value", "note"],
                        [[r["name"], r.get("shape", ""), r.get("dtype", ""),
                          f"{r['ms']:.4g}" if "ms" in r else "",
                          f"{r['value']:.4g} {r['unit']}" if "value" in r else "", r.get("error", "")]
                         for r in rows], right=(3, 4))
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_ceilings", description=__doc__.splitlines()[0])
    ap.add_argument("--out-md", default=None)
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--dry-run", action="store_true", help="tiny CPU stand-ins, no CUDA device needed")
    args = ap.parse_args(argv)
    G.prepare(args.dry_run)
    G.install_sigterm()
    import torch

    from .run import cpu_name

    name = cpu_name() if args.dry_run else torch.cuda.get_device_name()
    rows = measure(args.dry_run)
    lines = render(rows, name, args.dry_run)
    G.write_text(args.out_md, lines)
    by = {r["name"]: r for r in rows}
    gemm = next((r for r in rows if "8192" in r["name"] and "value" in r), None)
    copy = by.get("device copy (read + write)", {})
    G.write_json(args.out_json, {"device": name, "dry_run": args.dry_run, "rows": rows,
                                 "gemm_tflops": gemm["value"] if gemm else None, "copy_tbps": copy.get("value")})
    print("\n".join(lines))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
