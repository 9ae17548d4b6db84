"""An independent float64 implementation of SPEC section 1 for the tests: heads looped one by one,
gradients by torch.autograd (not by any hand-written backward of the package)."""

from __future__ import annotations

import torch

from ilora_kernels._dropout import keep_mask


def ilora_float64(x, weight, bias, router_weight, lora_a, lora_b, scaling, dropout_p=0.0, seed=0, top_k=None):
    """x (..., d_in) -> (y (..., d_out), g (..., K)), all in float64, differentiable."""
    d_in = x.shape[-1]
    xs = x.reshape(-1, d_in).double()
    logits = xs @ router_weight.double().t()
    num_heads = router_weight.shape[0]
    if top_k is not None and top_k < num_heads:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    g = torch.softmax(logits, dim=-1)
    x_drop = xs
    if dropout_p > 0:
        x_drop = xs * keep_mask(seed, xs.shape[0], d_in, dropout_p, xs.device).double() / (1.0 - dropout_p)
    h = x_drop @ lora_a.double().t()
    y = xs @ weight.double().t()
    if bias is not None:
        y = y + bias.double()
    for k in range(num_heads):
        y = y + scaling * g[:, k:k + 1] * (h @ lora_b[k].double().t())
    return y.reshape(*x.shape[:-1], -1), g.reshape(*x.shape[:-1], num_heads)


def make_inputs(n_tokens, d_in, d_out, rank, num_heads, dtype=torch.float32, lead=(), bias=True, device="cpu",
                routing="random", generator=None):
    """Fresh random inputs (never zeros). ``routing``: random | one_head | uniform | skewed | near_tied."""
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    x = rnd(*lead, n_tokens, d_in)
    weight = rnd(d_out, d_in, scale=d_in ** -0.5)
    b = rnd(d_out) if bias else None
    router = rnd(num_heads, d_in, scale=d_in ** -0.5)
    if routing == "one_head":  # feature 0 is a positive constant-like column that only head 0 reads, strongly
        x[..., 0] = 1.0 + 0.1 * torch.rand(x.shape[:-1], generator=generator, dtype=torch.float64).to(x)
        router = router * 0.01
        router[0, 0] = 40.0
    elif routing == "uniform":
        router = router * 0.0  # identical logits: exactly uniform routing
    elif routing == "skewed":
        router = router * 3.0
    elif routing == "near_tied":
        router = (router[:1].expand(num_heads, d_in) + rnd(num_heads, d_in, scale=1e-4)).contiguous()
    lora_a = rnd(rank, d_in, scale=d_in ** -0.5)
    lora_b = rnd(num_heads, d_out, rank, scale=rank ** -0.5)
    return x, weight, b, router, lora_a, lora_b
