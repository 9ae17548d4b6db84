"""ILoRALinear and apply_ilora / remove_ilora on plain torch and tiny Hugging Face models."""

import copy

import pytest
import torch
from torch import nn

import ilora_kernels as ik
from ilora_float64 import ilora_float64
from tiny_models import tiny_llama, tiny_qwen2, tiny_whisper_encoder, token_batch


def test_module_wraps_without_copy_and_starts_as_base():
    base = nn.Linear(12, 7)
    layer = ik.ILoRALinear(base, r=4, num_heads=3, alpha=8, dropout=0.1)
    assert layer.base_layer is base and layer.weight is base.weight
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.router_weight.shape == (3, 12) and layer.lora_a.shape == (4, 12) and layer.lora_b.shape == (3, 7, 4)
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_b) == 0 and torch.count_nonzero(layer.lora_a) > 0
    x = torch.randn(2, 5, 12)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    text = repr(layer)
    for part in ("r=4", "num_heads=3", "alpha=8", "dropout=0.1", "backend='auto'"):
        assert part in text


def test_module_matches_float64_and_trains():
    base = nn.Linear(9, 6).double()
    layer = ik.ILoRALinear(base, r=3, num_heads=2, alpha=6, dropout=0.0, backend="reference")
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(4, 9, dtype=torch.float64)
    y, g = layer(x, return_router_weights=True)
    y_ref, g_ref = ilora_float64(x, base.weight, base.bias, layer.router_weight, layer.lora_a, layer.lora_b, 2.0)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(g, g_ref)
    y.sum().backward()
    assert base.weight.grad is None
    assert all(p.grad is not None for p in (layer.router_weight, layer.lora_a, layer.lora_b))


def test_module_rejects_bad_arguments():
    with pytest.raises(TypeError):
        ik.ILoRALinear(nn.Conv1d(2, 2, 1))
    for kwargs in (dict(r=0), dict(num_heads=0), dict(dropout=1.0), dict(top_k=5), dict(backend="gpu")):
        with pytest.raises(ValueError):
            ik.ILoRALinear(nn.Linear(3, 3), **kwargs)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.block = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "my_q_proj": nn.Linear(8, 8), "gate": nn.Linear(8, 4)})
        self.norm = nn.LayerNorm(8)


def test_target_matching_exact_suffix_and_regex():
    model = ik.apply_ilora(Toy(), ik.ILoRAConfig(r=2, num_heads=2, target_modules=("q_proj",)))
    assert sorted(ik.ilora_layers(model)) == ["block.q_proj", "q_proj"]  # "my_q_proj" is not a ".q_proj" suffix
    model = ik.apply_ilora(Toy(), ik.ILoRAConfig(r=2, num_heads=2, target_modules=("block.gate",)))
    assert sorted(ik.ilora_layers(model)) == ["block.gate"]
    model = ik.apply_ilora(Toy(), ik.ILoRAConfig(r=2, num_heads=2, target_modules=r"block\..*q_proj"))
    assert sorted(ik.ilora_layers(model)) == ["block.my_q_proj", "block.q_proj"]


def test_no_match_lists_near_misses():
    with pytest.raises(ValueError, match=r"Near misses: .*'q_proj'"):
        ik.apply_ilora(Toy(), ik.ILoRAConfig(r=2, num_heads=2, target_modules=("q_prj",)))


def test_apply_twice_is_refused():
    model = ik.apply_ilora(Toy(), ik.ILoRAConfig(r=2, num_heads=2, target_modules=("gate",)))
    with pytest.raises(ValueError, match="already"):
        ik.apply_ilora(model, ik.ILoRAConfig(r=2, num_heads=2, target_modules=("gate",)))


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_patch_causal_lm_freezes_and_restores(build):
    torch.manual_seed(0)
    model = build().eval()
    ids = token_batch(model.config.vocab_size)
    before = model(ids).logits
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    ik.apply_ilora(model, ik.ILoRAConfig(r=4, num_heads=3, alpha=8))
    layers = ik.ilora_layers(model)
    assert len(layers) == 7 * model.config.num_hidden_layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("router_weight", "lora_a", "lora_b") for n in trainable)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)  # B = 0: the patched model is the base
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_b.normal_(std=0.1)
    assert not torch.allclose(model(ids).logits, before)
    ik.remove_ilora(model)
    assert not ik.ilora_layers(model)
    for name, m in model.named_modules():
        if name in linears:
            assert m is linears[name]
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_patch_whisper_encoder_packed_inputs():
    torch.manual_seed(0)
    encoder = tiny_whisper_encoder().eval()
    features = torch.randn(2, 8, 32)
    before = encoder(features).last_hidden_state
    ik.apply_ilora(encoder, ik.ILoRAConfig(r=2, num_heads=3, alpha=4, target_modules=("q_proj", "k_proj", "v_proj")))
    assert len(ik.ilora_layers(encoder)) == 6
    torch.testing.assert_close(encoder(features).last_hidden_state, before, rtol=0, atol=0)
    # packed 2-D inputs (tokens x features) pass straight through an I-LoRA layer
    layer = next(iter(ik.ilora_layers(encoder).values()))
    packed = torch.randn(17, layer.in_features)
    assert layer(packed).shape == (17, layer.out_features)


def test_disabled_adapter_is_base_model():
    torch.manual_seed(0)
    model = tiny_llama()
    reference = copy.deepcopy(model)
    ik.apply_ilora(model, ik.ILoRAConfig(r=4, num_heads=3, alpha=8))
    with torch.no_grad():
        for layer in ik.ilora_layers(model).values():
            layer.lora_b.normal_()
    from ilora_kernels.patching import set_adapter_enabled
    set_adapter_enabled(model, False)
    ids = token_batch(model.config.vocab_size)
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
