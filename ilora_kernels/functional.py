"""``ilora_linear``: the functional I-LoRA layer and its three call paths.

The backends live in ``ilora_kernels.ops`` (the table in ``ops/registry.py``, the op contract in
``ops/contract.py``); this module only chooses a backend for a call and runs its ops, by one of three paths (same
kernels, same numbers):

* eager (the default): ``_EagerILoRA``, a hand-written ``torch.autograd.Function``, calls the backend's ops below the
  autograd key, which skips the generic custom-op autograd wrapper (about half the per-call CPU overhead at decode
  sizes); the dropout seed is drawn with ``_draw_seed()`` (one CPU ``torch.randint``, reproducible from
  ``torch.manual_seed``). ``torch.func`` transforms (grad, vmap, ...) take its twin ``_TransformedILoRA``; tensor
  subclasses take the ops' registered autograd instead;
* traced by ``torch.compile`` / ``torch.export`` without dropout: the backend's forward op itself, with its
  registered autograd, so Dynamo and AOTAutograd see one opaque op per layer and no graph break;
* traced with dropout: ``ilora_kernels::seeded_forward`` (``ops/seeded.py``), whose seed is a CPU int64 tensor drawn
  by a graph op.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from . import settings
from ._validation import float32_masters, validate_ilora_inputs
from .ops import seeded  # noqa: F401  (defines ilora_kernels::seeded_forward / seeded_backward)
from .ops.contract import backward_body, router_dtype
from .ops.contract import setup_context as op_setup_context
from .ops.layout import shrink_concat, shrink_packed
from .ops.registry import BACKENDS, available_backends, registered, resolve, resolve_backend, resolve_cached

__all__ = ["BACKENDS", "available_backends", "ilora_linear", "resolve_backend"]

# Under torch.compile the backend choice is made once, at trace time, by running resolve eagerly (it may import
# the compiled extension or triton, which Dynamo cannot trace); the result is a constant of the graph, and the
# backend's ops are then in ``registered``.
_resolve_at_trace_time = torch.compiler.assume_constant_result(resolve)


_SEED_HIGH = 2**31 - 1


def _draw_seed() -> int:
    """The dropout seed of one eager call: one draw from torch's default CPU generator (so ``torch.manual_seed``
    makes dropout reproducible). Tests monkeypatch this to pin the seed."""
    return int(torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64).item())


def _draw_seed_tensor() -> Tensor:
    """The same draw as ``_draw_seed`` but kept as a CPU int64 tensor: a graph op under ``torch.compile`` (no
    ``.item()``, so no graph break); the value is read inside ``ilora_kernels::seeded_forward``'s kernel."""
    return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------------
# the eager fast path


def _forward_below_autograd(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, seed, top_k, ops):
    with torch._C._AutoDispatchBelowAutograd():
        return ops.forward_kernel(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, seed, top_k)


def _setup_context(ctx, inputs, output):
    op_setup_context(ctx, inputs[:-1], output)
    ctx.backward_op = inputs[-1].backward_kernel


class _EagerILoRA(torch.autograd.Function):
    """Eager autograd for one backend: calls the forward/backward ops below the autograd key (no generic
    custom-op wrapper, no pytree work). Numerically identical to the registered autograd of the ops.
    Inputs: the forward op's, then the backend's ``OpPair``."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_below_autograd(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dy, _dh, dg):
        backward_op = ctx.backward_op

        def call(*args):
            with torch._C._AutoDispatchBelowAutograd():
                return backward_op(*args)

        return (*backward_body(ctx, dy, dg, ctx.saved_tensors, call), None)


class _TransformedILoRA(_EagerILoRA):
    """``_EagerILoRA`` for ``torch.func`` transforms (grad, vmap, ...), which need the ``setup_context`` form (the
    ops' registered autograd has none). That form binds the arguments with ``inspect.signature`` on every call
    (tens of microseconds), so plain eager calls keep ``_EagerILoRA``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        return _forward_below_autograd(*inputs)

    setup_context = staticmethod(_setup_context)


_validated: Dict[tuple, int] = {}
_VALIDATED_MAX = 4096


def _tensor_key(t) -> tuple:
    return (type(t), t.shape, t.dtype, t.device)


def _validate_cached(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, top_k) -> int:
    """``validate_ilora_inputs`` memoised on what it inspects (types, shapes, dtypes, devices and the scalar
    arguments): a layer called again with the same metadata skips the checks. Anything unusual (a non-tensor,
    an unhashable argument) takes the full validation, which raises the named error."""
    try:
        key = (_tensor_key(x), _tensor_key(weight), None if bias is None else _tensor_key(bias),
               _tensor_key(router_weight), _tensor_key(lora_a), _tensor_key(lora_b), type(scaling), scaling,
               type(dropout_p), dropout_p, top_k)
        top = _validated.get(key)
    except (AttributeError, TypeError):
        return validate_ilora_inputs(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, top_k)
    if top is None:
        top = validate_ilora_inputs(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, top_k)
        if len(_validated) >= _VALIDATED_MAX:
            _validated.clear()
        _validated[key] = top
    return top


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def _eager_fast_path_ok(tensors) -> bool:
    """The fast path serves plain tensors; tensor subclasses take the registered ops, which handle them
    generically; so does every call with ILORA_EAGER_FAST_PATH=0 (``torch.func`` transforms aside: see
    ``_TransformedILoRA``)."""
    if not settings.get().eager_fast_path:
        return False
    return all(t is None or type(t) in _PLAIN_TYPES for t in tensors)


def _autocast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """autocast's rule for the ops it casts to a lower precision (F.linear among them): every floating-point
    tensor but a float64 one is cast to ``dtype``."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _cast_shrink(router_weight: Tensor, lora_a: Tensor, dtype: torch.dtype):
    """router_weight and lora_a cast in one copy of their packed (K + r, d_in) buffer: (K, d_in), (r, d_in) views of
    it, still adjacent."""
    cast = shrink_concat(router_weight, lora_a).to(dtype)
    return cast[:router_weight.shape[0]], cast[router_weight.shape[0]:]


class _CastPackedShrink(torch.autograd.Function):
    """router_weight and lora_a of one packed (K + r, d_in) buffer (``ops/layout.py``) cast to ``dtype`` in ONE
    copy that keeps them adjacent, so the kernels' ``[W_r; A]`` stays a view; gradients return in the inputs'
    dtype, as ``Tensor.to`` would give them."""

    @staticmethod
    def forward(ctx, router_weight, lora_a, dtype):
        ctx.dtypes = (router_weight.dtype, lora_a.dtype)
        return _cast_shrink(router_weight, lora_a, dtype)

    @staticmethod
    def backward(ctx, d_router, d_lora_a):
        return (None if d_router is None else d_router.to(ctx.dtypes[0]),
                None if d_lora_a is None else d_lora_a.to(ctx.dtypes[1]), None)


def _cast_adapter(router_weight: Tensor, lora_a: Tensor, lora_b: Tensor, dtype: torch.dtype):
    """The three adapter tensors cast to ``dtype`` (differentiably), keeping the packed layout: lora_b's strides
    survive ``Tensor.to``; the two shrink halves are cast together when they are packed."""
    if (router_weight.dtype == lora_a.dtype != dtype and type(router_weight) is type(lora_a)
            and type(router_weight) in _PLAIN_TYPES and not torch._C._are_functorch_transforms_active()
            and not torch.compiler.is_compiling() and shrink_packed(router_weight, lora_a)):
        if torch.is_grad_enabled() and (router_weight.requires_grad or lora_a.requires_grad):
            router_weight, lora_a = _CastPackedShrink.apply(router_weight, lora_a, dtype)
        else:
            router_weight, lora_a = _cast_shrink(router_weight, lora_a, dtype)
    else:
        router_weight, lora_a = router_weight.to(dtype), lora_a.to(dtype)
    return router_weight, lora_a, lora_b.to(dtype)


def _mixed_precision(x, weight, router_weight, lora_a, lora_b):
    """float32 adapter weights (master weights) with a float16 / bfloat16 x and weight: the adapter is cast to x's
    dtype for the kernels, as autocast would (differentiable: its gradients reach the float32 weights in float32).
    All three are float32 or none is: any other mix is left to the dtype check, which names the odd tensor."""
    adapter = (router_weight, lora_a, lora_b)
    if (isinstance(x, Tensor) and isinstance(weight, Tensor) and weight.dtype == x.dtype
            and all(isinstance(t, Tensor) for t in adapter) and float32_masters(x.dtype, adapter)):
        return _cast_adapter(router_weight, lora_a, lora_b, x.dtype)
    return adapter


def _any_requires_grad(tensors) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def ilora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], router_weight: Tensor, lora_a: Tensor,
                 lora_b: Tensor, scaling: float, dropout_p: float = 0.0, training: bool = False,
                 top_k: Optional[int] = None, backend: str = "auto",
                 return_router_weights: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """I-LoRA layer: ``y = x W^T + b + scaling * sum_k g_k B_k A dropout(x)`` with ``g = softmax(x W_r^T)``.

    Shapes: x (..., d_in); weight (d_out, d_in); bias (d_out,) or None; router_weight (K, d_in);
    lora_a (r, d_in); lora_b (K, d_out, r). Returns y (..., d_out) and, with ``return_router_weights``,
    also g (..., K) in float32 (float64 for float64 inputs). Dropout (on the adapter input only) is applied when
    ``training`` is true; its mask comes from a seed drawn from torch's default CPU generator, so
    ``torch.manual_seed`` makes it reproducible. ``top_k`` (None = dense) keeps the top_k largest router logits
    per token. ``backend``: "auto" or a name of ``BACKENDS`` (see ``available_backends``).

    dtypes: one floating dtype for every tensor, except that router_weight, lora_a and lora_b may all three be float32
    with a float16 / bfloat16 x and weight (master weights; computed in x's dtype, the same numbers as under
    ``torch.autocast``, gradients float32). Under autocast every tensor but a float64 one is cast to its dtype.

    Compiles with ``torch.compile`` without graph breaks (inference and training, dropout included), and the
    inference path (``training=False`` or ``dropout_p=0``) has no host synchronisation and no data-dependent
    shape, so it can be captured in a CUDA graph.
    """
    if isinstance(x, Tensor) and x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias, router_weight, lora_a, lora_b = (_autocast(t, dtype) for t in
                                                          (x, weight, bias, router_weight, lora_a, lora_b))
    else:
        router_weight, lora_a, lora_b = _mixed_precision(x, weight, router_weight, lora_a, lora_b)
    compiling = torch.compiler.is_compiling()
    if not compiling:
        top_k = _validate_cached(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, top_k)
    else:
        checked_scaling = scaling
        if isinstance(scaling, (int, float)) and not isinstance(scaling, bool):
            # with dynamic=True Dynamo hands module floats in as SymFloats, on which math.isfinite cannot be traced:
            # under compile only the type of scaling is checked (ILoRALinear / ILoRAConfig check its value)
            checked_scaling = 1.0
        top_k = validate_ilora_inputs(x, weight, bias, router_weight, lora_a, lora_b, checked_scaling, dropout_p,
                                      top_k)
    p = float(dropout_p) if training else 0.0
    lead_shape = x.shape[:-1]
    d_in, d_out, num_heads = weight.shape[1], weight.shape[0], router_weight.shape[0]

    if x.numel() == 0:
        resolve_backend(backend, x)  # a bad or unusable backend is refused for empty inputs too
        # nothing to route: the adapter contributes exactly zero (its parameters get zero gradients)
        zero = (router_weight.sum() + lora_a.sum() + lora_b.sum()) * 0
        y = torch.nn.functional.linear(x, weight, bias) + zero
        g = torch.softmax(torch.nn.functional.linear(x, router_weight), dim=-1, dtype=router_dtype(x.dtype))
        return (y, g) if return_router_weights else y

    flat = x.dim() == 2
    x2d = x if flat else x.reshape(-1, d_in)
    scaling = float(scaling)
    if compiling:
        name = _resolve_at_trace_time(backend, x.device.type, x.dtype)
        if p > 0.0:
            y, _, g = torch.ops.ilora_kernels.seeded_forward(x2d, weight, bias, router_weight, lora_a, lora_b, scaling,
                                                             p, _draw_seed_tensor(), top_k, name)
        else:
            y, _, g = registered[name].forward(x2d, weight, bias, router_weight, lora_a, lora_b, scaling, 0.0, 0,
                                               top_k)
    else:
        ops = registered[resolve_cached(backend, x.device.type, x.dtype)]
        seed = _draw_seed() if p > 0.0 else 0
        tensors = (x2d, weight, bias, router_weight, lora_a, lora_b)
        transformed = torch._C._are_functorch_transforms_active()
        if not transformed and not _eager_fast_path_ok(tensors):
            y, _, g = ops.forward(x2d, weight, bias, router_weight, lora_a, lora_b, scaling, p, seed, top_k)
        elif transformed or (torch.is_grad_enabled() and _any_requires_grad(tensors)):
            function = _TransformedILoRA if transformed else _EagerILoRA
            y, _, g = function.apply(x2d, weight, bias, router_weight, lora_a, lora_b, scaling, p, seed, top_k, ops)
        else:
            with torch._C._AutoDispatchBelowAutograd():
                y, _, g = ops.forward_kernel(x2d, weight, bias, router_weight, lora_a, lora_b, scaling, p, seed,
                                             top_k)
    if not flat:
        y = y.view(*lead_shape, d_out)
        g = g.view(*lead_shape, num_heads)
    return (y, g) if return_router_weights else y
