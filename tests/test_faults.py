"""Faults in adapter files: corrupted, truncated or mismatched adapters are refused with a message that names the
file or key and says why, a refused load leaves the model untouched, and an interrupted save never leaves a
half-written adapter that loads (the table of faults and messages is in docs/reliability.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from adapter_folders import CONFIG, DELETE, WEIGHTS
from adapter_folders import edit_config as _edit_config

import ilora_kernels as ik
from ilora_kernels import adapters
from tiny_models import patched_tiny_model, tiny_qwen2, token_batch

_patched = patched_tiny_model
_DELETE = DELETE


def _snapshot(model):
    return {k: v.detach().clone() for k, v in adapters.adapter_state_dict(model).items()}


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "adapter"
    ik.save_ilora(_patched(seed=0), folder)
    return folder


def _tensors(folder):
    from safetensors.torch import load_file
    return load_file(folder / WEIGHTS)


def _rewrite(folder, tensors, fix_checksum=True):
    """Writes tensors as the weights file; by default also updates the config's checksum, so that the fault under
    test (not the checksum) is what load_ilora must catch."""
    from safetensors.torch import save_file
    save_file(tensors, folder / WEIGHTS)
    if fix_checksum:
        meta = json.loads((folder / CONFIG).read_text())
        meta["weights_sha256"] = adapters._sha256(folder / WEIGHTS)
        (folder / CONFIG).write_text(json.dumps(meta))




def _assert_refused(folder, exc_type, match, model=None):
    """load_ilora raises exc_type matching ``match``, and leaves a patched model's weights (or an unpatched model's
    structure) unchanged."""
    patched = model if model is not None else _patched(seed=5)
    before = _snapshot(patched)
    with pytest.raises(exc_type, match=match):
        ik.load_ilora(patched, folder)
    after = _snapshot(patched)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    fresh = tiny_qwen2()
    with pytest.raises(exc_type, match=match):
        ik.load_ilora(fresh, folder)
    assert not ik.ilora_layers(fresh), "a refused load left an unpatched model patched"


# ---------------------------------------------------------------------------------------------------------------
# mismatched adapters


@pytest.mark.parametrize("field,value,match", [
    ("r", 8, r"has r=4 but the model's I-LoRA layers have r=8"),
    ("num_heads", 2, r"has num_heads=3 but the model's I-LoRA layers have num_heads=2"),
    ("target_modules", ("q_proj", "v_proj"), r"targets .* but the model was patched for"),
])
def test_mismatched_config_is_refused(saved, field, value, match):
    model = _patched(**{field: value})
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        ik.load_ilora(model, saved)
    assert all(torch.equal(before[k], v) for k, v in _snapshot(model).items())


def test_wrong_shape_in_file_is_refused(saved):
    tensors = _tensors(saved)
    key = sorted(k for k in tensors if k.endswith("lora_a"))[0]
    d_in = tensors[key].shape[1]
    tensors[key] = torch.randn(5, d_in)
    _rewrite(saved, tensors)
    _assert_refused(saved, ValueError, rf"{key} has shape \(5, {d_in}\) but the model expects \(4, {d_in}\)")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_integer_tensor_is_refused(saved, dtype):
    tensors = _tensors(saved)
    key = sorted(k for k in tensors if k.endswith("router_weight"))[0]
    tensors[key] = torch.ones(tensors[key].shape, dtype=dtype)
    _rewrite(saved, tensors)
    _assert_refused(saved, TypeError, rf"{key} has dtype {dtype}; expected a floating-point tensor")


def test_half_precision_file_loads_into_a_float32_model(saved):
    """Another float dtype is not a fault: it is cast (the file of a bf16 run loads into an fp32 model)."""
    tensors = {k: v.to(torch.bfloat16) for k, v in _tensors(saved).items()}
    _rewrite(saved, tensors)
    model = ik.load_ilora(_patched(seed=3), saved)
    for k, v in adapters.adapter_state_dict(model).items():
        assert v.dtype == torch.float32 and torch.equal(v, tensors[k].float())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_refused(saved, bad):
    tensors = _tensors(saved)
    key = sorted(k for k in tensors if k.endswith("lora_b"))[0]
    tensors[key][0, 0, 0] = bad
    _rewrite(saved, tensors)
    _assert_refused(saved, ValueError, rf"{key} has 1 non-finite value\(s\)")


def test_missing_and_extra_keys_are_refused(saved):
    tensors = _tensors(saved)
    dropped = sorted(tensors)[0]
    missing = {k: v for k, v in tensors.items() if k != dropped}
    _rewrite(saved, missing)
    _assert_refused(saved, KeyError, rf"lacks 1 key\(s\) the model needs, e.g. \['{dropped}'\]")
    extra = dict(tensors, **{"model.layers.9.self_attn.q_proj.lora_a": torch.zeros(4, 32)})
    _rewrite(saved, extra)
    _assert_refused(saved, KeyError, r"has 1 key\(s\) the model does not have, e.g. "
                                     r"\['model.layers.9.self_attn.q_proj.lora_a'\]")


# ---------------------------------------------------------------------------------------------------------------
# corrupted files


@pytest.mark.parametrize("text,match", [
    ("{not json", r"adapter_config.json is not valid JSON"),
    ("", r"adapter_config.json is not valid JSON"),
    ("[1, 2, 3]", r"adapter_config.json must hold a JSON object, got list"),
    ("42", r"adapter_config.json must hold a JSON object, got int"),
])
def test_corrupt_config_json_is_refused(saved, text, match):
    (saved / CONFIG).write_text(text)
    _assert_refused(saved, ValueError, match)


def test_binary_garbage_config_is_refused(saved):
    (saved / CONFIG).write_bytes(b"\xff\xfe\x00garbage")
    _assert_refused(saved, ValueError, r"adapter_config.json is not valid JSON")


@pytest.mark.parametrize("key", ["r", "num_heads", "alpha", "target_modules"])
def test_config_missing_key_is_refused(saved, key):
    _edit_config(saved, **{key: _DELETE})
    _assert_refused(saved, ValueError, rf"adapter_config.json lacks the key '{key}'")


@pytest.mark.parametrize("changes,match", [
    ({"r": -4}, r"invalid config: ILoRAConfig.r must be a positive int, got -4"),
    ({"r": "4"}, r"invalid config: ILoRAConfig.r must be a positive int, got '4'"),
    ({"num_heads": None}, r"invalid config: ILoRAConfig.num_heads must be a positive int, got None"),
    ({"alpha": "NaN"}, r"invalid config: ILoRAConfig.alpha must be a finite number"),
    ({"dropout": 1.5}, r"invalid config: ILoRAConfig.dropout must be in \[0, 1\)"),
    ({"target_modules": []}, r"invalid config: ILoRAConfig.target_modules must be a non-empty"),
    ({"format": "lora"}, r"has format='lora'; expected 'ilora'"),
])
def test_invalid_config_values_are_refused(saved, changes, match):
    _edit_config(saved, **changes)
    _assert_refused(saved, ValueError, match)


def test_unknown_config_keys_are_ignored(saved):
    """Forward compatibility: keys a newer version may add are ignored, not a fault."""
    _edit_config(saved, some_future_option=True)
    ik.load_ilora(_patched(seed=2), saved)


@pytest.mark.parametrize("keep", [0, 7, 100, -16])
def test_truncated_safetensors_is_refused(saved, keep):
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    _assert_refused(saved, ValueError, r"adapter_model.safetensors is not a readable safetensors file")


def test_bit_flip_in_the_weights_is_refused_by_the_checksum(saved):
    data = bytearray((saved / WEIGHTS).read_bytes())
    data[-3] ^= 0x01                      # a flipped mantissa bit: still a valid file with finite values
    (saved / WEIGHTS).write_bytes(bytes(data))
    _assert_refused(saved, ValueError, r"does not match .*adapter_config.json \(weights_sha256")


def test_missing_files_are_refused(saved):
    (saved / WEIGHTS).unlink()
    _assert_refused(saved, FileNotFoundError, r"adapter_model.safetensors does not exist")
    (saved / CONFIG).unlink()
    _assert_refused(saved, FileNotFoundError, r"adapter_config.json does not exist")


def test_adapters_without_checksum_still_load(saved):
    """Adapters written before the checksum existed (no weights_sha256) load as before."""
    _edit_config(saved, weights_sha256=_DELETE)
    model = ik.load_ilora(_patched(seed=4), saved)
    assert ik.ilora_layers(model)


# ---------------------------------------------------------------------------------------------------------------
# interrupted saves


def _leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in (WEIGHTS, CONFIG))


def _assert_old_adapter_loads(folder, old_model):
    model = ik.load_ilora(tiny_qwen2(), folder)
    for k, v in _snapshot(old_model).items():
        assert torch.equal(adapters.adapter_state_dict(model)[k], v)
    ids = token_batch(model.config.vocab_size)
    model.eval()
    assert torch.isfinite(model(ids).logits).all()


class Crash(Exception):
    pass


@pytest.mark.parametrize("where", ["weights", "config"])
def test_crash_while_writing_keeps_the_old_adapter(tmp_path, monkeypatch, where):
    folder = tmp_path / "adapter"
    old = _patched(seed=0)
    ik.save_ilora(old, folder)
    new = _patched(seed=1, alpha=16)

    if where == "weights":
        real = adapters._write_weights

        def writer(tensors, path):
            real(tensors, path)
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])      # half the file is on disk, then the process dies
            raise Crash("killed while writing the weights")
        monkeypatch.setattr(adapters, "_write_weights", writer)
    else:
        def writer(meta, path):
            Path(path).write_text(json.dumps(meta)[:40])
            raise Crash("killed while writing the config")
        monkeypatch.setattr(adapters, "_write_config", writer)

    with pytest.raises(Crash):
        ik.save_ilora(new, folder)
    assert _leftovers(folder) == [], "a temporary file was left behind"
    _assert_old_adapter_loads(folder, old)


def test_crash_between_the_two_renames_keeps_the_old_adapter(tmp_path, monkeypatch):
    """The weights were renamed into place but the save failed before the config was: the folder must still load
    the old adapter (never the new weights under the old config). Kills by signal at every step:
    tests/test_adapter_robustness.py."""
    folder = tmp_path / "adapter"
    old = _patched(seed=0)
    ik.save_ilora(old, folder)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(CONFIG):
            raise Crash("killed between the renames")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Crash):
        ik.save_ilora(_patched(seed=1), folder)
    monkeypatch.setattr(os, "replace", real_replace)
    assert _leftovers(folder) == []
    _assert_old_adapter_loads(folder, old)


def test_successful_save_replaces_the_old_adapter(tmp_path):
    folder = tmp_path / "adapter"
    ik.save_ilora(_patched(seed=0), folder)
    new = _patched(seed=1)
    ik.save_ilora(new, folder)
    assert _leftovers(folder) == []
    _assert_old_adapter_loads(folder, new)


# ---------------------------------------------------------------------------------------------------------------
# the Crab / HydraLoRA import


def _crab(model):
    return ik.export_crab_state_dict(model)


def test_crab_import_refuses_bad_tensors_naming_the_key():
    source = _patched(seed=0)
    sd = _crab(source)
    key = sorted(k for k in sd if k.endswith("lora_A.weight"))[0]
    d_in = sd[key].shape[1]
    for bad, exc, match in [
        (torch.ones(4, d_in, dtype=torch.int64), TypeError, "has dtype torch.int64; expected a floating-point tensor"),
        (torch.randn(5, d_in), ValueError, rf"has shape \(5, {d_in}\) but the model expects \(4, {d_in}\)"),
        (torch.full((4, d_in), float("nan")), ValueError, rf"has {4 * d_in} non-finite value\(s\)"),
    ]:
        target = _patched(seed=1)
        before = _snapshot(target)
        with pytest.raises(exc, match=rf"{key} {match}"):
            ik.load_crab_state_dict(target, dict(sd, **{key: bad}))
        assert all(torch.equal(before[k], v) for k, v in _snapshot(target).items())
    route = sorted(k for k in sd if k.endswith("lora_route.weight"))[0]
    d_route = sd[route].shape[1]
    with pytest.raises(ValueError, match=rf"{route} has shape \(2, {d_route}\)"):
        ik.load_crab_state_dict(_patched(seed=1), dict(sd, **{route: torch.randn(2, d_route)}))
    head = sorted(k for k in sd if k.endswith("lora_B0.weight"))[0]
    missing = {k: v for k, v in sd.items() if k != head}
    with pytest.raises(KeyError, match="needs"):
        ik.load_crab_state_dict(_patched(seed=1), missing)
    with pytest.raises(KeyError, match="is not a Crab I-LoRA key"):
        ik.load_crab_state_dict(_patched(seed=1), dict(sd, **{"model.layers.0.mlp.weird.weight": torch.zeros(1)}))
