"""Decode on the CPU as a model runs it: one token, no grad, many layers streamed from memory.

    python -m benchmarks.decode                       # 1024 -> 2816, r 16 and 128, K 3, 12 layers, 2 threads
    python -m benchmarks.decode --ranks 128 --layers 24 --tokens 1 4

Calling one layer in a loop keeps its weights in the caches and flatters the smallest competitor (the frozen base
layer's 11.5 MB fit in a 32 MB L3; with the adapter they may not). A model reads every layer's weights once per
token, so this benchmark builds ``--layers`` independent layers per competitor (a working set far above the L3) and
calls them round-robin. Reported: time per layer call over the base layer's, beside the byte floor
(W0 + [W_r; A] + B_cat) / W0. Competitors: the frozen base ``nn.Linear``; ``ILoRALinear`` (cpu backend) in its
packed layout; the same layer on separate adapter tensors (what the kernels copy without the packed layout); plain
LoRA with one head of the same rank (``base(x) + s B (A x)``, the PEFT LoRA forward). The rounds interleave the
competitors and the minimum over rounds is kept (the machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import ilora_kernels as ik

from .competitors import Case, decode_byte_floor


def _unpacked(layer: ik.ILoRALinear) -> ik.ILoRALinear:
    """A copy of ``layer`` whose adapter tensors are separate contiguous allocations (not the packed layout)."""
    other = ik.ILoRALinear(layer.base_layer, r=layer.r, num_heads=layer.num_heads, alpha=layer.alpha, dropout=0.0,
                           backend=layer.backend).eval()
    other.load_state_dict(layer.state_dict())
    with torch.no_grad():
        for name in ("router_weight", "lora_a", "lora_b"):
            getattr(other, name).data = getattr(other, name).detach().clone(memory_format=torch.contiguous_format)
    return other


def measure(d_in: int, d_out: int, rank: int, heads: int = 3, tokens: int = 1, layers: int = 12, rounds: int = 7,
            calls: int = 240, backend: str = "cpu") -> Dict[str, float]:
    """Seconds per layer call of every competitor (min over interleaved rounds) and the byte floor."""
    torch.manual_seed(0)
    bases = [torch.nn.Linear(d_in, d_out) for _ in range(layers)]
    packed = [ik.ILoRALinear(b, r=rank, num_heads=heads, alpha=2.0 * rank, dropout=0.0, backend=backend).eval()
              for b in bases]
    with torch.no_grad():
        for layer in packed:
            layer.lora_b.normal_(std=0.02)
    separate = [_unpacked(layer) for layer in packed]
    lora = [(torch.randn(rank, d_in) * d_in ** -0.5, torch.randn(d_out, rank) * 0.02) for _ in range(layers)]
    x = torch.randn(tokens, d_in)
    competitors = {
        "base": lambda i: bases[i](x),
        "ilora": lambda i: packed[i](x),
        "ilora separate tensors": lambda i: separate[i](x),
        "plain LoRA K=1": lambda i: F.linear(x, bases[i].weight, bases[i].bias)
        + 2.0 * F.linear(F.linear(x, lora[i][0]), lora[i][1]),
    }
    best = {name: float("inf") for name in competitors}
    with torch.no_grad():
        for fn in competitors.values():
            for i in range(2 * layers):
                fn(i % layers)
        for _ in range(rounds):
            for name, fn in competitors.items():
                start = time.perf_counter()
                for j in range(calls):
                    fn(j % layers)
                best[name] = min(best[name], (time.perf_counter() - start) / calls)
    best["byte floor"] = decode_byte_floor(Case("decode", d_in, d_out, tokens, rank, heads, decode=True))
    return best


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=1024)
    parser.add_argument("--d-out", type=int, default=2816)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1])
    parser.add_argument("--layers", type=int, default=12, help="independent layers per competitor, called in turn")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=240, help="layer calls per competitor and round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"decode: {args.d_in}->{args.d_out}, K={args.heads}, float32, {args.layers} layers round-robin, "
          f"{args.threads} threads, torch {torch.__version__}; time per layer call / base (min of {args.rounds} "
          f"interleaved rounds)")
    print(f"{'r':>4} {'N':>3} {'base us':>8} {'ilora':>7} {'separate':>9} {'LoRA K=1':>9} {'byte floor':>11} "
          f"{'ilora / floor':>14}")
    rows = []
    for rank in args.ranks:
        for tokens in args.tokens:
            t = measure(args.d_in, args.d_out, rank, args.heads, tokens, args.layers, args.rounds, args.calls)
            ratio = {k: t[k] / t["base"] for k in ("ilora", "ilora separate tensors", "plain LoRA K=1")}
            print(f"{rank:>4} {tokens:>3} {t['base'] * 1e6:>8.1f} {ratio['ilora']:>6.2f}x "
                  f"{ratio['ilora separate tensors']:>8.2f}x {ratio['plain LoRA K=1']:>8.2f}x "
                  f"{t['byte floor']:>10.3f}x {ratio['ilora'] / t['byte floor']:>13.2f}x")
            rows.append({"rank": rank, "tokens": tokens, **t})
    return rows


if __name__ == "__main__":
    main()
