"""Per-call CPU overhead of ``ilora_linear`` at decode sizes (1-16 tokens, tiny widths), against ``F.linear``.

    python -m benchmarks.overhead                 # table: microseconds per forward and per forward+backward
    python -m benchmarks.overhead --tokens 1 4 16 --repeat 2000

At these sizes the arithmetic is negligible, so the time is the Python, dispatcher and autograd work per call.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, List

import torch
import torch.nn.functional as F

import ilora_kernels as ik


def _time_us(fn: Callable[[], object], repeat: int, warmup: int = 200) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - start) / repeat)
    return best * 1e6


def measure(tokens: int, d_in: int = 32, d_out: int = 32, r: int = 4, k: int = 3, backend: str = "auto",
            repeat: int = 1000) -> dict:
    torch.manual_seed(0)
    x = torch.randn(tokens, d_in, requires_grad=True)
    w = torch.randn(d_out, d_in)
    b = torch.randn(d_out)
    wr = torch.randn(k, d_in, requires_grad=True)
    a = torch.randn(r, d_in, requires_grad=True)
    lb = torch.randn(k, d_out, r, requires_grad=True)
    wl = torch.randn(d_out, d_in, requires_grad=True)
    x0 = x.detach()

    def fwd_ilora():
        with torch.no_grad():
            return ik.ilora_linear(x0, w, b, wr, a, lb, 2.0, backend=backend)

    def fwdbwd_ilora():
        ik.ilora_linear(x, w, b, wr, a, lb, 2.0, backend=backend).sum().backward()

    def fwdbwd_ilora_dropout():
        ik.ilora_linear(x, w, b, wr, a, lb, 2.0, dropout_p=0.1, training=True, backend=backend).sum().backward()

    def fwd_linear():
        with torch.no_grad():
            return F.linear(x0, w, b)

    def fwdbwd_linear():
        F.linear(x, wl, b).sum().backward()

    return {
        "tokens": tokens,
        "linear fwd": _time_us(fwd_linear, repeat),
        "ilora fwd": _time_us(fwd_ilora, repeat),
        "linear fwd+bwd": _time_us(fwdbwd_linear, repeat),
        "ilora fwd+bwd": _time_us(fwdbwd_ilora, repeat),
        "ilora fwd+bwd p=0.1": _time_us(fwdbwd_ilora_dropout, repeat),
    }


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeat", type=int, default=1000)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(t, backend=args.backend, repeat=args.repeat) for t in args.tokens]
    cols = list(rows[0])
    print(f"backend={args.backend!r} ({ik.available_backends()}) torch {torch.__version__}; microseconds per call")
    print(" | ".join(f"{c:>20}" for c in cols))
    for row in rows:
        print(" | ".join(f"{row[c]:>20.1f}" if isinstance(row[c], float) else f"{row[c]:>20}" for c in cols))


if __name__ == "__main__":
    main()
