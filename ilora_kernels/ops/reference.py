"""The reference backend: plain PyTorch that *is* the specification (SPEC section 1).

``forward`` and ``backward`` work on flattened 2-D activations; this module makes them the
``ilora_kernels::reference_forward`` / ``reference_backward`` ops of the op contract (``contract.define``) and
registers them.
Saved for backward: x, h (N, r), g (N, K) and the dropout seed; never a per-head (N, d_out) tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dropout import apply_dropout
from .contract import define, router_dtype
from .layout import concat_heads, heads_grad
from .registry import register


def router_probabilities(x2d: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> torch.Tensor:
    """g = softmax(x W_r^T), (N, K), in float32 (float64 for float64 inputs); with 0 < top_k < K only the top_k
    largest logits get mass. Ranking: a NaN logit above every number, then larger above smaller, and of equal logits
    the lower head index first (a stable descending sort; the Triton, C++ and CUDA kernels rank the same way)."""
    logits = x2d @ router_weight.t()
    num_heads = router_weight.shape[0]
    dtype = router_dtype(x2d.dtype)
    if 0 < top_k < num_heads:
        top_vals, top_idx = logits.sort(dim=-1, descending=True, stable=True)
        top_vals, top_idx = top_vals[:, :top_k], top_idx[:, :top_k]
        g = torch.zeros(logits.shape, dtype=dtype, device=logits.device)
        return g.scatter_(-1, top_idx, torch.softmax(top_vals, dim=-1, dtype=dtype))
    return torch.softmax(logits, dim=-1, dtype=dtype)


def routed_activations(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """u = [g_1 h, ..., g_K h]: (N, K * r), with g cast to the activation dtype first (Crab+ semantics)."""
    n_tokens, rank = h.shape
    return (g.to(h.dtype).unsqueeze(2) * h.unsqueeze(1)).reshape(n_tokens, -1)


def forward(x2d, weight, bias, router_weight, lora_a, lora_b, scaling: float, dropout_p: float, seed: int,
            top_k: int):
    """Returns y (N, d_out), h (N, r) in the activation dtype, g (N, K) in ``router_dtype``."""
    g = router_probabilities(x2d, router_weight, top_k)
    h = apply_dropout(x2d, seed, dropout_p) @ lora_a.t()
    y = F.linear(x2d, weight, bias)
    y = torch.addmm(y, routed_activations(g, h), concat_heads(lora_b).t(), alpha=scaling)
    return y, h, g


def backward(dy, x2d, weight, router_weight, lora_a, lora_b, h, g, scaling: float, dropout_p: float, seed: int,
             output_mask):
    """Gradients (dx, d_router_weight, d_lora_a, d_lora_b) of SPEC section 1; None where output_mask is False."""
    need_dx, need_dwr, need_da, need_db = output_mask
    num_heads, d_out, rank = lora_b.shape
    n_tokens = dy.shape[0]
    dx = d_router = d_lora_a = d_lora_b = None

    if need_db:
        d_b_cat = scaling * (dy.t() @ routed_activations(g, h))  # (d_out, K r)
        d_lora_b = heads_grad(d_b_cat, lora_b)
    if not (need_dx or need_dwr or need_da):
        return dx, d_router, d_lora_a, d_lora_b

    v = (dy @ concat_heads(lora_b)).reshape(n_tokens, num_heads, rank)  # v_k = dy B_k
    dh = scaling * (g.to(v.dtype).unsqueeze(2) * v).sum(dim=1)  # (N, r)
    dg = scaling * (v.to(g.dtype) * h.to(g.dtype).unsqueeze(1)).sum(dim=2)  # (N, K), router dtype
    dz = (g * (dg - (g * dg).sum(dim=1, keepdim=True))).to(x2d.dtype)  # softmax backward

    if need_dwr:
        d_router = dz.t() @ x2d
    if need_da:
        d_lora_a = dh.t() @ apply_dropout(x2d, seed, dropout_p)
    if need_dx:
        dx = dy @ weight + apply_dropout(dh @ lora_a, seed, dropout_p) + dz @ router_weight
    return dx, d_router, d_lora_a, d_lora_b


register("reference", define("reference", forward, backward))
