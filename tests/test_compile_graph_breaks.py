"""torch.compile without graph breaks inside I-LoRA layers (training with dropout included), dropout
reproducibility under compile, dynamic decode sizes, and CUDA-graph capture of the inference path."""

import pytest
import torch
import torch._dynamo.testing

import ilora_kernels as ik
from ilora_kernels import settings
from ilora_kernels.ops import registry
from tiny_models import pattern_batch, tiny_llama

CPU_BACKENDS = [b for b in ("reference", "cpu") if ik.available_backends()[b] is None]


def _ilora_breaks(explanation):
    """Graph breaks whose user stack passes through ilora_kernels."""
    return [r for r in explanation.break_reasons
            if any("ilora_kernels" in str(frame.filename) for frame in (r.user_stack or []))]


def _layer(dropout, backend="auto", d_in=16, d_out=12):
    layer = ik.ILoRALinear(torch.nn.Linear(d_in, d_out), r=4, num_heads=3, alpha=8, dropout=dropout, backend=backend)
    with torch.no_grad():
        layer.lora_b.normal_(std=0.2)
    return layer


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["eval", "train", "train-dropout"])
def test_layer_has_no_graph_break(backend, mode):
    torch._dynamo.reset()
    layer = _layer(0.1 if mode == "train-dropout" else 0.0, backend)
    layer.train(mode != "eval")
    x = torch.randn(5, 7, 16, requires_grad=mode != "eval")
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_patched_tiny_model_has_no_graph_break_in_ilora_layers(train):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_llama()
    ik.apply_ilora(model, ik.ILoRAConfig(r=4, num_heads=3, alpha=8, dropout=0.1))
    model.train(train)
    ids = pattern_batch(model.config.vocab_size)
    with torch.set_grad_enabled(train):
        explanation = torch._dynamo.explain(model)(ids, labels=ids)
    assert not _ilora_breaks(explanation), _ilora_breaks(explanation)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_explain_before_any_eager_call_has_no_break():
    """The first trace may have to import the compiled extension: that happens at trace time, not in the graph."""
    torch._dynamo.reset()
    registry._resolved.clear()

    def f(x, w, wr, a, b):
        return ik.ilora_linear(x, w, None, wr, a, b, 2.0, dropout_p=0.2, training=True)

    args = [torch.randn(3, 8, requires_grad=True), torch.randn(6, 8), torch.randn(2, 8, requires_grad=True),
            torch.randn(4, 8, requires_grad=True), torch.randn(2, 6, 4, requires_grad=True)]
    explanation = torch._dynamo.explain(f)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_training_with_dropout_matches_eager_bitwise(backend):
    """Same torch.manual_seed -> same dropout seed -> same loss and gradients, eager and compiled (fullgraph)."""
    torch._dynamo.reset()
    layer = _layer(0.3, backend)
    layer.train()
    x = torch.randn(2, 9, 16)

    def step(fn):
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        loss = fn(x).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in (layer.router_weight, layer.lora_a, layer.lora_b)]

    eager_loss, eager_grads = step(layer)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    loss, grads = step(compiled)
    torch.testing.assert_close(loss, eager_loss, rtol=0, atol=0)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    # a second step draws a fresh seed: the mask changes, and stays reproducible
    torch.manual_seed(124)
    other = compiled(x)
    torch.manual_seed(124)
    torch.testing.assert_close(compiled(x), other, rtol=0, atol=0)


def test_dropout_seed_comes_from_torch_generator_in_compiled_graph():
    torch._dynamo.reset()
    layer = _layer(0.5)
    layer.train()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 16)
    torch.manual_seed(7)
    a = compiled(x)
    b = compiled(x)  # the generator advanced: a different mask
    torch.manual_seed(7)
    a2 = compiled(x)
    torch.testing.assert_close(a, a2, rtol=0, atol=0)
    assert not torch.equal(a, b)


def test_decode_sizes_compile_once_with_dynamic_shapes():
    """Decode sizes 2..16 share one dynamic graph (1 token is torch's usual 0/1 specialisation: one more)."""
    torch._dynamo.reset()
    layer = _layer(0.0).eval()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, dynamic=True, fullgraph=True)
    counts = []
    with torch.no_grad():
        for n in (2, 3, 5, 8, 16, 1, 4):
            x = torch.randn(1, n, 16)
            torch.testing.assert_close(compiled(x), layer(x))
            counts.append(counter.frame_count)
    assert len(set(counts[:5])) == 1, counts
    assert counts[-1] <= counts[0] + 1, counts


def test_inference_path_traces_symbolically_without_syncs():
    """No .item(), no data-dependent shape: make_fx with symbolic shapes traces the whole functional path."""
    from torch.fx.experimental.proxy_tensor import make_fx

    layer = _layer(0.1).eval()
    params = [t.detach() for t in (layer.base_layer.weight, layer.base_layer.bias, layer.router_weight, layer.lora_a,
                                   layer.lora_b)]

    def f(x, w, b, wr, a, lb):
        return ik.ilora_linear(x, w, b, wr, a, lb, layer.scaling, dropout_p=0.1, training=False)

    with torch.no_grad():
        gm = make_fx(f, tracing_mode="symbolic")(torch.randn(3, 5, 16), *params)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not any(t.startswith(("aten._local_scalar_dense", "aten.randint", "aten.nonzero", "aten.item"))
                   for t in targets), targets
    assert any("forward" in t for t in targets), targets


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_inference_path_is_cuda_graph_capturable(backend):
    torch.manual_seed(0)
    layer = _layer(0.1, backend, d_in=64, d_out=48).cuda().to(torch.bfloat16).eval()
    static_x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up (autotune, lazy loads) outside the capture
                layer(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        for _ in range(2):
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            torch.testing.assert_close(static_y, layer(static_x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_seeded_ops_pass_opcheck_and_match_the_backend_op(backend):
    ik.available_backends()
    torch.manual_seed(3)
    args = [torch.randn(6, 8, requires_grad=True), torch.randn(5, 8), torch.randn(5), torch.randn(3, 8,
            requires_grad=True), torch.randn(4, 8, requires_grad=True), torch.randn(3, 5, 4, requires_grad=True)]
    seed = torch.tensor([987654], dtype=torch.int64)
    torch.library.opcheck(torch.ops.ilora_kernels.seeded_forward, (*args, 2.0, 0.25, seed, 0, backend))
    y, h, g = torch.ops.ilora_kernels.seeded_forward(*args, 2.0, 0.25, seed, 0, backend)
    forward_op = registry.backend_ops(backend).forward
    y2, h2, g2 = forward_op(*args, 2.0, 0.25, 987654, 0)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    grads = torch.autograd.grad(y.square().sum(), [args[0], args[3], args[4], args[5]])
    grads2 = torch.autograd.grad(y2.square().sum(), [args[0], args[3], args[4], args[5]])
    for a, b in zip(grads, grads2, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_eager_fast_path_matches_registered_autograd(monkeypatch):
    """The hand-written eager autograd and the ops' registered autograd give identical results."""
    layer = _layer(0.2)
    layer.train()
    x = torch.randn(3, 4, 16, requires_grad=True)

    def run():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(11)
        y, g = layer(x, return_router_weights=True)
        (y.square().sum() + g.square().sum()).backward()
        return [y.detach(), g.detach(), x.grad.clone(), layer.router_weight.grad.clone(), layer.lora_a.grad.clone(),
                layer.lora_b.grad.clone()]

    fast = run()
    with settings.override(eager_fast_path=False):
        slow = run()
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
