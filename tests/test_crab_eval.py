"""Crab+ evaluation and reporting: answer extraction, metrics on hand-made predictions, the transfer report, the
router plot, config validation, the demo recipe file, and the CLI (help texts and a tiny train -> eval -> report
round trip on the demo layout)."""

import json
from pathlib import Path

import pytest

from ilora_kernels.crab.config import ConfigError, config_from_dict, load_config
from ilora_kernels.crab.evaluate import (
    SCORERS,
    accuracy,
    avvp_f1,
    box_iou,
    caption_f1,
    extract_answer,
    interval_iou,
    iou_score,
    parse_avvp,
    score_task,
)
from ilora_kernels.crab.report import format_transfer, plot_router, transfer_table
from ilora_kernels.crab.tasks import METRICS

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# answer extraction and metrics

def test_extract_answer_after_the_last_answer_marker():
    assert extract_answer("The tone is 220 Hz, so a drum. Answer: drum") == "drum"
    assert extract_answer("Answer: bell\nAnswer: Flute.\nmore text") == "Flute."
    assert extract_answer("reasoning ...\nanswer:  horn ") == "horn"


def test_extract_answer_falls_back_to_the_last_choice_mentioned():
    choices = ["first", "second"]
    assert extract_answer("The first video shows a square, so the second video matches", choices) == "second"
    assert extract_answer("Answer: the second one", choices) == "second"
    assert extract_answer("no idea at all", choices) == "no idea at all"
    # the longest choice wins where choices overlap at the same end
    assert extract_answer("it is a red square", ["square", "red square"]) == "red square"
    assert extract_answer("two lines\nlast line") == "last line"


def test_accuracy_on_hand_made_predictions():
    preds = ["... Answer: drum", "Answer: Bell.", "the flute plays", "Answer: horn"]
    targets = ["x. Answer: drum", "y. Answer: bell", "z. Answer: flute", "w. Answer: drum"]
    out = accuracy(preds, targets)
    assert out["score"] == pytest.approx(2 / 4)  # "the flute plays" has no marker: its last line is not "flute"
    out = accuracy(preds, targets, choices=["drum", "bell", "flute", "horn"])
    assert out["score"] == pytest.approx(3 / 4) and out["per_sample"] == [True, True, True, False]
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        accuracy(["a", "b"], ["a"])


def test_parse_avvp_format():
    events = parse_avvp("Reasoning first. Answer: speech, 0-10; Dog barking, 3 - 5s; garbage; cat, 4 to 6; x, 5-5")
    assert events == [("speech", 0.0, 10.0), ("dog barking", 3.0, 5.0), ("cat", 4.0, 6.0)]


def test_avvp_segment_and_event_f1():
    # target: speech 0-10, dog 3-5; prediction: speech 0-10, dog 3-4, car 8-9 (no modality: audible and visible)
    out = avvp_f1(["speech, 0-10; dog, 3-4; car, 8-9"], ["speech, 0-10; dog, 3-5"])
    # segments, F1 per class then averaged over classes: speech 1, dog 2/3, car 0 -> 5/9 (Type@AV)
    assert out["segment_f1"] == pytest.approx(5 / 9)
    # events: speech matches (IoU 1), dog matches (IoU 0.5 >= 0.5), car is a false positive -> (1 + 1 + 0) / 3
    assert out["event_f1"] == pytest.approx(2 / 3)
    assert out["score"] == out["segment_f1"]
    # a shifted event below the IoU threshold does not match; empty vs empty scores 1
    out = avvp_f1(["dog, 0-2", ""], ["dog, 1-4", ""])
    assert out["per_sample"][0] == pytest.approx(2 * 1 / (2 + 3))
    assert out["event_f1"] == pytest.approx((0.0 + 1.0) / 2)



# ---------------------------------------------------------------------------------------------------------------
# upstream (GeWu-Lab/Crab_Plus) answer formats: <answer> tags, length-cut generations, AVVP per modality,
# segmentation tasks scored from text with a note

def test_extract_answer_reads_answer_tags():
    from ilora_kernels.crab.evaluate import parse_answer

    # upstream's targets/answers: "<answer>X</answer>" (often with a trailing full stop) after the reasoning
    assert extract_answer("The man plays the saxophone. So the answer is <answer> saxophone </answer>.") == \
        "saxophone"
    assert extract_answer("<answer>happy</answer>.") == "happy"
    # the last complete pair wins; tags are case- and whitespace-tolerant
    assert extract_answer("<answer>drum</answer> no wait: < ANSWER >Bell</ Answer >") == "Bell"
    assert extract_answer("<answer>\nmulti\nline\n</answer>") == "multi\nline"
    assert extract_answer("reasoning <answer>second</answer>.", ["first", "second"]) == "second"
    assert extract_answer("<answer>the 2nd one</answer>", ["1st one", "2nd one"]) == "2nd one"
    # tags take precedence over an "Answer:" marker; the marker format still works without tags
    assert extract_answer("Answer: drum <answer>bell</answer>") == "bell"
    assert parse_answer("reasoning ... Answer: horn") == ("horn", False)
    # an unclosed <answer> at the end of a cut generation: the rest is the answer, reported as cut
    assert parse_answer("it is a <answer>guitar and pia") == ("guitar and pia", True)
    assert parse_answer("<answer>a</answer> then <answer>b c") == ("b c", True)
    assert parse_answer("<answer>a</answer> then more") == ("a", False)
    assert parse_answer("<answer></answer>") == ("", False)


def test_tagged_answers_score_in_accuracy_and_caption():
    preds = ["The person frowns. <answer>Sad</answer>.", "<answer>happy</answer>", "Answer: angry",
             "so <answer>neutral"]
    targets = ["<answer>sad</answer>.", "<answer>sad</answer>.", "<answer>angry</answer>.", "<answer>neutral</answer>."]
    out = accuracy(preds, targets)
    assert out["per_sample"] == [True, False, True, True] and out["score"] == pytest.approx(3 / 4)
    assert accuracy(["<answer>1</answer>."], ["<answer>1</answer>."])["score"] == 1.0   # a2v/v2a test layout
    assert caption_f1(["<answer>a red circle</answer>"], ["<answer>a red square</answer>"])["score"] == \
        pytest.approx(2 / 3)
    assert iou_score(["<answer>dog</answer> box [0, 0, 10, 10]"], ["[0,0,10,5]"])["score"] == pytest.approx(0.5)


def test_parse_avvp_accepts_upstream_layouts_with_modalities():
    from ilora_kernels.crab.evaluate import parse_avvp_events

    # Crab's prediction layout: modality tags, "label,(start end)"
    pred = ("The chainsaw is visible and running from the beginning (0 seconds) to the end (10 seconds). "
            "Therefore, visual and audio events are: <visual>Chainsaw,(0 10)</visual> and "
            "<audio>Chainsaw,(0 10)</audio>")
    assert parse_avvp_events(pred) == [("visual", "chainsaw", 0.0, 10.0), ("audio", "chainsaw", 0.0, 10.0)]
    # Crab's label layout: "Audio: label, [s,e]  Visual: label, [s,e],[s,e],..."
    label = "Audio: Chainsaw, [0,10]  Visual: Chainsaw, [0,1],[3,6],[9,10]"
    assert parse_avvp_events(label) == [("audio", "chainsaw", 0.0, 10.0), ("visual", "chainsaw", 0.0, 1.0),
                                        ("visual", "chainsaw", 3.0, 6.0), ("visual", "chainsaw", 9.0, 10.0)]
    # Crab v1 training tags, several events in one tag, labels with commas and underscores, <answer> wrapping
    text = ("<answer><audio_event>Speech,(0 3), Baby_cry_infant_cry,(2 5)</audio_event>"
            "<visual_event>Male speech, man speaking, [0,8]</visual_event></answer>")
    assert parse_avvp_events(text) == [("audio", "speech", 0.0, 3.0), ("audio", "baby cry infant cry", 2.0, 5.0),
                                       ("visual", "male speech, man speaking", 0.0, 8.0)]
    # our reader's layout and a bare event list (no modality: audible and visible)
    assert parse_avvp_events("audio: drum 0-1; visual: drum 0-1") == [("audio", "drum", 0.0, 1.0),
                                                                       ("visual", "drum", 0.0, 1.0)]
    assert parse_avvp_events("speech, 0-10") == [("both", "speech", 0.0, 10.0)]
    # an unclosed modality tag at the end of a cut generation keeps its events
    assert parse_avvp_events("<audio>Dog,(2 4)</audio><visual>Dog,(3 6)") == [("audio", "dog", 2.0, 4.0),
                                                                              ("visual", "dog", 3.0, 6.0)]


def test_avvp_per_modality_segment_and_event_level():
    pred = "Therefore: <visual>Chainsaw,(0 10)</visual> and <audio>Chainsaw,(0 10)</audio>"
    true = "Audio: Chainsaw, [0,10]  Visual: Chainsaw, [0,1],[3,6],[9,10]"
    out = avvp_f1([pred], [true])
    # segments: audio 10/10 -> 1; visual TP 5, FP 5 -> 2/3; audio-visual (a AND v) TP 5, FP 5 -> 2/3;
    # Event@AV pools audio and visual counts: TP 15, FP 5 -> 6/7; Type@AV = mean(a, v, av) = 7/9
    assert out["seg_audio"] == pytest.approx(1.0)
    assert out["seg_visual"] == pytest.approx(2 / 3) and out["seg_av"] == pytest.approx(2 / 3)
    assert out["seg_event_av"] == pytest.approx(6 / 7) and out["seg_type_av"] == pytest.approx(7 / 9)
    # events (IoU >= 0.5): audio 1 matched -> 1; visual one predicted 0-10 matches none of 0-1, 3-6, 9-10 -> 0;
    # Event@AV: TP 1, FP 1, FN 3 -> 1/3; Type@AV = 1/3
    assert out["evt_audio"] == pytest.approx(1.0) and out["evt_visual"] == 0.0 and out["evt_av"] == 0.0
    assert out["evt_event_av"] == pytest.approx(1 / 3) and out["evt_type_av"] == pytest.approx(1 / 3)
    # the headline is the segment-level Type@AV; segment_f1 / event_f1 are the two Type@AV numbers
    assert out["score"] == out["seg_type_av"] == out["segment_f1"] and out["event_f1"] == out["evt_type_av"]
    assert out["per_sample"] == [pytest.approx(7 / 9)]


def test_avvp_averages_over_classes_then_videos():
    # no modality given: the events count as audible and visible. Per class: speech 1, dog 2/3 (3-4 vs 3-5),
    # car 0 (false positive) -> 5/9 for audio, visual and audio-visual; events: speech 1, dog 1 (IoU 0.5), car 0
    out = avvp_f1(["speech, 0-10; dog, 3-4; car, 8-9", ""], ["speech, 0-10; dog, 3-5", ""])
    # the second video has no event in target and prediction: 1 everywhere (all true negatives)
    assert out["seg_audio"] == pytest.approx((5 / 9 + 1) / 2) and out["seg_type_av"] == pytest.approx((5 / 9 + 1) / 2)
    assert out["evt_visual"] == pytest.approx((2 / 3 + 1) / 2)
    assert out["unparsed_targets"] == 0 and "note" not in out
    # a target without any parsable event is counted and named in a note, not silently scored
    out = avvp_f1(["dog, 0-2"], ["Dog"])
    assert out["unparsed_targets"] == 1 and "no parsable event" in out["note"]
    assert score_task("avvp_f1", ["a, 0-2"], ["a, 0-2"])["evt_type_av"] == 1.0


def test_segmentation_tasks_are_scored_from_text_with_a_note():
    from ilora_kernels.crab.tasks import TASKS

    for task in ("s4", "ms3", "ref_avs"):
        assert TASKS[task].metric == "seg_text"
    # upstream's s4/ms3 test layout: the target names the sounding object only
    targets = ["The object making the sound in the video is dog."] * 2 + \
              ["The object making the sound in the video is man, guitar."]
    preds = ["The sounding object is <answer>dog</answer>, box [10,20,100,200], points [30,40],[50,60],[70,80].",
             "It is a cat [1,2,3,4].", "A guitar is playing [5,5,50,50]"]
    out = score_task("seg_text", preds, targets)
    assert out["per_sample"] == [1.0, 0.0, 0.5] and out["score"] == pytest.approx(0.5)
    assert out["basis"] == "object_name" and out["prompt_rate"] == pytest.approx(1.0)
    assert "text-only proxy" in out["note"] and "mask decoder" in out["note"]
    # a target that carries a box (train layout) is scored by box IoU, still as a proxy
    out = score_task("seg_text", ["[0,0,10,5] [3,3]", "no box"], ["box [0,0,10,10] points [1,1]", "[0,0,4,4]"])
    assert out["per_sample"] == pytest.approx([0.5, 0.0]) and out["basis"] == "box_iou"
    assert out["prompt_rate"] == pytest.approx(0.5)
    # ref_avs test layout: the target is the referring expression; "<answer>false</answer>" says absent
    out = score_task("seg_text", ["<answer>true</answer> The dog on the left is at [1,1,9,9].",
                                  "<answer>false</answer> the object is absent."],
                     ["the dog on the left", "the dog on the left"])
    assert out["per_sample"] == [1.0, 0.0] and out["said_absent"] == pytest.approx(0.5)
    assert score_task("seg_text", [], [])["n_scored"] == 0


def test_default_generation_length_is_upstreams():
    import inspect

    from ilora_kernels.crab import evaluate as ev

    assert ev.UPSTREAM_MAX_NEW_TOKENS == 512
    for fn in (ev.generate_predictions, ev.evaluate_samples):
        assert inspect.signature(fn).parameters["max_new_tokens"].default == 512


class _FakeTokenizer:
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        words = {5: "<answer>", 6: "drum", 7: "</answer>", 8: "so", 9: "dog, 0-10"}
        return " ".join(words[int(i)] for i in ids if int(i) in words)


class _FakeModel:
    """generate() appends a scripted continuation per prompt (the prompt's first token picks it), cut at
    max_new_tokens like transformers."""

    def __init__(self, scripts):
        import torch

        self.scripts = scripts
        self.calls = []
        self._p = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self._p])

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask=None, max_new_tokens=20, **kw):
        import torch

        self.calls.append(max_new_tokens)
        new = self.scripts[int(input_ids[0, 0])][:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype)], dim=1)


def _fake_eval(monkeypatch, scripts, samples, **kw):
    import torch

    from ilora_kernels.crab import data as crab_data
    from ilora_kernels.crab.evaluate import evaluate_samples

    def fake_inputs(sample, processor, **_):
        return {"input_ids": torch.tensor([[sample.index, 1, 1]]), "attention_mask": torch.ones(1, 3)}

    monkeypatch.setattr(crab_data, "build_generation_inputs", fake_inputs)
    model = _FakeModel(scripts)
    return model, evaluate_samples(model, _FakeTokenizer(), samples, collect_router=False, progress=False, **kw)


def test_generations_cut_by_the_length_limit_are_counted_per_task(monkeypatch):
    from ilora_kernels.crab.data import Sample
    from ilora_kernels.crab.evaluate import format_metrics, generate_predictions

    scripts = {0: [5, 6, 7, 2],            # "<answer> drum </answer>" + EOS: 4 tokens, ends with EOS
               1: [8, 5, 8, 6, 8, 8],      # never ends: cut at max_new_tokens, "<answer>" left open
               2: [5, 6, 7]}               # 3 tokens, no EOS: under a limit of 4, cut by a limit of 3
    samples = [Sample("ks", i, "<answer>drum</answer>", "") for i in range(3)]
    model, res = _fake_eval(monkeypatch, scripts, samples, max_new_tokens=4)
    ks = res["tasks"]["ks"]
    assert ks["cut_by_length"] == 1 and ks["score"] == pytest.approx(2 / 3)   # sample 1: "so <answer> so drum"
    assert ks["unclosed_answer"] == 1 and res["max_new_tokens"] == 4
    assert [p["cut_by_length"] for p in res["predictions"]] == [False, True, False]
    assert [p["answer_cut"] for p in res["predictions"]] == [False, True, False]
    text = format_metrics(res)
    assert "cut_by_length=1/3" in text and "max_new_tokens (4)" in text
    _, res = _fake_eval(monkeypatch, scripts, samples, max_new_tokens=3)
    assert res["tasks"]["ks"]["cut_by_length"] == 3
    # generate_predictions reports the flags on request and keeps its plain list otherwise
    texts, cut = generate_predictions(model, _FakeTokenizer(), samples, max_new_tokens=4, progress=False,
                                      return_cut=True)
    assert cut == [False, True, False] and texts[0] == "<answer> drum </answer>"
    assert generate_predictions(model, _FakeTokenizer(), samples[:1], max_new_tokens=4, progress=False) == \
        ["<answer> drum </answer>"]
    # the default generation length reaches model.generate
    model.calls.clear()
    generate_predictions(model, _FakeTokenizer(), samples[:1], progress=False)
    assert model.calls == [512]


def test_format_metrics_prints_the_segmentation_note(monkeypatch):
    from ilora_kernels.crab.data import Sample
    from ilora_kernels.crab.evaluate import format_metrics

    scripts = {0: [9, 2], 1: [5, 6, 7, 2]}
    samples = [Sample("avvp", 0, "speech, 0-10", ""), Sample("s4", 1, "The object making the sound is drum.", "")]
    _, res = _fake_eval(monkeypatch, scripts, samples)
    assert res["tasks"]["s4"]["score"] == 1.0 and "mask decoder" in res["tasks"]["s4"]["note"]
    assert res["tasks"]["avvp"]["score"] == 0.0 and res["tasks"]["avvp"]["cut_by_length"] == 0
    text = format_metrics(res)
    assert "note: text-only proxy" in text and "seg_type_av=" in text and "segment_f1=" not in text

def test_iou_for_boxes_and_intervals():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 5]) == pytest.approx(0.5)
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert interval_iou([2, 6], [2, 4]) == pytest.approx(0.5)
    out = iou_score(["Answer: [0, 0, 10, 10]", "the event spans 2-6 s", "no numbers"],
                    ["box [0,0,10,5]", "Answer: 2-4", "Answer: 1-3"])
    assert out["per_sample"] == pytest.approx([0.5, 0.5, 0.0])
    assert out["score"] == pytest.approx(1 / 3) and out["iou@0.5"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="neither a box"):
        iou_score(["x"], ["no numbers here"])


def test_score_task_dispatches_on_the_task_metric_names():
    from ilora_kernels.crab.tasks import TASKS

    for spec in TASKS.values():  # every metric name of the registry is understood, and reported as spelled there
        assert score_task(spec.metric, [], [])["metric"] == spec.metric
    assert set(SCORERS) == set(METRICS)
    assert score_task("avvp_f1", ["a, 0-2"], ["a, 0-2"])["event_f1"] == 1.0
    assert caption_f1(["a red circle"], ["Answer: a red square"])["score"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        score_task("bleu", ["a"], ["a"])


# ---------------------------------------------------------------------------------------------------------------
# transfer report and router plot

def _results(tmp_path, name, scores, metric="accuracy"):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"run": name, "tasks": {t: {"metric": metric, "score": s, "n": 10}
                                                       for t, s in scores.items()}}))
    return path


def test_transfer_table_and_positive_share(tmp_path):
    singles = [_results(tmp_path, "st_ks", {"ks": 0.50}), _results(tmp_path, "st_ave", {"ave": 0.40}),
               _results(tmp_path, "st_avqa", {"avqa": 0.70}), _results(tmp_path, "st_a2v", {"a2v": 0.60})]
    multi = _results(tmp_path, "mt", {"ks": 0.55, "ave": 0.40, "avqa": 0.65, "a2v": 0.90, "meld": 0.3})
    table = transfer_table(singles, multi)
    rows = {r["task"]: r for r in table["rows"]}
    assert rows["ks"]["delta"] == pytest.approx(0.05) and rows["ks"]["positive"]
    assert not rows["ave"]["positive"] and not rows["avqa"]["positive"] and rows["a2v"]["positive"]
    assert table["compared"] == 4 and table["positive"] == 2 and table["share_positive"] == pytest.approx(0.5)
    assert table["missing"] == ["meld"]
    text = format_transfer(table)
    assert "positive transfer on 2/4 tasks (50%)" in text and "meld" in text and "+0.300" in text
    assert rows["a2v"]["n_single"] == rows["a2v"]["n_multi"] == 10 and rows["a2v"]["delta_ci"] is not None
    # a threshold makes small gains count as no transfer
    assert transfer_table(singles, multi, threshold=0.1)["positive"] == 1


def test_transfer_table_errors(tmp_path):
    a = _results(tmp_path, "a", {"ks": 0.5})
    with pytest.raises(ValueError, match="more than one single-task result"):
        transfer_table([a, a], a)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tasks": {}}))
    with pytest.raises(ValueError, match="no per-task results"):
        transfer_table([a], bad)
    with pytest.raises(FileNotFoundError):
        transfer_table([tmp_path / "missing.json"], a)


def test_router_plot_writes_a_png(tmp_path):
    summary = {"num_heads": 3, "tasks": {"ks": {"mean_weight": [0.5, 0.3, 0.2], "entropy": 1.0, "tokens": 10},
                                         "ave": {"mean_weight": [0.2, 0.3, 0.5], "entropy": 0.9, "tokens": 10}},
               "groups": {"llm": {"ks": [0.5, 0.3, 0.2], "ave": [0.2, 0.3, 0.5]},
                          "audio": {"ks": [0.4, 0.4, 0.2]}}}
    out = plot_router({"router": summary}, tmp_path / "plots" / "router.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="router summary"):
        plot_router({"tasks": {}}, tmp_path / "x.png")


def test_router_stats_hook_matches_the_layer_router():
    import torch

    import ilora_kernels as ik
    from ilora_kernels.crab.evaluate import RouterStats

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    ik.apply_ilora(model, ik.ILoRAConfig(r=2, num_heads=3, alpha=4, dropout=0.0, target_modules=("0", "2")))
    stats = RouterStats(model, ["ks", "ave"]).attach()
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    stats.set_context(["ks", "ave"], mask)
    model(x)
    stats.enabled = False  # the reference call below must not count
    _, g = model[0](x, return_router_weights=True)
    summary = stats.summary()
    want_ks = g[0, :3].mean(0)
    assert summary["layers"]["0"]["ks"] == pytest.approx(want_ks.tolist(), abs=1e-6)
    assert summary["layers"]["0"]["ave"] == pytest.approx(g[1].mean(0).tolist(), abs=1e-6)
    assert summary["tasks"]["ks"]["tokens"] == 6  # 3 tokens x 2 layers
    stats.detach()


# ---------------------------------------------------------------------------------------------------------------
# config validation

def test_shipped_configs_load():
    plus = load_config(ROOT / "configs" / "crab_plus.yaml")
    assert (plus.ilora.r, plus.ilora.num_heads, plus.ilora.alpha, plus.ilora.dropout) == (128, 3, 256.0, 0.1)
    t = plus.training
    assert (t.learning_rate, t.lr_scheduler_type, t.warmup_ratio, t.weight_decay, t.max_grad_norm,
            t.num_train_epochs, t.seed, t.mixed_precision, t.gradient_checkpointing) == \
        (1e-4, "cosine", 0.03, 0.0, 1.0, 5.0, 42, "bf16", True)
    assert len(plus.data.tasks) == 19 and plus.model.name_or_path == "Qwen/Qwen2.5-Omni-7B"


def test_demo_config_file_matches_the_built_in_demo_recipe():
    from ilora_kernels.crab.demo import DEMO_CONFIG

    from_file = load_config(ROOT / "configs" / "demo_cpu.yaml").to_dict()
    built_in = config_from_dict(DEMO_CONFIG).to_dict()
    for section in ("model", "ilora", "data", "training", "eval"):
        assert from_file[section] == built_in[section], section


def test_accelerate_configs_parse():
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file

    for name, kind in (("zero2.yaml", "DEEPSPEED"), ("fsdp.yaml", "FSDP")):
        cfg = load_config_from_file(str(ROOT / "configs" / "accelerate" / name))
        assert str(cfg.distributed_type).endswith(kind)
    ds = json.loads((ROOT / "configs" / "accelerate" / "ds_zero2.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("data, match", [
    ({"trainig": {}}, "unknown section 'trainig'"),
    ({"training": {"learnig_rate": 1e-4}}, "unknown key training.learnig_rate"),
    ({"training": {"learning_rate": -1.0}}, "training.learning_rate must be > 0"),
    ({"training": {"learning_rate": "fast"}}, "training.learning_rate must be a number"),
    ({"training": {"warmup_ratio": 1.5}}, r"training.warmup_ratio must be in \[0, 1\)"),
    ({"training": {"max_steps": 0}}, "training.max_steps must be -1"),
    ({"training": {"mixed_precision": "fp8"}}, "training.mixed_precision must be one of"),
    ({"training": {"gradient_checkpointing": "yes"}}, "training.gradient_checkpointing must be true or false"),
    ({"training": {"per_device_train_batch_size": 1.5}}, "training.per_device_train_batch_size must be an integer"),
    ({"ilora": {"dropout": 1.0}}, r"ilora.dropout must be in \[0, 1\)"),
    ({"ilora": {"top_k": 4}}, "ilora.top_k must be null or in"),
    ({"ilora": {"backend": "gpu"}}, "ilora.backend must be one of"),
    ({"data": {"tasks": ["ks", "kinetics"]}}, r"data.tasks: unknown task key\(s\) \['kinetics'\]"),
    ({"data": {"tasks": []}}, "data.tasks must name at least one task"),
    ({"model": {"tiny_init_std": 0}}, "model.tiny_init_std must be > 0"),
    ({"eval": {"max_new_tokens": 0}}, "eval.max_new_tokens must be > 0"),
    ({"model": "tiny"}, "section 'model' must be a mapping"),
])
def test_config_validation_names_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_config_file_errors_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  learning_rate: 1e-4\n  seed: 7\n")  # YAML reads 1e-4 as a string: accepted
    cfg = load_config(p, {"training.seed": 3, "data.tasks": "ks, ave", "data.root": None})
    assert cfg.training.learning_rate == 1e-4 and cfg.training.seed == 3 and cfg.data.tasks == ["ks", "ave"]
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="override 'seed' must be 'section.key'"):
        load_config(None, {"seed": 1})


# ---------------------------------------------------------------------------------------------------------------
# the command line

def test_cli_help_documents_every_command(capsys):
    from ilora_kernels.crab.cli import main

    for cmd, options in (("train", ["--config", "--model", "--model-config", "--data-root", "--tasks", "--output-dir",
                                    "--resume", "--max-steps", "--prompts", "--skip-missing-media"]),
                         ("eval", ["--adapter", "--max-new-tokens", "--output", "--router-plot", "--split"]),
                         ("report", ["--single", "--multi", "--threshold", "--router", "--plot-out"]),
                         ("demo-data", ["--data-root", "--n-train", "--n-test"]),
                         ("demo", ["--output-dir", "--budget-minutes", "--no-lora-baseline", "--steps-per-task"])):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        for opt in options:
            assert opt in text, (cmd, opt)


def test_cli_report_and_config_error(tmp_path, capsys):
    from ilora_kernels.crab.cli import main

    st = [str(_results(tmp_path, f"st_{t}", {t: 0.5})) for t in ("ks", "ave")]
    mt = _results(tmp_path, "mt", {"ks": 0.75, "ave": 0.25})
    assert main(["report", "--single", *st, "--multi", str(mt), "--output-json", str(tmp_path / "t.json")]) == 0
    assert "positive transfer on 1/2 tasks (50%)" in capsys.readouterr().out
    assert json.loads((tmp_path / "t.json").read_text())["share_positive"] == 0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  lr: 1\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown key training.lr" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_train_eval_report_round_trip_on_the_demo_layout(tmp_path, capsys):
    """demo-data -> train (tiny, 4 steps) -> eval (adapter reloaded into a fresh model) -> report --router."""
    import torch

    from ilora_kernels.crab.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data, run = tmp_path / "data", tmp_path / "run"
        assert main(["demo-data", "--data-root", str(data), "--tasks", "ks,a2v", "--n-train", "4",
                     "--n-test", "2"]) == 0
        assert main(["train", "--config", str(ROOT / "configs" / "demo_cpu.yaml"), "--data-root", str(data),
                     "--tasks", "ks,a2v", "--output-dir", str(run), "--max-steps", "4", "--batch-size", "2",
                     "--logging-steps", "2", "--no-progress"]) == 0
        assert (run / "adapter_model.safetensors").is_file() and (run / "crab_config.yaml").is_file()
        res = tmp_path / "res.json"
        assert main(["eval", "--adapter", str(run), "--data-root", str(data), "--max-new-tokens", "4",
                     "--output", str(res), "--router-plot", str(tmp_path / "r.png"), "--no-progress"]) == 0
        results = json.loads(res.read_text())
        assert set(results["tasks"]) == {"ks", "a2v"} and all(r["n"] == 2 for r in results["tasks"].values())
        assert len(results["predictions"]) == 4 and set(results["router"]["tasks"]) == {"ks", "a2v"}
        assert (tmp_path / "r.png").is_file()
        assert main(["report", "--router", str(res), "--plot-out", str(tmp_path / "r2.png")]) == 0
        out = capsys.readouterr().out
        assert "router plot:" in out and (tmp_path / "r2.png").is_file()
    finally:
        torch.set_num_threads(threads)
