"""Released Crab+ / Crab / HydraLoRA checkpoints: key layouts, files, strictness (``load_crab_checkpoint``,
``load_crab_state_dict``, ``export_crab_state_dict(layout="upstream")``).

Upstream (GeWu-Lab/Crab_Plus) wraps the transformers-4.51 Qwen2.5-Omni thinker in its PeftModel and saves the
``lora_`` parameters by name: ``base_model.model.<thinker path>.lora_{A,B0,B1,B2,route}.weight``, the thinker path
being ``audio_tower.layers.<i>.self_attn.{q,k,v}_proj``, ``visual.blocks.<i>.mlp.{gate,up,down}_proj`` and
``model.layers.<i>.{self_attn.{q,k,v,o}_proj,mlp.{gate,up,down}_proj}``; printed from the full model with a
``thinker.`` in front. The names below are built from that rule and the config, independently of the package.
"""

import copy
import json
import re

import pytest
import torch
from torch import nn

import ilora_kernels as ik
from tiny_models import tiny_qwen2

pytest.importorskip("transformers")
from ilora_kernels.crab import model as crab_model  # noqa: E402

R_7B, HEADS, ALPHA = 128, 3, 256.0


# ----------------------------------------------------------------------------------------------------- helpers
def _upstream_modules(cfg):
    """``{upstream thinker path: (d_in, d_out)}`` of the modules Crab+ adapts (suffixes q/k/v/o/gate/up/down)."""
    a, v, t = cfg.audio_config, cfg.vision_config, cfg.text_config
    kv = t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    h, inter = t.hidden_size, t.intermediate_size
    modules = {}
    for i in range(a.encoder_layers):
        for proj in ("k_proj", "v_proj", "q_proj"):
            modules[f"audio_tower.layers.{i}.self_attn.{proj}"] = (a.d_model, a.d_model)
    for i in range(v.depth):
        modules[f"visual.blocks.{i}.mlp.gate_proj"] = (v.hidden_size, v.intermediate_size)
        modules[f"visual.blocks.{i}.mlp.up_proj"] = (v.hidden_size, v.intermediate_size)
        modules[f"visual.blocks.{i}.mlp.down_proj"] = (v.intermediate_size, v.hidden_size)
    for i in range(t.num_hidden_layers):
        for proj, dims in (("q_proj", (h, h)), ("k_proj", (h, kv)), ("v_proj", (h, kv)), ("o_proj", (h, h))):
            modules[f"model.layers.{i}.self_attn.{proj}"] = dims
        for proj, dims in (("gate_proj", (h, inter)), ("up_proj", (h, inter)), ("down_proj", (inter, h))):
            modules[f"model.layers.{i}.mlp.{proj}"] = dims
    return modules


def _upstream_shapes(cfg, r, heads):
    """``{upstream key: shape}``: what Crab+ saves for this thinker config."""
    shapes = {}
    for module, (d_in, d_out) in _upstream_modules(cfg).items():
        shapes[f"base_model.model.{module}.lora_route.weight"] = (heads, d_in)
        shapes[f"base_model.model.{module}.lora_A.weight"] = (r, d_in)
        for i in range(heads):
            shapes[f"base_model.model.{module}.lora_B{i}.weight"] = (d_out, r)
    return shapes


def _to_transformers5(key):
    """An upstream key in the transformers-5 thinker layout (the test's own spelling of the three renames)."""
    body = key.removeprefix("base_model.model.")
    for old, new in (("audio_tower.", "model.audio_tower."), ("visual.", "model.visual."),
                     ("model.layers.", "model.language_model.layers.")):
        if body.startswith(old):
            return "base_model.model." + new + body[len(old):]
    raise AssertionError(key)


SPELLINGS = {
    "transformers-4.51": lambda key: key,                                   # what finetune_weights.bin holds
    "thinker-prefixed": lambda key: "thinker." + key,                       # as printed from the full model
    "transformers-5": _to_transformers5,
    "no-wrapper": lambda key: key.removeprefix("base_model.model."),
}


def _config_7b():
    from transformers import Qwen2_5OmniThinkerConfig

    # Qwen2.5-Omni-7B: the audio and text defaults are the 7B's; its vision tower is 1280 wide (3420 MLP)
    cfg = Qwen2_5OmniThinkerConfig(vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420,
                                                      num_heads=16, out_hidden_size=3584))
    a, t = cfg.audio_config, cfg.text_config
    assert (a.d_model, a.encoder_layers) == (1280, 32)
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
            t.num_key_value_heads) == (3584, 18944, 28, 28, 4)
    return cfg


@pytest.fixture(scope="module")
def thinker_7b_meta():
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    cfg = _config_7b()
    with torch.device("meta"):
        model = Qwen2_5OmniThinkerForConditionalGeneration(cfg)
    stats = crab_model.apply_crab_ilora(model, r=R_7B, num_heads=HEADS, alpha=ALPHA)
    assert stats["modules"] == 388
    return model, cfg


@pytest.fixture(scope="module")
def _tiny_source():
    torch.manual_seed(0)
    model = crab_model.build_tiny_thinker(seed=0)
    crab_model.apply_crab_ilora(model, r=4, num_heads=HEADS, alpha=8.0, dropout=0.0)
    plain = copy.deepcopy(model)  # the target: same base, adapters at their initial values
    with torch.no_grad():
        for layer in ik.ilora_layers(model).values():
            for p in (layer.lora_a, layer.lora_b, layer.router_weight):
                p.normal_()
    return model, plain


@pytest.fixture
def tiny(_tiny_source):
    """(a tiny thinker with random adapter values, a fresh copy of the same thinker to load into)."""
    source, plain = _tiny_source
    return source, copy.deepcopy(plain)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in ik.export_crab_state_dict(model, prefix="").items()}


def _assert_same(a, b):
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------- the 7B thinker, 1:1
@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_upstream_7b_keys_map_one_to_one(thinker_7b_meta, spelling):
    model, cfg = thinker_7b_meta
    shapes = _upstream_shapes(cfg, R_7B, HEADS)
    assert len(shapes) == 1940
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 870_480_512
    # a few shapes as upstream's results/finetune/finetune/model_trainable_params.txt lists them
    assert shapes["base_model.model.audio_tower.layers.0.self_attn.k_proj.lora_B0.weight"] == (1280, 128)
    assert shapes["base_model.model.visual.blocks.15.mlp.down_proj.lora_route.weight"] == (3, 3420)
    assert shapes["base_model.model.model.layers.27.self_attn.k_proj.lora_B2.weight"] == (512, 128)
    assert shapes["base_model.model.model.layers.25.mlp.down_proj.lora_A.weight"] == (128, 18944)
    state = {SPELLINGS[spelling](k): torch.empty(s, device="meta", dtype=torch.bfloat16) for k, s in shapes.items()}
    report = ik.load_crab_checkpoint(model, state, dry_run=True)  # names and shapes; meta tensors have no values
    layers = ik.ilora_layers(model)
    assert report.complete and report.dry_run
    assert len(report) == len(report.loaded) == len(layers) == 388
    assert len(report.mapping) == 1940
    ours = set(ik.export_crab_state_dict(model, prefix=""))
    assert set(report.mapping.values()) == ours  # onto: every tensor of every layer, each reached once
    assert report.mapping[SPELLINGS[spelling]("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")] \
        == "model.language_model.layers.0.self_attn.q_proj.lora_A.weight"


def test_upstream_7b_meta_tensors_are_refused_by_name_for_a_real_load(thinker_7b_meta):
    model, cfg = thinker_7b_meta
    shapes = _upstream_shapes(cfg, R_7B, HEADS)
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    with pytest.raises(ValueError, match=r"load_crab_checkpoint: base_model\.model\.\S+ is a meta tensor"):
        ik.load_crab_checkpoint(model, state)


def test_upstream_export_of_the_7b_thinker_is_upstreams_names(thinker_7b_meta):
    model, cfg = thinker_7b_meta
    shapes = _upstream_shapes(cfg, R_7B, HEADS)
    exported = ik.export_crab_state_dict(model, layout="upstream")
    assert {k: tuple(v.shape) for k, v in exported.items()} == shapes
    # the default layout is unchanged: our transformers-5 names, which match none of upstream's
    assert not set(ik.export_crab_state_dict(model)) & set(shapes)


# -------------------------------------------------------------------------------- the tiny thinker, real values
def _write(state, container, folder):
    from safetensors.torch import save_file

    if container == "dict":
        return state
    if container == "folder":
        torch.save(state, folder / "finetune_weights.bin")
        return folder
    path = folder / {"bin": "finetune_weights.bin", "pt": "lora_weights.pt",
                     "safetensors": "adapter_model.safetensors"}[container]
    if container == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return str(path)


def test_tiny_upstream_export_is_upstreams_names(tiny):
    source, _ = tiny
    exported = ik.export_crab_state_dict(source, layout="upstream")
    assert {k: tuple(v.shape) for k, v in exported.items()} == _upstream_shapes(source.config, 4, HEADS)
    assert not any("language_model" in k or k.startswith("base_model.model.model.audio_tower") for k in exported)


def _upstream_peft_tree(shapes):
    """A module tree with upstream's parameter names (its PeftModel of the 4.51 thinker, adapters only)."""
    root = nn.Module()
    for key, shape in shapes.items():
        *path, leaf, _ = key.split(".")
        parent = root
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(shape[1], shape[0], bias=False))
    return root


def test_upstream_export_loads_into_upstreams_module_names_with_strict_false(tiny):
    # upstream's inference: thinker_model.load_state_dict(torch.load(finetune_weights.bin), strict=False) on its
    # PeftModel; a name it does not know is skipped without a word, so every name must be its own
    source, _ = tiny
    exported = ik.export_crab_state_dict(source, layout="upstream")
    tree = _upstream_peft_tree(_upstream_shapes(source.config, 4, HEADS))
    result = tree.load_state_dict(exported, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_same(tree.state_dict(), exported)


@pytest.mark.parametrize("container", ["dict", "bin", "pt", "safetensors", "folder"])
@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_export_upstream_then_load_is_exact(tiny, tmp_path, spelling, container):
    source, target = tiny
    state = {SPELLINGS[spelling](k): v for k, v in ik.export_crab_state_dict(source, layout="upstream").items()}
    report = ik.load_crab_checkpoint(target, _write(state, container, tmp_path))
    assert report.complete and not report.dry_run
    assert report == sorted(ik.ilora_layers(target)) and len(report.mapping) == len(state)
    _assert_same(_snapshot(target), _snapshot(source))


def test_load_crab_state_dict_is_the_same_engine(tiny):
    source, target = tiny
    state = ik.export_crab_state_dict(source, layout="upstream")
    report = ik.load_crab_state_dict(target, state)
    assert isinstance(report, ik.CrabLoadReport) and report.complete
    _assert_same(_snapshot(target), _snapshot(source))
    # and the default layout still round-trips
    again = copy.deepcopy(target)
    ik.load_crab_state_dict(again, ik.export_crab_state_dict(source))
    _assert_same(_snapshot(again), _snapshot(source))


# ------------------------------------------------------------------------------------------- strictness
def test_partial_state_dict_is_one_error_naming_the_missing_layer(tiny):
    source, target = tiny
    state = ik.export_crab_state_dict(source, layout="upstream")
    partial = {k: v for k, v in state.items() if ".visual.blocks.1.mlp.down_proj." not in k}
    before = _snapshot(target)
    with pytest.raises(ik.CrabCheckpointError) as info:
        ik.load_crab_checkpoint(target, partial)
    message = str(info.value)
    assert "missing: 1 of 26 layers have no tensors: ['model.visual.blocks.1.mlp.down_proj']" in message
    assert "nothing was loaded" in message and "unused" not in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    _assert_same(_snapshot(target), before)
    # a layer with a head missing is named with what it lacks, in the same one error
    head = "base_model.model.model.layers.1.mlp.up_proj.lora_B2.weight"
    with pytest.raises(KeyError, match=r"(?s)missing: 1 of 26.*incomplete: 1 layer\(s\), e\.g\. layer "
                                       r"'model\.language_model\.layers\.1\.mlp\.up_proj' needs \[.*'lora_B2'"):
        ik.load_crab_checkpoint(target, {k: v for k, v in partial.items() if k != head})
    _assert_same(_snapshot(target), before)


def test_a_projector_key_is_listed_as_unused(tiny):
    source, target = tiny
    state = ik.export_crab_state_dict(source, layout="upstream")
    projector = "base_model.model.visual.merger.mlp.0.weight"
    full = {**state, projector: torch.zeros(64, 128)}
    before = _snapshot(target)
    with pytest.raises(ik.CrabCheckpointError, match=rf"unused: 1 of {len(full)} keys\n.*'{re.escape(projector)}' "
                                                     r"is not a Crab I-LoRA key"):
        ik.load_crab_checkpoint(target, full)
    _assert_same(_snapshot(target), before)
    report = ik.load_crab_checkpoint(target, full, strict=False)
    assert len(report) == 26 and not report.missing and list(report.unused) == [projector]
    assert not report.complete
    _assert_same(_snapshot(target), _snapshot(source))


def test_two_spellings_of_one_key_are_an_error(tiny):
    source, target = tiny
    state = ik.export_crab_state_dict(source, layout="upstream")
    key = "base_model.model.audio_tower.layers.0.self_attn.q_proj.lora_A.weight"
    # the same tensor, same values, under the transformers-5 spelling too
    twice = {**state, _to_transformers5(key): state[key].clone()}
    before = _snapshot(target)
    for strict in (True, False):
        with pytest.raises(ik.CrabCheckpointError, match=r"1 tensor\(s\) spelled twice .* all load into "
                                                         r"model\.audio_tower\.layers\.0\.self_attn\.q_proj\."
                                                         r"lora_A\.weight"):
            ik.load_crab_checkpoint(target, twice, strict=strict)
        _assert_same(_snapshot(target), before)


def test_strict_false_loads_what_fits_and_reports_the_rest(tiny):
    source, target = tiny
    state = ik.export_crab_state_dict(source, layout="upstream")
    gone = "visual.blocks.0.mlp.gate_proj"
    short = "model.layers.0.self_attn.v_proj"
    mixed = {k: v for k, v in state.items() if f".{gone}." not in k and k != f"base_model.model.{short}.lora_B1.weight"}
    mixed["base_model.model.lm_head.weight"] = torch.zeros(1)
    mixed["base_model.model.model.layers.0.mlp.up_proj.lora_B3.weight"] = torch.zeros(1)
    mixed["base_model.model.talker.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(1)
    before = _snapshot(target)
    report = ik.load_crab_checkpoint(target, mixed, strict=False)
    assert report.missing == sorted(["model.visual.blocks.0.mlp.gate_proj",
                                     "model.language_model.layers.0.self_attn.v_proj"])
    assert report.incomplete == {"model.language_model.layers.0.self_attn.v_proj": ["lora_B1"]}
    assert len(report) == 24 and not set(report) & set(report.missing)
    assert set(report.unused) == {"base_model.model.lm_head.weight",
                                  "base_model.model.model.layers.0.mlp.up_proj.lora_B3.weight",
                                  "base_model.model.talker.model.layers.0.self_attn.q_proj.lora_A.weight",
                                  *(f"base_model.model.{short}.lora_{k}.weight" for k in ("A", "B0", "B2", "route"))}
    assert "not a Crab I-LoRA key" in report.unused["base_model.model.lm_head.weight"]
    after, src = _snapshot(target), _snapshot(source)
    for key in after:
        layer = key.rsplit(".", 2)[0]
        assert torch.equal(after[key], (src if layer in report else before)[key]), key
    # strict: the same state dict is one error with every kind of mismatch, and nothing changes
    fresh = copy.deepcopy(target)
    ik.load_crab_state_dict(fresh, {k: before[k] for k in before})  # back to the initial values
    with pytest.raises(KeyError, match=r"(?s)missing: 1 of 26.*incomplete: 1 layer.*unused: 7 of .*is not a Crab "
                                       r"I-LoRA key.*no I-LoRA layer named \['talker\.model\.layers\.0\.self_attn\."
                                       r"q_proj'\].*has 3 heads"):
        ik.load_crab_checkpoint(fresh, mixed)
    _assert_same(_snapshot(fresh), before)


def test_dry_run_copies_nothing(tiny):
    source, target = tiny
    before = _snapshot(target)
    report = ik.load_crab_checkpoint(target, ik.export_crab_state_dict(source, layout="upstream"), dry_run=True)
    assert report.complete and report.dry_run and len(report) == 26
    _assert_same(_snapshot(target), before)


# -------------------------------------------------------------------------------------------------- files
def test_folder_with_several_or_no_checkpoint_files(tiny, tmp_path):
    source, target = tiny
    state = ik.export_crab_state_dict(source, layout="upstream")
    torch.save(state, tmp_path / "finetune_weights.bin")
    torch.save(state, tmp_path / "lora_weights.bin")
    (tmp_path / "non_lora_trainables.bin").write_bytes(b"")  # not a candidate name
    with pytest.raises(ValueError, match=r"holds several checkpoint files \['finetune_weights\.bin', "
                                         r"'lora_weights\.bin'\]; pass the one to load"):
        ik.load_crab_checkpoint(target, tmp_path)
    assert ik.load_crab_checkpoint(target, tmp_path / "lora_weights.bin").complete
    empty = tmp_path / "empty"
    empty.mkdir()
    torch.save(state, empty / "weights.pt")
    with pytest.raises(FileNotFoundError, match=r"holds none of .*; it has \['weights\.pt'\]: pass the file"):
        ik.load_crab_checkpoint(target, empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ik.load_crab_checkpoint(target, tmp_path / "nope.bin")


class _NotATensor:
    pass


def test_files_are_read_with_weights_only_and_other_formats_refused(tiny, tmp_path):
    _, target = tiny
    (tmp_path / "finetune_weights.bin").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"cannot read .*finetune_weights\.bin with torch\.load\(weights_only=True\)"):
        ik.load_crab_checkpoint(target, tmp_path)
    torch.save({"a": _NotATensor()}, tmp_path / "pickle.pt")  # arbitrary objects: refused when unpickling
    with pytest.raises(ValueError, match=r"weights_only=True"):
        ik.load_crab_checkpoint(target, tmp_path / "pickle.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(TypeError, match="holds a list, not a state dict"):
        ik.load_crab_checkpoint(target, tmp_path / "list.pt")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"neither a torch\.save file"):
        ik.load_crab_checkpoint(target, tmp_path / "weights.npz")


def test_a_save_ilora_folder_is_pointed_to_load_ilora(tiny, tmp_path):
    source, target = tiny
    ik.save_ilora(source, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["format"] == "ilora"
    with pytest.raises(ValueError, match="is a save_ilora adapter .* load it with load_ilora"):
        ik.load_crab_checkpoint(target, tmp_path)


# ------------------------------------------------------------------------------- Crab v1 / HydraLoRA names
class _HydraLinear(nn.Module):
    """The parameter layout of HydraLoRA's / Crab's peft_hyper Linear: lora_route, lora_A, lora_B<i> (nn.Linear,
    no bias) next to the frozen weight."""

    def __init__(self, base: nn.Linear, r: int, heads: int):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.lora_route = nn.Linear(base.in_features, heads, bias=False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        for i in range(heads):
            setattr(self, f"lora_B{i}", nn.Linear(r, base.out_features, bias=False))


def test_crab_v1_and_hydralora_keys_load_into_an_llm():
    # Crab (v1) and HydraLoRA wrap a causal LM with their PeftModel (base_model.model.<LM path>) and save the
    # parameters whose names hold "lora_"
    torch.manual_seed(0)
    llm = tiny_qwen2()
    theirs = copy.deepcopy(llm)
    for name, module in list(theirs.named_modules()):
        if name.endswith(("q_proj", "v_proj")):
            parent, child = name.rsplit(".", 1)
            setattr(theirs.get_submodule(parent), child, _HydraLinear(module, r=4, heads=HEADS))
    peft_like = nn.Module()
    peft_like.base_model = nn.Module()
    peft_like.base_model.model = theirs
    saved = {k: v.detach().clone() for k, v in peft_like.named_parameters() if "lora_" in k}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B2.weight" in saved
    ik.apply_ilora(llm, ik.ILoRAConfig(r=4, num_heads=HEADS, alpha=8, target_modules=("q_proj", "v_proj")))
    report = ik.load_crab_checkpoint(llm, saved)
    assert report.complete and len(report) == 2 * llm.config.num_hidden_layers
    for name, layer in ik.ilora_layers(llm).items():
        hydra = theirs.get_submodule(name)
        assert torch.equal(layer.lora_a, hydra.lora_A.weight)
        assert torch.equal(layer.router_weight, hydra.lora_route.weight)
        assert all(torch.equal(layer.lora_b[i], getattr(hydra, f"lora_B{i}").weight) for i in range(HEADS))
