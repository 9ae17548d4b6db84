"""torch.compile of a patched tiny model on the CPU, for each CPU-capable backend."""

import pytest
import torch

import ilora_kernels as ik
from tiny_models import pattern_batch, tiny_llama

CPU_BACKENDS = [b for b in ("reference", "cpu") if ik.available_backends()[b] is None]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_patched_model_matches_eager(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_llama()
    ik.apply_ilora(model, ik.ILoRAConfig(r=4, num_heads=3, alpha=8, dropout=0.0, backend=backend))
    with torch.no_grad():
        for layer in ik.ilora_layers(model).values():
            layer.lora_b.normal_(std=0.1)
    ids = pattern_batch(model.config.vocab_size)
    model.train()
    eager_loss = model(ids, labels=ids).loss
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-4, atol=1e-5, msg=n)


def test_functional_op_compiles_without_graph_breaks():
    torch._dynamo.reset()
    layer = ik.ILoRALinear(torch.nn.Linear(16, 12), r=4, num_heads=3, alpha=8, dropout=0.0)
    x = torch.randn(5, 7, 16)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
