"""The prompt file: the instruction wording per task and how the user turn is laid out.

A prompt file is a JSON object; every key is optional in a user file (``--prompts my.json``, ``data.prompts``),
which is merged over the shipped ``prompts.json`` (our own wording and layout)::

    {
      "system": "...",                     # the system turn; null: no system message (the chat template's default)
      "intro":  {"video_audio": "...", "a2v": "...", "v2a": "...", "image_audio": "..."},   # per media kind
      "tasks":  {"ks": "...", "avqa": "... {question} ...", ...},                            # per task key
      "render": {                          # the layout of the user turn
        "intro_separator": "\\n",          # text between the intro and the first media placeholder
        "instruction_separator": "\\n",    # text between the last media placeholder and the instruction
        "media_order": {"a2v": ["audio", "video"]},   # per task key or media kind (task key first); unlisted:
                                                        # video, image, audio
        "clip_labels": {"video": ["First video: ", ...], "audio": [...]},   # before each clip of a kind the
                                                        # sample carries two or more of (one label per clip)
        "clip_separator": "\\n",           # after each labelled clip
        "pack_clips": ["a2v", "v2a"],      # task keys / media kinds whose clips of one kind share one placeholder
                                           # (a2v's two videos: frames concatenated; v2a's two audios: waveforms
                                           # concatenated), in the sample's order; no labels then
        "options_join": ", ",              # how a list of answer options is written; null: as Python prints a list
        "options_prefix": "Options: ",     # before options appended to a template that has no {options} slot
        "strip_question": true             # strip the question's surrounding white space before filling it in
      }
    }

The user turn is ``[intro + intro_separator, media placeholders in media_order (labels and packing as above),
instruction_separator + instruction]``; the chat template puts nothing between the parts. Templates may hold the
slots ``{question}`` (the sample's own question or referring expression), ``{options}`` (its answer options) and
their lower-cased forms ``{question:lower}`` / ``{options:lower}``; a question (options) the template has no slot
for is appended after a space. In ``render`` each key replaces its default as a whole. Unknown keys, wrong types,
unknown task keys / media kinds and unknown slots are errors naming the file and the key.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Set, Tuple, Union

from .tasks import DEFAULT_PROMPTS_PATH, MEDIA_FIELDS, MEDIA_KINDS, TASKS

__all__ = ["RENDER_DEFAULTS", "DEFAULT_MEDIA_ORDER", "MEDIA_TYPES", "PROMPT_KEYS", "SLOTS", "load_prompt_file",
           "validate_prompts", "render_params", "media_order", "packed_kinds", "format_options",
           "task_instruction"]

MEDIA_TYPES = ("video", "image", "audio")
DEFAULT_MEDIA_ORDER: Tuple[str, ...] = ("video", "image", "audio")
PROMPT_KEYS = ("system", "intro", "tasks", "render")
SLOTS = ("question", "options")
SLOT_MODIFIERS = ("lower",)
_SLOT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([A-Za-z_][A-Za-z0-9_]*))?\}")

# Our rendering (what build_messages produced before the render section existed).
RENDER_DEFAULTS: Dict[str, Any] = {
    "intro_separator": "\n",
    "instruction_separator": "\n",
    "media_order": {},
    "clip_labels": {"video": ["First video: ", "Second video: ", "Third video: ", "Fourth video: "],
                    "audio": ["First audio: ", "Second audio: ", "Third audio: ", "Fourth audio: "]},
    "clip_separator": "\n",
    "pack_clips": [],
    "options_join": ", ",
    "options_prefix": "Options: ",
    "strip_question": True,
}
_STR_KEYS = ("intro_separator", "instruction_separator", "clip_separator", "options_prefix")


def _type(v) -> str:
    return "null" if v is None else type(v).__name__


def _err(where: str, key: str, msg: str) -> ValueError:
    return ValueError(f"prompt file {where}: {key}: {msg}")


def _media_of(key: str) -> Set[str]:
    """The media types a task key's or media kind's samples carry."""
    kind = TASKS[key].media if key in TASKS else key
    return {k for _, k, _ in MEDIA_FIELDS[kind]}


def _check_template(where: str, key: str, text: str) -> None:
    for m in _SLOT.finditer(text):
        name, mod = m.group(1), m.group(2)
        if name not in SLOTS or (mod is not None and mod not in SLOT_MODIFIERS):
            raise _err(where, key, f"unknown slot {m.group(0)!r} (slots: {{question}}, {{options}}, "
                                   f"{{question:lower}}, {{options:lower}})")


def _check_str_map(where: str, section: str, value, known: Sequence[str], what: str) -> None:
    if not isinstance(value, dict):
        raise _err(where, section, f"expected an object ({what} -> text), got {_type(value)}")
    for k, v in value.items():
        if k not in known:
            raise _err(where, f"{section}.{k}", f"unknown {what} (known: {', '.join(known)})")
        if not isinstance(v, str):
            raise _err(where, f"{section}.{k}", f"expected a string, got {_type(v)}")
        if section == "tasks":
            _check_template(where, f"{section}.{k}", v)


def _check_render(where: str, render) -> None:
    if not isinstance(render, dict):
        raise _err(where, "render", f"expected an object, got {_type(render)}")
    for k, v in render.items():
        key = f"render.{k}"
        if k not in RENDER_DEFAULTS:
            raise _err(where, key, f"unknown key (known: {', '.join(RENDER_DEFAULTS)})")
        if k in _STR_KEYS:
            if not isinstance(v, str):
                raise _err(where, key, f"expected a string, got {_type(v)}")
        elif k == "strip_question":
            if not isinstance(v, bool):
                raise _err(where, key, f"expected true or false, got {_type(v)}")
        elif k == "options_join":
            if v is not None and not isinstance(v, str):
                raise _err(where, key, f"expected a string or null, got {_type(v)}")
        elif k == "media_order":
            if not isinstance(v, dict):
                raise _err(where, key, f"expected an object (task key or media kind -> list of media), got {_type(v)}")
            for t, order in v.items():
                if t not in TASKS and t not in MEDIA_KINDS:
                    raise _err(where, f"{key}.{t}", f"not a task key or media kind (media kinds: "
                                                    f"{', '.join(MEDIA_KINDS)}; task keys: {', '.join(TASKS)})")
                if not isinstance(order, list) or not all(isinstance(m, str) for m in order):
                    raise _err(where, f"{key}.{t}", f"expected a list of media names, got {_type(order)}")
                bad = [m for m in order if m not in MEDIA_TYPES]
                if bad or len(set(order)) != len(order):
                    raise _err(where, f"{key}.{t}", f"{order}: each of {', '.join(MEDIA_TYPES)} at most once")
                missing = sorted(_media_of(t) - set(order))
                if missing:
                    raise _err(where, f"{key}.{t}", f"{order} leaves out {', '.join(missing)}, which {t!r} "
                                                    f"samples carry")
        elif k == "clip_labels":
            if not isinstance(v, dict):
                raise _err(where, key, f"expected an object (media -> list of labels), got {_type(v)}")
            for m, labels in v.items():
                if m not in MEDIA_TYPES:
                    raise _err(where, f"{key}.{m}", f"unknown media (known: {', '.join(MEDIA_TYPES)})")
                if not isinstance(labels, list) or not all(isinstance(s, str) for s in labels):
                    raise _err(where, f"{key}.{m}", f"expected a list of strings, got {_type(labels)}")
        elif k == "pack_clips":
            if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
                raise _err(where, key, f"expected a list of task keys / media kinds, got {_type(v)}")
            for t in v:
                if t not in TASKS and t not in MEDIA_KINDS:
                    raise _err(where, key, f"{t!r} is not a task key or media kind")


def validate_prompts(prompts, where: Union[str, Path] = "<dict>", partial: bool = True) -> None:
    """Raises ``ValueError`` naming ``where`` and the key for unknown keys, wrong types, unknown task keys / media
    kinds / media names and unknown template slots. ``partial=False``: every section, media kind and task key must
    be present (the merged result)."""
    if not isinstance(prompts, dict):
        raise ValueError(f"prompt file {where}: expected a JSON object with keys {', '.join(PROMPT_KEYS)}, got "
                         f"{_type(prompts)}")
    unknown = [k for k in prompts if k not in PROMPT_KEYS]
    if unknown:
        raise ValueError(f"prompt file {where}: unknown keys {sorted(unknown)} (expected {', '.join(PROMPT_KEYS)})")
    if "system" in prompts and prompts["system"] is not None and not isinstance(prompts["system"], str):
        raise _err(where, "system", f"expected a string or null, got {_type(prompts['system'])}")
    if "intro" in prompts:
        _check_str_map(where, "intro", prompts["intro"], MEDIA_KINDS, "media kind")
    if "tasks" in prompts:
        _check_str_map(where, "tasks", prompts["tasks"], tuple(TASKS), "task key")
    if "render" in prompts:
        _check_render(where, prompts["render"])
    if not partial:
        for section, known in (("intro", MEDIA_KINDS), ("tasks", tuple(TASKS))):
            missing = [k for k in known if k not in prompts.get(section, {})]
            if missing:
                raise _err(where, section, f"missing {', '.join(missing)}")
        if "system" not in prompts:
            raise _err(where, "system", "missing")


def _read(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"prompt file {path}: not valid JSON: {e}") from None


def load_prompt_file(path: Union[str, Path, None] = None) -> dict:
    """The shipped ``prompts.json`` with the file at ``path`` merged over it (``system`` replaced, ``intro`` /
    ``tasks`` updated per key, ``render`` updated per key), validated. Returns a new dict holding every key, with
    ``render`` complete (``RENDER_DEFAULTS`` under the files' values)."""
    shipped = _read(DEFAULT_PROMPTS_PATH)
    validate_prompts(shipped, DEFAULT_PROMPTS_PATH, partial=False)
    prompts = {"system": shipped["system"], "intro": dict(shipped["intro"]), "tasks": dict(shipped["tasks"]),
               "render": {**copy.deepcopy(RENDER_DEFAULTS), **copy.deepcopy(shipped.get("render", {}))}}
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        user = _read(path)
        validate_prompts(user, path)
        if "system" in user:
            prompts["system"] = user["system"]
        for section in ("intro", "tasks", "render"):
            prompts[section].update(copy.deepcopy(user.get(section, {})))
    return prompts


def render_params(prompts: Optional[Mapping]) -> Dict[str, Any]:
    """The ``render`` section of a prompts dict over ``RENDER_DEFAULTS`` (a dict without one renders as ours)."""
    return {**RENDER_DEFAULTS, **((prompts or {}).get("render") or {})}


def media_order(task: str, prompts: Optional[Mapping]) -> Tuple[str, ...]:
    """The order of the media placeholders for ``task``: ``render.media_order`` for the task key, else for its
    media kind, else video, image, audio; media types the order leaves out follow in that default order."""
    orders = render_params(prompts)["media_order"]
    order = orders.get(task, orders.get(TASKS[task].media, DEFAULT_MEDIA_ORDER))
    return tuple(order) + tuple(m for m in DEFAULT_MEDIA_ORDER if m not in order)


def packed_kinds(task: str, counts: Mapping[str, int], prompts: Optional[Mapping]) -> Set[str]:
    """The media types ("video" / "audio") whose clips a ``task`` sample with ``counts`` clips per type shows in
    one placeholder (``render.pack_clips`` names the task key or its media kind, and it has two or more)."""
    pack = render_params(prompts)["pack_clips"]
    if task not in pack and TASKS[task].media not in pack:
        return set()
    return {m for m in ("video", "audio") if counts.get(m, 0) > 1}


def format_options(options, prompts: Optional[Mapping] = None) -> str:
    """A sample's answer options as text: a string as it is; a list joined by ``render.options_join`` (null: the
    list as Python prints it, ``['a', 'b']``)."""
    if options is None:
        return ""
    if isinstance(options, str):
        return options
    if isinstance(options, (list, tuple)):
        join = render_params(prompts)["options_join"]
        return str(list(options)) if join is None else join.join(str(o) for o in options)
    return str(options)


def task_instruction(task: str, question: str = "", prompts: Optional[Mapping] = None, options=None) -> str:
    """The user-turn instruction for one sample: the task's template with its slots filled (``{question}``,
    ``{options}``, ``:lower`` forms). A question the template has no slot for is appended after a space, and so
    are options (after ``render.options_prefix``)."""
    prompts = load_prompt_file() if prompts is None else prompts
    try:
        template = prompts["tasks"][task]
    except KeyError:
        raise KeyError(f"no instruction for task {task!r} in the prompt file (known: {sorted(prompts['tasks'])})") \
            from None
    question = question or ""
    if render_params(prompts)["strip_question"]:
        question = question.strip()
    opts = format_options(options, prompts).strip()
    values = {"question": question, "options": opts}
    used = {m.group(1) for m in _SLOT.finditer(template) if m.group(1) in SLOTS}

    def fill(m):
        name, mod = m.group(1), m.group(2)
        if name not in values or (mod is not None and mod not in SLOT_MODIFIERS):
            return m.group(0)
        return values[name].lower() if mod == "lower" else values[name]

    text = _SLOT.sub(fill, template)
    if question and "question" not in used:
        text = f"{text} {question}".strip()
    if opts and "options" not in used:
        text = f"{text} {render_params(prompts)['options_prefix']}{opts}".strip()
    return text


load_prompts = load_prompt_file  # the name the trainer, the data code and the docs use
