"""Crab+ trainer data side: AV-UIE v2 reader, media decoding, prompts/label masking, collate, tiny thinker."""

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
av = pytest.importorskip("av")
sf = pytest.importorskip("soundfile")

from ilora_kernels.crab import demo_data  # noqa: E402
from ilora_kernels.crab.data import (  # noqa: E402
    IGNORE_INDEX,
    AVUIEDataset,
    MediaError,
    build_generation_batch,
    build_generation_inputs,
    collate,
    load_audio,
    load_image,
    load_split,
    load_video_frames,
    model_inputs,
    resample_audio,
)
from ilora_kernels.crab.prompts import load_prompts, task_instruction  # noqa: E402
from ilora_kernels.crab.tasks import TASKS  # noqa: E402


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("avuie")
    demo_data.write_demo_dataset(root, n_train=3, n_test=2, seed=0)
    base = root / "AVUIE_2"
    # extra task folders for the other target fields and media kinds
    c = demo_data.DEMO_CLASSES[0]
    rng = np.random.default_rng(0)
    for task in ("ucf", "avvp", "v2a", "ref_avs"):
        (base / task / "video").mkdir(parents=True)
        (base / task / "audio").mkdir(parents=True)
    demo_data._write_video(base / "ucf" / "video" / "u0.mp4", demo_data._frames(c, 10, rng))
    demo_data._write_audio(base / "ucf" / "audio" / "u0.wav", demo_data._tone(c, 1.0, rng))
    (base / "ucf" / "train.json").write_text(json.dumps(
        [{"video_path": "u0.mp4", "audio_path": "u0.wav", "label": "raw", "new_label": "Answer: drumming"}]))
    demo_data._write_video(base / "avvp" / "video" / "p0.mp4", demo_data._frames(c, 10, rng))
    demo_data._write_audio(base / "avvp" / "audio" / "p0.wav", demo_data._tone(c, 1.0, rng))
    (base / "avvp" / "train.json").write_text(json.dumps(
        [{"video_path": "p0.mp4", "audio_path": "p0.wav", "label_content": "audio: drum 0-1; visual: drum 0-1"}]))
    demo_data._write_video(base / "v2a" / "video" / "q0.mp4", demo_data._frames(c, 10, rng))
    demo_data._write_audio(base / "v2a" / "audio" / "q0a.wav", demo_data._tone(c, 1.0, rng))
    demo_data._write_audio(base / "v2a" / "audio" / "q0b.wav", demo_data._tone(demo_data.DEMO_CLASSES[1], 1.0, rng))
    (base / "v2a" / "train.json").write_text(json.dumps(
        [{"video_path": "q0.mp4", "audio1_path": "q0a.wav", "audio2_path": "q0b.wav", "label": "Answer: first"}]))
    from PIL import Image
    (base / "ref_avs" / "frames").mkdir()
    Image.fromarray(demo_data._frames(c, 1, rng)[0]).save(base / "ref_avs" / "frames" / "r0.png")
    demo_data._write_audio(base / "ref_avs" / "audio" / "r0.wav", demo_data._tone(c, 1.0, rng))
    (base / "ref_avs" / "train.json").write_text(json.dumps(
        [{"image_path": "frames/r0.png", "audio_path": "audio/r0.wav", "vid": "r", "fid": 0, "uid": "r-0", "idx": 3,
          "description": "the red square", "output": "The red square makes the sound. Answer: [10, 10, 30, 30]"}]))
    return root


@pytest.fixture(scope="module")
def processor():
    from ilora_kernels.crab.model import build_tiny_processor
    return build_tiny_processor()


@pytest.fixture(scope="module")
def train_samples(demo_root):
    return load_split(demo_root, "train")


# --------------------------------------------------------------------------------------------------- registry
def test_task_registry_matches_spec():
    assert len(TASKS) == 19
    fields = {"label": "a2v v2a ks meld mer24 cremad mafw dfew avqa avqa_thu", "new_label": "ucf",
              "label_content": "ave unav avvp s4 ms3 arig avcap", "output": "ref_avs"}
    for field, keys in fields.items():
        for k in keys.split():
            assert TASKS[k].target_field == field, k
    assert {k for k, t in TASKS.items() if t.media == "image_audio"} == {"s4", "ms3", "arig", "ref_avs"}
    assert TASKS["a2v"].media == "a2v" and TASKS["v2a"].media == "v2a" and TASKS["avvp"].metric == "avvp_f1"
    prompts = load_prompts()
    assert set(prompts["tasks"]) == set(TASKS)


def test_prompt_file_override(tmp_path):
    p = tmp_path / "my.json"
    p.write_text(json.dumps({"tasks": {"ks": "Name the class."}, "system": "Be brief."}))
    prompts = load_prompts(p)
    assert prompts["tasks"]["ks"] == "Name the class." and prompts["system"] == "Be brief."
    assert prompts["tasks"]["ave"] == load_prompts()["tasks"]["ave"]          # others kept
    assert task_instruction("avqa", "Is it red?", prompts).count("Is it red?") == 1
    with pytest.raises(ValueError, match="unknown keys"):
        (tmp_path / "bad.json").write_text(json.dumps({"task": {}}))
        load_prompts(tmp_path / "bad.json")


# --------------------------------------------------------------------------------------------------- reader
def test_reader_both_root_forms_and_all_target_fields(demo_root):
    a = load_split(demo_root, "train")
    b = load_split(demo_root / "AVUIE_2", "train")
    assert [(s.task, s.index, s.target) for s in a] == [(s.task, s.index, s.target) for s in b]
    by_task = {}
    for s in a:
        by_task.setdefault(s.task, []).append(s)
    assert set(by_task) == {"a2v", "v2a", "ks", "ucf", "ave", "avvp", "ref_avs", "avqa"}
    assert len(by_task["ks"]) == 3
    for s in a:                                                # the task's own target field
        assert s.target == s.raw[TASKS[s.task].target_field]
        for paths in s.media.values():
            assert all(p.is_absolute() and p.is_file() for p in paths)
    assert by_task["ucf"][0].target == "Answer: drumming"                   # new_label, not label
    assert by_task["avvp"][0].target.startswith("audio: drum")             # label_content
    assert by_task["ref_avs"][0].target.endswith("[10, 10, 30, 30]")        # output
    ks = by_task["ks"][0]
    assert ks.media["video"][0] == demo_root / "AVUIE_2" / "ks" / "video" / ks.raw["video_path"]
    assert ks.media["audio"][0] == demo_root / "AVUIE_2" / "ks" / "audio" / ks.raw["audio_path"]
    assert len(by_task["a2v"][0].media["video"]) == 2 and len(by_task["a2v"][0].media["audio"]) == 1
    assert len(by_task["v2a"][0].media["video"]) == 1 and len(by_task["v2a"][0].media["audio"]) == 2
    ref = by_task["ref_avs"][0]
    assert ref.media["image"][0] == demo_root / "AVUIE_2" / "ref_avs" / "frames" / "r0.png"
    assert ref.instruction == "the red square"                         # upstream's train field 'description'
    assert ref.frame_idx == 3 and ref.audio_window == 3 and ref.meta["uid"] == "r-0"   # 'idx': its 1-s audio window
    assert by_task["avqa"][0].instruction == by_task["avqa"][0].raw["question"]
    assert ks.instruction == ""
    only = load_split(demo_root, "test", tasks=["ks", "a2v"])
    assert {s.task for s in only} == {"ks", "a2v"} and len(only) == 4
    with pytest.raises(ValueError, match="unknown task"):
        load_split(demo_root, "train", tasks=["nope"])


def test_missing_media_error_and_skip_counts(tmp_path):
    demo_data.write_demo_dataset(tmp_path, tasks=("ks",), n_train=3, n_test=1, seed=1)
    task_dir = tmp_path / "AVUIE_2" / "ks"
    items = json.loads((task_dir / "train.json").read_text())
    gone = task_dir / "audio" / items[1]["audio_path"]
    gone.unlink()
    with pytest.raises(MediaError) as ei:
        load_split(tmp_path, "train")
    msg = str(ei.value)
    assert "'ks'" in msg and "sample 1" in msg and str(gone) in msg
    kept = load_split(tmp_path, "train", skip_missing=True)
    assert [s.index for s in kept] == [0, 2] and kept.skipped == {"ks": 1}


def test_skip_counts_by_task_and_reason(tmp_path):
    demo_data.write_demo_dataset(tmp_path, tasks=("ks", "a2v"), n_train=4, n_test=1, seed=1)
    base = tmp_path / "AVUIE_2"
    items = json.loads((base / "ks" / "train.json").read_text())
    (base / "ks" / "audio" / items[0]["audio_path"]).unlink()
    (base / "ks" / "audio" / items[3]["audio_path"]).unlink()
    kept = load_split(tmp_path, "train", skip_missing=True)
    assert kept.skips.counts == {("ks", "missing_media"): 2} and kept.skips.examples[("ks", "missing_media")] == [0, 3]
    assert kept.kept_per_task() == {"a2v": 4, "ks": 2} and kept.skips.total == 2
    assert kept.skips.format("train samples") == "skipped 2 train samples: ks 2 (missing_media 2)"
    record = json.loads(json.dumps(kept.skips.to_dict(kept.kept_per_task())))   # JSON-serialisable
    assert record["by_task"] == {"ks": {"missing_media": 2}} and record["kept"] == {"a2v": 4, "ks": 2}
    assert load_split(tmp_path, "train", tasks=["a2v"], skip_missing=True).skips.format() == "skipped samples: none"
    # a cap keeps the first N kept samples of each task
    assert [s.index for s in load_split(tmp_path, "train", skip_missing=True, max_per_task=1)] == [0, 1]


def test_empty_task_file_is_an_error_or_a_counted_skip(tmp_path):
    demo_data.write_demo_dataset(tmp_path, tasks=("ks", "a2v"), n_train=2, n_test=1, seed=1)
    empty = tmp_path / "AVUIE_2" / "a2v" / "train.json"
    empty.write_text("[]")
    with pytest.raises(ValueError) as ei:
        load_split(tmp_path, "train", tasks=["ks", "a2v"])
    assert "'a2v'" in str(ei.value) and str(empty) in str(ei.value) and "no samples" in str(ei.value)
    kept = load_split(tmp_path, "train", tasks=["ks", "a2v"], skip_bad=True)
    assert {s.task for s in kept} == {"ks"} and kept.skips.empty_tasks == {"a2v": str(empty)}
    assert kept.kept_per_task() == {"ks": 2, "a2v": 0}
    assert f"task 'a2v': {empty} holds no samples" in kept.skips.format("train samples", kept.kept_per_task())


@pytest.mark.parametrize("value, reason", [(None, "null_target"), ("drop", "null_target"), ("  ", "empty_target")])
def test_null_missing_or_empty_target_is_an_error_or_a_counted_skip(tmp_path, value, reason):
    demo_data.write_demo_dataset(tmp_path, tasks=("ks",), n_train=3, n_test=1, seed=1)
    js = tmp_path / "AVUIE_2" / "ks" / "train.json"
    items = json.loads(js.read_text())
    if value == "drop":
        del items[1]["label"]
    else:
        items[1]["label"] = value
    js.write_text(json.dumps(items))
    with pytest.raises(ValueError) as ei:
        load_split(tmp_path, "train")
    msg = str(ei.value)
    assert "'ks'" in msg and "sample 1" in msg and str(js) in msg and "'label'" in msg   # task, index, file, field
    kept = load_split(tmp_path, "train", skip_bad=True)
    assert [s.index for s in kept] == [0, 2] and "None" not in [s.target for s in kept]
    assert kept.skips.counts == {("ks", reason): 1} and kept.skipped == {"ks": 1}


def test_unreadable_media_named_or_skipped(tmp_path, processor):
    demo_data.write_demo_dataset(tmp_path, tasks=("ks",), n_train=2, n_test=1, seed=2)
    samples = load_split(tmp_path, "train")
    bad = samples[0].media["video"][0]
    bad.write_bytes(b"not a video at all")
    ds = AVUIEDataset(samples, processor)
    with pytest.raises(MediaError) as ei:
        ds[0]
    assert "sample 0" in str(ei.value) and str(bad) in str(ei.value) and "cannot decode video" in str(ei.value)
    ds = AVUIEDataset(samples, processor, skip_missing=True)
    item = ds[0]                                               # falls through to the next decodable sample
    assert item["index"] == 1 and ds.skipped == {"ks": 1}
    assert ds.skips.counts == {("ks", "undecodable_media"): 1}
    # a file that vanished after load_split: dropped at construction when skipping, named otherwise
    samples[1].media["audio"][0].unlink()
    with pytest.raises(MediaError, match="sample 1"):
        AVUIEDataset(samples, processor)


# --------------------------------------------------------------------------------------------------- media
def test_media_decoding_shapes(train_samples, tmp_path):
    ks = next(s for s in train_samples if s.task == "ks")
    frames, duration = load_video_frames(ks.media["video"][0], num_frames=10, frame_size=224)
    assert frames.shape == (10, 3, 224, 224) and frames.dtype == torch.uint8
    assert duration == pytest.approx(1.0, abs=0.15)
    frames, _ = load_video_frames(ks.media["video"][0], num_frames=6, frame_size=(32, 48))
    assert frames.shape == (6, 3, 32, 48)
    # the demo's colour is really in the frames: the class colour is the most saturated colour present
    cls = demo_data.DEMO_CLASSES[[c.name for c in demo_data.DEMO_CLASSES].index(ks.raw["action"])]
    px = frames.permute(0, 2, 3, 1).reshape(-1, 3).float()
    sat = px.max(1).values - px.min(1).values
    mean_rgb = px[sat > 100].mean(0)
    assert torch.allclose(mean_rgb, torch.tensor(cls.rgb, dtype=torch.float32), atol=35)
    wave = load_audio(ks.media["audio"][0], sampling_rate=16000)
    assert wave.dtype == np.float32 and wave.shape == (16000,)
    # stereo 44.1 kHz -> mono 16 kHz: length and pitch preserved
    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], 1).astype(np.float32) * 0.5
    p = tmp_path / "s.wav"
    sf.write(str(p), stereo, 44100)
    mono = load_audio(p, sampling_rate=16000)
    assert mono.shape == (16000,)
    peak_hz = np.argmax(np.abs(np.fft.rfft(mono))) * 16000 / len(mono)
    assert abs(peak_hz - 440) <= 2
    assert np.abs(mono).max() == pytest.approx(0.5, abs=0.03)
    # downsampling does not alias: a 7 kHz tone at 22.05 kHz vanishes at 8 kHz (Nyquist 4 kHz); the ends are left
    # out: the tone starts and stops abruptly there, which a streaming resampler (like upstream's soxr) shows
    t = np.arange(22050) / 22050
    assert np.abs(resample_audio(np.sin(2 * np.pi * 7000 * t), 22050, 8000)[100:-100]).max() < 0.05
    assert resample_audio(np.ones(8000), 8000, 16000).shape == (16000,)
    # soundfile cannot read AAC: PyAV fallback, truncation to max_seconds
    m4a = tmp_path / "s.m4a"
    with av.open(str(m4a), "w") as c:
        st = c.add_stream("aac", rate=22050)
        st.layout = "stereo"
        x = (0.5 * np.sin(2 * np.pi * 440 * np.arange(44100) / 22050)).astype(np.float32)
        fr = av.AudioFrame.from_ndarray(np.stack([x, x]), format="fltp", layout="stereo")
        fr.sample_rate = 22050
        for pkt in [*st.encode(fr), *st.encode(None)]:
            c.mux(pkt)
    w = load_audio(m4a, sampling_rate=16000)
    assert abs(w.shape[0] - 32000) < 2000                                      # 2 s (+ AAC priming)
    assert abs(np.argmax(np.abs(np.fft.rfft(w))) * 16000 / len(w) - 440) <= 2
    assert load_audio(m4a, sampling_rate=16000, max_seconds=0.5).shape == (8000,)
    ref = next(s for s in train_samples if s.task == "ref_avs")
    img = load_image(ref.media["image"][0], frame_size=56)
    assert img.shape == (3, 56, 56) and img.dtype == torch.uint8


# --------------------------------------------------------------------------------------------------- prompts
def test_label_masking_exact(train_samples, processor):
    tok = processor.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ds = AVUIEDataset(train_samples, processor)
    seen = set()
    for i, s in enumerate(ds.samples):
        if s.task in seen:
            continue
        seen.add(s.task)
        item = ds[i]
        ids, labels = item["input_ids"], item["labels"]
        assert ids.shape == labels.shape == item["attention_mask"].shape
        sup = (labels != IGNORE_INDEX).nonzero().flatten()
        start, end = int(sup[0]), int(sup[-1]) + 1
        assert sup.tolist() == list(range(start, end))                       # one contiguous span
        assert torch.equal(labels[start:end], ids[start:end])
        # exactly the answer tokens and the end-of-turn token, nothing else
        assert ids[start:end].tolist() == tok.encode(s.target, add_special_tokens=False) + [im_end]
        assert tok.decode(ids[start:end]) == s.target + "<|im_end|>"
        assert end == len(ids) - 1 and tok.decode(ids[end:]) == "\n"       # trailing newline not supervised
        header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
        assert ids[start - len(header):start].tolist() == header
        # media placeholders and the prompt are never supervised
        for name in ("video_token_id", "audio_token_id", "image_token_id"):
            assert not bool(((ids == getattr(processor, name)) & (labels != IGNORE_INDEX)).any())
        assert (ids == processor.audio_token_id).any()
        # the generation prompt is exactly the training sequence up to the answer
        gen = build_generation_inputs(s, processor)
        assert "labels" not in gen
        assert gen["input_ids"][0].tolist() == ids[:start].tolist()
        if "pixel_values_videos" in item:
            assert torch.equal(gen["pixel_values_videos"], item["pixel_values_videos"])
        text = tok.decode(ids[:start])
        assert text.startswith("<|im_start|>system\n" + load_prompts()["system"] + "<|im_end|>\n<|im_start|>user\n")
        assert task_instruction(s.task, s.instruction) in text
    assert seen == {s.task for s in train_samples}


def test_max_length_truncates_answer_only(train_samples, processor):
    s = next(s for s in train_samples if s.task == "ks")
    full = AVUIEDataset([s], processor)[0]
    start = int((full["labels"] != IGNORE_INDEX).nonzero()[0])
    cut = AVUIEDataset([s], processor, max_length=start + 3)[0]
    assert cut["input_ids"].shape[0] == start + 3 and (cut["labels"] != IGNORE_INDEX).sum() == 3
    with pytest.raises(ValueError, match="max_length"):
        AVUIEDataset([s], processor, max_length=start - 1)[0]


# --------------------------------------------------------------------------------------------------- batches
def test_collate_shapes(train_samples, processor):
    picks = [next(s for s in train_samples if s.task == t) for t in ("a2v", "ks", "ref_avs", "v2a")]
    ds = AVUIEDataset(picks, processor, num_frames=4, frame_size=56)
    items = [ds[i] for i in range(len(ds))]
    b = collate(items)
    lens = [it["input_ids"].shape[0] for it in items]
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (4, max(lens))
    for r, n in enumerate(lens):
        assert b["attention_mask"][r].sum() == n
        assert (b["labels"][r, n:] == IGNORE_INDEX).all()
        assert (b["input_ids"][r, n:] == processor.tokenizer.pad_token_id).all()
    assert b["video_grid_thw"].shape == (2 + 1 + 1, 3)                    # a2v 2 videos, ks 1, v2a 1
    assert b["pixel_values_videos"].shape[0] == int(b["video_grid_thw"].prod(-1).sum())
    assert b["image_grid_thw"].shape == (1, 3)
    assert b["pixel_values"].shape[0] == int(b["image_grid_thw"].prod(-1).sum())
    assert b["input_features"].shape[:2] == (1 + 1 + 1 + 2, 16) and b["feature_attention_mask"].shape[0] == 5
    assert b["video_second_per_grid"].shape == (4,)
    assert b["video_grid_thw"][:, 1:].tolist() == [[4, 4]] * 4            # 56 px / patch 14
    assert b["task"] == ["a2v", "ks", "ref_avs", "v2a"]
    n_video_tokens = int((b["input_ids"] == processor.video_token_id).sum())
    assert n_video_tokens == int(b["video_grid_thw"].prod(-1).sum()) // 4  # merge 2x2
    left = collate(items, padding_side="left")
    assert torch.equal(left["attention_mask"].flip(1), b["attention_mask"])
    assert set(model_inputs(b)) <= set(b) - {"task", "index"}


def test_tiny_thinker_forward_backward_with_ilora(train_samples, processor):
    import time

    from ilora_kernels import ilora_layers
    from ilora_kernels.crab.model import apply_crab_ilora, build_tiny_thinker, expected_crab_ilora_count

    model = build_tiny_thinker(seed=0)
    picks = [next(s for s in train_samples if s.task == t) for t in ("a2v", "ks", "ave", "avqa", "ref_avs")]
    batch = collate([AVUIEDataset(picks, processor)[i] for i in range(len(picks))])
    t0 = time.perf_counter()
    with torch.no_grad():
        base = model(**model_inputs(batch))
    assert time.perf_counter() - t0 < 10
    assert torch.isfinite(base.loss) and abs(base.loss.item() - np.log(model.config.text_config.vocab_size)) < 1.0
    gen = build_generation_batch(picks[:2], processor)                       # batched generation, left padded
    assert (gen["attention_mask"][:, -1] == 1).all()
    with torch.no_grad():
        out = model.generate(**model_inputs(gen), max_new_tokens=3, do_sample=False)
    assert out.shape == (2, gen["input_ids"].shape[1] + 3)
    stats = apply_crab_ilora(model, r=8, num_heads=3, alpha=16, dropout=0.0, gradient_checkpointing=True)
    cfg = model.config
    want = 7 * cfg.text_config.num_hidden_layers + 3 * cfg.audio_config.encoder_layers + 3 * cfg.vision_config.depth
    assert stats["modules"] == want == expected_crab_ilora_count(cfg) == len(ilora_layers(model))
    names = set(ilora_layers(model))
    assert all(("language_model.layers" in n) or ("audio_tower.layers" in n and n.split(".")[-1] in
               ("q_proj", "k_proj", "v_proj")) or ("visual.blocks" in n and ".mlp." in n) for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(n.startswith(m + ".") for m in names) and "base_layer" not in n for n in trainable)
    assert stats["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    model.train()
    out = model(**model_inputs(batch))
    assert torch.allclose(out.loss, base.loss, atol=1e-4)                    # fresh adapter = base model
    out.loss.backward()
    b_grads = [layer.lora_b.grad for layer in ilora_layers(model).values()]
    assert all(g is not None for g in b_grads) and sum(float(g.abs().sum()) for g in b_grads) > 0
    for kind in ("audio_tower", "visual", "language_model"):                # every tower gets gradient
        assert any(float(layer.lora_b.grad.abs().sum()) > 0 for n, layer in ilora_layers(model).items()
                   if kind in n), kind


def test_crab_target_rule_selects_388_at_full_size():
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    from ilora_kernels.crab.model import crab_ilora_targets, expected_crab_ilora_count

    # Qwen2.5-Omni-7B thinker shapes (text: the config defaults; vision tower: 1280 hidden, 3420 MLP)
    cfg = Qwen2_5OmniThinkerConfig(vision_config=dict(hidden_size=1280, intermediate_size=3420, num_heads=16,
                                                      depth=32, out_hidden_size=3584))
    with torch.device("meta"):
        model = Qwen2_5OmniThinkerForConditionalGeneration(cfg)
    names = crab_ilora_targets(model)
    assert len(names) == expected_crab_ilora_count(cfg) == 388
    r, k = 128, 3
    params = 0
    for n in names:
        d_out, d_in = model.get_submodule(n).weight.shape
        params += r * d_in + k * r * d_out + k * d_in
    assert 0.85e9 < params < 0.89e9                                            # "about 870M" (SPEC section 4)


def test_tiny_processor_is_deterministic_and_reloads(processor, tmp_path):
    from ilora_kernels.crab.model import build_tiny_processor, build_tiny_thinker

    again = build_tiny_processor()
    assert again.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    processor.save_pretrained(str(tmp_path))
    loaded = build_tiny_processor(vocab_dir=tmp_path)
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert loaded.video_token_id == processor.video_token_id
    cfg = build_tiny_thinker(seed=0).config
    assert (cfg.video_token_id, cfg.audio_token_id, cfg.image_token_id) == (
        processor.video_token_id, processor.audio_token_id, processor.image_token_id)
    assert cfg.text_config.vocab_size >= len(processor.tokenizer)


def test_demo_data_deterministic_and_crab_import_light(tmp_path):
    a = demo_data.write_demo_dataset(tmp_path / "a", tasks=("avqa", "a2v"), n_train=2, n_test=1, seed=5)
    b = demo_data.write_demo_dataset(tmp_path / "b", tasks=("avqa", "a2v"), n_train=2, n_test=1, seed=5)
    for t in ("avqa", "a2v"):
        assert (a / t / "train.json").read_text() == (b / t / "train.json").read_text()
    for s in json.loads((a / "a2v" / "train.json").read_text()):
        assert demo_data.extract_answer(s["label"]) in demo_data.DEMO_CHOICES["a2v"]
    import subprocess
    code = "import sys, ilora_kernels.crab, ilora_kernels.crab.tasks; print('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_load_thinker_and_processor_from_local_folders(processor, tmp_path):
    """The real loading code on locally saved tiny checkpoints: a thinker folder and a full Omni folder
    (weights prefixed ``thinker.``, no talker), as ``Qwen/Qwen2.5-Omni-7B`` is laid out."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    from ilora_kernels.crab.model import build_tiny_thinker, load_processor, load_thinker

    model = build_tiny_thinker(seed=3, processor=processor)
    ref = model.state_dict()
    model.save_pretrained(tmp_path / "thinker")
    processor.save_pretrained(tmp_path / "thinker")
    full = Qwen2_5OmniForConditionalGeneration(Qwen2_5OmniConfig(thinker_config=model.config.to_dict(),
                                                                 enable_audio_output=False))
    full.thinker.load_state_dict(ref)
    full.save_pretrained(tmp_path / "omni")
    for folder in ("thinker", "omni"):
        loaded = load_thinker(tmp_path / folder, torch_dtype=torch.float32)
        assert type(loaded).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
        got = loaded.state_dict()
        assert set(got) == set(ref) and all(torch.equal(got[k], v) for k, v in ref.items())
    loaded_proc = load_processor(tmp_path / "thinker")
    assert loaded_proc.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def test_batched_logits_match_per_sample(train_samples, processor):
    """Padding (either side) and media concatenation order leave every sample's logits unchanged."""
    from ilora_kernels.crab.model import build_tiny_thinker

    model = build_tiny_thinker(seed=0, processor=processor).eval()
    picks = [next(s for s in train_samples if s.task == t) for t in ("a2v", "ref_avs", "ks")]
    ds = AVUIEDataset(picks, processor, num_frames=4, frame_size=56)
    items = [ds[i] for i in range(len(ds))]
    with torch.no_grad():
        single = [model(**model_inputs(collate([it]))).logits[0] for it in items]
        for side in ("right", "left"):
            batched = model(**model_inputs(collate(items, padding_side=side))).logits
            for r, ref in enumerate(single):
                n, length = ref.shape[0], batched.shape[1]
                got = batched[r, :n] if side == "right" else batched[r, length - n:]
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
