"""Numerical edge cases and scale limits (policy: docs/reliability.md).

Every backend available here (reference, cpu, triton under the interpreter) must agree with the reference backend,
NaN for NaN, on non-finite router logits, and with a float64 oracle on finite but extreme inputs. GPU-only tests
(real tensors with more than 2**31 elements) are skipped without CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import HAS_CUDA
from ilora_float64 import ilora_float64, make_inputs
from ilora_kernels import functional
from ilora_kernels.functional import ilora_linear
from ilora_kernels.ops import registry

AVAILABLE = functional.available_backends()
CPU_BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(AVAILABLE[b] is not None, reason=f"{b}: {AVAILABLE[b]}"))
                for b in ("reference", "cpu", "triton")]
INF, NAN = float("inf"), float("nan")


def _device(backend):
    """Triton runs on the GPU when there is one (else under the interpreter on CPU tensors)."""
    return "cuda" if backend == "triton" and HAS_CUDA else "cpu"


def _on(backend, tensors, grad=False):
    out = [None if t is None else t.to(_device(backend)).clone() for t in tensors]
    return [None if t is None else t.requires_grad_() for t in out] if grad else out


def _run(backend, args, scaling=1.5, **kw):
    y, g = ilora_linear(*_on(backend, args), scaling, backend=backend, return_router_weights=True, **kw)
    return y.cpu(), g.cpu()


def _same_nan_and_close(got, want, tol):
    got, want = got.detach().double(), want.detach().double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    finite = ~torch.isnan(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=tol, atol=tol)


def _same_nan_count(got, want, count):
    for t in (got, want):
        assert (torch.isnan(t).sum(-1) == count).all() and (t[~torch.isnan(t)] == 0).all(), t


def _inputs(n=6, d_in=8, d_out=5, r=3, k=4, dtype=torch.float32, seed=0):
    x, *rest = make_inputs(n, d_in, d_out, k, r, dtype=torch.float64, seed=seed)
    # feature 0 in [1, 2): router column 0 steers, and its logits stay within about twice that column's values
    x[:, 0] = 1.0 + torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return [v.to(dtype) for v in [x, *rest]]


# ---------------------------------------------------------------------------------------------------------------
# non-finite router logits: every backend gives what the reference backend gives (torch.softmax semantics)

LOGIT_CASES = {
    # router column 0 values (feature 0 is positive, so logit_k = +-inf where the column is +-inf)
    "one_plus_inf": [INF, 0.5, -0.5, 0.1],
    "one_minus_inf": [-INF, 0.5, -0.5, 0.1],
    "two_minus_inf": [-INF, 0.5, -INF, 0.1],
    "all_minus_inf": [-INF, -INF, -INF, -INF],
    "plus_and_minus_inf": [INF, -INF, 0.5, 0.1],
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", sorted(LOGIT_CASES))
@pytest.mark.parametrize("top_k", [None, 2])
def test_infinite_router_logits_follow_the_reference(backend, case, top_k):
    args = _inputs()
    args[3][:, 0] = torch.tensor(LOGIT_CASES[case])
    y_ref, g_ref = _run("reference", args, top_k=top_k)
    y, g = _run(backend, args, top_k=top_k)
    if case == "all_minus_inf" and top_k is not None:
        # every logit ties at -inf: which top_k heads are picked is torch.topk's (undocumented) tie order, so only
        # the pattern's shape is fixed: top_k NaN heads and exact zeros elsewhere, in every backend
        _same_nan_count(g, g_ref, top_k)
    else:
        _same_nan_and_close(g, g_ref, 1e-5)
    _same_nan_and_close(y, y_ref, 1e-4)
    if case in ("one_minus_inf", "two_minus_inf"):
        # a -inf logit only removes its head: the rest of the row is a finite softmax
        assert torch.isfinite(g).all() and torch.isfinite(y).all()
        assert (g[:, args[3][:, 0] == -INF] == 0).all()
        torch.testing.assert_close(g.sum(-1), torch.ones(g.shape[0]))
    if case == "all_minus_inf":
        # documented: no head can be routed -> the selected heads are NaN (torch.softmax of all -inf)
        assert torch.isnan(g).any(-1).all()
        if top_k is not None:
            assert ((~torch.isnan(g)).sum(-1) == g.shape[-1] - top_k).all()  # unselected heads stay exactly 0
    if case == "one_plus_inf" and top_k is not None:
        assert ((g == 0).sum(-1) == g.shape[-1] - top_k).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_huge_finite_logits_stay_finite(backend, dtype):
    args = _inputs(dtype=dtype)
    big = 1e30 if dtype == torch.float32 else 3e4             # |logit| ~ 2 * big: finite in the dtype
    args[3][:, 0] = torch.tensor([big, -big, 0.3 * big, 0.0], dtype=dtype)
    for top_k in (None, 2):
        y, g = _run(backend, args, scaling=1.0, top_k=top_k)
        assert torch.isfinite(g).all() and torch.isfinite(y).all()
        ref = [t.double() for t in args]
        y64, g64 = ilora_float64(*ref, 1.0, top_k=top_k)
        torch.testing.assert_close(g.double(), g64, rtol=1e-6, atol=1e-6)   # one-hot on head 0
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_all_equal_logits_route_uniformly(backend, top_k):
    args = _inputs(k=4)
    args[3].zero_()
    _, g = _run(backend, args, top_k=top_k)
    kept = 4 if top_k is None else top_k
    assert ((g > 0).sum(-1) == kept).all()
    torch.testing.assert_close(g[g > 0], torch.full_like(g[g > 0], 1.0 / kept), rtol=0, atol=1e-7)
    if backend == "cpu" and top_k is not None:   # documented tie order of the fused backends: lower index first
        assert (g[:, :kept] > 0).all()


# ---------------------------------------------------------------------------------------------------------------
# NaN in x


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_nan_in_x_propagates_like_the_reference(backend, top_k, p):
    args = _inputs()
    args[0][2, 3] = NAN
    leaves = _on(backend, args, grad=True)
    y, g = ilora_linear(*leaves, 1.5, dropout_p=p, training=p > 0, top_k=top_k, backend=backend,
                        return_router_weights=True)
    y_dev = y
    y, g = y.detach().cpu(), g.detach().cpu()
    ref_leaves = [t.clone().requires_grad_() for t in args]
    torch.manual_seed(0)
    y_ref, g_ref = ilora_linear(*ref_leaves, 1.5, top_k=top_k, backend="reference", return_router_weights=True)
    assert torch.isnan(y[2]).all() and torch.isnan(g[2]).any()
    ok = torch.arange(y.shape[0]) != 2
    assert torch.isfinite(y[ok]).all() and torch.isfinite(g[ok]).all()
    if p == 0.0:
        if top_k is None:
            _same_nan_and_close(g, g_ref, 1e-5)
        else:   # all of the token's logits are NaN (a tie): top_k NaN heads, zeros elsewhere (see above)
            _same_nan_count(g[2:3], g_ref[2:3], top_k)
            _same_nan_and_close(g[ok], g_ref[ok], 1e-5)
        _same_nan_and_close(y, y_ref, 1e-4)
    y_dev.sum().backward()
    dx = leaves[0].grad.cpu()
    assert torch.isnan(dx[2]).any() and torch.isfinite(dx[ok]).all()   # other tokens' dx unaffected


# ---------------------------------------------------------------------------------------------------------------
# fp16 expand: accumulated in fp32, so y is finite whenever the float64 result (and h, u) fit in fp16


def _cancelling_fp16():
    x = torch.ones(3, 1, dtype=torch.float16)
    w = torch.ones(2, 1, dtype=torch.float16)
    router = torch.zeros(1, 1, dtype=torch.float16)
    a = torch.full((4, 1), 200.0, dtype=torch.float16)                  # h = 200 (fits)
    b = torch.tensor([[[300., 300., -300., -300.], [300., -300., 300., -300.]]], dtype=torch.float16)
    return [x, w, None, router, a, b]        # each product 6e4, running sum 1.2e5 overflows fp16, total 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp16_expand_accumulates_in_fp32(backend):
    args = _cancelling_fp16()
    y, _ = _run(backend, args)
    assert torch.equal(y.float(), torch.ones(3, 2))
    args[5] = torch.full((1, 2, 4), 1000.0, dtype=torch.float16)        # u B^T = 8e5 overflows, s * u B^T = 800
    y, _ = _run(backend, args, scaling=1e-3)
    torch.testing.assert_close(y.float(), torch.full((3, 2), 801.0), rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scaling", [1e-30, 1e-8, 1e8, 1e30])
def test_tiny_and_huge_scaling(backend, scaling):
    args = _inputs()
    args[5] = args[5] / scaling if scaling > 1 else args[5]            # keep s * B O(1) for huge s
    leaves = _on(backend, args, grad=True)
    y, g = ilora_linear(*leaves, scaling, backend=backend, return_router_weights=True)
    ref = [t.double().requires_grad_() for t in args]
    y64, g64 = ilora_float64(*ref, scaling)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.detach().cpu().double(), y64, rtol=1e-4, atol=1e-4)
    dy = torch.randn(y.shape, dtype=torch.float64)
    (y.double() * dy.to(y.device)).sum().backward()
    (y64 * dy).sum().backward()
    for got, want in zip(leaves, ref, strict=True):
        g_got, g_want = got.grad.cpu().double(), want.grad
        scale = 1.0 + g_want.abs().max()
        assert torch.isfinite(g_got).all()
        assert ((g_got - g_want).abs().max() / scale) < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# shapes at the limits: r = 256, K = 64, d_out not a multiple of any block size


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(5, 40, 97, 256, 64), (3, 33, 1, 256, 3), (7, 65, 129, 8, 64)])
def test_large_rank_and_heads(backend, shape):
    n, d_in, d_out, r, k = shape
    gen = torch.Generator().manual_seed(1)
    args = [torch.randn(n, d_in, generator=gen), torch.randn(d_out, d_in, generator=gen) * d_in ** -0.5,
            torch.randn(d_out, generator=gen), torch.randn(k, d_in, generator=gen) * d_in ** -0.5,
            torch.randn(r, d_in, generator=gen) * d_in ** -0.5, torch.randn(k, d_out, r, generator=gen) * r ** -0.5]
    leaves = _on(backend, args, grad=True)
    y, g = ilora_linear(*leaves, 2.0, top_k=min(k, 5) if k > 5 else None, backend=backend,
                        return_router_weights=True)
    ref = [t.double().requires_grad_() for t in args]
    y64, g64 = ilora_float64(*ref, 2.0, top_k=min(k, 5) if k > 5 else None)
    torch.testing.assert_close(y.detach().cpu().double(), y64, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(g.detach().cpu().double(), g64, rtol=1e-5, atol=1e-5)
    dy = torch.randn(y.shape, dtype=torch.float64)
    (y.double() * dy.to(y.device)).sum().backward()
    (y64 * dy).sum().backward()
    for got, want in zip(leaves, ref, strict=True):
        assert ((got.grad.cpu().double() - want.grad).abs().max() / (1 + want.grad.abs().max())) < 2e-4


def test_zero_feature_dim_is_refused():
    x = torch.randn(3, 0)
    with pytest.raises(ValueError, match="d_in must be >= 1"):
        ilora_linear(x, torch.randn(4, 0), None, torch.randn(2, 0), torch.randn(2, 0), torch.randn(2, 4, 2), 1.0)


# ---------------------------------------------------------------------------------------------------------------
# N = 1M tokens on the cpu backend: peak memory linear in N (measured in a fresh process)

_MEMORY_SCRIPT = textwrap.dedent("""
    import gc, json, os, threading, time, torch
    from ilora_kernels.functional import ilora_linear
    torch.set_num_threads(2)
    page = os.sysconf("SC_PAGE_SIZE")
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    d_in, d_out, r, k = 8, 8, 4, 2
    params = [torch.randn(d_out, d_in), torch.randn(d_out), torch.randn(k, d_in, requires_grad=True),
              torch.randn(r, d_in, requires_grad=True), torch.randn(k, d_out, r, requires_grad=True)]
    def step(n):
        x = torch.randn(n, d_in, requires_grad=True)
        y = ilora_linear(x, *params, 2.0, dropout_p=0.1, training=True, backend="cpu")
        y.backward(torch.ones_like(y))
    def peak_growth(n):
        gc.collect()
        start = rss()
        peak, done = [start], threading.Event()
        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.0005)
        t = threading.Thread(target=sample)
        t.start()
        step(n)
        done.set()
        t.join()
        return peak[0] - start
    step(1000)
    print(json.dumps({n: peak_growth(n) for n in (250_000, 1_000_000)}))
""")


def test_million_tokens_cpu_memory_is_linear():
    if AVAILABLE["cpu"] is not None:
        pytest.skip(AVAILABLE["cpu"])
    # large blocks via mmap, so freed tensors leave the RSS and each size's peak is measured from a clean start
    env = dict(os.environ, OMP_NUM_THREADS="2", MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    n = 1_000_000
    # x, dx, y, dy, u, h, g, v, [dz|dh], dropout(x)... ~ 30 fp32 values per token of width <= 8: budget 80 values
    budget = n * 80 * 4 * 8
    assert growth[n] < budget, f"peak RSS grew {growth[n] / 2**20:.0f} MiB for 1M tokens (budget " \
                               f"{budget / 2**20:.0f} MiB)"
    # linear, not quadratic: 4x the tokens costs at most ~4x (plus allocator slack) the memory
    assert growth[n] <= 4 * growth[250_000] + (128 << 20), growth


# ---------------------------------------------------------------------------------------------------------------
# index arithmetic beyond int32, simulated on the CPU with strides (no real > 2**31-element tensor)

HUGE_STRIDE = 2**31 + 64          # element offset of row 1 does not fit in int32


def _huge_row_stride_view(rows, cols, dtype, values):
    """A (rows, cols) view whose row stride is 2**31 + 64 elements (storage allocated lazily; only touched pages
    become resident, so this costs a few KiB of RAM)."""
    storage = torch.empty((rows - 1) * HUGE_STRIDE + cols, dtype=dtype)
    view = storage.as_strided((rows, cols), (HUGE_STRIDE, 1))
    view.copy_(values)
    return view


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_offsets_beyond_int32(backend):
    if _device(backend) != "cpu":
        pytest.skip("simulated with CPU storage; on a GPU see test_more_than_2_31_elements_on_gpu")
    dtype = torch.float16
    try:
        args = _inputs(n=2, d_in=16, d_out=8, r=4, k=3, dtype=dtype)
        x_far = _huge_row_stride_view(2, 16, dtype, args[0])
        dy_far = _huge_row_stride_view(2, 8, dtype, torch.randn(2, 8).to(dtype))
    except RuntimeError as exc:   # pragma: no cover - an allocator that refuses 4 GiB of address space
        pytest.skip(f"cannot reserve the address space: {exc}")
    assert x_far.stride(0) > 2**31
    y_far, g_far = _run(backend, [x_far] + args[1:])
    y_near, g_near = _run(backend, [x_far.contiguous()] + args[1:])
    assert torch.equal(y_far, y_near) and torch.equal(g_far, g_near)
    # the backward op with a far-strided dy (and x)
    forward = registry.backend_ops(backend).forward
    y, h, g = forward(x_far, args[1], args[2], args[3], args[4], args[5], 1.0, 0.0, 0, 0)
    backward = {"reference": torch.ops.ilora_kernels.reference_backward,
                "cpu": torch.ops.ilora_kernels.fused_backward,
                "triton": torch.ops.ilora_kernels.triton_backward}[backend]
    mask = [True, True, True, True]
    far = backward(dy_far, x_far, args[1], args[3], args[4], args[5], h, g, 1.0, 0.0, 0, mask)
    near = backward(dy_far.contiguous(), x_far.contiguous(), args[1], args[3], args[4], args[5], h, g, 1.0, 0.0, 0,
                    mask)
    for a, b in zip(far, near, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# GPU only: real tensors with more than 2**31 elements (int64 indexing in the Triton and CUDA kernels)


def _gpu_backends():
    out = []
    for b in ("triton", "cuda"):
        reason = None if HAS_CUDA else "needs a CUDA device"
        if reason is None and AVAILABLE.get(b) is not None:
            reason = f"{b}: {AVAILABLE[b]}"
        out.append(pytest.param(b, marks=pytest.mark.skipif(reason is not None, reason=reason or "")))
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", _gpu_backends())
def test_more_than_2_31_elements_on_gpu(backend):
    free, _ = torch.cuda.mem_get_info()
    d_in = d_out = 512
    n = 2**31 // d_in + 4096                                   # x and y have > 2**31 elements
    need = 5 * n * d_in * 2 + (1 << 30)
    if free < need:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    r, k = 16, 3
    x = torch.randn(n, d_in, device=dev, dtype=dt, generator=gen).requires_grad_()
    assert x.numel() > 2**31
    params = [torch.randn(d_out, d_in, device=dev, dtype=dt, generator=gen) * d_in ** -0.5, None,
              (torch.randn(k, d_in, device=dev, dtype=dt, generator=gen) * d_in ** -0.5).requires_grad_(),
              (torch.randn(r, d_in, device=dev, dtype=dt, generator=gen) * d_in ** -0.5).requires_grad_(),
              (torch.randn(k, d_out, r, device=dev, dtype=dt, generator=gen) * r ** -0.5).requires_grad_()]
    y = ilora_linear(x, *params, 2.0, backend=backend)
    assert y.numel() > 2**31
    dy = torch.ones_like(y)
    y.backward(dy)
    # the last rows live beyond element 2**31: compare them with the reference on just those rows
    tail = slice(n - 64, n)
    x_tail = x.detach()[tail].clone().requires_grad_()
    y_tail = ilora_linear(x_tail, *[p.detach() if p is not None else None for p in params], 2.0,
                          backend="reference")
    y_tail.backward(dy[tail])
    torch.testing.assert_close(y[tail].float(), y_tail.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad[tail].float(), x_tail.grad.float(), rtol=2e-2, atol=2e-2)
    for p in params[2:]:
        assert torch.isfinite(p.grad).all()
