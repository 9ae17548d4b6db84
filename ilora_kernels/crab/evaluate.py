"""Evaluation of a Crab+ model: greedy generation on the test split, answer extraction, per-task metrics,
router statistics, and the per-task results JSON.

Answer extraction (``extract_answer``)
    The answer is the text after the LAST ``Answer:`` (case-insensitive) of the generation, up to the end of that
    line. Without an ``Answer:`` marker, the last closed-set choice mentioned anywhere in the text is the answer
    (when the task has a closed set of choices), else the last non-empty line. With a closed set, an extracted
    answer that is not itself a choice is mapped to the last choice it mentions. The same extraction runs on the
    target text, so targets may carry a reasoning process before ``Answer:``.

Metrics (``score_task``; the metric name comes from ``TASKS[key].metric``)
    ``accuracy``  exact match of the normalised answers (lower case, single spaces, outer punctuation stripped);
                  classification, QA and AVE.
    ``avvp_f1``   AVVP parsing. Format of a prediction and of a target: events separated by ``;`` (or new lines),
                  each ``<event label>, <start>-<end>`` in seconds, end exclusive, e.g.
                  ``speech, 0-10; dog barking, 3-5``; ``to`` and en-dashes work as separators, ``s`` suffixes are
                  ignored. Segments are the 1-second bins 0..9 (``avvp_segments``, default 10).
                  *segment-level F1*: per video, F1 of the set of (label, second) pairs; averaged over videos.
                  *event-level F1*: per label, contiguous runs of seconds form events; a predicted event matches
                  a target event of the same label when their temporal IoU >= 0.5 (one-to-one, greedy by IoU);
                  per video F1, averaged over videos. A video with no events in target and prediction scores 1.
                  The headline ``score`` is the segment-level F1.
    ``caption``   free text (captioning): SQuAD-style unigram F1 between the normalised answer and target,
                  averaged over samples (a light stand-in; use CIDEr etc. from the captioning toolkits for papers).
    ``iou``       localisation. A box is 4 numbers ``[x1, y1, x2, y2]``, an interval 2 numbers ``start-end`` or
                  ``[start, end]``; the last group with as many numbers as the target's is taken from the
                  prediction. ``score`` = mean IoU; ``iou@0.5`` = share of samples with IoU >= 0.5. An unparsable
                  prediction scores IoU 0.
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

# ---------------------------------------------------------------------------------------------------------------
# answer extraction

_ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)
_OUTER = " \t\r\n.,;:!?\"'`*()[]{}<>"


def normalize(text: str) -> str:
    """Lower case, single spaces, outer punctuation stripped."""
    return " ".join(str(text).lower().split()).strip(_OUTER)


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


def extract_answer(text: str, choices: Optional[Sequence[str]] = None) -> str:
    """The answer part of a generation (see the module docstring)."""
    text = str(text)
    marks = list(_ANSWER.finditer(text))
    if marks:
        tail = text[marks[-1].end():].strip()
        answer = tail.splitlines()[0].strip() if tail else ""
    elif choices:
        found = _last_choice(text, choices)
        if found is not None:
            return found
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        answer = lines[-1] if lines else ""
    else:
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        answer = lines[-1] if lines else ""
    if choices:
        norm = normalize(answer)
        for choice in choices:
            if normalize(choice) == norm:
                return choice
        found = _last_choice(answer, choices)
        if found is not None:
            return found
    return answer


# ---------------------------------------------------------------------------------------------------------------
# metrics

def accuracy(predictions: Sequence[str], targets: Sequence[str], choices: Optional[Sequence[str]] = None) -> dict:
    _check_lengths(predictions, targets)
    hits = [normalize(extract_answer(p, choices)) == normalize(extract_answer(t, choices))
            for p, t in zip(predictions, targets)]
    return {"score": _mean(hits), "accuracy": _mean(hits), "correct": int(sum(hits)), "per_sample": hits}


_EVENT = re.compile(r"^\s*(?P<label>.*?)\s*[,:]\s*(?P<start>\d+(?:\.\d+)?)\s*s?\s*(?:-|–|—|to)\s*"
                    r"(?P<end>\d+(?:\.\d+)?)\s*s?\s*$", re.IGNORECASE)


def parse_avvp(text: str) -> List[Tuple[str, float, float]]:
    """``"speech, 0-10; dog barking, 3-5"`` -> [("speech", 0, 10), ("dog barking", 3, 5)]; unparsable items are
    dropped. Reads the part after ``Answer:`` when present."""
    marks = list(_ANSWER.finditer(str(text)))
    body = str(text)[marks[-1].end():] if marks else str(text)
    events = []
    for item in re.split(r"[;\n]", body):
        m = _EVENT.match(item.strip().strip("."))
        if m is None:
            continue
        label = normalize(m["label"])
        start, end = float(m["start"]), float(m["end"])
        if label and end > start:
            events.append((label, start, end))
    return events


def _segments(events, n_segments: int) -> set:
    out = set()
    for label, start, end in events:
        for s in range(max(0, math.floor(start)), min(n_segments, math.ceil(end))):
            out.add((label, s))
    return out


def _runs(segments: set) -> List[Tuple[str, int, int]]:
    by_label: Dict[str, List[int]] = {}
    for label, s in segments:
        by_label.setdefault(label, []).append(s)
    runs = []
    for label, secs in by_label.items():
        secs.sort()
        start = prev = secs[0]
        for s in secs[1:]:
            if s != prev + 1:
                runs.append((label, start, prev + 1))
                start = s
            prev = s
        runs.append((label, start, prev + 1))
    return runs


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


def avvp_f1(predictions: Sequence[str], targets: Sequence[str], n_segments: int = 10,
            event_iou: float = 0.5) -> dict:
    _check_lengths(predictions, targets)
    seg_f1, ev_f1 = [], []
    for pred, true in zip(predictions, targets):
        ps, ts = _segments(parse_avvp(pred), n_segments), _segments(parse_avvp(true), n_segments)
        seg_f1.append(_f1(len(ps & ts), len(ps), len(ts)))
        pe, te = _runs(ps), _runs(ts)
        pairs = sorted(((interval_iou(p[1:], t[1:]), i, j) for i, p in enumerate(pe) for j, t in enumerate(te)
                        if p[0] == t[0]), reverse=True)
        used_p, used_t, tp = set(), set(), 0
        for iou, i, j in pairs:
            if iou >= event_iou and i not in used_p and j not in used_t:
                used_p.add(i)
                used_t.add(j)
                tp += 1
        ev_f1.append(_f1(tp, len(pe), len(te)))
    return {"score": _mean(seg_f1), "segment_f1": _mean(seg_f1), "event_f1": _mean(ev_f1), "per_sample": seg_f1}


_NUM = r"-?\d+(?:\.\d+)?"


def parse_numbers(text: str, count: int) -> Optional[List[float]]:
    """The last group of exactly ``count`` numbers in ``text`` (bracketed groups first, then ``a-b`` intervals,
    then the last ``count`` numbers of the answer part); None when there are fewer numbers."""
    marks = list(_ANSWER.finditer(str(text)))
    body = str(text)[marks[-1].end():] if marks else str(text)
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


# one scorer per metric of the task registry (crab.tasks.METRICS): (predictions, targets, choices) -> result
SCORERS: Dict[str, Callable[[Sequence[str], Sequence[str], Optional[Sequence[str]]], dict]] = {
    "accuracy": lambda predictions, targets, choices: accuracy(predictions, targets, choices),
    "avvp_f1": lambda predictions, targets, choices: avvp_f1(predictions, targets),
    "iou": lambda predictions, targets, choices: iou_score(predictions, targets),
    "caption": lambda predictions, targets, choices: caption_f1(predictions, targets),
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


@torch.no_grad()
def generate_predictions(model, processor, samples, *, max_new_tokens: int = 64, prompts=None, num_frames: int = 10,
                         frame_size: int = 224, router_stats: Optional[RouterStats] = None,
                         progress: bool = True, desc: str = "evaluating",
                         inputs_cache: Optional[dict] = None) -> List[str]:
    """Greedy generation, one sample at a time (no padding-side subtleties); returns the decoded new text.
    ``inputs_cache``: a dict (task, index) -> encoded prompt, filled and reused (several runs on one test set)."""
    from .data import build_generation_inputs

    model.eval()
    device = next(p for p in model.parameters()).device
    out = []
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
                                             prompts=prompts)
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
        out.append(_decode(processor, ids[0, prompt_len:]))
    return out


def evaluate_samples(model, processor, samples, *, max_new_tokens: int = 64, prompts=None, num_frames: int = 10,
                     frame_size: int = 224, collect_router: bool = True, progress: bool = True,
                     run_name: str = "", inputs_cache: Optional[dict] = None) -> dict:
    """Generates on ``samples`` (a list of ``Sample``), scores every task and returns the results dict (the
    results-JSON content: ``{"run", "tasks": {task: {"metric", "score", "n", ...}}, "predictions", "router"}``)."""
    start = time.perf_counter()
    tasks = sorted({s.task for s in samples})
    stats = RouterStats(model, tasks).attach() if collect_router else None
    try:
        preds = generate_predictions(model, processor, samples, max_new_tokens=max_new_tokens, prompts=prompts,
                                     num_frames=num_frames, frame_size=frame_size, router_stats=stats,
                                     progress=progress, inputs_cache=inputs_cache)
    finally:
        if stats is not None:
            stats.detach()
    results = {"run": run_name, "tasks": {}, "predictions": [], "eval_seconds": None}
    for task in tasks:
        idx = [i for i, s in enumerate(samples) if s.task == task]
        spec = TASKS[task]
        choices = getattr(spec, "choices", None) or None
        scored = score_task(spec.metric, [preds[i] for i in idx], [samples[i].target for i in idx], choices)
        per_sample = scored.pop("per_sample")
        scored["n"] = len(idx)
        results["tasks"][task] = scored
        for i, ok in zip(idx, per_sample):
            results["predictions"].append({"task": task, "index": samples[i].index, "prediction": preds[i],
                                           "target": samples[i].target, "score": float(ok)})
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


def format_metrics(results: Mapping, title: Optional[str] = None) -> str:
    """A titled table, one line per task: metric, score with its 95% interval (``crab.report.score_interval``:
    Wilson for accuracy, bootstrap over samples otherwise), extras, n; a warning when every score is 0."""
    from .report import fmt_interval, per_sample_scores, score_interval

    tasks = results.get("tasks", {})
    run = results.get("run") or "(unnamed run)"
    lines = [title or f"per-task scores, run {run} (95% intervals: Wilson for accuracy, bootstrap over samples "
                      f"otherwise)"]
    scores = [r.get("score") for r in tasks.values()]
    if scores and all(isinstance(v, (int, float)) and v == 0 for v in scores):
        lines.append(f"  WARNING: every score is 0 ({len(scores)} tasks): nothing was learned (or no answer is "
                     f"extracted from the generations)")
    per_sample = per_sample_scores(results)
    for task, r in sorted(tasks.items()):
        extras = ", ".join(f"{k}={v:.3f}" for k, v in r.items()
                           if k not in ("score", "metric", "n", "correct", r["metric"]) and isinstance(v, float))
        ci, _ = score_interval(r, per_sample.get(task))
        lines.append(f"  {task:<10} {r['metric']:<9} {r['score']:.3f} {fmt_interval(ci)}  "
                     f"(n={r['n']}{', ' + extras if extras else ''})")
    return "\n".join(lines)
