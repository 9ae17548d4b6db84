"""PEFT interoperability: get_peft_model with ILoRAPeftConfig runs our kernels; adapters saved by PEFT load into
apply_ilora models and the other way round; supported PEFT versions are pinned."""

import copy
import json

import pytest
import torch

import ilora_kernels as ik

pi = pytest.importorskip("ilora_kernels.peft_integration", exc_type=ImportError)
from peft import PeftModel, get_peft_model  # noqa: E402

from tiny_models import pattern_batch, tiny_llama  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_config(**kw):
    args = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, ilora_num_heads=3)
    args.update(kw)
    return pi.ILoRAPeftConfig(**args)


def _ilora_config(**kw):
    args = dict(r=4, num_heads=3, alpha=8, dropout=0.0, target_modules=tuple(TARGETS))
    args.update(kw)
    return ik.ILoRAConfig(**args)


@pytest.fixture
def base():
    torch.manual_seed(0)
    return tiny_llama().eval()


def _randomise_ilora(model):
    with torch.no_grad():
        for layer in ik.ilora_layers(model).values():
            layer.lora_b.normal_(std=0.2)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_get_peft_model_builds_ilora_layers_that_run_our_kernels(base, monkeypatch):
    ids = pattern_batch(base.config.vocab_size)
    plain = _logits(base, ids)
    model = get_peft_model(copy.deepcopy(base), _peft_config())
    layers = [m for m in model.modules() if isinstance(m, pi.ILoRAPeftLinear)]
    assert len(layers) == 3 * base.config.num_hidden_layers
    # Crab+ init: every B_k is zero, so the adapted model equals the base model
    torch.testing.assert_close(_logits(model, ids), plain)
    calls = []
    real = pi.ilora_linear
    monkeypatch.setattr(pi, "ilora_linear", lambda *a, **k: calls.append(k["backend"]) or real(*a, **k))
    model.train()
    model(ids, labels=ids).loss.backward()
    assert len(calls) == len(layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(s in n for s in ("lora_A", "lora_B", "lora_route")) for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_peft_layers_match_apply_ilora_forward_and_gradients(base):
    ids = pattern_batch(base.config.vocab_size)
    ours = ik.apply_ilora(copy.deepcopy(base), _ilora_config())
    _randomise_ilora(ours)
    folder_model = get_peft_model(copy.deepcopy(base), _peft_config())
    # copy our weights into the PEFT layers through the shared Crab layout
    state = ik.export_crab_state_dict(ours)
    from peft.utils import set_peft_model_state_dict
    result = set_peft_model_state_dict(folder_model, state)
    assert not result.unexpected_keys
    torch.testing.assert_close(_logits(folder_model, ids), _logits(ours, ids), rtol=1e-5, atol=1e-5)
    for m in (ours, folder_model):
        m.train()
        m(ids, labels=ids).loss.backward()
    ours_layers = ik.ilora_layers(ours)
    for name, module in folder_model.base_model.model.named_modules():
        if isinstance(module, pi.ILoRAPeftLinear):
            layer = ours_layers[name]
            torch.testing.assert_close(module.lora_A["default"].weight.grad, layer.lora_a.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(module.lora_route["default"].weight.grad, layer.router_weight.grad,
                                       rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(module.lora_B1["default"].weight.grad, layer.lora_b.grad[1], rtol=1e-4,
                                       atol=1e-6)


def test_peft_save_pretrained_loads_into_apply_ilora_model(base, tmp_path):
    ids = pattern_batch(base.config.vocab_size)
    model = get_peft_model(copy.deepcopy(base), _peft_config(init_lora_weights=False))
    model.save_pretrained(tmp_path)
    expected = _logits(model, ids)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["peft_type"] == "ILORA" and meta["ilora_num_heads"] == 3
    # our side: a plain model gets patched from the saved config, then loaded
    ours = pi.load_peft_adapter(copy.deepcopy(base), tmp_path)
    assert len(ik.ilora_layers(ours)) == 3 * base.config.num_hidden_layers
    torch.testing.assert_close(_logits(ours, ids), expected, rtol=1e-5, atol=1e-5)
    # the file is the Crab / HydraLoRA layout: load_crab_state_dict reads it as is
    from safetensors.torch import load_file
    again = ik.apply_ilora(copy.deepcopy(base), _ilora_config())
    ik.load_crab_state_dict(again, load_file(tmp_path / "adapter_model.safetensors"))
    torch.testing.assert_close(_logits(again, ids), expected, rtol=1e-5, atol=1e-5)
    # and PEFT itself reloads it (with the I-LoRA config)
    reloaded = pi.from_pretrained(copy.deepcopy(base), tmp_path)
    assert isinstance(reloaded, PeftModel)
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)


def test_save_ilora_loads_into_peft(base, tmp_path):
    ids = pattern_batch(base.config.vocab_size)
    ours = ik.apply_ilora(copy.deepcopy(base), _ilora_config(top_k=2))
    _randomise_ilora(ours)
    expected = _logits(ours, ids)
    ik.save_ilora(ours, tmp_path / "ours")
    peft_model = pi.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    layers = [m for m in peft_model.modules() if isinstance(m, pi.ILoRAPeftLinear)]
    assert layers and all(m.top_k["default"] == 2 for m in layers)
    assert not any(p.requires_grad for p in peft_model.parameters())  # loaded for inference
    torch.testing.assert_close(_logits(peft_model, ids), expected, rtol=1e-5, atol=1e-5)
    # save_as_peft: our model -> a PEFT folder that plain PeftModel.from_pretrained loads with the I-LoRA config
    pi.save_as_peft(ours, tmp_path / "peft")
    plain_peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft",
                                           config=pi.load_peft_config(tmp_path / "peft"))
    torch.testing.assert_close(_logits(plain_peft, ids), expected, rtol=1e-5, atol=1e-5)
    # and our load path reads it back too
    back = pi.load_peft_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(_logits(back, ids), expected, rtol=1e-5, atol=1e-5)


def test_config_conversions_round_trip():
    cfg = _ilora_config(top_k=2, backend="reference", dropout=0.1)
    peft_cfg = pi.peft_config_from_ilora(cfg)
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.lora_dropout, peft_cfg.ilora_num_heads) == (4, 8, 0.1, 3)
    back = pi.ilora_config_from_peft(peft_cfg)
    assert set(back.target_modules) == set(cfg.target_modules)  # PEFT keeps target_modules as a set
    back.target_modules = cfg.target_modules
    assert back == cfg
    with pytest.raises(ValueError, match="rank_pattern"):
        pi.ilora_config_from_peft(_peft_config(rank_pattern={"q_proj": 8}))


@pytest.mark.parametrize("bad,match", [(dict(use_dora=True), "use_dora"), (dict(use_rslora=True), "use_rslora"),
                                       (dict(init_lora_weights="pissa"), "init_lora_weights"),
                                       (dict(ilora_num_heads=0), "ilora_num_heads"),
                                       (dict(ilora_top_k=5), "ilora_top_k"),
                                       (dict(ilora_backend="tpu"), "ilora_backend")])
def test_unsupported_options_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        _peft_config(**bad)


def test_merge_raises_and_unload_restores_linear(base):
    model = get_peft_model(copy.deepcopy(base), _peft_config())
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    plain = model.unload()
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_two_adapters_switch_and_disable(base, tmp_path):
    ids = pattern_batch(base.config.vocab_size)
    model = get_peft_model(copy.deepcopy(base), _peft_config(init_lora_weights=False))
    first = _logits(model, ids)
    model.add_adapter("other", _peft_config(init_lora_weights=False, ilora_num_heads=2))
    torch.testing.assert_close(_logits(model, ids), first)  # "default" still the active one
    model.set_adapter("other")
    second = _logits(model, ids)
    assert not torch.allclose(first, second)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, ids), _logits(base, ids))
    # both active: the second adapter adds its plain-PyTorch delta on top of the fused first one
    model.base_model.set_adapter(["default", "other"])
    both = _logits(model, ids)
    assert both.shape == first.shape and torch.isfinite(both).all()


def test_peft_version_pin():
    assert pi.check_peft_version("0.21.2") == "0.21.2"
    assert pi.check_peft_version("0.19.0") == "0.19.0"
    for bad in ("0.18.1", "0.22.0", "1.0.0"):
        with pytest.raises(ImportError, match="peft>=0.19.0,<0.22.0"):
            pi.check_peft_version(bad)


def test_peft_version_override(ilora_env):
    ilora_env(ILORA_ALLOW_UNTESTED_PEFT="1")
    assert pi.check_peft_version("0.23.0") == "0.23.0"


def test_save_as_peft_writes_through_the_checksummed_writer(base, tmp_path):
    """save_as_peft is atomic and records the weights' checksum; the PEFT readers refuse weights that do not match."""
    from safetensors.torch import load_file, save_file

    ours = ik.apply_ilora(copy.deepcopy(base), _ilora_config())
    _randomise_ilora(ours)
    folder = pi.save_as_peft(ours, tmp_path / "peft")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert meta["peft_type"] == "ILORA" and meta["ilora_num_heads"] == 3 and len(meta["weights_sha256"]) == 64
    pi.load_peft_adapter(copy.deepcopy(base), folder)        # matches: loads
    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1.0                        # another save's weights beside this config
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"does not match .*\(an interrupted save_as_peft\?\)"):
        pi.load_peft_adapter(copy.deepcopy(base), folder)
    ik.save_ilora(ours, tmp_path / "ours")
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    save_file({k: v * 2 for k, v in tensors.items()}, str(tmp_path / "ours" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"from_pretrained: .* does not match"):
        pi.from_pretrained(copy.deepcopy(base), tmp_path / "ours")


def test_load_peft_adapter_refuses_other_hyperparameters_and_leaves_the_model(base, tmp_path):
    source = ik.apply_ilora(copy.deepcopy(base), _ilora_config(alpha=16))
    pi.save_as_peft(source, tmp_path)
    patched = ik.apply_ilora(copy.deepcopy(base), _ilora_config(alpha=8))
    with pytest.raises(ValueError, match=r"load_peft_adapter: .*adapter_config.json has alpha=16.0 .* alpha=8\b"):
        pi.load_peft_adapter(patched, tmp_path)
    # an unpatched model that fails to load (weights of another width) is unpatched again
    (tmp_path / "adapter_model.safetensors").unlink()
    from safetensors.torch import save_file
    bad = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in
           ik.export_crab_state_dict(source, prefix="base_model.model.").items()}
    save_file(bad, str(tmp_path / "adapter_model.safetensors"))
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta.pop("weights_sha256")
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    plain = copy.deepcopy(base)
    flags = {n: p.requires_grad for n, p in plain.named_parameters()}
    with pytest.raises(ValueError, match="shape"):
        pi.load_peft_adapter(plain, tmp_path)
    assert not ik.ilora_layers(plain)
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == flags


def test_peft_readers_load_the_old_adapter_after_a_save_stopped_between_the_renames(base, tmp_path, monkeypatch):
    import os
    ids = pattern_batch(base.config.vocab_size)
    old = ik.apply_ilora(copy.deepcopy(base), _ilora_config())
    _randomise_ilora(old)
    pi.save_as_peft(old, tmp_path)
    new = ik.apply_ilora(copy.deepcopy(base), _ilora_config())
    _randomise_ilora(new)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("adapter_config.json"):  # the save dies before its config rename
            raise KeyboardInterrupt("killed between the renames")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        pi.save_as_peft(new, tmp_path)
    monkeypatch.setattr(os, "replace", real_replace)
    loaded = pi.load_peft_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), _logits(old, ids), rtol=0, atol=0)
