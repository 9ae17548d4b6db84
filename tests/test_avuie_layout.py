"""AV-UIE v2 records in upstream's exact JSON layout, every task key, both splits: the reader uses every field.

The expected fields below were read off upstream's readers (GeWu-Lab/Crab_Plus, dataset/qwen2_5_omni/omni_dataset.py:
``OmniDataset`` = train, ``OmniTestDataset`` = test; audio windows from dataset/qwen_omni_utils/v2_5/audio_process.py)
and are written here independently of ``crab.tasks.LAYOUTS``, which they check."""

import json

import pytest

pytest.importorskip("av")
pytest.importorskip("soundfile")
pytest.importorskip("PIL")

from ilora_kernels.crab import demo_data  # noqa: E402
from ilora_kernels.crab.data import load_split  # noqa: E402
from ilora_kernels.crab.tasks import LAYOUTS, TASK_KEYS, TASKS, UPSTREAM_TEST_TASKS  # noqa: E402

VA = ("video_path", "audio_path")
# task -> split -> (media fields, other fields upstream reads)
UPSTREAM = {
    "a2v": {"train": (("video1_path", "video2_path", "audio_path"),
                      ("correct_video", "audio_event", "video1_event", "video2_event", "label")),
            "test": (("video1_path", "video2_path", "audio_path"), ("correct_video",))},
    "v2a": {"train": (("video_path", "audio1_path", "audio2_path"),
                      ("correct_audio", "audio1_event", "video_event", "audio2_event", "label")),
            "test": (("video_path", "audio1_path", "audio2_path"), ("correct_audio",))},
    "ks": {"train": (VA, ("action", "label")), "test": (VA, ("action",))},
    "ucf": {"train": (VA, ("new_label", "label")), "test": (VA, ("label",))},
    "meld": {"train": (VA, ("label", "Emotion")), "test": (VA, ("Emotion",))},
    "mer24": {"train": (VA, ("label", "discrete"))},
    "cremad": {"train": (VA, ("label", "emotion")), "test": (VA, ("emotion",))},
    "mafw": {"train": (VA, ("label", "emotion")), "test": (VA, ("emotion",))},
    "dfew": {"train": (VA, ("label", "emotion")), "test": (VA, ("emotion",))},
    "avqa": {"train": (VA, ("video_id", "question_id", "type", "question", "answer", "label")),
             "test": (VA, ("video_id", "question_id", "type", "question", "answer"))},
    "avqa_thu": {"train": (VA, ("id", "video_name", "video_id", "question_relation", "question_type",
                                "multi_choice", "question_text", "answer", "label")),
                 "test": (VA, ("id", "video_name", "video_id", "question_relation", "question_type",
                               "multi_choice", "question_text", "answer"))},
    "ave": {"train": (VA, ("event", "vid", "start_time", "end_time", "label_content")),
            "test": (VA, ("event", "vid", "start_time", "end_time"))},
    "unav": {"train": (VA, ("vid", "label_content"))},
    "avvp": {"train": (VA, ("filename", "vid", "event", "label_content")), "test": (VA, ("filename", "vid", "event"))},
    "ms3": {"train": (("image_path", "audio_path"), ("vid", "uid", "a_obj", "frame_idx", "label_content")),
            "test": (("visual_path", "audio_path"), ("vid", "uid", "a_obj", "frame_idx"))},
    "s4": {"train": (("image_path", "audio_path"), ("vid", "uid", "a_obj", "label_content")),
           "test": (("visual_path", "audio_path"), ("vid", "uid", "a_obj", "frame_idx"))},
    "arig": {"train": (("image_path", "audio_path"), ("a_obj", "label_content")),
             "test": (("visual_path", "audio_path"), ("top_left", "bottom_right", "a_obj", "frame_idx"))},
    "avcap": {"train": (VA, ("video_id", "label_content"))},
    "ref_avs": {"train": (("image_path", "audio_path"), ("vid", "fid", "uid", "idx", "description", "output")),
                "test": (("visual_path", "audio_path"), ("object", "split", "vid", "uid", "fid", "frame_idx"))},
}

# the test split's ground truth as upstream's test reader builds it
TEST_TRUTH = {
    "a2v": lambda r: f"<answer>{r['correct_video']}</answer>.",
    "v2a": lambda r: f"<answer>{r['correct_audio']}</answer>.",
    "ks": lambda r: f"<answer>{r['action']}</answer>",
    "ucf": lambda r: f"<answer>{r['label'].lower()}</answer>",
    "meld": lambda r: f"<answer>{r['Emotion']}</answer>.",
    "cremad": lambda r: f"<answer>{r['emotion']}</answer>.",
    "mafw": lambda r: f"<answer>{r['emotion']}</answer>.",
    "dfew": lambda r: f"<answer>{r['emotion']}</answer>.",
    "avqa": lambda r: r["answer"],
    "avqa_thu": lambda r: r["answer"],
    "ave": lambda r: f"event:{r['event']} start_time:{r['start_time']} end_time:{r['end_time']}",
    "avvp": lambda r: r["event"],
    "ms3": lambda r: f"The object making the sound in the video is {r['a_obj']}.",
    "s4": lambda r: f"The object making the sound in the video is {r['a_obj']}.",
    "arig": lambda r: (f"The sounding object is {r['a_obj']}. Its coordinates are <obj>({r['top_left'][0]},"
                       f"{r['top_left'][1]})({r['bottom_right'][0]},{r['bottom_right'][1]})</obj>."),
    "ref_avs": lambda r: r["object"],
}
TRAIN_TARGET = {"ucf": "new_label", "ave": "label_content", "unav": "label_content", "avvp": "label_content",
                "ms3": "label_content", "s4": "label_content", "arig": "label_content", "avcap": "label_content",
                "ref_avs": "output"}
QUESTION = {("avqa", "train"): "question", ("avqa", "test"): "question", ("avqa_thu", "train"): "question_text",
            ("avqa_thu", "test"): "question_text", ("ref_avs", "train"): "description", ("ref_avs", "test"): "object"}
FRAME = {("ms3", "train"): "frame_idx", ("ref_avs", "train"): "idx", ("ms3", "test"): "frame_idx",
         ("s4", "test"): "frame_idx", ("arig", "test"): "frame_idx", ("ref_avs", "test"): "frame_idx"}
# the 1-second audio window upstream feeds: s4 train window 0, else the frame index (s4, ms3, ref_avs)
WINDOW_TASKS = {"s4", "ms3", "ref_avs"}
MEDIA_DIR = {"video": "video", "audio": "audio"}
KIND = {"video_path": "video", "video1_path": "video", "video2_path": "video", "audio_path": "audio",
        "audio1_path": "audio", "audio2_path": "audio", "image_path": "image", "visual_path": "image"}


@pytest.fixture(scope="module")
def layout_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    demo_data.write_layout_dataset(root, n=2)
    return root


def test_registry_layouts_are_upstreams():
    assert set(UPSTREAM) == set(TASK_KEYS) and len(TASK_KEYS) == 19
    assert sorted(UPSTREAM_TEST_TASKS) == sorted(k for k in UPSTREAM if "test" in UPSTREAM[k])
    assert len(UPSTREAM_TEST_TASKS) == 16 and not {"unav", "avcap", "mer24"} & set(UPSTREAM_TEST_TASKS)
    for task, splits in UPSTREAM.items():
        assert set(LAYOUTS[task]) == set(splits), task
        for split, (media, fields) in splits.items():
            layout = TASKS[task].layout(split)
            assert layout.media_names == media, (task, split)
            assert set(layout.fields) == set(fields), (task, split, sorted(set(layout.fields) ^ set(fields)))
        assert TASKS[task].layout("train").target == (TRAIN_TARGET.get(task, "label"),)
    # a test.json of a task upstream does not test is read with the train layout
    assert TASKS["unav"].layout("test") is TASKS["unav"].layout("train")


def test_written_records_hold_exactly_upstreams_fields(layout_root):
    base = layout_root / "AVUIE_2"
    for task, splits in UPSTREAM.items():
        for split in ("train", "test"):
            js = base / task / f"{split}.json"
            if split not in splits:
                assert not js.exists(), js
                continue
            media, fields = splits[split]
            for rec in json.loads(js.read_text()):
                assert set(rec) == set(media) | set(fields), (task, split)


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_field_reaches_the_sample(layout_root, split):
    base = layout_root / "AVUIE_2"
    samples = load_split(layout_root, split)
    assert sorted({s.task for s in samples}) == sorted(t for t in UPSTREAM if split in UPSTREAM[t])
    assert not samples.skips
    for s in samples:
        raw = json.loads((base / s.task / f"{split}.json").read_text())[s.index]
        media, fields = UPSTREAM[s.task][split]
        assert s.split == split and s.raw == raw
        # media: every path field, in order within its kind, under the task folder (video tasks: video/, audio/)
        expect = {}
        for fld in media:
            kind = KIND[fld]
            sub = MEDIA_DIR[kind] if TASKS[s.task].media != "image_audio" else ""
            expect.setdefault(kind, []).append(base / s.task / sub / raw[fld] if sub else base / s.task / raw[fld])
        assert s.media == expect, (s.task, split)
        assert all(p.is_file() for ps in s.media.values() for p in ps)
        # target: train = the train target field; test = upstream's ground truth from the short fields
        truth = raw[TRAIN_TARGET.get(s.task, "label")] if split == "train" else TEST_TRUTH[s.task](raw)
        assert s.target == truth and s.target != "None", (s.task, split, s.target)
        # question / referring expression, options, frame index, audio window
        q = QUESTION.get((s.task, split))
        assert s.instruction == (raw[q] if q else "") and s.question == s.instruction
        if s.task == "avqa_thu":
            assert s.options == raw["multi_choice"] and s.options_text == str(raw["multi_choice"])
        else:
            assert s.options is None and s.options_text == ""
        f = FRAME.get((s.task, split))
        if f:
            assert s.frame_idx == raw[f]
        elif (s.task, split) == ("arig", "train"):                 # the image file is named <frame index>.png
            assert s.frame_idx == int(raw["image_path"].rsplit("/", 1)[1][:-4])
        else:
            assert s.frame_idx is None
        if s.task in WINDOW_TASKS:
            assert s.audio_window == (0 if (s.task, split) == ("s4", "train") else s.frame_idx) is not None
        else:
            assert s.audio_window is None
        # every non-media field upstream reads reaches the sample with its value
        assert s.meta == {k: raw[k] for k in fields}, (s.task, split)


def test_test_layout_ucf_lower_cases_and_ave_keeps_number_spelling(layout_root):
    by = {(s.task, s.index): s for s in load_split(layout_root, "test", tasks=["ucf", "ave"])}
    assert by[("ucf", 1)].target == "<answer>playingdrumtest1</answer>" and by[("ucf", 1)].meta["label"] == \
        "PlayingDrumTest1"
    assert by[("ave", 0)].target == "event:ave test event 0 start_time:0 end_time:3"


@pytest.mark.parametrize("task, field, reason", [
    ("ks", "action", "null_target"), ("a2v", "correct_video", "null_target"), ("arig", "top_left", "null_target"),
    ("ave", "end_time", "null_target"), ("meld", "Emotion", "null_target"), ("avqa", "question", "missing_field"),
    ("avqa_thu", "multi_choice", "missing_field"), ("s4", "frame_idx", "missing_field"),
    ("ref_avs", "object", "null_target")])
@pytest.mark.parametrize("how", ["null", "drop"])
def test_missing_or_null_test_field_is_an_error_or_a_counted_skip(layout_root, tmp_path, task, field, reason, how):
    import shutil

    shutil.copytree(layout_root / "AVUIE_2" / task, tmp_path / task)
    js = tmp_path / task / "test.json"
    items = json.loads(js.read_text())
    if how == "null":
        items[1][field] = None
    else:
        del items[1][field]
    js.write_text(json.dumps(items))
    with pytest.raises(ValueError) as ei:
        load_split(tmp_path, "test", tasks=[task])
    msg = str(ei.value)
    assert f"'{task}'" in msg and "sample 1" in msg and str(js) in msg and f"'{field}'" in msg
    assert ("null" if how == "null" else "missing") in msg
    kept = load_split(tmp_path, "test", tasks=[task], skip_bad=True)
    assert [s.index for s in kept] == [0] and kept.skips.counts == {(task, reason): 1}
    assert all("None" not in s.target for s in kept)


def test_image_field_names_are_accepted_in_either_split(layout_root, tmp_path):
    import shutil

    shutil.copytree(layout_root / "AVUIE_2" / "s4", tmp_path / "s4")
    js = tmp_path / "s4" / "test.json"
    items = json.loads(js.read_text())
    items[0]["image_path"] = items[0].pop("visual_path")          # a test file written with the train name
    js.write_text(json.dumps(items))
    s = load_split(tmp_path, "test", tasks=["s4"])[0]
    assert s.media["image"] == [tmp_path / "s4" / items[0]["image_path"]]
    del items[1]["visual_path"]
    js.write_text(json.dumps(items))
    with pytest.raises(ValueError, match="media field 'visual_path' \\(or 'image_path'\\) missing"):
        load_split(tmp_path, "test", tasks=["s4"])


def test_demo_test_truth_and_train_answers_agree():
    """The demo's train answers reduce to the text its test ground truth (upstream's test layout) reduces to."""
    from ilora_kernels.crab.evaluate import extract_answer, normalize

    for name, (train_target, test_truth) in {
        "ks": (demo_data._ks_target(demo_data.DEMO_CLASSES[0]), "<answer>drum</answer>"),
        "ave": (demo_data._ave_target(demo_data.DEMO_CLASSES[1], 1, 3), "event:bell start_time:0.5 end_time:1.5"),
        "a2v": (demo_data._a2v_target(demo_data.DEMO_CLASSES[0], demo_data.DEMO_CLASSES[1], "second"),
                "<answer>2</answer>."),
        "avqa": (demo_data._avqa_target(demo_data.DEMO_CLASSES[2], "colour"), "blue"),
    }.items():
        assert normalize(extract_answer(train_target)) == normalize(extract_answer(test_truth)), name
