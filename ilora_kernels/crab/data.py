"""AV-UIE v2 reader, media decoding, Qwen chat-template prompts with assistant-only labels, dataset and collate.

Layout (SPEC section 4)::

    <root>/AVUIE_2/<task>/{train,test}.json      (``root`` may also be the folder holding the task folders)
                         video/<file>  audio/<file>          video tasks: file names in ``video_path`` etc.
                         <relative path>                     image tasks: ``image_path`` (test: ``visual_path``)
                                                             and ``audio_path``

Records are read with the task's layout for the split (``crab.tasks.LAYOUTS``: the fields upstream's train and
test readers read; e.g. the test split's ground truth is built from ``action`` / ``emotion`` / ``answer`` ...):
media paths, target, question (``Sample.instruction``), options, frame index, audio window and the ids upstream
keeps (``Sample.meta``) all reach the ``Sample``.

Media decoding: video with PyAV (``num_frames`` frames uniformly sampled at segment midpoints, resized to
``frame_size``), audio with soundfile, or PyAV for what soundfile cannot read (mixed to mono and resampled block by
block while decoding, with soxr HQ, what upstream's ``librosa.load`` uses, or PyAV's resampler without soxr),
images with PIL. ``upstream_media=True`` (the recipe's ``data.upstream_media``) feeds upstream Crab+'s media per
task instead: its frame counts (4 for the emotion tasks) sampled first to last frame, and its audio windows
(``tasks.UPSTREAM_AUDIO_WINDOWS``, ``apply_audio_windows``).
Missing or unreadable media raise ``MediaError`` naming the task, the sample index and the path, unless
``skip_missing=True`` (then the sample is skipped and counted). Never a silent zero tensor. A split file holding no
samples (``[]``) and a sample whose target is null, missing or empty raise ``ValueError`` naming the file (and the
task and sample index), unless ``skip_bad=True`` (then they are skipped and counted). Every skip is counted per task
and reason in a ``SkipCounts`` (``SampleList.skips``, ``AVUIEDataset.skips``; ``SKIP_REASONS`` lists the reasons),
which the trainer and the CLI print and write (``skipped_samples.json``).

Batches from ``collate`` hold the thinker's forward inputs plus ``task`` (list of str) and ``index`` (list of int);
``model_inputs(batch)`` drops those two.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .prompts import load_prompts, task_instruction
from .tasks import FRAME_FROM_IMAGE_NAME, QUESTION_FIELDS, TASKS, RecordLayout

__all__ = ["Sample", "SampleList", "SkipCounts", "SKIP_REASONS", "MediaError", "IGNORE_INDEX", "MODEL_INPUT_KEYS",
           "resolve_data_root", "load_split", "load_video_frames", "load_audio", "load_image", "resample_audio",
           "build_messages", "encode_sample", "AVUIEDataset", "collate", "model_inputs", "build_generation_inputs",
           "build_generation_batch", "StreamResampler", "apply_audio_windows", "media_num_frames"]

IGNORE_INDEX = -100
DEFAULT_SAMPLING_RATE = 16000
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values_videos", "video_grid_thw",
                    "video_second_per_grid", "pixel_values", "image_grid_thw", "input_features",
                    "feature_attention_mask")
_PER_SEQUENCE = ("input_ids", "attention_mask", "labels")
_MEDIA_CAT = ("pixel_values_videos", "video_grid_thw", "video_second_per_grid", "pixel_values", "image_grid_thw",
              "input_features", "feature_attention_mask")


class MediaError(RuntimeError):
    """A sample's media file is missing or cannot be decoded."""

    def __init__(self, task: str, index: int, path, reason: str):
        self.task, self.index, self.path, self.reason = task, index, Path(path), reason
        super().__init__(f"task {task!r} sample {index}: {reason}: {path}")


@dataclass
class Sample:
    """One AV-UIE record. The fields after ``raw`` come from the task's record layout
    (``crab.tasks.TASKS[task].layout(split)``) and default to "none" for samples built by hand."""

    task: str
    index: int                 # position in <task>/<split>.json
    target: str                # train: the assistant answer; test: the ground truth (see RecordLayout.target)
    instruction: str           # the sample's own question / referring expression, verbatim ("" when none)
    media: Dict[str, List[Path]] = field(default_factory=dict)   # "video" / "audio" / "image" -> absolute paths
    raw: Dict[str, Any] = field(default_factory=dict)
    options: Any = None        # answer options as in the JSON (avqa_thu's multi_choice: a list or a string)
    frame_idx: Optional[int] = None      # the image's frame index in its clip (image tasks; see RecordLayout.frame)
    audio_window: Optional[int] = None   # the 1-second audio window upstream feeds (s4, ms3, ref_avs); None: default
    meta: Dict[str, Any] = field(default_factory=dict)   # every non-media field the layout names -> its raw value
    split: str = ""            # the split file it was read from ("train", "test", ...)

    @property
    def question(self) -> str:
        """The sample's question or referring expression (``instruction``)."""
        return self.instruction

    @property
    def options_text(self) -> str:
        """``options`` as upstream writes it into the prompt (Python's ``str`` of the JSON value; "" when none)."""
        return "" if self.options is None else str(self.options)


# Why a sample was skipped: the keys of SkipCounts. The media reasons need skip_missing, the others skip_bad.
SKIP_REASONS = {
    "missing_media": "media file not found",
    "undecodable_media": "media file cannot be decoded",
    "missing_media_field": "media field missing or empty",
    "null_target": "target is null or missing",
    "empty_target": "target is an empty string",
    "missing_field": "question, options or frame index missing, null or malformed",
}


@dataclass
class SkipCounts:
    """Skipped samples counted per (task, reason) (reasons: ``SKIP_REASONS``), the first few sample indices of each,
    and the tasks whose split file held no sample at all (``empty_tasks``: task -> file)."""

    counts: Dict[Tuple[str, str], int] = field(default_factory=dict)
    examples: Dict[Tuple[str, str], List[int]] = field(default_factory=dict)
    empty_tasks: Dict[str, str] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, task: str, reason: str, index: Optional[int] = None, n: int = 1) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {', '.join(SKIP_REASONS)}")
        key = (task, reason)
        self.counts[key] = self.counts.get(key, 0) + n
        if index is not None:
            ex = self.examples.setdefault(key, [])
            if len(ex) < self.max_examples:
                ex.append(int(index))

    def update(self, other: "SkipCounts") -> "SkipCounts":
        for key, n in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + n
            ex = self.examples.setdefault(key, [])
            ex.extend(other.examples.get(key, [])[: max(0, self.max_examples - len(ex))])
        self.empty_tasks.update(other.empty_tasks)
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_task(self) -> Counter:
        """task -> number of samples skipped (all reasons)."""
        out: Counter = Counter()
        for (task, _), n in self.counts.items():
            out[task] += n
        return out

    def __bool__(self) -> bool:
        return bool(self.counts) or bool(self.empty_tasks)

    def to_dict(self, kept: Optional[Mapping[str, int]] = None) -> dict:
        """JSON form: ``{"total", "by_task": {task: {reason: n}}, "examples": {task: {reason: [index, ...]}},
        "empty_tasks": {task: file}, "kept": {task: n}}`` (``kept`` when given)."""
        by_task: Dict[str, Dict[str, int]] = {}
        examples: Dict[str, Dict[str, List[int]]] = {}
        for (task, reason), n in sorted(self.counts.items()):
            by_task.setdefault(task, {})[reason] = n
            if self.examples.get((task, reason)):
                examples.setdefault(task, {})[reason] = list(self.examples[(task, reason)])
        out = {"total": self.total, "by_task": by_task, "examples": examples, "empty_tasks": dict(self.empty_tasks),
               "reasons": dict(SKIP_REASONS)}
        if kept is not None:
            out["kept"] = dict(sorted(kept.items()))
        return out

    def format(self, what: str = "samples", kept: Optional[Mapping[str, int]] = None) -> str:
        """One line: ``skipped 3 train samples: ks 2 (missing_media 2), ave 1 (null_target 1)`` or ``... none``;
        then one line per task whose file was empty or whose samples were all skipped."""
        if not self:
            return f"skipped {what}: none"
        parts = []
        for task in sorted({t for t, _ in self.counts}):
            reasons = ", ".join(f"{r} {n}" for (t, r), n in sorted(self.counts.items()) if t == task)
            parts.append(f"{task} {self.by_task()[task]} ({reasons})")
        lines = [f"skipped {self.total} {what}" + (": " + "; ".join(parts) if parts else "")]
        if self.total == 1:
            lines[0] = lines[0].replace(f"skipped 1 {what}", f"skipped 1 {what.rstrip('s')}", 1)
        for task, path in sorted(self.empty_tasks.items()):
            lines.append(f"  task {task!r}: {path} holds no samples: the run has no {task!r} samples")
        if kept is not None:
            for task in sorted(self.by_task()):
                if task not in self.empty_tasks and not kept.get(task):
                    lines.append(f"  task {task!r}: every sample was skipped: the run has no {task!r} samples")
        return "\n".join(lines)


class SampleList(list):
    """A list of ``Sample`` with ``skips`` (a ``SkipCounts``), ``skipped`` (task -> number skipped) and ``tasks``
    (the tasks that were read, in order)."""

    def __init__(self, items=(), skips: Optional[SkipCounts] = None, tasks: Sequence[str] = ()):
        super().__init__(items)
        self.skips: SkipCounts = SkipCounts() if skips is None else skips
        self.tasks: List[str] = list(tasks)

    @property
    def skipped(self) -> Counter:
        return self.skips.by_task()

    def kept_per_task(self) -> Dict[str, int]:
        """task -> samples kept, every task read included (0 for a task that lost them all)."""
        kept = {t: 0 for t in self.tasks}
        for s in self:
            kept[s.task] = kept.get(s.task, 0) + 1
        return kept


# ------------------------------------------------------------------------------------------------------ reader
def resolve_data_root(root) -> Path:
    """The folder that holds the task folders: ``root/AVUIE_2`` when it exists, else ``root``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"AV-UIE data root not found: {root}")
    nested = root / "AVUIE_2"
    return nested if nested.is_dir() else root


def _question(raw: Mapping) -> str:
    for key in QUESTION_FIELDS:
        q = raw.get(key)
        if isinstance(q, str) and q.strip():
            q = q.strip()
            # MUSIC-AVQA style templates: "<Object>" placeholders filled from "templ_values" in order
            values = raw.get("templ_values")
            if isinstance(values, str):
                try:
                    values = json.loads(values)
                except ValueError:
                    values = None
            if isinstance(values, list) and values:
                it = iter(values)
                q = re.sub(r"<[^<>|]+>", lambda m, it=it: str(next(it, m.group(0))), q)
            return q
    return ""


def _resolve_media(task_dir: Path, name: str, subdir: str) -> Path:
    p = Path(name).expanduser()
    if p.is_absolute():
        return p
    if subdir:
        cand = task_dir / subdir / p
        if cand.exists() or not (task_dir / p).exists():
            return cand.absolute()
    return (task_dir / p).absolute()


_FIX = "fix the sample or pass --skip-bad-samples to skip (and count) such samples"


class _BadRecord(ValueError):
    """A record its layout cannot read; ``reason`` is a ``SKIP_REASONS`` key."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


def _state(raw: Mapping, fld: str) -> str:
    if fld not in raw:
        return f"missing (fields: {sorted(raw)})"
    v = raw[fld]
    if v is None:
        return "null"
    return "an empty string" if isinstance(v, str) else f"a {type(v).__name__} ({v!r})"


def _target_text(raw: Mapping, layout: RecordLayout, where: str) -> str:
    """The target from the layout's target fields: one field's value (non-strings as JSON), or the layout's
    template filled with them (upstream's test ground truth). Never the text "None"."""
    values = {}
    for fld in layout.target:
        v = raw.get(fld)
        if v is None:
            raise _BadRecord("null_target", f"{where}: target field {fld!r} is {_state(raw, fld)}; {_FIX}")
        if isinstance(v, str):
            if not v.strip():
                raise _BadRecord("empty_target", f"{where}: target field {fld!r} is an empty string; {_FIX}")
            if fld in layout.lower:
                v = v.lower()
        values[fld] = v
    if layout.template is None:
        v = values[layout.target[0]]
        text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
        if not text.strip():
            raise _BadRecord("empty_target", f"{where}: target field {layout.target[0]!r} is empty; {_FIX}")
        return text
    for fld in re.findall(r"\{(\w+)\[", layout.template):       # indexed fields (arig's corners) must be lists
        v = values[fld]
        if not isinstance(v, (list, tuple)) or len(v) < 2 or any(x is None for x in v[:2]):
            raise _BadRecord("null_target", f"{where}: target field {fld!r} must be a list [x, y], got {v!r}; "
                                            f"{_FIX}")
    return layout.template.format(**values)


def _text_field(raw: Mapping, fld: str, what: str, where: str) -> str:
    v = raw.get(fld)
    if not isinstance(v, str) or not v.strip():
        raise _BadRecord("missing_field", f"{where}: {what} field {fld!r} is {_state(raw, fld)}; {_FIX}")
    return v


def _as_index(v) -> Optional[int]:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if v >= 0 else None
    if isinstance(v, float) and v.is_integer() and v >= 0:
        return int(v)
    if isinstance(v, str) and v.strip().isdigit():
        return int(v.strip())
    return None


def _read_record(task: str, split: str, i: int, raw: Mapping, layout: RecordLayout, task_dir: Path, where: str):
    """One JSON record -> ``(Sample, missing)``; ``missing`` = ``(field, path)`` of the first media file that does
    not exist, else None. Raises ``_BadRecord`` for a record the layout cannot read."""
    target = _target_text(raw, layout, where)
    media: Dict[str, List[Path]] = {}
    names: Dict[str, str] = {}
    missing = None
    for accepted, kind, subdir in layout.media:
        fld = next((f for f in accepted if isinstance(raw.get(f), str) and raw.get(f)), None)
        if fld is None:
            alias = f" (or {', '.join(map(repr, accepted[1:]))})" if len(accepted) > 1 else ""
            raise _BadRecord("missing_media_field", f"{where}: media field {accepted[0]!r}{alias} missing or empty")
        names[kind] = names.get(kind, raw[fld])
        path = _resolve_media(task_dir, raw[fld], subdir)
        media.setdefault(kind, []).append(path)
        if missing is None and not path.is_file():
            missing = (fld, path)
    if layout.question:
        question = _text_field(raw, layout.question, "question", where)
    else:
        question = _question(raw)
    options = None
    if layout.options:
        options = raw.get(layout.options)
        if options is None or (isinstance(options, (str, list, dict)) and not options):
            raise _BadRecord("missing_field", f"{where}: options field {layout.options!r} is "
                                              f"{_state(raw, layout.options)}; {_FIX}")
    frame_idx = None
    if layout.frame == FRAME_FROM_IMAGE_NAME:          # arig train: the image is <frame index>.<ext>
        stem = Path(names.get("image", "")).stem
        frame_idx = int(stem) if stem.isdigit() else None
    elif layout.frame:
        frame_idx = _as_index(raw.get(layout.frame))
        if frame_idx is None:
            raise _BadRecord("missing_field", f"{where}: frame index field {layout.frame!r} is "
                                              f"{_state(raw, layout.frame)}, expected an integer >= 0; {_FIX}")
    window = layout.audio_window
    audio_window = frame_idx if window == "frame" else (int(window) if window is not None else None)
    meta = {f: raw[f] for f in layout.fields if f in raw}
    sample = Sample(task=task, index=i, target=target, instruction=question, media=media, raw=dict(raw),
                    options=options, frame_idx=frame_idx, audio_window=audio_window, meta=meta, split=split)
    return sample, missing


def load_split(root, split: str, tasks: Optional[Sequence[str]] = None, skip_missing: bool = False,
               skip_bad: bool = False, max_per_task: Optional[int] = None) -> SampleList:
    """Reads ``<task>/<split>.json`` for each task (``tasks=None``: every known task folder that has the split).

    Returns a ``SampleList`` (a list of ``Sample``) whose ``skips`` counts what was skipped, per task and reason.
    A sample whose media file does not exist raises ``MediaError``, or with ``skip_missing=True`` is skipped and
    counted. A split file holding no sample, and a sample whose target is null, missing or empty (or whose media
    field is missing), raise ``ValueError`` naming the file (task, sample index), or with ``skip_bad=True`` are
    skipped and counted. ``max_per_task``: keep the first N kept samples of each task.

    Each record is read with its task's layout for the split (``crab.tasks.TASKS[task].layout(split)``: upstream's
    fields; the test split's ground truth comes from its own short fields, e.g. ``action`` for ks). A field the
    layout requires besides the target and media (question, options, frame index) that is missing, null or
    malformed is an error too, or the counted skip ``missing_field``."""
    base = resolve_data_root(root)
    if tasks is None:
        tasks = [t for t in TASKS if (base / t / f"{split}.json").is_file()]
        if not tasks:
            raise FileNotFoundError(f"no task folder with {split}.json under {base} "
                                    f"(expected folders named after the task keys: {', '.join(TASKS)})")
    else:
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task keys {unknown}; known: {', '.join(TASKS)}")
    out = SampleList(tasks=tasks)
    skips = out.skips
    for task in tasks:
        layout = TASKS[task].layout(split)
        task_dir = (base / task).absolute()
        js = task_dir / f"{split}.json"
        if not js.is_file():
            raise FileNotFoundError(f"task {task!r}: split file not found: {js}")
        with open(js, encoding="utf-8") as f:
            try:
                items = json.load(f)
            except ValueError as e:
                raise ValueError(f"task {task!r}: {js} is not valid JSON: {e}") from None
        if not isinstance(items, list):
            raise ValueError(f"task {task!r}: {js} must hold a JSON list of samples, got {type(items).__name__}")
        if not items:
            if not skip_bad:
                raise ValueError(f"task {task!r}: {js} holds no samples ([]); remove the task from the task list "
                                 f"or pass --skip-bad-samples to run without it")
            skips.empty_tasks[task] = str(js)
            continue
        kept = 0
        for i, raw in enumerate(items):
            if max_per_task is not None and kept >= max_per_task:
                break
            where = f"task {task!r} sample {i} in {js}"
            if not isinstance(raw, dict):
                raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
            try:
                sample, missing = _read_record(task, split, i, raw, layout, task_dir, where)
            except _BadRecord as e:
                if skip_bad:
                    skips.add(task, e.reason, i)
                    continue
                raise ValueError(str(e)) from None
            if missing is not None:
                if skip_missing:
                    skips.add(task, "missing_media", i)
                    continue
                raise MediaError(task, i, missing[1], f"{missing[0]} file not found")
            out.append(sample)
            kept += 1
    return out


# ------------------------------------------------------------------------------------------------------ media
def _size_hw(frame_size) -> Tuple[int, int]:
    if isinstance(frame_size, int):
        return frame_size, frame_size
    h, w = frame_size
    return int(h), int(w)


def _sample_indices(total: int, n: int) -> np.ndarray:
    """``n`` indices uniformly spread over ``total`` frames (segment midpoints; repeats when total < n)."""
    return np.minimum(((np.arange(n) + 0.5) * total / n).astype(np.int64), total - 1)


def _linspace_indices(total: int, n: int) -> np.ndarray:
    """``n`` indices evenly spaced from the first frame to the last, rounded half to even (upstream Crab+'s
    qwen-omni-utils video readers)."""
    return torch.linspace(0, total - 1, n).round().long().numpy()


FRAME_SAMPLING = {"midpoint": _sample_indices, "linspace": _linspace_indices}


def load_video_frames(path, num_frames: int = 10, frame_size=224,
                      sampling: str = "midpoint") -> Tuple[torch.Tensor, float]:
    """Decodes ``num_frames`` frames uniformly sampled over the whole clip with PyAV, resized to ``frame_size``
    (int = square, or (h, w)). ``sampling``: ``"midpoint"`` (the midpoints of ``num_frames`` equal segments) or
    ``"linspace"`` (first to last frame, evenly spaced: upstream's). Returns ``(frames uint8 (T, 3, H, W),
    duration in seconds)``. Raises on a file PyAV cannot open or that has no video frames."""
    import av

    if sampling not in FRAME_SAMPLING:
        raise ValueError(f"frame sampling must be one of {sorted(FRAME_SAMPLING)}, got {sampling!r}")
    pick = FRAME_SAMPLING[sampling]
    h, w = _size_hw(frame_size)
    path = str(path)
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        total = int(stream.frames or 0)
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        frames: Dict[int, np.ndarray] = {}
        if total > 0:
            wanted = pick(total, num_frames)
            want_set = set(wanted.tolist())
            last = int(wanted.max())
            n = 0
            for n, frame in enumerate(container.decode(stream)):
                if n in want_set:
                    frames[n] = frame.to_ndarray(format="rgb24", width=w, height=h)
                if n >= last:
                    break
            if len(frames) < len(want_set):
                frames, total = {}, 0   # the header's frame count was wrong: decode everything below
    if total == 0:
        thumbs = []
        with av.open(path) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                thumbs.append(frame.to_ndarray(format="rgb24", width=w, height=h))
        if not thumbs:
            raise ValueError("no decodable video frames")
        total = len(thumbs)
        wanted = pick(total, num_frames)
        frames = {i: thumbs[i] for i in set(wanted.tolist())}
        if not duration:
            rate = float(stream.average_rate) if stream.average_rate else 0.0
            duration = total / rate if rate > 0 else float(total)
    if not duration or duration <= 0:
        duration = float(total)
    arr = np.stack([frames[int(i)] for i in wanted])                     # (T, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), float(duration)


_AUDIO_BLOCK = 1 << 16          # samples per block fed to the resampler
RESAMPLERS = ("soxr", "pyav")


def _default_resampler() -> str:
    try:
        import soxr  # noqa: F401
    except ImportError:
        return "pyav"
    return "soxr"


class StreamResampler:
    """Streaming mono resampling ``orig_sr -> target_sr`` in float32: ``feed(block)`` any number of times, then
    ``finish()`` returns the whole output, ``round(n_in * target_sr / orig_sr)`` samples. Only the output and one
    block are held. ``backend``: ``"soxr"`` (quality HQ, the resampler ``librosa.load`` uses by default, hence
    upstream Crab+'s; the default when installed) or ``"pyav"`` (libswresample through ``av.AudioResampler``)."""

    def __init__(self, orig_sr: int, target_sr: int, backend: Optional[str] = None):
        self.orig_sr, self.target_sr = int(orig_sr), int(target_sr)
        if self.orig_sr <= 0 or self.target_sr <= 0:
            raise ValueError(f"sample rates must be > 0, got {orig_sr} -> {target_sr}")
        backend = _default_resampler() if backend is None else backend
        if backend not in RESAMPLERS:
            raise ValueError(f"resampler must be one of {RESAMPLERS}, got {backend!r}")
        self.backend = "copy" if self.orig_sr == self.target_sr else backend
        self.n_in = 0
        self._parts: List[np.ndarray] = []
        if self.backend == "soxr":
            import soxr
            self._rs = soxr.ResampleStream(self.orig_sr, self.target_sr, 1, dtype="float32", quality="HQ")
        elif self.backend == "pyav":
            import av
            self._rs = av.AudioResampler(format="flt", layout="mono", rate=self.target_sr)

    def _pyav(self, block: Optional[np.ndarray]) -> None:
        import av

        frame = None
        if block is not None:
            frame = av.AudioFrame.from_ndarray(block[None, :], format="flt", layout="mono")
            frame.sample_rate = self.orig_sr
        for out in self._rs.resample(frame):
            self._parts.append(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))

    def feed(self, block) -> None:
        block = np.ascontiguousarray(block, dtype=np.float32).reshape(-1)
        if block.size == 0:
            return
        self.n_in += block.shape[0]
        if self.backend == "copy":
            self._parts.append(block.copy())
        elif self.backend == "soxr":
            self._parts.append(self._rs.resample_chunk(block, last=False))
        else:
            self._pyav(block)

    def finish(self) -> np.ndarray:
        if self.backend == "soxr":
            self._parts.append(self._rs.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        elif self.backend == "pyav":
            self._pyav(None)
        out = np.concatenate(self._parts) if self._parts else np.zeros(0, dtype=np.float32)
        self._parts = []
        if self.n_in == 0:
            return out
        n_out = max(1, int(round(self.n_in * self.target_sr / self.orig_sr)))
        if out.shape[0] >= n_out:
            return np.ascontiguousarray(out[:n_out])
        return np.concatenate([out, np.zeros(n_out - out.shape[0], dtype=np.float32)])


def resample_audio(wave: np.ndarray, orig_sr: int, target_sr: int, backend: Optional[str] = None) -> np.ndarray:
    """Resamples a 1-D signal (anti-aliased: soxr HQ, or PyAV's resampler without soxr; see ``StreamResampler``),
    block by block in float32. Output float32, ``round(len * target_sr / orig_sr)`` samples."""
    wave = np.asarray(wave).reshape(-1)
    rs = StreamResampler(orig_sr, target_sr, backend)
    for i in range(0, wave.shape[0], _AUDIO_BLOCK):
        rs.feed(wave[i:i + _AUDIO_BLOCK])
    return rs.finish()


def _pcm_float32(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "i":
        return arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    if arr.dtype.kind == "u":   # unsigned 8-bit PCM: centred on 128
        return (arr.astype(np.float32) - 128.0) / 128.0
    return arr.astype(np.float32, copy=False)


def _read_audio_pyav(path: str, max_seconds: Optional[float], sampling_rate: int,
                     resampler: Optional[str] = None) -> np.ndarray:
    """Fallback for containers soundfile cannot read (m4a/aac, audio tracks of mp4...): decodes frame by frame,
    mixes each to mono and streams it through the resampler. Returns float32 (n,) at ``sampling_rate``."""
    import av

    rs, sr, left = None, None, None
    with av.open(path) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        for frame in container.decode(stream):
            if rs is None:
                sr = int(frame.sample_rate)
                rs = StreamResampler(sr, sampling_rate, resampler)
                left = None if max_seconds is None else int(round(max_seconds * sr))
            elif int(frame.sample_rate) != sr:
                raise ValueError(f"sample rate changes within the stream ({sr} -> {frame.sample_rate} Hz)")
            arr = _pcm_float32(frame.to_ndarray())
            n_ch = len(frame.layout.channels)
            # planar: (channels, n); packed: (1, n * channels) interleaved
            mono = arr.mean(axis=0) if frame.format.is_planar else arr.reshape(-1, n_ch).mean(axis=1)
            if left is not None:
                mono = mono[:left]
                left -= mono.shape[0]
            rs.feed(mono)
            if left is not None and left <= 0:
                break
    if rs is None or rs.n_in == 0:
        raise ValueError("no decodable audio frames")
    return rs.finish()


def load_audio(path, sampling_rate: int = DEFAULT_SAMPLING_RATE, max_seconds: Optional[float] = None,
               resampler: Optional[str] = None) -> np.ndarray:
    """Reads an audio file with soundfile (wav, flac, ogg, mp3), or with PyAV when soundfile cannot (m4a/aac, the
    audio track of a video file); keeps the first ``max_seconds`` when given; mixes to mono and resamples to
    ``sampling_rate`` block by block while decoding (``StreamResampler``: soxr, or PyAV's with
    ``resampler="pyav"``). Returns float32 (n,)."""
    import soundfile as sf

    try:
        with sf.SoundFile(str(path)) as f:
            rs = StreamResampler(f.samplerate, sampling_rate, resampler)
            frames = -1 if max_seconds is None else int(round(max_seconds * f.samplerate))
            for block in f.blocks(blocksize=_AUDIO_BLOCK, frames=frames, dtype="float32", always_2d=True):
                rs.feed(block.mean(axis=1))
    except sf.LibsndfileError:
        return _read_audio_pyav(str(path), max_seconds, int(sampling_rate), resampler)
    if rs.n_in == 0:
        raise ValueError("empty audio")
    return rs.finish()


def load_image(path, frame_size=224) -> torch.Tensor:
    """RGB image resized to ``frame_size`` with PIL (bicubic). Returns uint8 (3, H, W)."""
    from PIL import Image

    h, w = _size_hw(frame_size)
    with Image.open(str(path)) as im:
        im = im.convert("RGB").resize((w, h), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def media_num_frames(task: str, num_frames: int, upstream_media: bool = False) -> int:
    """Video frames per clip for ``task``: with ``upstream_media``, upstream's own count where it has one (4 for
    the five emotion tasks: ``TaskSpec.upstream_num_frames``), else ``num_frames``."""
    spec = TASKS.get(task)
    n = spec.upstream_num_frames if (upstream_media and spec is not None) else None
    return int(n) if n else int(num_frames)


def apply_audio_windows(wave, windows, sampling_rate: int = DEFAULT_SAMPLING_RATE, index: int = 0) -> np.ndarray:
    """Upstream Crab+'s audio of one sample: ``wave`` (mono, at ``sampling_rate``) padded with trailing silence to
    at least 1 s, then the ``windows`` (a ``tasks.AudioWindows``; ``None``: all of it) cut out and concatenated;
    ``index`` is the start of an indexed window. Returns float32."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    sr = int(sampling_rate)
    if wave.shape[0] < sr:
        wave = np.concatenate([wave, np.zeros(sr - wave.shape[0], dtype=np.float32)])
    if windows is None:
        return wave
    unit = sr if windows.units is None else wave.shape[0] // windows.units
    need = int(windows.length * unit)
    segments = []
    for start in ((float(index),) if windows.indexed else windows.starts):
        end = start + windows.length if windows.units is None else min(float(windows.units), start + windows.length)
        lo = int(max(0.0, start) * unit)
        seg = wave[lo:max(lo, int(end * unit))][:need]
        pad = np.zeros(need - seg.shape[0], dtype=np.float32)
        segments.append(np.concatenate([pad, seg] if start < 0 else [seg, pad]))
    return np.concatenate(segments)


def _window_index(sample: Sample) -> int:
    """Where an indexed audio window starts: ``Sample.audio_window``, else the frame index (``Sample.frame_idx``,
    else the record's ``frame_idx`` / ``idx``), else 0."""
    for name in ("audio_window", "frame_idx"):
        value = getattr(sample, name, None)
        if value is not None:
            return int(value)
    raw = getattr(sample, "raw", None) or {}
    for name in ("frame_idx", "idx"):
        if raw.get(name) is not None:
            return int(raw[name])
    return 0


def _load_sample_audio(sample: Sample, path, sampling_rate: int, max_seconds, upstream_media: bool) -> np.ndarray:
    if not upstream_media:
        return load_audio(path, sampling_rate, max_seconds)
    spec = TASKS.get(sample.task)
    windows = spec.audio_windows if spec is not None else None
    read = windows.read_seconds if windows is not None else None
    # windows from the file's start (the emotion tasks' 4 s): read a little more, so the resampler's edge stays out
    wave = load_audio(path, sampling_rate, None if read is None else read + 0.25)
    index = _window_index(sample) if windows is not None and windows.indexed else 0
    wave = apply_audio_windows(wave, windows, sampling_rate, index)
    return wave if max_seconds is None else wave[: int(round(max_seconds * sampling_rate))]


def _decode_media(sample: Sample, sampling_rate: int, num_frames: int, frame_size, max_audio_seconds,
                  upstream_media: bool = False):
    """Decodes the sample's media. ``upstream_media``: upstream Crab+'s per task (``media_num_frames`` frames
    sampled first to last; the task's audio windows, ``apply_audio_windows``, cut from the whole file and then
    capped at ``max_audio_seconds``); else ``num_frames`` segment midpoints and the first ``max_audio_seconds``."""
    num_frames = media_num_frames(sample.task, num_frames, upstream_media)
    sampling = "linspace" if upstream_media else "midpoint"
    videos, durations, images, audios = [], [], [], []
    for kind, paths in sample.media.items():
        for p in paths:
            if not Path(p).is_file():
                raise MediaError(sample.task, sample.index, p, f"{kind} file not found")
            try:
                if kind == "video":
                    v, d = load_video_frames(p, num_frames, frame_size, sampling=sampling)
                    videos.append(v)
                    durations.append(d)
                elif kind == "audio":
                    audios.append(_load_sample_audio(sample, p, sampling_rate, max_audio_seconds, upstream_media))
                elif kind == "image":
                    images.append(load_image(p, frame_size))
                else:
                    raise ValueError(f"unknown media kind {kind!r}")
            except MediaError:
                raise
            except Exception as e:  # noqa: BLE001 - any decoder failure becomes a named MediaError
                raise MediaError(sample.task, sample.index, p,
                                 f"cannot decode {kind} ({type(e).__name__}: {e})") from e
    return videos, durations, images, audios


# ------------------------------------------------------------------------------------------------------ prompts
def build_messages(sample: Sample, prompts: Optional[Mapping] = None, with_answer: bool = True) -> List[dict]:
    """The chat: system prompt (none when the prompt file's ``system`` is null); user = [intro, the media
    placeholders, instruction], laid out by the prompt file's ``render`` section (separators, media order, clip
    labels, packed clips: ``crab.prompts``); assistant = target."""
    from .prompts import media_order, packed_kinds, render_params

    prompts = load_prompts() if prompts is None else prompts
    r = render_params(prompts)
    counts = {k: len(sample.media.get(k, ())) for k in ("video", "image", "audio")}
    packed = packed_kinds(sample.task, counts, prompts)
    content: List[dict] = []
    intro = prompts["intro"][TASKS[sample.task].media] + r["intro_separator"]
    if intro:
        content.append({"type": "text", "text": intro})
    for kind in media_order(sample.task, prompts):
        n = min(counts[kind], 1) if kind in packed else counts[kind]
        labels = r["clip_labels"].get(kind) if n > 1 else None
        if labels is not None and len(labels) < n:
            raise ValueError(f"task {sample.task!r} sample {sample.index}: {n} {kind} clips but the prompt file's "
                             f"render.clip_labels.{kind} has {len(labels)} labels")
        for i in range(n):
            if labels is not None and labels[i]:
                content.append({"type": "text", "text": labels[i]})
            content.append({"type": kind})
            if labels is not None and r["clip_separator"]:
                content.append({"type": "text", "text": r["clip_separator"]})
    instruction = task_instruction(sample.task, sample.instruction, prompts, getattr(sample, "options", None))
    content.append({"type": "text", "text": r["instruction_separator"] + instruction})
    messages = [{"role": "user", "content": content}]
    if prompts.get("system") is not None:
        messages.insert(0, {"role": "system", "content": prompts["system"]})
    if with_answer:
        messages.append({"role": "assistant", "content": sample.target})
    return messages


def _render(processor, messages, add_generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _pack_clips(sample: Sample, prompts, videos, durations, audios):
    """The decoded clips as ``build_messages`` places them: for a task the prompt file packs
    (``render.pack_clips``), its videos become one video (frames concatenated in order) and its audios one
    waveform (concatenated in order). A packed video's duration is the clips' mean, so that seconds per frame
    (duration / frames per clip) stays the clips' mean."""
    from .prompts import packed_kinds

    prompts = load_prompts() if prompts is None else prompts
    packed = packed_kinds(sample.task, {"video": len(videos), "audio": len(audios)}, prompts)
    if "video" in packed:
        videos, durations = [torch.cat(list(videos), dim=0)], [float(sum(durations)) / len(durations)]
    if "audio" in packed:
        audios = [np.concatenate([np.asarray(a) for a in audios])]
    return videos, durations, audios


def _assistant_header_ids(tokenizer) -> List[int]:
    return tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)


def _find_last(seq: List[int], sub: List[int]) -> int:
    n = len(sub)
    for s in range(len(seq) - n, -1, -1):
        if seq[s:s + n] == sub:
            return s
    return -1


def encode_sample(sample: Sample, processor, num_frames: int = 10, frame_size=224, prompts=None,
                  with_answer: bool = True, max_length: Optional[int] = None,
                  max_audio_seconds: Optional[float] = None, upstream_media: bool = False) -> Dict[str, Any]:
    """Decodes the sample's media, renders the chat and runs the processor. Returns a dict of tensors with a batch
    dimension of 1 for ``input_ids`` / ``attention_mask`` (and ``labels`` when ``with_answer``: ``IGNORE_INDEX``
    everywhere except the assistant answer and its ``<|im_end|>``). ``upstream_media``: upstream Crab+'s per-task
    audio windows and frame counts (``_decode_media``; the recipe's ``data.upstream_media``)."""
    tok = processor.tokenizer
    sr = getattr(processor.feature_extractor, "sampling_rate", DEFAULT_SAMPLING_RATE)
    if max_audio_seconds is None:   # the feature extractor keeps at most chunk_length seconds (30 s for Whisper)
        max_audio_seconds = getattr(processor.feature_extractor, "chunk_length", None)
    num_frames = media_num_frames(sample.task, num_frames, upstream_media)   # per clip, for video_second_per_grid
    videos, durations, images, audios = _decode_media(sample, sr, num_frames, frame_size, max_audio_seconds,
                                                      upstream_media)
    videos, durations, audios = _pack_clips(sample, prompts, videos, durations, audios)
    messages = build_messages(sample, prompts, with_answer=with_answer)
    text = _render(processor, messages, add_generation_prompt=not with_answer)
    h, w = _size_hw(frame_size)
    vis_size = {"shortest_edge": 28 * 28 * 4, "longest_edge": h * w}
    kwargs: Dict[str, Any] = {"return_tensors": "pt"}
    if videos:
        kwargs["videos"] = videos
        kwargs["videos_kwargs"] = {"size": vis_size, "do_sample_frames": False, "cap_pixels_per_frame": False}
    if images:
        kwargs["images"] = images
        kwargs["images_kwargs"] = {"size": vis_size}
    if audios:
        kwargs["audio"] = audios
        kwargs["audio_kwargs"] = {"sampling_rate": sr}
    enc = processor(text=[text], **kwargs)
    out = {k: v for k, v in enc.items()}
    if videos:
        # seconds per temporal grid step, per video, from the real clip duration (the processor assumes 2 fps)
        tps = processor.video_processor.temporal_patch_size
        out["video_second_per_grid"] = torch.tensor([tps * d / num_frames for d in durations], dtype=torch.float32)
    ids = out["input_ids"][0].tolist()
    if with_answer:
        header = _assistant_header_ids(tok)
        start = _find_last(ids, header)
        if start < 0:
            raise RuntimeError(f"task {sample.task!r} sample {sample.index}: assistant header not found in the "
                               "rendered prompt; is the processor's chat template the Qwen one?")
        start += len(header)
        end_id = tok.convert_tokens_to_ids("<|im_end|>")
        try:
            end = ids.index(end_id, start) + 1          # include <|im_end|>
        except ValueError:
            end = len(ids)
        labels = torch.full_like(out["input_ids"], IGNORE_INDEX)
        labels[0, start:end] = out["input_ids"][0, start:end]
        out["labels"] = labels
        if max_length is not None and labels.shape[1] > max_length:
            if start >= max_length:
                raise ValueError(f"task {sample.task!r} sample {sample.index}: the prompt alone is {start} tokens "
                                 f"(media placeholders cannot be cut), over max_length={max_length}")
            for k in _PER_SEQUENCE:
                out[k] = out[k][:, :max_length]
    elif max_length is not None and len(ids) > max_length:
        raise ValueError(f"task {sample.task!r} sample {sample.index}: the prompt is {len(ids)} tokens, over "
                         f"max_length={max_length}")
    return out


def build_generation_inputs(sample: Sample, processor, num_frames: int = 10, frame_size=224, prompts=None,
                            max_audio_seconds: Optional[float] = None,
                            upstream_media: bool = False) -> Dict[str, Any]:
    """The model inputs for generation on one sample: the prompt without the answer, ending in
    ``<|im_start|>assistant\\n`` (``add_generation_prompt=True``); batch dimension 1; no labels. Pass to
    ``model.generate(**inputs, max_new_tokens=...)`` and decode ``out[:, inputs["input_ids"].shape[1]:]``."""
    return encode_sample(sample, processor, num_frames, frame_size, prompts, with_answer=False,
                         max_audio_seconds=max_audio_seconds, upstream_media=upstream_media)


# ------------------------------------------------------------------------------------------------------ dataset
class AVUIEDataset(torch.utils.data.Dataset):
    """Samples -> processor outputs. Item: ``input_ids``, ``attention_mask``, ``labels`` (1-D, length L), the
    media tensors the thinker expects (``pixel_values_videos``, ``video_grid_thw``, ``video_second_per_grid``,
    ``pixel_values``, ``image_grid_thw``, ``input_features``, ``feature_attention_mask``: concatenable along dim 0),
    ``task``, ``index`` and ``pad_token_id``.

    ``skip_missing=True``: samples whose media files do not exist are dropped at construction (counted in
    ``self.skips``, which starts from the samples' own ``skips``); a file that exists but cannot be decoded is counted
    there too and the next sample is returned
    instead (counts made inside DataLoader worker processes stay in those processes). Otherwise ``MediaError``."""

    def __init__(self, samples: Sequence[Sample], processor, num_frames: int = 10, frame_size=224,
                 skip_missing: bool = False, max_length: Optional[int] = None, prompts=None,
                 max_audio_seconds: Optional[float] = None, upstream_media: bool = False):
        self.processor = processor
        self.num_frames, self.frame_size = int(num_frames), frame_size
        self.skip_missing, self.max_length = skip_missing, max_length
        self.max_audio_seconds = max_audio_seconds
        self.upstream_media = bool(upstream_media)   # upstream Crab+'s per-task audio windows and frame counts
        self.prompts = load_prompts() if prompts is None else (load_prompts(prompts) if isinstance(prompts, (str, Path))
                                                               else prompts)
        self.skips = SkipCounts()
        if isinstance(getattr(samples, "skips", None), SkipCounts):
            self.skips.update(samples.skips)
        kept = []
        for s in samples:
            missing = [p for ps in s.media.values() for p in ps if not Path(p).is_file()]
            if missing:
                if not skip_missing:
                    raise MediaError(s.task, s.index, missing[0], "media file not found")
                self.skips.add(s.task, "missing_media", s.index)
                continue
            kept.append(s)
        if not kept:
            raise ValueError("AVUIEDataset: no samples" + (f" ({self.skips.format()})" if self.skips else ""))
        self.samples = kept
        pad = processor.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else processor.tokenizer.eos_token_id

    @property
    def skipped(self) -> Counter:
        """task -> number of samples skipped (``skips`` has the reasons)."""
        return self.skips.by_task()

    def __len__(self):
        return len(self.samples)

    def _item(self, i: int) -> Dict[str, Any]:
        s = self.samples[i]
        enc = encode_sample(s, self.processor, self.num_frames, self.frame_size, self.prompts, with_answer=True,
                            max_length=self.max_length, max_audio_seconds=self.max_audio_seconds,
                            upstream_media=self.upstream_media)
        item = {k: (v[0] if k in _PER_SEQUENCE else v) for k, v in enc.items()}
        item.update(task=s.task, index=s.index, pad_token_id=self.pad_token_id)
        return item

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if not self.skip_missing:
            return self._item(i)
        for step in range(len(self.samples)):
            j = (i + step) % len(self.samples)
            try:
                return self._item(j)
            except MediaError:
                self.skips.add(self.samples[j].task, "undecodable_media", self.samples[j].index)
        raise RuntimeError("AVUIEDataset: no sample could be decoded")


def collate(batch: Sequence[Mapping[str, Any]], padding_side: str = "right",
            pad_token_id: Optional[int] = None) -> Dict[str, Any]:
    """Pads ``input_ids`` (pad token), ``attention_mask`` (0) and ``labels`` (-100) to the longest sequence and
    concatenates the media tensors along dim 0 in batch order (the order the thinker consumes them).
    ``padding_side="left"`` for batched generation. Adds ``task`` and ``index`` lists."""
    if not batch:
        raise ValueError("collate: empty batch")
    if padding_side not in ("right", "left"):
        raise ValueError(f"collate: padding_side must be 'right' or 'left', got {padding_side!r}")
    if pad_token_id is None:
        pad_token_id = batch[0].get("pad_token_id", 0)
    longest = max(int(b["input_ids"].shape[-1]) for b in batch)
    out: Dict[str, Any] = {}
    for key, fill in (("input_ids", pad_token_id), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        if key not in batch[0]:
            continue
        rows = []
        for b in batch:
            x = b[key].reshape(-1)
            pad = x.new_full((longest - x.shape[0],), fill)
            rows.append(torch.cat([x, pad]) if padding_side == "right" else torch.cat([pad, x]))
        out[key] = torch.stack(rows)
    for key in _MEDIA_CAT:
        parts = [b[key] for b in batch if b.get(key) is not None]
        if not parts:
            continue
        if key in ("input_features", "feature_attention_mask"):
            frames = max(p.shape[-1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, frames - p.shape[-1])) for p in parts]
        out[key] = torch.cat(parts, dim=0)
    out["task"] = [b.get("task") for b in batch]
    out["index"] = [b.get("index") for b in batch]
    return out


def build_generation_batch(samples: Sequence[Sample], processor, num_frames: int = 10, frame_size=224,
                           prompts=None, max_audio_seconds: Optional[float] = None,
                           upstream_media: bool = False) -> Dict[str, Any]:
    """``build_generation_inputs`` for several samples, collated with left padding (for batched ``generate``).
    Holds ``task`` and ``index`` lists too: pass ``model_inputs(batch)`` to ``generate``."""
    pad = processor.tokenizer.pad_token_id
    pad = pad if pad is not None else processor.tokenizer.eos_token_id
    items = []
    for s in samples:
        enc = build_generation_inputs(s, processor, num_frames, frame_size, prompts, max_audio_seconds,
                                      upstream_media)
        item = {k: (v[0] if k in _PER_SEQUENCE else v) for k, v in enc.items()}
        item.update(task=s.task, index=s.index)
        items.append(item)
    return collate(items, padding_side="left", pad_token_id=pad)


def model_inputs(batch: Mapping[str, Any]) -> Dict[str, Any]:
    """The thinker's forward kwargs of a collated batch (drops ``task``, ``index`` and anything unknown)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}
