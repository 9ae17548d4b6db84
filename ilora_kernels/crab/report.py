"""The transfer report (single-task runs against a multi-task run) and the router plot.

Transfer: for every task, ``delta = score(multi-task run) - score(single-task run of the same model)``; a task has
positive transfer when ``delta > threshold`` (default 0). The headline is the share of tasks with positive transfer
(Crab+: ~55% of tasks degrade under plain multi-task LoRA, ~88% transfer positively with I-LoRA).

Inputs are results JSONs written by ``ilora-crab eval`` (``{"run", "tasks": {task: {"metric", "score", "n"}}}``).
Single-task results may come as one JSON per task or as one JSON holding several tasks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Iterable, Mapping, Union

PathOrDict = Union[str, Path, Mapping]


def load_results(source: PathOrDict) -> dict:
    if isinstance(source, Mapping):
        results = dict(source)
        where = "results dict"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"results file {path} does not exist")
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"results file {path} is not valid JSON ({exc})") from None
        where = str(path)
    tasks = results.get("tasks")
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError(f"{where} holds no per-task results (expected a 'tasks' mapping)")
    for task, r in tasks.items():
        if not isinstance(r, Mapping) or "score" not in r:
            raise ValueError(f"{where}: task {task!r} has no 'score'")
    return results


def merge_single(sources: Iterable[PathOrDict]) -> Dict[str, dict]:
    """{task: result} over all single-task results; a task present twice is an error."""
    merged: Dict[str, dict] = {}
    for src in sources:
        for task, r in load_results(src)["tasks"].items():
            if task in merged:
                raise ValueError(f"task {task!r} appears in more than one single-task result")
            merged[task] = dict(r)
    return merged


def transfer_table(single: Iterable[PathOrDict], multi: PathOrDict, threshold: float = 0.0) -> dict:
    """``{"rows": [{task, metric, single, multi, delta, positive}], "positive", "compared", "share_positive",
    "missing": [tasks of the multi run without a single-task score]}``."""
    single_tasks = merge_single(single)
    multi_tasks = load_results(multi)["tasks"]
    rows, missing = [], []
    for task in sorted(multi_tasks):
        if task not in single_tasks:
            missing.append(task)
            continue
        s, m = single_tasks[task]["score"], multi_tasks[task]["score"]
        if s is None or m is None or (isinstance(s, float) and math.isnan(s)) or \
                (isinstance(m, float) and math.isnan(m)):
            missing.append(task)
            continue
        delta = float(m) - float(s)
        rows.append({"task": task, "metric": multi_tasks[task].get("metric", ""), "single": float(s),
                     "multi": float(m), "delta": delta, "positive": delta > threshold})
    positive = sum(r["positive"] for r in rows)
    return {"rows": rows, "positive": positive, "compared": len(rows),
            "share_positive": positive / len(rows) if rows else float("nan"), "threshold": threshold,
            "missing": missing}


def format_transfer(table: Mapping, title: str = "transfer: multi-task vs single-task") -> str:
    lines = [title, f"  {'task':<10} {'metric':<9} {'single':>8} {'multi':>8} {'delta':>8}  transfer"]
    for r in table["rows"]:
        lines.append(f"  {r['task']:<10} {r['metric']:<9} {r['single']:8.3f} {r['multi']:8.3f} {r['delta']:+8.3f}  "
                     f"{'positive' if r['positive'] else 'negative' if r['delta'] < -table['threshold'] else 'none'}")
    if table["compared"]:
        lines.append(f"  positive transfer on {table['positive']}/{table['compared']} tasks "
                     f"({100 * table['share_positive']:.0f}%)")
    else:
        lines.append("  no task has both a single-task and a multi-task score")
    if table["missing"]:
        lines.append(f"  without a single-task score: {', '.join(table['missing'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# router plot

def _router_summary(source: PathOrDict) -> dict:
    data = load_json(source)
    if "router" in data and isinstance(data["router"], Mapping):  # a results JSON
        data = data["router"]
    if not isinstance(data, Mapping) or "tasks" not in data or "num_heads" not in data:
        raise ValueError("router plot: expected a router summary (keys num_heads, tasks, groups) or a results JSON "
                         "holding one under 'router'")
    if not data["tasks"]:
        raise ValueError("router plot: the router summary has no task with routed tokens")
    return data


def load_json(source: PathOrDict) -> dict:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return json.loads(path.read_text())


def plot_router(source: PathOrDict, out_path, title: str = "I-LoRA router: mean weight per head per task") -> Path:
    """Crab Fig. 5 style: for each layer group (LLM, audio tower, vision tower) and for all layers together,
    grouped bars of the mean router weight of every head, one group of bars per task. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = _router_summary(source)
    k = int(summary["num_heads"])
    panels = [("all layers", {t: v["mean_weight"] for t, v in summary["tasks"].items()})]
    for group in ("llm", "audio", "vision"):
        if summary.get("groups", {}).get(group):
            panels.append((f"{group} layers", summary["groups"][group]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, (name, per_task) in zip(axes[0], panels):
        tasks = sorted(per_task)
        width = 0.8 / k
        for h in range(k):
            xs = [i + (h - (k - 1) / 2) * width for i in range(len(tasks))]
            ax.bar(xs, [per_task[t][h] for t in tasks], width=width, color=colors(h % 10), label=f"head {h + 1}")
        ax.axhline(1.0 / k, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels(tasks, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(name)
        ax.set_ylabel("mean router weight")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def format_router(source: PathOrDict) -> str:
    """Per task: mean weight per head (all layers) and the mean routing entropy (max = ln K)."""
    summary = _router_summary(source)
    k = int(summary["num_heads"])
    lines = [f"  {'task':<10} " + " ".join(f"{'head ' + str(h + 1):>7}" for h in range(k)) +
             f"  entropy (max {math.log(k):.3f})"]
    for task, v in sorted(summary["tasks"].items()):
        lines.append(f"  {task:<10} " + " ".join(f"{w:7.3f}" for w in v["mean_weight"]) + f"  {v['entropy']:.3f}")
    return "\n".join(lines)
