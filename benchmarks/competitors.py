"""The competitors of the I-LoRA layer benchmarks, all built on the same inputs.

* ``base``       the frozen base linear alone (``F.linear``); its backward computes dx only.
* ``crab-loop``  the Crab+ / HydraLoRA module as it computes I-LoRA (SPEC section 1): router ``nn.Linear`` + float32
                 softmax cast back to the activation dtype, then per head ``g_k * B_k(A(dropout(x))) * scaling`` summed
                 in a Python loop with plain autograd (A is re-applied inside the loop, and K full-size (N, d_out)
                 temporaries are kept for backward).
* ``peft``       PEFT's own LoRA layer (the real ``peft`` package), K = 1, same rank, same base weight, lora_B random.
* ours           ``ilora_kernels.ILoRALinear(..., backend=name)`` (the drop-in module, its own parameter layout,
                 adapters in the activation dtype) for every backend of the registry, and "triton" twice more:
                 ``triton-fused`` / ``triton-cublas`` (the ``ILORA_TRITON_BASE_GEMM`` setting).

Every trainable parameter is random (never zero), x requires grad (dx is computed), the base weight is frozen.
Gradients are taken with ``torch.autograd.grad`` (no ``.grad`` accumulation kernels in the timings).
A case's ``dropout`` is applied by every competitor but the base layer (training mode); a ``decode`` case is a
forward without autograd (``Runner.infer``), dropout off.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ilora_kernels import settings
from ilora_kernels.ops.registry import BACKEND_TABLE, BACKENDS, resolve_backend

# ---------------------------------------------------------------------------------------------------------------
# cases and FLOP accounting


@dataclass(frozen=True)
class Case:
    """One layer shape: ``shape`` names it (e.g. "qwen.gate_proj"), ``n`` is the token count."""

    shape: str
    d_in: int
    d_out: int
    n: int
    r: int
    k: int
    alpha: Optional[float] = None  # None: alpha = 2 r (scaling 2, the Crab+ recipe's 256 / 128)
    dropout: float = 0.0  # applied in training mode by every competitor with an adapter
    decode: bool = False  # forward only, no autograd (inference), dropout off

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else 2.0 * self.r) / self.r

    @property
    def mode(self) -> str:
        return "decode" if self.decode else "train"

    @property
    def label(self) -> str:
        extra = (" decode" if self.decode else "") + (f" p={self.dropout:g}" if self.dropout else "")
        return f"{self.shape} {self.d_in}->{self.d_out} N={self.n} r={self.r} K={self.k}{extra}"


def base_flops(n: int, d_in: int, d_out: int) -> Tuple[float, float]:
    """(forward, backward) FLOPs of the frozen base linear: one GEMM each (the backward computes dx only)."""
    g = 2.0 * n * d_in * d_out
    return g, g


def adapter_flops(n: int, d_in: int, d_out: int, r: int, k: int, router: bool = True) -> Tuple[float, float]:
    """(forward, backward) FLOPs of the routed adapter (SPEC section 1).

    forward  = 2 N d_in (K + r) + 2 N K r d_out         (shrink against [W_r; A], expand with inner dim K r)
    backward = 2 * 2 N d_out K r + 2 * 2 N d_in (K + r)  (V = dy B_cat and dB; dW_r, dA and the dx terms)
    With ``router=False`` and k = 1 this is plain LoRA (PEFT): no router columns.
    """
    shrink = r + (k if router else 0)
    fwd = 2.0 * n * d_in * shrink + 2.0 * n * k * r * d_out
    bwd = 2.0 * 2.0 * n * d_out * k * r + 2.0 * 2.0 * n * d_in * shrink
    return fwd, bwd


def floor_ratios(case: Case) -> Dict[str, float]:
    """The FLOP floor (base + adapter) / base of the I-LoRA layer, for fwd, bwd and fwd+bwd."""
    bf, bb = base_flops(case.n, case.d_in, case.d_out)
    af, ab = adapter_flops(case.n, case.d_in, case.d_out, case.r, case.k)
    return {"fwd": (bf + af) / bf, "bwd": (bb + ab) / bb, "fwdbwd": (bf + bb + af + ab) / (bf + bb)}


def decode_byte_floor(case: Case) -> float:
    """Bytes a decode step must read, over the frozen base layer's: (W0 + [W_r; A] + B_cat) / W0 (weights dominate
    at N <= 16)."""
    base = case.d_out * case.d_in
    return (base + (case.k + case.r) * case.d_in + case.k * case.r * case.d_out) / base


def useful_flops(case: Case, competitor: str) -> Tuple[float, float]:
    """(forward, backward) FLOPs of the math a competitor computes (not what it executes: the Crab loop's
    repeated shrink is not counted). base: the base layer; peft: base + LoRA K=1; others: base + I-LoRA."""
    bf, bb = base_flops(case.n, case.d_in, case.d_out)
    if competitor == "base":
        return bf, bb
    if competitor == "peft":
        af, ab = adapter_flops(case.n, case.d_in, case.d_out, case.r, 1, router=False)
    else:
        af, ab = adapter_flops(case.n, case.d_in, case.d_out, case.r, case.k)
    return bf + af, bb + ab


# ---------------------------------------------------------------------------------------------------------------
# inputs


@dataclass
class Inputs:
    x: Tensor  # (N, d_in), requires grad
    weight: Tensor  # (d_out, d_in), frozen
    bias: Optional[Tensor]
    router_weight: Tensor  # (K, d_in)
    lora_a: Tensor  # (r, d_in)
    lora_b: Tensor  # (K, d_out, r)
    dy: Tensor  # (N, d_out)
    scaling: float

    def nbytes(self) -> int:
        ts = [self.x, self.weight, self.router_weight, self.lora_a, self.lora_b, self.dy]
        return sum(t.numel() * t.element_size() for t in ts)


def make_inputs(case: Case, device, dtype: torch.dtype, seed: int = 0, bias: bool = False) -> Inputs:
    """Random inputs (generated on the device): nothing trainable is zero, so no competitor takes a zero shortcut."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0, grad=True):
        t = torch.randn(*shape, device=device, dtype=dtype, generator=gen)
        if scale != 1.0:
            t.mul_(scale)
        return t.requires_grad_(grad)

    s_in = 1.0 / math.sqrt(case.d_in)
    return Inputs(
        x=randn(case.n, case.d_in),
        weight=randn(case.d_out, case.d_in, scale=s_in, grad=False),
        bias=randn(case.d_out, scale=0.1, grad=False) if bias else None,
        router_weight=randn(case.k, case.d_in, scale=s_in),
        lora_a=randn(case.r, case.d_in, scale=s_in),
        lora_b=randn(case.k, case.d_out, case.r, scale=0.1 / math.sqrt(case.r)),
        dy=randn(case.n, case.d_out, grad=False),
        scaling=case.scaling,
    )


# ---------------------------------------------------------------------------------------------------------------
# the Crab+ reference loop as a module (also used by the training-step benchmark)


class CrabLoopLinear(nn.Module):
    """I-LoRA the way the Crab+ (HydraLoRA-style) module computes it: plain torch ops and autograd.

        g = softmax(lora_route(x), float32).to(x.dtype)
        y = base(x) + sum_k g[..., k] * lora_B{k}(lora_A(dropout(x))) * scaling      (Python loop over heads)
    """

    def __init__(self, base_linear: nn.Linear, r: int, num_heads: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_linear
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        d_in, d_out = base_linear.in_features, base_linear.out_features
        factory = {"device": base_linear.weight.device, "dtype": base_linear.weight.dtype}
        self.lora_num, self.r, self.scaling = num_heads, r, alpha / r
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.lora_route = nn.Linear(d_in, num_heads, bias=False, **factory)
        self.lora_A = nn.Linear(d_in, r, bias=False, **factory)
        for i in range(num_heads):
            setattr(self, f"lora_B{i}", nn.Linear(r, d_out, bias=False, **factory))
        nn.init.kaiming_uniform_(self.lora_route.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        for i in range(num_heads):  # random, not the zeros of a fresh adapter: no zero shortcut in benchmarks
            nn.init.normal_(getattr(self, f"lora_B{i}").weight, std=0.1 / math.sqrt(r))

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        route_weight = F.softmax(self.lora_route(x), dim=-1, dtype=torch.float32).to(result.dtype)
        for i in range(self.lora_num):
            result = result + torch.unsqueeze(route_weight[..., i], -1) * getattr(self, f"lora_B{i}")(
                self.lora_A(self.lora_dropout(x))) * self.scaling
        return result


def apply_crab_loop(model: nn.Module, targets: Sequence[str], r: int, num_heads: int, alpha: float,
                    dropout: float = 0.0) -> nn.Module:
    """Replaces every nn.Linear whose name matches a target (exactly or as a ".suffix") by a CrabLoopLinear, freezes
    everything else; returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    matches = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n
               and any(n == t or n.endswith("." + t) for t in targets)]
    if not matches:
        raise ValueError(f"apply_crab_loop: no nn.Linear matches {list(targets)}")
    for name, linear in matches:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, CrabLoopLinear(linear, r, num_heads, alpha, dropout))
    return model


def _shared_linear(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    """An nn.Linear that shares (never copies) ``weight``/``bias``, frozen."""
    d_out, d_in = weight.shape
    lin = nn.Linear(d_in, d_out, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return lin


# ---------------------------------------------------------------------------------------------------------------
# competitors


class Unavailable(Exception):
    """The competitor cannot run here; the message says why."""


@dataclass
class Runner:
    """A prepared competitor: ``fwd()`` returns y; gradients are taken w.r.t. ``grad_inputs`` (x first)."""

    fwd: Callable[[], Tensor]
    grad_inputs: List[Tensor]
    params: List[Tensor]  # persistent tensors (weights, adapters): excluded from saved-for-backward bytes
    dy: Tensor
    note: str = ""
    keep: list = field(default_factory=list)  # objects that must stay alive (modules)

    def bwd(self, y: Tensor):
        return torch.autograd.grad(y, self.grad_inputs, self.dy, retain_graph=True)

    def fwdbwd(self):
        y = self.fwd()
        return torch.autograd.grad(y, self.grad_inputs, self.dy)

    def infer(self) -> Tensor:
        """The decode measure: forward without autograd."""
        with torch.no_grad():
            return self.fwd()


def _base(inp: Inputs, case: Case) -> Runner:
    x, w, b = inp.x, inp.weight, inp.bias
    return Runner(fwd=lambda: F.linear(x, w, b), grad_inputs=[x], params=[w] + ([b] if b is not None else []),
                  dy=inp.dy)


def _crab(inp: Inputs, case: Case) -> Runner:
    mod = CrabLoopLinear(_shared_linear(inp.weight, inp.bias), case.r, case.k, case.scaling * case.r,
                         dropout=0.0 if case.decode else case.dropout)
    mod.train(not case.decode)
    with torch.no_grad():  # the same values as every other competitor
        mod.lora_route.weight.copy_(inp.router_weight)
        mod.lora_A.weight.copy_(inp.lora_a)
        for i in range(case.k):
            getattr(mod, f"lora_B{i}").weight.copy_(inp.lora_b[i])
    trainable = [p for p in mod.parameters() if p.requires_grad]
    x = inp.x
    return Runner(fwd=lambda: mod(x), grad_inputs=[x] + trainable, params=list(mod.parameters()), dy=inp.dy,
                  keep=[mod])


class _OneLinear(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.proj = lin

    def forward(self, x):
        return self.proj(x)


def _peft(inp: Inputs, case: Case) -> Runner:
    try:
        import peft
    except ImportError as exc:
        raise Unavailable(f"peft is not installed ({exc})") from None
    cfg = peft.LoraConfig(r=case.r, lora_alpha=case.scaling * case.r, target_modules=["proj"],
                          lora_dropout=0.0 if case.decode else case.dropout)
    # autocast_adapter_dtype=False: keep the adapter in the activation dtype like every other competitor
    model = peft.get_peft_model(_OneLinear(_shared_linear(inp.weight, inp.bias)), cfg, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj  # peft.tuners.lora.Linear: what replaces the nn.Linear in a real model
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    model.train(not case.decode)
    with torch.no_grad():
        lora_a.copy_(inp.lora_a)
        lora_b.copy_(inp.lora_b[0])  # random: PEFT's zero init would be a shortcut
    if abs(layer.scaling["default"] - case.scaling) > 1e-9:
        raise RuntimeError(f"peft scaling {layer.scaling['default']} != {case.scaling}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    x = inp.x
    return Runner(fwd=lambda: layer(x), grad_inputs=[x] + trainable, params=list(model.parameters()), dy=inp.dy,
                  note=f"peft {peft.__version__}, K=1", keep=[model])


BACKEND_ROWS = {row.name: row for row in BACKEND_TABLE}
# every backend of the registry under its own name, and the Triton backend once per base-GEMM mode
_OURS = {**{name: (name, None) for name in BACKENDS}, "triton-fused": ("triton", "fused"),
         "triton-cublas": ("triton", "cublas")}


# the dry run of the GPU suite sets this (with TRITON_INTERPRET=1) to time the Triton backend on CPU stand-ins
ALLOW_INTERPRETED_TRITON = False


def _ours(name: str):
    backend, base_gemm = _OURS[name]

    def build(inp: Inputs, case: Case) -> Runner:
        import ilora_kernels as ik

        try:   # availability, dtype and device, with the registry's reason
            resolve_backend(backend, inp.x)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise Unavailable(str(exc)) from None
        meant_for = BACKEND_ROWS[backend].auto_on    # e.g. no Triton interpreter runs in a benchmark
        interpreted = backend == "triton" and ALLOW_INTERPRETED_TRITON
        if meant_for is not None and inp.x.device.type not in meant_for and not interpreted:
            raise Unavailable(f"backend {backend!r} is benchmarked on {' or '.join(meant_for)} tensors; this suite "
                              f"runs on {inp.x.device.type}")
        p = 0.0 if case.decode else case.dropout
        # the drop-in module, as a model uses it (its own parameter layout), adapters in the activation dtype like
        # every other competitor's
        layer = ik.ILoRALinear(_shared_linear(inp.weight, inp.bias), r=case.r, num_heads=case.k,
                               alpha=case.scaling * case.r, dropout=p, backend=backend, autocast_adapter_dtype=False)
        layer.train(not case.decode)
        with torch.no_grad():  # the same values as every other competitor
            layer.router_weight.copy_(inp.router_weight)
            layer.lora_a.copy_(inp.lora_a)
            layer.lora_b.copy_(inp.lora_b)
        x = inp.x
        if base_gemm is None:
            def fwd():
                return layer(x)
        else:
            def fwd():
                with settings.override(triton_base_gemm=base_gemm):   # read by the Triton backend at call time
                    return layer(x)

        trainable = [layer.router_weight, layer.lora_a, layer.lora_b]
        return Runner(fwd=fwd, grad_inputs=[x] + trainable, params=list(layer.parameters()), dy=inp.dy,
                      note=f"ILORA_TRITON_BASE_GEMM={base_gemm}" if base_gemm else "", keep=[layer])

    return build


BUILDERS: Dict[str, Callable[[Inputs, Case], Runner]] = {
    "base": _base, "crab-loop": _crab, "peft": _peft,
    **{name: _ours(name) for name in _OURS},
}

CPU_COMPETITORS = ("base", "crab-loop", "peft", "reference", "cpu")
# the GPU suite: what a user can pick (``triton`` in its default base-GEMM mode); triton-fused / -cublas on request
GPU_COMPETITORS = ("base", "peft", "crab-loop", "reference", "triton", "cuda")
OURS = tuple(_OURS)


def build(name: str, inp: Inputs, case: Case) -> Runner:
    """Builds competitor ``name`` on ``inp``; raises Unavailable (with the reason) when it cannot run here."""
    if name not in BUILDERS:
        raise KeyError(f"unknown competitor {name!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[name](inp, case)


# ---------------------------------------------------------------------------------------------------------------
# memory: bytes saved for backward


@contextlib.contextmanager
def count_saved_bytes(exclude: Iterable[Tensor] = ()):
    """Sums the bytes of the tensors autograd saves for backward inside the block, counting each storage once and
    skipping the storages of ``exclude`` (parameters such as the frozen weight, which are alive anyway).
    Yields a one-element list whose item is the running total."""
    excluded = set()
    for t in exclude:
        if t is not None:
            excluded.add(t.untyped_storage().data_ptr())
    seen = set()
    total = [0]

    def pack(t):
        try:
            st = t.untyped_storage()
        except Exception:  # tensors without storage (none here): not counted
            return t
        ptr = st.data_ptr()
        if ptr not in excluded and ptr not in seen:
            seen.add(ptr)
            total[0] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def saved_budget_bytes(case: Case, dtype: torch.dtype) -> int:
    """SPEC target: saved bytes of the fused layer <= those of the frozen base linear (0 once parameters are
    excluded) plus x, h (N x r) and g (N x K, float32)."""
    e = torch.empty((), dtype=dtype).element_size()
    g_bytes = 8 if dtype == torch.float64 else 4  # g is float32 (float64 for float64 activations)
    return case.n * case.d_in * e + case.n * case.r * e + case.n * case.k * g_bytes
