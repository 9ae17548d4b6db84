"""``ilora_linear``: the functional I-LoRA layer, backend dispatch and the custom-op autograd glue.

Every backend is a pair of ``torch.library`` ops on flattened 2-D activations:

    <backend>_forward(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, seed, top_k)
        -> (y (N, d_out), h (N, r), g (N, K) float32)
    <backend>_backward(dy, x, weight, router_weight, lora_a, lora_b, h, g, scaling, dropout_p, seed, output_mask)
        -> (dx, d_router_weight, d_lora_a, d_lora_b)      (empty where output_mask is False)

with a fake (meta) implementation each and the backward attached to the forward with ``register_autograd``,
so ``torch.compile`` and ``torch.library.opcheck`` see ordinary ops. ``top_k = 0`` means dense routing.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Tuple

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


def _make_backward(backward_op) -> Callable:
    def backward(ctx, dy, _dh, dg):
        x, weight, router_weight, lora_a, lora_b, h, g = ctx.saved_tensors
        needs = ctx.needs_input_grad
        output_mask = [needs[0], needs[3], needs[4], needs[5]]
        dx = d_router = d_lora_a = d_lora_b = d_weight = d_bias = None
        if dy is not None and any(output_mask):
            dx, d_router, d_lora_a, d_lora_b = backward_op(dy, x, weight, router_weight, lora_a, lora_b, h, g,
                                                           ctx.scaling, ctx.dropout_p, ctx.seed, output_mask)
            dx, d_router, d_lora_a, d_lora_b = (t if m else None for t, m in
                                                zip((dx, d_router, d_lora_a, d_lora_b), output_mask))
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

    return backward


def _attach(forward_name: str, backward_name: str) -> None:
    torch.library.register_fake(forward_name)(_fake_forward)
    torch.library.register_fake(backward_name)(_fake_backward)
    backward_op = getattr(torch.ops.ilora_kernels, backward_name.split("::")[1])
    torch.library.register_autograd(forward_name, _make_backward(backward_op), setup_context=_setup_context)


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


def resolve_backend(backend: str, x: Tensor) -> str:
    """Turns ``backend`` ("auto" or a name) into a usable backend for x's device and dtype, or raises."""
    if backend not in BACKENDS and backend != "auto":
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    _load_extension_backends()
    device = x.device.type
    if backend == "auto":
        if device == "cuda":
            if x.dtype in _TRITON_DTYPES and _triton_status() is None:
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
        if x.dtype not in _TRITON_DTYPES:
            raise TypeError(f"backend='triton' supports float16, bfloat16 and float32; x has dtype {x.dtype}")
        return backend
    if backend in ("cpu", "cuda"):
        if backend not in _forward_ops:
            raise RuntimeError(f"backend={backend!r} is unavailable: {_unavailable.get(backend, 'unavailable')}")
        if device != backend:
            raise ValueError(f"backend={backend!r} needs {backend} tensors, but x is on {x.device}")
    return backend


def _draw_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).item())


def ilora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], router_weight: Tensor, lora_a: Tensor,
                 lora_b: Tensor, scaling: float, dropout_p: float = 0.0, training: bool = False,
                 top_k: Optional[int] = None, backend: str = "auto", return_router_weights: bool = False):
    """I-LoRA layer: ``y = x W^T + b + scaling * sum_k g_k B_k A dropout(x)`` with ``g = softmax(x W_r^T)``.

    Shapes: x (..., d_in); weight (d_out, d_in); bias (d_out,) or None; router_weight (K, d_in);
    lora_a (r, d_in); lora_b (K, d_out, r). Returns y (..., d_out) and, with ``return_router_weights``,
    also g (..., K) in float32 (float64 for float64 inputs). Dropout (on the adapter input only) is applied when ``training`` is true.
    ``top_k`` (None = dense) keeps the top_k largest router logits per token.
    """
    if isinstance(x, Tensor) and x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, router_weight, lora_a, lora_b = (t.to(dtype) for t in (x, weight, router_weight, lora_a, lora_b))
        bias = None if bias is None else bias.to(dtype)
    top_k = validate_ilora_inputs(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, top_k)
    p = float(dropout_p) if training else 0.0
    lead_shape = x.shape[:-1]
    d_in, d_out, num_heads = weight.shape[1], weight.shape[0], router_weight.shape[0]

    if x.numel() == 0:
        # nothing to route: the adapter contributes exactly zero (its parameters get zero gradients)
        zero = (router_weight.sum() + lora_a.sum() + lora_b.sum()) * 0
        y = torch.nn.functional.linear(x, weight, bias) + zero
        g = x.new_empty(*lead_shape, num_heads, dtype=_reference.router_dtype(x.dtype))
        return (y, g) if return_router_weights else y

    name = resolve_backend(backend, x)
    seed = _draw_seed() if p > 0.0 else 0
    y, _, g = _forward_ops[name](x.reshape(-1, d_in), weight, bias, router_weight, lora_a, lora_b, float(scaling), p,
                                 seed, top_k)
    y = y.view(*lead_shape, d_out)
    if return_router_weights:
        return y, g.view(*lead_shape, num_heads)
    return y
