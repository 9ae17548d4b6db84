"""The AV-UIE v2 task registry (SPEC section 4) and the replaceable per-task prompt file.

``TASKS[key]`` describes one task key: which JSON field holds the target text, which media the sample carries, the
metric the evaluation scores it with and, for closed-set tasks whose answer vocabulary we ship, the choices. It is the
one list of tasks: the data reader, the recipe config (``data.tasks``) and the evaluation all read it.

Media kinds:
  ``video_audio``  ``video_path`` + ``audio_path`` (file names inside the task folder's ``video/`` and ``audio/``)
  ``a2v``          one audio (``audio_path``) and two candidate videos (``video1_path``, ``video2_path``)
  ``v2a``          one video (``video_path``) and two candidate audios (``audio1_path``, ``audio2_path``)
  ``image_audio``  ``image_path`` + ``audio_path``, paths relative to the task folder

Metrics (``METRICS``; each has one scorer in ``crab.evaluate.SCORERS``): ``accuracy`` (classification, QA, AVE),
``avvp_f1`` (segment/event-level F1 per modality), ``iou`` (temporal or spatial localisation), ``caption`` (free
text), ``seg_text`` (s4, ms3, ref_avs: a text-only proxy; their mask metrics need a mask decoder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

__all__ = ["TaskSpec", "TASKS", "TASK_KEYS", "MEDIA_KINDS", "METRICS", "PROPORTION_METRICS", "DEFAULT_PROMPTS_PATH",
           "load_prompts", "task_instruction"]

MEDIA_KINDS = ("video_audio", "a2v", "v2a", "image_audio")
METRICS = ("accuracy", "avvp_f1", "iou", "caption", "seg_text")
# Metrics whose per-sample value is 0 or 1, so the score is a proportion (the report gives it a Wilson interval);
# the others are means of per-sample values in [0, 1] (bootstrap intervals over samples).
PROPORTION_METRICS = ("accuracy",)

# JSON fields per media kind: (field, kind of file, sub-folder of the task folder the file name lives in).
# Image tasks carry paths relative to the task folder itself (sub-folder "").
MEDIA_FIELDS: Dict[str, Tuple[Tuple[str, str, str], ...]] = {
    "video_audio": (("video_path", "video", "video"), ("audio_path", "audio", "audio")),
    "a2v": (("video1_path", "video", "video"), ("video2_path", "video", "video"), ("audio_path", "audio", "audio")),
    "v2a": (("video_path", "video", "video"), ("audio1_path", "audio", "audio"), ("audio2_path", "audio", "audio")),
    "image_audio": (("image_path", "image", ""), ("audio_path", "audio", "")),
}

# Fields that may hold a sample's own question / referring expression, first match wins.
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

DEFAULT_PROMPTS_PATH = Path(__file__).with_name("prompts.json")


def load_prompts(path: Union[str, Path, None] = None) -> dict:
    """The prompt file: ``{"system": str, "intro": {media kind: str}, "tasks": {task key: instruction}}``.

    ``path=None`` loads the shipped ``prompts.json`` (our own wording). A user file may hold only some keys: it is
    merged over the shipped defaults, so a file with just ``{"tasks": {"ks": "..."}}`` replaces one instruction.
    Instructions may contain ``{question}``, replaced by the sample's own question text (e.g. avqa)."""
    with open(DEFAULT_PROMPTS_PATH, encoding="utf-8") as f:
        prompts = json.load(f)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        with open(path, encoding="utf-8") as f:
            user = json.load(f)
        if not isinstance(user, dict):
            raise ValueError(f"prompt file {path} must hold a JSON object with keys system/intro/tasks")
        unknown = set(user) - {"system", "intro", "tasks"}
        if unknown:
            raise ValueError(f"prompt file {path}: unknown keys {sorted(unknown)} (expected system, intro, tasks)")
        if "system" in user:
            prompts["system"] = str(user["system"])
        for section in ("intro", "tasks"):
            if section in user:
                if not isinstance(user[section], dict):
                    raise ValueError(f"prompt file {path}: '{section}' must be an object")
                prompts[section].update({str(k): str(v) for k, v in user[section].items()})
    return prompts


def task_instruction(task: str, question: str = "", prompts: Optional[Mapping] = None) -> str:
    """The user-turn instruction for one sample: the task's template with ``{question}`` filled in (when the
    template has no ``{question}`` slot and the sample has a question, the question is appended)."""
    prompts = load_prompts() if prompts is None else prompts
    try:
        template = prompts["tasks"][task]
    except KeyError:
        raise KeyError(f"no instruction for task {task!r} in the prompt file (known: {sorted(prompts['tasks'])})") \
            from None
    if "{question}" in template:
        return template.replace("{question}", question.strip())
    return f"{template} {question.strip()}".strip() if question else template
