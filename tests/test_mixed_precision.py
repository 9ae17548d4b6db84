"""Mixed precision the PEFT way: float32 adapter weights (master weights) on a float16 / bfloat16 base.

``ilora_linear`` takes router_weight, lora_a and lora_b in float32 with a half-precision x and weight and gives what
``torch.autocast`` gives (the adapter computed in the base's dtype, gradients float32); ``ILoRALinear`` and
``apply_ilora`` create float32 adapters on half bases (``autocast_adapter_dtype=True``, PEFT's default)."""

import pytest
import torch

import ilora_kernels as ik
from ilora_float64 import ilora_float64, make_inputs
from ilora_kernels import functional
from ilora_kernels.ops import registry
from tiny_models import pattern_batch, tiny_llama

AVAILABLE = functional.available_backends()
HALF = [torch.float16, torch.bfloat16]


def _cases():
    for backend in ("reference", "cpu", "triton"):
        for dtype in HALF:
            marks = []
            if AVAILABLE[backend] is not None:
                marks = [pytest.mark.skip(reason=f"{backend}: {AVAILABLE[backend]}")]
            else:
                try:
                    registry.resolve(backend, "cpu", dtype)
                except (TypeError, ValueError) as exc:
                    marks = [pytest.mark.skip(reason=str(exc))]
            yield pytest.param(backend, dtype, marks=marks, id=f"{backend}-{str(dtype).split('.')[-1]}")


def _leaves(tensors, dtype):
    """x, weight, bias in ``dtype``; the adapter float32; all leaves that require grad."""
    x, weight, bias, router, lora_a, lora_b = tensors
    base = [t.to(dtype).requires_grad_() for t in (x, weight, bias)]
    adapter = [t.float().requires_grad_() for t in (router, lora_a, lora_b)]
    return base + adapter


def _run(leaves, backend, autocast_dtype=None, **kw):
    x, weight, bias, router, lora_a, lora_b = leaves
    if autocast_dtype is None:
        y, g = ik.ilora_linear(x, weight, bias, router, lora_a, lora_b, 2.0, backend=backend,
                               return_router_weights=True, **kw)
    else:
        with torch.autocast("cpu", dtype=autocast_dtype):
            y, g = ik.ilora_linear(x, weight, bias, router, lora_a, lora_b, 2.0, backend=backend,
                                   return_router_weights=True, **kw)
    dy = torch.linspace(-1, 1, y.numel(), dtype=torch.float32).view(y.shape)
    ((y.float() * dy).sum() + (g * g).sum()).backward()
    return y, g, [t.grad for t in leaves]


@pytest.mark.parametrize("backend,dtype", list(_cases()))
@pytest.mark.parametrize("routing,top_k", [("random", None), ("skewed", 2), ("one_head", None)])
def test_float32_adapter_on_a_half_base_equals_autocast(backend, dtype, routing, top_k):
    tensors = make_inputs(29, 24, 19, 3, 8, routing=routing, dtype=torch.float64, seed=3)
    mixed = _run(_leaves(tensors, dtype), backend, top_k=top_k)
    autocast = _run(_leaves(tensors, dtype), backend, autocast_dtype=dtype, top_k=top_k)
    y, g, grads = mixed
    assert y.dtype == dtype
    for name, got, want in zip(("dx", "dW", "db", "dW_r", "dA", "dB"), grads, autocast[2], strict=True):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    assert [t.dtype for t in grads[3:]] == [torch.float32] * 3  # master weights get float32 gradients
    torch.testing.assert_close(y, autocast[0], rtol=0, atol=0)
    torch.testing.assert_close(g, autocast[1], rtol=0, atol=0)


@pytest.mark.parametrize("backend,dtype", list(_cases()))
def test_float32_adapter_on_a_half_base_is_close_to_float64(backend, dtype):
    tensors = make_inputs(33, 40, 27, 3, 8, dtype=torch.float64, seed=5)
    x, weight, bias, router, lora_a, lora_b = _leaves(tensors, dtype)
    y = ik.ilora_linear(x, weight, bias, router, lora_a, lora_b, 2.0, backend=backend)
    want, _ = ilora_float64(*(t.detach().double() for t in (x, weight, bias, router, lora_a, lora_b)), 2.0)
    # PyTorch's own error in this dtype on the same math, as the yardstick
    ref, _ = ilora_float64(*(t.detach().to(dtype) for t in (x, weight, bias, router, lora_a, lora_b)), 2.0,
                           dtype=dtype)
    own_error = (ref.double() - want).abs().max().item()
    assert (y.double() - want).abs().max().item() <= 4 * own_error + 1e-6


def test_other_dtype_mixes_are_refused_naming_both_routes():
    x, weight, bias, router, lora_a, lora_b = make_inputs(4, 8, 6, 3, 2, dtype=torch.float32, seed=0)
    with pytest.raises(TypeError, match=r"weight has dtype torch.bfloat16 but x has dtype torch.float32.*float32 "
                                        r"when x and weight are float16 or bfloat16.*torch.autocast"):
        ik.ilora_linear(x, weight.bfloat16(), bias, router, lora_a, lora_b, 1.0)
    with pytest.raises(TypeError, match=r"lora_a has dtype torch.float64"):  # only float32 masters qualify
        ik.ilora_linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16(), router.float(), lora_a.double(),
                        lora_b.float(), 1.0)


@pytest.mark.parametrize("dtype", HALF)
def test_ilora_linear_module_keeps_float32_master_weights_on_a_half_base(dtype):
    base = torch.nn.Linear(12, 10).to(dtype)
    layer = ik.ILoRALinear(base, r=4, num_heads=3, alpha=8, dropout=0.0)
    assert {p.dtype for p in (layer.router_weight, layer.lora_a, layer.lora_b)} == {torch.float32}
    assert "adapter_dtype=float32" in repr(layer)
    same = ik.ILoRALinear(torch.nn.Linear(12, 10).to(dtype), r=4, num_heads=3, alpha=8, dropout=0.0,
                          autocast_adapter_dtype=False)
    assert same.lora_a.dtype == dtype
    plain = ik.ILoRALinear(torch.nn.Linear(12, 10), r=4, num_heads=3, alpha=8, dropout=0.0)
    assert plain.lora_a.dtype == torch.float32
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(5, 12, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().sum().backward()
    assert layer.lora_b.grad.dtype == torch.float32 and layer.lora_b.grad.abs().sum() > 0


def test_a_bf16_model_trains_float32_adapters_and_saves_them(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama().to(torch.bfloat16)
    config = ik.ILoRAConfig(r=4, num_heads=3, alpha=8, dropout=0.0, target_modules=("q_proj", "down_proj"))
    ik.apply_ilora(model, config)
    layers = ik.ilora_layers(model)
    assert {layer.lora_a.dtype for layer in layers.values()} == {torch.float32}
    ids = pattern_batch(model.config.vocab_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert {p.dtype for layer in layers.values() for p in layer.parameters() if p.requires_grad} == {torch.float32}
    ik.save_ilora(model, tmp_path)
    again = ik.load_ilora(tiny_llama().to(torch.bfloat16), tmp_path)
    for name, layer in ik.ilora_layers(again).items():
        assert layer.lora_b.dtype == torch.float32
        assert torch.equal(layer.lora_b, layers[name].lora_b)


def test_float32_masters_must_be_all_three():
    x, weight, bias, router, lora_a, lora_b = make_inputs(4, 8, 6, 3, 2, dtype=torch.bfloat16, seed=0)
    with pytest.raises(TypeError, match=r"router_weight is float32 but lora_a and lora_b have dtype torch.bfloat16: "
                                        r"float32 master weights .* must be all three"):
        ik.ilora_linear(x, weight, bias, router.float(), lora_a, lora_b, 1.0)
    with pytest.raises(TypeError, match=r"lora_a and lora_b are float32 but router_weight has dtype"):
        ik.ilora_linear(x, weight, bias, router, lora_a.float(), lora_b.float(), 1.0)
