"""The packed adapter layout: how ``ILoRALinear`` stores its parameters so that no kernel copies them per call.

The kernels want two matrices built from the adapter (SPEC section 1):

* ``[W_r; A]`` ((K + r, d_in)): the one shrink GEMM of the forward and the ``D [W_r; A]`` term of dx;
* ``B_cat = [B_1 | ... | B_K]`` ((d_out, K r)): the expand GEMM and ``V = dy B_cat``.

Built from separate tensors, each is a copy on every call (twice per forward + backward). ``ILoRALinear`` therefore
allocates one (K + r, d_in) buffer whose first K rows are ``router_weight`` and whose last r rows are ``lora_a``
(two ordinary leaf parameters that share it), and ``lora_b`` (still (K, d_out, r)) as the (1, 0, 2) permutation of a
contiguous (d_out, K, r) buffer, so that ``B_cat`` is a view. The public shapes, the state-dict keys and what an
optimizer sees do not change.

The layout is an optimisation the kernels detect, never a requirement: tensors in any other layout (separate
allocations, an FSDP or DeepSpeed flat buffer, a ``clone()``) give the same numbers, at the price of the copies.
The C++ and CUDA backends read the same facts from ``csrc/layout.h``.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

__all__ = ["concat_heads", "empty_heads_grad", "heads_grad", "heads_packed", "new_packed_parameters", "pack_shrink_",
           "repack_", "shrink_concat", "shrink_packed"]


def heads_packed(lora_b: Tensor) -> bool:
    """Whether lora_b (K, d_out, r) is the permutation of a contiguous (d_out, K, r) buffer: then ``B_cat`` is a
    view (``concat_heads``)."""
    return lora_b.permute(1, 0, 2).is_contiguous()


def concat_heads(lora_b: Tensor) -> Tensor:
    """B_cat = [B_1 | ... | B_K]: (K, d_out, r) -> (d_out, K * r); a view when ``heads_packed(lora_b)``, else a copy."""
    num_heads, d_out, rank = lora_b.shape
    return lora_b.permute(1, 0, 2).reshape(d_out, num_heads * rank)


def heads_grad(d_b_cat: Tensor, lora_b: Tensor) -> Tensor:
    """The gradient of lora_b (K, d_out, r) from that of B_cat (d_out, K r), in lora_b's layout: a view of
    ``d_b_cat`` when lora_b is packed (so autograd accumulates it without a copy), else a contiguous copy."""
    num_heads, d_out, rank = lora_b.shape
    grad = d_b_cat.view(d_out, num_heads, rank).permute(1, 0, 2)
    return grad if heads_packed(lora_b) else grad.contiguous()


def empty_heads_grad(lora_b: Tensor) -> Tensor:
    """An uninitialised tensor with the shape, dtype, device and layout ``heads_grad`` returns (fake kernels)."""
    num_heads, d_out, rank = lora_b.shape
    if heads_packed(lora_b):
        return lora_b.new_empty(d_out, num_heads, rank).permute(1, 0, 2)
    return lora_b.new_empty(lora_b.shape)


def shrink_packed(router_weight: Tensor, lora_a: Tensor) -> bool:
    """Whether router_weight (K, d_in) and lora_a (r, d_in) are the two halves of one contiguous (K + r, d_in)
    buffer, in that order: then ``[W_r; A]`` is a view (``shrink_concat``)."""
    return (router_weight.is_contiguous() and lora_a.is_contiguous() and router_weight.dtype == lora_a.dtype
            and router_weight.device == lora_a.device and router_weight.shape[1:] == lora_a.shape[1:]
            and router_weight.numel() > 0
            and router_weight.untyped_storage().data_ptr() == lora_a.untyped_storage().data_ptr()
            and lora_a.data_ptr() == router_weight.data_ptr() + router_weight.numel() * router_weight.element_size())


def shrink_concat(router_weight: Tensor, lora_a: Tensor) -> Tensor:
    """[W_r; A] (K + r, d_in): a view when ``shrink_packed``, else a copy. Not differentiable (kernels only)."""
    if shrink_packed(router_weight, lora_a):
        rows = router_weight.shape[0] + lora_a.shape[0]
        return router_weight.as_strided((rows, router_weight.shape[1]), (router_weight.shape[1], 1))
    return torch.cat((router_weight, lora_a), 0)


def new_packed_parameters(num_heads: int, rank: int, d_in: int, d_out: int, *, device=None,
                          dtype=None) -> Tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    """Uninitialised (router_weight (K, d_in), lora_a (r, d_in), lora_b (K, d_out, r)) in the packed layout."""
    shrink = torch.empty(num_heads + rank, d_in, device=device, dtype=dtype)
    heads = torch.empty(d_out, num_heads, rank, device=device, dtype=dtype)
    return (nn.Parameter(shrink[:num_heads]), nn.Parameter(shrink[num_heads:]), nn.Parameter(heads.permute(1, 0, 2)))


def _owns_storage(t: Tensor) -> bool:
    """The tensor is the whole of its storage (so it is dense, in some order of its dimensions): nobody else's
    buffer, which rebinding its ``.data`` could break."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _owns_all(*tensors: Tensor) -> bool:
    return all(_owns_storage(t) and not t.is_meta for t in tensors)


def pack_shrink_(router_weight: nn.Parameter, lora_a: nn.Parameter) -> bool:
    """Moves router_weight and lora_a into one new (K + r, d_in) buffer by rebinding their ``.data``, when each owns
    its whole storage; returns whether it moved them (see ``repack_``)."""
    if (shrink_packed(router_weight, lora_a) or not _owns_all(router_weight, lora_a)
            or router_weight.dtype != lora_a.dtype or router_weight.device != lora_a.device
            or router_weight.shape[1:] != lora_a.shape[1:]):
        return False
    with torch.no_grad():
        shrink = torch.cat((router_weight.detach(), lora_a.detach()), 0)
    num_heads = router_weight.shape[0]
    router_weight.data = shrink[:num_heads]
    lora_a.data = shrink[num_heads:]
    return True


def repack_(router_weight: nn.Parameter, lora_a: nn.Parameter, lora_b: nn.Parameter, heads: bool = True) -> bool:
    """Puts the three parameters back into the packed layout by rebinding their ``.data`` (the Parameter objects,
    and an optimizer's references to them, stay), for tensors that each own their whole storage: what
    ``Module.to()`` / ``.half()`` and ``load_state_dict(assign=True)`` leave. Tensors that live in someone else's
    buffer (FSDP, DeepSpeed), meta tensors and tensors already packed are left alone; ``heads=False`` leaves
    lora_b contiguous instead (``ILoRALinear.set_packed_heads``). Returns whether anything moved."""
    moved = pack_shrink_(router_weight, lora_a)
    if not heads and not lora_b.is_contiguous() and _owns_all(lora_b):
        with torch.no_grad():
            lora_b.data = lora_b.detach().contiguous()
        return True
    if heads and not heads_packed(lora_b) and _owns_all(lora_b):
        with torch.no_grad():
            lora_b.data = lora_b.detach().permute(1, 0, 2).contiguous().permute(1, 0, 2)
        moved = True
    return moved
