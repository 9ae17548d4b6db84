"""The C++ CPU backend (``backend="cpu"``, ops ``ilora_kernels::fused_forward`` / ``fused_backward`` on CPU tensors)
against the independent float64 implementation of tests/fused_op_checks.py (SPEC section 1)."""

from __future__ import annotations

import pytest
import torch

from fused_op_checks import (
    CASE_DTYPES,
    LOW,
    check_dropout_mask_is_the_shared_hash,
    check_every_output_mask,
    check_non_contiguous_inputs,
    check_opcheck,
    check_outputs_fully_written,
    check_zero_tokens,
    float64_grads,
    make_inputs,
    rel_err,
    run_layer,
    tolerance,
)
from ilora_kernels import functional

_reason = functional.available_backends()["cpu"]  # also attaches the fakes and autograd of the fused ops
if _reason is not None:
    pytest.skip(f"the C++ CPU backend is unavailable: {_reason}", allow_module_level=True)

OPS = torch.ops.ilora_kernels


@pytest.mark.parametrize("case,dtype", CASE_DTYPES)
def test_layer_matches_float64(case, dtype, monkeypatch):
    n, d_in, d_out, heads, rank, top_k, p, routing = case
    inputs = make_inputs(n, d_in, d_out, heads, rank, routing, dtype, seed=n * 31 + d_in, with_dy=True)
    seed, scaling = 1234567 + n, 2.0
    base_grad = dtype != torch.float16
    y, g, grads = run_layer("cpu", inputs, scaling, p, seed, top_k, monkeypatch, base_grad)
    keep = (g > 0) if (dtype in LOW and top_k) else None
    want_y, _, want_g, want_grads = float64_grads(*inputs[:6], scaling, p, seed, top_k or 0, inputs[6], keep=keep)
    assert g.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert y.dtype == dtype
    if dtype in LOW:
        ry, rg, rgrads = run_layer("reference", inputs, scaling, p, seed, top_k, monkeypatch, base_grad)
        torch_errs = [rel_err(ry, want_y), rel_err(rg, want_g)] + [
            None if (w is None or a is None) else rel_err(a, w) for a, w in zip(rgrads, want_grads)]
    else:
        torch_errs = [0.0] * 8
    names = ["y", "g", "dx", "dweight", "dbias", "drouter", "dlora_a", "dlora_b"]
    for name, actual, want, terr in zip(names, [y, g] + grads, [want_y, want_g] + want_grads, torch_errs):
        if want is None or actual is None:
            assert actual is None or not base_grad, name
            continue
        if name in ("dweight", "dbias") and not base_grad:
            continue
        if name == "drouter" and routing == "one_head" and dtype != torch.float64:
            # the router gradient is ~exp(-60) relative to the others: compare on the scale of dx instead
            err = (actual.double() - want).abs().max().item() / want_grads[0].abs().max().item()
        else:
            err = rel_err(actual, want)
        assert err <= tolerance(dtype, terr), f"{name}: error {err:.3e} (torch's own {terr:.3e})"


# ---------------------------------------------------------------------------------------------------------------
# the raw ops: h, g, every output_mask, non-contiguous x / dy


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("top_k", [0, 2])
def test_raw_ops_all_masks(dtype, p, top_k):
    check_every_output_mask(OPS, dtype, p, top_k)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_non_contiguous_inputs(p):
    check_non_contiguous_inputs(OPS, p)


def test_dropout_mask_bit_identical():
    check_dropout_mask_is_the_shared_hash(OPS)


def test_outputs_fully_written():
    check_outputs_fully_written(OPS, 257)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_zero_tokens(p):
    check_zero_tokens(OPS, p)


# ---------------------------------------------------------------------------------------------------------------
# opcheck and bad input


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d).split(".")[1])
def test_opcheck(p, dtype):
    check_opcheck(OPS, dtype, p)


def _good(dtype=torch.float32):
    return make_inputs(4, 6, 5, 3, 2, "random", dtype, seed=0, with_dy=True)


@pytest.mark.parametrize("which, bad, needle", [
    (0, lambda t: t.unsqueeze(0), "x"),
    (0, lambda t: t.to(torch.int32), "x"),
    (0, lambda t: t[:, :5], "weight"),
    (1, lambda t: t.double(), "weight"),
    (2, lambda t: t[:4], "bias"),
    (3, lambda t: t.to(torch.float16), "router_weight"),
    (3, lambda t: t[:, :5], "router_weight"),
    (4, lambda t: t.double(), "lora_a"),
    (4, lambda t: t[:, :5], "lora_a"),
    (5, lambda t: t[:, :4], "lora_b"),
    (5, lambda t: t[:2], "lora_b"),
    (5, lambda t: t[0], "lora_b"),
])
def test_bad_forward_input_names_tensor(which, bad, needle):
    args = _good()[:6]
    args[which] = bad(args[which])
    with pytest.raises(RuntimeError, match=needle):
        OPS.fused_forward(*args, 2.0, 0.0, 0, 0)


def test_bad_scalars():
    args = _good()[:6]
    with pytest.raises(RuntimeError, match="dropout_p"):
        OPS.fused_forward(*args, 2.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="top_k"):
        OPS.fused_forward(*args, 2.0, 0.0, 0, -1)
    with pytest.raises(RuntimeError, match="scaling"):
        OPS.fused_forward(*args, float("inf"), 0.0, 0, 0)


@pytest.mark.parametrize("which, bad, needle", [
    ("dy", lambda t: t[:, :4], "dy"),
    ("dy", lambda t: t.double(), "dy"),
    ("h", lambda t: t[:3], "h"),
    ("h", lambda t: t.double(), "h"),
    ("g", lambda t: t.to(torch.float16), "g"),
    ("g", lambda t: t[:, :2], "g"),
])
def test_bad_backward_input_names_tensor(which, bad, needle):
    x, weight, b, router, lora_a, lora_b, dy = _good()
    _, h, g = OPS.fused_forward(x, weight, b, router, lora_a, lora_b, 2.0, 0.0, 0, 0)
    named = {"dy": dy, "h": h, "g": g}
    named[which] = bad(named[which])
    with pytest.raises(RuntimeError, match=rf"\b{needle}\b"):
        OPS.fused_backward(named["dy"], x, weight, router, lora_a, lora_b, named["h"], named["g"], 2.0, 0.0, 0,
                           [True] * 4)
