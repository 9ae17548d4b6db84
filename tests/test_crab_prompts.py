"""The prompt file's layout parameters: a fixture file laid out as upstream's (GeWu-Lab/Crab_Plus
``dataset/qwen2_5_omni/omni_dataset.py``) renders, through the tiny processor's chat template, exactly the chat
text upstream's structure gives; the shipped file still renders our layout; bad files are named errors.

Upstream's structure, per sample: a system turn (a string); a user turn whose content list is [intro text, media
items, instruction text] with nothing added between them (the Qwen2.5-Omni chat template concatenates the parts);
media in the order video, audio (video tasks), image, audio (image tasks), audio, video 1, video 2 (a2v), video,
audio 1, audio 2 (v2a); for a2v (v2a) the rendered text then keeps only the last video (audio) placeholder, the two
clips' frames (waveforms) being concatenated into one input; train: an assistant turn, test: the generation prompt.
The wording below is written for this test only; the structure is upstream's."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from ilora_kernels.crab.data import Sample, _render, build_messages  # noqa: E402
from ilora_kernels.crab.prompts import (  # noqa: E402  # noqa: E402
    RENDER_DEFAULTS,
    load_prompts,
    media_order,
    render_params,
    task_instruction,
)
from ilora_kernels.crab.tasks import MEDIA_FIELDS, TASKS  # noqa: E402

V = "<|vision_bos|><|VIDEO|><|vision_eos|>"
A = "<|audio_bos|><|AUDIO|><|audio_eos|>"
I = "<|vision_bos|><|IMAGE|><|vision_eos|>"  # noqa: E741

SYSTEM = "You are a test model that can see pictures and hear sounds."
INTRO = {"video_audio": "Here come a clip and its sound:", "a2v": "Here come two clips and a sound:",
         "v2a": "Here come a clip and two sounds:", "image_audio": "Here come a still and a sound:"}
# upstream-like instructions: a question slot (avqa), question and options (avqa_thu), a lower-cased referring
# expression inside tags (ref_avs), fixed text elsewhere
INSTR = {t: f"Do the {t} thing." for t in TASKS}
INSTR.update({
    "avqa": "Answer this question please: {question}",
    "avqa_thu": "Answer using the options: {question}, options:{options}",
    "ref_avs": "Find the thing called <des>{question:lower}</des>. Say \"true\" or \"false\" first.",
})
UPSTREAM_LIKE = {
    "system": SYSTEM,
    "intro": INTRO,
    "tasks": INSTR,
    "render": {
        "intro_separator": "",
        "instruction_separator": "",
        "clip_labels": {},
        "clip_separator": "",
        "media_order": {"a2v": ["audio", "video"]},
        "pack_clips": ["a2v", "v2a"],
        "options_join": None,
        "strip_question": False,
    },
}


@pytest.fixture(scope="module")
def processor():
    from ilora_kernels.crab.model import build_tiny_processor
    return build_tiny_processor()


@pytest.fixture
def upstream_file(tmp_path):
    p = tmp_path / "upstream_like.json"
    p.write_text(json.dumps(UPSTREAM_LIKE, indent=2))
    return p


def _sample(task, target="T", question="", options=None):
    media = {}
    for fld, kind, _ in MEDIA_FIELDS[TASKS[task].media]:
        media.setdefault(kind, []).append(Path("/nowhere") / fld)
    s = Sample(task=task, index=0, target=target, instruction=question, media=media)
    if options is not None:
        s.options = options
    return s


def _upstream_text(task, user_parts, target=None):
    """The chat text upstream's code gives: its conversation through the Qwen2.5-Omni chat template, then for
    a2v / v2a all but the last video / audio placeholder removed."""
    text = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{''.join(user_parts)}<|im_end|>\n"
    text += "<|im_start|>assistant\n" + (f"{target}<|im_end|>\n" if target is not None else "")
    for t, ph in (("a2v", V), ("v2a", A)):
        if task == t and text.count(ph) > 1:
            text = text.replace(ph, "", text.count(ph) - 1)
    return text


def _ours(processor, sample, prompts, train):
    return _render(processor, build_messages(sample, prompts, with_answer=train), add_generation_prompt=not train)


# one case per task family: (sample, the user turn's parts in upstream's order)
def _cases():
    q = "  Which instrument plays FIRST?"   # verbatim (upstream's f-string keeps the spaces)
    opts = ["Cello", "Guitar", "Piano", "Violin"]
    return {
        "single video (ks)": (_sample("ks", "<answer>drumming</answer>"), [INTRO["video_audio"], V, A, INSTR["ks"]]),
        "video + audio (meld)": (_sample("meld", "<answer>joy</answer>."), [INTRO["video_audio"], V, A,
                                                                            INSTR["meld"]]),
        "question (avqa)": (_sample("avqa", "It is the cello.", q),
                            [INTRO["video_audio"], V, A, f"Answer this question please: {q}"]),
        "question + options (avqa_thu)": (_sample("avqa_thu", "Piano", q, opts),
                                          [INTRO["video_audio"], V, A,
                                           f"Answer using the options: {q}, options:{opts}"]),
        "two candidate videos (a2v)": (_sample("a2v", "The second one."),
                                       [INTRO["a2v"], A, V, V, INSTR["a2v"]]),
        "two candidate audios (v2a)": (_sample("v2a", "The first one."),
                                       [INTRO["v2a"], V, A, A, INSTR["v2a"]]),
        "image (s4)": (_sample("s4", "A dog barks."), [INTRO["image_audio"], I, A, INSTR["s4"]]),
        "image (arig)": (_sample("arig", "<obj>(1,2)(3,4)</obj>"), [INTRO["image_audio"], I, A, INSTR["arig"]]),
        "referring image (ref_avs)": (_sample("ref_avs", "true", "The Red GUITAR"),
                                      [INTRO["image_audio"], I, A,
                                       "Find the thing called <des>the red guitar</des>. Say \"true\" or "
                                       "\"false\" first."]),
        "AVE": (_sample("ave", "event:dog start_time:1 end_time:4"), [INTRO["video_audio"], V, A, INSTR["ave"]]),
        "AVVP": (_sample("avvp", "audio: dog 0-3"), [INTRO["video_audio"], V, A, INSTR["avvp"]]),
    }


@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
def test_upstream_like_prompt_file_renders_upstreams_text(processor, upstream_file, train):
    prompts = load_prompts(upstream_file)
    for name, (sample, parts) in _cases().items():
        expected = _upstream_text(sample.task, parts, sample.target if train else None)
        assert _ours(processor, sample, prompts, train) == expected, name


def test_every_task_renders_upstreams_layout(processor, upstream_file):
    prompts = load_prompts(upstream_file)
    order = {"video_audio": [V, A], "image_audio": [I, A], "a2v": [A, V, V], "v2a": [V, A, A]}
    for task, spec in TASKS.items():
        s = _sample(task, "x")
        instr = task_instruction(task, "", prompts)
        assert _ours(processor, s, prompts, True) == _upstream_text(task, [INTRO[spec.media], *order[spec.media],
                                                                           instr], "x"), task


def test_shipped_file_keeps_our_layout(processor):
    prompts = load_prompts()
    sys_ = prompts["system"]
    a2v = _ours(processor, _sample("a2v", "T"), prompts, True)
    assert a2v == (f"<|im_start|>system\n{sys_}<|im_end|>\n<|im_start|>user\n{prompts['intro']['a2v']}\n"
                   f"First video: {V}\nSecond video: {V}\n{A}\n{prompts['tasks']['a2v']}<|im_end|>\n"
                   f"<|im_start|>assistant\nT<|im_end|>\n")
    v2a = _ours(processor, _sample("v2a", "T"), prompts, False)
    assert v2a == (f"<|im_start|>system\n{sys_}<|im_end|>\n<|im_start|>user\n{prompts['intro']['v2a']}\n"
                   f"{V}First audio: {A}\nSecond audio: {A}\n\n{prompts['tasks']['v2a']}<|im_end|>\n"
                   f"<|im_start|>assistant\n")
    ks = _ours(processor, _sample("ks", "T"), prompts, True)
    assert ks == (f"<|im_start|>system\n{sys_}<|im_end|>\n<|im_start|>user\n{prompts['intro']['video_audio']}\n"
                  f"{V}{A}\n{prompts['tasks']['ks']}<|im_end|>\n<|im_start|>assistant\nT<|im_end|>\n")
    ref = _ours(processor, _sample("ref_avs", "T", " the red square "), prompts, False)
    assert f"{prompts['intro']['image_audio']}\n{I}{A}\n" in ref
    assert prompts["tasks"]["ref_avs"].replace("{question}", "the red square") in ref
    # the shipped render section is the code's defaults (media_order spelled out: the default order)
    r = render_params(prompts)
    assert {k: v for k, v in r.items() if k != "media_order"} == {k: v for k, v in RENDER_DEFAULTS.items()
                                                                  if k != "media_order"}
    for t, spec in TASKS.items():
        carried = {k for _, k, _ in MEDIA_FIELDS[spec.media]}
        assert [m for m in media_order(t, prompts) if m in carried] == [m for m in ("video", "image", "audio")
                                                                         if m in carried]
    # a prompts dict without a render section renders the same
    bare = {k: v for k, v in prompts.items() if k != "render"}
    for t in TASKS:
        assert _ours(processor, _sample(t, "T"), bare, True) == _ours(processor, _sample(t, "T"), prompts, True)


def test_options_and_question_slots():
    prompts = load_prompts()
    opts = ["a b", "c"]
    # our avqa_thu template has no {options} slot: the options are appended after options_prefix
    text = task_instruction("avqa_thu", "Q?", prompts, opts)
    assert text.endswith(" Options: a b, c") and text.count("Q?") == 1
    p = {**prompts, "tasks": {**prompts["tasks"], "avqa_thu": "{question:lower} [{options}] {options:lower}"},
         "render": {**prompts["render"], "options_join": None}}
    assert task_instruction("avqa_thu", " Q? ", p, ["X", "Y"]) == "q? [['X', 'Y']] ['x', 'y']"
    assert task_instruction("avqa_thu", "Q?", p, "one; two") == "q? [one; two] one; two"
    assert task_instruction("ks", "", prompts) == prompts["tasks"]["ks"]


def test_system_null_leaves_the_template_default(processor, tmp_path):
    p = tmp_path / "nosys.json"
    p.write_text(json.dumps({"system": None}))
    prompts = load_prompts(p)
    msgs = build_messages(_sample("ks"), prompts)
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert _render(processor, msgs, False).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")


def test_packed_clips_reach_the_processor_as_one(processor, tmp_path, upstream_file):
    av = pytest.importorskip("av")  # noqa: F841
    pytest.importorskip("soundfile")
    from ilora_kernels.crab import demo_data
    from ilora_kernels.crab.data import encode_sample

    rng = np.random.default_rng(0)
    c0, c1 = demo_data.DEMO_CLASSES[:2]
    for name, c in (("v1.mp4", c0), ("v2.mp4", c1)):
        demo_data._write_video(tmp_path / name, demo_data._frames(c, 8, rng))
    for name, c in (("a1.wav", c0), ("a2.wav", c1)):
        demo_data._write_audio(tmp_path / name, demo_data._tone(c, 1.0, rng))
    a2v = Sample("a2v", 0, "T", "", {"video": [tmp_path / "v1.mp4", tmp_path / "v2.mp4"],
                                     "audio": [tmp_path / "a1.wav"]})
    v2a = Sample("v2a", 0, "T", "", {"video": [tmp_path / "v1.mp4"],
                                     "audio": [tmp_path / "a1.wav", tmp_path / "a2.wav"]})
    up = load_prompts(upstream_file)
    ours = load_prompts()
    kw = dict(num_frames=4, frame_size=56)
    merge = processor.video_processor.merge_size ** 2
    packed, apart = encode_sample(a2v, processor, prompts=up, **kw), encode_sample(a2v, processor, prompts=ours, **kw)
    assert packed["video_grid_thw"].shape[0] == 1 and apart["video_grid_thw"].shape[0] == 2
    assert int(packed["video_grid_thw"][0, 0]) == int(apart["video_grid_thw"][:, 0].sum())   # frames concatenated
    assert int((packed["input_ids"] == processor.video_token_id).sum()) == int(packed["video_grid_thw"].prod()) // merge
    assert packed["video_second_per_grid"].shape == (1,)
    ids = packed["input_ids"][0].tolist()
    assert ids.index(processor.audio_token_id) < ids.index(processor.video_token_id)           # audio first
    packed, apart = encode_sample(v2a, processor, prompts=up, **kw), encode_sample(v2a, processor, prompts=ours, **kw)
    assert packed["input_features"].shape[0] == 1 and apart["input_features"].shape[0] == 2
    n_audio = int((packed["input_ids"] == processor.audio_token_id).sum())
    assert n_audio > int((apart["input_ids"] == processor.audio_token_id).sum()) / 2          # one longer clip


@pytest.mark.parametrize("content, key", [
    ({"task": {}}, "unknown keys"),
    ([], "expected a JSON object"),
    ({"system": 3}, "system: expected a string or null, got int"),
    ({"intro": {"video": "x"}}, "intro.video: unknown media kind"),
    ({"intro": []}, "intro: expected an object"),
    ({"tasks": {"kss": "x"}}, "tasks.kss: unknown task key"),
    ({"tasks": {"ks": 1}}, "tasks.ks: expected a string, got int"),
    ({"tasks": {"avqa": "Q: {questoin}"}}, "tasks.avqa: unknown slot '{questoin}'"),
    ({"tasks": {"avqa": "Q: {question:upper}"}}, "tasks.avqa: unknown slot"),
    ({"render": []}, "render: expected an object"),
    ({"render": {"intro_sep": ""}}, "render.intro_sep: unknown key"),
    ({"render": {"intro_separator": 0}}, "render.intro_separator: expected a string, got int"),
    ({"render": {"options_join": 1}}, "render.options_join: expected a string or null"),
    ({"render": {"strip_question": "yes"}}, "render.strip_question: expected true or false"),
    ({"render": {"media_order": {"a2v": ["audio"]}}}, "render.media_order.a2v: .* leaves out video"),
    ({"render": {"media_order": {"a2v": ["audio", "audio", "video"]}}}, "render.media_order.a2v: .* at most once"),
    ({"render": {"media_order": {"x": ["video"]}}}, "render.media_order.x: not a task key or media kind"),
    ({"render": {"media_order": {"ks": "video"}}}, "render.media_order.ks: expected a list"),
    ({"render": {"clip_labels": {"video": "First"}}}, "render.clip_labels.video: expected a list of strings"),
    ({"render": {"clip_labels": {"videos": []}}}, "render.clip_labels.videos: unknown media"),
    ({"render": {"pack_clips": "a2v"}}, "render.pack_clips: expected a list"),
    ({"render": {"pack_clips": ["a2"]}}, "render.pack_clips: 'a2' is not a task key"),
])
def test_bad_prompt_files_are_named_errors(tmp_path, content, key):
    p = tmp_path / "bad_prompts.json"
    p.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=key) as exc:
        load_prompts(p)
    assert str(p) in str(exc.value)


def test_unreadable_prompt_files(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_prompts(p)
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        load_prompts(tmp_path / "absent.json")


def test_too_few_clip_labels_is_an_error(tmp_path):
    p = tmp_path / "labels.json"
    p.write_text(json.dumps({"render": {"clip_labels": {"video": ["One: "]}}}))
    with pytest.raises(ValueError, match="render.clip_labels.video has 1 labels"):
        build_messages(_sample("a2v"), load_prompts(p))


def test_partial_render_section_merges_per_key(tmp_path):
    p = tmp_path / "part.json"
    p.write_text(json.dumps({"render": {"intro_separator": " "}}))
    r = load_prompts(p)["render"]
    assert r["intro_separator"] == " " and r["instruction_separator"] == "\n"
    assert r["clip_labels"] == RENDER_DEFAULTS["clip_labels"]


def test_trainer_reports_a_bad_prompt_file_as_config_error(tmp_path):
    from ilora_kernels.crab.config import ConfigError, config_from_dict
    from ilora_kernels.crab.train import load_prompt_file

    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"render": {"pack_clips": "a2v"}}))
    with pytest.raises(ConfigError, match=r"data\.prompts: prompt file .*bad\.json: render\.pack_clips"):
        load_prompt_file(config_from_dict({"data": {"prompts": str(p)}}))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(UPSTREAM_LIKE))
    prompts = load_prompt_file(config_from_dict({"data": {"prompts": str(good)}}))
    assert prompts["render"]["pack_clips"] == ["a2v", "v2a"]
