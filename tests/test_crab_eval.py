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
    # target: speech 0-10 (10 segments), dog 3-5 (2 segments); prediction: speech 0-10, dog 3-4, car 8-9
    out = avvp_f1(["speech, 0-10; dog, 3-4; car, 8-9"], ["speech, 0-10; dog, 3-5"])
    # segments: pred 12, true 12, tp 11 -> F1 = 22/24
    assert out["segment_f1"] == pytest.approx(22 / 24)
    # events: speech matches (IoU 1), dog matches (IoU 0.5 >= 0.5), car is a false positive -> F1 = 4/5
    assert out["event_f1"] == pytest.approx(4 / 5)
    assert out["score"] == out["segment_f1"]
    # a shifted event below the IoU threshold does not match; empty vs empty scores 1
    out = avvp_f1(["dog, 0-2", ""], ["dog, 1-4", ""])
    assert out["per_sample"][0] == pytest.approx(2 * 1 / (2 + 3))
    assert out["event_f1"] == pytest.approx((0.0 + 1.0) / 2)


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
