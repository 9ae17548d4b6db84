"""Shared by the tests of the compiled fused ops (tests/test_cpu_backend.py, test_cuda_backend.py and
test_cuda_emulation.py): the test cases, tolerances, and checks of the raw ``fused_forward`` / ``fused_backward`` ops
that each backend runs on its own op namespace and device, against the tests' float64 reference and input
generator (tests/ilora_float64.py).

Tolerances: float64 1e-10 and float32 1e-4 (max abs error / max abs value); float16 / bfloat16 errors are bounded
by a small multiple of PyTorch's own error for the same computation in that dtype (the reference backend run in
the low dtype) plus one unit of rounding.
"""

from __future__ import annotations

import pytest
import torch

import ilora_kernels as ik
from ilora_float64 import float64_grads, make_inputs
from ilora_kernels import _dropout, functional

EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def rel_err(actual: torch.Tensor, want: torch.Tensor) -> float:
    assert actual.shape == want.shape, (actual.shape, want.shape)
    assert torch.isfinite(actual).all(), "non-finite values in an output"
    scale = want.abs().max().item()
    return (actual.to(torch.float64) - want).abs().max().item() / max(scale, 1e-30)


CASES = [  # (N, d_in, d_out, K, r, top_k, dropout_p, routing)
    (1, 5, 3, 1, 1, None, 0.0, "random"),
    (7, 17, 19, 3, 8, None, 0.0, "random"),
    (33, 17, 19, 3, 8, None, 0.3, "skewed"),
    (7, 5, 19, 5, 128, None, 0.0, "skewed"),
    (33, 17, 3, 5, 8, 2, 0.0, "random"),
    (33, 17, 19, 3, 8, 1, 0.3, "skewed"),
    (7, 17, 19, 3, 128, 2, 0.3, "random"),
    (33, 5, 19, 3, 1, None, 0.0, "one_head"),
    (33, 17, 19, 5, 8, 2, 0.0, "one_head"),
    (33, 17, 19, 3, 8, None, 0.3, "uniform"),
    (33, 17, 19, 5, 8, 2, 0.0, "uniform"),
    (33, 17, 19, 3, 8, None, 0.0, "near_tied"),
    (33, 17, 19, 5, 8, 2, 0.3, "near_tied"),
    (1, 17, 3, 5, 128, 1, 0.3, "random"),
]
LOW = (torch.float16, torch.bfloat16)


def case_id(c):
    n, d_in, d_out, k, r, top_k, p, routing = c
    return f"N{n}-{d_in}x{d_out}-K{k}-r{r}-top{top_k}-p{p}-{routing}"


def tolerance(dtype, err_torch):
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-4
    return 4.0 * err_torch + 2.0 * EPS[dtype]


# ---------------------------------------------------------------------------------------------------------------
# ilora_linear(backend=...) end to end (autograd), for the errors of the reference backend in low precision


def run_layer(backend, inputs, scaling, p, seed, top_k, monkeypatch, base_grad):
    x, weight, b, router, lora_a, lora_b, dy = inputs
    leaves = [x, weight, b, router, lora_a, lora_b]
    req = [True, base_grad, base_grad and b is not None, True, True, True]
    leaves = [None if v is None else v.detach().clone().requires_grad_(r) for v, r in zip(leaves, req)]
    monkeypatch.setattr(functional, "_draw_seed", lambda: seed)
    y, g = ik.ilora_linear(*leaves, scaling, dropout_p=p, training=p > 0, top_k=top_k, backend=backend,
                           return_router_weights=True)
    y.backward(dy)
    return y.detach(), g.detach(), [None if v is None else v.grad for v in leaves]


# top-k over (near-)tied logits is decided by rounding in half precision: those pairs are not generated
CASE_DTYPES = [pytest.param(case, dtype, id=f"{case_id(case)}-{str(dtype).split('.')[1]}")
               for case in CASES for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
               if not (dtype in LOW and case[7] in ("near_tied", "uniform") and case[5])]


# ---------------------------------------------------------------------------------------------------------------
# checks of the raw ops, run by each backend's tests on its own op namespace (`ops`) and device

OUTPUT_MASKS = [[True] * 4, [True, False, False, False], [False, True, False, False], [False, False, True, False],
                [False, False, False, True], [False, True, True, False], [True, False, False, True], [False] * 4]


def check_every_output_mask(ops, dtype, p, top_k, device="cpu"):
    """y, h, g and every subset of (dx, d_router, d_lora_a, d_lora_b) against float64; unrequested outputs are
    empty."""
    n, d_in, d_out, heads, rank = 33, 17, 19, 5, 8
    inputs = make_inputs(n, d_in, d_out, heads, rank, "skewed", dtype, seed=5, with_dy=True)
    x, weight, b, router, lora_a, lora_b, dy = [v.to(device) for v in inputs]
    seed, scaling = 987654321, 0.75
    want_y, want_h, want_g, want_grads = float64_grads(x, weight, b, router, lora_a, lora_b, scaling, p, seed, top_k,
                                                       dy)
    tol = tolerance(dtype, 0.0)
    y, h, g = ops.fused_forward(x, weight, b, router, lora_a, lora_b, scaling, p, seed, top_k)
    for name, actual, want in (("y", y, want_y), ("h", h, want_h), ("g", g, want_g)):
        assert actual.is_contiguous() and actual.device == x.device, name
        assert rel_err(actual, want) <= tol, name
    want_back = [want_grads[0], want_grads[3], want_grads[4], want_grads[5]]
    for mask in OUTPUT_MASKS:
        outs = ops.fused_backward(dy, x, weight, router, lora_a, lora_b, h, g, scaling, p, seed, mask)
        for name, m, actual, want in zip(("dx", "drouter", "dlora_a", "dlora_b"), mask, outs, want_back):
            if m:
                assert actual.shape == want.shape and actual.dtype == dtype, (name, mask)
                assert rel_err(actual, want) <= tol, (name, mask)
            else:
                assert actual.shape == (0,), (name, mask)


def check_non_contiguous_inputs(ops, p, device="cpu"):
    """Column-major x, column-strided dy, and strided weight / router_weight / lora_b / h / g give the float64
    result (x and dy are read through their strides; the small tensors may be copied)."""
    n, d_in, d_out, heads, rank = 33, 17, 19, 3, 8
    inputs = make_inputs(n, d_in, d_out, heads, rank, "random", torch.float64, seed=0, with_dy=True)
    x, weight, b, router, lora_a, lora_b, dy = [v.to(device) for v in inputs]
    x_t = x.t().contiguous().t()
    dy_wide = torch.randn(n, 2 * d_out, dtype=torch.float64, device=device)
    dy_wide[:, ::2] = dy
    dy_s = dy_wide[:, ::2]
    assert not x_t.is_contiguous() and not dy_s.is_contiguous()
    want_y, want_h, want_g, want_grads = float64_grads(x, weight, b, router, lora_a, lora_b, 2.0, p, 77, 0, dy)
    y, h, g = ops.fused_forward(x_t, weight, b, router.t().contiguous().t(), lora_a,
                                lora_b.transpose(1, 2).contiguous().transpose(1, 2), 2.0, p, 77, 0)
    assert max(rel_err(y, want_y), rel_err(h, want_h), rel_err(g, want_g)) < 1e-10
    h_s, g_s = h.t().contiguous().t(), g.t().contiguous().t()
    outs = ops.fused_backward(dy_s, x_t, weight.t().contiguous().t(), router, lora_a, lora_b, h_s, g_s, 2.0, p, 77,
                              [True] * 4)
    for actual, want in zip(outs, [want_grads[0], want_grads[3], want_grads[4], want_grads[5]]):
        assert rel_err(actual, want) < 1e-10


def check_dropout_mask_is_the_shared_hash(ops):
    """With A = I (r = d_in), h is dropout(x): its zero pattern is ilora_kernels._dropout.keep_mask (the mask every
    backend regenerates from the seed), kept values are x / (1 - p), and the backward regenerates the same mask."""
    n, d_in, d_out, heads = 67, 48, 3, 2
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(n, d_in, generator=gen, dtype=torch.float64) + 0.5  # never zero
    weight = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    router = torch.randn(heads, d_in, generator=gen, dtype=torch.float64)
    lora_a = torch.eye(d_in, dtype=torch.float64)
    lora_b = torch.randn(heads, d_out, d_in, generator=gen, dtype=torch.float64)
    for p, seed in ((0.1, 0), (0.3, 42), (0.5, 2**31 - 5), (0.9, 123456789)):
        _, h, g = ops.fused_forward(x, weight, None, router, lora_a, lora_b, 1.0, p, seed, 0)
        mask = _dropout.keep_mask(seed, n, d_in, p)
        assert torch.equal(h != 0, mask), (p, seed)
        torch.testing.assert_close(h[mask], (x * (1.0 / (1.0 - p)))[mask], rtol=1e-15, atol=0)
        dy = torch.randn(n, d_out, dtype=torch.float64)
        want = float64_grads(x, weight, None, router, lora_a, lora_b, 1.0, p, seed, 0, dy)[3]
        outs = ops.fused_backward(dy, x, weight, router, lora_a, lora_b, h, g, 1.0, p, seed, [True] * 4)
        assert rel_err(outs[0], want[0]) < 1e-10 and rel_err(outs[2], want[4]) < 1e-10


def check_outputs_fully_written(ops, n, device="cpu"):
    """Outputs come from fresh allocations: pre-fill the allocator's memory with NaN and check nothing leaks."""
    d_in, d_out, heads, rank = 33, 65, 3, 16
    inputs = make_inputs(n, d_in, d_out, heads, rank, "random", torch.float32, seed=0, with_dy=True)
    x, weight, b, router, lora_a, lora_b, dy = [v.to(device) for v in inputs]
    for p in (0.0, 0.3):
        for top_k in (0, 1):
            poison = [torch.full((s,), float("nan"), device=device)
                      for s in (n * d_out, n * rank, n * heads, n * d_in, n * 64)]
            del poison
            y, h, g = ops.fused_forward(x, weight, b, router, lora_a, lora_b, 2.0, p, 5, top_k)
            poison = [torch.full((s,), float("nan"), device=device)
                      for s in (n * d_in, heads * d_in, rank * d_in, n * 64)]
            del poison
            outs = ops.fused_backward(dy, x, weight, router, lora_a, lora_b, h, g, 2.0, p, 5, [True] * 4)
            for t in (y, h, g) + tuple(outs):
                assert torch.isfinite(t).all()
            if top_k:
                assert ((g > 0).sum(dim=1) == 1).all()
            torch.testing.assert_close(g.sum(dim=1), torch.ones(n, device=device), rtol=0, atol=1e-6)


def check_zero_tokens(ops, p, device="cpu"):
    """N = 0: empty y, h, g and dx; zero (not garbage) weight gradients."""
    inputs = make_inputs(0, 5, 3, 3, 2, "random", torch.float32, seed=0, with_dy=True)
    x, weight, b, router, lora_a, lora_b, dy = [v.to(device) for v in inputs]
    y, h, g = ops.fused_forward(x, weight, b, router, lora_a, lora_b, 2.0, p, 0, 0)
    assert y.shape == (0, 3) and h.shape == (0, 2) and g.shape == (0, 3)
    outs = ops.fused_backward(dy, x, weight, router, lora_a, lora_b, h, g, 2.0, p, 0, [True] * 4)
    assert outs[0].shape == (0, 5)
    for t, shape in zip(outs[1:], [(3, 5), (2, 5), (3, 3, 2)]):
        assert t.shape == shape and torch.count_nonzero(t) == 0


def check_opcheck(ops, dtype, p, device="cpu"):
    """torch.library.opcheck on the forward (with and without bias, dense and top-k) and two backward masks."""
    inputs = make_inputs(7, 17, 19, 3, 4, "random", dtype, seed=0, with_dy=True)
    x, weight, b, router, lora_a, lora_b, dy = [v.to(device) for v in inputs]
    x, router, lora_a, lora_b = (v.requires_grad_() for v in (x, router, lora_a, lora_b))
    torch.library.opcheck(ops.fused_forward.default, (x, weight, b, router, lora_a, lora_b, 2.0, p, 11, 0))
    torch.library.opcheck(ops.fused_forward.default, (x, weight, None, router, lora_a, lora_b, 2.0, p, 11, 2))
    with torch.no_grad():
        _, h, g = ops.fused_forward(x, weight, b, router, lora_a, lora_b, 2.0, p, 11, 0)
    args = [v.detach() for v in (dy, x, weight, router, lora_a, lora_b, h, g)]
    torch.library.opcheck(ops.fused_backward.default, (*args, 2.0, p, 11, [True, True, True, True]))
    torch.library.opcheck(ops.fused_backward.default, (*args, 2.0, p, 11, [False, True, False, True]))


def packed(router, lora_a, lora_b):
    """Copies of router (K, d_in), lora_a (r, d_in) and lora_b (K, d_out, r) in ILoRALinear's packed layout
    (ilora_kernels/ops/layout.py): one (K + r, d_in) buffer, lora_b a view of a (d_out, K, r) buffer."""
    shrink = torch.cat((router, lora_a), 0).contiguous()
    heads = lora_b.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    return shrink[:router.shape[0]], shrink[router.shape[0]:], heads


def check_packed_layout(forward, backward, dtype, p, n, device="cpu"):
    """The raw ops ``forward`` / ``backward`` on adapter tensors in the packed layout: the float64 result for every
    output mask, d_lora_b in lora_b's (packed) layout and the other outputs contiguous; on separate tensors
    d_lora_b is contiguous. ``n`` <= r (8) takes the CPU backend's few-token path."""
    d_in, d_out, heads, rank = 17, 19, 3, 8
    inputs = make_inputs(n, d_in, d_out, heads, rank, "skewed", dtype, seed=11, with_dy=True)
    x, weight, b, router, lora_a, lora_b, dy = [v.to(device) for v in inputs]
    seed, scaling = 1234567, 1.5
    want_y, want_h, want_g, want_grads = float64_grads(x, weight, b, router, lora_a, lora_b, scaling, p, seed, 0, dy)
    want_back = [want_grads[0], want_grads[3], want_grads[4], want_grads[5]]
    tol = tolerance(dtype, 0.0)
    p_router, p_lora_a, p_lora_b = packed(router, lora_a, lora_b)
    assert p_lora_b.stride() == (rank, heads * rank, 1)
    for adapter, layout in (((p_router, p_lora_a, p_lora_b), "packed"), ((router, lora_a, lora_b), "separate")):
        y, h, g = forward(x, weight, b, *adapter, scaling, p, seed, 0)
        for name, actual, want in (("y", y, want_y), ("h", h, want_h), ("g", g, want_g)):
            assert rel_err(actual, want) <= tol, (layout, name)
        for mask in OUTPUT_MASKS[:-1]:
            outs = backward(dy, x, weight, *adapter, h, g, scaling, p, seed, mask)
            for name, m, actual, want in zip(("dx", "drouter", "dlora_a", "dlora_b"), mask, outs, want_back):
                if not m:
                    assert actual.shape == (0,), (layout, name, mask)
                    continue
                assert actual.shape == want.shape and rel_err(actual, want) <= tol, (layout, name, mask)
                if name == "dlora_b" and layout == "packed":
                    assert actual.stride() == p_lora_b.stride(), (layout, mask, actual.stride())
                else:
                    assert actual.is_contiguous(), (layout, name, mask, actual.stride())
