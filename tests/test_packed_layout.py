"""The packed adapter layout (ilora_kernels/ops/layout.py): ILoRALinear stores router_weight and lora_a in one
(K + r, d_in) buffer and lora_b as a view of a (d_out, K, r) buffer, so that no kernel copies a weight per call.

Checked here: the module's layout, that it survives what users do to modules (``.to()``, ``load_state_dict``,
``deepcopy``, ``torch.save``), that public shapes and state-dict keys are unchanged, that optimizers see ordinary
parameters; that the raw ops of the reference and CPU backends are exact on packed and on separate tensors; and,
with the profiler, that one forward + backward makes no copy of a weight-sized tensor (only the casts that mixed
precision needs), including none in autograd's gradient accumulation.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import ilora_kernels as ik
from fused_op_checks import check_packed_layout, packed
from ilora_float64 import make_inputs
from ilora_kernels.ops.layout import concat_heads, heads_packed, repack_, shrink_concat, shrink_packed

D_IN, D_OUT, K, R = 48, 80, 3, 8


def layer(dtype=torch.float32, backend="cpu", dropout=0.0, **kw):
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT).to(dtype)
    mod = ik.ILoRALinear(base, r=R, num_heads=K, alpha=16, dropout=dropout, backend=backend, **kw)
    with torch.no_grad():
        mod.lora_b.normal_()
    return mod


def is_packed(mod) -> bool:
    return shrink_packed(mod.router_weight, mod.lora_a) and heads_packed(mod.lora_b)


def test_module_layout_and_public_shapes():
    mod = layer()
    assert is_packed(mod)
    assert mod.router_weight.shape == (K, D_IN) and mod.lora_a.shape == (R, D_IN) and mod.lora_b.shape == (K, D_OUT, R)
    assert all(type(p) is nn.Parameter and p.is_leaf for p in (mod.router_weight, mod.lora_a, mod.lora_b))
    assert shrink_concat(mod.router_weight, mod.lora_a).data_ptr() == mod.router_weight.data_ptr()
    assert concat_heads(mod.lora_b).data_ptr() == mod.lora_b.data_ptr()
    assert sorted(mod.state_dict()) == ["base_layer.bias", "base_layer.weight", "lora_a", "lora_b", "router_weight"]
    assert [n for n, p in mod.named_parameters() if p.requires_grad] == ["router_weight", "lora_a", "lora_b"]


def test_layout_survives_module_operations(tmp_path):
    mod = layer()
    params = (mod.router_weight, mod.lora_a, mod.lora_b)
    mod.double()
    assert is_packed(mod) and all(a is b for a, b in zip(params, (mod.router_weight, mod.lora_a, mod.lora_b)))
    state = {k: v.clone().contiguous() for k, v in mod.state_dict().items()}
    fresh = layer().double()
    fresh.load_state_dict(state)
    assert is_packed(fresh) and torch.equal(fresh.lora_b, mod.lora_b)
    fresh.load_state_dict(state, assign=True)        # the loaded (separate, contiguous) tensors become parameters
    assert is_packed(fresh) and torch.equal(fresh.lora_a, mod.lora_a) and torch.equal(fresh.lora_b, mod.lora_b)
    assert is_packed(copy.deepcopy(mod))
    buf = io.BytesIO()
    torch.save(mod, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert is_packed(loaded) and torch.equal(loaded.router_weight, mod.router_weight)


def test_repack_leaves_foreign_buffers_alone():
    flat = torch.randn(1000)        # e.g. an FSDP / DeepSpeed flat parameter: views of it must stay views of it
    router = nn.Parameter(flat[:K * D_IN].view(K, D_IN))
    lora_a = nn.Parameter(flat[500:500 + R * D_IN].view(R, D_IN))
    lora_b = nn.Parameter(torch.randn(K, D_OUT, R))
    assert repack_(router, lora_a, lora_b)           # lora_b owns its storage: repacked
    assert heads_packed(lora_b) and not shrink_packed(router, lora_a)
    assert router.data_ptr() == flat.data_ptr()
    assert not repack_(router, lora_a, lora_b)


def test_optimizer_steps_on_packed_parameters():
    mod = layer(backend="cpu")
    opt = torch.optim.AdamW([p for p in mod.parameters() if p.requires_grad], lr=1e-2, foreach=True)
    x = torch.randn(5, D_IN)
    before = [p.detach().clone() for p in (mod.router_weight, mod.lora_a, mod.lora_b)]
    for _ in range(2):
        opt.zero_grad()
        mod(x).square().mean().backward()
        assert mod.lora_b.grad.stride() == mod.lora_b.stride()
        opt.step()
    assert is_packed(mod)
    assert all(not torch.equal(a, p) for a, p in zip(before, (mod.router_weight, mod.lora_a, mod.lora_b)))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("n", [3, 33], ids=["few_tokens", "many_tokens"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_raw_ops_on_packed_tensors(backend, p, n, dtype):
    name = "fused" if backend == "cpu" else backend
    ops = torch.ops.ilora_kernels
    ik.available_backends()
    check_packed_layout(getattr(ops, f"{name}_forward"), getattr(ops, f"{name}_backward"), dtype, p, n)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_packed_and_separate_tensors_agree_through_autograd(backend):
    x, weight, b, router, lora_a, lora_b, dy = make_inputs(9, D_IN, D_OUT, K, R, "random", torch.float64, seed=3,
                                                           with_dy=True)
    results = []
    for adapter in ((router, lora_a, lora_b), packed(router, lora_a, lora_b)):
        leaves = [t.detach().clone().requires_grad_() for t in (x,)] + [
            t.detach().requires_grad_() if t.is_contiguous() or heads_packed(t) else t for t in adapter]
        if adapter[0].data_ptr() != router.data_ptr():   # keep the packed tensors' layout: leaves of their views
            shrink = torch.cat((adapter[0], adapter[1])).requires_grad_()
            leaves[1:3] = [shrink[:K], shrink[K:]]
            leaves[3] = adapter[2].detach().requires_grad_()
        y = ik.ilora_linear(leaves[0], weight, b, *leaves[1:], 2.0, backend=backend)
        grads = torch.autograd.grad(y, [leaves[0], leaves[1], leaves[2], leaves[3]], dy)
        results.append((y, *grads))
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# no per-call copies of weights

COPY_OPS = {"aten::cat", "aten::clone", "aten::copy_", "aten::_to_copy", "aten::contiguous"}


def _flat_shapes(shapes):
    for s in shapes:
        if s and isinstance(s[0], (list, tuple)):
            yield from _flat_shapes(s)
        elif s:
            yield tuple(s)


def weight_copies(mod, x, train: bool):
    """(op name, input shape) of every copy-like ATen op over a weight-shaped tensor in one forward (+ backward)."""
    weight_shapes = {(D_OUT, D_IN), (K, D_OUT, R), (D_OUT, K, R), (D_OUT, K * R), (K + R, D_IN), (K, D_IN), (R, D_IN),
                     (D_OUT, R)}
    mod.train(train)
    mod(x)      # warm-up: one-time work (backend import, validation cache) is not per call
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        if train:
            mod(x).square().sum().backward()
        else:
            with torch.no_grad():
                mod(x)
    copies = []
    for e in prof.events():
        if e.name in COPY_OPS and (e.cpu_parent is None or e.cpu_parent.name not in COPY_OPS):
            # the profiler records no shapes for a tensor list: every cat counts
            shapes = ["list"] if e.name == "aten::cat" else [s for s in _flat_shapes(e.input_shapes)
                                                            if s in weight_shapes]
            if shapes:
                copies.append((e.name, shapes[0]))
    return sorted(copies, key=str)


# the C++ backend's one remaining copy: the ONE GEMM [dW_r; dA] = [dz | dh]^T x is split into the op's two separate
# gradient outputs (clones of (K, d_in) and (r, d_in): outputs of a custom op may not alias each other)
GRAD_SPLIT = [("aten::clone", (K, D_IN)), ("aten::clone", (R, D_IN))]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("n", [5, 40], ids=["few_tokens", "many_tokens"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("train", [True, False], ids=["fwd_bwd", "no_grad"])
def test_no_weight_copies_per_call(backend, n, dropout, train):
    mod = layer(backend=backend, dropout=dropout)
    copies = weight_copies(mod, torch.randn(n, D_IN), train)
    expected = GRAD_SPLIT if (backend == "cpu" and train and dropout == 0.0) else []
    assert copies == expected


def test_separate_tensors_do_copy():
    """The check above can fail: the same layer with its adapter unpacked copies B_cat and [W_r; A]."""
    mod = layer(backend="cpu")
    with torch.no_grad():
        for name in ("router_weight", "lora_a", "lora_b"):
            getattr(mod, name).data = getattr(mod, name).detach().clone(memory_format=torch.contiguous_format)
    assert not is_packed(mod)
    copies = weight_copies(mod, torch.randn(40, D_IN), True)
    assert ("aten::cat", "list") in copies and any(s == (D_OUT, K, R) or s == (K, D_OUT, R) for _, s in copies)


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_precision_casts_each_buffer_once(base_dtype):
    mod = layer(dtype=base_dtype, backend="cpu")
    assert mod.lora_a.dtype == torch.float32 and is_packed(mod)
    copies = weight_copies(mod, torch.randn(40, D_IN, dtype=base_dtype), False)
    assert copies == sorted([("aten::_to_copy", (K + R, D_IN)), ("aten::_to_copy", (K, D_OUT, R))], key=str), copies


# ---------------------------------------------------------------------------------------------------------------
# PEFT's I-LoRA layers: lora_route and lora_A packed; the heads stay separate contiguous parameters

def _peft_layer(tmp_path=None, low_cpu_mem_usage=False):
    peft = pytest.importorskip("peft")
    from ilora_kernels import peft_integration as pi

    torch.manual_seed(0)
    config = pi.ILoRAPeftConfig(r=R, lora_alpha=16, ilora_num_heads=K, target_modules=["0"], lora_dropout=0.0,
                                init_lora_weights=False, ilora_backend="cpu")
    model = peft.get_peft_model(nn.Sequential(nn.Linear(D_IN, D_OUT)), config)
    if tmp_path is not None:
        model.save_pretrained(tmp_path)
        model = peft.PeftModel.from_pretrained(nn.Sequential(nn.Linear(D_IN, D_OUT)), tmp_path,
                                               low_cpu_mem_usage=low_cpu_mem_usage, is_trainable=True)
    layer = next(m for m in model.modules() if isinstance(m, pi.ILoRAPeftLinear))
    return model, layer


@pytest.mark.parametrize("reload", [None, False, True], ids=["fresh", "from_pretrained", "low_cpu_mem_usage"])
def test_peft_layer_packs_route_and_a(reload, tmp_path):
    model, layer = _peft_layer(None if reload is None else tmp_path, bool(reload))
    assert shrink_packed(layer.lora_route["default"].weight, layer.lora_A["default"].weight)
    assert all(h.is_contiguous() for h in layer._heads("default"))
    model.to(torch.float64)
    assert shrink_packed(layer.lora_route["default"].weight, layer.lora_A["default"].weight)


def test_peft_layer_copies_only_the_heads():
    """No [W_r; A] concatenation; the heads cost what unpacked heads cost: the stack, B_cat in the forward and in
    the backward, and the permute of d_lora_b."""
    _, layer = _peft_layer()
    copies = weight_copies(layer, torch.randn(40, D_IN), True)
    heads = [("aten::cat", "list"), ("aten::clone", (D_OUT, K, R)), ("aten::clone", (D_OUT, K, R)),
             ("aten::contiguous", (K, D_OUT, R))]
    assert copies == sorted(GRAD_SPLIT + heads, key=str), copies


# ---------------------------------------------------------------------------------------------------------------
# distributed engines


def test_set_packed_heads_makes_lora_b_contiguous_and_back():
    from ilora_kernels.patching import set_packed_heads

    model = nn.Sequential(layer())
    values = model[0].lora_b.detach().clone()
    assert set_packed_heads(model, False) == ["0"]
    assert model[0].lora_b.is_contiguous() and torch.equal(model[0].lora_b, values)
    model.double()                                   # stays contiguous through Module.to
    assert model[0].lora_b.is_contiguous() and shrink_packed(model[0].router_weight, model[0].lora_a)
    x = torch.randn(6, D_IN, dtype=torch.float64)
    model(x).sum().backward()
    assert model[0].lora_b.grad.is_contiguous()
    set_packed_heads(model, True)
    assert heads_packed(model[0].lora_b) and torch.equal(model[0].lora_b, values.double())


def test_a_strided_lora_b_inside_a_flat_buffer_warns_once():
    """What FSDP1 with use_orig_params=True leaves (a strided view into its flat parameter) gets a warning."""
    mod = layer()
    flat = torch.zeros(2 * K * D_OUT * R)
    view = flat[:K * D_OUT * R].view(D_OUT, K, R).permute(1, 0, 2)
    view.copy_(mod.lora_b.detach())
    mod.lora_b.data = view
    with pytest.warns(RuntimeWarning, match="set_packed_heads"):
        mod(torch.randn(3, D_IN))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mod(torch.randn(3, D_IN))
        layer()(torch.randn(3, D_IN))                # an ordinary packed layer does not warn


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck_on_packed_tensors(backend):
    """The fake kernels give d_lora_b the packed strides the real ones return (torch.compile relies on it)."""
    name = "fused" if backend == "cpu" else backend
    ik.available_backends()
    forward, backward = (getattr(torch.ops.ilora_kernels, f"{name}_{part}") for part in ("forward", "backward"))
    x, weight, b, router, lora_a, lora_b, dy = make_inputs(7, 17, 19, 3, 4, "random", torch.float32, seed=0,
                                                           with_dy=True)
    router, lora_a, lora_b = packed(router, lora_a, lora_b)
    torch.library.opcheck(forward.default, (x, weight, b, router, lora_a, lora_b, 2.0, 0.0, 11, 0))
    _, h, g = forward(x, weight, b, router, lora_a, lora_b, 2.0, 0.0, 11, 0)
    for mask in ([True] * 4, [False, False, False, True]):
        torch.library.opcheck(backward.default, (dy, x, weight, router, lora_a, lora_b, h, g, 2.0, 0.0, 11, mask))
        fake_mode = torch._subclasses.fake_tensor.FakeTensorMode()
        with fake_mode:
            fakes = [fake_mode.from_tensor(t) for t in (dy, x, weight, router, lora_a, lora_b, h, g)]
            fake_db = backward(*fakes, 2.0, 0.0, 11, mask)[3]
        assert fake_db.stride() == lora_b.stride() == backward(dy, x, weight, router, lora_a, lora_b, h, g, 2.0, 0.0,
                                                                 11, mask)[3].stride()


_FSDP1_SCRIPT = r"""
import os, socket, sys, warnings
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
import ilora_kernels as ik
from ilora_kernels.patching import set_packed_heads
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo", rank=0, world_size=1)
for packed in (True, False):
    model = nn.Sequential(nn.Linear(8, 6))
    model[0] = ik.ILoRALinear(model[0], r=2, num_heads=3, alpha=4, dropout=0.0, backend="cpu")
    set_packed_heads(model, packed)
    wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped(torch.randn(5, 8)).sum().backward()
    print(f"packed={packed} warned={any('set_packed_heads' in str(w.message) for w in caught)}")
dist.destroy_process_group()
"""


def test_fsdp1_with_a_strided_lora_b_warns_and_set_packed_heads_silences_it():
    import subprocess
    import sys

    pytest.importorskip("torch.distributed.fsdp")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = subprocess.run([sys.executable, "-c", _FSDP1_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "packed=True warned=True" in out.stdout and "packed=False warned=False" in out.stdout, out.stdout
