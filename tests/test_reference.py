"""The reference backend against the independent float64 implementation of SPEC section 1."""

import pytest
import torch

import ilora_kernels as ik
from ilora_float64 import ilora_float64, make_inputs
from ilora_kernels._dropout import keep_mask

SHAPES = [  # (N, d_in, d_out, r, K, lead)
    (7, 5, 3, 1, 1, ()),
    (13, 17, 19, 8, 3, ()),
    (6, 33, 12, 128, 5, (2,)),
    (5, 9, 21, 8, 3, (2, 3)),
    (1, 4, 6, 8, 5, ()),
]


def _grads(y, dy, tensors):
    return torch.autograd.grad(y, tensors, dy, allow_unused=True)


CASES = [(shape, top_k) for shape in SHAPES for top_k in (None, 1, 2) if top_k is None or top_k <= shape[4]]


@pytest.mark.parametrize("shape,top_k", CASES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_reference_matches_float64(shape, top_k, dropout_p):
    n, d_in, d_out, r, k, lead = shape
    inputs = [t.requires_grad_() if t is not None else None
              for t in make_inputs(n, d_in, d_out, k, r, dtype=torch.float64, lead=lead)]
    x, w, b, wr, a, bb = inputs
    torch.manual_seed(7)
    seed = ik.functional._draw_seed() if dropout_p else 0
    torch.manual_seed(7)
    y, g = ik.ilora_linear(x, w, b, wr, a, bb, 1.7, dropout_p=dropout_p, training=True, top_k=top_k,
                           backend="reference", return_router_weights=True)
    y_ref, g_ref = ilora_float64(x, w, b, wr, a, bb, 1.7, dropout_p, seed, top_k)
    assert y.shape == (*lead, n, d_out) and g.shape == (*lead, n, k)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    dy = torch.randn_like(y)
    params = [x, w, b, wr, a, bb]
    for got, want, name in zip(_grads(y, dy, params), _grads(y_ref, dy, params), "x w b wr a b".split()):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=f"gradient of {name}")


def test_gradcheck_float64():
    x, w, b, wr, a, bb = (t.requires_grad_() for t in make_inputs(5, 6, 7, 3, 4, dtype=torch.float64, lead=(2,)))
    for top_k in (None, 2):
        assert torch.autograd.gradcheck(
            lambda *t, top_k=top_k: ik.ilora_linear(*t, 2.0, top_k=top_k, backend="reference",
                                                    return_router_weights=True),
            (x, w, b, wr, a, bb))
    op = torch.ops.ilora_kernels.reference_forward
    assert torch.autograd.gradcheck(lambda *t: op(*t, 2.0, 0.25, 99, 0)[0], (x.reshape(-1, 6), w, b, wr, a, bb))


def test_router_weights_gradient_flows():
    """A loss on the returned router weights reaches router_weight and x (float64 gradcheck)."""
    x, w, b, wr, a, bb = (t.requires_grad_() for t in make_inputs(4, 5, 3, 3, 2, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda *t: ik.ilora_linear(*t, 2.0, backend="reference", return_router_weights=True)[1] ** 2,
        (x, w, b, wr, a, bb))


@pytest.mark.parametrize("routing", ["one_head", "uniform", "skewed", "near_tied"])
def test_routing_distributions(routing):
    x, w, b, wr, a, bb = make_inputs(16, 8, 6, 3, 4, routing, dtype=torch.float64)
    y, g = ik.ilora_linear(x, w, b, wr, a, bb, 2.0, backend="reference", return_router_weights=True)
    y_ref, g_ref = ilora_float64(x, w, b, wr, a, bb, 2.0)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g, g_ref)
    if routing == "uniform":
        torch.testing.assert_close(g, torch.full_like(g, 1 / 3))
    if routing == "one_head":
        assert (g[:, 0] > 0.99).all()


def test_softmax_in_float32_and_cast_before_multiplying():
    """bf16 activations: g is float32, and the update uses g rounded to bf16 (Crab+ semantics)."""
    x, w, b, wr, a, bb = make_inputs(9, 16, 8, 3, 4, dtype=torch.bfloat16)
    y, g = ik.ilora_linear(x, w, b, wr, a, bb, 2.0, backend="reference", return_router_weights=True)
    assert g.dtype == torch.float32 and y.dtype == torch.bfloat16
    logits = (x @ wr.t()).float()
    torch.testing.assert_close(g, torch.softmax(logits, -1))
    h = x @ a.t()
    expected = torch.nn.functional.linear(x, w, b)
    for k in range(3):
        expected = expected + 2.0 * g[:, k:k + 1].to(torch.bfloat16) * (h @ bb[k].t())
    y64, _ = ilora_float64(x, w, b, wr, a, bb, 2.0)
    # within bf16 rounding of a float64 evaluation, and of the looped bf16 evaluation
    assert (y.double() - y64).abs().max() <= 4 * (expected.double() - y64).abs().max() + 1e-2


def test_dropout_mask_shared_by_heads_and_router_sees_clean_x():
    x, w, b, wr, a, bb = make_inputs(11, 10, 7, 3, 3, dtype=torch.float64)
    torch.manual_seed(5)
    y, g = ik.ilora_linear(x, w, b, wr, a, bb, 2.0, dropout_p=0.5, training=True, backend="reference",
                           return_router_weights=True)
    _, g_clean = ik.ilora_linear(x, w, b, wr, a, bb, 2.0, backend="reference", return_router_weights=True)
    torch.testing.assert_close(g, g_clean)  # router on the clean x
    torch.manual_seed(5)
    seed = ik.functional._draw_seed()
    y_ref, _ = ilora_float64(x, w, b, wr, a, bb, 2.0, 0.5, seed)
    torch.testing.assert_close(y, y_ref)
    mask = keep_mask(seed, 11, 10, 0.5)
    assert 0.3 < mask.float().mean() < 0.7
    # eval mode: no dropout at all
    y_eval = ik.ilora_linear(x, w, b, wr, a, bb, 2.0, dropout_p=0.5, training=False, backend="reference")
    torch.testing.assert_close(y_eval, ilora_float64(x, w, b, wr, a, bb, 2.0)[0])


def test_dropout_mask_statistics_and_determinism():
    m1 = keep_mask(42, 256, 300, 0.1)
    m2 = keep_mask(42, 256, 300, 0.1)
    m3 = keep_mask(43, 256, 300, 0.1)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert abs(m1.float().mean().item() - 0.9) < 0.01
    assert keep_mask(1, 3, 4, 0.0).all()


def test_saved_tensors_are_x_h_g_only():
    """Saved for backward: x, h (N, r), g (N, K) and the parameters; nothing of size N x d_out."""
    n, d_in, d_out, r, k = 64, 32, 48, 4, 3
    x, w, b, wr, a, bb = make_inputs(n, d_in, d_out, k, r)
    params = {id(t) for t in (w, wr, a, bb)}
    for t in (x, wr, a, bb):
        t.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ik.ilora_linear(x, w, b, wr, a, bb, 2.0, backend="reference")
    x_storage = x.untyped_storage().data_ptr()  # x itself is saved as a 2-D view of the same storage
    activation_shapes = sorted(tuple(t.shape) for t in saved
                               if id(t) not in params and t.untyped_storage().data_ptr() != x_storage)
    assert activation_shapes == sorted([(n, r), (n, k)])
    assert not any(t.numel() >= n * d_out for t in saved)


def test_empty_batch():
    x, w, b, wr, a, bb = make_inputs(0, 5, 3, 3, 2, lead=(2,))
    for t in (wr, a, bb):
        t.requires_grad_()
    y, g = ik.ilora_linear(x, w, b, wr, a, bb, 2.0, backend="reference", return_router_weights=True)
    assert y.shape == (2, 0, 3) and g.shape == (2, 0, 3)
    y.sum().backward()
    assert torch.equal(bb.grad, torch.zeros_like(bb))


def test_opcheck_reference_ops():
    x, w, b, wr, a, bb = (t.requires_grad_() for t in make_inputs(6, 5, 4, 3, 3))
    args = (x, w, b, wr, a, bb, 2.0, 0.2, 17, 0)
    torch.library.opcheck(torch.ops.ilora_kernels.reference_forward, args)
    torch.library.opcheck(torch.ops.ilora_kernels.reference_forward, (x, w, None, wr, a, bb, 2.0, 0.0, 0, 2))
    y, h, g = torch.ops.ilora_kernels.reference_forward(*args)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.ilora_kernels.reference_backward,
                          (dy, x.detach(), w.detach(), wr.detach(), a.detach(), bb.detach(), h.detach(), g.detach(),
                           2.0, 0.2, 17, [True, False, True, True]))
