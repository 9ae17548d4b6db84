"""The C++/CUDA backend (``backend="cuda"``, ops ``ilora_kernels::fused_forward`` / ``fused_backward`` on CUDA tensors)
against the independent float64 implementation of tests/fused_op_checks.py (SPEC section 1), plus dropout masks
identical to the CPU backend's and a Crab+-sized bf16 shape. Skipped without a CUDA device or a CUDA build."""

from __future__ import annotations

import pytest
import torch

import ilora_kernels as ik
from conftest import HAS_CUDA, requires_cuda
from fused_op_checks import (
    CASES,
    LOW,
    case_id,
    check_every_output_mask,
    check_non_contiguous_inputs,
    check_opcheck,
    check_outputs_fully_written,
    check_packed_layout,
    check_zero_tokens,
    float64_grads,
    make_inputs,
    rel_err,
    tolerance,
)
from ilora_kernels import _dropout, functional

pytestmark = requires_cuda

if HAS_CUDA:
    _reason = functional.available_backends()["cuda"]  # also attaches the fakes and autograd of the fused ops
    if _reason is not None:
        pytest.skip(f"the CUDA backend is unavailable: {_reason}", allow_module_level=True)

OPS = torch.ops.ilora_kernels
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def cuda_inputs(*args, **kwargs):
    return [None if v is None else v.cuda() for v in make_inputs(*args, **kwargs, seed=0, with_dy=True)]


def run_layer(backend, inputs, scaling, p, seed, top_k, monkeypatch):
    x, weight, b, router, lora_a, lora_b, dy = inputs
    leaves = [None if v is None else v.detach().clone().requires_grad_()
              for v in (x, weight, b, router, lora_a, lora_b)]
    monkeypatch.setattr(functional, "_draw_seed", lambda: seed)
    y, g = ik.ilora_linear(*leaves, scaling, dropout_p=p, training=p > 0, top_k=top_k, backend=backend,
                           return_router_weights=True)
    y.backward(dy)
    return y.detach(), g.detach(), [None if v is None else v.grad for v in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("case", CASES if HAS_CUDA else [], ids=case_id)
def test_layer_matches_float64(case, dtype, monkeypatch):
    n, d_in, d_out, heads, rank, top_k, p, routing = case
    if dtype in LOW and routing in ("near_tied", "uniform") and top_k:
        pytest.skip("top-k over (near-)tied logits is decided by rounding in half precision")
    inputs = cuda_inputs(n, d_in, d_out, heads, rank, routing, dtype, seed=n * 31 + d_in)
    seed, scaling = 1234567 + n, 2.0
    y, g, grads = run_layer("cuda", inputs, scaling, p, seed, top_k, monkeypatch)
    keep = (g > 0) if (dtype in LOW and top_k) else None
    want_y, _, want_g, want_grads = float64_grads(*inputs[:6], scaling, p, seed, top_k or 0, inputs[6], keep=keep)
    assert y.dtype == dtype and y.is_cuda
    assert g.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if dtype in LOW:
        ry, rg, rgrads = run_layer("reference", inputs, scaling, p, seed, top_k, monkeypatch)
        torch_errs = [rel_err(ry, want_y), rel_err(rg, want_g)] + [None if w is None else rel_err(a, w)
                                                                    for a, w in zip(rgrads, want_grads)]
    else:
        torch_errs = [0.0] * 8
    names = ["y", "g", "dx", "dweight", "dbias", "drouter", "dlora_a", "dlora_b"]
    for name, actual, want, terr in zip(names, [y, g] + grads, [want_y, want_g] + want_grads, torch_errs):
        if want is None:
            continue
        if name == "drouter" and routing == "one_head" and dtype != torch.float64:
            err = (actual.double() - want).abs().max().item() / want_grads[0].abs().max().item()
        else:
            err = rel_err(actual, want)
        assert err <= tolerance(dtype, terr), f"{name}: error {err:.3e} (torch's own {terr:.3e})"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("top_k", [0, 2])
def test_raw_ops_all_masks(dtype, p, top_k):
    check_every_output_mask(OPS, dtype, p, top_k, device="cuda")


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_non_contiguous_inputs(p):
    check_non_contiguous_inputs(OPS, p, device="cuda")


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).split(".")[1])
def test_packed_layout(p, dtype):
    check_packed_layout(OPS.fused_forward, OPS.fused_backward, dtype, p, n=33, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[1])
def test_dropout_mask_identical_to_cpu_backend(dtype):
    """With A = I (r = d_in), h = dropout(x): the CUDA mask must equal keep_mask and the CPU backend's mask."""
    n, d_in, d_out, heads = 301, 96, 3, 2
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(n, d_in, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    weight = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64).to(dtype)
    router = torch.randn(heads, d_in, generator=gen, dtype=torch.float64).to(dtype)
    lora_a = torch.eye(d_in, dtype=dtype)
    lora_b = torch.randn(heads, d_out, d_in, generator=gen, dtype=torch.float64).to(dtype)
    for p, seed in ((0.1, 0), (0.3, 42), (0.5, 2**31 - 5), (0.9, 123456789)):
        _, h_cpu, g_cpu = OPS.fused_forward(x, weight, None, router, lora_a, lora_b, 1.0, p, seed, 0)
        _, h_gpu, g_gpu = OPS.fused_forward(*(t.cuda() for t in (x, weight)), None,
                                            *(t.cuda() for t in (router, lora_a, lora_b)), 1.0, p, seed, 0)
        mask = _dropout.keep_mask(seed, n, d_in, p)
        assert torch.equal(h_gpu.cpu() != 0, mask), (p, seed)
        assert torch.equal(h_gpu.cpu() != 0, h_cpu != 0), (p, seed)
        if dtype == torch.float64:
            torch.testing.assert_close(h_gpu.cpu(), h_cpu, rtol=1e-15, atol=0)
        # the backward regenerates the same mask on both devices
        dy = torch.randn(n, d_out, dtype=torch.float64).to(dtype)
        outs_cpu = OPS.fused_backward(dy, x, weight, router, lora_a, lora_b, h_cpu, g_cpu, 1.0, p, seed, [True] * 4)
        outs_gpu = OPS.fused_backward(*(t.cuda() for t in (dy, x, weight, router, lora_a, lora_b, h_gpu, g_gpu)),
                                      1.0, p, seed, [True] * 4)
        for a, c in zip(outs_gpu, outs_cpu):
            tol = 1e-10 if dtype == torch.float64 else (1e-4 if dtype == torch.float32 else 3e-2)
            assert rel_err(a.cpu(), c.double()) < tol


def test_large_bf16_shape():
    """Crab+-sized layer (N = 4096, 3584 -> 3584, r = 128, K = 3) in bf16, error vs float64 bounded by torch's own."""
    n, d_in, d_out, heads, rank, p, seed, scaling = 4096, 3584, 3584, 3, 128, 0.1, 31337, 2.0
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float64) * scale

    f64 = [rnd(n, d_in), rnd(d_out, d_in, scale=d_in ** -0.5), rnd(d_out), rnd(heads, d_in, scale=2 * d_in ** -0.5),
           rnd(rank, d_in, scale=d_in ** -0.5), rnd(heads, d_out, rank, scale=rank ** -0.5)]
    dy64 = rnd(n, d_out)
    bf = [t.to(torch.bfloat16) for t in f64]
    dy = dy64.to(torch.bfloat16)
    want_y, _, want_g, want_grads = float64_grads(*bf, scaling, p, seed, 0, dy)
    results = {}
    for backend in ("cuda", "reference"):
        leaves = [t.detach().clone().requires_grad_(i in (0, 3, 4, 5)) for i, t in enumerate(bf)]
        original = functional._draw_seed
        functional._draw_seed = lambda: seed
        try:
            y, g = ik.ilora_linear(*leaves, scaling, dropout_p=p, training=True, backend=backend,
                                   return_router_weights=True)
        finally:
            functional._draw_seed = original
        y.backward(dy)
        results[backend] = [y.detach(), g.detach(), leaves[0].grad, leaves[3].grad, leaves[4].grad, leaves[5].grad]
    wants = [want_y, want_g, want_grads[0], want_grads[3], want_grads[4], want_grads[5]]
    for name, a, r, w in zip(["y", "g", "dx", "drouter", "dlora_a", "dlora_b"], results["cuda"], results["reference"],
                             wants):
        err, terr = rel_err(a, w), rel_err(r, w)
        assert err <= 4 * terr + 2 * 2.0**-8, f"{name}: error {err:.3e} (torch's own bf16 error {terr:.3e})"


def test_outputs_fully_written():
    check_outputs_fully_written(OPS, 1025, device="cuda")


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_zero_tokens(p):
    check_zero_tokens(OPS, p, device="cuda")


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[1])
def test_opcheck(p, dtype):
    check_opcheck(OPS, dtype, p, device="cuda")


@pytest.mark.parametrize("which, needle", [(1, "weight"), (2, "bias"), (3, "router_weight"), (4, "lora_a"),
                                           (5, "lora_b")])
def test_cpu_tensor_names_tensor(which, needle):
    args = cuda_inputs(4, 6, 5, 3, 2, "random", torch.float32)[:6]
    args[which] = args[which].cpu()
    with pytest.raises(RuntimeError, match=needle):
        OPS.fused_forward(*args, 2.0, 0.0, 0, 0)


def test_bad_backward_inputs_name_tensor():
    x, weight, b, router, lora_a, lora_b, dy = cuda_inputs(4, 6, 5, 3, 2, "random", torch.float32)
    _, h, g = OPS.fused_forward(x, weight, b, router, lora_a, lora_b, 2.0, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match=r"\bdy\b"):
        OPS.fused_backward(dy.cpu(), x, weight, router, lora_a, lora_b, h, g, 2.0, 0.0, 0, [True] * 4)
    with pytest.raises(RuntimeError, match=r"\bg\b"):
        OPS.fused_backward(dy, x, weight, router, lora_a, lora_b, h, g.half(), 2.0, 0.0, 0, [True] * 4)
    with pytest.raises(RuntimeError, match=r"\bh\b"):
        OPS.fused_backward(dy, x, weight, router, lora_a, lora_b, h[:2], g, 2.0, 0.0, 0, [True] * 4)


def test_too_many_heads_names_router_weight():
    x, weight, b, router, lora_a, lora_b, dy = cuda_inputs(4, 6, 5, 300, 2, "random", torch.float32)
    with pytest.raises(RuntimeError, match="router_weight"):
        OPS.fused_forward(x, weight, b, router, lora_a, lora_b, 2.0, 0.0, 0, 0)
