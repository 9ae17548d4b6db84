"""Correctness of every GPU path against a float64 evaluation of SPEC section 1: the forward and every gradient.

    python -m benchmarks.gpu_correctness --backends reference,triton [--out-md F] [--out-json F] [--budget-s S]
    python -m benchmarks.gpu_correctness --backends cuda ...
    python -m benchmarks.gpu_correctness --dry-run ...        # tiny CPU stand-ins (cpu for cuda, Triton interpreted)

For every shape x dtype (bf16, fp16, fp32) x dropout p (0, 0.1) x backend, ``ilora_linear(..., backend=...)`` runs
forward and backward (``tests/fused_op_checks.run_layer``: the dropout seed pinned, so the mask is the one
``ilora_kernels._dropout.keep_mask`` regenerates) and y, g, dx, d router_weight, d lora_a, d lora_b are compared with
``tests/ilora_float64.float64_grads`` (the same inputs in float64). The error is max |got - want| / max |want|
(``fused_op_checks.rel_err``); "torch" is the error of the same math done by plain torch ops in that dtype
(``ilora_float64(..., dtype=...)`` against float64), and ``ratio`` = our error / torch's. PASS: within
``fused_op_checks.tolerance`` (fp32: 1e-4; fp16 / bf16: 4 x torch's error + 2 ulp).

Outputs are poisoned before the kernels write them: the Triton backend's allocation hook (``_empty``) returns
NaN-filled buffers, and on CUDA the caching allocator is pre-filled with NaN blocks of the outputs' sizes before the
forward and again when the backward starts (best effort for the C++/CUDA backend, whose allocations the hook cannot
reach). A NaN that survives makes the row fail with "non-finite".
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from . import gpu_common as G

TESTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")

OUTPUTS = ("y", "g", "dx", "d_router_weight", "d_lora_a", "d_lora_b")
# (name, N, d_in, d_out, K, r): a ragged tiny shape, a ragged mid-size one (d_in not a multiple of any tile), and two
# Crab+ training shapes
GPU_SHAPES = [("odd", 33, 17, 19, 3, 8), ("ragged", 301, 1000, 1500, 3, 128),
              ("qwen.q_proj", 4096, 3584, 3584, 3, 128), ("qwen.gate_proj", 4096, 3584, 18944, 3, 128)]
DRY_SHAPES = [("odd", 33, 17, 19, 3, 8), ("mini", 40, 64, 96, 3, 16)]
DROPOUTS = (0.0, 0.1)
SCALING = 2.0


def _helpers():
    """The tests' float64 reference, input generator and comparison helpers (imported, never copied)."""
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    import fused_op_checks
    import ilora_float64

    return fused_op_checks, ilora_float64


class _Patcher:
    """The ``monkeypatch`` argument of ``fused_op_checks.run_layer`` outside pytest; ``undo()`` restores."""

    def __init__(self):
        self._saved: List[Tuple[object, str, object]] = []

    def setattr(self, obj, name: str, value) -> None:
        self._saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def undo(self) -> None:
        while self._saved:
            obj, name, value = self._saved.pop()
            setattr(obj, name, value)


def _poison_allocator(dev, numels: Sequence[int], dtypes) -> None:
    """Leaves NaN-filled blocks of these sizes in the CUDA caching allocator, where the next allocations of those
    sizes find them."""
    import torch

    if dev.type != "cuda":
        return
    blocks = [torch.full((int(n),), float("nan"), dtype=dt, device=dev) for n in numels if n > 0 for dt in dtypes]
    del blocks


@contextlib.contextmanager
def poisoned_outputs(dev, numels_fwd: Sequence[int], numels_bwd: Sequence[int], dtypes) -> Iterator[List[str]]:
    """Within the block every ``ilora_kernels.ilora_linear`` call runs with poisoned output buffers (see the module
    docstring); yields the list of poisoning methods in force (for the report)."""
    import torch

    import ilora_kernels
    from ilora_kernels.ops import registry

    patch = _Patcher()
    methods: List[str] = []
    triton_mod = sys.modules.get("ilora_kernels.ops.triton_ilora")
    if "triton" in registry.registered and triton_mod is not None and hasattr(triton_mod, "_empty"):
        def nan_empty(*shape, dtype, device):
            return torch.full(shape, float("nan"), dtype=dtype, device=device)

        patch.setattr(triton_mod, "_empty", nan_empty)
        methods.append("triton _empty hook")
    if dev.type == "cuda":
        methods.append("CUDA allocator pre-filled with NaN")
        original = ilora_kernels.ilora_linear

        def poisoned_ilora_linear(*args, **kwargs):
            _poison_allocator(dev, numels_fwd, dtypes)
            out = original(*args, **kwargs)
            y = out[0] if isinstance(out, tuple) else out
            if y.requires_grad:
                y.register_hook(lambda grad: (_poison_allocator(dev, numels_bwd, dtypes), grad)[1])
            return out

        patch.setattr(ilora_kernels, "ilora_linear", poisoned_ilora_linear)
    try:
        yield methods
    finally:
        patch.undo()


def _torch_low_errors(foc, f64, inputs, p: float, seed: int, want: Dict) -> Dict[str, float]:
    """The error of plain torch ops in the inputs' dtype (the SPEC math in ``ilora_float64``) against float64."""
    import torch

    x, weight, b, router, lora_a, lora_b, dy = inputs
    leaves = [t.detach().clone().requires_grad_(req) for t, req in
              ((x, True), (router, True), (lora_a, True), (lora_b, True))]
    y, g = f64.ilora_float64(leaves[0], weight, b, leaves[1], leaves[2], leaves[3], SCALING, p, seed, None,
                             dtype=x.dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    got = dict(zip(OUTPUTS, [y, g] + list(grads)))
    return {k: foc.rel_err(got[k].detach(), want[k]) for k in OUTPUTS}


def _path_note(backend: str, n: int, d_out: int) -> str:
    """Which base GEMM the Triton backend takes at this size (its ``auto`` rule), for the report."""
    if backend != "triton":
        return ""
    mode_of = getattr(sys.modules.get("ilora_kernels.ops.triton_ilora"), "_base_gemm_mode", None)
    try:
        return f"base GEMM {mode_of(n, d_out)}" if mode_of else ""
    except Exception:
        return ""


def check_case(foc, f64, dev, shape, dtype, p: float, backends: Sequence[str], seed: int,
               deadline: G.Deadline) -> List[Dict]:
    """One shape x dtype x p: float64 and torch's own errors once, then every backend; one row per backend."""
    import torch

    from ilora_kernels.ops.registry import resolve

    name, n, d_in, d_out, heads, rank = shape
    dt_name = str(dtype).split(".")[1]
    base = {"shape": name, "dims": f"N={n} {d_in}->{d_out} K={heads} r={rank}", "dtype": dt_name, "p": p}
    inputs = [None if t is None else t.to(dev) for t in
              f64.make_inputs(n, d_in, d_out, heads, rank, "random", dtype, seed=seed, with_dy=True)]
    x, weight, b, router, lora_a, lora_b, dy = inputs
    want_y, _, want_g, want_grads = f64.float64_grads(x, weight, b, router, lora_a, lora_b, SCALING, p, seed, 0, dy)
    want = dict(zip(OUTPUTS, [want_y, want_g, want_grads[0], want_grads[3], want_grads[4], want_grads[5]]))
    torch_err = _torch_low_errors(foc, f64, inputs, p, seed, want)
    numels_fwd = [n * d_out, n * rank, n * heads, n * heads * rank, n * d_in]
    numels_bwd = [n * d_in, heads * d_in, rank * d_in, heads * d_out * rank, n * rank, n * heads, n * heads * rank]
    rows = []
    for backend in backends:
        row = {**base, "backend": backend, "errors": {}, "torch": torch_err}
        rows.append(row)
        if deadline.spent():
            row["status"] = "skipped: stage budget spent"
            continue
        try:
            resolve(backend, dev.type, dtype)
        except (RuntimeError, TypeError, ValueError) as exc:
            row["status"] = f"unavailable: {exc}"
            continue
        row["path"] = _path_note(backend, n, d_out)
        t0 = time.perf_counter()
        patch = _Patcher()
        try:
            with poisoned_outputs(dev, numels_fwd, numels_bwd, (dtype, torch.float32)) as methods:
                y, g, grads = foc.run_layer(backend, inputs, SCALING, p, seed, None, patch, False)
            G.sync(dev)
            got = dict(zip(OUTPUTS, [y, g, grads[0], grads[3], grads[4], grads[5]]))
            row["poison"] = ", ".join(methods) or "none (CPU allocator)"
            fails = []
            for out in OUTPUTS:
                if not bool(torch.isfinite(got[out]).all()):
                    row["errors"][out] = None
                    fails.append(f"{out} non-finite")
                    continue
                err = foc.rel_err(got[out], want[out])
                row["errors"][out] = err
                if err > foc.tolerance(dtype, torch_err[out]):
                    fails.append(out)
            row["status"] = "PASS" if not fails else "FAIL: " + ", ".join(fails)
        except G.Terminated:
            row["status"] = "terminated"
            raise
        except Exception as exc:
            row["status"] = f"ERROR: {G.error_text(exc)}"
        finally:
            patch.undo()  # run_layer pinned the dropout seed through ilora_kernels.functional._draw_seed
        row["seconds"] = time.perf_counter() - t0
    return rows


def worst_ratio(row: Dict) -> Optional[float]:
    """Largest error / torch's error over the outputs (None when nothing was measured)."""
    ratios = [e / max(row["torch"][k], 1e-30) for k, e in row.get("errors", {}).items() if e is not None]
    return max(ratios) if ratios else None


def render(rows: Sequence[Dict], header: Sequence[str]) -> List[str]:
    """The full table: one line per shape x dtype x p x backend, each output as error (ratio to torch's error)."""
    lines = list(header)
    table = []
    for r in rows:
        cells = []
        for out in OUTPUTS:
            e = r.get("errors", {}).get(out, "")
            if e is None:
                cells.append("NaN/inf")
            elif e == "":
                cells.append("")
            else:
                cells.append(f"{e:.2e} ({e / max(r['torch'][out], 1e-30):.2f}x)")
        w = worst_ratio(r)
        table.append([r["shape"], r["dims"], r["dtype"], f"{r['p']:g}", r["backend"], *cells,
                      "" if w is None else f"{w:.2f}x", r.get("status", ""), r.get("path", ""),
                      r.get("poison", ""), f"{r['seconds']:.1f}" if "seconds" in r else ""])
    lines += G.md_table(["shape", "dims", "dtype", "p", "backend", *OUTPUTS, "worst ratio", "status", "path",
                         "poisoned by", "s"], table)
    torch_rows = {}
    for r in rows:
        torch_rows.setdefault((r["shape"], r["dtype"], r["p"]), r["torch"])
    lines += ["", "PyTorch's own error (the same math in plain torch ops in that dtype, against float64):", ""]
    lines += G.md_table(["shape", "dtype", "p", *OUTPUTS],
                        [[s, d, f"{p:g}", *(f"{t[o]:.2e}" for o in OUTPUTS)] for (s, d, p), t in torch_rows.items()])
    return lines


def summary_rows(rows: Sequence[Dict]) -> List[Tuple[str, str, str]]:
    """(backend, "dtype p=..", verdict) over the shapes: PASS with the worst ratio, FAIL naming what, or the first
    other status (unavailable, error)."""
    cells: Dict[Tuple[str, str], List[Dict]] = {}
    for r in rows:
        cells.setdefault((r["backend"], f"{r['dtype']} p={r['p']:g}"), []).append(r)
    out = []
    for (backend, col), rs in cells.items():
        statuses = [r.get("status", "") for r in rs]
        ratios = [w for w in (worst_ratio(r) for r in rs) if w is not None]
        worst = f" {max(ratios):.2f}x" if ratios else ""
        if all(s == "PASS" for s in statuses):
            verdict = "PASS" + worst
        elif any(s.startswith(("FAIL", "ERROR")) for s in statuses):
            bad = [f"{r['shape']}: {r['status']}" for r in rs if r.get("status", "").startswith(("FAIL", "ERROR"))]
            verdict = "FAIL" + worst + " (" + "; ".join(bad)[:160] + ")"
        else:
            other = next(s for s in statuses if s != "PASS")
            verdict = other[:120]
        out.append((backend, col, verdict))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_correctness", description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="reference,triton,cuda", help="comma-separated (cuda -> cpu in a dry run)")
    ap.add_argument("--dtypes", default="bfloat16,float16,float32")
    ap.add_argument("--shapes", default=None, help="comma-separated shape names (default: all)")
    ap.add_argument("--out-md", default=None)
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting backends after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="tiny CPU stand-ins, no CUDA device needed")
    args = ap.parse_args(argv)
    G.prepare(args.dry_run)
    G.install_sigterm()
    import torch

    foc, f64 = _helpers()
    dev = G.device(args.dry_run)
    backends = [G.backend_for_run(b.strip(), args.dry_run) for b in args.backends.split(",") if b.strip()]
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",") if d.strip()]
    shapes = DRY_SHAPES if args.dry_run else GPU_SHAPES
    if args.shapes:
        wanted = {s.strip() for s in args.shapes.split(",")}
        shapes = [s for s in shapes if s[0] in wanted]
    deadline = G.Deadline(args.budget_s)
    from .run import cpu_name

    dev_name = cpu_name() if args.dry_run else torch.cuda.get_device_name()
    header = [f"## Correctness against float64 (SPEC section 1): {dev_name}, backends {', '.join(backends)}"
              + (" (DRY RUN: CPU stand-ins)" if args.dry_run else ""), "",
              "Cell: max |got - want| / max |want| (ratio to PyTorch's own error in that dtype). PASS: fp32 <= 1e-4, "
              "fp16 / bf16 <= 4 x PyTorch's error + 2 ulp. Routing random, bias on, scaling 2, dropout mask from "
              "the pinned seed; outputs poisoned with NaN before the kernels write (column 'poisoned by').", ""]
    rows: List[Dict] = []
    started = time.perf_counter()

    def flush(done: bool) -> None:
        G.write_text(args.out_md, render(rows, header))
        G.write_json(args.out_json, {"device": dev_name, "dry_run": args.dry_run, "backends": backends,
                                     "complete": done, "seconds": time.perf_counter() - started, "rows": rows})

    rc = 0
    try:
        # bf16 first (the dtype that matters on the GPU), so a spent budget drops fp32 rather than bf16
        for dtype in dtypes:
            for p in DROPOUTS:
                for i, shape in enumerate(shapes):
                    seed = 1234567 + 1000 * i + int(p * 100)
                    if deadline.spent():
                        rows += [{"shape": shape[0], "dims": "", "dtype": str(dtype).split(".")[1], "p": p,
                                  "backend": b, "errors": {}, "torch": {}, "status": "skipped: stage budget spent"}
                                 for b in backends]
                        continue
                    try:
                        rows += check_case(foc, f64, dev, shape, dtype, p, backends, seed, deadline)
                    except G.Terminated:
                        raise
                    except Exception as exc:  # the float64 reference itself failed (e.g. out of memory)
                        rows += [{"shape": shape[0], "dims": "", "dtype": str(dtype).split(".")[1], "p": p,
                                  "backend": b, "errors": {}, "torch": {},
                                  "status": f"ERROR (reference): {G.error_text(exc)}"} for b in backends]
                        if dev.type == "cuda":
                            torch.cuda.empty_cache()
                    flush(False)
                    G.log(f"correctness {shape[0]} {dtype} p={p}: "
                          + ", ".join(f"{r['backend']} {r.get('status', '')[:40]}" for r in rows[-len(backends):]))
    except G.Terminated as exc:
        G.log(f"terminated ({exc}): writing what was checked")
        rc = 130
    flush(rc == 0)
    print("\n".join(G.text_table(["backend", "dtype / p", "verdict (worst error ratio to PyTorch's)"],
                                 summary_rows(rows))))
    if rc == 0 and any(r.get("status", "").startswith(("FAIL", "ERROR")) for r in rows):
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
