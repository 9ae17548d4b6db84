"""Evaluation of a Crab+ model: greedy generation on the test split, answer extraction, per-task metrics,
router statistics, and the per-task results JSON.

Generation (``generate_predictions``)
    Greedy, up to ``max_new_tokens`` new tokens (default ``UPSTREAM_MAX_NEW_TOKENS`` = 512, the limit of upstream's
    inference script). A generation that reaches the limit without an end-of-sequence token is *cut by length*:
    ``results["tasks"][task]["cut_by_length"]`` counts them per task, each prediction row carries
    ``"cut_by_length"``, and ``format_metrics`` prints the count (a cut generation may have lost its answer).

Answer extraction (``extract_answer`` / ``parse_answer``)
    1. ``<answer>...</answer>`` tags (upstream's format, after the reasoning; case and inner whitespace are
       tolerated): the content of the LAST complete pair. An ``<answer>`` opened after the last complete pair and
       never closed (a generation cut before ``</answer>``) gives the rest of the text, reported as cut
       (``parse_answer(...)[1]``; the per-task count is ``unclosed_answer``).
    2. Else the text after the LAST ``Answer:`` (case-insensitive), up to the end of that line.
    3. Else, with a closed set of choices, the last choice mentioned anywhere in the text; else the last non-empty
       line.
    With a closed set, an extracted answer that is not itself a choice is mapped to the last choice it mentions.
    The same extraction runs on the target text, so targets may carry a reasoning process before the answer.

Metrics (``score_task``; the metric name comes from ``TASKS[key].metric``)
    ``accuracy``  exact match of the normalised answers (lower case, single spaces, outer punctuation stripped);
                  classification, QA and AVE.
    ``avvp_f1``   AVVP (LLP) parsing, scored per modality with the LLP benchmark's protocol (AVVP-ECCV20's
                  evaluation; the upstream repositories ship no AVVP scorer of their own): segment level and
                  event level, each for audio (``*_audio``),
                  visual (``*_visual``) and audio-visual (``*_av``: audible AND visible), plus ``*_type_av``
                  (Type@AV, the mean of the three) and ``*_event_av`` (Event@AV, audio and visual counts pooled);
                  prefixes ``seg_`` and ``evt_``. Per video, F1 is computed per event class (classes absent from
                  both prediction and target skipped; none left scores 1) and averaged over classes; the video
                  values are averaged over videos. Segments are the 1-second bins 0..9 (``n_segments``); an event
                  of the event level is a run of consecutive segments of one class; a predicted event is a true
                  positive when its IoU with some target event is >= 0.5, a target event a false negative when no
                  predicted event reaches 0.5 with it. The headline ``score`` (= ``segment_f1``) is the
                  segment-level Type@AV; ``event_f1`` is the event-level Type@AV.
                  Layouts read (``parse_avvp_events``), inside ``<answer>`` tags or after ``Answer:`` if present:
                  modality tags ``<audio>Dog,(2 5)</audio> <visual>...</visual>`` (also ``<audio_event>`` /
                  ``<visual_event>``), modality prefixes ``Audio: Dog, [2,5]  Visual: Dog, [0,1],[3,6]``, or bare
                  ``dog, 2-5; speech, 0-10`` (no modality: audible and visible). An event is a label followed by
                  one or more intervals ``s-e``, ``s to e``, ``[s,e]``, ``(s e)`` in seconds, end exclusive; labels
                  may hold commas; ``_`` reads as a space. Targets without any parsable event are counted
                  (``unparsed_targets``) and named in ``note``.
    ``caption``   free text (captioning): SQuAD-style unigram F1 between the normalised answer and target,
                  averaged over samples (a light stand-in; use CIDEr etc. from the captioning toolkits for papers).
    ``iou``       localisation. A box is 4 numbers ``[x1, y1, x2, y2]``, an interval 2 numbers ``start-end`` or
                  ``[start, end]``; the last group with as many numbers as the target's is taken from the
                  prediction. ``score`` = mean IoU; ``iou@0.5`` = share of samples with IoU >= 0.5. An unparsable
                  prediction scores IoU 0.
    ``seg_text``  s4, ms3, ref_avs: a TEXT-ONLY PROXY, stated in the result's ``note``. The tasks' real metrics
                  are on masks (upstream: SAM2 prompted with the predicted box and points, mask J = IoU and F-score
                  with beta^2 = 0.3 against the ground-truth masks; Ref-AVS's null split by the S metric), which
                  need a mask decoder that this evaluation does not run. Scored instead, per sample: when the
                  target carries a box ``[x1,y1,x2,y2]``, the IoU of the predicted box (``basis`` ``box_iou``);
                  otherwise (upstream's test layout: "The object making the sound in the video is X." for s4/ms3,
                  the referring expression for ref_avs) the share of the target's object names that the answer
                  mentions (``basis`` ``object_name``). Also reported: ``prompt_rate`` (share of predictions
                  holding a box or a point, what a mask decoder would be prompted with) and ``said_absent`` (share
                  answering ``<answer>false</answer>``, Ref-AVS's "no such object").
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..ops.reference import router_probabilities
from .tasks import METRICS, TASKS

# upstream's generation length (GeWu-Lab/Crab_Plus scripts/finetune/inference_omni.py: max_new_tokens 512)
UPSTREAM_MAX_NEW_TOKENS = 512

# ---------------------------------------------------------------------------------------------------------------
# answer extraction

_ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)
_TAG_OPEN = re.compile(r"<\s*answer\s*>", re.IGNORECASE)
_TAG_PAIR = re.compile(r"<\s*answer\s*>(.*?)<\s*/\s*answer\s*>", re.IGNORECASE | re.DOTALL)
_OUTER = " \t\r\n.,;:!?\"'`*()[]{}<>"


def normalize(text: str) -> str:
    """Lower case, single spaces, outer punctuation stripped."""
    return " ".join(str(text).lower().split()).strip(_OUTER)


def answer_region(text: str) -> Tuple[str, str]:
    """(region, source) of a generation: source ``"tag"`` (content of the last complete ``<answer>`` pair),
    ``"tag_unclosed"`` (the rest after an ``<answer>`` opened after the last pair and never closed), ``"marker"``
    (all the text after the last ``Answer:``) or ``"none"`` (the whole text)."""
    text = str(text)
    pairs = list(_TAG_PAIR.finditer(text))
    last_end = pairs[-1].end() if pairs else 0
    for m in _TAG_OPEN.finditer(text, last_end):
        return text[m.end():].strip(), "tag_unclosed"
    if pairs:
        return pairs[-1].group(1).strip(), "tag"
    marks = list(_ANSWER.finditer(text))
    if marks:
        return text[marks[-1].end():].strip(), "marker"
    return text, "none"


def _last_choice(text: str, choices: Sequence[str]) -> Optional[str]:
    """The choice whose last mention in ``text`` ends last (the longest on ties); None if none is mentioned."""
    low = text.lower()
    best, best_key = None, None
    for choice in choices:
        c = normalize(choice)
        if not c:
            continue
        for m in re.finditer(r"(?<![\w])" + re.escape(c) + r"(?![\w])", low):
            key = (m.end(), len(c))
            if best_key is None or key > best_key:
                best, best_key = choice, key
    return best


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def parse_answer(text: str, choices: Optional[Sequence[str]] = None) -> Tuple[str, bool]:
    """(answer, cut): the answer part of a generation (see the module docstring); ``cut`` is True when it comes
    from an ``<answer>`` that was never closed."""
    region, source = answer_region(text)
    if source == "marker":
        answer = region.splitlines()[0].strip() if region else ""
    elif source == "none":
        if choices:
            found = _last_choice(region, choices)
            if found is not None:
                return found, False
        answer = _last_line(region)
    else:
        answer = region
    if choices:
        norm = normalize(answer)
        for choice in choices:
            if normalize(choice) == norm:
                return choice, source == "tag_unclosed"
        found = _last_choice(answer, choices)
        if found is not None:
            return found, source == "tag_unclosed"
    return answer, source == "tag_unclosed"


def extract_answer(text: str, choices: Optional[Sequence[str]] = None) -> str:
    """The answer part of a generation (see the module docstring)."""
    return parse_answer(text, choices)[0]


# ---------------------------------------------------------------------------------------------------------------
# metrics

def accuracy(predictions: Sequence[str], targets: Sequence[str], choices: Optional[Sequence[str]] = None) -> dict:
    _check_lengths(predictions, targets)
    hits = [normalize(extract_answer(p, choices)) == normalize(extract_answer(t, choices))
            for p, t in zip(predictions, targets)]
    return {"score": _mean(hits), "accuracy": _mean(hits), "correct": int(sum(hits)), "per_sample": hits}


_N = r"\d+(?:\.\d+)?"
# one interval: bracketed "[0,10]", "(0 10)", "(0-10)", or bare "0-10", "3 to 5s"
_SPAN = re.compile(rf"[\[(]\s*({_N})\s*s?\s*(?:,|;|-|–|—|to|\s)\s*({_N})\s*s?\s*[\])]"
                   rf"|({_N})\s*s?\s*(?:-|–|—|to)\s*({_N})\s*s?", re.IGNORECASE)
_MODALITY_TAG = re.compile(r"<\s*(/?)\s*(audio|visual)(?:_event)?\s*>", re.IGNORECASE)
_MODALITY_PREFIX = re.compile(r"(?<![\w-])(audio[\s_-]*visual|audio|visual)(?:\s+events?)?\s*:", re.IGNORECASE)
_LABEL_EDGE_WORDS = {"and", "from", "at", "between", "during", "in", "is", "occurs", "lasts"}


def _avvp_label(gap: str) -> str:
    words = normalize(gap.replace("_", " ")).split()
    while words and words[0] in _LABEL_EDGE_WORDS:
        words.pop(0)
    while words and words[-1] in _LABEL_EDGE_WORDS:
        words.pop()
    return normalize(" ".join(words))


def _avvp_chunk(chunk: str, modality: str, out: list) -> None:
    """Events of one chunk of one modality: items split at ``;`` / new lines; in an item, a label (any text with
    letters) applies to the intervals after it, until the next label."""
    for item in re.split(r"[;\n]", chunk):
        label, prev = "", 0
        for m in _SPAN.finditer(item):
            gap = item[prev:m.start()]
            prev = m.end()
            if re.search(r"[^\W\d_]", gap):
                label = _avvp_label(gap)
            start, end = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
            start, end = float(start), float(end)
            if label and end > start:
                out.append((modality, label, start, end))


def parse_avvp_events(text: str) -> List[Tuple[str, str, float, float]]:
    """``[(modality, label, start, end)]`` with modality ``"audio"``, ``"visual"`` or ``"both"`` (given without a
    modality, or as audio-visual), in text order; unparsable items are dropped. Layouts: module docstring."""
    region, source = answer_region(text)
    body = region if source != "none" else str(text)
    events: list = []
    tags = list(_MODALITY_TAG.finditer(body))
    if any(not t.group(1) for t in tags):
        # modality tags: the content of each open tag up to its close (or the next open tag, or the end)
        for i, t in enumerate(tags):
            if t.group(1):
                continue
            end = tags[i + 1].start() if i + 1 < len(tags) else len(body)
            _avvp_chunk(body[t.end():end], t.group(2).lower(), events)
        return events
    prefixes = list(_MODALITY_PREFIX.finditer(body))
    _avvp_chunk(body[:prefixes[0].start()] if prefixes else body, "both", events)
    for i, p in enumerate(prefixes):
        end = prefixes[i + 1].start() if i + 1 < len(prefixes) else len(body)
        word = p.group(1).lower()
        modality = "audio" if word == "audio" else "visual" if word == "visual" else "both"
        _avvp_chunk(body[p.end():end], modality, events)
    return events


def parse_avvp(text: str) -> List[Tuple[str, float, float]]:
    """``"speech, 0-10; dog barking, 3-5"`` -> [("speech", 0, 10), ("dog barking", 3, 5)]: the events of
    ``parse_avvp_events`` without their modality."""
    return [(label, start, end) for _, label, start, end in parse_avvp_events(text)]


def _segments(events, n_segments: int) -> set:
    out = set()
    for label, start, end in events:
        for s in range(max(0, math.floor(start)), min(n_segments, math.ceil(end))):
            out.add((label, s))
    return out


def _f1(tp: int, n_pred: int, n_true: int) -> float:
    if n_pred == 0 and n_true == 0:
        return 1.0
    return 2.0 * tp / (n_pred + n_true)


def interval_iou(a: Sequence[float], b: Sequence[float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _modality_segments(events, n_segments: int) -> Dict[str, set]:
    """{"audio", "visual", "av"} -> set of (label, segment); "both" events go to audio and visual."""
    a = _segments([(lb, s, e) for m, lb, s, e in events if m in ("audio", "both")], n_segments)
    v = _segments([(lb, s, e) for m, lb, s, e in events if m in ("visual", "both")], n_segments)
    return {"audio": a, "visual": v, "av": a & v}


def _runs_of(segs: Sequence[int]) -> List[set]:
    runs: List[set] = []
    for s in sorted(segs):
        if runs and s == max(runs[-1]) + 1:
            runs[-1].add(s)
        else:
            runs.append({s})
    return runs


def _event_counts(pred: set, true: set, thr: float) -> Tuple[int, int, int]:
    """(TP, FP, FN) of the event level for one class: runs of segments, matched at IoU >= thr (any match)."""
    pe, te = _runs_of(pred), _runs_of(true)
    hit = lambda x, y: len(x & y) >= thr * len(x | y)  # noqa: E731
    tp = sum(any(hit(p, t) for t in te) for p in pe)
    fn = sum(not any(hit(t, p) for p in pe) for t in te)
    return tp, len(pe) - tp, fn


def _class_mean_f1(counts: Dict[str, Tuple[int, int, int]]) -> float:
    """Mean over classes of 2TP / (2TP + FP + FN), classes with no prediction and no target skipped; 1 if none."""
    f = [2 * tp / (2 * tp + fp + fn) for tp, fp, fn in counts.values() if tp + fp or tp + fn]
    return sum(f) / len(f) if f else 1.0


def _avvp_video(pred_events, true_events, n_segments: int, event_iou: float) -> Dict[str, float]:
    ps, ts = _modality_segments(pred_events, n_segments), _modality_segments(true_events, n_segments)
    out = {}
    for level in ("seg", "evt"):
        per_mod: Dict[str, Dict[str, Tuple[int, int, int]]] = {}
        for mod in ("audio", "visual", "av"):
            classes = {lb for lb, _ in ps[mod] | ts[mod]}
            counts = {}
            for c in classes:
                p = {s for lb, s in ps[mod] if lb == c}
                t = {s for lb, s in ts[mod] if lb == c}
                counts[c] = ((len(p & t), len(p - t), len(t - p)) if level == "seg"
                             else _event_counts(p, t, event_iou))
            per_mod[mod] = counts
            out[f"{level}_{mod}"] = _class_mean_f1(counts)
        pooled = {}
        for mod in ("audio", "visual"):
            for c, (tp, fp, fn) in per_mod[mod].items():
                a, b, d = pooled.get(c, (0, 0, 0))
                pooled[c] = (a + tp, b + fp, d + fn)
        out[f"{level}_event_av"] = _class_mean_f1(pooled)
    return out


AVVP_KEYS = tuple(f"{lv}_{k}" for lv in ("seg", "evt") for k in ("audio", "visual", "av", "type_av", "event_av"))


def avvp_f1(predictions: Sequence[str], targets: Sequence[str], n_segments: int = 10,
            event_iou: float = 0.5) -> dict:
    """AVVP per modality, segment and event level (module docstring); ``score`` = segment-level Type@AV."""
    _check_lengths(predictions, targets)
    videos, unparsed = [], 0
    for pred, true in zip(predictions, targets):
        te = parse_avvp_events(true)
        if not te and str(true).strip():
            unparsed += 1
        videos.append(_avvp_video(parse_avvp_events(pred), te, n_segments, event_iou))
    out: dict = {}
    for lv in ("seg", "evt"):
        for k in ("audio", "visual", "av", "event_av"):
            out[f"{lv}_{k}"] = _mean(v[f"{lv}_{k}"] for v in videos)
        out[f"{lv}_type_av"] = _mean([out[f"{lv}_audio"], out[f"{lv}_visual"], out[f"{lv}_av"]]) if videos \
            else float("nan")
    result = {"score": out["seg_type_av"], "segment_f1": out["seg_type_av"], "event_f1": out["evt_type_av"]}
    result.update({k: out[k] for k in AVVP_KEYS})
    result["unparsed_targets"] = unparsed
    if unparsed:
        result["note"] = (f"{unparsed} of {len(targets)} targets hold no parsable event (expected e.g. "
                          f"'<audio>Dog,(2 5)</audio>', 'Audio: Dog, [2,5]' or 'dog, 2-5'); they count as videos "
                          f"without events")
    result["per_sample"] = [(v["seg_audio"] + v["seg_visual"] + v["seg_av"]) / 3 for v in videos]
    return result


_NUM = r"-?\d+(?:\.\d+)?"


def _numbers_in(body: str, count: int) -> Optional[List[float]]:
    for group in reversed(re.findall(r"[\[(]([^\])]*)[\])]", body)):
        nums = re.findall(_NUM, group)
        if len(nums) == count:
            return [float(n) for n in nums]
    if count == 2:
        spans = re.findall(r"(\d+(?:\.\d+)?)\s*s?\s*(?:-|–|to)\s*(\d+(?:\.\d+)?)", body)
        if spans:
            return [float(spans[-1][0]), float(spans[-1][1])]
    nums = re.findall(_NUM, body)
    if len(nums) >= count:
        return [float(n) for n in nums[-count:]]
    return None


def parse_numbers(text: str, count: int) -> Optional[List[float]]:
    """The last group of exactly ``count`` numbers in ``text`` (bracketed groups first, then ``a-b`` intervals,
    then the last ``count`` numbers of the answer part); None when there are fewer numbers. The answer part is
    the text after ``Answer:``, or the ``<answer>`` content (then the whole text when the content has too few)."""
    region, source = answer_region(text)
    found = _numbers_in(region, count)
    if found is None and source in ("tag", "tag_unclosed"):
        found = _numbers_in(str(text), count)
    return found


def iou_score(predictions: Sequence[str], targets: Sequence[str]) -> dict:
    _check_lengths(predictions, targets)
    ious = []
    for pred, true in zip(predictions, targets):
        t = parse_numbers(true, 4) or parse_numbers(true, 2)
        if t is None:
            raise ValueError(f"iou: target {true!r} holds neither a box (4 numbers) nor an interval (2 numbers)")
        p = parse_numbers(pred, len(t))
        if p is None:
            ious.append(0.0)
        else:
            ious.append(box_iou(p, t) if len(t) == 4 else interval_iou(p, t))
    return {"score": _mean(ious), "mean_iou": _mean(ious), "iou@0.5": _mean([i >= 0.5 for i in ious]),
            "per_sample": ious}


def caption_f1(predictions: Sequence[str], targets: Sequence[str]) -> dict:
    _check_lengths(predictions, targets)
    scores = []
    for pred, true in zip(predictions, targets):
        p, t = normalize(extract_answer(pred)).split(), normalize(extract_answer(true)).split()
        common = sum(min(p.count(w), t.count(w)) for w in set(p))
        scores.append(_f1(common, len(p), len(t)))
    return {"score": _mean(scores), "token_f1": _mean(scores), "per_sample": scores}


_BOX = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")
_BOX_CORNERS = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_POINT = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*\]")
_ABSENT = re.compile(r"<\s*answer\s*>\s*false\s*<\s*/\s*answer\s*>", re.IGNORECASE)
_SOUNDING = re.compile(r"sound(?:ing)?\b.*?\bis\s+(?P<obj>[^.\n<]+)", re.IGNORECASE)
_ARTICLES = re.compile(r"^(?:the|an?)\s+")
_EXISTENCE = {"true", "false", "yes", "no"}

SEG_TEXT_NOTE = ("text-only proxy ({basis}); not the task's metric: the masks need a mask decoder (upstream: SAM2 "
                 "prompted with the predicted box and points, scored by mask J (IoU) and F-score (beta^2 = 0.3) "
                 "against the ground-truth masks; Ref-AVS's null split by the S metric), which this evaluation "
                 "does not run")


def _last_box(text: str) -> Optional[List[float]]:
    found = None
    for rx in (_BOX, _BOX_CORNERS):
        ms = list(rx.finditer(str(text)))
        if ms:
            found = [float(x) for x in ms[-1].groups()]
            break
    return found


def _target_objects(target: str) -> List[str]:
    """The object names a segmentation target names: an ``<answer>`` content, the X of "... sound(ing) ... is X",
    or the whole text (Ref-AVS's referring expression); split at commas and "and"."""
    region, source = answer_region(target)
    if source == "none":
        m = _SOUNDING.search(region)
        region = m["obj"] if m else region
    names = []
    for part in re.split(r",|\band\b", region):
        name = _ARTICLES.sub("", normalize(part))
        if name:
            names.append(name)
    return names


def seg_text_score(predictions: Sequence[str], targets: Sequence[str]) -> dict:
    """s4 / ms3 / ref_avs scored from text only (a proxy; see the module docstring and ``note``)."""
    _check_lengths(predictions, targets)
    values, bases = [], []
    for pred, true in zip(predictions, targets):
        t_box = _last_box(true)
        if t_box is not None:
            p_box = _last_box(pred)
            values.append(box_iou(p_box, t_box) if p_box is not None else 0.0)
            bases.append("box_iou")
            continue
        names = _target_objects(true)
        if not names:
            raise ValueError(f"seg_text: target {true!r} names no object and holds no box")
        region, source = answer_region(pred)
        # the <answer> content, unless it is Ref-AVS's existence answer (true/false): then the whole text
        said = normalize(region if source != "none" and normalize(region) not in _EXISTENCE else pred)
        found = sum(bool(re.search(r"(?<![\w])" + re.escape(n) + r"(?![\w])", said)) for n in names)
        values.append(found / len(names))
        bases.append("object_name")
    kinds = sorted(set(bases))
    basis = kinds[0] if len(kinds) == 1 else "mixed" if kinds else "none"
    what = {"box_iou": "IoU of the predicted box with the target's box",
            "object_name": "share of the target's object names the answer mentions",
            "mixed": "box IoU where the target has a box, else share of its object names mentioned",
            "none": "nothing scored"}[basis]
    out = {"score": _mean(values), "basis": basis, "n_scored": len(values),
           "prompt_rate": _mean([_last_box(p) is not None or _POINT.search(str(p)) is not None
                                 for p in predictions]),
           "said_absent": _mean([_ABSENT.search(str(p)) is not None for p in predictions])}
    for kind in kinds:
        out[kind] = _mean(v for v, b in zip(values, bases) if b == kind)
    out["note"] = SEG_TEXT_NOTE.format(basis=what)
    out["per_sample"] = values
    return out


# one scorer per metric of the task registry (crab.tasks.METRICS): (predictions, targets, choices) -> result
SCORERS: Dict[str, Callable[[Sequence[str], Sequence[str], Optional[Sequence[str]]], dict]] = {
    "accuracy": lambda predictions, targets, choices: accuracy(predictions, targets, choices),
    "avvp_f1": lambda predictions, targets, choices: avvp_f1(predictions, targets),
    "iou": lambda predictions, targets, choices: iou_score(predictions, targets),
    "caption": lambda predictions, targets, choices: caption_f1(predictions, targets),
    "seg_text": lambda predictions, targets, choices: seg_text_score(predictions, targets),
}


def score_task(metric: str, predictions: Sequence[str], targets: Sequence[str],
               choices: Optional[Sequence[str]] = None) -> dict:
    """Scores one task's predictions with ``metric``, a name of ``crab.tasks.METRICS`` (a task's
    ``TASKS[key].metric``); the result's ``"metric"`` is that name."""
    scorer = SCORERS.get(metric)
    if scorer is None:
        raise ValueError(f"unknown metric {metric!r}; expected one of {list(METRICS)}")
    out = scorer(predictions, targets, choices)
    out["metric"] = metric
    return out


def _check_lengths(predictions, targets):
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")


def _mean(values) -> float:
    values = list(values)
    return float(sum(float(v) for v in values) / len(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# router statistics

def layer_group(name: str) -> str:
    """llm | audio | vision, from an I-LoRA layer's qualified name."""
    if "audio_tower" in name or "audio_encoder" in name:
        return "audio"
    if "visual" in name or "vision" in name:
        return "vision"
    return "llm"


class RouterStats:
    """Forward hooks on every I-LoRA layer that accumulate, per layer and per task, the sum of the router
    probabilities g (one per head), the sum of their entropy and the token count.

    g is recomputed in the hook from the layer input (softmax(W_r x) in float32, top-k masked like the layer):
    one (K x d_in) GEMM per layer, no change to the fused kernels. Attribution: a 3-D input (B, T, d) whose B equals
    the batch's size is attributed per sample, with padding masked when the attention mask matches (B, T); any other
    input (the packed 2-D inputs of the audio and vision encoders) counts only when the whole batch is one task.
    Layers re-run by gradient checkpointing count twice, which leaves the means unchanged."""

    def __init__(self, model: torch.nn.Module, tasks: Sequence[str]):
        from ..patching import ilora_layers

        self.layers = ilora_layers(model)
        if not self.layers:
            raise ValueError("RouterStats: the model has no I-LoRA layers")
        self.names = list(self.layers)
        self.tasks = list(tasks)
        self.num_heads = next(iter(self.layers.values())).num_heads
        probe = next(iter(self.layers.values())).router_weight
        self.acc = torch.zeros(len(self.names), len(self.tasks), self.num_heads + 2, dtype=torch.float64,
                               device=probe.device)
        self._task_idx: Optional[torch.Tensor] = None
        self._mask: Optional[torch.Tensor] = None
        self._handles = []
        self.enabled = True

    def attach(self) -> "RouterStats":
        for i, name in enumerate(self.names):
            self._handles.append(self.layers[name].register_forward_hook(self._make_hook(i)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def set_context(self, tasks: Sequence[str], attention_mask: Optional[torch.Tensor] = None) -> None:
        idx = [self.tasks.index(t) if t in self.tasks else -1 for t in tasks]
        self._task_idx = torch.tensor(idx, dtype=torch.long)
        self._mask = attention_mask

    def reset(self) -> None:
        self.acc.zero_()

    def _make_hook(self, layer_index: int):
        def hook(module, args, output):
            if not self.enabled or self._task_idx is None or not args:
                return
            x = args[0]
            if not torch.is_tensor(x):
                return
            with torch.no_grad():
                x2d = x.detach().float().reshape(-1, x.shape[-1])
                g = router_probabilities(x2d, module.router_weight.detach().float(), module.top_k or 0)
                g = g.reshape(*x.shape[:-1], module.num_heads)
                ent = -(g * g.clamp_min(1e-12).log()).sum(-1)
                task_idx = self._task_idx.to(x.device)
                acc = self.acc[layer_index]
                if x.dim() == 3 and x.shape[0] == task_idx.numel():
                    if self._mask is not None and tuple(self._mask.shape) == tuple(x.shape[:2]):
                        w = self._mask.to(device=x.device, dtype=torch.float32)
                    else:
                        w = torch.ones(x.shape[:2], device=x.device)
                    rows = torch.cat([(g * w[..., None]).sum(1), (ent * w).sum(1, keepdim=True),
                                      w.sum(1, keepdim=True)], dim=1).double()
                    keep = task_idx >= 0
                    acc.index_add_(0, task_idx[keep].to(acc.device), rows[keep].to(acc.device))
                elif bool((task_idx == task_idx[0]).all()) and int(task_idx[0]) >= 0:
                    g2 = g.reshape(-1, g.shape[-1])
                    row = torch.cat([g2.sum(0), ent.reshape(-1).sum(0, keepdim=True),
                                     g2.new_tensor([g2.shape[0]])]).double()
                    acc[int(task_idx[0])] += row.to(acc.device)
        return hook

    def reduce_(self, accelerator=None) -> None:
        """Sums the accumulators over processes (call on every process)."""
        if accelerator is not None and accelerator.num_processes > 1:
            reduced = accelerator.reduce(self.acc.to(accelerator.device), reduction="sum")
            self.acc.copy_(reduced.to(self.acc.device))

    def summary(self) -> dict:
        """``{"num_heads", "tasks": {task: {"mean_weight": [K], "entropy", "tokens"}}, "groups": {group: {task:
        [K]}}, "layers": {layer: {task: [K]}}}``; means over tokens, then over layers (each layer weighs the same)."""
        acc = self.acc.cpu()
        counts = acc[..., -1:]
        means = torch.where(counts > 0, acc[..., :-1] / counts.clamp_min(1), torch.full_like(acc[..., :-1],
                                                                                             float("nan")))
        out = {"num_heads": self.num_heads, "max_entropy": math.log(self.num_heads), "tasks": {}, "groups": {},
               "layers": {}}
        for t, task in enumerate(self.tasks):
            valid = counts[:, t, 0] > 0
            if not bool(valid.any()):
                continue
            m = means[valid, t]
            out["tasks"][task] = {"mean_weight": m[:, :-1].mean(0).tolist(), "entropy": float(m[:, -1].mean()),
                                  "tokens": float(counts[valid, t, 0].sum())}
        groups: Dict[str, List[int]] = {}
        for i, name in enumerate(self.names):
            groups.setdefault(layer_group(name), []).append(i)
        for group, idx in groups.items():
            out["groups"][group] = {}
            for t, task in enumerate(self.tasks):
                sel = [i for i in idx if counts[i, t, 0] > 0]
                if sel:
                    out["groups"][group][task] = means[sel, t, :-1].mean(0).tolist()
        for i, name in enumerate(self.names):
            out["layers"][name] = {task: means[i, t, :-1].tolist() for t, task in enumerate(self.tasks)
                                   if counts[i, t, 0] > 0}
        return out


# ---------------------------------------------------------------------------------------------------------------
# generation on the test split

def _decode(processor, ids) -> str:
    tok = getattr(processor, "tokenizer", processor)
    return tok.decode(ids, skip_special_tokens=True)


def _eos_ids(model, processor) -> set:
    """The end-of-sequence token ids: the model's generation config (int or list) and the tokenizer's."""
    ids = set()
    tok = getattr(processor, "tokenizer", processor)
    for v in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
              getattr(tok, "eos_token_id", None)):
        for i in (v if isinstance(v, (list, tuple, set)) else [v]):
            if isinstance(i, int) and not isinstance(i, bool):
                ids.add(i)
    return ids


def hit_length_limit(new_ids, max_new_tokens: int, eos_ids) -> bool:
    """True when a generation's new tokens reached ``max_new_tokens`` without ending in an EOS token."""
    n = int(new_ids.shape[-1]) if torch.is_tensor(new_ids) else len(new_ids)
    if n < max_new_tokens:
        return False
    return not (n and eos_ids and int(new_ids[-1]) in eos_ids)


@torch.no_grad()
def generate_predictions(model, processor, samples, *, max_new_tokens: int = UPSTREAM_MAX_NEW_TOKENS, prompts=None,
                         num_frames: int = 10, frame_size: int = 224, router_stats: Optional[RouterStats] = None,
                         progress: bool = True, desc: str = "evaluating", inputs_cache: Optional[dict] = None,
                         return_cut: bool = False, upstream_media: bool = False):
    """Greedy generation, one sample at a time (no padding-side subtleties); returns the decoded new text, or
    ``(texts, cut)`` with ``return_cut=True``: ``cut[i]`` is True when generation i reached ``max_new_tokens``
    without an EOS token (cut by the length limit). ``inputs_cache``: a dict (task, index) -> encoded prompt,
    filled and reused (several runs on one test set). ``upstream_media``: upstream Crab+'s per-task audio windows
    and frame counts (the config's ``data.upstream_media``)."""
    from .data import build_generation_inputs

    model.eval()
    device = next(p for p in model.parameters()).device
    eos = _eos_ids(model, processor)
    out, cut = [], []
    iterator = samples
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(samples, desc=desc, unit="sample", mininterval=2.0, leave=False)
    for sample in iterator:
        key = (sample.task, sample.index)
        if inputs_cache is not None and key in inputs_cache:
            inputs = inputs_cache[key]
        else:
            inputs = build_generation_inputs(sample, processor, num_frames=num_frames, frame_size=frame_size,
                                             prompts=prompts, upstream_media=upstream_media)
            if inputs_cache is not None:
                inputs_cache[key] = inputs
        inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in dict(inputs).items()}
        inputs.pop("labels", None)
        inputs.pop("task", None)
        if router_stats is not None:
            router_stats.set_context([sample.task], inputs.get("attention_mask"))
        prompt_len = inputs["input_ids"].shape[1]
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        ids = gen.sequences if hasattr(gen, "sequences") else gen
        new_ids = ids[0, prompt_len:]
        out.append(_decode(processor, new_ids))
        cut.append(hit_length_limit(new_ids, max_new_tokens, eos))
    return (out, cut) if return_cut else out


def generate_answer(model, processor, sample, *, max_new_tokens: int = UPSTREAM_MAX_NEW_TOKENS, prompts=None,
                    num_frames: int = 10, frame_size: int = 224, upstream_media: bool = False) -> dict:
    """One greedy generation for one ``data.Sample`` by the evaluation's own route (``generate_predictions``: the
    prompt of ``data.build_generation_inputs``, as in training without the answer). Returns ``{"task",
    "generation", "answer", "cut_by_length", "answer_cut"}``: ``answer`` is ``parse_answer`` of the generation with
    the task's choices; ``answer_cut``: its ``<answer>`` was never closed."""
    texts, cut = generate_predictions(model, processor, [sample], max_new_tokens=max_new_tokens, prompts=prompts,
                                      num_frames=num_frames, frame_size=frame_size, progress=False,
                                      return_cut=True, upstream_media=upstream_media)
    spec = TASKS.get(sample.task)
    answer, answer_cut = parse_answer(texts[0], getattr(spec, "choices", None) or None)
    return {"task": sample.task, "generation": texts[0], "answer": answer, "cut_by_length": bool(cut[0]),
            "answer_cut": bool(answer_cut)}


def evaluate_samples(model, processor, samples, *, max_new_tokens: int = UPSTREAM_MAX_NEW_TOKENS, prompts=None,
                     num_frames: int = 10, frame_size: int = 224, collect_router: bool = True,
                     progress: bool = True, run_name: str = "", inputs_cache: Optional[dict] = None,
                     upstream_media: bool = False) -> dict:
    """Generates on ``samples`` (a list of ``Sample``), scores every task and returns the results dict (the
    results-JSON content: ``{"run", "max_new_tokens", "tasks": {task: {"metric", "score", "n", "cut_by_length",
    "unclosed_answer", ...}}, "predictions", "router"}``). ``cut_by_length``: generations that reached
    ``max_new_tokens`` without EOS; ``unclosed_answer``: generations whose ``<answer>`` was never closed."""
    start = time.perf_counter()
    tasks = sorted({s.task for s in samples})
    stats = RouterStats(model, tasks).attach() if collect_router else None
    try:
        preds, cut = generate_predictions(model, processor, samples, max_new_tokens=max_new_tokens,
                                          prompts=prompts, num_frames=num_frames, frame_size=frame_size,
                                          router_stats=stats, progress=progress, inputs_cache=inputs_cache,
                                          return_cut=True, upstream_media=upstream_media)
    finally:
        if stats is not None:
            stats.detach()
    results = {"run": run_name, "max_new_tokens": int(max_new_tokens), "tasks": {}, "predictions": [],
               "eval_seconds": None}
    for task in tasks:
        idx = [i for i, s in enumerate(samples) if s.task == task]
        spec = TASKS[task]
        choices = getattr(spec, "choices", None) or None
        scored = score_task(spec.metric, [preds[i] for i in idx], [samples[i].target for i in idx], choices)
        per_sample = scored.pop("per_sample")
        unclosed = [parse_answer(preds[i])[1] for i in idx]
        scored["n"] = len(idx)
        scored["cut_by_length"] = int(sum(cut[i] for i in idx))
        scored["unclosed_answer"] = int(sum(unclosed))
        results["tasks"][task] = scored
        for i, ok, open_tag in zip(idx, per_sample, unclosed):
            results["predictions"].append({"task": task, "index": samples[i].index, "prediction": preds[i],
                                           "target": samples[i].target, "score": float(ok),
                                           "cut_by_length": bool(cut[i]), "answer_cut": bool(open_tag)})
    results["router"] = stats.summary() if stats is not None else None
    results["eval_seconds"] = round(time.perf_counter() - start, 2)
    return results


def write_results(results: Mapping, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    return path


def _json_default(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if torch.is_tensor(obj):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# result keys format_metrics does not print as extras (aliases of printed numbers, counts printed apart)
_NOT_EXTRAS = {"score", "metric", "n", "correct", "segment_f1", "event_f1", "note", "basis", "cut_by_length",
               "unclosed_answer", "n_scored", "unparsed_targets"}


def format_metrics(results: Mapping, title: Optional[str] = None) -> str:
    """A titled table, one line per task: metric, score with its 95% interval (``crab.report.score_interval``:
    Wilson for accuracy, bootstrap over samples otherwise), extras, n, the generations cut by the length limit;
    the task's ``note`` below it (e.g. what a text-only proxy scores); a warning when every score is 0 and one
    when generations were cut by ``max_new_tokens``."""
    from .report import fmt_interval, per_sample_scores, score_interval

    tasks = results.get("tasks", {})
    run = results.get("run") or "(unnamed run)"
    lines = [title or f"per-task scores, run {run} (95% intervals: Wilson for accuracy, bootstrap over samples "
                      f"otherwise)"]
    scores = [r.get("score") for r in tasks.values()]
    if scores and all(isinstance(v, (int, float)) and v == 0 for v in scores):
        lines.append(f"  WARNING: every score is 0 ({len(scores)} tasks): nothing was learned (or no answer is "
                     f"extracted from the generations)")
    n_cut = sum(int(r.get("cut_by_length") or 0) for r in tasks.values())
    if n_cut:
        limit = results.get("max_new_tokens", "?")
        lines.append(f"  WARNING: {n_cut} of {sum(int(r.get('n') or 0) for r in tasks.values())} generations "
                     f"reached max_new_tokens ({limit}) without EOS: their answers may be missing (raise "
                     f"eval.max_new_tokens; upstream generates up to {UPSTREAM_MAX_NEW_TOKENS})")
    per_sample = per_sample_scores(results)
    for task, r in sorted(tasks.items()):
        extras = ", ".join(f"{k}={v:.3f}" for k, v in r.items()
                           if k not in _NOT_EXTRAS and k != r["metric"] and isinstance(v, float))
        counts = ""
        if "cut_by_length" in r:
            counts += f", cut_by_length={r['cut_by_length']}/{r['n']}"
        if r.get("unclosed_answer"):
            counts += f", unclosed_answer={r['unclosed_answer']}"
        ci, _ = score_interval(r, per_sample.get(task))
        lines.append(f"  {task:<10} {r['metric']:<9} {r['score']:.3f} {fmt_interval(ci)}  "
                     f"(n={r['n']}{', ' + extras if extras else ''}{counts})")
        if r.get("note"):
            lines.append(f"             note: {r['note']}")
    return "\n".join(lines)
