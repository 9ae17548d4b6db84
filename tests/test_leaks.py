"""Leaks: repeated forward/backward of a patched tiny Llama holds CPU RSS flat after warm-up (and CUDA allocated
memory flat, on a GPU). The AddressSanitizer run of the C++ CPU backend is recorded in docs/reliability.md."""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ilora_kernels as ik
from conftest import requires_cuda
from ilora_kernels import functional
from tiny_models import tiny_llama, token_batch

AVAILABLE = functional.available_backends()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    """Current resident set size in bytes (Linux /proc; the test is skipped elsewhere)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc for RSS")


def _patched_llama(backend, device="cpu"):
    torch.manual_seed(0)
    model = tiny_llama().to(device)
    ik.apply_ilora(model, ik.ILoRAConfig(r=8, num_heads=3, alpha=16, dropout=0.1, backend=backend))
    return model


def _train_steps(model, ids, steps):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(steps):
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out.loss.detach()


_RSS_SCRIPT = textwrap.dedent("""
    import gc, json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_leaks import _patched_llama, _rss, _train_steps
    from tiny_models import token_batch
    torch.set_num_threads(2)
    model = _patched_llama({backend!r})
    ids = token_batch(model.config.vocab_size, batch=2, seq=16)
    _train_steps(model, ids, 20)                      # warm-up: allocator pools, autograd caches
    gc.collect()
    samples = []
    for _ in range(5):
        loss = _train_steps(model, ids, 25)
        gc.collect()
        samples.append(_rss())
    print(json.dumps({{"samples": samples, "loss": float(loss)}}))
""")


@pytest.mark.parametrize("backend", [
    pytest.param(b, marks=pytest.mark.skipif(AVAILABLE[b] is not None, reason=f"{b}: {AVAILABLE[b]}"))
    for b in ("reference", "cpu")])
def test_cpu_rss_flat_over_training_steps(backend):
    """Run in a fresh process: the RSS of the pytest process carries every earlier test's allocator state."""
    script = _RSS_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), backend=backend)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    samples = result["samples"]
    assert math.isfinite(result["loss"])
    growth = samples[-1] - samples[0]
    # a leaked step (its activations and gradients, hundreds of KiB) would add tens of MiB over 100 steps; allow
    # allocator noise, refuse steady growth
    assert growth < 4 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over 100 steps: {samples}"


@pytest.mark.skipif(AVAILABLE["cpu"] is not None, reason=f"cpu: {AVAILABLE['cpu']}")
def test_raw_cpu_ops_do_not_leak():
    """Thousands of calls of the C++ forward and backward ops (dropout on, all gradients requested)."""
    gen = torch.Generator().manual_seed(0)
    n, d_in, d_out, r, k = 64, 32, 48, 8, 4
    x = torch.randn(n, d_in, generator=gen)
    w, b = torch.randn(d_out, d_in, generator=gen), torch.randn(d_out, generator=gen)
    wr, a, lb = (torch.randn(k, d_in, generator=gen), torch.randn(r, d_in, generator=gen),
                 torch.randn(k, d_out, r, generator=gen))
    dy = torch.randn(n, d_out, generator=gen)
    ops = torch.ops.ilora_kernels

    def burst(count):
        for i in range(count):
            p = 0.1 if i % 2 else 0.0
            y, h, g = ops.fused_forward(x, w, b, wr, a, lb, 2.0, p, i, 2 if i % 3 == 0 else 0)
            ops.fused_backward(dy, x, w, wr, a, lb, h, g, 2.0, p, i, [True, True, True, True])

    burst(300)
    gc.collect()
    before = _rss()
    burst(3000)
    gc.collect()
    growth = _rss() - before
    # one leaked output per call would be >= 3000 * 64 * 48 * 4 B = 35 MiB
    assert growth < 4 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over 3000 forward+backward calls"


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_allocated_flat_over_training_steps(backend):
    if AVAILABLE.get(backend) is not None:
        pytest.skip(f"{backend}: {AVAILABLE[backend]}")
    model = _patched_llama(backend, device="cuda")
    ids = token_batch(model.config.vocab_size, batch=2, seq=16).cuda()
    _train_steps(model, ids, 20)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    _train_steps(model, ids, 200)
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    assert after - before <= 0 or after - before < 64 * 1024, (before, after)
