"""The AV-UIE v2 task registry (SPEC section 4) and the replaceable per-task prompt file.

``TASKS[key]`` describes one task key: which JSON field holds the target text, which media the sample carries, the
metric the evaluation scores it with and, for closed-set tasks whose answer vocabulary we ship, the choices. It is the
one list of tasks: the data reader, the recipe config (``data.tasks``) and the evaluation all read it.

Media kinds:
  ``video_audio``  ``video_path`` + ``audio_path`` (file names inside the task folder's ``video/`` and ``audio/``)
  ``a2v``          one audio (``audio_path``) and two candidate videos (``video1_path``, ``video2_path``)
  ``v2a``          one video (``video_path``) and two candidate audios (``audio1_path``, ``audio2_path``)
  ``image_audio``  ``image_path`` (train) / ``visual_path`` (test) + ``audio_path``, paths relative to the task
                   folder (either image field name is accepted in either split)

Record layouts (``LAYOUTS``; ``TASKS[key].layout(split)``): per task and split, the JSON fields upstream's readers
(GeWu-Lab/Crab_Plus ``dataset/qwen2_5_omni/omni_dataset.py``: ``OmniDataset`` for train, ``OmniTestDataset`` for
test) read from each record and what each one is: the media files, the target (train: the assistant answer; test:
the ground truth, which upstream builds from short fields such as ``action`` or ``emotion``, see ``RecordLayout``),
the question or referring expression, the answer options, the frame index, the 1-second audio window (the window
facts are from ``dataset/qwen_omni_utils/v2_5/audio_process.py``) and the ids / names upstream keeps as metadata.
Upstream reads all 19 task keys in train and 16 in test (``UPSTREAM_TEST_TASKS``: no unav, avcap or mer24); a
test.json of those three is read with the train layout.

Metrics (``METRICS``; each has one scorer in ``crab.evaluate.SCORERS``): ``accuracy`` (classification, QA, AVE),
``avvp_f1`` (segment/event-level F1 per modality), ``iou`` (temporal or spatial localisation), ``caption`` (free
text), ``seg_text`` (s4, ms3, ref_avs: a text-only proxy; their mask metrics need a mask decoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

__all__ = ["TaskSpec", "TASKS", "TASK_KEYS", "MEDIA_KINDS", "METRICS", "PROPORTION_METRICS", "DEFAULT_PROMPTS_PATH",
           "RecordLayout", "LAYOUTS", "UPSTREAM_TEST_TASKS", "FRAME_FROM_IMAGE_NAME",
           "AudioWindows", "UPSTREAM_AUDIO_WINDOWS", "UPSTREAM_NUM_FRAMES"]

MEDIA_KINDS = ("video_audio", "a2v", "v2a", "image_audio")
METRICS = ("accuracy", "avvp_f1", "iou", "caption", "seg_text")
# Metrics whose per-sample value is 0 or 1, so the score is a proportion (the report gives it a Wilson interval);
# the others are means of per-sample values in [0, 1] (bootstrap intervals over samples).
PROPORTION_METRICS = ("accuracy",)

# Fields that may hold a sample's own question / referring expression, first match wins; only for tasks whose
# layout declares no question field (the layouts name the field for avqa, avqa_thu and ref_avs).
QUESTION_FIELDS = ("question", "question_content", "query", "ref", "ref_expression", "expression")


@dataclass(frozen=True)
class TaskSpec:
    key: str
    target_field: str          # "label" | "new_label" | "label_content" | "output"
    media: str                 # one of MEDIA_KINDS
    metric: str                # one of METRICS
    description: str
    choices: Optional[Tuple[str, ...]] = None   # answer vocabulary when closed-set and shipped; None = open

    @property
    def media_fields(self) -> Tuple[Tuple[str, str, str], ...]:
        return MEDIA_FIELDS[self.media]

    @property
    def audio_windows(self) -> Optional["AudioWindows"]:
        """The part of the audio upstream Crab+ feeds for this task (``UPSTREAM_AUDIO_WINDOWS``)."""
        return UPSTREAM_AUDIO_WINDOWS.get(self.key)

    @property
    def upstream_num_frames(self) -> Optional[int]:
        """Upstream's video frame count for this task when it is not the recipe's ``num_frames`` (``None``)."""
        return UPSTREAM_NUM_FRAMES.get(self.key)

    @property
    def has_upstream_test(self) -> bool:
        """Whether upstream's test reader reads this task (16 of the 19 keys)."""
        return "test" in LAYOUTS[self.key]

    def layout(self, split: str) -> "RecordLayout":
        """The record layout of ``<task>/<split>.json``: the test layout for ``split == "test"`` where upstream has
        one, else the train layout (also for other split names)."""
        layouts = LAYOUTS[self.key]
        return layouts["test"] if split == "test" and "test" in layouts else layouts["train"]


def _t(key, field, media, metric, description, choices=None):
    return key, TaskSpec(key, field, media, metric, description, choices)


# The answer vocabularies of the real datasets are not shipped (they come with the data); a2v/v2a are two-way choices.
TASKS: Dict[str, TaskSpec] = dict([
    _t("a2v", "label", "a2v", "accuracy", "audio-to-video retrieval: which of two videos matches the audio"),
    _t("v2a", "label", "v2a", "accuracy", "video-to-audio retrieval: which of two audios matches the video"),
    _t("ks", "label", "video_audio", "accuracy", "Kinetics-Sounds audio-visual action classification"),
    _t("ucf", "new_label", "video_audio", "accuracy", "UCF-101 action classification"),
    _t("meld", "label", "video_audio", "accuracy", "MELD emotion recognition in conversation"),
    _t("mer24", "label", "video_audio", "accuracy", "MER2024 multimodal emotion recognition"),
    _t("cremad", "label", "video_audio", "accuracy", "CREMA-D emotion recognition"),
    _t("mafw", "label", "video_audio", "accuracy", "MAFW in-the-wild emotion recognition"),
    _t("dfew", "label", "video_audio", "accuracy", "DFEW in-the-wild emotion recognition"),
    _t("ave", "label_content", "video_audio", "accuracy", "audio-visual event localisation (AVE)"),
    _t("unav", "label_content", "video_audio", "iou", "untrimmed audio-visual dense event localisation (UnAV)"),
    _t("avvp", "label_content", "video_audio", "avvp_f1", "audio-visual video parsing (LLP/AVVP)"),
    _t("arig", "label_content", "image_audio", "iou", "audio-referred image grounding (boxes)"),
    _t("s4", "label_content", "image_audio", "seg_text", "AVSBench single-source sound source localisation"),
    _t("ms3", "label_content", "image_audio", "seg_text", "AVSBench multi-source sound source localisation"),
    _t("ref_avs", "output", "image_audio", "seg_text", "referring audio-visual segmentation (Ref-AVS)"),
    _t("avcap", "label_content", "video_audio", "caption", "audio-visual captioning"),
    _t("avqa", "label", "video_audio", "accuracy", "MUSIC-AVQA audio-visual question answering"),
    _t("avqa_thu", "label", "video_audio", "accuracy", "AVQA (THU) audio-visual question answering"),
])
TASK_KEYS: Tuple[str, ...] = tuple(TASKS)

# The frame index of arig's train records is not a field: it is the image file's name (``<n>.<ext>``).
FRAME_FROM_IMAGE_NAME = "<image file name>"


@dataclass(frozen=True)
class RecordLayout:
    """The fields one split's records of one task carry (upstream's readers read each of them) and their meaning.

    ``media``: ``(accepted field names, first present wins; media kind; sub-folder of the task folder)`` per file.
    ``target``: the fields the target is made of. Train: the assistant answer. Test: the ground truth, which
    upstream builds from short fields (``action``, ``emotion``, ``answer``, ``a_obj``, ...) rather than the train
    target field; ``template`` (``str.format`` over the target fields; ``None``: the one field's value as it is)
    composes upstream's reference text from them, and ``lower`` names target fields lower-cased first.
    ``question``: the sample's question or referring expression (``Sample.instruction``); ``options``: its answer
    options (``Sample.options``); ``frame``: the frame index of the image within its clip (``Sample.frame_idx``;
    ``FRAME_FROM_IMAGE_NAME``: from the image file's name); ``audio_window``: the 1-second audio window upstream
    feeds (``Sample.audio_window``): an int, or ``"frame"`` for the frame index, ``None`` when the task feeds its
    default windows. ``meta``: the other fields upstream reads (ids, event names, answers) -> ``Sample.meta``.
    Every field named here except ``meta`` is required (missing or null: an error, or a counted skip)."""

    media: Tuple[Tuple[Tuple[str, ...], str, str], ...]
    target: Tuple[str, ...]
    template: Optional[str] = None
    lower: Tuple[str, ...] = ()
    question: Optional[str] = None
    options: Optional[str] = None
    frame: Optional[str] = None
    audio_window: Union[None, int, str] = None
    meta: Tuple[str, ...] = ()

    @property
    def fields(self) -> Tuple[str, ...]:
        """Every non-media field named, in order (target, question, options, frame field, meta), no repeats."""
        named = list(self.target) + [f for f in (self.question, self.options, self.frame)
                                     if f and f != FRAME_FROM_IMAGE_NAME] + list(self.meta)
        return tuple(dict.fromkeys(named))

    @property
    def media_names(self) -> Tuple[str, ...]:
        """The primary name of each media field."""
        return tuple(names[0] for names, _, _ in self.media)


_VA = ((("video_path",), "video", "video"), (("audio_path",), "audio", "audio"))
_A2V = ((("video1_path",), "video", "video"), (("video2_path",), "video", "video"), (("audio_path",), "audio", "audio"))
_V2A = ((("video_path",), "video", "video"), (("audio1_path",), "audio", "audio"), (("audio2_path",), "audio", "audio"))
_IMG_TRAIN = ((("image_path", "visual_path"), "image", ""), (("audio_path",), "audio", ""))
_IMG_TEST = ((("visual_path", "image_path"), "image", ""), (("audio_path",), "audio", ""))
_L = RecordLayout
_EMOTION_TEST = "<answer>{emotion}</answer>."
_SOUNDING_TEST = "The object making the sound in the video is {a_obj}."

# Read from upstream's readers (see the module docstring); train layouts for all 19 keys, test layouts for 16.
LAYOUTS: Dict[str, Dict[str, RecordLayout]] = {
    "a2v": {"train": _L(_A2V, ("label",), meta=("correct_video", "audio_event", "video1_event", "video2_event")),
            "test": _L(_A2V, ("correct_video",), "<answer>{correct_video}</answer>.")},
    "v2a": {"train": _L(_V2A, ("label",), meta=("correct_audio", "audio1_event", "video_event", "audio2_event")),
            "test": _L(_V2A, ("correct_audio",), "<answer>{correct_audio}</answer>.")},
    "ks": {"train": _L(_VA, ("label",), meta=("action",)),
           "test": _L(_VA, ("action",), "<answer>{action}</answer>")},
    "ucf": {"train": _L(_VA, ("new_label",), meta=("label",)),
            "test": _L(_VA, ("label",), "<answer>{label}</answer>", lower=("label",))},
    "meld": {"train": _L(_VA, ("label",), meta=("Emotion",)),
             "test": _L(_VA, ("Emotion",), "<answer>{Emotion}</answer>.")},
    "mer24": {"train": _L(_VA, ("label",), meta=("discrete",))},
    "cremad": {"train": _L(_VA, ("label",), meta=("emotion",)), "test": _L(_VA, ("emotion",), _EMOTION_TEST)},
    "mafw": {"train": _L(_VA, ("label",), meta=("emotion",)), "test": _L(_VA, ("emotion",), _EMOTION_TEST)},
    "dfew": {"train": _L(_VA, ("label",), meta=("emotion",)), "test": _L(_VA, ("emotion",), _EMOTION_TEST)},
    "ave": {"train": _L(_VA, ("label_content",), meta=("event", "vid", "start_time", "end_time")),
            "test": _L(_VA, ("event", "start_time", "end_time"),
                       "event:{event} start_time:{start_time} end_time:{end_time}", meta=("vid",))},
    "unav": {"train": _L(_VA, ("label_content",), meta=("vid",))},
    "avvp": {"train": _L(_VA, ("label_content",), meta=("filename", "vid", "event")),
             "test": _L(_VA, ("event",), meta=("filename", "vid"))},
    "arig": {"train": _L(_IMG_TRAIN, ("label_content",), frame=FRAME_FROM_IMAGE_NAME, meta=("a_obj",)),
             "test": _L(_IMG_TEST, ("a_obj", "top_left", "bottom_right"),
                        "The sounding object is {a_obj}. Its coordinates are "
                        "<obj>({top_left[0]},{top_left[1]})({bottom_right[0]},{bottom_right[1]})</obj>.",
                        frame="frame_idx")},
    "s4": {"train": _L(_IMG_TRAIN, ("label_content",), audio_window=0, meta=("vid", "uid", "a_obj")),
           "test": _L(_IMG_TEST, ("a_obj",), _SOUNDING_TEST, frame="frame_idx", audio_window="frame",
                      meta=("vid", "uid"))},
    "ms3": {"train": _L(_IMG_TRAIN, ("label_content",), frame="frame_idx", audio_window="frame",
                        meta=("vid", "uid", "a_obj")),
            "test": _L(_IMG_TEST, ("a_obj",), _SOUNDING_TEST, frame="frame_idx", audio_window="frame",
                       meta=("vid", "uid"))},
    "ref_avs": {"train": _L(_IMG_TRAIN, ("output",), question="description", frame="idx", audio_window="frame",
                            meta=("vid", "fid", "uid")),
                # the test ground truth is the referring expression itself (the masks are scored elsewhere)
                "test": _L(_IMG_TEST, ("object",), question="object", frame="frame_idx", audio_window="frame",
                           meta=("split", "vid", "uid", "fid"))},
    "avcap": {"train": _L(_VA, ("label_content",), meta=("video_id",))},
    "avqa": {"train": _L(_VA, ("label",), question="question", meta=("video_id", "question_id", "type", "answer")),
             "test": _L(_VA, ("answer",), question="question", meta=("video_id", "question_id", "type"))},
    "avqa_thu": {"train": _L(_VA, ("label",), question="question_text", options="multi_choice",
                             meta=("id", "video_name", "video_id", "question_relation", "question_type", "answer")),
                 "test": _L(_VA, ("answer",), question="question_text", options="multi_choice",
                            meta=("id", "video_name", "video_id", "question_relation", "question_type"))},
}
UPSTREAM_TEST_TASKS: Tuple[str, ...] = tuple(k for k in TASK_KEYS if "test" in LAYOUTS[k])

# Media fields per media kind, from the train layouts (every task of a kind has the same): (field, kind of file,
# sub-folder of the task folder the file name lives in; "" for the image tasks, whose paths are relative to the task
# folder itself).
MEDIA_FIELDS: Dict[str, Tuple[Tuple[str, str, str], ...]] = {
    kind: tuple((names[0], file_kind, sub) for names, file_kind, sub in
                LAYOUTS[next(k for k, spec in TASKS.items() if spec.media == kind)]["train"].media)
    for kind in MEDIA_KINDS}


@dataclass(frozen=True)
class AudioWindows:
    """The part of a sample's audio upstream Crab+ feeds (``dataset/qwen_omni_utils/v2_5/audio_process.py``),
    taken from the mono 16 kHz signal after it is padded with trailing silence to at least 1 s
    (``crab.data.apply_audio_windows``).

    ``units``: the clip is cut into this many equal parts (a part is ``n_samples // units`` samples, so a part is a
    second only for a clip of ``units`` seconds) and ``starts`` / ``length`` count parts; ``None``: they count
    seconds. Each window ``[start, start + length)`` is clipped to the clip, padded with silence to ``length`` on
    the side that fell outside it, and the windows are concatenated in order. ``indexed``: one window whose start
    is the sample's own index (``Sample.audio_window``, else its frame index; 0 when it has none), not ``starts``."""

    units: Optional[int]
    starts: Tuple[float, ...] = (0.0,)
    length: float = 1.0
    indexed: bool = False

    @property
    def read_seconds(self) -> Optional[float]:
        """Seconds from the file's start that hold every window (``None``: the window depends on the length)."""
        if self.units is not None or self.indexed:
            return None
        return max(s + self.length for s in self.starts)


# Upstream feeds, per task (used with the recipe's data.upstream_media, the default):
#   avqa: ten 2-part windows of a 60-part clip, centred 0.5 parts after every 6th part (the first one padded in
#         front); the nine 10-part tasks and arig (5 parts): the whole clip, cut to a whole number of parts;
#   the five emotion tasks: the first 4 s; s4, ms3: 1 part of 5 at the frame index; ref_avs: 1 part of 10 at idx.
_WHOLE_10 = AudioWindows(units=10, starts=(0.0,), length=10.0)
UPSTREAM_AUDIO_WINDOWS: Dict[str, AudioWindows] = {
    **{t: _WHOLE_10 for t in ("avqa_thu", "ks", "ucf", "avvp", "ave", "a2v", "v2a", "unav", "avcap")},
    "avqa": AudioWindows(units=60, starts=tuple(i - 0.5 for i in range(0, 60, 6)), length=2.0),
    **{t: AudioWindows(units=None, starts=(0.0,), length=4.0) for t in ("meld", "mer24", "cremad", "mafw", "dfew")},
    "arig": AudioWindows(units=5, starts=(0.0,), length=5.0),
    "s4": AudioWindows(units=5, indexed=True),
    "ms3": AudioWindows(units=5, indexed=True),
    "ref_avs": AudioWindows(units=10, indexed=True),
}
# Upstream's video frames per clip where they are not the recipe's 10 (dataset/qwen2_5_omni/omni_dataset.py).
UPSTREAM_NUM_FRAMES: Dict[str, int] = {t: 4 for t in ("meld", "mer24", "cremad", "mafw", "dfew")}

DEFAULT_PROMPTS_PATH = Path(__file__).with_name("prompts.json")


