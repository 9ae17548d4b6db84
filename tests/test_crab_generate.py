"""``ilora-crab generate``: one answer from a video / audio / image and a question with a trained adapter, through
the prompt building of training (``build_generation_inputs`` on a ``Sample``). The tiny thinker, patched with I-LoRA
as training patches it (``crab.train.build_model``) and saved with ``save_ilora`` (nothing is trained); tiny media
written by ``crab.demo_data``; the real ``model.generate`` runs, watched by a spy on the thinker class."""

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("av")
pytest.importorskip("soundfile")

from ilora_kernels import save_ilora  # noqa: E402
from ilora_kernels.crab.cli import main  # noqa: E402
from ilora_kernels.crab.config import (  # noqa: E402
    DataSection,  # noqa: E402
    config_from_dict,
    dump_config,
)
from ilora_kernels.crab.data import Sample, build_generation_inputs, build_messages, encode_sample  # noqa: E402
from ilora_kernels.crab.evaluate import parse_answer  # noqa: E402
from ilora_kernels.crab.prompts import load_prompts  # noqa: E402
from ilora_kernels.crab.train import CONFIG_COPY, build_model  # noqa: E402

NUM_FRAMES, FRAME_SIZE = 2, 56
UPSTREAM_MEDIA = DataSection().upstream_media  # the config default the command runs with


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained run's adapter folder (save_ilora + the config copy training writes) and tiny media."""
    from PIL import Image

    from ilora_kernels.crab import demo_data

    base = tmp_path_factory.mktemp("generate")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = config_from_dict({"model": {"name_or_path": "tiny", "tiny_init_std": 0.2},
                                "ilora": {"r": 4, "num_heads": 3, "alpha": 8, "dropout": 0.0},
                                "data": {"num_frames": NUM_FRAMES, "frame_size": FRAME_SIZE},
                                "eval": {"max_new_tokens": 5}})
        model, processor = build_model(cfg)
        adapter = base / "run"
        save_ilora(model, adapter)
        dump_config(cfg, adapter / CONFIG_COPY)
        demo_data.write_demo_dataset(base / "data", tasks=("a2v",), n_train=1, n_test=1, seed=0)
    finally:
        torch.set_num_threads(threads)
    tdir = base / "data" / "AVUIE_2" / "a2v"
    item = json.loads((tdir / "test.json").read_text())[0]
    image = base / "frame.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)).save(image)
    return {"adapter": adapter, "processor": processor, "cls": type(model), "image": image.absolute(),
            "video": (tdir / "video" / item["video1_path"]).absolute(),
            "video2": (tdir / "video" / item["video2_path"]).absolute(),
            "audio": (tdir / "audio" / item["audio_path"]).absolute()}


@pytest.fixture
def spy(run, monkeypatch):
    """Records the inputs and outputs of every ``generate`` of the thinker class (the real one runs)."""
    calls = []
    original = run["cls"].generate

    def generate(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append({"inputs": dict(kwargs), "output": out})
        return out

    monkeypatch.setattr(run["cls"], "generate", generate)
    threads = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, ""))
    yield calls
    torch.set_num_threads(threads)


def _generate(run, *args):
    return main(["generate", "--adapter", str(run["adapter"]), "--threads", "1", *map(str, args)])


def _same_inputs(seen: dict, expected: dict):
    keys = {k for k, v in expected.items() if torch.is_tensor(v)}
    assert keys and keys <= set(seen)
    for k in keys:
        assert torch.equal(seen[k].cpu(), expected[k]), k


def _printed(out: str, processor, call: dict):
    """The generation and answer printed, checked against the spy's decoded new tokens and parse_answer."""
    assert "generation:\n" in out and "\nanswer: " in out
    prompt_len = call["inputs"]["input_ids"].shape[1]
    text = processor.tokenizer.decode(call["output"][0, prompt_len:], skip_special_tokens=True)
    generation = out.split("generation:\n", 1)[1].rsplit("\nanswer: ", 1)[0]
    assert generation == text and text.strip()
    assert out.rstrip("\n").endswith(f"answer: {parse_answer(text)[0]}")


def test_generate_with_a_task_prompts_exactly_as_training(run, spy, capsys):
    assert _generate(run, "--task", "ks", "--video", run["video"], "--audio", run["audio"]) == 0
    out = capsys.readouterr().out
    assert len(spy) == 1 and spy[0]["inputs"]["max_new_tokens"] == 5            # the config's eval.max_new_tokens
    sample = Sample(task="ks", index=0, target="", instruction="",
                    media={"video": [run["video"]], "audio": [run["audio"]]})
    expected = build_generation_inputs(sample, run["processor"], num_frames=NUM_FRAMES, frame_size=FRAME_SIZE,
                                       upstream_media=UPSTREAM_MEDIA)
    _same_inputs(spy[0]["inputs"], expected)
    # the training sequence of the same sample starts with exactly this prompt
    sample.target = "dog barking"
    train_ids = encode_sample(sample, run["processor"], NUM_FRAMES, FRAME_SIZE, with_answer=True,
                              upstream_media=UPSTREAM_MEDIA)["input_ids"]
    n = expected["input_ids"].shape[1]
    assert torch.equal(train_ids[:, :n], expected["input_ids"]) and train_ids.shape[1] > n
    _printed(out, run["processor"], spy[0])


def test_generate_with_a_question_and_the_length_option(run, spy, capsys):
    q = "Which instrument is playing?"
    assert _generate(run, "--video", run["video"], "--audio", run["audio"], "--question", q,
                     "--max-new-tokens", "3", "--show-prompt") == 0
    out = capsys.readouterr().out
    assert len(spy) == 1 and spy[0]["inputs"]["max_new_tokens"] == 3
    # the question is the instruction; the rest (system, intro, media placeholders) as a video_audio task's sample
    prompts = load_prompts()
    prompts["tasks"]["avqa"] = "{question}"
    sample = Sample(task="avqa", index=0, target="", instruction=q,
                    media={"video": [run["video"]], "audio": [run["audio"]]})
    _same_inputs(spy[0]["inputs"], build_generation_inputs(sample, run["processor"], num_frames=NUM_FRAMES,
                                                           frame_size=FRAME_SIZE, prompts=prompts,
                                                           upstream_media=UPSTREAM_MEDIA))
    chat = run["processor"].apply_chat_template(build_messages(sample, prompts, with_answer=False), tokenize=False,
                                                add_generation_prompt=True)
    assert out.startswith("prompt:\n" + chat) and f"\n{q}<|im_end|>" in chat
    _printed(out, run["processor"], spy[0])
    # with --task the question fills the task's {question} slot of the shipped wording
    assert _generate(run, "--task", "avqa", "--video", run["video"], "--audio", run["audio"], "--question", q) == 0
    sample.instruction = q
    _same_inputs(spy[1]["inputs"], build_generation_inputs(sample, run["processor"], num_frames=NUM_FRAMES,
                                                           frame_size=FRAME_SIZE, upstream_media=UPSTREAM_MEDIA))


def test_generate_on_an_image_and_on_two_videos(run, spy, capsys):
    assert _generate(run, "--task", "arig", "--image", run["image"], "--audio", run["audio"]) == 0
    sample = Sample(task="arig", index=0, target="", instruction="",
                    media={"image": [run["image"]], "audio": [run["audio"]]})
    _same_inputs(spy[0]["inputs"], build_generation_inputs(sample, run["processor"], num_frames=NUM_FRAMES,
                                                           frame_size=FRAME_SIZE, upstream_media=UPSTREAM_MEDIA))
    assert "pixel_values" in spy[0]["inputs"]
    _printed(capsys.readouterr().out, run["processor"], spy[0])
    # a2v: the two candidate videos in the order given
    assert _generate(run, "--task", "a2v", "--video", run["video"], "--video", run["video2"],
                     "--audio", run["audio"]) == 0
    sample = Sample(task="a2v", index=0, target="", instruction="",
                    media={"video": [run["video"], run["video2"]], "audio": [run["audio"]]})
    _same_inputs(spy[1]["inputs"], build_generation_inputs(sample, run["processor"], num_frames=NUM_FRAMES,
                                                           frame_size=FRAME_SIZE, upstream_media=UPSTREAM_MEDIA))
    _printed(capsys.readouterr().out, run["processor"], spy[1])


def test_generate_errors_are_one_line(run, spy, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--task", "ks", "--video", tmp_path / "nope.mp4", "--audio", run["audio"]],
         f"--video {tmp_path / 'nope.mp4'}: file not found"),
        (["--video", run["video"], "--audio", tmp_path / "nope.wav", "--question", "q?"],
         f"--audio {tmp_path / 'nope.wav'}: file not found"),
        (["--task", "ks", "--video", run["video"]], "task 'ks' takes 1 --video and 1 --audio"),
        (["--video", run["video"], "--audio", run["audio"]], "give --question"),
    ]
    for args, message in cases:
        assert _generate(run, *args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith("ilora-crab generate: error: ") and message in err, err
    for folder, message in ((tmp_path / "missing", "adapter folder not found"), (empty, "no adapter_config.json")):
        argv = ["generate", "--adapter", str(folder), "--threads", "1", "--task", "ks", "--video", str(run["video"]),
                "--audio", str(run["audio"])]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"--adapter {folder}: {message}" in err, err
    assert not spy                                                              # nothing was generated
