"""``ilora_kernels::seeded_forward`` / ``seeded_backward``: the traced training path with dropout.

Under ``torch.compile`` the dropout seed is drawn as a CPU int64 tensor (``torch.randint``, a graph op, no
``.item()`` and so no graph break) and handed to these thin ops, which read it inside their own kernel and call the
chosen backend's ops with ``int seed``. The backends' schemas stay as the op contract defines them; the extra
trailing ``str backend`` argument names the backend, resolved at trace time.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .contract import backward_body, fake_backward, fake_forward
from .registry import backend_ops


@torch.library.custom_op("ilora_kernels::seeded_forward", mutates_args=())
def seeded_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], router_weight: Tensor, lora_a: Tensor,
                   lora_b: Tensor, scaling: float, dropout_p: float, seed: Tensor, top_k: int,
                   backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return backend_ops(backend).forward_kernel(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p,
                                               int(seed.item()), top_k)


@torch.library.custom_op("ilora_kernels::seeded_backward", mutates_args=())
def seeded_backward(dy: Tensor, x: Tensor, weight: Tensor, router_weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                    h: Tensor, g: Tensor, scaling: float, dropout_p: float, seed: Tensor,
                    output_mask: List[bool], backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return backend_ops(backend).backward_kernel(dy, x, weight, router_weight, lora_a, lora_b, h, g, scaling,
                                                dropout_p, int(seed.item()), output_mask)


@seeded_forward.register_fake
def _(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, seed, top_k, backend):
    return fake_forward(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, 0, top_k)


@seeded_backward.register_fake
def _(dy, x, weight, router_weight, lora_a, lora_b, h, g, scaling, dropout_p, seed, output_mask, backend):
    return fake_backward(dy, x, weight, router_weight, lora_a, lora_b, h, g, scaling, dropout_p, 0, output_mask)


def _setup_context(ctx, inputs, output):
    x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, seed, top_k, backend = inputs
    _, h, g = output
    ctx.save_for_backward(x, weight, router_weight, lora_a, lora_b, h, g, seed)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
    ctx.mark_non_differentiable(h)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _dh, dg):
    x, weight, router_weight, lora_a, lora_b, h, g, seed = ctx.saved_tensors

    def call(*args):
        return torch.ops.ilora_kernels.seeded_backward(*args[:10], seed, args[11], ctx.backend)

    grads = backward_body(ctx, dy, dg, (x, weight, router_weight, lora_a, lora_b, h, g), call)
    return (*grads, None)


torch.library.register_autograd("ilora_kernels::seeded_forward", _backward, setup_context=_setup_context)
