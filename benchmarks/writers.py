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
    "suite", "device", "torch", "triton", "dtype", "shape", "d_in", "d_out", "n", "r", "k", "competitor",
    "fwd_ms", "fwd_p20_ms", "fwd_p80_ms", "bwd_ms", "bwd_p20_ms", "bwd_p80_ms",
    "fwdbwd_ms", "fwdbwd_p20_ms", "fwdbwd_p80_ms", "tflops",
    "ratio_fwd", "ratio_bwd", "ratio_to_base", "floor_fwd", "floor_bwd", "floor_ratio", "speedup_vs_crab",
    "saved_bytes", "saved_budget_bytes", "peak_mem_bytes", "tokens_per_s", "note", "error",
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
    return (r["shape"], r.get("d_in"), r.get("d_out"), r.get("r"), r.get("k"))


def _mb(v) -> str:
    return "" if v in (None, "") else f"{v / 2**20:.4g}"


def write_markdown(path: str, rows: Sequence[Dict], header: List[str], competitors: Sequence[str]) -> None:
    lines = list(header)
    layer_rows = [r for r in rows if not str(r["shape"]).startswith("train.")]
    train_rows = [r for r in rows if str(r["shape"]).startswith("train.")]
    cases: Dict[Tuple, List[Dict]] = {}
    for r in layer_rows:
        cases.setdefault(_group_key(r) + (r["n"],), []).append(r)
    for key, rs in cases.items():
        shape, d_in, d_out, rank, k, n = key
        fl = rs[0]
        lines += ["", f"### {shape} {d_in}->{d_out}, N={n}, r={rank}, K={k}", "",
                  f"FLOP floor (base + I-LoRA) / base: fwd {_fmt(fl.get('floor_fwd'))}, "
                  f"bwd {_fmt(fl.get('floor_bwd'))}, fwd+bwd **{_fmt(fl.get('floor_ratio'))}**", "",
                  "| competitor | fwd ms | bwd ms | fwd+bwd ms (p20-p80) | fwd+bwd / base | floor | vs Crab loop | "
                  "TFLOP/s | saved MiB | peak MiB | note / error |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rs:
            fb = r.get("fwdbwd_ms")
            sp = r.get("speedup_vs_crab")
            speedup = f"{sp:.2f}x" if sp not in (None, "") else ""
            spread = f" ({_fmt(r.get('fwdbwd_p20_ms'))}-{_fmt(r.get('fwdbwd_p80_ms'))})" if fb not in (None, "") else ""
            lines.append(
                f"| {r['competitor']} | {_fmt(r.get('fwd_ms'))} | {_fmt(r.get('bwd_ms'))} | {_fmt(fb)}{spread} | "
                f"{_fmt(r.get('ratio_to_base'))} | {_fmt(r.get('floor_ratio'))} | "
                f"{speedup} | "
                f"{_fmt(r.get('tflops'))} | {_mb(r.get('saved_bytes'))} | {_mb(r.get('peak_mem_bytes'))} | "
                f"{(r.get('error') or r.get('note') or '').replace('|', '/')} |")
        budget_b = fl.get("saved_budget_bytes")
        if budget_b:
            lines.append(f"\nSPEC memory target for the fused layer: saved <= x + h + g = {_mb(budget_b)} MiB.")
    if train_rows:
        lines += ["", "### Training step: 2 Qwen2 decoder layers, adapters on all seven projections", "",
                  "| variant | tokens | step ms (min-max) | tokens/s | peak MiB | note / error |",
                  "|---|---:|---:|---:|---:|---|"]
        for r in train_rows:
            lines.append(f"| {r['competitor']} | {_fmt(r.get('n'))} | {_fmt(r.get('fwdbwd_ms'))} "
                         f"({_fmt(r.get('fwdbwd_p20_ms'))}-{_fmt(r.get('fwdbwd_p80_ms'))}) | "
                         f"{_fmt(r.get('tokens_per_s'), '.0f')} | {_mb(r.get('peak_mem_bytes'))} | "
                         f"{(r.get('error') or r.get('note') or '').replace('|', '/')} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


PLOTS_SKIPPED_NO_MATPLOTLIB = ("plots skipped: matplotlib is not installed (pip install 'ilora-kernels[bench]', "
                               "from a checkout: pip install --no-build-isolation -e '.[bench]')")


def write_plots(stem: str, rows: Sequence[Dict], competitors: Sequence[str], title: str,
                written: Optional[List[str]] = None) -> List[str]:
    """time vs tokens (log-log, one line per competitor, one panel per shape/rank) and memory bars. Returns notes
    for the markdown (what was skipped and why); the paths of the PNGs actually written are appended to
    ``written``."""
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

    layer_rows = [r for r in rows if not str(r["shape"]).startswith("train.")
                  and r.get("fwdbwd_ms") not in (None, "")]
    groups: Dict[Tuple, List[Dict]] = {}
    for r in layer_rows:
        groups.setdefault(_group_key(r), []).append(r)
    lines_groups = {k: rs for k, rs in groups.items() if len({r["n"] for r in rs}) > 1}
    if not lines_groups:
        notes.append("time plot skipped: no shape was measured at more than one token count")
    if lines_groups:
        ncols = min(3, len(lines_groups))
        nrows = math.ceil(len(lines_groups) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
        for ax, (key, rs) in zip(axes.flat, lines_groups.items()):
            for comp in competitors:
                pts = sorted((r["n"], r["fwdbwd_ms"]) for r in rs if r["competitor"] == comp)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=comp)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{key[0]} {key[1]}->{key[2]} r={key[3]} K={key[4]}", fontsize=9)
            ax.set_xlabel("tokens N")
            ax.set_ylabel("fwd+bwd ms")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(lines_groups):]:
            ax.axis("off")
        fig.suptitle(title, fontsize=10)
        save(fig, "time", rect=(0, 0, 1, 0.97))
    # fwd+bwd time / base for every case, with the FLOP floor as a black tick
    cases: Dict[Tuple, Dict[str, Dict]] = {}
    for r in layer_rows:
        cases.setdefault(_group_key(r) + (r["n"],), {})[r["competitor"]] = r
    if cases:
        comps = [c for c in competitors if c != "base"]
        width = 0.8 / max(1, len(comps))
        fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(cases)), 4.4))
        for j, comp in enumerate(comps):
            xs = [i + j * width for i in range(len(cases))]
            vals = [by.get(comp, {}).get("ratio_to_base") or 0 for by in cases.values()]
            if any(vals):
                ax.bar(xs, vals, width=width, label=comp)
        for i, by in enumerate(cases.values()):
            fl = next(iter(by.values())).get("floor_ratio")
            if fl:
                ax.hlines(fl, i - width / 2, i + 0.8 - width / 2, colors="black", linewidth=1.5,
                          label="FLOP floor" if i == 0 else None)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels([f"{k[0]} N={k[5]}\nr={k[3]} K={k[4]}" for k in cases], fontsize=6, rotation=35,
                           ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("fwd+bwd time / base layer")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        save(fig, "ratio")
    # memory bars: the largest N of every shape/rank group
    mem_key = "peak_mem_bytes" if any(r.get("peak_mem_bytes") not in (None, "") for r in layer_rows) else "saved_bytes"
    picks = []
    for key, rs in groups.items():
        n_max = max(r["n"] for r in rs)
        picks.append((key, n_max, {r["competitor"]: r.get(mem_key) for r in rs if r["n"] == n_max}))
    if picks:
        fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(picks)), 4.4))
        width = 0.8 / max(1, len(competitors))
        for j, comp in enumerate(competitors):
            xs = [i + j * width for i in range(len(picks))]
            vals = [(p[2].get(comp) or 0) / 2**20 for p in picks]
            if any(vals):
                ax.bar(xs, vals, width=width, label=comp)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(picks))])
        ax.set_xticklabels([f"{p[0][0]}\nN={p[1]} r={p[0][3]} K={p[0][4]}" for p in picks], fontsize=6, rotation=30,
                           ha="right")
        ax.set_ylabel(("peak allocated above inputs" if mem_key == "peak_mem_bytes" else "saved for backward")
                      + " (MiB)")
        if any((v or 0) > 0 for p in picks for v in p[2].values()):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        save(fig, "memory")
    return notes


def short_table(rows: Sequence[Dict], competitors: Sequence[str]) -> str:
    comps = [c for c in competitors if any(r["competitor"] == c and r.get("fwdbwd_ms") not in (None, "")
                                           for r in rows)]
    head = f"{'case (fwd+bwd ms)':<46}" + "".join(f"{c:>14}" for c in comps) + f"{'floor':>7}  {'best ours / base':<22}"
    out = [head, "-" * len(head)]
    cases: Dict[Tuple, Dict[str, Dict]] = {}
    for r in rows:
        if str(r["shape"]).startswith("train."):
            continue
        cases.setdefault(_group_key(r) + (r["n"],), {})[r["competitor"]] = r
    for key, by in cases.items():
        label = f"{key[0]} {key[1]}->{key[2]} N={key[5]} r={key[3]} K={key[4]}"
        cells = "".join(f"{_fmt(by.get(c, {}).get('fwdbwd_ms')) or 'x':>14}" for c in comps)
        ours = [r for c, r in by.items() if c in C.OURS and r.get("ratio_to_base") not in (None, "")]
        best = min(ours, key=lambda r: r["ratio_to_base"]) if ours else None
        fl = next(iter(by.values())).get("floor_ratio")
        best_s = f"{best['ratio_to_base']:.2f} ({best['competitor']})" if best else "-"
        out.append(f"{label[:46]:<46}{cells}{_fmt(fl, '.2f'):>7}  {best_s:<22}")
    train = [r for r in rows if str(r["shape"]).startswith("train.")]
    for r in train:
        out.append(f"train {r['competitor']:<10} {r.get('note', '')[:60]:<60} "
                   f"{_fmt(r.get('tokens_per_s'), '.0f') or r.get('error', '')} tok/s")
    return "\n".join(out)
