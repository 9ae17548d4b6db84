"""One Triton tile sweep at Crab+ shapes: every ``_base_expand_kernel`` GEMM config of ``_gemm_configs`` and a grid of
``_shrink_route_kernel`` (BLOCK_M, BLOCK_D, num_warps) launches, each timed alone, with registers and spills.

    python -m benchmarks.gpu_sweep [--out-md F] [--out-json F] [--budget-s 60] [--dry-run]

bf16, N = 4096, r = 128, K = 3. The GEMM (``y = [x | u] [W | s B_cat]^T``) at q_proj (3584 -> 3584), gate_proj
(3584 -> 18944) and down_proj (18944 -> 3584), next to cuBLAS doing the same work (``addmm`` + ``addmm_``, the
``ILORA_TRITON_BASE_GEMM=cublas`` path) and the base GEMM alone; the shrink-route kernel at d_in 3584 and 18944 (no
dropout), the backend's current choice marked. Kernels are launched directly with the arguments the backend passes
(matched by name, so a changed signature is reported, not guessed); each launch is checked against a float32 torch
evaluation (``max rel err``) and timed with ``triton.testing.do_bench`` (median, L2 flushed between calls).
Registers / spills / shared memory come from the compiled kernel. The stage stops starting configs when its budget is
spent (those rows say so). A dry run uses tiny fp32 shapes under TRITON_INTERPRET=1 (no timings worth reading, no
register counts).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Dict, List, Optional, Sequence

from . import gpu_common as G

GEMM_SHAPES = [("qwen.q_proj", 4096, 3584, 3584), ("qwen.gate_proj", 4096, 3584, 18944),
               ("qwen.down_proj", 4096, 18944, 3584)]
SHRINK_SHAPES = [("d_in 3584 (q/k/v/gate/up)", 4096, 3584), ("d_in 18944 (down)", 4096, 18944)]
DRY_GEMM_SHAPES = [("tiny", 40, 64, 96)]
DRY_SHRINK_SHAPES = [("tiny", 40, 64)]
RANK, HEADS, SCALING = 128, 3, 2.0
SHRINK_GRID = [(bm, bd, w) for bm in (32, 64, 128) for bd in (32, 64, 128) for w in (4, 8)]
DRY_SHRINK_GRID = [(32, 32, 4), (64, 64, 8)]


class SignatureChanged(Exception):
    """The kernel takes arguments this sweep does not know how to fill."""


def _launch(kernel, grid, values: Dict, meta: Dict):
    """Launches ``kernel`` with its arguments taken by name from ``values`` (tensors, sizes, strides, flags) and
    ``meta`` (tile sizes, num_warps, num_stages); returns the compiled kernel (None under the interpreter)."""
    names = list(getattr(kernel, "arg_names", []))
    missing = [n for n in names if n not in values and n not in meta]
    if missing or not names:
        raise SignatureChanged(f"{getattr(kernel, '__name__', kernel)} takes {missing or 'unknown arguments'} "
                               f"that benchmarks/gpu_sweep.py does not fill: update the sweep")
    kwargs = {n: (meta[n] if n in meta else values[n]) for n in names}
    for extra in ("num_warps", "num_stages"):
        if extra in meta:
            kwargs[extra] = meta[extra]
    return kernel[grid](**kwargs)


def _compiled_info(compiled) -> Dict:
    if compiled is None:
        return {}
    info = {}
    for key in ("n_regs", "n_spills"):
        v = getattr(compiled, key, None)
        if isinstance(v, int):
            info[key] = v
    shared = getattr(getattr(compiled, "metadata", None), "shared", None)
    if isinstance(shared, int):
        info["shared_kib"] = shared / 1024
    return info


def _bench(fn, dev) -> float:
    if dev.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5, rep=25, return_mode="median"))
    return G.time_ms(fn, dev, reps=1, rounds=2)


def _rel_err(got, want) -> float:
    return float((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _gemm_shape(T, dev, dtype, name: str, n: int, d_in: int, d_out: int, deadline: G.Deadline) -> List[Dict]:
    import torch
    import triton

    rows: List[Dict] = []
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, d_in, device=dev, dtype=dtype, generator=gen)
    w = torch.randn(d_out, d_in, device=dev, dtype=dtype, generator=gen) * d_in ** -0.5
    u = torch.randn(n, HEADS * RANK, device=dev, dtype=dtype, generator=gen)
    lora_b = torch.randn(HEADS, d_out, RANK, device=dev, dtype=dtype, generator=gen) * 0.02
    b_cat = lora_b.permute(1, 0, 2).reshape(d_out, HEADS * RANK)
    y = torch.empty(n, d_out, device=dev, dtype=dtype)
    want = x.float() @ w.float().t() + SCALING * (u.float() @ b_cat.float().t())
    shape = f"{name} N={n} {d_in}->{d_out} K r={HEADS * RANK}"
    values = dict(x_ptr=x, w_ptr=w, b_ptr=w, u_ptr=u, lb_ptr=lora_b, y_ptr=y, N=n, d_out=d_out, d_in=d_in,
                  KR=HEADS * RANK, R=RANK, N_BUCKET=min(triton.next_power_of_2(n), 8192),
                  sxm=x.stride(0), sxk=x.stride(1), swn=w.stride(0), swk=w.stride(1), sb0=lora_b.stride(0),
                  sb1=lora_b.stride(1), sb2=lora_b.stride(2), sym=y.stride(0), syn=y.stride(1), sbias=1,
                  scaling=SCALING, HAS_BIAS=False, IEEE=dtype == torch.float32)
    for cfg in T._gemm_configs():
        meta = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        label = (f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']} g{meta.get('GROUP_M', '-')} "
                 f"w{cfg.num_warps} s{cfg.num_stages}")
        row = {"kernel": "_base_expand_kernel", "shape": shape, "config": label}
        rows.append(row)
        if deadline.spent():
            row["error"] = "skipped: stage budget spent"
            continue
        grid = (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(d_out, meta["BLOCK_N"]),)
        launch = functools.partial(_launch, T._base_expand_kernel, grid,
                                   dict(values, EVEN_K=d_in % meta["BLOCK_K"] == 0), meta)
        if not _measure(row, launch, dev, y, lambda: _rel_err(y, want)):
            break

    def cublas_both():
        torch.mm(x, w.t(), out=y).addmm_(u, b_cat.t(), alpha=SCALING)

    def cublas_base():
        torch.mm(x, w.t(), out=y)

    for label, fn in (("cuBLAS addmm(x, W^T) + addmm_(u, B_cat^T) (ILORA_TRITON_BASE_GEMM=cublas)", cublas_both),
                      ("cuBLAS base only: mm(x, W^T) (the floor of the base part)", cublas_base)):
        row = {"kernel": "cublas", "shape": shape, "config": label}
        rows.append(row)
        if deadline.spent():
            row["error"] = "skipped: stage budget spent"
            continue
        try:
            fn()
            G.sync(dev)
            if fn is cublas_both:
                row["max_rel_err"] = _rel_err(y, want)
            row["ms"] = _bench(fn, dev)
        except Exception as exc:
            row["error"] = G.error_text(exc)
    return rows


def sweep_gemm(T, dev, dtype, shapes, deadline: G.Deadline) -> List[Dict]:
    """Every config of ``T._gemm_configs()`` (the autotuner's list) plus the cuBLAS paths, per shape."""
    import torch

    rows: List[Dict] = []
    for name, n, d_in, d_out in shapes:
        rows += _gemm_shape(T, dev, dtype, name, n, d_in, d_out, deadline)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if any("does not fill" in r.get("error", "") for r in rows):
            break
    return rows


def _measure(row: Dict, launch, dev, poisoned, error, result: Optional[str] = None) -> bool:
    """One sweep row: ``poisoned`` filled with NaN, one launch (its compile time; the compiled kernel's registers
    and spills, or ``row[result]`` = what the launch returned), ``row["max_rel_err"] = error()``, then the timing.
    Failures become ``row["error"]``; returns False when the kernel's signature changed (stop the sweep)."""
    try:
        t0 = time.perf_counter()
        poisoned.fill_(float("nan"))
        out = launch()
        G.sync(dev)
        row["compile_s"] = time.perf_counter() - t0
        row["max_rel_err"] = error()
        if result is None:
            row.update(_compiled_info(out))
        else:
            row[result] = out
        row["ms"] = _bench(launch, dev)
    except SignatureChanged as exc:
        row["error"] = str(exc)
        return False
    except G.Terminated:
        raise
    except Exception as exc:
        row["error"] = G.error_text(exc)
    return True


def _current_shrink_choice(T, rank_pow2: int, interpret: bool):
    """The (BLOCK_M, BLOCK_D, num_warps) the backend launches today (``triton_ilora._shrink_route_tile``)."""
    tile = T._shrink_route_tile(rank_pow2, interpret)
    return (tile["BLOCK_M"], tile["BLOCK_D"], tile["num_warps"])


def _shrink_shape(T, dev, dtype, name: str, n: int, d_in: int, grid_configs, deadline: G.Deadline,
                  interpret: bool) -> List[Dict]:
    import torch
    import triton

    rows: List[Dict] = []
    gen = torch.Generator(device=dev).manual_seed(1)
    kp, rp = max(16, triton.next_power_of_2(HEADS)), max(16, triton.next_power_of_2(RANK))
    current = _current_shrink_choice(T, rp, interpret)
    x = torch.randn(n, d_in, device=dev, dtype=dtype, generator=gen)
    wr = torch.randn(HEADS, d_in, device=dev, dtype=dtype, generator=gen) * d_in ** -0.5
    a = torch.randn(RANK, d_in, device=dev, dtype=dtype, generator=gen) * d_in ** -0.5
    h = torch.empty(n, RANK, device=dev, dtype=dtype)
    g = torch.empty(n, HEADS, device=dev, dtype=torch.float32)
    u = torch.empty(n, HEADS * RANK, device=dev, dtype=dtype)
    want_h = x.float() @ a.float().t()
    want_g = torch.softmax(x.float() @ wr.float().t(), dim=-1)
    shape = f"{name} N={n} r={RANK} K={HEADS}"
    values = dict(x_ptr=x, wr_ptr=wr, a_ptr=a, h_ptr=h, g_ptr=g, u_ptr=u, N=n, d_in=d_in, K=HEADS, R=RANK,
                  KR=HEADS * RANK, sxm=x.stride(0), sxk=x.stride(1), swr0=wr.stride(0), swr1=wr.stride(1),
                  sa0=a.stride(0), sa1=a.stride(1), seed=0, threshold=0, drop_scale=1.0, HAS_DROPOUT=False,
                  TOP_K=0, IEEE=dtype == torch.float32, KP=kp, RP=rp)
    for bm, bd, warps in grid_configs:
        meta = dict(BLOCK_M=bm, BLOCK_D=bd, num_warps=warps, num_stages=1 if interpret else 4)
        label = f"BLOCK_M={bm} BLOCK_D={bd} w{warps} s{meta['num_stages']}" + \
            (" (current)" if (bm, bd, warps) == current else "")
        row = {"kernel": "_shrink_route_kernel", "shape": shape, "config": label, "programs": triton.cdiv(n, bm)}
        rows.append(row)
        if deadline.spent():
            row["error"] = "skipped: stage budget spent"
            continue
        launch = functools.partial(_launch, T._shrink_route_kernel, (triton.cdiv(n, bm),), values, meta)
        if not _measure(row, launch, dev, h, lambda: max(_rel_err(h, want_h), _rel_err(g, want_g))):
            break
    # the split d_in reduction (partial kernel + reduce kernel, timed together through the backend's launcher):
    # 1 = the single kernel, against the auto rule's choice and a few forced counts
    tile = T._shrink_route_tile(rp, interpret)
    sms = None if interpret else torch.cuda.get_device_properties(dev).multi_processor_count
    auto = T._shrink_split(n, d_in, tile["BLOCK_M"], tile["BLOCK_D"], sms)
    for split in dict.fromkeys([1, auto, 2, 3, 4, 6, 8]):
        row = {"kernel": "_shrink_route_kernel", "shape": shape,
               "config": f"split={split} (both launches)" + (" (auto)" if split == auto else ""),
               "programs": triton.cdiv(n, tile["BLOCK_M"]) * split}
        rows.append(row)
        if deadline.spent():
            row["error"] = "skipped: stage budget spent"
            continue
        launch = functools.partial(T._launch_shrink_route, x, wr, a, h, g, u, 0.0, 0, 0, split=split)
        _measure(row, launch, dev, h, lambda: max(_rel_err(h, want_h), _rel_err(g, want_g)), result="split_run")
    return rows


def sweep_shrink(T, dev, dtype, shapes, grid_configs, deadline: G.Deadline, interpret: bool) -> List[Dict]:
    """The (BLOCK_M, BLOCK_D, num_warps) grid of the shrink-route kernel, per d_in."""
    rows: List[Dict] = []
    for name, n, d_in in shapes:
        rows += _shrink_shape(T, dev, dtype, name, n, d_in, grid_configs, deadline, interpret)
        if any("does not fill" in r.get("error", "") for r in rows):
            break
    return rows


def render(rows: Sequence[Dict], header: Sequence[str]) -> List[str]:
    lines = list(header)
    by_shape: Dict[tuple, List[Dict]] = {}
    for r in rows:
        by_shape.setdefault((r["kernel"] == "_shrink_route_kernel", r["shape"]), []).append(r)
    for (shrink, shape), rs in by_shape.items():
        timed = [r["ms"] for r in rs if r.get("ms") and r["kernel"] != "cublas" and r.get("max_rel_err", 1) < 0.05]
        best = min(timed) if timed else None
        lines += ["", f"### {'shrink-route' if shrink else 'base + expand GEMM'}: {shape}", ""]
        lines += G.md_table(
            ["kernel", "config", "ms (median)", "vs best Triton", "max rel err", "regs", "spills", "shared KiB",
             "compile s", "note"],
            [[r["kernel"], r["config"], f"{r['ms']:.4g}" if r.get("ms") else "",
              f"{r['ms'] / best:.2f}x" if r.get("ms") and best else "",
              f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "", r.get("n_regs", ""), r.get("n_spills", ""),
              f"{r['shared_kib']:.0f}" if "shared_kib" in r else "",
              f"{r['compile_s']:.1f}" if "compile_s" in r else "", r.get("error", "")] for r in rs],
            right=(2, 3, 4, 5, 6, 7, 8))
    return lines


def best_of(rows: Sequence[Dict]) -> List[Dict]:
    """Per kernel x shape: the fastest correct config and the current / default one (for the summary)."""
    out = []
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["shape"]), []).append(r)
    for (kernel, shape), rs in groups.items():
        ok = [r for r in rs if r.get("ms") and (kernel == "cublas" or r.get("max_rel_err", 1) < 0.05)]
        if not ok:
            errs = [r.get("error", "") for r in rs if r.get("error")]
            out.append({"kernel": kernel, "shape": shape, "error": errs[0] if errs else "nothing timed"})
            continue
        best = min(ok, key=lambda r: r["ms"])
        out.append({"kernel": kernel, "shape": shape, "best": best["config"], "ms": best["ms"],
                    "spills": sorted({r.get("n_spills") for r in rs if r.get("n_spills")}),
                    "configs": len(rs), "timed": len(ok)})
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--out-md", default=None)
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--budget-s", type=float, default=60.0, help="stop starting configs after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="tiny fp32 shapes under TRITON_INTERPRET=1 on the CPU")
    args = ap.parse_args(argv)
    G.prepare(args.dry_run)
    G.install_sigterm()
    import torch

    from .run import cpu_name

    dev = G.device(args.dry_run)
    dev_name = cpu_name() if args.dry_run else torch.cuda.get_device_name()
    deadline = G.Deadline(args.budget_s)
    header = [f"## Triton tile sweep: {dev_name}" + (" (DRY RUN: interpreter, tiny fp32 shapes)" if args.dry_run
                                                      else " (bf16)"), "",
              f"r={RANK}, K={HEADS}; each launch alone (do_bench median, L2 flushed); max rel err against float32 "
              f"torch; budget {args.budget_s:g} s (configs past it are marked skipped). 'vs best Triton' counts only "
              f"configs with max rel err < 5e-2.", ""]
    rows: List[Dict] = []
    error = None
    try:
        from ilora_kernels.ops import triton_ilora as T
    except Exception as exc:
        error = f"the Triton backend does not import: {G.error_text(exc)}"
    if error is None:
        dtype = torch.float32 if args.dry_run else torch.bfloat16
        try:
            rows += sweep_gemm(T, dev, dtype, DRY_GEMM_SHAPES if args.dry_run else GEMM_SHAPES, deadline)
            rows += sweep_shrink(T, dev, dtype, DRY_SHRINK_SHAPES if args.dry_run else SHRINK_SHAPES,
                                 DRY_SHRINK_GRID if args.dry_run else SHRINK_GRID, deadline, args.dry_run)
        except G.Terminated as exc:
            error = f"terminated ({exc}): the rows so far"
        except Exception as exc:
            error = f"sweep failed: {G.error_text(exc)}"
    lines = render(rows, header + ([f"**{error}**", ""] if error else []))
    G.write_text(args.out_md, lines)
    G.write_json(args.out_json, {"device": dev_name, "dry_run": args.dry_run, "error": error, "rows": rows,
                                 "best": best_of(rows)})
    print("\n".join(lines))
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
