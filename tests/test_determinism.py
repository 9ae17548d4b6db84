"""Determinism: bit-identical outputs and gradients across repeated runs on one device, and dropout masks that are a
pure function of the seed, identical in every backend (policy and cost: docs/reliability.md)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ilora_float64 import make_inputs
from ilora_kernels import functional
from ilora_kernels._dropout import keep_mask

AVAILABLE = functional.available_backends()
HAS_CUDA = torch.cuda.is_available()


def _device(backend):
    return "cuda" if backend == "triton" and HAS_CUDA else "cpu"


BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(AVAILABLE[b] is not None, reason=f"{b}: {AVAILABLE[b]}"))
            for b in ("reference", "cpu", "triton")]


def _skip_refused_dtype(backend, dtype):
    """bf16 under the Triton interpreter is refused (its bf16 tl.dot is wrong): nothing to repeat there."""
    from ilora_kernels.ops import registry
    try:
        registry.resolve(backend, _device(backend), dtype)
    except TypeError as exc:
        pytest.skip(str(exc))


def _problem(dtype=torch.float32, n=37, d_in=24, d_out=19, r=8, k=3, seed=0):
    return make_inputs(n, d_in, d_out, k, r, dtype=dtype, seed=seed)


def _run_once(backend, tensors, p=0.2, top_k=None):
    leaves = [t.to(_device(backend)).clone().requires_grad_() for t in tensors]
    torch.manual_seed(42)                       # the dropout seed is drawn from torch's default generator
    y, g = functional.ilora_linear(*leaves, 1.75, dropout_p=p, training=p > 0, top_k=top_k, backend=backend,
                                   return_router_weights=True)
    dy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(y.dtype)
    ((y * dy.to(y.device)).sum() + (g * g).sum()).backward()
    return [t.detach().cpu() for t in [y, g] + [t.grad for t in leaves]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p,top_k", [(0.0, None), (0.2, 2)])
def test_repeated_runs_are_bit_identical(backend, dtype, p, top_k):
    _skip_refused_dtype(backend, dtype)
    tensors = _problem(dtype)
    first = _run_once(backend, tensors, p, top_k)
    for _ in range(2):
        again = _run_once(backend, tensors, p, top_k)
        for name, a, b in zip(("y", "g", "dx", "dW", "db", "dW_r", "dA", "dB"), first, again, strict=True):
            assert torch.equal(a, b), f"{backend}: {name} differs between two identical runs"


_PROCESS_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_determinism import _problem, _run_once
    out = {{}}
    for backend in {backends!r}:
        h = hashlib.sha256()
        for t in _run_once(backend, _problem(torch.float32)):
            h.update(t.contiguous().numpy().tobytes())
        out[backend] = h.hexdigest()
    print(json.dumps(out))
""")


def test_bit_identical_in_a_fresh_process():
    """A second process (other allocations, other memory alignment, the same thread count) gets the same bits."""
    backends = [b for b in ("reference", "cpu") if AVAILABLE[b] is None]
    here = {}
    for backend in backends:
        h = hashlib.sha256()
        for t in _run_once(backend, _problem(torch.float32)):
            h.update(t.contiguous().numpy().tobytes())
        here[backend] = h.hexdigest()
    script = _PROCESS_SCRIPT.format(tests=os.path.dirname(__file__), backends=backends)
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == here


# ---------------------------------------------------------------------------------------------------------------
# dropout masks: the same seed gives the same mask in every backend


_FORWARD_OPS = {"reference": "reference_forward", "cpu": "fused_forward", "triton": "triton_forward"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", [0, 7, 2**31 - 2])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_identical_across_backends(backend, dtype, seed, p):
    """h = A dropout(x) from each backend's forward op with A = I is dropout(x) itself, bit for bit."""
    n, d = 67, 48
    gen = torch.Generator().manual_seed(seed % 1000)
    x = (torch.rand(n, d, generator=gen) + 0.5).to(dtype)           # no zeros: h == 0 exactly where dropped
    eye = torch.eye(d, dtype=dtype)
    weight, router = torch.zeros(5, d, dtype=dtype), torch.zeros(2, d, dtype=dtype)
    lora_b = torch.zeros(2, 5, d, dtype=dtype)
    op = getattr(torch.ops.ilora_kernels, _FORWARD_OPS[backend])
    ref_op = torch.ops.ilora_kernels.reference_forward
    dev = _device(backend)
    _, h, _ = op(*(t.to(dev) for t in (x, weight)), None, *(t.to(dev) for t in (router, eye, lora_b)), 1.0, p,
                 seed, 0)
    h = h.cpu()
    _, h_ref, _ = ref_op(x, weight, None, router, eye, lora_b, 1.0, p, seed, 0)
    mask = keep_mask(seed, n, d, p)
    assert torch.equal(h != 0, mask), "kept elements differ from the shared hash"
    assert torch.equal(h, h_ref), "dropout(x) differs from the reference backend's"
    # the mask really depends on the seed (and p): a different seed gives another mask
    assert not torch.equal(mask, keep_mask(seed + 1, n, d, p))


# ---------------------------------------------------------------------------------------------------------------
# the deterministic-mode switch of the Triton backend


@pytest.mark.skipif(AVAILABLE["triton"] is not None, reason=f"triton: {AVAILABLE['triton']}")
@pytest.mark.parametrize("how", ["env", "torch"])
def test_triton_deterministic_mode_bypasses_the_autotuner(how, monkeypatch, ilora_env):
    from ilora_kernels.ops import triton_ilora

    class Tuner:     # stands in for the autotuned kernel (on a GPU): records that it was used
        calls = 0

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                Tuner.calls += 1
                raise RuntimeError("autotuned kernel launched")
            return launch

    monkeypatch.setattr(triton_ilora, "_base_expand_tuned", Tuner())
    ilora_env(ILORA_TRITON_BASE_GEMM="fused", ILORA_DETERMINISTIC=None)
    tensors = [t.to(_device("triton")) for t in _problem(torch.float32, n=9, d_in=16, d_out=8, r=4, k=2)]
    with pytest.raises(RuntimeError, match="autotuned kernel launched"):
        functional.ilora_linear(*tensors, 1.0, backend="triton")
    if how == "env":
        ilora_env(ILORA_DETERMINISTIC="1")
        assert triton_ilora.deterministic_mode()
        y = functional.ilora_linear(*tensors, 1.0, backend="triton")
    else:
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            assert triton_ilora.deterministic_mode()
            y = functional.ilora_linear(*tensors, 1.0, backend="triton")
        finally:
            torch.use_deterministic_algorithms(previous)
    assert Tuner.calls == 1
    y_ref = functional.ilora_linear(*tensors, 1.0, backend="reference")
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
