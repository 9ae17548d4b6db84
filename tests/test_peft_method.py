"""I-LoRA as a PEFT method of its own ("ILORA"): the calls every PEFT user makes, on small custom models and a tiny
Llama, through PEFT's own entry points (``get_peft_model``, ``PeftModel.from_pretrained``, ``load_adapter``, ...).

The cases follow the behaviours PEFT checks for its custom-model methods: save/load round trips (also with
``low_cpu_mem_usage``), only adapter parameters train, trainable flags after loading, disabling, several adapters
(add, switch, delete), half-precision forwards, the Trainer's adapter-only checkpoints; merging does not apply to
I-LoRA (input-dependent routing) and must be refused without changing anything."""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import ilora_kernels as ik

pi = pytest.importorskip("ilora_kernels.peft_integration", exc_type=ImportError)
from peft import PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

from tiny_models import pattern_batch, tiny_llama  # noqa: E402


class MLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 7, bias=bias)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(10, 10), nn.Tanh()) for _ in range(2)])
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


# (name, model factory, target_modules, input factory)
CASES = [
    ("mlp", MLP, ["lin0", "lin1"], lambda: torch.randn(5, 10)),
    ("mlp-no-bias", lambda: MLP(bias=False), ["lin1"], lambda: torch.randn(2, 3, 10)),
    ("mlp-regex", MLP, r"lin\d", lambda: torch.randn(4, 10)),
    ("nested", Nested, ["blocks.0.0", "head"], lambda: torch.randn(6, 10)),
]


def _config(targets, **kw):
    args = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, ilora_num_heads=3,
                init_lora_weights=False)
    args.update(kw)
    return pi.ILoRAPeftConfig(**args)


def _output(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request):
    torch.manual_seed(0)
    _, factory, targets, make_x = request.param
    return factory().eval(), targets, make_x()


def _adapter_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, pi.ILoRAPeftLinear)}


def test_get_peft_model_builds_the_ilora_method(case):
    base, targets, x = case
    model = get_peft_model(copy.deepcopy(base), _config(targets))
    assert type(model.base_model) is pi.ILoRAPeftModel
    assert model.peft_config["default"].peft_type == pi.PEFT_TYPE == "ILORA"
    assert _adapter_layers(model)
    assert not torch.allclose(_output(model, x), _output(base, x))


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_save_pretrained_and_plain_peft_from_pretrained_round_trip(case, tmp_path, low_cpu_mem_usage):
    base, targets, x = case
    model = get_peft_model(copy.deepcopy(base), _config(targets)).eval()
    expected = _output(model, x)
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["peft_type"] == "ILORA" and meta["ilora_num_heads"] == 3

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert isinstance(loaded.peft_config["default"], pi.ILoRAPeftConfig)
    assert set(_adapter_layers(loaded)) == set(_adapter_layers(model))
    torch.testing.assert_close(_output(loaded, x), expected, rtol=0, atol=0)


def test_saved_keys_are_the_crab_layout(case):
    base, targets, _ = case
    model = get_peft_model(copy.deepcopy(base), _config(targets, ilora_num_heads=2))
    keys = set(get_peft_model_state_dict(model))
    expected = {f"{name}.{part}.weight" for name in _adapter_layers(model)
                for part in ("lora_A", "lora_route", "lora_B0", "lora_B1")}
    assert keys == expected


@pytest.mark.parametrize("is_trainable", [False, True])
def test_trainable_flags_after_loading(case, tmp_path, is_trainable):
    base, targets, _ = case
    get_peft_model(copy.deepcopy(base), _config(targets)).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=is_trainable)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    if not is_trainable:
        assert trainable == set()
    else:
        assert trainable and all(".lora_" in n for n in trainable)
        assert len(trainable) == 5 * len(_adapter_layers(loaded))  # A, route, B0..B2 per layer


def test_training_updates_only_adapter_parameters(case):
    base, targets, x = case
    model = get_peft_model(copy.deepcopy(base), _config(targets, init_lora_weights=True))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):  # B starts at zero, so A and the router move from the second step on
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (".lora_" in name), name


def test_disable_adapter_gives_the_base_model(case):
    base, targets, x = case
    model = get_peft_model(copy.deepcopy(base), _config(targets))
    with model.disable_adapter():
        torch.testing.assert_close(_output(model, x), _output(base, x), rtol=0, atol=0)
    assert not torch.allclose(_output(model, x), _output(base, x))


def test_load_adapter_set_adapter_delete_adapter(case, tmp_path):
    base, targets, x = case
    first = get_peft_model(copy.deepcopy(base), _config(targets)).eval()
    torch.manual_seed(1)
    second = get_peft_model(copy.deepcopy(base), _config(targets, ilora_num_heads=2, r=3)).eval()
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")

    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "first")
    model.load_adapter(tmp_path / "second", adapter_name="second")
    assert set(model.peft_config) == {"default", "second"}
    torch.testing.assert_close(_output(model, x), _output(first, x), rtol=0, atol=0)
    model.set_adapter("second")
    torch.testing.assert_close(_output(model, x), _output(second, x), rtol=0, atol=0)

    model.delete_adapter("default")  # an inactive adapter
    assert set(model.peft_config) == {"second"} and model.active_adapters == ["second"]
    for layer in _adapter_layers(model).values():
        assert set(layer.lora_A) == {"second"} and set(layer.lora_route) == {"second"}
    torch.testing.assert_close(_output(model, x), _output(second, x), rtol=0, atol=0)


def _snapshot(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m).__name__) for n, m in model.named_modules()]
    return state, modules, copy.deepcopy({k: v.to_dict() for k, v in model.peft_config.items()})


def _assert_same(model, snapshot):
    state, modules, configs = snapshot
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == modules
    assert {k: v.to_dict() for k, v in model.peft_config.items()} == configs
    now = model.state_dict()
    assert set(now) == set(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), key


def test_merging_and_weighted_adapters_are_refused_without_changes(case):
    base, targets, x = case
    model = get_peft_model(copy.deepcopy(base), _config(targets))
    model.add_adapter("other", _config(targets))
    before = _snapshot(model)
    with pytest.raises(NotImplementedError, match="add_weighted_adapter"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], adapter_name="combo")
    _assert_same(model, before)
    for call in (model.merge_and_unload, model.merge_adapter, lambda: model.base_model.merge_and_unload()):
        with pytest.raises(NotImplementedError, match="cannot be merged"):
            call()
        _assert_same(model, before)
    plain = model.unload()
    assert not _adapter_layers(plain)
    torch.testing.assert_close(_output(plain, x), _output(base, x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_is_finite_and_close(case, dtype):
    base, targets, x = case
    model = get_peft_model(copy.deepcopy(base), _config(targets)).eval()
    expected = _output(model, x)
    half = copy.deepcopy(model).to(dtype)
    out = _output(half, x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_tiny_llama_round_trip_and_second_adapter(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama().eval()
    ids = pattern_batch(base.config.vocab_size)
    model = get_peft_model(copy.deepcopy(base), _config(["q_proj", "v_proj", "down_proj"]))
    expected = _output(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_output(loaded, ids), expected, rtol=0, atol=0)
    loaded.load_adapter(tmp_path, adapter_name="again")
    loaded.set_adapter("again")
    torch.testing.assert_close(_output(loaded, ids), expected, rtol=0, atol=0)


def test_folders_of_the_lora_typed_route_still_load(case, tmp_path):
    """Folders written before I-LoRA had its own PEFT type say peft_type LORA (with ilora_num_heads)."""
    base, targets, x = case
    model = get_peft_model(copy.deepcopy(base), _config(targets)).eval()
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    meta = json.loads(config_path.read_text())
    meta["peft_type"] = "LORA"
    config_path.write_text(json.dumps(meta))
    loaded = pi.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.peft_config["default"].peft_type == "ILORA"
    torch.testing.assert_close(_output(loaded, x), _output(model, x), rtol=0, atol=0)
    assert isinstance(pi.load_peft_config(tmp_path), pi.ILoRAPeftConfig)


def test_trainer_writes_adapter_only_checkpoints_that_plain_peft_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), _config(["q_proj", "v_proj"], init_lora_weights=True))
    ids = pattern_batch(base.config.vocab_size, batch=8)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, save_steps=1,
                                          per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True,
                                          report_to=[], logging_steps=1, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    checkpoint = tmp_path / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    assert json.loads((checkpoint / "adapter_config.json").read_text())["peft_type"] == "ILORA"
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), checkpoint).eval()
    torch.testing.assert_close(_output(loaded, ids), _output(model.eval(), ids), rtol=0, atol=0)


def _run_python(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_import_ilora_kernels_registers_the_method_when_peft_is_imported():
    result = _run_python("""
        import sys
        import ilora_kernels
        assert "peft" not in sys.modules, "ilora_kernels must not import peft itself"
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
        print(PEFT_TYPE_TO_CONFIG_MAPPING["ILORA"].__name__, PEFT_TYPE_TO_TUNER_MAPPING["ILORA"].__name__)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ILoRAPeftConfig", "ILoRAPeftModel"]


def test_plain_peft_without_ilora_kernels_refuses_the_folder(tmp_path):
    base = nn.Sequential(nn.Linear(8, 8))
    get_peft_model(base, _config(["0"])).save_pretrained(tmp_path)
    result = _run_python(f"""
        import sys
        sys.modules["ilora_kernels"] = None  # as if the package were not installed
        from torch import nn
        from peft import PeftModel
        PeftModel.from_pretrained(nn.Sequential(nn.Linear(8, 8)), {str(tmp_path)!r})
    """)
    assert result.returncode != 0
    assert "ILORA" in result.stderr.splitlines()[-1]


def test_to_peft_model_keeps_the_adapter_and_trains_with_adapter_only_checkpoints():
    torch.manual_seed(0)
    base = tiny_llama().eval()
    ids = pattern_batch(base.config.vocab_size)
    patched = ik.apply_ilora(copy.deepcopy(base), ik.ILoRAConfig(r=4, num_heads=3, alpha=8, dropout=0.0,
                                                                 target_modules=("q_proj", "down_proj")))
    with torch.no_grad():
        for layer in ik.ilora_layers(patched).values():
            layer.lora_b.normal_(std=0.2)
    expected = _output(patched, ids)
    peft_model = pi.to_peft_model(patched)
    assert isinstance(peft_model, PeftModel) and not ik.ilora_layers(peft_model)
    assert len(_adapter_layers(peft_model)) == 2 * base.config.num_hidden_layers
    torch.testing.assert_close(_output(peft_model, ids), expected, rtol=0, atol=0)


def test_init_weights_is_an_alias_of_init_lora_weights():
    """PEFT's generic helpers turn random initialisation on with init_weights=False for non-LoRA configs."""
    config = pi.ILoRAPeftConfig(r=2, lora_alpha=4, target_modules=["0"], init_weights=False)
    assert config.init_lora_weights is False
    model = get_peft_model(nn.Sequential(nn.Linear(6, 5)), config)
    assert all(m.lora_B0["default"].weight.abs().sum() > 0 for m in _adapter_layers(model).values())


def test_transformers_load_adapter_builds_ilora_layers(tmp_path):
    """transformers' own PEFT integration (``PreTrainedModel.load_adapter``) goes through PEFT's registry too."""
    torch.manual_seed(0)
    base = tiny_llama().eval()
    ids = pattern_batch(base.config.vocab_size)
    model = get_peft_model(copy.deepcopy(base), _config(["q_proj", "down_proj"])).eval()
    model.save_pretrained(tmp_path)
    plain = copy.deepcopy(base)
    plain.load_adapter(str(tmp_path))
    assert isinstance(plain.model.layers[0].self_attn.q_proj, pi.ILoRAPeftLinear)
    torch.testing.assert_close(_output(plain, ids), _output(model, ids), rtol=0, atol=0)
