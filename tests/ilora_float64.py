"""The tests' one reference of SPEC section 1 and their one input generator.

``ilora_float64`` computes the layer in float64 (or, for the low-precision error bounds, in a dtype asked for) the
plain way: heads looped one by one, the dropout mask from ``ilora_kernels._dropout.keep_mask``, gradients by
torch.autograd; it uses nothing of the package's ops or hand-written backward. Top-k follows the rule the kernels
implement (``topk_keep``). ``float64_grads`` adds the gradients of every input for a given dy (and dg).

``make_inputs`` draws fresh random inputs (never zeros) with a routing distribution (punica's: one head, uniform,
skewed, plus near ties and random).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ilora_kernels._dropout import keep_mask

ROUTINGS = ("random", "one_head", "uniform", "skewed", "near_tied")


def topk_keep(logits: torch.Tensor, top_k: Optional[int]) -> torch.Tensor:
    """Boolean mask (..., K) of the heads top-k routing keeps, by the kernels' rule: a NaN logit ranks above every
    number, a larger logit above a smaller one, and of equal logits the lower head index first. ``top_k`` None, 0 or
    >= K keeps every head."""
    num_heads = logits.shape[-1]
    if not top_k or top_k >= num_heads:
        return torch.ones_like(logits, dtype=torch.bool)
    nan = torch.isnan(logits)
    key = torch.where(nan, torch.full_like(logits, float("inf")), logits)
    idx = torch.arange(num_heads, device=logits.device)
    ki, kj = key.unsqueeze(-1), key.unsqueeze(-2)            # [..., i, j]: does head j rank above head i?
    ni, nj = nan.unsqueeze(-1), nan.unsqueeze(-2)
    earlier = idx.view(1, -1) < idx.view(-1, 1)              # [i, j]: j < i
    above = (kj > ki) | ((kj == ki) & ((nj & ~ni) | ((nj == ni) & earlier)))
    return above.sum(dim=-1) < top_k


def ilora_float64(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p=0.0, seed=0, top_k=None,
                  keep=None, dtype=torch.float64, with_h=False):
    """x (..., d_in) -> (y (..., d_out), g (..., K)), and h (..., r) too ``with_h``; computed in ``dtype`` (float64
    unless a test measures PyTorch's own error in a low precision), differentiable in every input. ``keep``
    overrides the top-k selection (where a low precision may legitimately pick another head)."""
    d_in, num_heads = x.shape[-1], router_weight.shape[0]
    lead = tuple(x.shape[:-1])
    xs = x.reshape(-1, d_in).to(dtype)
    logits = xs @ router_weight.to(dtype).t()
    if keep is None:
        keep = topk_keep(logits.detach(), top_k)
    g = torch.softmax(logits.masked_fill(~keep.reshape(logits.shape), float("-inf")), dim=-1)
    x_drop = xs
    if dropout_p > 0:
        x_drop = xs * keep_mask(seed, xs.shape[0], d_in, dropout_p, xs.device).to(dtype) / (1.0 - dropout_p)
    h = x_drop @ lora_a.to(dtype).t()
    y = xs @ weight.to(dtype).t()
    if bias is not None:
        y = y + bias.to(dtype)
    for k in range(num_heads):
        y = y + scaling * g[:, k:k + 1] * (h @ lora_b[k].to(dtype).t())
    y, g = y.reshape(lead + (weight.shape[0],)), g.reshape(lead + (num_heads,))
    return (y, g, h.reshape(lead + (lora_a.shape[0],))) if with_h else (y, g)


def float64_grads(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p, seed, top_k, dy, dg=None,
                  keep=None):
    """float64 (y, h, g, [dx, d_weight, d_bias, d_router_weight, d_lora_a, d_lora_b]) for the loss
    <y, dy> (+ <g, dg>); the gradient of bias is None without a bias."""
    leaves = [None if v is None else v.detach().to(torch.float64).requires_grad_() for v in
              (x, weight, bias, router_weight, lora_a, lora_b)]
    y, g, h = ilora_float64(*leaves, scaling, dropout_p, seed, top_k, keep=keep, with_h=True)
    loss = (y * dy.to(torch.float64)).sum()
    if dg is not None:
        loss = loss + (g * dg.to(torch.float64)).sum()
    loss.backward()
    return y.detach(), h.detach(), g.detach(), [None if v is None else v.grad for v in leaves]


def make_inputs(n, d_in, d_out, heads, rank, routing="random", dtype=torch.float32, *, bias=True,
                lead: Sequence[int] = (), device="cpu", seed=None, with_dy=False):
    """Random inputs of one layer: x (*lead, n, d_in), weight (d_out, d_in), bias (d_out,) or None,
    router_weight (heads, d_in), lora_a (rank, d_in), lora_b (heads, d_out, rank), and with ``with_dy`` also
    dy (*lead, n, d_out). Drawn in float64 from ``seed`` (None: torch's default generator), then cast.

    ``routing``: ``random``; ``one_head`` (every token sends almost all mass to head 0: feature 0 is about 1 and
    only head 0 reads it, strongly); ``uniform`` (a zero router: exactly tied logits, g = 1/K); ``skewed`` (a wide
    spread of logits, head 0 favoured); ``near_tied`` (all heads almost one router row: logit gaps of ~1e-7 in
    float64 and ~1e-3 in the other dtypes, still resolved by their accumulation)."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    gen = None if seed is None else torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    x = rnd(*lead, n, d_in)
    weight = rnd(d_out, d_in, scale=d_in ** -0.5)
    b = rnd(d_out) if bias else None
    lora_a = rnd(rank, d_in, scale=d_in ** -0.5)
    lora_b = rnd(heads, d_out, rank, scale=rank ** -0.5)
    if routing == "one_head":
        x[..., 0] = 1.0 + 0.1 * x[..., 0].abs()
        router = rnd(heads, d_in, scale=0.01)
        router[0, 0] = 60.0
    elif routing == "uniform":
        router = torch.zeros(heads, d_in, dtype=torch.float64)
    elif routing == "skewed":
        router = rnd(heads, d_in, scale=2.0 * d_in ** -0.5)
        router[0] += 0.5 * rnd(d_in).abs() * d_in ** -0.5
    elif routing == "near_tied":
        gap = 1e-7 if dtype == torch.float64 else 1e-3
        router = rnd(1, d_in, scale=d_in ** -0.5).expand(heads, d_in) + gap * rnd(heads, d_in)
    else:
        router = rnd(heads, d_in, scale=d_in ** -0.5)
    out = [x, weight, b, router, lora_a, lora_b] + ([rnd(*lead, n, d_out)] if with_dy else [])
    return [None if v is None else v.to(device=device, dtype=dtype) for v in out]
