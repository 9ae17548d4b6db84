"""The transfer report (single-task runs against a multi-task run) and the router plot.

Transfer: for every task, ``delta = score(multi-task run) - score(single-task run of the same model)``; a task has
positive transfer when ``delta > threshold`` (default 0). The headline is the share of tasks with positive transfer
(Crab+: ~55% of tasks degrade under plain multi-task LoRA, ~88% transfer positively with I-LoRA).

Uncertainty: every score gets a 95% interval and so does every delta. Proportion metrics
(``crab.tasks.PROPORTION_METRICS``, i.e. accuracy): Wilson score interval from ``correct`` (or ``score x n``) and
``n``; delta by Newcombe's hybrid score method (from the two Wilson intervals; it ignores that both runs answer the
same test samples, which makes it conservative). Other metrics (F1, IoU): percentile bootstrap over the per-sample
values of the results JSON's ``predictions`` (paired by sample when both runs scored the same samples); without
per-sample values there is no interval and the table says so. A delta whose interval contains 0 is marked
"within noise". When every score is 0 the report says loudly that nothing was learned.

Inputs are results JSONs written by ``ilora-crab eval`` (``{"run", "tasks": {task: {"metric", "score", "n"}},
"predictions": [{"task", "index", "score"}]}``). A single-task result holds exactly one task and the multi-task
result several: a swapped pair of files is refused, naming the file.

Heads are numbered 1..K in every table and plot (as in the trainer's log keys ``router/<task>/head<k>``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .tasks import PROPORTION_METRICS

PathOrDict = Union[str, Path, Mapping]
Interval = Optional[Tuple[float, float]]

Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


# ---------------------------------------------------------------------------------------------------------------
# intervals

def wilson_interval(k: float, n: int, z: float = Z95) -> Interval:
    """Wilson score interval of the proportion k/n; None when n is 0."""
    if not n or n <= 0:
        return None
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_interval(k1: float, n1: int, k2: float, n2: int, z: float = Z95) -> Interval:
    """Newcombe's hybrid score interval (his method 10) of the difference p2 - p1 of two proportions."""
    w1, w2 = wilson_interval(k1, n1, z), wilson_interval(k2, n2, z)
    if w1 is None or w2 is None:
        return None
    p1, p2 = k1 / n1, k2 / n2
    d = p2 - p1
    return (d - math.sqrt((p2 - w2[0]) ** 2 + (w1[1] - p1) ** 2),
            d + math.sqrt((w2[1] - p2) ** 2 + (p1 - w1[0]) ** 2))


def _percentiles(stats, level: float = 0.95) -> Tuple[float, float]:
    import numpy as np

    a = (1 - level) / 2
    lo, hi = np.quantile(np.asarray(stats, dtype=np.float64), [a, 1 - a])
    return float(lo), float(hi)


def bootstrap_mean_interval(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                            seed: int = BOOTSTRAP_SEED) -> Interval:
    """Percentile bootstrap interval of the mean of per-sample values (seeded: the same input gives the same
    interval); None for no values."""
    import numpy as np

    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(resamples, v.size))
    return _percentiles(v[idx].mean(1))


def bootstrap_delta_interval(single: Sequence[float], multi: Sequence[float], paired: bool,
                             resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Interval:
    """Bootstrap interval of mean(multi) - mean(single): resampling samples jointly (``paired``: the two lists
    score the same samples in the same order) or each list on its own."""
    import numpy as np

    s, m = np.asarray(list(single), dtype=np.float64), np.asarray(list(multi), dtype=np.float64)
    if s.size == 0 or m.size == 0:
        return None
    rng = np.random.default_rng(seed)
    if paired:
        if s.size != m.size:
            raise ValueError("paired bootstrap: the two runs scored different numbers of samples")
        d = m - s
        return _percentiles(d[rng.integers(0, d.size, size=(resamples, d.size))].mean(1))
    ms = m[rng.integers(0, m.size, size=(resamples, m.size))].mean(1)
    ss = s[rng.integers(0, s.size, size=(resamples, s.size))].mean(1)
    return _percentiles(ms - ss)


def per_sample_scores(results: Mapping) -> Dict[str, Dict[int, float]]:
    """{task: {sample index: per-sample score}} from a results JSON's ``predictions`` (empty when absent)."""
    out: Dict[str, Dict[int, float]] = {}
    for row in results.get("predictions") or []:
        if isinstance(row, Mapping) and "task" in row and "index" in row and row.get("score") is not None:
            out.setdefault(str(row["task"]), {})[int(row["index"])] = float(row["score"])
    return out


def _count(result: Mapping, per_sample: Optional[Mapping[int, float]]) -> Optional[int]:
    n = result.get("n")
    if isinstance(n, (int, float)) and n > 0:
        return int(n)
    return len(per_sample) if per_sample else None


def _correct(result: Mapping, n: int, per_sample: Optional[Mapping[int, float]]) -> Optional[float]:
    if isinstance(result.get("correct"), (int, float)):
        return float(result["correct"])
    if per_sample and len(per_sample) == n:
        return float(sum(per_sample.values()))
    score = result.get("score")
    if isinstance(score, (int, float)) and not math.isnan(score):
        return float(score) * n
    return None


def score_interval(result: Mapping, per_sample: Optional[Mapping[int, float]] = None) -> Tuple[Interval, str]:
    """(95% interval, method) of one task result ``{"metric", "score", "n", ...}``; method ``wilson``,
    ``bootstrap`` or ``none (no per-sample values)``."""
    metric = result.get("metric", "")
    n = _count(result, per_sample)
    if metric in PROPORTION_METRICS:
        k = _correct(result, n, per_sample) if n else None
        if n and k is not None:
            return wilson_interval(k, n), "wilson"
        return None, "none (no n)"
    if per_sample:
        return bootstrap_mean_interval(list(per_sample.values())), "bootstrap"
    return None, "none (no per-sample values)"


def delta_interval(single: Mapping, multi: Mapping, single_ps: Optional[Mapping[int, float]],
                   multi_ps: Optional[Mapping[int, float]]) -> Tuple[Interval, str]:
    """(95% interval of multi - single, method): ``newcombe`` for proportions, ``paired bootstrap`` /
    ``bootstrap`` for the others, or ``none (...)``."""
    metric = multi.get("metric") or single.get("metric", "")
    if metric in PROPORTION_METRICS:
        n1, n2 = _count(single, single_ps), _count(multi, multi_ps)
        k1 = _correct(single, n1, single_ps) if n1 else None
        k2 = _correct(multi, n2, multi_ps) if n2 else None
        if None in (n1, n2, k1, k2):
            return None, "none (no n)"
        return newcombe_interval(k1, n1, k2, n2), "newcombe"
    if single_ps and multi_ps:
        if set(single_ps) == set(multi_ps):
            keys = sorted(single_ps)
            return bootstrap_delta_interval([single_ps[i] for i in keys], [multi_ps[i] for i in keys],
                                            paired=True), "paired bootstrap"
        return bootstrap_delta_interval(list(single_ps.values()), list(multi_ps.values()), paired=False), "bootstrap"
    return None, "none (no per-sample values)"


def fmt_interval(ci: Interval, signed: bool = False) -> str:
    if ci is None:
        return "[no interval]"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"[{f.format(ci[0])}, {f.format(ci[1])}]"


# ---------------------------------------------------------------------------------------------------------------
# results files

def _where(source: PathOrDict, results: Mapping) -> str:
    if isinstance(source, Mapping):
        return f"results dict (run {results.get('run')!r})" if results.get("run") else "results dict"
    return str(source)


def load_results(source: PathOrDict) -> dict:
    if isinstance(source, Mapping):
        results = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"results file {path} does not exist")
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"results file {path} is not valid JSON ({exc})") from None
        if not isinstance(results, Mapping):
            raise ValueError(f"results file {path} holds no per-task results (expected a 'tasks' mapping)")
    where = _where(source, results)
    tasks = results.get("tasks")
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError(f"{where} holds no per-task results (expected a 'tasks' mapping)")
    for task, r in tasks.items():
        if not isinstance(r, Mapping) or "score" not in r:
            raise ValueError(f"{where}: task {task!r} has no 'score'")
    results["_where"] = where
    return results


def merge_single(sources: Iterable[PathOrDict]) -> Tuple[Dict[str, dict], Dict[str, Dict[int, float]], List[str]]:
    """({task: result}, {task: per-sample scores}, run names) over the single-task results. Each must hold exactly
    one task (a file holding several is refused: it is a multi-task result); a task present twice is an error."""
    merged: Dict[str, dict] = {}
    per_sample: Dict[str, Dict[int, float]] = {}
    runs: List[str] = []
    for src in sources:
        results = load_results(src)
        tasks = results["tasks"]
        if len(tasks) != 1:
            raise ValueError(f"single-task result {results['_where']} holds {len(tasks)} tasks "
                             f"({', '.join(sorted(tasks))}): a single-task run's results hold one task. Is it the "
                             f"multi-task results file (--multi)?")
        (task, r), = tasks.items()
        if task in merged:
            raise ValueError(f"task {task!r} appears in more than one single-task result")
        merged[task] = dict(r)
        per_sample.update({t: v for t, v in per_sample_scores(results).items() if t == task})
        runs.append(str(results.get("run") or results["_where"]))
    return merged, per_sample, runs


def _is_zero(v) -> bool:
    return isinstance(v, (int, float)) and not math.isnan(v) and v == 0


def transfer_table(single: Iterable[PathOrDict], multi: PathOrDict, threshold: float = 0.0) -> dict:
    """``{"rows": [{task, metric, n_single, n_multi, single, single_ci, multi, multi_ci, delta, delta_ci, ci_method,
    within_noise, positive}], "positive", "compared", "share_positive", "outside_noise": {"positive", "negative"},
    "within_noise", "no_interval", "missing": [tasks of the multi run without a single-task score], "warnings",
    "multi_run", "single_runs"}``. Intervals are ``[lo, hi]`` (95%) or None; ``within_noise`` is None without
    an interval."""
    single_tasks, single_ps, single_runs = merge_single(single)
    multi_results = load_results(multi)
    multi_tasks = multi_results["tasks"]
    if len(multi_tasks) < 2:
        raise ValueError(f"multi-task result {multi_results['_where']} holds one task ({', '.join(multi_tasks)}): a "
                         f"multi-task run's results hold several. Is it a single-task results file (--single)?")
    multi_ps = per_sample_scores(multi_results)
    rows, missing = [], []
    for task in sorted(multi_tasks):
        if task not in single_tasks:
            missing.append(task)
            continue
        sr, mr = single_tasks[task], multi_tasks[task]
        s, m = sr["score"], mr["score"]
        if s is None or m is None or (isinstance(s, float) and math.isnan(s)) or \
                (isinstance(m, float) and math.isnan(m)):
            missing.append(task)
            continue
        delta = float(m) - float(s)
        s_ci, s_method = score_interval(sr, single_ps.get(task))
        m_ci, _ = score_interval(mr, multi_ps.get(task))
        d_ci, d_method = delta_interval(sr, mr, single_ps.get(task), multi_ps.get(task))
        within = None if d_ci is None else bool(d_ci[0] <= 0.0 <= d_ci[1])
        rows.append({"task": task, "metric": mr.get("metric", ""),
                     "n_single": _count(sr, single_ps.get(task)), "n_multi": _count(mr, multi_ps.get(task)),
                     "single": float(s), "single_ci": None if s_ci is None else list(s_ci),
                     "multi": float(m), "multi_ci": None if m_ci is None else list(m_ci),
                     "delta": delta, "delta_ci": None if d_ci is None else list(d_ci),
                     "ci_method": {"score": s_method, "delta": d_method},
                     "within_noise": within, "positive": delta > threshold})
    positive = sum(r["positive"] for r in rows)
    warnings = []
    if rows:
        all_single = all(_is_zero(r["single"]) for r in rows)
        all_multi = all(_is_zero(r["multi"]) for r in rows)
        if all_single and all_multi:
            warnings.append(f"WARNING: NOTHING WAS LEARNED: every score of every run is 0 ({len(rows)} tasks, single "
                            f"and multi). The model never gives the target answer (or no answer is extracted); the "
                            f"transfer counts below mean nothing.")
        elif all_multi:
            warnings.append("WARNING: every score of the multi-task run is 0: it learned nothing (or no answer is "
                            "extracted); its transfer is not evidence of anything.")
        elif all_single:
            warnings.append("WARNING: every single-task score is 0: those runs learned nothing (or no answer is "
                            "extracted); the transfer is measured against nothing.")
        if not (all_single and all_multi):
            zero = [r["task"] for r in rows if _is_zero(r["single"]) and _is_zero(r["multi"])]
            if zero:
                warnings.append(f"WARNING: {', '.join(zero)}: scored 0 in both runs: nothing learned for "
                                f"{'this task' if len(zero) == 1 else 'these tasks'} (or no answer is extracted); "
                                f"its transfer is not evidence.")
    return {"rows": rows, "positive": positive, "compared": len(rows),
            "share_positive": positive / len(rows) if rows else float("nan"), "threshold": threshold,
            "outside_noise": {"positive": sum(r["within_noise"] is False and r["delta"] > 0 for r in rows),
                              "negative": sum(r["within_noise"] is False and r["delta"] < 0 for r in rows)},
            "within_noise": sum(r["within_noise"] is True for r in rows),
            "no_interval": sum(r["within_noise"] is None for r in rows),
            "missing": missing, "warnings": warnings, "confidence": 0.95,
            "multi_run": str(multi_results.get("run") or multi_results["_where"]), "single_runs": single_runs}


def _n_text(r: Mapping) -> str:
    a, b = r.get("n_single"), r.get("n_multi")
    if a == b:
        return "?" if a is None else str(a)
    return f"{a if a is not None else '?'}/{b if b is not None else '?'}"


def format_transfer(table: Mapping, title: str = "transfer: multi-task vs single-task") -> str:
    """The titled transfer table: n, every score and delta with its 95% interval, within-noise marks, totals and
    warnings."""
    head = f"{title} (multi-task run {table.get('multi_run', '?')!r} minus the single-task runs; 95% intervals)"
    lines = [head]
    lines += [f"  {w}" for w in table.get("warnings", [])]
    lines.append(f"  {'task':<10} {'metric':<9} {'n':>5}  {'single [95% CI]':<22} {'multi [95% CI]':<22} "
                 f"{'delta [95% CI]':<25} transfer")
    for r in table["rows"]:
        kind = "positive" if r["positive"] else "negative" if r["delta"] < -table["threshold"] else "none"
        noise = {True: "within noise", False: "outside noise", None: "no interval"}[r["within_noise"]]
        lines.append(f"  {r['task']:<10} {r['metric']:<9} {_n_text(r):>5}  "
                     f"{r['single']:.3f} {fmt_interval(r['single_ci']):<16} "
                     f"{r['multi']:.3f} {fmt_interval(r['multi_ci']):<16} "
                     f"{r['delta']:+.3f} {fmt_interval(r['delta_ci'], signed=True):<18} {kind} ({noise})")
    if table["compared"]:
        out = table["outside_noise"]
        lines.append(f"  positive transfer on {table['positive']}/{table['compared']} tasks "
                     f"({100 * table['share_positive']:.0f}%); outside noise: {out['positive']} positive, "
                     f"{out['negative']} negative; within noise: {table['within_noise']}"
                     + (f"; without an interval: {table['no_interval']}" if table["no_interval"] else ""))
        methods = sorted({f"{r['metric']}: score {r['ci_method']['score']}, delta {r['ci_method']['delta']}"
                          for r in table["rows"]})
        lines.append("  intervals: " + "; ".join(methods))
    else:
        lines.append("  no task has both a single-task and a multi-task score")
    if table["missing"]:
        lines.append(f"  without a single-task score: {', '.join(table['missing'])}")
    return "\n".join(lines)


def table_json(table):
    """The table as written by ``report --output-json``: plain JSON values, NaN -> None, tuples -> lists."""
    if isinstance(table, Mapping):
        return {str(k): table_json(v) for k, v in table.items()}
    if isinstance(table, (list, tuple)):
        return [table_json(v) for v in table]
    if isinstance(table, float) and math.isnan(table):
        return None
    return table


# ---------------------------------------------------------------------------------------------------------------
# router plot

def _router_summary(source: PathOrDict) -> Tuple[dict, Optional[str]]:
    data = load_json(source)
    run = data.get("run") if isinstance(data.get("run"), str) else None
    if "router" in data and isinstance(data["router"], Mapping):  # a results JSON
        data = data["router"]
    if not isinstance(data, Mapping) or "tasks" not in data or "num_heads" not in data:
        raise ValueError("router plot: expected a router summary (keys num_heads, tasks, groups) or a results JSON "
                         "holding one under 'router'")
    if not data["tasks"]:
        raise ValueError("router plot: the router summary has no task with routed tokens")
    return data, run or (data.get("run") if isinstance(data.get("run"), str) else None)


def load_json(source: PathOrDict) -> dict:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return json.loads(path.read_text())


def head_label(h: int) -> str:
    """Display name of head index ``h`` (0-based in code): heads are numbered 1..K for people."""
    return f"head {h + 1}"


def router_figure(source: PathOrDict, title: Optional[str] = None, run: Optional[str] = None):
    """The matplotlib figure of ``plot_router``. Title names the run (``run``, else the results' ``"run"``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, found_run = _router_summary(source)
    run = run or found_run or "(unnamed run)"
    if title is None:
        title = f"I-LoRA router, run {run}: mean weight per head per task"
    k = int(summary["num_heads"])
    panels = [("all layers", {t: v["mean_weight"] for t, v in summary["tasks"].items()})]
    for group in ("llm", "audio", "vision"):
        if summary.get("groups", {}).get(group):
            panels.append((f"{group} layers", summary["groups"][group]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, (name, per_task) in zip(axes[0], panels):
        tasks = sorted(per_task)
        width = 0.8 / k
        for h in range(k):
            xs = [i + (h - (k - 1) / 2) * width for i in range(len(tasks))]
            ax.bar(xs, [per_task[t][h] for t in tasks], width=width, color=colors(h % 10), label=head_label(h))
        ax.axhline(1.0 / k, color="grey", lw=0.8, ls="--", label=f"1/K = 1/{k} (uniform routing)")
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels(tasks, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(name)
        ax.set_ylabel("mean router weight")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_router(source: PathOrDict, out_path, title: Optional[str] = None, run: Optional[str] = None) -> Path:
    """Crab Fig. 5 style: for each layer group (LLM, audio tower, vision tower) and for all layers together,
    grouped bars of the mean router weight of every head (heads 1..K), one group of bars per task, a dashed line
    at the uniform weight 1/K (in the legend); the title names the run. Writes a PNG."""
    import matplotlib.pyplot as plt

    fig = router_figure(source, title=title, run=run)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def format_router(source: PathOrDict, title: Optional[str] = None) -> str:
    """Titled table, per task: mean weight per head 1..K (all layers) and the mean routing entropy (max = ln K)."""
    summary, run = _router_summary(source)
    k = int(summary["num_heads"])
    if title is None:
        title = f"router, run {run or '(unnamed run)'}: mean weight per head (all layers), routing entropy"
    lines = [title, f"  {'task':<10} " + " ".join(f"{head_label(h):>7}" for h in range(k)) +
             f"  entropy (max ln {k} = {math.log(k):.3f})"]
    for task, v in sorted(summary["tasks"].items()):
        lines.append(f"  {task:<10} " + " ".join(f"{w:7.3f}" for w in v["mean_weight"]) + f"  {v['entropy']:.3f}")
    return "\n".join(lines)
