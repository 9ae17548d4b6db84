"""Ahead-of-time compile report of the Triton backend: every default config of every kernel, compiled for sm_80 and
sm_90a without a GPU, with the registers, spills and shared memory of each.

    python -m ilora_kernels.ops.triton_aot [--arch sm_80 sm_90a] [--dtype bf16 fp16] [--json PATH] [--jobs N]

exits 1 when a default config spills registers or needs more shared memory than the target gives one block
(sm_80: 163 KB, sm_90a: 227 KB of dynamic shared memory), 3 when Triton's CUDA backend cannot compile on this machine
(no ``ptxas``), 0 otherwise.

What is compiled is what the launchers of ``ops/triton_ilora.py`` launch on a GPU, at the Crab+ shapes (d_in -> d_out
3584 -> 3584, 3584 -> 512, 3584 -> 18944, 18944 -> 3584; N = 4096 and 16 forward and backward, N = 1 forward (decode);
r = 128, K = 3; bf16 and fp16; dropout 0 and 0.1; with and without bias): the tile constants come from the launchers'
own tile functions (``_shrink_route_tile``, ``_shrink_split`` with the target's SM count (so at N = 4096 the split
shrink-route kernels ``_shrink_route_partial_kernel`` + ``_route_reduce_kernel`` are compiled instead of the single
one), ``_route_reduce_tile``, ``_expand_backward_tile``, ``_shrink_backward_tile``, ``_dx_tile``, the autotune
list ``_gemm_configs`` as ``_prune_gemm_configs`` leaves it, ``_DETERMINISTIC_TILE``), the arguments are those of
the launch, and Triton's own argument specialisation (16-divisible integers and pointers, integers equal to
1) is applied to them, so every launch that compiles to the same binary is compiled once. "Default" means every
config that runs without an opt-in setting: the fused base + expand GEMM's autotune candidates count although the
``auto`` mode only runs that kernel for N * d_out <= 4M (the others need ILORA_TRITON_BASE_GEMM=fused); the fused-V
variant of the expand backward (ILORA_TRITON_FUSED_V=1) is reported but never fails the report.

Registers and spills are read from the ``ptxas -v`` log of Triton's own ptxas call, shared memory from the
compiled kernel's metadata (what the launch requests). Kernels compile as a GPU run compiles them, so a process where
Triton runs under its interpreter (TRITON_INTERPRET=1, which makes even triton.language's helpers interpreted) cannot
compile them: there ``report_in_subprocess()`` runs the command above in a fresh process.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = ["CRAB_SHAPES", "TARGETS", "Launch", "Row", "Unavailable", "backend_module", "compile_report",
           "crab_launches", "default_launches", "format_table", "main", "report_in_subprocess"]

_BACKEND = "ilora_kernels.ops.triton_ilora"

# target name -> (compute capability, max dynamic shared memory per block in bytes (the opt-in maximum), SM count
# the launchers would read (A100 / H100 and H200))
TARGETS: Dict[str, Tuple[int, int, int]] = {
    "sm_80": (80, 163 * 1024, 108),
    "sm_90a": (90, 227 * 1024, 132),
}
# Qwen2.5-7B (the Crab+ LLM): (name, d_in, d_out, has_bias)
CRAB_SHAPES: Tuple[Tuple[str, int, int, bool], ...] = (
    ("q/o_proj", 3584, 3584, True),
    ("k/v_proj", 3584, 512, True),
    ("gate/up_proj", 3584, 18944, False),
    ("down_proj", 18944, 3584, False),
)
RANK, HEADS, SCALING, DROPOUT, SEED = 128, 3, 2.0, 0.1, 20260305   # an odd seed, like 15 in 16 seeds
TOKENS: Tuple[Tuple[int, bool], ...] = ((4096, True), (16, True), (1, False))   # (N, backward too)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Unavailable(RuntimeError):
    """Triton's CUDA backend cannot compile here (no triton, no ptxas, ...); the message says why."""


# ---------------------------------------------------------------------------------------------------------------
# the launches


class _Buf:
    """A device buffer as the launcher passes it: only its dtype and its address (for the alignment
    specialisation) matter to the compiler. ``offset``: bytes from a 256-byte aligned allocation (views)."""

    def __init__(self, dtype: torch.dtype, offset: int = 0):
        self.dtype = dtype
        self.offset = offset

    def data_ptr(self) -> int:
        return 1 << 20 | self.offset


@dataclass
class Launch:
    """One kernel launch: the kernel's name, a label of its config, its arguments by name (constexprs included)
    and its launch options (num_warps, num_stages; absent: Triton's default)."""
    kernel: str
    config: str
    args: Dict[str, object]
    options: Dict[str, int]
    variant: str                    # dtype and the switches that change the kernel (dropout, bias, N = 1)
    where: str                      # the shape that launches it
    role: str = "default"           # "default", "autotune" (a candidate), "deterministic" or "opt-in"

    @property
    def enforced(self) -> bool:
        """A default config (not opt-in): a spill or too much shared memory fails the report."""
        return self.role != "opt-in"


def _tile_label(meta: dict, keys: Sequence[str]) -> str:
    parts = [f"{k.replace('BLOCK_', 'B')}={meta[k]}" for k in keys if k in meta]
    parts += [f"w{meta['num_warps']}"] if "num_warps" in meta else []
    parts += [f"s{meta['num_stages']}"] if "num_stages" in meta else []
    return " ".join(parts)


def _gemm_label(c) -> str:
    k = c.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} g{k['GROUP_M']} w{c.num_warps} s{c.num_stages}"


def default_launches(m, dtype: torch.dtype, n: int, d_in: int, d_out: int, has_bias: bool, dropout_p: float,
                     backward: bool, sms: int, lora_b_packed: bool, shape: str = "") -> Iterator[Launch]:
    """The Triton launches of one forward (and backward) of ``m`` (the backend module) on a GPU with ``sms``
    multiprocessors: every kernel, the base + expand GEMM once per autotune candidate left by the pruning."""
    k, r = HEADS, RANK
    esz = torch.empty(0, dtype=dtype).element_size()
    dt = str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float16", "fp16")
    drop = dropout_p > 0
    has_drop, seed_u, thr, dscale = m._dropout_args(dropout_p, SEED)
    ieee = dtype == torch.float32
    where = f"{shape} {d_in}->{d_out} N={n}".strip()
    tag = dt + (" drop" if drop else "") + (" N=1" if n == 1 else "")
    x, y, h, u, dy, dx, dh, dz = (_Buf(dtype) for _ in range(8))
    g32 = _Buf(torch.float32)
    wr = _Buf(dtype)                                          # [W_r; A] packed: lora_a is the view after K rows
    a = _Buf(dtype, offset=k * d_in * esz)
    weight, bias = _Buf(dtype), _Buf(dtype)
    lb = _Buf(dtype)
    lb_strides = (r, k * r, 1) if lora_b_packed else (d_out * r, r, 1)

    # forward kernel 1: one program per token block, or (SPLIT > 1, the auto rule for this target's SM count) the
    # d_in partials on a (token blocks, SPLIT) grid and the reduce + routing kernel
    kp, rp = m._head_pads(k, r)
    tile = m._shrink_route_tile(rp, False)
    split = m._shrink_split(n, d_in, tile["BLOCK_M"], tile["BLOCK_D"], sms)
    shrink_args = {
        "x_ptr": x, "wr_ptr": wr, "a_ptr": a, "N": n, "d_in": d_in, "K": k, "R": r, "sxm": d_in, "sxk": 1,
        "swr0": d_in, "swr1": 1, "sa0": d_in, "sa1": 1, "seed": seed_u, "threshold": thr, "drop_scale": dscale,
        "HAS_DROPOUT": has_drop, "IEEE": ieee, "KP": kp, "RP": rp, **_constexprs(tile)}
    if split == 1:
        yield Launch("_shrink_route_kernel", _tile_label(tile, ("BLOCK_M", "BLOCK_D")), {
            **shrink_args, "h_ptr": h, "g_ptr": g32, "u_ptr": u, "KR": k * r, "TOP_K": 0}, _options(tile), tag, where)
    else:
        yield Launch("_shrink_route_partial_kernel", _tile_label(tile, ("BLOCK_M", "BLOCK_D")) + f" split={split}",
                     {**shrink_args, "ws_ptr": _Buf(torch.float32)}, _options(tile), tag, where)
        rt = m._route_reduce_tile(rp, False)
        yield Launch("_route_reduce_kernel", _tile_label(rt, ("BLOCK_M",)) + f" split={split}", {
            "ws_ptr": _Buf(torch.float32), "h_ptr": h, "g_ptr": g32, "u_ptr": u, "N": n, "K": k, "R": r, "KR": k * r,
            "SPLIT": split, "TOP_K": 0, "KP": kp, "RP": rp, **_constexprs(rt)}, _options(rt), dt, where)

    # forward kernel 2, every autotune candidate (as _launch_base_expand calls the autotuner) and the tile of the
    # deterministic mode
    n_bucket = min(m._pow2(n), 8192)
    configs = m._gemm_configs()
    even_k = d_in % max(c.kwargs["BLOCK_K"] for c in configs) == 0
    base_args = {
        "x_ptr": x, "w_ptr": weight, "b_ptr": bias if has_bias else weight, "u_ptr": u, "lb_ptr": lb, "y_ptr": y,
        "N": n, "d_out": d_out, "d_in": d_in, "KR": k * r, "R": r, "N_BUCKET": n_bucket, "sxm": d_in, "sxk": 1,
        "swn": d_in, "swk": 1, "sb0": lb_strides[0], "sb1": lb_strides[1], "sb2": lb_strides[2], "sym": d_out,
        "syn": 1, "sbias": 1, "scaling": SCALING, "HAS_BIAS": has_bias, "IEEE": ieee, "EVEN_K": even_k}
    btag = dt + (" bias" if has_bias else "") + (" N=1" if n == 1 else "")
    for c in m._prune_gemm_configs(configs, {"N_BUCKET": n_bucket, "d_out": d_out}):
        yield Launch("_base_expand_kernel", _gemm_label(c), {**base_args, **c.kwargs},
                     {"num_warps": c.num_warps, "num_stages": c.num_stages}, btag, where, "autotune")
    t = m._DETERMINISTIC_TILE
    det = {key: t[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    yield Launch("_base_expand_kernel", _gemm_label(_Cfg(det, t["num_warps"], t["num_stages"])),
                 {**base_args, "EVEN_K": d_in % t["BLOCK_K"] == 0, **det},
                 {"num_warps": t["num_warps"], "num_stages": t["num_stages"]}, btag, where, "deterministic")
    if not backward:
        return

    # backward kernel 1: V from cuBLAS (the CUDA default), then the opt-in fused-V variant (reported only)
    kpv, rpv = m._head_pads(k, r, 2)
    for from_v in (True, False):
        if not from_v and kpv * rpv > m._MAX_FUSED_V:
            continue
        tile = m._expand_backward_tile(kpv, rpv, from_v, esz, False)
        v = _Buf(dtype) if from_v else dy
        yield Launch("_expand_backward_kernel", _tile_label(tile, ("BLOCK_M", "BLOCK_N")) + (
                     "" if from_v else " fused-V"), {
                         "dy_ptr": dy, "lb_ptr": lb, "v_ptr": v, "g_ptr": g32, "h_ptr": h, "dh_ptr": dh, "dz_ptr": dz,
                         "N": n, "d_out": d_out, "K": k, "R": r, "sdym": d_out, "sdyn": 1, "sb0": lb_strides[0],
                         "sb1": lb_strides[1], "sb2": lb_strides[2], "svm": k * r if from_v else 0,
                         "scaling": SCALING, "FROM_V": from_v, "IEEE": ieee, "KP": kpv, "RP": rpv,
                         **_constexprs(tile)}, _options(tile), dt, where, "default" if from_v else "opt-in")

    # backward kernel 2: dW_r, dA
    kp16, rp16 = m._head_pads(k, r)
    tile = m._shrink_backward_tile(rp16, False)
    _, tokens_per_split = m._token_splits(n, d_in, tile["BLOCK_T"], tile["BLOCK_D"], sms)
    yield Launch("_shrink_backward_kernel", _tile_label(tile, ("BLOCK_T", "BLOCK_D")), {
        "x_ptr": x, "dz_ptr": dz, "dh_ptr": dh, "pwr_ptr": _Buf(torch.float32), "pa_ptr": _Buf(torch.float32),
        "N": n, "d_in": d_in, "K": k, "R": r, "tokens_per_split": tokens_per_split, "sxm": d_in, "sxk": 1,
        "seed": seed_u, "threshold": thr, "drop_scale": dscale, "HAS_DROPOUT": has_drop, "IEEE": ieee, "KP": kp16,
        "RP": rp16, **_constexprs(tile)}, _options(tile), tag, where)

    # backward kernel 3: dx += dz W_r + mask / (1 - p) (dh A)
    tile = m._dx_tile(rp16, False)
    yield Launch("_dx_kernel", _tile_label(tile, ("BLOCK_M", "BLOCK_D", "BLOCK_R")), {
        "dx_ptr": dx, "dz_ptr": dz, "dh_ptr": dh, "wr_ptr": wr, "a_ptr": a, "N": n, "d_in": d_in, "K": k, "R": r,
        "sdxm": d_in, "sdxk": 1, "swr0": d_in, "swr1": 1, "sa0": d_in, "sa1": 1, "seed": seed_u, "threshold": thr,
        "drop_scale": dscale, "HAS_DROPOUT": has_drop, "IEEE": ieee, "KP": kp16, **_constexprs(tile)},
        _options(tile), tag, where)


@dataclass
class _Cfg:             # the shape of a triton.Config, for labels
    kwargs: dict
    num_warps: int
    num_stages: int


def _constexprs(tile: dict) -> dict:
    return {key: v for key, v in tile.items() if key not in ("num_warps", "num_stages")}


def _options(tile: dict) -> dict:
    return {key: v for key, v in tile.items() if key in ("num_warps", "num_stages")}


def crab_launches(m, dtypes: Iterable[torch.dtype], sms: int) -> Iterator[Launch]:
    """Every launch of ``default_launches`` over the Crab+ shapes, token counts, dropout, bias and lora_b layouts."""
    for dtype in dtypes:
        for shape, d_in, d_out, _ in CRAB_SHAPES:
            for n, backward in TOKENS:
                for p in (0.0, DROPOUT):
                    for has_bias in (False, True):
                        for packed in (False, True):
                            yield from default_launches(m, dtype, n, d_in, d_out, has_bias, p, backward, sms,
                                                        packed, shape)


# ---------------------------------------------------------------------------------------------------------------
# compiling


def backend_module():
    """``ops.triton_ilora`` with its kernels as ``triton.JITFunction`` objects (what a GPU run compiles).

    Without a CUDA device the module refuses to import unless TRITON_INTERPRET=1, which would also make Triton
    interpret the kernels; so here the module is imported with ilora's setting on and Triton's own interpreter switch
    pinned off. Only a process that compiles (this report) should do that: the ``triton`` backend it registers
    cannot run on the CPU."""
    try:
        import triton
        from triton.runtime.jit import JITFunction
    except ImportError as exc:
        raise Unavailable(f"triton is not importable: {exc}") from None
    if triton.knobs.runtime.interpret:
        raise Unavailable("Triton runs under its interpreter in this process (TRITON_INTERPRET=1): run "
                          "`python -m ilora_kernels.ops.triton_aot` without it (report_in_subprocess())")
    m = sys.modules.get(_BACKEND)
    if m is None:
        import importlib

        from .. import settings
        if torch.cuda.is_available():
            m = importlib.import_module(_BACKEND)
        else:
            old = os.environ.get("TRITON_INTERPRET")
            triton.knobs.runtime.interpret = False        # pinned: Triton compiles, whatever the variable says
            os.environ["TRITON_INTERPRET"] = "1"          # read by ilora_kernels.settings only
            settings.reload()
            try:
                m = importlib.import_module(_BACKEND)
            finally:
                if old is None:
                    os.environ.pop("TRITON_INTERPRET", None)
                else:
                    os.environ["TRITON_INTERPRET"] = old
                settings.reload()
    if not isinstance(m._base_expand_kernel, JITFunction):
        raise Unavailable(f"{_BACKEND} was imported with the Triton interpreter on: run the report in a fresh process")
    return m


def _check_toolchain() -> None:
    try:
        import triton
        from triton.backends.nvidia.compiler import get_ptxas_version
        get_ptxas_version(90)
        _ = triton.knobs.nvidia.ptxas.path
    except Exception as exc:     # noqa: BLE001 - whatever stops the CUDA backend is the reason to report
        raise Unavailable(f"Triton's CUDA backend cannot compile here: {type(exc).__name__}: {exc}") from None


def _specialise(kernel, args: Dict[str, object], options: Dict[str, int], arch: int):
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` derives them for these arguments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    missing = [name for name in kernel.arg_names if name not in args]
    extra = [name for name in args if name not in kernel.arg_names]
    if missing or extra:
        raise TypeError(f"{kernel.__name__}: the report's launch lacks {missing} / has unknown {extra} arguments")
    kwargs = dict(options, debug=bool(kernel.debug or triton.knobs.runtime.debug),
                  instrumentation_mode=triton.knobs.compilation.instrumentation_mode)
    bound, spec, opts = binder(*[args[name] for name in kernel.arg_names], **kwargs)
    opts_obj, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    return signature, constexprs, attrs, opts_obj.__dict__


_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}
_NOTE = re.compile(r"Potential Performance Loss: (.*?) for the function")


def _compile(job) -> dict:
    """Compile one kernel for one target (runs in a worker process); the ptxas -v numbers and the shared memory."""
    name, arch, signature, constexprs, attrs, options = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(backend_module(), name)
    log = io.StringIO()
    t0 = time.perf_counter()
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope():
        triton.knobs.nvidia.dump_ptxas_log = True        # Triton prints its ptxas -v log
        triton.knobs.compilation.always_compile = True   # no cache hit: the log is always there
        with contextlib.redirect_stdout(log):
            ck = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                options=options)
    text = log.getvalue()
    if _PTXAS["regs"].search(text) is None:     # a Triton that does not print its log: run ptxas -v on its PTX
        text = _ptxas_log(ck.asm["ptx"], arch)
    out = {"seconds": round(time.perf_counter() - t0, 2), "smem": int(ck.metadata.shared),
           "notes": sorted(set(_NOTE.findall(text)))}
    for key, pattern in _PTXAS.items():
        found = pattern.search(text)
        if found is None:
            raise RuntimeError(f"{name} ({arch}): no '{key}' in Triton's ptxas log:\n{text}")
        out[key] = int(found.group(1))
    return out


def _ptxas_log(ptx: str, arch: int) -> str:
    import triton
    with tempfile.TemporaryDirectory(prefix="ilora-triton-aot-") as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([triton.knobs.nvidia.ptxas.path, "-lineinfo", "-v", f"--gpu-name=sm_{arch}"
                               + ("a" if arch >= 90 else ""), src, "-o", os.path.join(tmp, "kernel.cubin")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=True)
    return proc.stdout


@dataclass
class Row:
    """One compiled binary: a kernel, its config and variant on one target, and every launch that uses it."""
    kernel: str
    config: str
    variant: str
    target: str
    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem: int
    smem_limit: int
    seconds: float
    roles: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    used_at: List[str] = field(default_factory=list)

    @property
    def enforced(self) -> bool:
        return any(role != "opt-in" for role in self.roles)

    @property
    def problems(self) -> List[str]:
        out = []
        if self.spill_stores or self.spill_loads:
            out.append(f"spills {self.spill_stores} B stores / {self.spill_loads} B loads")
        if self.smem > self.smem_limit:
            out.append(f"shared memory {self.smem} B > {self.smem_limit} B")
        return out

    @property
    def failed(self) -> bool:
        return self.enforced and bool(self.problems)


def compile_report(targets: Sequence[str] = tuple(TARGETS), dtypes: Sequence[str] = tuple(DTYPES),
                   jobs: Optional[int] = None, launches=None) -> List[Row]:
    """Compile every distinct default launch (``crab_launches``) for each target; one ``Row`` per binary."""
    _check_toolchain()
    m = backend_module()
    import triton
    rows: Dict[tuple, Row] = {}
    todo: Dict[tuple, tuple] = {}
    for target in targets:
        arch, smem_limit, sms = TARGETS[target]
        for launch in (launches(m, target) if launches else crab_launches(m, [DTYPES[d] for d in dtypes], sms)):
            kernel = getattr(m, launch.kernel)
            sig, cex, attrs, opts = _specialise(kernel, launch.args, launch.options, arch)
            key = (launch.kernel, target, json.dumps([sig, sorted(map(repr, cex.items())),
                                                      sorted(map(repr, attrs.items())), repr(sorted(opts.items()))]))
            if key not in rows:
                rows[key] = Row(launch.kernel, launch.config, launch.variant, target, 0, 0, 0, 0, 0, smem_limit, 0.0)
                todo[key] = (launch.kernel, arch, sig, cex, attrs, opts)
            row = rows[key]
            if launch.role not in row.roles:
                row.roles.append(launch.role)
            if launch.where not in row.used_at:
                row.used_at.append(launch.where)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    with tempfile.TemporaryDirectory(prefix="ilora-triton-aot-") as cache, triton.knobs.cache.scope():
        triton.knobs.cache.dir = cache
        keys = list(todo)
        if jobs == 1 or sys.platform != "linux":
            results = [_compile(todo[key]) for key in keys]
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
                results = list(pool.map(_compile, [todo[key] for key in keys]))
    for key, res in zip(keys, results):
        row = rows[key]
        for name in ("regs", "spill_stores", "spill_loads", "stack", "smem", "seconds", "notes"):
            setattr(row, name, res[name])
    return list(rows.values())


# ---------------------------------------------------------------------------------------------------------------
# output


_ORDER = ("_shrink_route_kernel", "_shrink_route_partial_kernel", "_route_reduce_kernel", "_base_expand_kernel",
          "_expand_backward_kernel", "_shrink_backward_kernel", "_dx_kernel")


def format_table(rows: Sequence[Row], markdown: bool = False) -> str:
    """One line per kernel, config and variant; regs / spill bytes (stores + loads) / shared KB per target."""
    targets = [t for t in TARGETS if any(r.target == t for r in rows)]
    by: Dict[tuple, Dict[str, Row]] = {}
    for r in rows:
        roles = [role for role in r.roles if role != "default"]
        config = r.config + (f" ({', '.join(roles)})" if roles else "")
        by.setdefault((r.kernel, config, r.variant), {})[r.target] = r

    def order(key):
        kernel, config, variant = key
        return (_ORDER.index(kernel) if kernel in _ORDER else len(_ORDER), kernel, config, variant)

    head = ["kernel", "config", "variant"] + [f"{t} regs / spill B / smem KB" for t in targets] + ["status"]
    lines = []
    for key in sorted(by, key=order):
        cells = list(key)
        status = []
        for t in targets:
            r = by[key].get(t)
            if r is None:
                cells.append("-")
                continue
            cells.append(f"{r.regs} / {r.spill_stores + r.spill_loads} / {r.smem / 1024:.0f}")
            status += [f"{t}: {p}" + ("" if r.enforced else " (opt-in: not enforced)") for p in r.problems]
            status += [f"{t}: {note}" for note in r.notes]
        cells.append("; ".join(status) if status else "ok")
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells in lines]
        return "\n".join(out)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    return "\n".join(fmt.format(*cells) for cells in [head] + lines)


def report_in_subprocess(args: Sequence[str] = (), timeout: float = 900) -> Tuple[int, List[dict], str]:
    """Run ``python -m ilora_kernels.ops.triton_aot --json ...`` in a fresh process without TRITON_INTERPRET;
    returns (exit status, the rows as dicts, the printed output)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this package's parent
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    with tempfile.TemporaryDirectory(prefix="ilora-triton-aot-") as tmp:
        path = os.path.join(tmp, "report.json")
        proc = subprocess.run([sys.executable, "-m", "ilora_kernels.ops.triton_aot", "--json", path, *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        rows = []
        if os.path.exists(path):
            with open(path) as f:
                rows = json.load(f)["rows"]
    return proc.returncode, rows, proc.stdout


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ilora_kernels.ops.triton_aot", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: the CPU count)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    opts = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        rows = compile_report(opts.arch, opts.dtype, opts.jobs)
    except Unavailable as exc:
        print(f"UNAVAILABLE: {exc}")
        return 3
    elapsed = time.perf_counter() - t0
    import triton
    print(f"Triton {triton.__version__}: {len(rows)} binaries compiled in {elapsed:.0f} s "
          f"(compile time summed {sum(r.seconds for r in rows):.0f} s)")
    print(format_table(rows, markdown=opts.markdown))
    failed = [r for r in rows if r.failed]
    for r in failed:
        print(f"FAIL {r.kernel} [{r.config}] {r.variant} {r.target}: {'; '.join(r.problems)} (used at "
              f"{', '.join(r.used_at[:4])}{' ...' if len(r.used_at) > 4 else ''})")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"triton": triton.__version__, "seconds": round(elapsed, 1),
                       "rows": [dict(asdict(r), enforced=r.enforced, problems=r.problems, failed=r.failed)
                                for r in rows]}, f, indent=1)
    print("OK: no default config spills or exceeds its shared memory" if not failed
          else f"{len(failed)} default config(s) spill or exceed the shared memory")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
