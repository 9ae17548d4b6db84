"""The op contract every backend meets, and ``attach``, which gives a backend's ops their fakes and autograd.

A backend is a pair of ``torch.library`` custom ops on flattened 2-D activations:

    <b>_forward(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, seed, top_k)
        -> (y (N, d_out), h (N, r), g (N, K) in router_dtype(x.dtype): float32, float64 for float64 inputs)
    <b>_backward(dy, x, weight, router_weight, lora_a, lora_b, h, g, scaling, dropout_p, seed, output_mask)
        -> (dx, d_router_weight, d_lora_a, d_lora_b)      (empty tensors where output_mask is False)

d_lora_b has lora_b's layout when lora_b is packed (``ops/layout.py``: autograd then accumulates it without a
copy) and is contiguous otherwise; the other outputs are contiguous.

``top_k = 0`` means dense routing; ``seed`` picks the dropout mask (``ilora_kernels._dropout``). ``define`` turns two
Python functions with these arguments into the pair (``FORWARD_SCHEMA`` / ``BACKWARD_SCHEMA``; compiled backends
declare the same schemas in ``csrc/op_schemas.h``); ``attach`` registers the shared fake (meta) implementations and
the shared autograd (``setup_context`` + ``backward_body``) on a pair, so ``torch.compile`` and
``torch.library.opcheck`` see ordinary ops, and returns the ``OpPair`` that the backend registers
(``ops.registry.register``). Saved for backward: x, h, g and the seed, never the dropout mask. The autograd is
first order: a backward that records a graph (create_graph=True, ``torch.func``) returns gradients whose own
derivative raises ``DOUBLE_BACKWARD_MESSAGE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .layout import empty_heads_grad

__all__ = ["BACKWARD_SCHEMA", "DOUBLE_BACKWARD_MESSAGE", "FORWARD_SCHEMA", "OpPair", "attach", "backward_body",
           "define", "fake_backward", "fake_forward", "router_dtype", "setup_context"]

FORWARD_SCHEMA = ("(Tensor x, Tensor weight, Tensor? bias, Tensor router_weight, Tensor lora_a, Tensor lora_b, "
                  "float scaling, float dropout_p, int seed, int top_k) -> (Tensor, Tensor, Tensor)")
BACKWARD_SCHEMA = ("(Tensor dy, Tensor x, Tensor weight, Tensor router_weight, Tensor lora_a, Tensor lora_b, Tensor h, "
                   "Tensor g, float scaling, float dropout_p, int seed, bool[] output_mask) "
                   "-> (Tensor, Tensor, Tensor, Tensor)")


def router_dtype(activation_dtype: torch.dtype) -> torch.dtype:
    """The router's softmax (and g) is float32, or float64 when the activations are float64."""
    return torch.float64 if activation_dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class OpPair:
    """A backend's ops: ``forward`` / ``backward`` are the op packets (with the registered autograd);
    ``forward_kernel`` / ``backward_kernel`` their default overloads, which the eager path calls below autograd."""

    forward: Callable
    backward: Callable
    forward_kernel: Callable
    backward_kernel: Callable


def fake_forward(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, seed, top_k):
    n_tokens = x.shape[0]
    return (x.new_empty(n_tokens, weight.shape[0]), x.new_empty(n_tokens, lora_a.shape[0]),
            x.new_empty(n_tokens, router_weight.shape[0], dtype=router_dtype(x.dtype)))


def fake_backward(dy, x, weight, router_weight, lora_a, lora_b, h, g, scaling, dropout_p, seed, output_mask):
    def grad_like(t, needed):
        return t.new_empty(t.shape) if needed else t.new_empty(0)

    return (grad_like(x, output_mask[0]), grad_like(router_weight, output_mask[1]), grad_like(lora_a, output_mask[2]),
            empty_heads_grad(lora_b) if output_mask[3] else lora_b.new_empty(0))


def setup_context(ctx, inputs, output):
    x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, seed, top_k = inputs
    _, h, g = output
    ctx.save_for_backward(x, weight, router_weight, lora_a, lora_b, h, g)
    ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
    ctx.mark_non_differentiable(h)
    # unused outputs (g, usually) then reach backward as None instead of zero tensors that would cost GEMMs
    ctx.set_materialize_grads(False)


DOUBLE_BACKWARD_MESSAGE = (
    "ilora_linear does not support double backward (differentiating its gradients: torch.autograd.grad(..., "
    "create_graph=True) followed by a second grad, nested torch.func.grad, torch.func.hessian): its backward is a "
    "fused kernel with no derivative of its own, and no backend provides one. For higher-order derivatives call "
    "ilora_kernels.ops.reference.forward(x2d, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, seed, "
    "top_k) instead: the same math in plain, twice-differentiable PyTorch ops (x2d (N, d_in); returns y, h, g; "
    "top_k = 0 is dense)")


def _gradients(dy, dg, x, weight, router_weight, lora_a, lora_b, h, g, needs, scaling, dropout_p, seed,
               call_backward):
    """The body of ``backward_body``: the 10 gradients of the forward op's inputs; ``needs`` is the forward
    ctx's ``needs_input_grad``."""
    output_mask = [needs[0], needs[3], needs[4], needs[5]]
    dx = d_router = d_lora_a = d_lora_b = d_weight = d_bias = None
    if dy is not None and any(output_mask):
        dx, d_router, d_lora_a, d_lora_b = call_backward(dy, x, weight, router_weight, lora_a, lora_b, h, g, scaling,
                                                         dropout_p, seed, output_mask)
        dx, d_router, d_lora_a, d_lora_b = (t if m else None for t, m in
                                            zip((dx, d_router, d_lora_a, d_lora_b), output_mask, strict=True))
    if dg is not None and (needs[0] or needs[3]):
        # the caller used the returned router weights g in its loss: add their softmax backward
        dz = (g * (dg - (g * dg).sum(dim=1, keepdim=True))).to(x.dtype)
        if needs[3]:
            d_router = dz.t() @ x if d_router is None else d_router + dz.t() @ x
        if needs[0]:
            dx = dz @ router_weight if dx is None else dx + dz @ router_weight
    if dy is not None:
        d_weight = dy.t() @ x if needs[1] else None
        d_bias = dy.sum(dim=0) if needs[2] else None
    return dx, d_weight, d_bias, d_router, d_lora_a, d_lora_b, None, None, None, None


class _FirstOrderOnly(torch.autograd.Function):
    """``_gradients`` as a function whose own derivative raises ``DOUBLE_BACKWARD_MESSAGE``: the gradients a
    backward returns when that backward records a graph (create_graph=True, or a ``torch.func`` transform, which
    always does), so that differentiating them again raises instead of giving wrong or missing second derivatives.
    Its forward runs below every autograd level (torch.func's included), so the kernels never see grad-tracking
    tensors."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return _gradients(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


def backward_body(ctx, dy, dg, saved, call_backward):
    """Gradients (dx, d_weight, d_bias, d_router, d_lora_a, d_lora_b, None x 4) shared by every autograd path;
    ``call_backward(dy, x, weight, router_weight, lora_a, lora_b, h, g, scaling, dropout_p, seed, output_mask)``
    runs the backend's backward op. A plain backward (grad mode off) computes them directly; one that records a
    graph gets them from ``_FirstOrderOnly``, which refuses a second differentiation."""
    args = (dy, dg, *saved, ctx.needs_input_grad, ctx.scaling, ctx.dropout_p, getattr(ctx, "seed", 0), call_backward)
    if torch.is_grad_enabled():
        return _FirstOrderOnly.apply(*args)
    return _gradients(*args)


def attach(forward_name: str, backward_name: str) -> OpPair:
    """Registers the shared fakes and autograd on ``forward_name`` / ``backward_name`` (``"ilora_kernels::<op>"``,
    already defined) and returns their ``OpPair``."""
    torch.library.register_fake(forward_name)(fake_forward)
    torch.library.register_fake(backward_name)(fake_backward)
    namespace, forward_op_name = forward_name.split("::")
    forward_op = getattr(getattr(torch.ops, namespace), forward_op_name)
    backward_op = getattr(getattr(torch.ops, namespace), backward_name.split("::")[1])

    def backward(ctx, dy, _dh, dg):
        return backward_body(ctx, dy, dg, ctx.saved_tensors, backward_op)

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)
    return OpPair(forward_op, backward_op, forward_op.default, backward_op.default)


def define(name: str, forward: Callable, backward: Callable) -> OpPair:
    """Defines ``ilora_kernels::<name>_forward`` and ``ilora_kernels::<name>_backward`` from two Python functions
    that take the contract's arguments (``backward`` may return None for a gradient ``output_mask`` leaves out: it
    becomes the contract's empty tensor), attaches them (``attach``) and returns their ``OpPair``."""
    def backward_op(dy, x, *rest):
        return tuple(x.new_empty(0) if t is None else t for t in backward(dy, x, *rest))

    forward_name, backward_name = f"ilora_kernels::{name}_forward", f"ilora_kernels::{name}_backward"
    torch.library.custom_op(forward_name, forward, mutates_args=(), schema=FORWARD_SCHEMA)
    torch.library.custom_op(backward_name, backward_op, mutates_args=(), schema=BACKWARD_SCHEMA)
    return attach(forward_name, backward_name)
