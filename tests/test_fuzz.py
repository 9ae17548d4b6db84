"""Property-based fuzzing of ``ilora_linear`` on every backend available here (hypothesis).

Each example draws a problem (token count N including 0 and 1, leading dims for a 1-D to 4-D x, d_in, d_out, r up to
256, K up to 64, dtype, strides of x and of every weight, bias or not, top_k, dropout p and training, scaling, whether
the loss also uses the router weights g) and checks y, g and the gradients of x, weight, bias, router_weight, lora_a
and lora_b against ``tests/ilora_float64.py`` (the tests' float64 reference, autograd for its gradients).
A fraction of the examples are invalid on purpose (wrong shape, dtype, device-independent argument errors); those
must raise ValueError / TypeError / RuntimeError with a message naming the offending argument, never crash or
return garbage.

Example counts (``deadline=None``; derandomized when ``CI=true`` so CI runs are reproducible):
reference / cpu ``ILORA_FUZZ_EXAMPLES`` (default 50), triton (interpreter on CPU) ``ILORA_FUZZ_TRITON_EXAMPLES``
(default 10, and smaller shapes).
"""

from __future__ import annotations

import math
import os
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

from ilora_float64 import ilora_float64, make_inputs
from ilora_kernels import functional
from ilora_kernels.ops import registry

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
EXAMPLES = int(os.environ.get("ILORA_FUZZ_EXAMPLES", "50"))
TRITON_EXAMPLES = int(os.environ.get("ILORA_FUZZ_TRITON_EXAMPLES", "10"))
AVAILABLE = functional.available_backends()
HAS_CUDA = torch.cuda.is_available()
# where each backend's tensors live: triton runs on the GPU when there is one, else under the interpreter
DEVICE = {"reference": "cpu", "cpu": "cpu", "cuda": "cuda", "triton": "cuda" if HAS_CUDA else "cpu"}

# max |error| / (1 + max |reference|) allowed per activation dtype (y, g and gradients)
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 3e-2, torch.bfloat16: 1.5e-1}
# minimum float64 gap between the top_k-th and the next logit for the selection to be stable in that dtype
TIE_GAP = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 2e-1}
SEED = 987654321


def _settings(n):
    return settings(max_examples=n, deadline=None, derandomize=CI, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def _backend_param(name):
    reason = AVAILABLE.get(name)
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=f"{name}: {reason}"))


# ---------------------------------------------------------------------------------------------------------------
# drawing a problem


@st.composite
def problems(draw, backend):
    small = backend == "triton"
    if backend in ("reference", "cpu", "cuda"):
        dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    else:
        dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float32, torch.float64]))
    n_lead = draw(st.integers(0, 3))                      # x is (n_lead + 1)-D
    max_dim = 3 if small else 5
    dims = st.one_of(st.integers(1, max_dim), st.just(0)) if n_lead == 1 else st.integers(1, max_dim)
    lead = tuple(draw(st.lists(dims, min_size=n_lead, max_size=n_lead)))
    if n_lead == 1 and draw(st.booleans()):
        lead = (draw(st.sampled_from([0, 1, 2, 17, 40 if not small else 24, 64 if not small else 33])),)
    d_in = draw(st.integers(1, 24 if small else 48))
    d_out = draw(st.integers(1, 24 if small else 48))
    num_heads = draw(st.sampled_from([1, 2, 3, 4, 7, 16, 64]))
    rank = draw(st.sampled_from([1, 2, 3, 5, 8, 16, 33, 64, 128, 256]))
    assume(num_heads * rank <= (1024 if small else 4096))
    top_k = draw(st.one_of(st.none(), st.integers(1, num_heads)))
    p = draw(st.sampled_from([0.0, 0.1, 0.5]))
    training = draw(st.booleans())
    scaling = draw(st.sampled_from([1.0, 2.0, 0.25, -1.5, 1e-3]))
    return dict(dtype=dtype, lead=lead, d_in=d_in, d_out=d_out, num_heads=num_heads, rank=rank, top_k=top_k,
                p=p, training=training, scaling=scaling,
                bias=draw(st.sampled_from(["none", "contiguous", "strided"])),
                x_layout=draw(st.sampled_from(["contiguous", "sliced", "transposed", "expanded"])),
                w_layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
                use_g=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 2)),
                fault=draw(st.sampled_from([None] * 20 + ["d_in", "lora_b", "bias", "dtype_mix", "int_dtype",
                                                         "top_k", "scaling", "dropout", "rank0", "scalar_x"])))


def _leaf(t):
    """t's values as a leaf tensor that keeps t's strides."""
    return t.detach().requires_grad_()


def _relayout(t, layout):
    """The values of a 2-D tensor in another memory layout: column-major, or every other column of a wider buffer."""
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "sliced":
        wide = t.new_empty(t.shape[0], 2 * t.shape[1])
        wide[:, ::2] = t
        return wide[:, ::2]
    return t


def build(pb):
    """The problem's tensors: the tests' input generator (tests/ilora_float64.py), then the drawn layouts."""
    dt, d_in, d_out, k, r, lead = pb["dtype"], pb["d_in"], pb["d_out"], pb["num_heads"], pb["rank"], pb["lead"]
    shape = lead + (d_in,)
    x, weight, bias, router, lora_a, lora_b = make_inputs(lead[-1] if lead else 1, d_in, d_out, k, r, dtype=dt,
                                                          lead=lead[:-1], bias=pb["bias"] != "none",
                                                          seed=pb["seed"])
    x = x.reshape(shape)
    if pb["x_layout"] == "sliced":
        wide = x.new_empty(*lead, 2 * d_in)
        wide[..., ::2] = x
        x = wide[..., ::2]
    elif pb["x_layout"] == "transposed" and len(shape) >= 2:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif pb["x_layout"] == "expanded" and len(shape) >= 2 and shape[-2] > 0:
        x = x[..., :1, :].expand(shape)
    assert tuple(x.shape) == shape
    wl = pb["w_layout"]
    weight, router, lora_a = (_relayout(t, wl) for t in (weight, router, lora_a))
    if wl != "contiguous":
        lora_b = lora_b.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    if pb["bias"] == "strided":
        wide = bias.new_empty(2 * d_out)
        wide[::2] = bias
        bias = wide[::2]
    return x, weight, bias, router, lora_a, lora_b


def inject_fault(pb, args, kwargs):
    """Breaks one argument; returns the word the error message must contain."""
    x, weight, bias, router, lora_a, lora_b = args
    fault = pb["fault"]
    if fault == "d_in":
        args[0] = torch.randn(*x.shape[:-1], x.shape[-1] + 1, dtype=x.dtype)
        return "x"
    if fault == "lora_b":
        args[5] = torch.randn(lora_b.shape[0], lora_b.shape[1] + 1, lora_b.shape[2], dtype=x.dtype)
        return "lora_b"
    if fault == "bias":
        args[2] = torch.randn(weight.shape[0] + 2, dtype=x.dtype)
        return "bias"
    if fault == "dtype_mix":
        other = torch.float32 if x.dtype != torch.float32 else torch.float64
        args[3] = router.to(other)
        return "router_weight"
    if fault == "int_dtype":
        args[4] = torch.ones(lora_a.shape, dtype=torch.int32)
        return "lora_a"
    if fault == "top_k":
        kwargs["top_k"] = router.shape[0] + 1
        return "top_k"
    if fault == "scaling":
        kwargs["scaling"] = float("nan")
        return "scaling"
    if fault == "dropout":
        kwargs["dropout_p"] = 1.0
        return "dropout_p"
    if fault == "rank0":
        args[4] = torch.randn(0, x.shape[-1], dtype=x.dtype)
        args[5] = torch.randn(lora_b.shape[0], lora_b.shape[1], 0, dtype=x.dtype)
        return "lora_a"
    if fault == "scalar_x":
        args[0] = torch.tensor(1.0, dtype=x.dtype)
        return "x"
    raise AssertionError(fault)


# ---------------------------------------------------------------------------------------------------------------
# the check


def _max_err(got, want):
    if got is None or want is None:
        return 0.0 if got is None and want is None else math.inf
    want = want.detach().to(torch.float64)
    got = got.detach().cpu().to(torch.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    if want.numel() == 0:
        return 0.0
    assert torch.isfinite(got).all(), "non-finite value where the float64 oracle is finite"
    return ((got - want).abs().max() / (1.0 + want.abs().max())).item()


def _backend_takes(backend, x):
    """Whether the registry lets ``backend`` run x's device and dtype (the Triton interpreter, for one, refuses
    float64 and bf16)."""
    try:
        registry.resolve(backend, x.device.type, x.dtype)
    except TypeError:
        return False
    return True


def check_problem(backend, pb):
    note(repr(pb))
    device = DEVICE[backend]
    args = list(build(pb))
    kwargs = dict(scaling=pb["scaling"], dropout_p=pb["p"], training=pb["training"], top_k=pb["top_k"])
    word = inject_fault(pb, args, kwargs) if pb["fault"] is not None else None
    if device != "cpu":     # (an expanded x becomes contiguous on the copy)
        args = [None if t is None else t.to(device) for t in args]
    if pb["fault"] is None and not _backend_takes(backend, args[0]):   # a dtype the backend refuses, even empty
        with pytest.raises(TypeError, match=backend):
            functional.ilora_linear(*args, backend=backend, **kwargs)
        return
    if pb["fault"] is not None:
        event("invalid input")
        with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
            functional.ilora_linear(*args, backend=backend, **kwargs)
        assert word in str(info.value), f"error does not name {word!r}: {info.value}"
        return

    x, weight, bias, router, lora_a, lora_b = args
    dt = x.dtype
    p_eff = pb["p"] if pb["training"] else 0.0
    if pb["top_k"] is not None and pb["top_k"] < pb["num_heads"] and x.numel() > 0:
        # skip near ties: a legitimately different selection in a low precision is not an error
        logits = x.reshape(-1, x.shape[-1]).double() @ router.double().t()
        top = logits.topk(min(pb["top_k"] + 1, pb["num_heads"]), dim=-1).values
        assume(bool(((top[:, -2] - top[:, -1]).abs() > TIE_GAP[dt]).all()))

    lead = pb["lead"]
    event(f"numeric check, {str(dt).split('.')[-1]}, {'empty' if x.numel() == 0 else 'N>0'}")
    leaves = [None if t is None else _leaf(t) for t in args]
    with mock.patch.object(functional, "_draw_seed", lambda: SEED):
        y, g = functional.ilora_linear(*leaves, backend=backend, return_router_weights=True, **kwargs)
    assert y.shape == lead + (pb["d_out"],) and y.dtype == dt
    assert g.shape == lead + (pb["num_heads"],)
    assert g.dtype == (torch.float64 if dt == torch.float64 else torch.float32)

    ref = [None if t is None else _leaf(t.detach().cpu().double()) for t in args]
    y64, g64 = ilora_float64(*ref, pb["scaling"], p_eff, SEED, pb["top_k"])
    tol = TOL[dt]
    assert _max_err(y, y64) <= tol, f"y: {_max_err(y, y64)}"
    assert _max_err(g, g64) <= tol, f"g: {_max_err(g, g64)}"

    gen = torch.Generator().manual_seed(pb["seed"] + 1)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    dg = torch.randn(g.shape, generator=gen, dtype=torch.float64)
    loss = (y.double() * dy.to(device)).sum() + ((g.double() * dg.to(device)).sum() if pb["use_g"] else 0.0)
    loss64 = (y64 * dy).sum() + ((g64 * dg).sum() if pb["use_g"] else 0.0)
    loss.backward()
    loss64.backward()
    for name, got, want in zip(("x", "weight", "bias", "router_weight", "lora_a", "lora_b"), leaves, ref,
                                   strict=True):
        if got is None:
            continue
        if got.grad is None:
            assert want.grad is None or want.grad.abs().max() == 0 or got.numel() == 0, f"d{name} missing"
            continue
        # gradient tolerances: low precisions round dy (and intermediate products) once more than y
        err = _max_err(got.grad, want.grad)
        assert err <= 2 * tol, f"d{name}: {err}"


@pytest.mark.parametrize("backend", [_backend_param("reference"), _backend_param("cpu"), _backend_param("cuda")])
@_settings(EXAMPLES)
@given(data=st.data())
def test_fuzz_against_float64(backend, data):
    check_problem(backend, data.draw(problems(backend)))


@pytest.mark.parametrize("backend", [_backend_param("triton")])
@_settings(TRITON_EXAMPLES)
@given(data=st.data())
def test_fuzz_triton_against_float64(backend, data):
    check_problem(backend, data.draw(problems(backend)))
