"""The Triton backend against the tests' float64 reference of SPEC section 1 (tests/ilora_float64.py).

On a CPU-only machine the kernels run under TRITON_INTERPRET=1 (set by conftest.py): float32 and float16 there
(a bf16 ``tl.dot`` is wrong under the interpreter); bfloat16 and the large shape only with a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

import ilora_kernels as ik
import ilora_kernels.functional as functional
from fused_op_checks import check_packed_layout
from ilora_float64 import ilora_float64, make_inputs
from ilora_kernels._dropout import keep_mask

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

_status = ik.available_backends()["triton"]
pytestmark = pytest.mark.skipif(_status is not None, reason=f"Triton backend unavailable: {_status}")

if _status is None:
    from ilora_kernels.ops import triton_ilora as T
else:  # pragma: no cover
    T = None

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
MODES = ["fused", "cublas", "auto"]


def rel_err(got, want, floor=1e-2):
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / max(want.abs().max().item(), floor)).item()


def grads_of(fn, inputs, dy, dg=None):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    y, g = fn(*leaves)
    loss = (y.double() * dy.double()).sum()
    if dg is not None:
        loss = loss + (g.double() * dg.double()).sum()
    diff = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, diff)
    return y.detach(), g.detach(), dict(zip(["x", "weight", "bias", "router_weight", "lora_a", "lora_b"], grads))


def check_against_oracle(inputs, scaling, dropout_p, seed, top_k, run, dtype, dg=False, fp32_tol=1e-4):
    """Runs ``run`` (the Triton layer) and compares y, g and every gradient with the float64 oracle; the tolerance
    for half types is a small multiple of the error of the same math done by torch in that dtype."""
    n, d_out = inputs[0].shape[0], inputs[1].shape[0]
    gen = torch.Generator().manual_seed(5)
    dy = torch.randn(n, d_out, generator=gen, dtype=torch.float64).to(inputs[0].device)
    dgv = torch.randn(n, inputs[3].shape[0], generator=gen, dtype=torch.float64).to(inputs[0].device) if dg else None

    def ora(*t):       # float64 for float64 inputs; the inputs' dtype for torch's own error in that dtype
        return ilora_float64(*t, scaling, dropout_p, seed, top_k, dtype=t[0].dtype)

    y_t, g_t, gr_t = grads_of(run, inputs, dy.to(dtype), None if dgv is None else dgv)
    inputs64 = [None if t is None else t.double() for t in inputs]
    y_o, g_o, gr_o = grads_of(ora, inputs64, dy, dgv)
    y_l = g_l = gr_l = None
    if dtype != torch.float32:
        y_l, g_l, gr_l = grads_of(ora, inputs, dy.to(dtype), None if dgv is None else dgv.to(dtype))

    assert y_t.dtype == dtype and g_t.dtype == torch.float32
    pairs = [("y", y_t, y_o, y_l), ("g", g_t, g_o, g_l)]
    pairs += [(name, gr_t[name], gr_o[name], None if gr_l is None else gr_l[name]) for name in gr_t]
    # gradients that are ~0 by cancellation (d router_weight when g is one-hot) are measured against the largest
    # gradient: their exact value is 0 but dz = g (dg - <g, dg>) keeps an O(eps |dg|) rounding residue
    grad_floor = 1e-2 * max(gr_o[name].abs().max().item() for name in gr_o)
    for name, got, want, low in pairs:
        assert torch.isfinite(got).all(), name
        err = rel_err(got, want, floor=max(1e-2, grad_floor) if name in gr_o else 1e-2)
        if dtype == torch.float32:
            tol = fp32_tol
        else:
            # torch's own error in this dtype, capped (near-tied top-k can flip its selection) plus one ulp
            eps = torch.finfo(dtype).eps
            tol = 4.0 * min(rel_err(low, want), 8.0 * eps) + eps
        assert err <= tol, f"{name}: error {err:.3g} > tolerance {tol:.3g}"


# ---------------------------------------------------------------------------------------------------------------
# forward + every gradient through ilora_linear(backend="triton")

CASES = [  # (N, d_in, d_out, K, r, top_k, dropout_p, routing)
    (1, 5, 3, 1, 1, None, 0.0, "random"),
    (7, 17, 19, 3, 8, None, 0.3, "random"),
    (33, 40, 70, 3, 8, 2, 0.3, "skewed"),
    (33, 17, 70, 5, 32, 2, 0.0, "near_tied"),
    (7, 40, 3, 5, 1, 1, 0.3, "uniform"),
    (33, 5, 19, 3, 32, None, 0.0, "one_head"),
    (1, 40, 70, 5, 8, 2, 0.3, "random"),
    (33, 40, 19, 1, 32, None, 0.3, "random"),
    (7, 5, 70, 3, 1, 1, 0.0, "near_tied"),
    (33, 17, 3, 5, 8, None, 0.3, "uniform"),
    (7, 17, 19, 3, 8, 1, 0.3, "one_head"),
    (33, 40, 70, 5, 32, None, 0.0, "skewed"),
    (7, 64, 19, 3, 8, None, 0.3, "near_tied"),
]


@pytest.mark.parametrize("mode", MODES[:2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_ilora_linear_triton_matches_float64(case, dtype, mode, ilora_env):
    n, d_in, d_out, k, r, top_k, p, routing = case
    ilora_env(ILORA_TRITON_BASE_GEMM=mode)
    inputs = make_inputs(n, d_in, d_out, k, r, routing, dtype, device=DEVICE)
    torch.manual_seed(11)
    seed = functional._draw_seed() if p else 0

    def run(x, w, b, wr, a, bb):
        torch.manual_seed(11)   # ilora_linear draws the same seed
        return ik.ilora_linear(x, w, b, wr, a, bb, 1.7, dropout_p=p, training=True, top_k=top_k,
                               backend="triton", return_router_weights=True)

    check_against_oracle(inputs, 1.7, p, seed, top_k, run, dtype, dg=(case[0] == 33))


def test_leading_dims_and_no_bias():
    x, w, _, wr, a, bb = make_inputs(12, 17, 19, 3, 8, "random", torch.float32, bias=False, device=DEVICE)
    x3 = x.view(2, 6, 17)
    y, g = ik.ilora_linear(x3, w, None, wr, a, bb, 2.0, backend="triton", return_router_weights=True)
    y_o, g_o = ilora_float64(x, w, None, wr, a, bb, 2.0)
    assert y.shape == (2, 6, 19) and g.shape == (2, 6, 3)
    assert rel_err(y.reshape(12, 19), y_o) < 1e-4 and rel_err(g.reshape(12, 3), g_o) < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# the raw ops: outputs h and g, output_mask, strided inputs, the V fallback, poison


def _raw_backward_oracle(inputs, dy, scaling, p, seed, top_k):
    leaves = [None if t is None else t.double().detach().requires_grad_() for t in inputs]
    y, g, h = ilora_float64(*leaves, scaling, p, seed, top_k, with_h=True)
    grads = torch.autograd.grad((y * dy.double()).sum(), [leaves[0], leaves[3], leaves[4], leaves[5]])
    return y.detach(), g.detach(), h.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("p,top_k,seed", [(0.0, 0, 0), (0.3, 2, 2**31 + 12345), (0.3, 1, 1), (0.25, 0, 16)])
def test_raw_ops_match_float64(dtype, p, top_k, seed):
    """Seeds above int32, and 1 / 16 (Triton specialises integer arguments equal to 1 or divisible by 16)."""
    n, d_in, d_out, k, r = 33, 40, 70, 3, 8
    inputs = make_inputs(n, d_in, d_out, k, r, "skewed", dtype, device=DEVICE)
    y, h, g = torch.ops.ilora_kernels.triton_forward(*inputs, 1.5, p, seed, top_k)
    dy = torch.randn(n, d_out, dtype=torch.float64).to(DEVICE)
    y_o, g_o, h_o, grads_o = _raw_backward_oracle(inputs, dy, 1.5, p, seed, top_k)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert h.dtype == dtype and y.dtype == dtype and g.dtype == torch.float32
    assert rel_err(y, y_o) < tol and rel_err(h, h_o) < tol and rel_err(g, g_o) < tol
    x, w, _, wr, a, bb = inputs
    masks = [[True, True, True, True], [True, False, False, False], [False, True, False, False],
             [False, False, True, False], [False, False, False, True], [False, True, True, False]]
    for output_mask in masks:
        out = torch.ops.ilora_kernels.triton_backward(dy.to(dtype), x, w, wr, a, bb, h, g, 1.5, p, seed, output_mask)
        floor = max(1e-2, 1e-2 * max(t.abs().max().item() for t in grads_o))   # see check_against_oracle
        for got, want, need, like, name in zip(out, grads_o, output_mask, (x, wr, a, bb), ("dx", "dwr", "da", "db")):
            if need:
                assert got.shape == like.shape and got.dtype == like.dtype
                assert rel_err(got, want, floor) < tol, name
            else:
                assert got.numel() == 0


def test_dropout_mask_is_the_shared_hash():
    """h = A dropout(x) with A = I picks out dropout(x) itself: the mask must equal _dropout.keep_mask."""
    n, d_in, p, seed = 37, 24, 0.4, 987654321
    x = torch.rand(n, d_in, dtype=torch.float32, device=DEVICE) + 0.5        # strictly positive
    a = torch.eye(d_in, dtype=torch.float32, device=DEVICE)
    w = torch.randn(5, d_in, device=DEVICE)
    wr = torch.randn(2, d_in, device=DEVICE)
    bb = torch.randn(2, 5, d_in, device=DEVICE)
    _, h, _ = torch.ops.ilora_kernels.triton_forward(x, w, None, wr, a, bb, 1.0, p, seed, 0)
    want = keep_mask(seed, n, d_in, p, device=DEVICE)
    assert torch.equal(h != 0, want)
    torch.testing.assert_close(h[want], (x / (1 - p))[want], rtol=1e-6, atol=0)
    # backward: dA = dh^T dropout(x) and the dx term use the same mask
    dy = torch.randn(n, 5, device=DEVICE)
    g = torch.full((n, 2), 0.5, device=DEVICE)
    dx, _, d_a, _ = torch.ops.ilora_kernels.triton_backward(dy, x, w, wr, a, bb, h, g, 1.0, p, seed,
                                                            [True, False, True, False])
    dh = 0.5 * dy @ (bb[0] + bb[1])
    x_drop = x * want / (1 - p)
    torch.testing.assert_close(d_a, dh.t() @ x_drop, rtol=1e-4, atol=1e-4)
    dg = torch.stack([(dy @ bb[i] * h).sum(1) for i in range(2)], 1)
    dz = g * (dg - (g * dg).sum(1, keepdim=True))
    want_dx = dy @ w + (dh @ a) * want / (1 - p) + dz @ wr
    torch.testing.assert_close(dx, want_dx, rtol=1e-4, atol=1e-4)


def test_strided_inputs():
    """Non-contiguous x, weight, lora_b and dy are read through their strides."""
    n, d_in, d_out, k, r = 19, 17, 21, 3, 8
    x, w, b, wr, a, bb = make_inputs(n, d_in, d_out, k, r, "random", torch.float32, device=DEVICE)
    xs = torch.empty(n, 2 * d_in, device=DEVICE)[:, ::2]
    xs.copy_(x)
    ws = w.t().contiguous().t()
    bbs = bb.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    assert not (xs.is_contiguous() or ws.is_contiguous() or bbs.is_contiguous())
    y, h, g = torch.ops.ilora_kernels.triton_forward(xs, ws, b, wr, a, bbs, 2.0, 0.3, 5, 0)
    y0, h0, g0 = torch.ops.ilora_kernels.triton_forward(x, w, b, wr, a, bb, 2.0, 0.3, 5, 0)
    torch.testing.assert_close(y, y0)
    torch.testing.assert_close(h, h0)
    dy = torch.randn(d_out, n, device=DEVICE).t()
    out = torch.ops.ilora_kernels.triton_backward(dy, xs, ws, wr, a, bbs, h, g, 2.0, 0.3, 5, [True] * 4)
    ref = torch.ops.ilora_kernels.triton_backward(dy.contiguous(), x, w, wr, a, bb, h, g, 2.0, 0.3, 5, [True] * 4)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused_v", ["0", "1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_v_paths(dtype, fused_v, ilora_env):
    """Both ways of getting V = dy B_cat (in-kernel, or a GEMM + the per-token kernel) on a ragged shape."""
    ilora_env(ILORA_TRITON_FUSED_V=fused_v)
    inputs = make_inputs(37, 40, 70, 3, 32, "skewed", dtype, device=DEVICE)
    check_against_oracle(inputs, 1.1, 0.0, 0, 2,
                         lambda *t: ik.ilora_linear(*t, 1.1, top_k=2, backend="triton", return_router_weights=True),
                         dtype, dg=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fallback_v_path(dtype, monkeypatch):
    """K r too large for registers: V from a GEMM and the per-token kernel; forced here on a small shape."""
    monkeypatch.setattr(T, "_MAX_FUSED_V", 16)
    inputs = make_inputs(7, 17, 19, 5, 8, "random", dtype, device=DEVICE)

    def run(*t):
        return ik.ilora_linear(*t, 1.3, dropout_p=0.3, training=True, top_k=2, backend="triton",
                               return_router_weights=True)

    torch.manual_seed(3)
    seed = functional._draw_seed()

    def run_seeded(*t):
        torch.manual_seed(3)
        return run(*t)

    check_against_oracle(inputs, 1.3, 0.3, seed, 2, run_seeded, dtype)


def test_large_rank_fallback_default():
    """K = 5, r = 128 exceeds the register budget of the fused V kernel without any patching."""
    inputs = make_inputs(5, 9, 11, 5, 128, "random", torch.float32, device=DEVICE)
    check_against_oracle(inputs, 0.5, 0.0, 0, None,
                         lambda *t: ik.ilora_linear(*t, 0.5, backend="triton", return_router_weights=True),
                         torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_outputs_fully_overwritten(mode, monkeypatch, ilora_env):
    """Every buffer the backend allocates is prefilled with NaN: no NaN may survive into the results."""
    ilora_env(ILORA_TRITON_BASE_GEMM=mode)
    monkeypatch.setattr(T, "_empty", lambda *shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                              device=device))
    for n, d_in, d_out, k, r in [(33, 40, 70, 3, 8), (7, 5, 3, 1, 1)]:
        inputs = make_inputs(n, d_in, d_out, k, r, "random", torch.float32, device=DEVICE)
        y, h, g = torch.ops.ilora_kernels.triton_forward(*inputs, 1.0, 0.3, 9, 0)
        assert torch.isfinite(y).all() and torch.isfinite(h).all() and torch.isfinite(g).all()
        x, w, _, wr, a, bb = inputs
        dy = torch.randn(n, d_out, device=DEVICE)
        for got in torch.ops.ilora_kernels.triton_backward(dy, x, w, wr, a, bb, h, g, 1.0, 0.3, 9, [True] * 4):
            assert torch.isfinite(got).all()


def test_base_gemm_mode_is_validated(ilora_env):
    """A bad value is refused when the settings are read (the first call of a process, or settings.reload())."""
    with pytest.raises(ValueError, match="ILORA_TRITON_BASE_GEMM"):
        ilora_env(ILORA_TRITON_BASE_GEMM="nope")


def test_opcheck():
    x, w, b, wr, a, bb = make_inputs(5, 17, 19, 3, 8, "random", torch.float32, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, wr, a, bb)]
    torch.library.opcheck(torch.ops.ilora_kernels.triton_forward, (*leaves, 1.5, 0.2, 77, 0))
    torch.library.opcheck(torch.ops.ilora_kernels.triton_forward, (x, w, None, wr, a, bb, 1.5, 0.0, 0, 2))
    _, h, g = torch.ops.ilora_kernels.triton_forward(x, w, b, wr, a, bb, 1.5, 0.2, 77, 0)
    dy = torch.randn(5, 19, device=DEVICE)
    for mask in ([True] * 4, [False, True, False, True]):
        torch.library.opcheck(torch.ops.ilora_kernels.triton_backward,
                              (dy, x, w, wr, a, bb, h, g, 1.5, 0.2, 77, mask))


# ---------------------------------------------------------------------------------------------------------------
# the split shrink-route (ILORA_TRITON_SHRINK_SPLIT): d_in partials on a (token blocks, SPLIT) grid, then the reduce
# + routing kernel. Under the interpreter BLOCK_D = 32, so d_in = 97 is 3 full blocks and one of a single column.


class _LaunchSpy:
    """Stands in for a Triton kernel and records the grid of every ``kernel[grid](...)`` launch."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def _poison(monkeypatch):
    monkeypatch.setattr(T, "_empty", lambda *shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                              device=device))


def _spy(monkeypatch):
    spies = {name: _LaunchSpy(getattr(T, name)) for name in ("_shrink_route_kernel", "_shrink_route_partial_kernel",
                                                             "_route_reduce_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(T, name, spy)
    return spies


SPLIT_CASES = [  # (N, d_in, d_out, K, r, top_k, dropout_p, routing)
    (33, 97, 19, 3, 8, None, 0.0, "one_head"),
    (33, 97, 19, 3, 8, 2, 0.3, "skewed"),
    (7, 97, 70, 5, 32, 1, 0.3, "uniform"),
    (40, 97, 19, 3, 16, None, 0.3, "uniform"),
    (33, 200, 21, 5, 8, 2, 0.0, "random"),
    (17, 97, 3, 1, 1, None, 0.3, "one_head"),
]


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_split_shrink_route_matches_float64(case, dtype, split, ilora_env, monkeypatch):
    """Forced SPLIT through ilora_linear (forward + every gradient) against float64, every buffer NaN-poisoned."""
    n, d_in, d_out, k, r, top_k, p, routing = case
    ilora_env(ILORA_TRITON_SHRINK_SPLIT=str(split))
    _poison(monkeypatch)
    spies = _spy(monkeypatch)
    inputs = make_inputs(n, d_in, d_out, k, r, routing, dtype, device=DEVICE)
    torch.manual_seed(11)
    seed = functional._draw_seed() if p else 0

    def run(x, w, b, wr, a, bb):
        torch.manual_seed(11)
        return ik.ilora_linear(x, w, b, wr, a, bb, 1.7, dropout_p=p, training=True, top_k=top_k,
                               backend="triton", return_router_weights=True)

    check_against_oracle(inputs, 1.7, p, seed, top_k, run, dtype, dg=True)
    assert not spies["_shrink_route_kernel"].grids
    tile = T._shrink_route_tile(16, True)
    assert spies["_shrink_route_partial_kernel"].grids == [(-(-n // tile["BLOCK_M"]), split)]   # (token blocks, SPLIT)
    assert len(spies["_route_reduce_kernel"].grids) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("p,top_k", [(0.0, 0), (0.3, 2), (0.3, 1), (0.25, 0)])
def test_split_matches_single_kernel(dtype, p, top_k, ilora_env, monkeypatch):
    """SPLIT = 1 (the single kernel) and SPLIT = 2, 3, 4, 7, 10 (and 64, capped at the 10 blocks of d_in) agree
    within fp32 rounding on h, g, u (through y), and each matches float64; outputs and the workspace NaN-poisoned."""
    n, d_in, d_out, k, r = 70, 300, 23, 4, 16
    inputs = make_inputs(n, d_in, d_out, k, r, "random", dtype, device=DEVICE)
    _poison(monkeypatch)
    spies = _spy(monkeypatch)
    outs = {}
    for split in (1, 2, 3, 4, 7, 10, 64):
        ilora_env(ILORA_TRITON_SHRINK_SPLIT=str(split))
        outs[split] = torch.ops.ilora_kernels.triton_forward(*inputs, 1.3, p, 99, top_k)
    assert len(spies["_shrink_route_kernel"].grids) == 1
    assert [grid[1] for grid in spies["_shrink_route_partial_kernel"].grids] == [2, 3, 4, 7, 10, 10]
    y_o, g_o, h_o = ilora_float64(*[None if t is None else t.double() for t in inputs], 1.3, p, 99, top_k or None,
                                  with_h=True)
    y1, h1, g1 = outs[1]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for split, (y, h, g) in outs.items():
        assert torch.isfinite(y).all() and torch.isfinite(h).all() and torch.isfinite(g).all(), split
        torch.testing.assert_close(g, g1, rtol=1e-5, atol=1e-6)               # fp32 softmax of fp32 sums
        if dtype == torch.float32:
            torch.testing.assert_close(h, h1, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(y, y1, rtol=1e-5, atol=1e-5)
        else:   # one fp16 rounding of h may differ by an ulp
            assert rel_err(h, h1) < 2 * torch.finfo(dtype).eps and rel_err(y, y1) < 4 * torch.finfo(dtype).eps
        assert rel_err(h, h_o) < tol and rel_err(g, g_o) < tol and rel_err(y, y_o) < tol, split


def test_split_is_deterministic(ilora_env):
    """A fixed summation order: two runs with the same SPLIT give bitwise equal h, g, y."""
    ilora_env(ILORA_TRITON_SHRINK_SPLIT="3")
    inputs = make_inputs(40, 200, 19, 3, 8, "skewed", torch.float32, device=DEVICE)
    a = torch.ops.ilora_kernels.triton_forward(*inputs, 1.0, 0.3, 5, 2)
    b = torch.ops.ilora_kernels.triton_forward(*inputs, 1.0, 0.3, 5, 2)
    assert all(torch.equal(s, t) for s, t in zip(a, b))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")      # numpy's inf - inf inside the interpreter
@pytest.mark.parametrize("column", [0, 96], ids=["first-chunk", "last-chunk"])
@pytest.mark.parametrize("top_k", [0, 2])
@pytest.mark.parametrize("case", ["one_plus_inf", "one_minus_inf", "two_minus_inf", "all_minus_inf",
                                  "plus_and_minus_inf", "nan"])
def test_split_non_finite_logits_match_single_kernel(case, top_k, column, ilora_env):
    """The routing rules (NaN, +-inf, ties) live once (``_route_store``): the split path gives the single kernel's
    g, NaN for NaN, with the non-finite router entries in the first or in the last d_in chunk."""
    inf = float("inf")
    x, w, b, wr, a, bb = make_inputs(6, 97, 5, 4, 3, "random", torch.float32, device=DEVICE)
    x[:, column] = 1.0 + torch.rand(6)
    wr[:, column] = torch.tensor({"one_plus_inf": [inf, 0.5, -0.5, 0.1], "one_minus_inf": [-inf, 0.5, -0.5, 0.1],
                                  "two_minus_inf": [-inf, 0.5, -inf, 0.1], "all_minus_inf": [-inf] * 4,
                                  "plus_and_minus_inf": [inf, -inf, 0.5, 0.1],
                                  "nan": [float("nan"), 0.5, -0.5, 0.1]}[case])
    outs = []
    for split in ("1", "3"):
        ilora_env(ILORA_TRITON_SHRINK_SPLIT=split)
        outs.append(torch.ops.ilora_kernels.triton_forward(x, w, b, wr, a, bb, 1.0, 0.0, 0, top_k)[2])
    single, split3 = outs
    if case in ("one_minus_inf", "two_minus_inf"):        # a -inf logit only removes its head
        assert torch.isfinite(split3).all() and (split3[:, wr[:, column] == -inf] == 0).all()
    else:
        assert torch.isnan(split3).any(-1).all()
    assert torch.equal(torch.isnan(single), torch.isnan(split3)), (single, split3)
    finite = ~torch.isnan(single)
    torch.testing.assert_close(split3[finite], single[finite], rtol=1e-6, atol=1e-7)


def test_shrink_split_rule():
    """The auto rule (``_shrink_split``, also called by the ahead-of-time report) at the Crab+ shapes."""
    tile = T._shrink_route_tile(128, False)
    bm, bd = tile["BLOCK_M"], tile["BLOCK_D"]
    assert T._shrink_split(4096, 3584, bm, bd, 132) == 4          # 64 token blocks x 4 = 256 programs, 132 SMs
    assert T._shrink_split(4096, 18944, bm, bd, 132) == 4
    assert T._shrink_split(4096, 3584, bm, bd, 108) == 3          # A100
    assert T._shrink_split(1, 3584, bm, bd, 132) == 1             # decode: one launch, no workspace
    assert T._shrink_split(16, 18944, bm, bd, 132) == 1
    assert T._shrink_split(16384, 3584, bm, bd, 132) == 1         # 256 token blocks fill the GPU already
    assert T._shrink_split(1024, 3584, bm, bd, 132) == 7          # chunks of at least 8 BLOCK_D blocks
    assert T._shrink_split(1024, 18944, bm, bd, 132) == 16        # at most _SPLIT_MAX
    assert T._shrink_split(4096, 3584, bm, bd, None) == 1         # the interpreter, unless forced
    assert T._shrink_split(4096, 3584, bm, bd, None, forced=3) == 3
    assert T._shrink_split(4, 97, 32, 32, None, forced=9) == 4    # capped at the BLOCK_D blocks of d_in
    assert T._shrink_split(4, 1, 32, 32, 132, forced=2) == 1


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_shrink_split_setting_is_validated(bad, ilora_env):
    with pytest.raises(ValueError, match="ILORA_TRITON_SHRINK_SPLIT"):
        ilora_env(ILORA_TRITON_SHRINK_SPLIT=bad)


def test_shrink_split_setting_values(ilora_env):
    from ilora_kernels import settings

    ilora_env(ILORA_TRITON_SHRINK_SPLIT=None)
    assert settings.get().triton_shrink_split == "auto"
    ilora_env(ILORA_TRITON_SHRINK_SPLIT="AUTO")
    assert settings.get().triton_shrink_split == "auto"
    ilora_env(ILORA_TRITON_SHRINK_SPLIT=" 5 ")
    assert settings.get().triton_shrink_split == 5


# ---------------------------------------------------------------------------------------------------------------
# GPU only: a Crab+ shape in bf16


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (bf16 Triton at a large shape)")
@pytest.mark.parametrize("mode,fused_v,split", [("fused", "0", "auto"), ("cublas", "0", "auto"), ("fused", "1", "auto"),
                                                ("cublas", "0", "1")])
def test_large_bf16_matches_float64(mode, fused_v, split, ilora_env):
    """N = 4096: ``auto`` takes the split shrink-route (SPLIT 3-4 on A100 / H100), ``1`` the single kernel."""
    ilora_env(ILORA_TRITON_BASE_GEMM=mode, ILORA_TRITON_FUSED_V=fused_v, ILORA_TRITON_SHRINK_SPLIT=split)
    n, d_in, d_out, k, r = 4096, 3584, 3584, 3, 128
    inputs = make_inputs(n, d_in, d_out, k, r, "random", torch.bfloat16, device=DEVICE)
    torch.manual_seed(21)
    seed = functional._draw_seed()

    def run(*t):
        torch.manual_seed(21)
        return ik.ilora_linear(*t, 2.0, dropout_p=0.1, training=True, backend="triton", return_router_weights=True)

    check_against_oracle(inputs, 2.0, 0.1, seed, None, run, torch.bfloat16, dg=True)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("mode", MODES)
def test_packed_layout(p, mode, ilora_env):
    """Adapter tensors in ILoRALinear's packed layout (ops/layout.py): exact, and d_lora_b in lora_b's layout."""
    ilora_env(ILORA_TRITON_BASE_GEMM=mode)
    ops = torch.ops.ilora_kernels
    check_packed_layout(ops.triton_forward, ops.triton_backward, torch.float32, p, n=33, device=DEVICE)
