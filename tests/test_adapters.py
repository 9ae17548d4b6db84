"""save_ilora / load_ilora round trips and the Crab / HydraLoRA layout."""

import json

import pytest
import torch
from torch import nn

import ilora_kernels as ik
from tiny_models import tiny_qwen2, token_batch


def _patched(seed=0, **cfg):
    torch.manual_seed(seed)
    model = tiny_qwen2()
    ik.apply_ilora(model, ik.ILoRAConfig(**{"r": 4, "num_heads": 3, "alpha": 8, **cfg}))
    with torch.no_grad():
        for layer in ik.ilora_layers(model).values():
            layer.lora_b.normal_()
    return model


def test_save_load_round_trip_bit_exact(tmp_path):
    model = _patched(seed=0)
    ik.save_ilora(model, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (meta["r"], meta["num_heads"], meta["alpha"], meta["dropout"], meta["top_k"]) == (4, 3, 8, 0.1, None)
    assert meta["ilora_kernels_version"] == ik.__version__ and "q_proj" in meta["target_modules"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    other = _patched(seed=1)  # same base architecture, different adapter values
    torch.manual_seed(0)
    fresh_base = tiny_qwen2()
    for target in (other, fresh_base):  # into a patched model, and into an unpatched one (patched on load)
        ik.load_ilora(target, tmp_path / "adapter")
        for name, layer in ik.ilora_layers(model).items():
            loaded = ik.ilora_layers(target)[name]
            for p in ("router_weight", "lora_a", "lora_b"):
                assert torch.equal(getattr(layer, p), getattr(loaded, p))
    ids = token_batch(fresh_base.config.vocab_size)
    model.eval(), fresh_base.eval()
    assert torch.equal(model(ids).logits, fresh_base(ids).logits)


def test_load_refuses_mismatched_adapters(tmp_path):
    ik.save_ilora(_patched(), tmp_path / "a")
    with pytest.raises(ValueError, match="r=4 but the model's I-LoRA layers have r=8"):
        ik.load_ilora(_patched(r=8), tmp_path / "a")
    with pytest.raises(ValueError, match="num_heads=3 but the model's I-LoRA layers have num_heads=2"):
        ik.load_ilora(_patched(num_heads=2), tmp_path / "a")
    with pytest.raises(ValueError, match="targets"):
        ik.load_ilora(_patched(target_modules=("q_proj", "v_proj")), tmp_path / "a")
    with pytest.raises(FileNotFoundError):
        ik.load_ilora(_patched(), tmp_path / "missing")


def test_load_refuses_missing_keys_and_corrupt_files(tmp_path):
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "a"
    ik.save_ilora(_patched(), folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(KeyError, match="lacks 1 key"):
        ik.load_ilora(_patched(), folder)
    (folder / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ik.load_ilora(_patched(), folder)


class CrabLoopLinear(nn.Module):
    """The Crab / HydraLoRA module as published: per-head loop over lora_B{i}, router lora_route."""

    def __init__(self, base: nn.Linear, r: int, heads: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_route = nn.Linear(base.in_features, heads, bias=False)
        for i in range(heads):
            setattr(self, f"lora_B{i}", nn.Linear(r, base.out_features, bias=False))
        self.heads, self.scaling = heads, alpha / r

    def forward(self, x):
        result = self.base(x)
        route = torch.softmax(self.lora_route(x), dim=-1, dtype=torch.float32).to(result.dtype)
        for i in range(self.heads):
            result = result + route[..., i:i + 1] * getattr(self, f"lora_B{i}")(self.lora_A(x)) * self.scaling
        return result


@pytest.mark.parametrize("prefix", ["", "base_model.model."])
def test_crab_layout_import_matches_crab_module(prefix):
    torch.manual_seed(0)
    base = nn.Linear(10, 6).double()
    crab = CrabLoopLinear(base, r=4, heads=3, alpha=8).double()
    for p in crab.parameters():
        nn.init.normal_(p)
    holder = nn.Module()
    holder.proj = nn.Linear(10, 6).double()
    holder.proj.load_state_dict(base.state_dict())
    ik.apply_ilora(holder, ik.ILoRAConfig(r=4, num_heads=3, alpha=8, dropout=0.0, target_modules=("proj",)))
    state = {f"{prefix}proj.{k}": v for k, v in crab.state_dict().items() if k.startswith("lora_")}
    assert ik.load_crab_state_dict(holder, state) == ["proj"]
    x = torch.randn(3, 5, 10, dtype=torch.float64)
    holder.eval()
    # the Crab module rounds its router softmax to float32 even for float64 activations, hence 1e-5
    torch.testing.assert_close(holder.proj(x), crab(x), rtol=1e-5, atol=1e-5)
    exported = ik.export_crab_state_dict(holder, prefix=prefix)
    assert set(exported) == set(state) and all(torch.equal(exported[k], state[k]) for k in state)


def test_crab_import_errors():
    holder = nn.Module()
    holder.proj = nn.Linear(10, 6)
    ik.apply_ilora(holder, ik.ILoRAConfig(r=4, num_heads=2, target_modules=("proj",)))
    good = ik.export_crab_state_dict(holder, prefix="")
    with pytest.raises(KeyError, match="not a Crab I-LoRA key"):
        ik.load_crab_state_dict(holder, {**good, "proj.weight": torch.zeros(6, 10)})
    with pytest.raises(KeyError, match="no I-LoRA layer named"):
        ik.load_crab_state_dict(holder, {k.replace("proj", "other"): v for k, v in good.items()})
    bad = dict(good)
    del bad["proj.lora_B1.weight"]
    with pytest.raises(KeyError, match="lora_B1"):
        ik.load_crab_state_dict(holder, bad)
    with pytest.raises(ValueError, match=r"lora_B0.weight has shape \(6, 3\)"):
        ik.load_crab_state_dict(holder, {**good, "proj.lora_B0.weight": torch.zeros(6, 3)})


def test_the_trainer_fsdp_writer_is_save_ilora(tmp_path):
    """The trainer's FSDP checkpoint path (a gathered state dict with wrapper prefixes) writes the save_ilora format
    through the one writer: checksummed, loadable, and refused when an I-LoRA tensor is missing."""
    from ilora_kernels.crab.train import _save_adapter_state

    model = _patched(seed=3)
    wanted = ik.adapters.adapter_state_dict(model)
    gathered = {f"_fsdp_wrapped_module.{k}": v.clone() for k, v in wanted.items()}
    gathered["_fsdp_wrapped_module.model.embed_tokens.weight"] = torch.zeros(3)   # frozen base: not written
    _save_adapter_state(model, gathered, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert meta["format"] == "ilora" and len(meta["weights_sha256"]) == 64
    reloaded = ik.load_ilora(tiny_qwen2(), tmp_path / "ckpt")
    for k, v in ik.adapters.adapter_state_dict(reloaded).items():
        assert torch.equal(v, wanted[k])
    gathered.pop(next(iter(gathered)))
    with pytest.raises(RuntimeError, match="FSDP state dict lacks 1 I-LoRA tensors"):
        _save_adapter_state(model, gathered, tmp_path / "ckpt2")
