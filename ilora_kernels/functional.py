"""``ilora_linear``: the functional I-LoRA layer, backend dispatch and the custom-op autograd glue.

Every backend is a pair of ``torch.library`` ops on flattened 2-D activations:

    <backend>_forward(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, seed, top_k)
        -> (y (N, d_out), h (N, r), g (N, K) float32)
    <backend>_backward(dy, x, weight, router_weight, lora_a, lora_b, h, g, scaling, dropout_p, seed, output_mask)
        -> (dx, d_router_weight, d_lora_a, d_lora_b)      (empty where output_mask is False)

with a fake (meta) implementation each and the backward attached to the forward with ``register_autograd``,
so ``torch.compile`` and ``torch.library.opcheck`` see ordinary ops. ``top_k = 0`` means dense routing.

Three call paths share these ops (same kernels, same numbers):

* eager (the default): a hand-written ``torch.autograd.Function`` calls the backend ops below the autograd key,
  which skips the generic custom-op autograd wrapper (about half the per-call CPU overhead at decode sizes);
  the dropout seed is drawn with ``_draw_seed()`` (one CPU ``torch.randint``, reproducible from
  ``torch.manual_seed``);
* traced by ``torch.compile`` / ``torch.export`` without dropout: the backend op itself, with its registered
  autograd, so Dynamo and AOTAutograd see one opaque op per layer and no graph break;
* traced with dropout: the seed is drawn as a CPU int64 tensor (``torch.randint``, a graph op, no ``.item()``) and
  passed to ``ilora_kernels::seeded_forward(..., Tensor seed, ..., str backend)``, a thin op that reads the
  seed inside its own kernel and calls the backend op with ``int seed``. The backend schemas stay unchanged.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _extension
from ._validation import validate_ilora_inputs
from .ops import reference as _reference

BACKENDS = ("reference", "cpu", "triton", "cuda")

# ---------------------------------------------------------------------------------------------------------------
# fake implementations (shared by every backend)


def _fake_forward(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, seed, top_k):
    n_tokens = x.shape[0]
    return (x.new_empty(n_tokens, weight.shape[0]), x.new_empty(n_tokens, lora_a.shape[0]),
            x.new_empty(n_tokens, router_weight.shape[0], dtype=_reference.router_dtype(x.dtype)))


def _fake_backward(dy, x, weight, router_weight, lora_a, lora_b, h, g, scaling, dropout_p, seed, output_mask):
    def grad_like(t, needed):
        return t.new_empty(t.shape) if needed else t.new_empty(0)

    return (grad_like(x, output_mask[0]), grad_like(router_weight, output_mask[1]), grad_like(lora_a, output_mask[2]),
            grad_like(lora_b, output_mask[3]))


# ---------------------------------------------------------------------------------------------------------------
# autograd, attached to every backend's forward op


def _setup_context(ctx, inputs, output):
    x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, seed, top_k = inputs
    _, h, g = output
    ctx.save_for_backward(x, weight, router_weight, lora_a, lora_b, h, g)
    ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
    ctx.mark_non_differentiable(h)
    # unused outputs (g, usually) then reach backward as None instead of zero tensors that would cost GEMMs
    ctx.set_materialize_grads(False)


def _backward_body(ctx, dy, dg, saved, call_backward):
    """Gradients (dx, d_weight, d_bias, d_router, d_lora_a, d_lora_b, None x 4) shared by every autograd path;
    ``call_backward(dy, x, weight, router_weight, lora_a, lora_b, h, g, scaling, dropout_p, seed, output_mask)``
    runs the backend's backward op."""
    x, weight, router_weight, lora_a, lora_b, h, g = saved
    needs = ctx.needs_input_grad
    output_mask = [needs[0], needs[3], needs[4], needs[5]]
    dx = d_router = d_lora_a = d_lora_b = d_weight = d_bias = None
    if dy is not None and any(output_mask):
        dx, d_router, d_lora_a, d_lora_b = call_backward(dy, x, weight, router_weight, lora_a, lora_b, h, g,
                                                         ctx.scaling, ctx.dropout_p, getattr(ctx, "seed", 0),
                                                         output_mask)
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


def _make_backward(backward_op) -> Callable:
    def backward(ctx, dy, _dh, dg):
        return _backward_body(ctx, dy, dg, ctx.saved_tensors, backward_op)

    return backward


# forward op packet -> (forward OpOverload, backward OpOverload), for the eager fast path
_op_pairs: Dict[object, Tuple[Callable, Callable]] = {}


def _attach(forward_name: str, backward_name: str) -> None:
    torch.library.register_fake(forward_name)(_fake_forward)
    torch.library.register_fake(backward_name)(_fake_backward)
    forward_op = getattr(torch.ops.ilora_kernels, forward_name.split("::")[1])
    backward_op = getattr(torch.ops.ilora_kernels, backward_name.split("::")[1])
    torch.library.register_autograd(forward_name, _make_backward(backward_op), setup_context=_setup_context)
    _op_pairs[forward_op] = (forward_op.default, backward_op.default)


# ---------------------------------------------------------------------------------------------------------------
# the reference backend as custom ops


@torch.library.custom_op("ilora_kernels::reference_forward", mutates_args=())
def _reference_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], router_weight: Tensor, lora_a: Tensor,
                       lora_b: Tensor, scaling: float, dropout_p: float, seed: int,
                       top_k: int) -> Tuple[Tensor, Tensor, Tensor]:
    return _reference.forward(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, seed, top_k)


@torch.library.custom_op("ilora_kernels::reference_backward", mutates_args=())
def _reference_backward(dy: Tensor, x: Tensor, weight: Tensor, router_weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                        h: Tensor, g: Tensor, scaling: float, dropout_p: float, seed: int,
                        output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _reference.backward(dy, x, weight, router_weight, lora_a, lora_b, h, g, scaling, dropout_p, seed,
                                output_mask)
    return tuple(t if t is not None else x.new_empty(0) for t in grads)


_attach("ilora_kernels::reference_forward", "ilora_kernels::reference_backward")

# ---------------------------------------------------------------------------------------------------------------
# backend discovery

_forward_ops: Dict[str, Callable] = {"reference": torch.ops.ilora_kernels.reference_forward}
_unavailable: Dict[str, str] = {}
_extension_attached = False


def _load_extension_backends() -> None:
    global _extension_attached
    if _extension_attached:
        return
    _extension_attached = True
    if not _extension.load():
        reason = _extension.unavailable_reason()
        _unavailable["cpu"] = _unavailable["cuda"] = reason
        return
    _attach("ilora_kernels::fused_forward", "ilora_kernels::fused_backward")
    _forward_ops["cpu"] = torch.ops.ilora_kernels.fused_forward
    if _extension.cuda_built():
        _forward_ops["cuda"] = torch.ops.ilora_kernels.fused_forward
    else:
        _unavailable["cuda"] = ("ilora_kernels._C was built without CUDA (no CUDA toolkit at build time, "
                                "ILORA_FORCE_CUDA unset, or a CPU-only torch)")


def _triton_status() -> Optional[str]:
    """None when the Triton backend can run, else the reason it cannot."""
    if "triton" in _forward_ops:
        return None
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU interpreter)"
    try:
        from .ops import triton_ilora
    except Exception as exc:  # pragma: no cover - depends on the triton build
        return f"the Triton kernels failed to load: {exc!r}"
    if triton_ilora.FORWARD_OP is None:
        return "the Triton backend is not implemented in this build"
    _forward_ops["triton"] = triton_ilora.FORWARD_OP
    return None


def available_backends() -> Dict[str, Optional[str]]:
    """Maps every backend name to None when it is usable here, or to the reason it is not."""
    _load_extension_backends()
    triton_reason = _triton_status()
    report = {}
    for name in BACKENDS:
        if name == "triton":
            report[name] = triton_reason
        elif name in _forward_ops:
            report[name] = None
        else:
            report[name] = _unavailable.get(name, "unavailable")
    if report["cuda"] is None and not torch.cuda.is_available():
        report["cuda"] = "built with CUDA, but no CUDA device is visible"
    return report


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_resolved: Dict[Tuple[str, str, torch.dtype], str] = {}


def _resolve_cached(backend: str, x: Tensor) -> str:
    """``resolve_backend`` memoised on (backend, device type, dtype) for the eager path; failures are not cached."""
    key = (backend, x.device.type, x.dtype)
    name = _resolved.get(key)
    if name is None:
        name = resolve_backend(backend, x)
        _resolved[key] = name
    return name


def resolve_backend(backend: str, x: Tensor) -> str:
    """Turns ``backend`` ("auto" or a name) into a usable backend for x's device and dtype, or raises."""
    return _resolve(backend, x.device.type, x.dtype)


def _resolve(backend: str, device: str, dtype: torch.dtype) -> str:
    if backend not in BACKENDS and backend != "auto":
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    _load_extension_backends()
    if backend == "auto":
        if device == "cuda":
            if dtype in _TRITON_DTYPES and _triton_status() is None:
                return "triton"
            if "cuda" in _forward_ops:
                return "cuda"
        elif device == "cpu" and "cpu" in _forward_ops:
            return "cpu"
        return "reference"
    if backend == "triton":
        reason = _triton_status()
        if reason is not None:
            raise RuntimeError(f"backend='triton' is unavailable: {reason}")
        if dtype not in _TRITON_DTYPES:
            raise TypeError(f"backend='triton' supports float16, bfloat16 and float32; x has dtype {dtype}")
        return backend
    if backend in ("cpu", "cuda"):
        if backend not in _forward_ops:
            raise RuntimeError(f"backend={backend!r} is unavailable: {_unavailable.get(backend, 'unavailable')}")
        if device != backend:
            raise ValueError(f"backend={backend!r} needs {backend} tensors, but x is on {device}")
    return backend


# Under torch.compile the backend choice is made once, at trace time, by running _resolve eagerly (it may import
# the compiled extension or triton, which Dynamo cannot trace); the result is a constant of the graph.
_resolve_at_trace_time = torch.compiler.assume_constant_result(_resolve)


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
# seeded ops: the traced training path with dropout (seed as a tensor, backend schemas unchanged)

def _backend_pair(backend: str) -> Tuple[Callable, Callable]:
    _load_extension_backends()
    if backend == "triton":
        _triton_status()
    return _op_pairs[_forward_ops[backend]]


@torch.library.custom_op("ilora_kernels::seeded_forward", mutates_args=())
def _seeded_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], router_weight: Tensor, lora_a: Tensor,
                    lora_b: Tensor, scaling: float, dropout_p: float, seed: Tensor, top_k: int,
                    backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    forward_op, _ = _backend_pair(backend)
    return forward_op(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, int(seed.item()), top_k)


@torch.library.custom_op("ilora_kernels::seeded_backward", mutates_args=())
def _seeded_backward(dy: Tensor, x: Tensor, weight: Tensor, router_weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                     h: Tensor, g: Tensor, scaling: float, dropout_p: float, seed: Tensor,
                     output_mask: List[bool], backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    _, backward_op = _backend_pair(backend)
    return backward_op(dy, x, weight, router_weight, lora_a, lora_b, h, g, scaling, dropout_p, int(seed.item()),
                       output_mask)


@_seeded_forward.register_fake
def _(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, seed, top_k, backend):
    return _fake_forward(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, 0, top_k)


@_seeded_backward.register_fake
def _(dy, x, weight, router_weight, lora_a, lora_b, h, g, scaling, dropout_p, seed, output_mask, backend):
    return _fake_backward(dy, x, weight, router_weight, lora_a, lora_b, h, g, scaling, dropout_p, 0, output_mask)


def _seeded_setup_context(ctx, inputs, output):
    x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, seed, top_k, backend = inputs
    _, h, g = output
    ctx.save_for_backward(x, weight, router_weight, lora_a, lora_b, h, g, seed)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
    ctx.mark_non_differentiable(h)
    ctx.set_materialize_grads(False)


def _seeded_backward_formula(ctx, dy, _dh, dg):
    x, weight, router_weight, lora_a, lora_b, h, g, seed = ctx.saved_tensors

    def call(*args):
        return torch.ops.ilora_kernels.seeded_backward(*args[:10], seed, args[11], ctx.backend)

    grads = _backward_body(ctx, dy, dg, (x, weight, router_weight, lora_a, lora_b, h, g), call)
    return (*grads, None)


torch.library.register_autograd("ilora_kernels::seeded_forward", _seeded_backward_formula,
                                setup_context=_seeded_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# the eager fast path


class _EagerILoRA(torch.autograd.Function):
    """Eager autograd for one backend: calls the forward/backward ops below the autograd key (no generic
    custom-op wrapper, no pytree work). Numerically identical to the registered autograd of the ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, seed, top_k, ops):
        forward_op, backward_op = ops
        with torch._C._AutoDispatchBelowAutograd():
            y, h, g = forward_op(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, seed, top_k)
        ctx.save_for_backward(x, weight, router_weight, lora_a, lora_b, h, g)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.backward_op = scaling, dropout_p, seed, backward_op
        ctx.mark_non_differentiable(h)
        ctx.set_materialize_grads(False)
        return y, h, g

    @staticmethod
    def backward(ctx, dy, _dh, dg):
        backward_op = ctx.backward_op

        def call(*args):
            with torch._C._AutoDispatchBelowAutograd():
                return backward_op(*args)

        return (*_backward_body(ctx, dy, dg, ctx.saved_tensors, call), None)


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
# ILORA_EAGER_FAST_PATH=0 sends eager calls through the registered ops' generic autograd (a debugging switch)
_DISABLE_FAST = os.environ.get("ILORA_EAGER_FAST_PATH", "1").strip() == "0"


def _eager_fast_path_ok(tensors) -> bool:
    """The fast path serves plain tensors outside functorch transforms; anything else (tensor subclasses such as
    DTensor, vmap/grad transforms) takes the registered ops, which handle them generically."""
    if torch._C._are_functorch_transforms_active() or _DISABLE_FAST:
        return False
    return all(t is None or type(t) in _PLAIN_TYPES for t in tensors)


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
    per token. ``backend``: "auto", "reference", "cpu", "triton" or "cuda" (see ``available_backends``).

    Compiles with ``torch.compile`` without graph breaks (inference and training, dropout included), and the
    inference path (``training=False`` or ``dropout_p=0``) has no host synchronisation and no data-dependent
    shape, so it can be captured in a CUDA graph.
    """
    if isinstance(x, Tensor) and x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, router_weight, lora_a, lora_b = (t.to(dtype) for t in (x, weight, router_weight, lora_a, lora_b))
        bias = None if bias is None else bias.to(dtype)
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
        g = x.new_empty(*lead_shape, num_heads, dtype=_reference.router_dtype(x.dtype))
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
            y, _, g = _forward_ops[name](x2d, weight, bias, router_weight, lora_a, lora_b, scaling, 0.0, 0, top_k)
    else:
        name = _resolve_cached(backend, x)
        seed = _draw_seed() if p > 0.0 else 0
        forward_op = _forward_ops[name]
        tensors = (x2d, weight, bias, router_weight, lora_a, lora_b)
        if not _eager_fast_path_ok(tensors):
            y, _, g = forward_op(x2d, weight, bias, router_weight, lora_a, lora_b, scaling, p, seed, top_k)
        elif torch.is_grad_enabled() and _any_requires_grad(tensors):
            y, _, g = _EagerILoRA.apply(x2d, weight, bias, router_weight, lora_a, lora_b, scaling, p, seed, top_k,
                                        _op_pairs[forward_op])
        else:
            with torch._C._AutoDispatchBelowAutograd():
                y, _, g = _op_pairs[forward_op][0](x2d, weight, bias, router_weight, lora_a, lora_b, scaling, p,
                                                   seed, top_k)
    if not flat:
        y = y.view(*lead_shape, d_out)
        g = g.view(*lead_shape, num_heads)
    return (y, g) if return_router_weights else y
