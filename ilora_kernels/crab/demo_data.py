"""A small synthetic AV-UIE v2 dataset in the exact released layout, for the demo and the tests.

``root/AVUIE_2/<task>/{train,test}.json`` with ``video/`` (mp4, MPEG-4 part 2, 64x64, 10 fps) and ``audio/`` (wav,
16 kHz mono) folders. Each sound class is a coloured shape plus a pure tone, so the answers are truly present:

  ks    which class is seen and heard (class = shape + colour on screen and the tone)            field ``label``
  ave   which class, and in which of the 4 half-second segments it is both seen and heard        ``label_content``
  avqa  a question on the colour, the shape, the pitch or the instrument (``question``)           ``label``
  a2v   which of two videos (``video1_path``/``video2_path``) matches the audio                   ``label``

Records carry exactly the fields upstream's readers read for the task and split (``crab.tasks.LAYOUTS``): train
records the train target field plus the short fields (``action``, ``event``/``start_time``/``end_time``,
``answer``, ``correct_video``, ids), test records only the test reader's fields, whose short fields are the
ground truth (``action``; ``event``/``start_time``/``end_time``; ``answer``; ``correct_video``).
Train targets follow the Crab+ style "explicit reasoning, then the answer": ``... Answer: <answer>``, where the
answer is the text the test ground truth reduces to (ks ``drum``, ave ``event:drum start_time:0.5 end_time:1.5``,
times in seconds; a2v ``1`` or ``2``, the ``correct_video``).
Deterministic from ``seed``; the default size writes in a few seconds.

``write_layout_dataset`` writes every task key (19 train, 16 test) in upstream's layout with tiny media and
distinct field values (no learnable content): for reader tests.

    python -m ilora_kernels.crab.demo_data --out DIR [--tasks ave avqa ks a2v] [--n-train 24] [--n-test 8]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from .tasks import FRAME_FROM_IMAGE_NAME, LAYOUTS, TASK_KEYS, TASKS

__all__ = ["DEMO_TASKS", "DEMO_CLASSES", "DEMO_CHOICES", "write_demo_dataset", "write_layout_dataset",
           "demo_vocabulary", "extract_answer"]

DEMO_TASKS = ("ave", "avqa", "ks", "a2v")
SAMPLE_RATE = 16000
FPS = 10
SIZE = 64
N_SEGMENTS = 4          # ave: 4 segments of 0.5 s


@dataclass(frozen=True)
class DemoClass:
    name: str
    colour: str
    rgb: tuple
    shape: str
    freq: int

    @property
    def pitch(self) -> str:
        return "high" if self.freq >= 500 else "low"


DEMO_CLASSES = (
    DemoClass("drum", "red", (220, 30, 30), "square", 220),
    DemoClass("bell", "yellow", (230, 210, 20), "circle", 880),
    DemoClass("flute", "blue", (30, 60, 220), "diamond", 660),
    DemoClass("horn", "green", (30, 180, 60), "stripe", 330),
)
_BY_NAME = {c.name: c for c in DEMO_CLASSES}

SEGMENT_SECONDS = 0.5


def _seconds(segment: int) -> float:
    """ave's ``start_time`` / ``end_time``: segment boundaries in seconds."""
    return round(segment * SEGMENT_SECONDS, 3)


def _ave_answer(name: str, s: int, e: int) -> str:
    # upstream's test ground truth of ave is "event:<event> start_time:<start> end_time:<end>"
    return f"event:{name} start_time:{_seconds(s)} end_time:{_seconds(e)}"


# Closed-set answer vocabularies of the demo tasks (a2v: the correct_video, 1 or 2; ave: _ave_answer).
DEMO_CHOICES: Dict[str, tuple] = {
    "ks": tuple(c.name for c in DEMO_CLASSES),
    "a2v": ("1", "2"),
    "avqa": tuple(sorted({c.colour for c in DEMO_CLASSES} | {c.shape for c in DEMO_CLASSES}
                         | {c.name for c in DEMO_CLASSES} | {"high", "low"})),
    "ave": tuple(_ave_answer(c.name, s, e) for c in DEMO_CLASSES for s in range(N_SEGMENTS)
                 for e in range(s + 1, N_SEGMENTS + 1)),
}

AVQA_QUESTIONS = {
    "colour": "What colour is the object in the video?",
    "shape": "What shape is the object in the video?",
    "pitch": "Is the sound high or low?",
    "instrument": "Which instrument is playing?",
}


def extract_answer(text: str) -> str:
    """The text after the last ``Answer:`` (stripped, trailing full stop removed); the whole text if absent."""
    i = text.rfind("Answer:")
    ans = text[i + len("Answer:"):] if i >= 0 else text
    return ans.strip().rstrip(".").strip()


def _tone_phrase(c: DemoClass) -> str:
    return f"{'an' if str(c.freq).startswith('8') else 'a'} {c.freq} Hz tone"


def _describe(c: DemoClass) -> str:
    return f"a {c.colour} {c.shape}"


def _ks_target(c):
    return f"The video shows {_describe(c)} and the audio is {_tone_phrase(c)}, the sound of a {c.name}. " \
           f"Answer: {c.name}"


def _ave_target(c, s, e):
    return f"{_describe(c).capitalize()} is seen and {_tone_phrase(c)} is heard together from {_seconds(s)} s to " \
           f"{_seconds(e)} s, so the event is a {c.name}. Answer: {_ave_answer(c.name, s, e)}"


def _avqa_answer(c, kind):
    return {"colour": c.colour, "shape": c.shape, "pitch": c.pitch}.get(kind, c.name)


def _avqa_target(c, kind):
    if kind == "colour":
        return f"The video shows {_describe(c)}. Answer: {c.colour}"
    if kind == "shape":
        return f"The video shows {_describe(c)}. Answer: {c.shape}"
    if kind == "pitch":
        return f"The audio is {_tone_phrase(c)}, which is {c.pitch}. Answer: {c.pitch}"
    return f"The video shows {_describe(c)} and the audio is {_tone_phrase(c)}, so a {c.name} is playing. " \
           f"Answer: {c.name}"


def _a2v_target(c, other, which):
    first, second = (c, other) if which == "first" else (other, c)
    number = 1 if which == "first" else 2
    return f"The audio is {_tone_phrase(c)}, the sound of a {c.name}. The first video shows {_describe(first)} " \
           f"and the second video shows {_describe(second)}, so the {which} video matches. Answer: {number}"


def demo_vocabulary() -> List[str]:
    """Every target and question text the demo can produce (used to train the tiny tokenizer)."""
    texts = list(AVQA_QUESTIONS.values())
    for c in DEMO_CLASSES:
        texts.append(_ks_target(c))
        texts.append(_ave_target(c, 0, N_SEGMENTS))
        texts += [_avqa_target(c, k) for k in AVQA_QUESTIONS]
        for o in DEMO_CLASSES:
            if o is not c:
                texts += [_a2v_target(c, o, "first"), _a2v_target(c, o, "second")]
    return texts


# ------------------------------------------------------------------------------------------------------ media
def _shape_mask(shape: str, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    if shape == "square":
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= 1.3 * r
    if shape == "stripe":
        return (np.abs(dy) <= 0.45 * r) & (np.abs(dx) <= 1.6 * r)
    raise ValueError(shape)


def _frames(c: DemoClass, n_frames: int, rng: np.random.Generator, visible=None) -> np.ndarray:
    """(T, H, W, 3) uint8: a grey noisy background, the class's shape drifting slowly (hidden where not visible)."""
    bg = rng.integers(90, 130, size=3)
    r = rng.uniform(9, 13)
    cy, cx = rng.uniform(18, SIZE - 18, size=2)
    vy, vx = rng.uniform(-1.0, 1.0, size=2)
    out = np.empty((n_frames, SIZE, SIZE, 3), np.uint8)
    for t in range(n_frames):
        img = np.clip(bg + rng.normal(0, 6, size=(SIZE, SIZE, 3)), 0, 255)
        if visible is None or visible[t]:
            m = _shape_mask(c.shape, float(np.clip(cy + vy * t, 14, SIZE - 14)),
                            float(np.clip(cx + vx * t, 14, SIZE - 14)), r)
            img[m] = c.rgb
        out[t] = img.astype(np.uint8)
    return out


def _tone(c: DemoClass, seconds: float, rng: np.random.Generator, audible=None) -> np.ndarray:
    n = int(round(seconds * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    wave = 0.4 * np.sin(2 * np.pi * c.freq * t + rng.uniform(0, 2 * np.pi))
    if audible is not None:
        wave = wave * audible
    return (wave + rng.normal(0, 0.02, size=n)).astype(np.float32)


def _write_video(path: Path, frames: np.ndarray):
    import av
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height = SIZE, SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"}
        for arr in frames:
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_audio(path: Path, wave: np.ndarray):
    import soundfile as sf
    sf.write(str(path), wave, SAMPLE_RATE, subtype="PCM_16")


# ------------------------------------------------------------------------------------------------------ writer
def _only(task: str, split: str, record: dict) -> dict:
    """The record cut to the fields upstream's reader of this task and split reads (``crab.tasks.LAYOUTS``)."""
    layout = TASKS[task].layout(split)
    keep = set(layout.media_names) | set(layout.fields)
    missing = keep - set(record)
    if missing:
        raise AssertionError(f"demo record of {task}/{split} lacks {sorted(missing)}")
    return {k: v for k, v in record.items() if k in keep}


def _make_sample(task: str, i: int, split: str, tdir: Path, rng: np.random.Generator) -> dict:
    """One sample's JSON record in upstream's layout of the task and split (media written under ``tdir``)."""
    return _only(task, split, _full_record(task, i, split, tdir, rng))


def _full_record(task: str, i: int, split: str, tdir: Path, rng: np.random.Generator) -> dict:
    stem = f"{split}_{i:04d}"
    c = DEMO_CLASSES[int(rng.integers(len(DEMO_CLASSES)))]
    if task == "ks":
        _write_video(tdir / "video" / f"{stem}.mp4", _frames(c, FPS, rng))
        _write_audio(tdir / "audio" / f"{stem}.wav", _tone(c, 1.0, rng))
        return {"video_path": f"{stem}.mp4", "audio_path": f"{stem}.wav", "action": c.name, "label": _ks_target(c)}
    if task == "ave":
        s = int(rng.integers(0, N_SEGMENTS))
        e = int(rng.integers(s + 1, N_SEGMENTS + 1))
        seconds = N_SEGMENTS * SEGMENT_SECONDS
        seg_of_frame = (np.arange(int(seconds * FPS)) / FPS / SEGMENT_SECONDS).astype(int)
        # the shape is visible in [s, e) plus maybe one extra segment (seen but not heard), the tone is heard in
        # [s, e): the audio-visual event is exactly [s, e)
        visible = (seg_of_frame >= s) & (seg_of_frame < e)
        if rng.random() < 0.5 and e < N_SEGMENTS:
            visible |= seg_of_frame == e
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        seg_of_sample = (t / SEGMENT_SECONDS).astype(int)
        audible = ((seg_of_sample >= s) & (seg_of_sample < e)).astype(np.float32)
        _write_video(tdir / "video" / f"{stem}.mp4", _frames(c, len(seg_of_frame), rng, visible))
        _write_audio(tdir / "audio" / f"{stem}.wav", _tone(c, seconds, rng, audible))
        return {"video_path": f"{stem}.mp4", "audio_path": f"{stem}.wav", "event": c.name, "vid": stem,
                "start_time": _seconds(s), "end_time": _seconds(e), "label_content": _ave_target(c, s, e)}
    if task == "avqa":
        kind = list(AVQA_QUESTIONS)[int(rng.integers(len(AVQA_QUESTIONS)))]
        _write_video(tdir / "video" / f"{stem}.mp4", _frames(c, FPS, rng))
        _write_audio(tdir / "audio" / f"{stem}.wav", _tone(c, 1.0, rng))
        return {"video_path": f"{stem}.mp4", "audio_path": f"{stem}.wav", "video_id": stem, "question_id": i,
                "type": kind, "question": AVQA_QUESTIONS[kind], "answer": _avqa_answer(c, kind),
                "label": _avqa_target(c, kind)}
    if task == "a2v":
        others = [o for o in DEMO_CLASSES if o is not c]
        other = others[int(rng.integers(len(others)))]
        which = "first" if rng.random() < 0.5 else "second"
        first, second = (c, other) if which == "first" else (other, c)
        _write_video(tdir / "video" / f"{stem}_1.mp4", _frames(first, FPS, rng))
        _write_video(tdir / "video" / f"{stem}_2.mp4", _frames(second, FPS, rng))
        _write_audio(tdir / "audio" / f"{stem}.wav", _tone(c, 1.0, rng))
        return {"video1_path": f"{stem}_1.mp4", "video2_path": f"{stem}_2.mp4", "audio_path": f"{stem}.wav",
                "correct_video": 1 if which == "first" else 2, "audio_event": c.name, "video1_event": first.name,
                "video2_event": second.name, "label": _a2v_target(c, other, which)}
    raise ValueError(f"write_demo_dataset: no demo generator for task {task!r} (available: {DEMO_TASKS})")


def write_demo_dataset(root, tasks: Sequence[str] = DEMO_TASKS, n_train: int = 24, n_test: int = 8,
                       seed: int = 0) -> Path:
    """Writes the demo dataset under ``root/AVUIE_2/`` and returns that folder (the folder holding the task
    folders; ``load_split`` accepts it or ``root``). Same seed, same files and JSON."""
    root = Path(root)
    base = root / "AVUIE_2"
    for t_i, task in enumerate(tasks):
        if task not in DEMO_TASKS:
            raise ValueError(f"write_demo_dataset: no demo generator for task {task!r} (available: {DEMO_TASKS})")
        tdir = base / task
        (tdir / "video").mkdir(parents=True, exist_ok=True)
        (tdir / "audio").mkdir(parents=True, exist_ok=True)
        for s_i, (split, n) in enumerate((("train", n_train), ("test", n_test))):
            rng = np.random.default_rng([seed, t_i, s_i])
            samples = [_make_sample(task, i, split, tdir, rng) for i in range(n)]
            with open(tdir / f"{split}.json", "w", encoding="utf-8") as f:
                json.dump(samples, f, indent=1)
    return base


def _layout_value(task: str, split: str, fld: str, i: int):
    """A distinct value of the type upstream's data holds for ``fld`` (``write_layout_dataset``)."""
    if fld in ("correct_video", "correct_audio"):
        return 1 + i % 2
    if fld in ("start_time", "end_time"):
        return i + (0 if fld == "start_time" else 3)
    if fld in ("top_left", "bottom_right"):
        return [10 + i, 12 + i] if fld == "top_left" else [40 + i, 44 + i]
    if fld in ("frame_idx", "idx"):
        return 1 + i
    if fld in ("fid", "question_id", "id"):
        return 100 * (1 + ("fid", "question_id", "id").index(fld)) + i
    if fld == "multi_choice":
        return [f"{task} choice {k} {i}" for k in "abcd"]
    if (task, fld) == ("ucf", "label"):                          # class names as UCF-101 spells them
        return f"PlayingDrum{split.title()}{i}"
    return f"{task} {split} {fld} {i}"


def write_layout_dataset(root, n: int = 2, tasks: Sequence[str] = TASK_KEYS, seed: int = 0) -> Path:
    """Every task key in upstream's exact JSON layout: ``train.json`` for all 19, ``test.json`` for the 16 that
    upstream tests (``crab.tasks.LAYOUTS``), ``n`` records each, with tiny media (4-frame 64x64 mp4 clips, 1-s wav
    tones, png frames) and a distinct value per field (``"<task> <split> <field> <i>"`` for text fields; numbers
    and lists where upstream holds them). No learnable content: it is for reader tests. Returns ``root/AVUIE_2``."""
    from PIL import Image

    base = Path(root) / "AVUIE_2"
    for t_i, task in enumerate(tasks):
        tdir = base / task
        for s_i, (split, layout) in enumerate(LAYOUTS[task].items()):
            rng = np.random.default_rng([seed, t_i, s_i])
            records = []
            for i in range(n):
                c = DEMO_CLASSES[(t_i + i) % len(DEMO_CLASSES)]
                rec = {}
                for names, kind, subdir in layout.media:
                    fld = names[0]
                    stem = f"{split}_{i}_{fld[:-5]}"
                    if kind == "image":
                        rel = f"frames/{split}_{i}/{1 + i}.png" if layout.frame == FRAME_FROM_IMAGE_NAME \
                            else f"frames/{stem}.png"
                        path = tdir / rel
                        path.parent.mkdir(parents=True, exist_ok=True)
                        Image.fromarray(_frames(c, 1, rng)[0]).save(path)
                    else:
                        ext = "mp4" if kind == "video" else "wav"
                        rel = f"{kind}/{stem}.{ext}" if not subdir else f"{stem}.{ext}"
                        path = tdir / (subdir or "") / rel
                        path.parent.mkdir(parents=True, exist_ok=True)
                        if kind == "video":
                            _write_video(path, _frames(c, 4, rng))
                        else:
                            _write_audio(path, _tone(c, 1.0, rng))
                    rec[fld] = rel
                for fld in layout.fields:
                    rec[fld] = _layout_value(task, split, fld, i)
                if split == "train":
                    rec[layout.target[0]] = f"{task} reasoning {i}. Answer: {task} answer {i}"
                records.append(rec)
            tdir.mkdir(parents=True, exist_ok=True)
            with open(tdir / f"{split}.json", "w", encoding="utf-8") as f:
                json.dump(records, f, indent=1)
    return base


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m ilora_kernels.crab.demo_data",
                                description="Write the synthetic AV-UIE v2 demo dataset (root/AVUIE_2/<task>/...).")
    p.add_argument("--out", required=True, help="data root to write (AVUIE_2/ is created inside)")
    p.add_argument("--tasks", nargs="+", default=list(DEMO_TASKS), choices=DEMO_TASKS, help="task keys to write")
    p.add_argument("--n-train", type=int, default=24, help="training samples per task")
    p.add_argument("--n-test", type=int, default=8, help="test samples per task")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same dataset)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    base = write_demo_dataset(a.out, a.tasks, a.n_train, a.n_test, a.seed)
    print(f"wrote {len(a.tasks)} tasks x ({a.n_train} train + {a.n_test} test) to {base} "
          f"in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
