"""The CUDA backend's source (csrc/cuda/ilora_cuda.cu: the four kernels, their launchers and the op bodies) compiled
for the host against tests/cuda_emulation/host_emulation.h and run on CPU tensors, against the float64
implementation of tests/fused_op_checks.py (SPEC section 1).

This runs the real kernel code (indexing, per-warp shared-memory scratch, warp-shuffle reductions, grid-stride
loops with a grid capped at 3 blocks, dropout regeneration, launch configuration checks) without a GPU; the
GEMMs are ATen's CPU ones instead of cuBLAS, and the half types are c10's.  tests/test_cuda_backend.py runs the
same source on a GPU.  The extension is built with ILORA_POISON_OUTPUTS, so every buffer the op allocates starts
as NaN and an element no kernel writes fails the finiteness check of rel_err.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import test_fuzz
from fused_op_checks import (
    CASE_DTYPES,
    LOW,
    check_dropout_mask_is_the_shared_hash,
    check_every_output_mask,
    check_non_contiguous_inputs,
    check_outputs_fully_written,
    check_packed_layout,
    check_zero_tokens,
    float64_grads,
    make_inputs,
    rel_err,
    run_layer,
    tolerance,
)
from ilora_kernels import functional

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_BLOCKS = 3  # emulated grids are capped at 3 blocks, so every kernel's grid-stride loop runs several rounds
WARPS_PER_BLOCK = 4  # route / backward kernels: one token per warp and grid-stride round


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """torch.ops.ilora_cuda_emulation, built once per test session (about 10 s on 2 cores)."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on PATH to build the CUDA emulation")
    from torch.utils import cpp_extension

    # a sanitizer run builds first (ILORA_CUDA_EMULATION_FLAGS="-fsanitize=thread", a fixed ILORA_CUDA_EMULATION_DIR),
    # then reruns with the sanitizer runtime preloaded (see docs/reliability.md)
    sanitizer_flags = os.environ.get("ILORA_CUDA_EMULATION_FLAGS", "").split()
    build_dir = os.environ.get("ILORA_CUDA_EMULATION_DIR") or tmp_path_factory.mktemp("cuda_emulation")
    os.makedirs(build_dir, exist_ok=True)
    cpp_extension.load(
        name="ilora_cuda_emulation",
        sources=[str(ROOT / "csrc" / "checks.cpp"), str(ROOT / "tests" / "cuda_emulation" / "emulated_cuda_ops.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "tests" / "cuda_emulation")],
        extra_cflags=["-O1", "-DILORA_POISON_OUTPUTS", f"-DILORA_CUDA_MAX_BLOCKS={MAX_BLOCKS}", *sanitizer_flags],
        extra_ldflags=sanitizer_flags, build_directory=str(build_dir), is_python_module=False)
    return torch.ops.ilora_cuda_emulation


def backward_all(emu, inputs, scaling, p, seed, top_k):
    x, weight, b, router, lora_a, lora_b, dy = inputs
    y, h, g = emu.fused_forward(x, weight, b, router, lora_a, lora_b, scaling, p, seed, top_k)
    grads = emu.fused_backward(dy, x, weight, router, lora_a, lora_b, h, g, scaling, p, seed, [True] * 4)
    return y, h, g, list(grads)


@pytest.mark.parametrize("case,dtype", CASE_DTYPES)
def test_emulated_kernels_match_float64(emu, case, dtype, monkeypatch):
    n, d_in, d_out, heads, rank, top_k, p, routing = case
    inputs = make_inputs(n, d_in, d_out, heads, rank, routing, dtype, seed=n * 31 + d_in, with_dy=True)
    seed, scaling = 1234567 + n, 2.0
    y, h, g, (dx, drouter, dlora_a, dlora_b) = backward_all(emu, inputs, scaling, p, seed, top_k or 0)
    keep = (g > 0) if (dtype in LOW and top_k) else None
    want_y, want_h, want_g, want_grads = float64_grads(*inputs[:6], scaling, p, seed, top_k or 0, inputs[6], keep=keep)
    assert (y.dtype, h.dtype) == (dtype, dtype)
    assert g.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    actual = {"y": y, "h": h, "g": g, "dx": dx, "drouter": drouter, "dlora_a": dlora_a, "dlora_b": dlora_b}
    want = {"y": want_y, "h": want_h, "g": want_g, "dx": want_grads[0], "drouter": want_grads[3],
            "dlora_a": want_grads[4], "dlora_b": want_grads[5]}
    torch_errs = dict.fromkeys(want, 0.0)
    if dtype in LOW:  # PyTorch's own error in this dtype (the reference backend) sets the bound
        ry, rg, rgrads = run_layer("reference", inputs, scaling, p, seed, top_k, monkeypatch, base_grad=False)
        torch_errs.update(y=rel_err(ry, want_y), g=rel_err(rg, want_g), h=rel_err(want_h.to(dtype), want_h),
                          dx=rel_err(rgrads[0], want_grads[0]), drouter=rel_err(rgrads[3], want_grads[3]),
                          dlora_a=rel_err(rgrads[4], want_grads[4]), dlora_b=rel_err(rgrads[5], want_grads[5]))
    for name in want:
        if name == "drouter" and routing == "one_head" and dtype != torch.float64:
            # the router gradient is ~exp(-60) relative to the others: compare on the scale of dx instead
            err = (actual[name].double() - want[name]).abs().max().item() / want["dx"].abs().max().item()
        else:
            err = rel_err(actual[name], want[name])
        bound = tolerance(dtype, torch_errs[name])
        assert err <= bound, f"{name}: error {err:.3e} (torch's own {torch_errs[name]:.3e})"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("top_k", [0, 2])
def test_every_output_mask(emu, dtype, p, top_k):
    check_every_output_mask(emu, dtype, p, top_k)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_non_contiguous_inputs(emu, p):
    check_non_contiguous_inputs(emu, p)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_packed_layout(emu, p):
    check_packed_layout(emu.fused_forward, emu.fused_backward, torch.float32, p, n=33)


def test_dropout_mask_is_the_shared_hash(emu):
    check_dropout_mask_is_the_shared_hash(emu)


def test_outputs_fully_written(emu):
    check_outputs_fully_written(emu, 257)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_zero_tokens(emu, p):
    check_zero_tokens(emu, p)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("heads, rank, top_k", [(256, 3, 0), (37, 200, 5), (64, 33, 64)])
def test_many_heads_wide_rank_and_many_rounds(emu, dtype, heads, rank, top_k):
    """K up to the 256-head limit (per-warp scratch of 2K / 3K accumulators: 24 KiB for float64, under the 48 KiB
    launch limit the emulator enforces), K and r above the 32 lanes of a warp, and ~4 grid-stride rounds per warp."""
    n = 4 * MAX_BLOCKS * WARPS_PER_BLOCK + 5
    inputs = make_inputs(n, 23, 11, heads, rank, "skewed", dtype, seed=heads + rank, with_dy=True)
    y, h, g, grads = backward_all(emu, inputs, 1.5, 0.2, 99, top_k)
    want_y, want_h, want_g, want_grads = float64_grads(*inputs[:6], 1.5, 0.2, 99, top_k, inputs[6])
    tol = tolerance(dtype, 0.0)
    for name, actual, want in zip(("y", "h", "g", "dx", "drouter", "dlora_a", "dlora_b"), [y, h, g, *grads],
                                  [want_y, want_h, want_g, want_grads[0], *want_grads[3:]]):
        assert rel_err(actual, want) <= tol, name


def test_more_heads_than_the_limit_is_a_clear_error(emu):
    x, weight, b, router, lora_a, lora_b = make_inputs(3, 5, 4, 257, 2, "random", torch.float32, seed=0)
    with pytest.raises(RuntimeError, match=r"router_weight has shape \[257, 5\].*at most 256 heads"):
        emu.fused_forward(x, weight, b, router, lora_a, lora_b, 2.0, 0.0, 0, 0)


@pytest.mark.parametrize("p, forward_launches, backward_launches", [(0.0, 1, 1), (0.3, 2, 3)])
def test_launch_counts(emu, p, forward_launches, backward_launches):
    """Forward: route (plus dropout when p > 0); backward: the token kernel (plus masked-add and dropout when
    p > 0); nothing is launched for empty work."""
    x, weight, b, router, lora_a, lora_b, dy = make_inputs(9, 7, 5, 3, 4, "random", torch.float32, seed=0, with_dy=True)

    def launches(fn):
        before = emu.launch_count()
        out = fn()
        return emu.launch_count() - before, out

    count, (_, h, g) = launches(lambda: emu.fused_forward(x, weight, b, router, lora_a, lora_b, 2.0, p, 3, 0))
    assert count == forward_launches
    count, _ = launches(lambda: emu.fused_backward(dy, x, weight, router, lora_a, lora_b, h, g, 2.0, p, 3, [True] * 4))
    assert count == backward_launches
    count, _ = launches(lambda: emu.fused_backward(dy, x, weight, router, lora_a, lora_b, h, g, 2.0, p, 3,
                                                   [False, False, False, True]))
    assert count == 1  # dB alone: u = g (x) h from the token kernel, then one GEMM
    count, _ = launches(lambda: emu.fused_backward(dy, x, weight, router, lora_a, lora_b, h, g, 2.0, p, 3,
                                                   [False] * 4))
    assert count == 0
    empty = make_inputs(0, 7, 5, 3, 4, "random", torch.float32, seed=0, with_dy=True)
    count, (y0, h0, g0) = launches(lambda: emu.fused_forward(*empty[:6], 2.0, p, 3, 0))
    assert count == 0 and y0.shape == (0, 5) and h0.shape == (0, 4) and g0.shape == (0, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[1])
def test_agrees_with_the_cpu_backend(emu, dtype):
    """Both backends run the per-token math of csrc/token_math.h after the same ATen GEMMs: with dropout and top-k,
    the emulated CUDA ops and the C++ CPU ops agree to a few units of rounding."""
    reason = functional.available_backends()["cpu"]
    if reason is not None:
        pytest.skip(f"the C++ CPU backend is unavailable: {reason}")
    # N > r: the CPU backend's fused path
    inputs = make_inputs(150, 40, 24, 3, 16, "skewed", dtype, seed=11, with_dy=True)
    emu_out = backward_all(emu, inputs, 2.0, 0.1, 5, 2)
    cpu = torch.ops.ilora_kernels
    x, weight, b, router, lora_a, lora_b, dy = inputs
    y, h, g = cpu.fused_forward(x, weight, b, router, lora_a, lora_b, 2.0, 0.1, 5, 2)
    cpu_grads = cpu.fused_backward(dy, x, weight, router, lora_a, lora_b, h, g, 2.0, 0.1, 5, [True] * 4)
    eps = torch.finfo(dtype).eps
    for name, a, c in zip(("y", "h", "g", "dx", "drouter", "dlora_a", "dlora_b"),
                          [*emu_out[:3], *emu_out[3]], [y, h, g, *cpu_grads]):
        assert a.dtype == c.dtype and a.shape == c.shape, name
        assert rel_err(a, c.double()) <= 4 * eps, name


# ---------------------------------------------------------------------------------------------------------------
# the whole Python path (ilora_linear, autograd, leading dims, strides, bad input) over the emulated CUDA ops


@contextlib.contextmanager
def cpu_kernels_replaced_by(emu):
    """Registers the emulated CUDA ops as the CPU kernels of ilora_kernels::fused_forward / fused_backward for the
    duration (the dispatcher restores the C++ CPU kernels when the registration is destroyed)."""
    lib = torch.library.Library("ilora_kernels", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        lib.impl("fused_forward", lambda *args: emu.fused_forward(*args), "CPU")
        lib.impl("fused_backward", lambda *args: emu.fused_backward(*args), "CPU")
    try:
        yield
    finally:
        lib._destroy()


def test_cpu_kernel_replacement_reaches_the_emulation_and_is_undone(emu):
    if functional.available_backends()["cpu"] is not None:
        pytest.skip(f"needs the compiled extension for the op schemas: {functional.available_backends()['cpu']}")
    inputs = make_inputs(9, 7, 5, 3, 4, "random", torch.float32, seed=0, with_dy=True)
    x, weight, b, router, lora_a, lora_b, _ = inputs
    with cpu_kernels_replaced_by(emu):
        before = emu.launch_count()
        functional.ilora_linear(x, weight, b, router, lora_a, lora_b, 2.0, backend="cpu")
        assert emu.launch_count() > before
    before = emu.launch_count()
    functional.ilora_linear(x, weight, b, router, lora_a, lora_b, 2.0, backend="cpu")
    assert emu.launch_count() == before


FUZZ_EXAMPLES = int(os.environ.get("ILORA_FUZZ_EXAMPLES", "50")) // 2


@test_fuzz._settings(FUZZ_EXAMPLES)
@given(data=st.data())
def test_fuzz_ilora_linear_over_the_emulated_cuda_ops(emu, data):
    """tests/test_fuzz.py's problems (N from 0, 1-D to 4-D x, strided x and weights, K up to 64, r up to 256,
    top-k, dropout, invalid inputs) through ilora_linear with the emulated CUDA ops under the CPU backend."""
    if functional.available_backends()["cpu"] is not None:
        pytest.skip(f"needs the compiled extension for the op schemas: {functional.available_backends()['cpu']}")
    problem = data.draw(test_fuzz.problems("cuda"))
    with cpu_kernels_replaced_by(emu):
        test_fuzz.check_problem("cpu", problem)
