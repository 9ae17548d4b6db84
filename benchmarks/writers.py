"""The outputs of a benchmark run: the CSV (one row per case x competitor, ``COLUMNS``), the markdown report (per
case, competitors side by side), the three plots (time vs tokens, time / base against the FLOP floor, memory) and
the short table printed last. The CSV is written atomically, so a killed run leaves the rows measured so far.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

from . import competitors as C

COLUMNS = [
    "suite", "device", "torch", "triton", "dtype", "timing", "mode", "shape", "d_in", "d_out", "n", "r", "k",
    "dropout", "competitor",
    # interleaved timing (GPU suite): fwd+bwd (mode train) or the no-grad forward (mode decode), min over rounds
    "graph_ms", "graph_p80_ms", "wall_ms", "wall_p80_ms", "rounds", "ratio_graph", "ratio_wall",
    "vs_peft_graph", "vs_peft_wall", "vs_crab_graph", "vs_crab_wall",
    # per-measure timing (CPU suite): median and p20/p80 of each measure
    "fwd_ms", "fwd_p20_ms", "fwd_p80_ms", "bwd_ms", "bwd_p20_ms", "bwd_p80_ms",
    "fwdbwd_ms", "fwdbwd_p20_ms", "fwdbwd_p80_ms",
    "ratio_fwd", "ratio_bwd", "ratio_to_base", "speedup_vs_crab",
    "tflops", "floor_fwd", "floor_bwd", "floor_ratio",
    "saved_bytes", "saved_budget_bytes", "peak_mem_bytes", "tokens_per_s", "graph_note", "note", "error",
]


def _fmt(v, spec: str = ".3g") -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def write_csv(path: str, rows: Sequence[Dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c, "")) for c in COLUMNS})
    os.replace(tmp, path)


def _group_key(r: Dict) -> Tuple:
    return (r["shape"], r.get("d_in"), r.get("d_out"), r.get("r"), r.get("k"), r.get("mode") or "",
            _num(r.get("dropout")) or 0.0)


def _num(v) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def interleaved(rows: Sequence[Dict]) -> bool:
    """Whether rows come from the GPU suite's interleaved timing (graph / wall columns) rather than per-measure."""
    return any(r.get("timing") == "interleaved" for r in rows)


def time_keys(rows: Sequence[Dict]) -> Tuple[str, str, str]:
    """(time column, ratio column, label) the plots and short table use: CUDA-graph replay where measured, else host
    wall time (interleaved rows); fwd+bwd median (per-measure rows)."""
    if not interleaved(rows):
        return "fwdbwd_ms", "ratio_to_base", "fwd+bwd ms"
    if any(_num(r.get("graph_ms")) for r in rows):
        return "graph_ms", "ratio_graph", "CUDA-graph ms"
    return "wall_ms", "ratio_wall", "eager wall ms"


def case_title(key: Tuple) -> str:
    shape, d_in, d_out, rank, k, mode, p, n = key
    extra = (" decode" if mode == "decode" else "") + (f" p={p:g}" if p else "")
    return f"{shape} {d_in}->{d_out} N={n} r={rank} K={k}{extra}"


def _mb(v) -> str:
    return "" if v in (None, "") else f"{v / 2**20:.4g}"


def _note(r: Dict) -> str:
    text = r.get("error") or "; ".join(t for t in (r.get("note"), r.get("graph_note")) if t)
    return (text or "").replace("|", "/")


def _x(v) -> str:
    v = _num(v)
    return "" if v is None else f"{v:.2f}x"


def _interleaved_markdown(rows: Sequence[Dict]) -> List[str]:
    lines: List[str] = []
    cases: Dict[Tuple, List[Dict]] = {}
    for r in rows:
        cases.setdefault(_group_key(r) + (r["n"],), []).append(r)
    for key, rs in cases.items():
        decode = key[5] == "decode"
        fl = rs[0]
        if decode:
            lines += ["", f"### {case_title(key)} (forward, no grad)", "",
                      f"Weight-byte floor (W0 + [W_r; A] + B_cat) / W0: **{_fmt(fl.get('floor_ratio'))}**", "",
                      "| competitor | graph ms (p80) | eager wall ms (p80) | graph / base | wall / base | floor | "
                      "vs PEFT (graph) | peak MiB | note / error |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        else:
            lines += ["", f"### {case_title(key)} (fwd+bwd)", "",
                      f"FLOP floor (base + I-LoRA) / base: fwd {_fmt(fl.get('floor_fwd'))}, "
                      f"bwd {_fmt(fl.get('floor_bwd'))}, fwd+bwd **{_fmt(fl.get('floor_ratio'))}**", "",
                      "| competitor | graph ms (p80) | eager wall ms (p80) | graph / base | wall / base | floor | "
                      "vs PEFT (graph) | vs Crab loop (graph) | TFLOP/s | saved MiB | peak MiB | note / error |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rs:
            g = f"{_fmt(r.get('graph_ms'))} ({_fmt(r.get('graph_p80_ms'))})" if _num(r.get("graph_ms")) else ""
            w = f"{_fmt(r.get('wall_ms'))} ({_fmt(r.get('wall_p80_ms'))})" if _num(r.get("wall_ms")) else ""
            cells = [r["competitor"], g, w, _fmt(r.get("ratio_graph")), _fmt(r.get("ratio_wall")),
                     _fmt(r.get("floor_ratio")), _fmt(r.get("vs_peft_graph"))]
            if decode:
                cells += [_mb(r.get("peak_mem_bytes"))]
            else:
                cells += [_x(r.get("vs_crab_graph")), _fmt(r.get("tflops")), _mb(r.get("saved_bytes")),
                          _mb(r.get("peak_mem_bytes"))]
            lines.append("| " + " | ".join(cells + [_note(r)]) + " |")
        budget_b = fl.get("saved_budget_bytes")
        if budget_b and not decode:
            lines.append(f"\nSPEC memory target for the fused layer: saved <= x + h + g = {_mb(budget_b)} MiB.")
    return lines


def _per_measure_markdown(rows: Sequence[Dict]) -> List[str]:
    lines: List[str] = []
    cases: Dict[Tuple, List[Dict]] = {}
    for r in rows:
        cases.setdefault(_group_key(r) + (r["n"],), []).append(r)
    for key, rs in cases.items():
        fl = rs[0]
        lines += ["", f"### {case_title(key)}", "",
                  f"FLOP floor (base + I-LoRA) / base: fwd {_fmt(fl.get('floor_fwd'))}, "
                  f"bwd {_fmt(fl.get('floor_bwd'))}, fwd+bwd **{_fmt(fl.get('floor_ratio'))}**", "",
                  "| competitor | fwd ms | bwd ms | fwd+bwd ms (p20-p80) | fwd+bwd / base | floor | vs Crab loop | "
                  "TFLOP/s | saved MiB | peak MiB | note / error |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rs:
            fb = r.get("fwdbwd_ms")
            spread = f" ({_fmt(r.get('fwdbwd_p20_ms'))}-{_fmt(r.get('fwdbwd_p80_ms'))})" if fb not in (None, "") else ""
            lines.append(
                f"| {r['competitor']} | {_fmt(r.get('fwd_ms'))} | {_fmt(r.get('bwd_ms'))} | {_fmt(fb)}{spread} | "
                f"{_fmt(r.get('ratio_to_base'))} | {_fmt(r.get('floor_ratio'))} | {_x(r.get('speedup_vs_crab'))} | "
                f"{_fmt(r.get('tflops'))} | {_mb(r.get('saved_bytes'))} | {_mb(r.get('peak_mem_bytes'))} | "
                f"{_note(r)} |")
        budget_b = fl.get("saved_budget_bytes")
        if budget_b:
            lines.append(f"\nSPEC memory target for the fused layer: saved <= x + h + g = {_mb(budget_b)} MiB.")
    return lines


def write_markdown(path: str, rows: Sequence[Dict], header: List[str], competitors: Sequence[str]) -> None:
    lines = list(header)
    layer_rows = [r for r in rows if not str(r["shape"]).startswith("train.")]
    train_rows = [r for r in rows if str(r["shape"]).startswith("train.")]
    lines += (_interleaved_markdown if interleaved(layer_rows) else _per_measure_markdown)(layer_rows)
    if train_rows:
        lines += ["", "### Training step: 2 Qwen2 decoder layers, adapters on all seven projections", "",
                  "| variant | tokens | step ms (min-max) | tokens/s | peak MiB | note / error |",
                  "|---|---:|---:|---:|---:|---|"]
        for r in train_rows:
            lines.append(f"| {r['competitor']} | {_fmt(r.get('n'))} | {_fmt(r.get('fwdbwd_ms'))} "
                         f"({_fmt(r.get('fwdbwd_p20_ms'))}-{_fmt(r.get('fwdbwd_p80_ms'))}) | "
                         f"{_fmt(r.get('tokens_per_s'), '.0f')} | {_mb(r.get('peak_mem_bytes'))} | {_note(r)} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


PLOTS_SKIPPED_NO_MATPLOTLIB = ("plots skipped: matplotlib is not installed (pip install 'ilora-kernels[bench]', "
                               "from a checkout: pip install --no-build-isolation -e '.[bench]')")


def write_plots(stem: str, rows: Sequence[Dict], competitors: Sequence[str], title: str,
                written: Optional[List[str]] = None) -> List[str]:
    """time vs tokens (log-log, one line per competitor, one panel per shape/rank/mode), time / base against the
    floor for every case, and memory bars. GPU-suite rows are plotted in CUDA-graph time where measured (else eager
    wall time). Returns notes for the markdown (what was skipped and why); the paths of the PNGs actually written are
    appended to ``written``."""
    written = [] if written is None else written
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [PLOTS_SKIPPED_NO_MATPLOTLIB]
    except Exception as exc:
        return [f"plots skipped: matplotlib unusable ({exc!r})"]
    notes = []

    def save(fig, kind: str, rect=None) -> None:
        fig.tight_layout(**({} if rect is None else {"rect": rect}))
        fig.savefig(f"{stem}-{kind}.png", dpi=90)
        written.append(f"{stem}-{kind}.png")
        plt.close(fig)

    layer_all = [r for r in rows if not str(r["shape"]).startswith("train.")]
    time_key, ratio_key, time_label = time_keys(layer_all)
    layer_rows = [r for r in layer_all if _num(r.get(time_key)) is not None]
    groups: Dict[Tuple, List[Dict]] = {}
    for r in layer_rows:
        groups.setdefault(_group_key(r), []).append(r)

    def group_title(key: Tuple) -> str:
        extra = (" decode" if key[5] == "decode" else "") + (f" p={key[6]:g}" if key[6] else "")
        return f"{key[0]} {key[1]}->{key[2]} r={key[3]} K={key[4]}{extra}"

    lines_groups = {k: rs for k, rs in groups.items() if len({r["n"] for r in rs}) > 1}
    if not lines_groups:
        notes.append("time plot skipped: no shape was measured at more than one token count")
    if lines_groups:
        ncols = min(3, len(lines_groups))
        nrows = math.ceil(len(lines_groups) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
        for ax, (key, rs) in zip(axes.flat, lines_groups.items()):
            for comp in competitors:
                pts = sorted((r["n"], _num(r[time_key])) for r in rs if r["competitor"] == comp)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=comp)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(group_title(key), fontsize=9)
            ax.set_xlabel("tokens N")
            ax.set_ylabel(("decode " if key[5] == "decode" else "fwd+bwd ") + time_label
                          if interleaved(rs) else time_label)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(lines_groups):]:
            ax.axis("off")
        fig.suptitle(title, fontsize=10)
        save(fig, "time", rect=(0, 0, 1, 0.97))
    # time / base for every case, with the floor as a black tick
    cases: Dict[Tuple, Dict[str, Dict]] = {}
    for r in layer_rows:
        cases.setdefault(_group_key(r) + (r["n"],), {})[r["competitor"]] = r
    if cases:
        comps = [c for c in competitors if c != "base"]
        width = 0.8 / max(1, len(comps))
        fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(cases)), 4.4))
        for j, comp in enumerate(comps):
            xs = [i + j * width for i in range(len(cases))]
            vals = [_num(by.get(comp, {}).get(ratio_key)) or 0 for by in cases.values()]
            if any(vals):
                ax.bar(xs, vals, width=width, label=comp)
        for i, by in enumerate(cases.values()):
            fl = _num(next(iter(by.values())).get("floor_ratio"))
            if fl:
                ax.hlines(fl, i - width / 2, i + 0.8 - width / 2, colors="black", linewidth=1.5,
                          label="floor" if i == 0 else None)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels([f"{k[0]} N={k[7]}{' dec' if k[5] == 'decode' else ''}{f' p={k[6]:g}' if k[6] else ''}"
                            f"\nr={k[3]} K={k[4]}" for k in cases], fontsize=6, rotation=35, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel(f"time / base layer ({time_label})")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        save(fig, "ratio")
    # memory bars: the largest N of every training shape/rank group
    train_groups = {k: rs for k, rs in groups.items() if k[5] != "decode"}
    mem_key = "peak_mem_bytes" if any(r.get("peak_mem_bytes") not in (None, "") for r in layer_rows) else "saved_bytes"
    picks = []
    for key, rs in train_groups.items():
        n_max = max(r["n"] for r in rs)
        picks.append((key, n_max, {r["competitor"]: _num(r.get(mem_key)) for r in rs if r["n"] == n_max}))
    if picks:
        fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(picks)), 4.4))
        width = 0.8 / max(1, len(competitors))
        for j, comp in enumerate(competitors):
            xs = [i + j * width for i in range(len(picks))]
            vals = [(p[2].get(comp) or 0) / 2**20 for p in picks]
            if any(vals):
                ax.bar(xs, vals, width=width, label=comp)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(picks))])
        ax.set_xticklabels([f"{p[0][0]}{f' p={p[0][6]:g}' if p[0][6] else ''}\nN={p[1]} r={p[0][3]} K={p[0][4]}"
                            for p in picks], fontsize=6, rotation=30, ha="right")
        ax.set_ylabel(("peak allocated above inputs" if mem_key == "peak_mem_bytes" else "saved for backward")
                      + " (MiB)")
        if any((v or 0) > 0 for p in picks for v in p[2].values()):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        save(fig, "memory")
    return notes


def short_table(rows: Sequence[Dict], competitors: Sequence[str]) -> str:
    """One line per case: the time of every competitor that ran (CUDA-graph replay / eager wall ms for the GPU
    suite, fwd+bwd ms for the CPU suite), the floor, and our best time over base (and over PEFT). Takes the rows of
    a run or of its CSV (strings)."""
    layer = [r for r in rows if not str(r["shape"]).startswith("train.")]
    inter = interleaved(layer)
    main_key = "graph_ms" if inter and any(_num(r.get("graph_ms")) for r in layer) else \
        ("wall_ms" if inter else "fwdbwd_ms")
    ratio_key = {"graph_ms": "ratio_graph", "wall_ms": "ratio_wall", "fwdbwd_ms": "ratio_to_base"}[main_key]
    comps = [c for c in competitors if any(r["competitor"] == c and _num(r.get(main_key)) is not None for r in layer)]
    width = 15 if inter and main_key == "graph_ms" else 12
    label_w = 58
    unit = {"graph_ms": "ms: graph/wall", "wall_ms": "ms: eager wall", "fwdbwd_ms": "fwd+bwd ms"}[main_key]
    head = (f"{'case (' + unit + ')':<{label_w}}" + "".join(f"{c:>{width}}" for c in comps)
            + f"{'floor':>7}  {'best ours / base':<24}" + ("vs PEFT" if inter else ""))
    out = [head, "-" * len(head)]
    cases: Dict[Tuple, Dict[str, Dict]] = {}
    for r in layer:
        cases.setdefault(_group_key(r) + (r["n"],), {})[r["competitor"]] = r

    def cell(r: Dict) -> str:
        if main_key == "graph_ms":
            g, w = _num(r.get("graph_ms")), _num(r.get("wall_ms"))
            if g is None and w is None:
                return "x"
            return f"{_fmt(g) or '-'}/{_fmt(w) or '-'}"
        return _fmt(_num(r.get(main_key))) or "x"

    for key, by in cases.items():
        label = case_title(key)
        cells = "".join(f"{cell(by.get(c, {})):>{width}}" for c in comps)
        ours = [r for c, r in by.items() if c in C.OURS and _num(r.get(ratio_key)) is not None]
        best = min(ours, key=lambda r: _num(r[ratio_key])) if ours else None
        fl = _num(next(iter(by.values())).get("floor_ratio"))
        best_s = f"{_num(best[ratio_key]):.2f} ({best['competitor']})" if best else "-"
        vs_peft = ""
        if inter and best is not None:
            v = _num(best.get("vs_peft_graph" if main_key == "graph_ms" else "vs_peft_wall"))
            vs_peft = f"{v:.2f}" if v is not None else ""
        out.append(f"{label[:label_w]:<{label_w}}{cells}{_fmt(fl, '.2f'):>7}  {best_s:<24}{vs_peft}")
    train = [r for r in rows if str(r["shape"]).startswith("train.")]
    for r in train:
        out.append(f"train {r['competitor']:<10} {r.get('note', '')[:60]:<60} "
                   f"{_fmt(r.get('tokens_per_s'), '.0f') or r.get('error', '')} tok/s")
    return "\n".join(out)
