"""Crab+ transfer report: n and 95% intervals for every score and delta (Wilson / Newcombe for accuracy, bootstrap
over samples for the others), "within noise", the all-zero warning, refusal of swapped --single / --multi files,
titled tables, the router plot's title and 1/K legend entry, and one head numbering (1..K)."""

import json
import math

import pytest

from ilora_kernels.crab.report import (
    bootstrap_mean_interval,
    format_router,
    format_transfer,
    newcombe_interval,
    router_figure,
    score_interval,
    transfer_table,
    wilson_interval,
)


def _results(tmp_path, name, scores, metric="accuracy", n=8, per_sample=True):
    """A results JSON as ``ilora-crab eval`` writes it; per-sample scores: the first round(score*n) samples right."""
    res = {"run": name, "tasks": {}, "predictions": []}
    for task, score in scores.items():
        res["tasks"][task] = {"metric": metric, "score": score, "n": n}
        if per_sample:
            hits = round(score * n)
            res["predictions"] += [{"task": task, "index": i, "score": float(i < hits)} for i in range(n)]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(res))
    return path


# ------------------------------------------------------------------------------------------------------ intervals
def test_wilson_and_newcombe_match_published_values():
    lo, hi = wilson_interval(0, 8)
    assert lo == 0.0 and hi == pytest.approx(0.3244, abs=1e-4)        # 0/8: up to a third is still plausible
    lo, hi = wilson_interval(81, 263)                                  # Newcombe (1998), table I
    assert (lo, hi) == (pytest.approx(0.2553, abs=1e-4), pytest.approx(0.3662, abs=1e-4))
    # Newcombe (1998) example: 56/70 vs 48/80, difference 0.2000, method 10: 0.0524 to 0.3339 (here p2 - p1)
    lo, hi = newcombe_interval(48, 80, 56, 70)
    assert (lo, hi) == (pytest.approx(0.0524, abs=1e-4), pytest.approx(0.3339, abs=1e-4))
    assert wilson_interval(0, 0) is None


def test_score_interval_per_metric():
    ci, method = score_interval({"metric": "accuracy", "score": 0.5, "n": 8, "correct": 4})
    assert method == "wilson" and ci[0] < 0.5 < ci[1]
    per = {i: v for i, v in enumerate([0.2, 0.4, 0.6, 0.8])}
    ci, method = score_interval({"metric": "avvp_f1", "score": 0.5, "n": 4}, per)
    assert method == "bootstrap" and 0.2 <= ci[0] < 0.5 < ci[1] <= 0.8
    assert bootstrap_mean_interval(list(per.values())) == ci                     # seeded: reproducible
    ci, method = score_interval({"metric": "iou", "score": 0.5, "n": 4})
    assert ci is None and "no per-sample values" in method


# ------------------------------------------------------------------------------------------------------ transfer
def test_all_zero_scores_at_n8_warn_and_are_within_noise(tmp_path):
    singles = [_results(tmp_path, f"st_{t}", {t: 0.0}) for t in ("ks", "ave")]
    multi = _results(tmp_path, "mt", {"ks": 0.0, "ave": 0.0})
    table = transfer_table(singles, multi)
    for r in table["rows"]:
        assert r["n_single"] == r["n_multi"] == 8
        assert r["single_ci"] == [0.0, pytest.approx(0.3244, abs=1e-4)]
        assert r["delta_ci"] == [pytest.approx(-0.3244, abs=1e-4), pytest.approx(0.3244, abs=1e-4)]
        assert r["within_noise"] is True and r["ci_method"] == {"score": "wilson", "delta": "newcombe"}
    assert table["within_noise"] == 2 and table["outside_noise"] == {"positive": 0, "negative": 0}
    assert any("NOTHING WAS LEARNED" in w for w in table["warnings"])
    text = format_transfer(table)
    lines = text.splitlines()
    assert lines[0].startswith("transfer: multi-task vs single-task") and "'mt'" in lines[0]   # titled, names the run
    assert "NOTHING WAS LEARNED" in lines[1]                                               # loud, before the table
    assert "[0.000, 0.324]" in text and "[-0.324, +0.324]" in text and "within noise" in text
    assert "    8  " in text                                                                 # n per task


def test_delta_outside_noise_and_bootstrap_for_f1(tmp_path):
    singles = [_results(tmp_path, "st_ks", {"ks": 0.0}, n=40), _results(tmp_path, "st_ave", {"ave": 0.5}, n=40)]
    multi = _results(tmp_path, "mt", {"ks": 1.0, "ave": 0.55}, n=40)
    table = transfer_table(singles, multi)
    rows = {r["task"]: r for r in table["rows"]}
    assert rows["ks"]["within_noise"] is False and rows["ks"]["delta_ci"][0] > 0
    assert rows["ave"]["within_noise"] is True and rows["ave"]["positive"]            # positive, but within noise
    assert table["outside_noise"]["positive"] == 1 and not table["warnings"]
    assert "outside noise: 1 positive, 0 negative; within noise: 1" in format_transfer(table)
    # F1-like metrics: paired bootstrap over the per-sample values; without them the table says so
    f1_single = [_results(tmp_path, "st_avvp", {"avvp": 0.25}, metric="avvp_f1")]
    f1_multi = _results(tmp_path, "mt_f1", {"avvp": 0.75, "unav": 0.5}, metric="avvp_f1")
    row = transfer_table(f1_single, f1_multi)["rows"][0]
    assert row["ci_method"] == {"score": "bootstrap", "delta": "paired bootstrap"}
    assert row["delta_ci"][0] <= 0.5 <= row["delta_ci"][1]
    bare_single = [_results(tmp_path, "st_unav", {"unav": 0.25}, metric="iou", per_sample=False)]
    bare_multi = _results(tmp_path, "mt_bare", {"unav": 0.5, "avvp": 0.5}, metric="iou", per_sample=False)
    table = transfer_table(bare_single, bare_multi)
    assert table["rows"][0]["delta_ci"] is None and table["rows"][0]["within_noise"] is None
    text = format_transfer(table)
    assert "[no interval]" in text and "no per-sample values" in text and "without an interval: 1" in text


def test_swapped_single_and_multi_files_are_refused_by_name(tmp_path, capsys):
    from ilora_kernels.crab.cli import main

    st = [_results(tmp_path, f"st_{t}", {t: 0.5}) for t in ("ks", "ave")]
    mt = _results(tmp_path, "mt", {"ks": 0.5, "ave": 0.5})
    with pytest.raises(ValueError, match="holds 2 tasks") as ei:
        transfer_table([mt], st[0])
    assert str(mt) in str(ei.value) and "--multi" in str(ei.value)
    with pytest.raises(ValueError, match="holds one task") as ei:
        transfer_table(st, st[0])
    assert str(st[0]) in str(ei.value) and "--single" in str(ei.value)
    # the command line: one error line naming the file, exit status 2, no traceback
    assert main(["report", "--single", str(mt), "--multi", str(st[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ilora-crab report: error: single-task result") and str(mt) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_report_json_holds_n_and_intervals(tmp_path, capsys):
    from ilora_kernels.crab.cli import main

    st = [str(_results(tmp_path, f"st_{t}", {t: 0.0})) for t in ("ks", "ave")]
    mt = _results(tmp_path, "mt", {"ks": 0.0, "ave": 0.0})
    assert main(["report", "--single", *st, "--multi", str(mt), "--output-json", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert "NOTHING WAS LEARNED" in out and "positive transfer on 0/2 tasks (0%)" in out and "within noise: 2" in out
    data = json.loads((tmp_path / "t.json").read_text())
    assert all(r["n_single"] == 8 and len(r["delta_ci"]) == 2 and r["within_noise"] for r in data["rows"])
    assert data["warnings"] and data["confidence"] == 0.95


# ------------------------------------------------------------------------------------------------------ router
SUMMARY = {"num_heads": 3, "tasks": {"ks": {"mean_weight": [0.5, 0.3, 0.2], "entropy": 1.0, "tokens": 10},
                                     "ave": {"mean_weight": [0.2, 0.3, 0.5], "entropy": 0.9, "tokens": 10}},
           "groups": {"llm": {"ks": [0.5, 0.3, 0.2], "ave": [0.2, 0.3, 0.5]}}}


def test_router_plot_names_its_run_and_has_a_legend_entry_for_1_over_k():
    import matplotlib.pyplot as plt

    fig = router_figure({"run": "multi_k3", "router": SUMMARY})
    try:
        assert "multi_k3" in fig._suptitle.get_text()
        legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert legend == ["1/K = 1/3 (uniform routing)", "head 1", "head 2", "head 3"]      # heads 1..K
    finally:
        plt.close(fig)
    fig = router_figure(SUMMARY, run="given")
    assert "given" in fig._suptitle.get_text()
    plt.close(fig)


def test_router_table_is_titled_and_numbers_heads_1_to_k():
    text = format_router({"run": "multi_k3", "router": SUMMARY})
    lines = text.splitlines()
    assert lines[0].startswith("router, run multi_k3")
    assert "head 1" in lines[1] and "head 3" in lines[1] and "head 0" not in text
    assert f"max ln 3 = {math.log(3):.3f}" in lines[1]


def test_a_task_scored_zero_in_both_runs_is_named(tmp_path):
    singles = [_results(tmp_path, "st_ks", {"ks": 0.5}, n=40), _results(tmp_path, "st_ave", {"ave": 0.0}, n=40)]
    multi = _results(tmp_path, "mt", {"ks": 0.6, "ave": 0.0}, n=40)
    table = transfer_table(singles, multi)
    assert [w for w in table["warnings"] if "ave: scored 0 in both runs" in w]
    assert not [w for w in table["warnings"] if "NOTHING WAS LEARNED" in w]
    assert "ave: scored 0 in both runs" in format_transfer(table)
