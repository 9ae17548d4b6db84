"""Autograd and dispatch edges found by adversarial testing: double backward, torch.func transforms, DTensor inputs,
a scaling beyond float32, autocast dtypes, empty inputs, bf16 under the Triton interpreter and top_k = 1.

Every check compares against the tests' one float64 reference (``tests/ilora_float64.py``) and runs on every
backend usable here."""

import socket
import warnings

import pytest
import torch
import torch.nn.functional as F

import ilora_kernels as ik
from ilora_float64 import float64_grads, ilora_float64, make_inputs
from ilora_kernels import settings
from ilora_kernels.ops import reference
from ilora_kernels.ops.registry import resolve

BACKENDS = [name for name, reason in ik.available_backends().items() if reason is None]
FLOAT32_MAX = torch.finfo(torch.float32).max
SHAPE = (5, 6, 4, 3, 2)          # N, d_in, d_out, K, r


def _inputs(dtype=torch.float32, **kw):
    return make_inputs(*SHAPE, dtype=dtype, seed=7, **kw)


def _leaves(tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def _close(got, want, tol=2e-5):
    got, want = got.detach().double(), want.detach().double()
    assert (got - want).abs().max().item() <= tol * (1.0 + want.abs().max().item())


# ---------------------------------------------------------------------------------------------------------------
# 1. double backward: refused with a clear message on every autograd path; first order unchanged


@pytest.mark.parametrize("path", ["eager", "registered"])
@pytest.mark.parametrize("use_g", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused_and_first_order_is_unchanged(backend, use_g, path, ilora_env):
    if path == "registered":
        ilora_env(ILORA_EAGER_FAST_PATH="0")
    x, w, b, wr, a, lb, dy = _inputs(with_dy=True)
    dg = torch.randn(SHAPE[0], SHAPE[3])
    leaves = _leaves((x, w, b, wr, a, lb))
    y, g = ik.ilora_linear(*leaves, 1.5, backend=backend, return_router_weights=True)
    loss = (y * dy).sum() + ((g * dg).sum() if use_g else 0.0)
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    _, _, _, want = float64_grads(x, w, b, wr, a, lb, 1.5, 0.0, 0, None, dy, dg if use_g else None)
    for got, expected in zip(grads, want):
        _close(got, expected)
    second = sum((t * t).sum() for t in grads)
    with pytest.raises(RuntimeError, match=r"ilora_linear does not support double backward.*reference\.forward"):
        torch.autograd.grad(second, leaves)


@pytest.mark.parametrize("top_k, dropout_p", [(None, 0.0), (2, 0.25)])
def test_the_suggested_double_backward_workaround_is_correct(top_k, dropout_p):
    """The refusal points to ``ops.reference.forward`` called directly (plain torch ops): its second derivatives
    match float64 double backward of the reference math."""
    x, w, b, wr, a, lb = _inputs(torch.float64)
    ours, ref = _leaves((x, w, b, wr, a, lb)), _leaves((x, w, b, wr, a, lb))
    y, _, g = reference.forward(*ours, 1.5, dropout_p, 11, top_k or 0)
    y64, g64 = ilora_float64(*ref, 1.5, dropout_p, 11, top_k)
    results = []
    for (yy, gg), leaves in (((y, g), ours), ((y64, g64), ref)):
        first = torch.autograd.grad(yy.pow(2).sum() + gg.pow(2).sum(), leaves, create_graph=True)
        results.append(torch.autograd.grad(sum((t * t).sum() for t in first), leaves))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert all(t.abs().max() > 0 for t in results[1])


# ---------------------------------------------------------------------------------------------------------------
# 2. torch.func transforms


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_grad_matches_float64(backend):
    x, w, b, wr, a, lb, dy = _inputs(with_dy=True)
    dg = torch.randn(SHAPE[0], SHAPE[3])

    def loss(*tensors):
        y, g = ik.ilora_linear(*tensors, 1.5, backend=backend, return_router_weights=True)
        return (y * dy).sum() + (g * dg).sum()

    grads = torch.func.grad(loss, argnums=tuple(range(6)))(x, w, b, wr, a, lb)
    _, _, _, want = float64_grads(x, w, b, wr, a, lb, 1.5, 0.0, 0, None, dy, dg)
    for got, expected in zip(grads, want):
        _close(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_vmap_and_per_sample_grads_match_float64(backend):
    x, w, b, wr, a, lb = _inputs()
    xs = torch.stack([x, x.flip(0)])                                          # (2, N, d_in)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # "performance drop": PyTorch's per-sample fallback for custom ops
        y = torch.func.vmap(lambda xi: ik.ilora_linear(xi, w, b, wr, a, lb, 1.5, backend=backend))(xs)
        per_sample = torch.func.vmap(torch.func.grad(
            lambda router, xi: ik.ilora_linear(xi, w, b, router, a, lb, 1.5, backend=backend).sum()),
            in_dims=(None, 0))(wr, xs)
    for i in range(2):
        _close(y[i], ilora_float64(xs[i], w, b, wr, a, lb, 1.5)[0])
        dy = torch.ones(SHAPE[0], SHAPE[2])
        _close(per_sample[i], float64_grads(xs[i], w, b, wr, a, lb, 1.5, 0.0, 0, None, dy)[3][3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_func_grad_is_refused(backend):
    x, w, b, wr, a, lb = _inputs()

    def inner(router):
        return torch.func.grad(lambda r: ik.ilora_linear(x, w, b, r, a, lb, 1.5, backend=backend).pow(2).sum())(
            router).sum()

    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.func.grad(inner)(wr)


# ---------------------------------------------------------------------------------------------------------------
# 3. DTensor inputs: refused, naming the tensor and the workaround


@pytest.fixture
def one_process_group():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is unavailable")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        from torch.distributed.tensor import DeviceMesh
        yield DeviceMesh("cpu", [0])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("which", [0, 3])        # x, router_weight
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtensor_is_refused_with_the_workaround(backend, which, one_process_group):
    from torch.distributed.tensor import Replicate, distribute_tensor
    tensors = _inputs()
    name = ("x", "weight", "bias", "router_weight")[which]
    tensors[which] = distribute_tensor(tensors[which], one_process_group, [Replicate()])
    with pytest.raises(TypeError, match=rf"{name} is a DTensor.*to_local\(\).*full_tensor\(\).*FSDP"):
        ik.ilora_linear(*tensors, 1.5, backend=backend)
    tensors[which] = tensors[which].to_local()                               # the workaround works
    _close(ik.ilora_linear(*tensors, 1.5, backend=backend), ilora_float64(*tensors, 1.5)[0])


# ---------------------------------------------------------------------------------------------------------------
# 4. a scaling beyond float32


@pytest.mark.parametrize("scaling", [1e39, -1e39, 10 ** 400], ids=["1e39", "-1e39", "int-10**400"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_scaling_beyond_float32_is_named(backend, scaling):
    with pytest.raises(ValueError, match=r"scaling .* float32 .*3\.40282e\+38"):
        ik.ilora_linear(*_inputs(), scaling, backend=backend)


def test_largest_float32_scaling_is_accepted():
    tensors = _inputs()
    tensors[5] = tensors[5] / FLOAT32_MAX
    _close(ik.ilora_linear(*tensors, FLOAT32_MAX, backend="reference"), ilora_float64(*tensors, FLOAT32_MAX)[0])


@pytest.mark.parametrize("make", [
    lambda alpha: ik.ILoRALinear(torch.nn.Linear(4, 3), r=2, alpha=alpha),
    lambda alpha: ik.ILoRAConfig(r=2, alpha=alpha),
])
def test_alpha_whose_scaling_overflows_float32_is_named(make):
    with pytest.raises(ValueError, match=r"alpha = 1e\+40 .*alpha / r.*float32"):
        make(1e40)
    make(1e38)                                                              # alpha / r = 5e37 fits


# ---------------------------------------------------------------------------------------------------------------
# 5. autocast: the tensors F.linear casts, and only those


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_casts_like_f_linear(backend, dtype, autocast_dtype):
    tensors = _inputs(dtype)
    with torch.autocast("cpu", dtype=autocast_dtype):
        want_dtype = F.linear(tensors[0], tensors[1], tensors[2]).dtype
        try:
            resolve(backend, "cpu", want_dtype)
        except (TypeError, ValueError):
            pytest.skip(f"{backend} does not run {want_dtype}")
        if backend == "triton" and want_dtype == torch.bfloat16 and settings.get().triton_interpret:
            pytest.skip("bf16 is refused under the Triton interpreter")
        y, g = ik.ilora_linear(*tensors, 1.5, backend=backend, return_router_weights=True)
    assert y.dtype == want_dtype
    if dtype == torch.float64:
        assert g.dtype == torch.float64
        _close(y, ik.ilora_linear(*tensors, 1.5, backend=backend), tol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# 6. empty inputs: g is part of the graph


@pytest.mark.parametrize("which", [0, 3, None])  # x, router_weight, nothing requires grad
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input_router_weights_are_in_the_graph(backend, which):
    tensors = _inputs()
    tensors[0] = torch.empty(2, 0, SHAPE[1])
    if which is not None:
        tensors[which].requires_grad_()
    y, g = ik.ilora_linear(*tensors, 1.5, backend=backend, return_router_weights=True)
    assert g.shape == (2, 0, SHAPE[3]) and g.dtype == torch.float32
    assert g.requires_grad == y.requires_grad == (which is not None)
    if which is not None:
        (grad,) = torch.autograd.grad(g.sum() + y.sum(), tensors[which])
        assert grad.shape == tensors[which].shape and not grad.any()


# ---------------------------------------------------------------------------------------------------------------
# 7. bf16 under the Triton interpreter


@pytest.mark.skipif("triton" not in BACKENDS or not settings.get().triton_interpret,
                    reason="needs the Triton backend under TRITON_INTERPRET=1")
def test_triton_interpreter_refuses_bf16():
    with pytest.raises(TypeError, match=r"backend='triton' supports float16 and float32 \(bfloat16 is refused under "
                                        r"TRITON_INTERPRET=1.*x has dtype torch.bfloat16"):
        ik.ilora_linear(*_inputs(torch.bfloat16), 1.5, backend="triton")
    # the op itself refuses too (a direct call skips the registry)
    with pytest.raises(TypeError, match=r"x has dtype torch.bfloat16.*TRITON_INTERPRET.*float32 or float16"):
        torch.ops.ilora_kernels.triton_forward(*_inputs(torch.bfloat16), 1.5, 0.0, 0, 0)
    assert resolve("auto", "cpu", torch.bfloat16) != "triton"


# ---------------------------------------------------------------------------------------------------------------
# 8. top_k = 1: the router gets a zero gradient; the hyperparameter validator says so


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_1_gives_the_router_an_exactly_zero_gradient(backend):
    leaves = _leaves(_inputs())
    (ik.ilora_linear(*leaves, 1.5, top_k=1, backend=backend) ** 2).sum().backward()
    assert leaves[3].grad is not None and not leaves[3].grad.any()
    assert leaves[4].grad.any()


@pytest.mark.parametrize("make", [
    lambda **kw: ik.ILoRALinear(torch.nn.Linear(4, 3), r=2, **kw),
    lambda **kw: ik.ILoRAConfig(r=2, **kw),
])
def test_top_k_1_warns_that_the_router_will_not_train(make):
    with pytest.warns(UserWarning, match=r"top_k=1 .*router .*zero gradient.*top_k >= 2"):
        make(num_heads=3, top_k=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(num_heads=1, top_k=1)
        make(num_heads=3, top_k=2)
        make(num_heads=3, top_k=None)
