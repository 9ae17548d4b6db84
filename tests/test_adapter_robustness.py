"""Robustness of adapter files and of patching: a save killed at any step leaves the old or the new adapter
loadable; a patched model refuses an adapter saved with other hyperparameters or from another base model; values
are checked for finiteness in the model's dtype (float8 files included); wrong-typed config values are refused
naming the file and the key; a refused load leaves the model exactly as it was; and apply_ilora explains the
string-target rule and names the matched modules it cannot adapt."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from adapter_folders import CONFIG, DELETE, WEIGHTS
from adapter_folders import edit_config as _edit_config
from torch import nn

import ilora_kernels as ik
from ilora_kernels import adapters
from ilora_kernels.patching import get_ilora_config
from tiny_models import patched_tiny_model, tiny_llama, tiny_qwen2, token_batch

_patched = patched_tiny_model
_DELETE = DELETE


def _adapter(model):
    return {k: v.detach().clone() for k, v in adapters.adapter_state_dict(model).items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rewrite(folder, tensors):
    """Writes tensors as the weights file and records their checksum, so that the fault under test is what the
    loader must catch."""
    from safetensors.torch import save_file
    save_file(tensors, folder / WEIGHTS)
    _edit_config(folder, weights_sha256=adapters._sha256(folder / WEIGHTS))




def _model_snapshot(model):
    """Everything a load could change: every module (name, object, type, I-LoRA attributes), every parameter
    (name, requires_grad, dtype, values) and buffer."""
    modules = [(name, id(m), type(m), {k: v for k, v in vars(m).items() if k.startswith("_ilora")})
               for name, m in model.named_modules()]
    params = [(name, p.requires_grad, p.dtype, p.detach().clone()) for name, p in model.named_parameters()]
    buffers = [(name, b.detach().clone()) for name, b in model.named_buffers()]
    return modules, params, buffers


def _assert_unchanged(before, after):
    assert before[0] == after[0], "modules, their types or their I-LoRA attributes changed"
    assert [p[:3] for p in before[1]] == [p[:3] for p in after[1]], "parameters or requires_grad flags changed"
    assert all(torch.equal(b[3], a[3]) for b, a in zip(before[1], after[1])), "parameter values changed"
    assert [b[0] for b in before[2]] == [a[0] for a in after[2]]
    assert all(torch.equal(b[1], a[1]) for b, a in zip(before[2], after[2])), "buffer values changed"


def _leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in (WEIGHTS, CONFIG))


# ---------------------------------------------------------------------------------------------------------------
# 1. a save is atomic as a whole: a kill at any step leaves the old or the new adapter loadable

_KILL_SCRIPT = textwrap.dedent('''
    """For k = 0, 1, ...: copies the template folder and writes the adapter into the copy in a forked child that
    dies (os._exit: no cleanup, no finally) before its k-th file-system step, until a save completes. Prints one
    JSON list of {"folder", "step", "completed"}."""
    import errno, json, os, shutil, sys, traceback
    from safetensors.torch import load_file
    from ilora_kernels import adapters

    template, tensors_file, meta_file, out, no_link = sys.argv[1:6]
    tensors, meta = load_file(tensors_file), json.loads(open(meta_file).read())
    STEPS = [(os, "replace"), (os, "rename"), (os, "link"), (os, "unlink"), (os, "remove"), (shutil, "copyfile"),
             (shutil, "copy2"), (adapters, "_write_weights"), (adapters, "_write_config"), (adapters, "_fsync")]
    KILLED = 97

    def no_hard_links(*args, **kwargs):
        raise OSError(errno.EPERM, "no hard links on this file system")

    results = []
    for k in range(100):
        folder = os.path.join(out, f"kill{k:02d}")
        shutil.copytree(template, folder)
        step_file = folder + ".step"
        pid = os.fork()
        if pid == 0:
            calls = [0]

            def hooked(name, real):
                def step(*args, **kwargs):
                    if calls[0] == k:
                        with open(step_file, "w") as f:
                            f.write(" ".join([name] + [os.path.basename(a) if isinstance(a, (str, os.PathLike))
                                                   else type(a).__name__ for a in args[:2]]))
                        os._exit(KILLED)
                    calls[0] += 1
                    return real(*args, **kwargs)
                return step

            for owner, name in STEPS:
                real = no_hard_links if (name == "link" and no_link == "1") else getattr(owner, name)
                setattr(owner, name, hooked(name, real))
            try:
                adapters.write_adapter(folder, tensors, meta)
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
                os._exit(1)
            os._exit(0)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code == KILLED:
            results.append({"folder": folder, "step": open(step_file).read(), "completed": False})
            continue
        if code != 0:
            sys.exit(f"the writer failed at k={k} (exit {code})")
        results.append({"folder": folder, "step": "none", "completed": True})
        break
    print(json.dumps(results))
''')


def _writer_arguments(model):
    """The (tensors, meta) that save_ilora hands to the one writer for this model."""
    captured = {}

    def capture(path, tensors, meta):
        captured.update(tensors=dict(tensors), meta=dict(meta))
        return Path(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adapters, "write_adapter", capture)
        ik.save_ilora(model, "unused")
    return captured["tensors"], captured["meta"]


def _kill_at_every_step(tmp_path, template, model, no_link=False):
    from safetensors.torch import save_file
    tensors, meta = _writer_arguments(model)
    work = tmp_path / f"kills-{template.name}-{int(no_link)}"
    work.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, work / "tensors.safetensors")
    (work / "meta.json").write_text(json.dumps(meta))
    (work / "kill.py").write_text(_KILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(work / "kill.py"), str(template), str(work / "tensors.safetensors"),
                           str(work / "meta.json"), str(work), "1" if no_link else "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _read_back(folder, candidates):
    """Which of the candidate adapters (name -> (adapter tensors, alpha)) the folder holds, as load_ilora reads it
    (into an unpatched model, so the config's alpha is used) and as a reader of adapters.weights_file does; both
    must agree, and the config must be the one saved with those weights."""
    model = ik.load_ilora(tiny_qwen2(), folder)
    state = _adapter(model)
    found = [name for name, (tensors, _) in candidates.items() if _equal(state, tensors)]
    assert len(found) == 1, f"{folder} loads an adapter that is none of {sorted(candidates)}"
    name = found[0]
    assert get_ilora_config(model).alpha == candidates[name][1], f"{folder}: the config of another save"

    from safetensors.torch import load_file
    meta = json.loads((Path(folder) / CONFIG).read_text())
    path = adapters.weights_file(Path(folder), meta, "test reader", "save_ilora")
    assert meta["alpha"] == candidates[name][1] and _equal(load_file(path), candidates[name][0])
    return name


def _assert_old_or_new(results, old, new):
    """old, new: (adapter tensors, alpha). Every killed folder holds one of the two, both occur, the completed save
    holds the new one and nothing else, and a later save over any killed folder succeeds and removes the backups."""
    seen = []
    for result in results:
        name = _read_back(result["folder"], {"old": old, "new": new})
        seen.append((result["step"], name))
        if result["completed"]:           # no backup left (a killed save before it may have left a temporary file)
            assert name == "new" and [n for n in _leftovers(result["folder"]) if not n.endswith(".tmp")] == []
    assert results[-1]["completed"] and {name for _, name in seen} == {"old", "new"}, seen
    third = _patched(seed=7, alpha=2)
    for result in results:
        ik.save_ilora(third, result["folder"])
        assert _read_back(result["folder"], {"third": (_adapter(third), 2)}) == "third"
        assert [n for n in _leftovers(result["folder"]) if not n.endswith(".tmp")] == [], result["step"]
    return seen


@pytest.mark.parametrize("no_link", [False, True], ids=["hard-link", "copy"])
def test_a_kill_at_any_step_of_a_save_leaves_the_old_or_the_new_adapter(tmp_path, no_link):
    old, new = _patched(seed=0, alpha=8), _patched(seed=1, alpha=16)
    template = tmp_path / "adapter"
    ik.save_ilora(old, template)
    results = _kill_at_every_step(tmp_path, template, new, no_link=no_link)
    assert len(results) >= 6 and _leftovers(results[-1]["folder"]) == []
    _assert_old_or_new(results, (_adapter(old), 8), (_adapter(new), 16))


def test_a_kill_during_a_save_over_an_interrupted_save(tmp_path):
    """The folder already holds an interrupted save (the new weights in place, the old config): a second save,
    killed at any step, still leaves the adapter that loaded before it (the oldest) or its own."""
    old, mid, new = _patched(seed=0, alpha=8), _patched(seed=1, alpha=16), _patched(seed=2, alpha=4)
    template = tmp_path / "adapter"
    ik.save_ilora(old, template)
    first = _kill_at_every_step(tmp_path, template, mid)
    torn = [r["folder"] for r in first if not r["completed"]
            and adapters._sha256(Path(r["folder"]) / WEIGHTS)
            != json.loads((Path(r["folder"]) / CONFIG).read_text())["weights_sha256"]]
    assert torn, "no step left the new weights beside the old config"
    interrupted = tmp_path / "interrupted"
    shutil.copytree(torn[0], interrupted)
    assert _read_back(interrupted, {"old": (_adapter(old), 8), "mid": (_adapter(mid), 16)}) == "old"
    second = _kill_at_every_step(tmp_path, interrupted, new)
    _assert_old_or_new(second, (_adapter(old), 8), (_adapter(new), 4))


def test_a_kill_during_a_save_over_an_adapter_without_checksum(tmp_path):
    """Folders written before checksums (no weights_sha256 in the config) are overwritten just as safely."""
    old, new = _patched(seed=0, alpha=8), _patched(seed=1, alpha=16)
    template = tmp_path / "adapter"
    ik.save_ilora(old, template)
    _edit_config(template, weights_sha256=_DELETE)
    results = _kill_at_every_step(tmp_path, template, new)
    _assert_old_or_new(results, (_adapter(old), 8), (_adapter(new), 16))


class Crash(Exception):
    pass


def _crash_at_step(monkeypatch, k):
    """Makes the k-th call (from 0) of the writer's file-system steps raise Crash; later calls run."""
    calls = [0]

    def hooked(real):
        def step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == k + 1:
                raise Crash(f"step {k}")
            return real(*args, **kwargs)
        return step
    for owner, name in [(os, "replace"), (os, "link"), (os, "unlink"), (adapters, "_write_weights"),
                        (adapters, "_write_config"), (adapters, "_fsync")]:
        monkeypatch.setattr(owner, name, hooked(getattr(owner, name)))


def test_an_exception_at_any_step_of_a_save_leaves_the_old_adapter_untouched(tmp_path):
    """An exception (not a kill) anywhere in a save rolls the folder back: the old adapter loads and no file is
    left behind, or the save had already completed."""
    old, new = _patched(seed=0, alpha=8), _patched(seed=1, alpha=16)
    for k in range(100):
        folder = tmp_path / f"crash{k}"
        ik.save_ilora(old, folder)
        with pytest.MonkeyPatch.context() as mp:
            _crash_at_step(mp, k)
            try:
                ik.save_ilora(new, folder)
                completed = True
            except Crash:
                completed = False
        name = _read_back(folder, {"old": (_adapter(old), 8), "new": (_adapter(new), 16)})
        if completed:
            assert name == "new" and _leftovers(folder) == []
            break
        if name == "old":
            assert _leftovers(folder) == [], f"step {k}"
    assert k >= 6


def test_check_weights_refuses_the_torn_weights_file_and_names_the_intact_copy(tmp_path):
    """check_weights (same signature as before) keeps refusing a weights file that does not match its config, so
    that a reader which then opens adapter_model.safetensors itself never mixes two saves; weights_file names the
    file to read instead."""
    old, new = _patched(seed=0, alpha=8), _patched(seed=1, alpha=16)
    template = tmp_path / "adapter"
    ik.save_ilora(old, template)
    results = _kill_at_every_step(tmp_path, template, new)
    for result in results:
        folder = Path(result["folder"])
        meta = json.loads((folder / CONFIG).read_text())
        path = adapters.weights_file(folder, meta, "reader", "save_ilora")
        if path == folder / WEIGHTS:
            adapters.check_weights(folder, meta, "reader", "save_ilora")
        else:
            with pytest.raises(ValueError, match=rf"interrupted save_ilora.*{path.name}.*adapters.weights_file"):
                adapters.check_weights(folder, meta, "reader", "save_ilora")


# ---------------------------------------------------------------------------------------------------------------
# 2. the saved alpha, top_k and dropout are checked against a patched model, and used for an unpatched one


@pytest.mark.parametrize("field,saved_value,model_value", [
    ("alpha", 16, 8), ("top_k", 2, None), ("dropout", 0.1, 0.0),
])
def test_a_patched_model_refuses_other_hyperparameters(tmp_path, field, saved_value, model_value):
    folder = tmp_path / "adapter"
    ik.save_ilora(_patched(**{field: saved_value}), folder)
    model = _patched(seed=1, **{field: model_value})
    before = _model_snapshot(model)
    with pytest.raises(ValueError) as info:
        ik.load_ilora(model, folder)
    message = str(info.value)
    assert str(folder / CONFIG) in message
    assert f"has {field}={saved_value!r} but the model's I-LoRA layers have {field}={model_value!r}" in message
    _assert_unchanged(before, _model_snapshot(model))


def test_an_unpatched_model_takes_the_saved_hyperparameters(tmp_path):
    source = _patched(alpha=16, top_k=2, dropout=0.1)
    ik.save_ilora(source, tmp_path / "adapter")
    torch.manual_seed(0)
    model = ik.load_ilora(tiny_qwen2(), tmp_path / "adapter")
    config = get_ilora_config(model)
    assert (config.alpha, config.top_k, config.dropout) == (16, 2, 0.1)
    assert all((layer.alpha, layer.top_k, layer.dropout) == (16, 2, 0.1) for layer in ik.ilora_layers(model).values())
    ids = token_batch(model.config.vocab_size)
    source.eval(), model.eval()
    assert torch.equal(model(ids).logits, source(ids).logits)


# ---------------------------------------------------------------------------------------------------------------
# 3. finiteness in the model's dtype, any floating dtype in the file, meta tensors


def _lora_b_key(tensors):
    return sorted(k for k in tensors if k.endswith("lora_b"))[0]


def test_values_that_overflow_the_model_dtype_are_refused(tmp_path):
    """A float16 adapter (autocast_adapter_dtype=False: the adapter in the base's dtype) cannot hold 1e5."""
    source = _patched(autocast_adapter_dtype=False)
    key = _lora_b_key(adapters.adapter_state_dict(source))
    with torch.no_grad():
        ik.ilora_layers(source)[key.rsplit(".", 1)[0]].lora_b[0, 0, 0] = 1e5    # finite in float32, inf in float16
    folder = tmp_path / "adapter"
    ik.save_ilora(source, folder)
    torch.manual_seed(1)
    half = tiny_qwen2().half()
    ik.apply_ilora(half, ik.ILoRAConfig(r=4, num_heads=3, alpha=8, dropout=0.0, autocast_adapter_dtype=False))
    for model in (half, tiny_qwen2().half()):                   # patched, and unpatched (patched on load)
        before = _model_snapshot(model)
        with pytest.raises(ValueError, match=rf"{key} has 1 value\(s\) that are not finite in torch.float16"):
            ik.load_ilora(model, folder)
        _assert_unchanged(before, _model_snapshot(model))
    ik.load_ilora(_patched(seed=2), folder)                       # float32 holds 1e5


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_float8_file_loads_cast_and_its_nan_is_refused(tmp_path, dtype):
    from safetensors.torch import load_file
    folder = tmp_path / "adapter"
    ik.save_ilora(_patched(), folder)
    tensors = load_file(folder / WEIGHTS)
    key = _lora_b_key(tensors)
    tensors[key] = tensors[key].to(dtype)
    _rewrite(folder, tensors)
    model = ik.load_ilora(_patched(seed=1), folder)
    assert torch.equal(adapters.adapter_state_dict(model)[key], tensors[key].float())

    tensors[key][0, 0, 0] = float("nan")
    _rewrite(folder, tensors)
    target = _patched(seed=1)
    before = _model_snapshot(target)
    with pytest.raises(ValueError, match=rf"{key} has 1 non-finite value\(s\)"):
        ik.load_ilora(target, folder)
    _assert_unchanged(before, _model_snapshot(target))


def test_crab_import_refuses_meta_tensors_and_overflow_naming_the_key():
    source = _patched(seed=0)
    state = ik.export_crab_state_dict(source)
    key = sorted(k for k in state if k.endswith("lora_A.weight"))[0]
    target = _patched(seed=1)
    before = _model_snapshot(target)
    with pytest.raises(ValueError, match=rf"load_crab_state_dict: {key} is a meta tensor"):
        ik.load_crab_state_dict(target, dict(state, **{key: torch.empty(state[key].shape, device="meta")}))
    _assert_unchanged(before, _model_snapshot(target))

    torch.manual_seed(1)
    half = tiny_qwen2().half()
    ik.apply_ilora(half, ik.ILoRAConfig(r=4, num_heads=3, alpha=8, dropout=0.0, autocast_adapter_dtype=False))
    big = torch.full(state[key].shape, 1e5)
    before = _model_snapshot(half)
    with pytest.raises(ValueError, match=rf"load_crab_state_dict: {key} has {big.numel()} value\(s\) that are not "
                                         rf"finite in torch.float16"):
        ik.load_crab_state_dict(half, dict(state, **{key: big}))
    _assert_unchanged(before, _model_snapshot(half))
    float8 = {k: v.to(torch.float8_e4m3fn) for k, v in state.items()}
    ik.load_crab_state_dict(target, float8)
    assert torch.equal(ik.export_crab_state_dict(target)[key], float8[key].float())


# ---------------------------------------------------------------------------------------------------------------
# 4. wrong-typed config values are refused naming the file and the key; a refused load changes nothing


_BAD_VALUES = [
    ("alpha", True), ("backend", "fast"), ("weights_sha256", 12345), ("weights_sha256", "ABC"), ("r", "8"),
    ("target_modules", 5), ("target_modules", {"q_proj": 1}), ("target_modules", "("), ("target_modules", ["nothing"]),
    ("modules", "x"), ("modules", ["x"]), ("top_k", 2.0), ("dropout", "0.1"), ("num_heads", [3]),
    ("base_model", "qwen2"), ("base_model", {"class": 5}),
]


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("key,value", _BAD_VALUES, ids=[f"{k}={v!r}" for k, v in _BAD_VALUES])
def test_a_wrong_config_value_is_refused_naming_the_file_and_the_key(tmp_path, build, key, value):
    folder = tmp_path / "adapter"
    ik.save_ilora(_patched(build), folder)
    _edit_config(folder, **{key: value})
    for model in (build(), _patched(build, seed=1)):           # unpatched, patched
        before = _model_snapshot(model)
        with pytest.raises(ValueError) as info:
            ik.load_ilora(model, folder)
        message = str(info.value)
        assert str(folder / CONFIG) in message and re.search(rf"\b{key}\b", message), message
        if key == "weights_sha256":                      # a malformed checksum, not a folder that mixes two saves
            assert "is not a SHA-256 hex digest" in message, message
        _assert_unchanged(before, _model_snapshot(model))


def _int8_linear(model):
    """A base model one of whose target layers holds int8 weights (as a quantized layer does): patching it fails
    half-way, after other layers were wrapped."""
    linear = model.model.layers[1].mlp.down_proj
    linear.weight = nn.Parameter(torch.ones_like(linear.weight, dtype=torch.int8), requires_grad=False)
    return model


def _fault(folder, name):
    from safetensors.torch import load_file
    tensors = load_file(folder / WEIGHTS)
    key = _lora_b_key(tensors)
    if name == "checksum":
        data = bytearray((folder / WEIGHTS).read_bytes())
        data[-3] ^= 0x01
        (folder / WEIGHTS).write_bytes(bytes(data))
    elif name == "missing key":
        _rewrite(folder, {k: v for k, v in tensors.items() if k != key})
    elif name == "shape":
        _rewrite(folder, dict(tensors, **{key: torch.zeros(3, 5, 4)}))
    elif name == "nan":
        tensors[key][0, 0, 0] = float("nan")
        _rewrite(folder, tensors)
    elif name == "no weights":
        (folder / WEIGHTS).unlink()
    elif name == "other base":
        _edit_config(folder, base_model={"class": "LlamaForCausalLM", "model_type": "llama", "name_or_path": None})
    elif name == "bad json":
        (folder / CONFIG).write_text("{")


@pytest.mark.parametrize("fault", ["checksum", "missing key", "shape", "nan", "no weights", "other base", "bad json",
                                   "int8 base layer"])
def test_a_refused_load_leaves_the_model_exactly_as_it_was(tmp_path, fault):
    folder = tmp_path / "adapter"
    ik.save_ilora(_patched(), folder)
    if fault != "int8 base layer":
        _fault(folder, fault)
    unpatched = tiny_qwen2()
    models = [unpatched, _patched(seed=1)]
    if fault == "int8 base layer":
        _int8_linear(unpatched)
        models = [unpatched]
    for model in models:
        before = _model_snapshot(model)
        with pytest.raises((ValueError, KeyError, FileNotFoundError, TypeError)):
            ik.load_ilora(model, folder)
        _assert_unchanged(before, _model_snapshot(model))


def test_a_failed_apply_ilora_leaves_the_model_as_it_was():
    model = _int8_linear(tiny_qwen2())
    before = _model_snapshot(model)
    with pytest.raises(ValueError, match=r"apply_ilora: cannot wrap model.layers.1.mlp.down_proj"):
        ik.apply_ilora(model, ik.ILoRAConfig(r=4, num_heads=3))
    _assert_unchanged(before, _model_snapshot(model))


# ---------------------------------------------------------------------------------------------------------------
# 5. the base model's identity is recorded and checked


def _qwen2_like_llama():
    """A Qwen2 with every width of tiny_llama: its adapter has exactly the keys and shapes of a Llama adapter."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
    return Qwen2ForCausalLM(cfg)


def test_the_saved_config_records_the_base_model(tmp_path):
    model = _patched()
    model.config._name_or_path = "org/tiny-qwen2"
    ik.save_ilora(model, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / CONFIG).read_text())
    assert meta["base_model"] == {"class": "Qwen2ForCausalLM", "model_type": "qwen2", "name_or_path": "org/tiny-qwen2"}
    plain = ik.apply_ilora(_Plain(), ik.ILoRAConfig(r=2, num_heads=2, target_modules=("proj",)))
    ik.save_ilora(plain, tmp_path / "plain")
    meta = json.loads((tmp_path / "plain" / CONFIG).read_text())
    assert meta["base_model"] == {"class": "_Plain", "model_type": None, "name_or_path": None}
    assert _equal(_adapter(ik.load_ilora(_Plain(), tmp_path / "plain")), _adapter(plain))


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


def test_an_adapter_of_another_base_model_is_refused_unless_allowed(tmp_path):
    source = _patched(_qwen2_like_llama)
    folder = tmp_path / "adapter"
    ik.save_ilora(source, folder)
    for model in (tiny_llama(), _patched(tiny_llama, seed=1)):
        before = _model_snapshot(model)
        with pytest.raises(ValueError) as info:
            ik.load_ilora(model, folder)
        message = str(info.value)
        for part in (str(folder / CONFIG), "Qwen2ForCausalLM", "'qwen2'", "LlamaForCausalLM", "'llama'",
                     "allow_other_base=True"):
            assert part in message, message
        _assert_unchanged(before, _model_snapshot(model))
        ik.load_ilora(model, folder, allow_other_base=True)
        assert _equal(_adapter(model), _adapter(source))


def test_an_adapter_without_a_base_model_record_still_loads(tmp_path):
    source = _patched(_qwen2_like_llama)
    folder = tmp_path / "adapter"
    ik.save_ilora(source, folder)
    _edit_config(folder, base_model=_DELETE)
    model = ik.load_ilora(tiny_llama(), folder)
    assert _equal(_adapter(model), _adapter(source))


# ---------------------------------------------------------------------------------------------------------------
# 6. apply_ilora's messages: the string-target rule, unsupported module types


def test_a_string_target_that_matches_nothing_explains_the_regex_rule():
    model = tiny_llama()
    with pytest.raises(ValueError) as info:
        ik.apply_ilora(model, ik.ILoRAConfig(r=2, num_heads=2, target_modules="q_proj"))
    message = str(info.value)
    for part in ("re.fullmatch", "whole dotted module name", "target_modules=['q_proj']", r'r".*\.q_proj"'):
        assert part in message, message
    assert "Near misses" not in message, message                  # "q_proj" is no near miss of "q_proj"
    assert not ik.ilora_layers(model) and all(p.requires_grad for p in model.parameters())


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))


def test_matched_conv1d_modules_are_named_as_unsupported():
    model = _tiny_gpt2()
    before = _model_snapshot(model)
    with pytest.raises(ValueError) as info:
        ik.apply_ilora(model, ik.ILoRAConfig(r=2, num_heads=2, target_modules=("c_attn", "c_proj")))
    message = str(info.value)
    for part in ("transformers.pytorch_utils.Conv1D", "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                 "transformer.h.0.mlp.c_proj", "not nn.Linear"):
        assert part in message, message
    _assert_unchanged(before, _model_snapshot(model))
    with pytest.raises(ValueError, match=r"transformers.pytorch_utils.Conv1D"):
        ik.apply_ilora(model, ik.ILoRAConfig(r=2, num_heads=2, target_modules=r".*\.c_\w+"))


def test_skipped_unsupported_modules_are_warned_about():
    model = _tiny_gpt2()
    with pytest.warns(UserWarning, match=r"transformer.h.0.attn.c_attn.*transformers.pytorch_utils.Conv1D"):
        ik.apply_ilora(model, ik.ILoRAConfig(r=2, num_heads=2, target_modules=("c_attn", "lm_head")))
    assert sorted(ik.ilora_layers(model)) == ["lm_head"]


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(3, 3, 1)
        self.proj = nn.Linear(8, 8)


def test_conv2d_and_embedding_targets_are_named_as_unsupported():
    with pytest.raises(ValueError) as info:
        ik.apply_ilora(_Mixed(), ik.ILoRAConfig(r=2, num_heads=2, target_modules=("embed", "conv")))
    message = str(info.value)
    assert "conv" in message and "Conv2d" in message and "embed" in message and "Embedding" in message, message
    model = _Mixed()
    with pytest.warns(UserWarning) as record:
        ik.apply_ilora(model, ik.ILoRAConfig(r=2, num_heads=2, target_modules=("embed", "conv", "proj")))
    warned = " ".join(str(w.message) for w in record)
    for part in ("embed (torch.nn.modules.sparse.Embedding)", "conv (torch.nn.modules.conv.Conv2d)"):
        assert part in warned, warned
    assert sorted(ik.ilora_layers(model)) == ["proj"]
