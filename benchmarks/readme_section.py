"""Regenerates the README "Performance" section from the committed results CSVs.

    python -m benchmarks.readme_section [--results benchmarks/results] [--readme README.md]

Replaces the text between ``<!-- performance:start -->`` and ``<!-- performance:end -->``.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import re
from typing import Dict, List

from .competitors import OURS

START, END = "<!-- performance:start -->", "<!-- performance:end -->"


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _fmt(v, spec=".3g"):
    return "" if v is None else format(v, spec)


def _header_line(first: Dict, path: str) -> str:
    date = re.search(r"(\d{4}-\d{2}-\d{2})", os.path.basename(path))
    return (f"**{first['device']}**, {first['dtype']}, torch {first['torch']}"
            + (f", triton {first['triton']}" if first.get("triton") else "")
            + f", {date.group(1) if date else ''} (`{os.path.relpath(path)}`; suite `{first['suite']}`)")


def _per_measure_section(layer: List[Dict], path: str) -> List[str]:
    lines = [_header_line(layer[0], path), "",
             "| layer (d_in->d_out) | N | r | K | base ms | Crab+ loop ms | PEFT LoRA ms | best of ours | ours / base "
             "| floor | vs Crab loop | saved MB (ours / Crab loop) |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    cases: Dict[tuple, Dict[str, dict]] = {}
    for r in layer:
        cases.setdefault((r["shape"], r["d_in"], r["d_out"], r["n"], r["r"], r["k"]), {})[r["competitor"]] = r
    for (shape, d_in, d_out, n, rank, k), by in cases.items():
        ours = [(c, r) for c, r in by.items() if c in OURS and _num(r.get("fwdbwd_ms")) is not None]
        if not ours or "base" not in by:
            continue
        name, best = min(ours, key=lambda cr: _num(cr[1]["fwdbwd_ms"]))
        crab = by.get("crab-loop", {})
        saved_ours, saved_crab = _num(best.get("saved_bytes")), _num(crab.get("saved_bytes"))
        saved = f"{_fmt(saved_ours and saved_ours / 1e6)} / {_fmt(saved_crab and saved_crab / 1e6)}" \
            if saved_ours is not None else ""
        speed = _num(best.get("speedup_vs_crab"))
        lines.append(
            f"| {shape} {d_in}->{d_out} | {n} | {rank} | {k} | {_fmt(_num(by['base'].get('fwdbwd_ms')))} "
            f"| {_fmt(_num(crab.get('fwdbwd_ms')))} | {_fmt(_num(by.get('peft', {}).get('fwdbwd_ms')))} "
            f"| {name} {_fmt(_num(best['fwdbwd_ms']))} ms | {_fmt(_num(best.get('ratio_to_base')), '.2f')} "
            f"| {_fmt(_num(best.get('floor_ratio')), '.2f')} | {_fmt(speed, '.2f')}x | {saved} |")
    return lines


def _pair(r: Dict) -> str:
    g, w = _num(r.get("graph_ms")), _num(r.get("wall_ms"))
    if g is None and w is None:
        return "error" if r.get("error") else ""
    return f"{_fmt(g) or '-'} / {_fmt(w) or '-'}"


def _interleaved_section(layer: List[Dict], path: str) -> List[str]:
    """GPU suite rows: every competitor as CUDA-graph / eager wall ms; our best backend (by graph time, else wall)
    against base, its floor and PEFT. Decode cases in a second table."""
    comps = [c for c in ("base", "peft", "crab-loop", "reference", "triton", "cuda", "cpu")
             if any(r["competitor"] == c for r in layer)]
    comps += sorted({r["competitor"] for r in layer} - set(comps))
    lines = [_header_line(layer[0], path), ""]
    cases: Dict[tuple, Dict[str, dict]] = {}
    for r in layer:
        key = (r.get("mode") or "train", r["shape"], r["d_in"], r["d_out"], r["n"], r["r"], r["k"],
               _num(r.get("dropout")) or 0.0)
        cases.setdefault(key, {})[r["competitor"]] = r
    for mode, title in (("train", "fwd+bwd"), ("decode", "decode (forward, no grad)")):
        mine = {k: by for k, by in cases.items() if k[0] == mode}
        if not mine:
            continue
        lines += [f"{title}, ms as CUDA graph / eager wall:", "",
                  "| layer (d_in->d_out) | N | r | K | p | " + " | ".join(comps)
                  + " | best of ours / base | floor | best of ours / PEFT | vs Crab loop |",
                  "|---|---:|---:|---:|---:|" + "---:|" * len(comps) + "---|---:|---:|---:|"]
        for (_, shape, d_in, d_out, n, rank, k, p), by in mine.items():
            measure = "graph" if any(_num(r.get("graph_ms")) for r in by.values()) else "wall"
            ours = [(c, r) for c, r in by.items() if c in OURS and _num(r.get(f"ratio_{measure}")) is not None]
            best = min(ours, key=lambda cr: _num(cr[1][f"ratio_{measure}"])) if ours else None
            floor = _num(next(iter(by.values())).get("floor_ratio"))
            best_s = (f"{best[0]} {_fmt(_num(best[1][f'ratio_{measure}']), '.2f')} ({measure})" if best else "-")
            vs_peft = _fmt(_num(best[1].get(f"vs_peft_{measure}")), ".2f") if best else ""
            vs_crab = _num(best[1].get(f"vs_crab_{measure}")) if best else None
            lines.append(f"| {shape} {d_in}->{d_out} | {n} | {rank} | {k} | {p:g} | "
                         + " | ".join(_pair(by.get(c, {})) for c in comps)
                         + f" | {best_s} | {_fmt(floor, '.2f')} | {vs_peft} | "
                         + (f"{vs_crab:.2f}x" if vs_crab is not None else "") + " |")
        lines.append("")
    errors = sorted({f"{r['competitor']}: {r['error']}" for r in layer
                     if r.get("error") and not r["error"].startswith("skipped")})
    if errors:
        lines += ["Errors: " + "; ".join(e.replace("|", "/") for e in errors), ""]
    return lines


def section_for(path: str) -> List[str]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    layer = [r for r in rows if not r["shape"].startswith("train.")]
    if not layer:
        return []
    if any(r.get("timing") == "interleaved" for r in layer):
        lines = _interleaved_section(layer, path)
    else:
        lines = _per_measure_section(layer, path)
    train = [r for r in rows if r["shape"].startswith("train.") and _num(r.get("tokens_per_s"))]
    if train:
        lines += ["", "Training step (" + train[0]["shape"] + "): " + "; ".join(
            f"{r['competitor']} {r.get('note', '')}: {_num(r['tokens_per_s']):,.0f} tokens/s"
            + (f", peak {_num(r['peak_mem_bytes']) / 1e9:.1f} GB" if _num(r.get("peak_mem_bytes")) else "")
            for r in train)]
    return lines + [""]


def render(results_dir: str) -> str:
    paths = sorted(p for p in glob.glob(os.path.join(results_dir, "*.csv"))
                   if not re.search(r"(-quick|dryrun-)", os.path.basename(p)))
    body = ["Forward + backward of one layer (x requires grad; the base weight is frozen, so the base layer's backward "
            "is dx only). `ours / base` is the time over the frozen base layer's; `floor` is (base + I-LoRA FLOPs) / "
            "base FLOPs, the SPEC target being within 10% of it (decode: the weight-byte ratio). GPU suites time "
            "every competitor the same way, as CUDA-graph replay and as eager host wall time; `ours / PEFT` below 1 "
            "means faster than PEFT's plain LoRA (K=1). `saved` = bytes autograd keeps for backward, parameters "
            "excluded. Generated by `python -m benchmarks.readme_section` from the CSVs in `benchmarks/results/` "
            "(full tables, spreads and plots there).", ""]
    for p in paths:
        body += section_for(p)
    return "\n".join(body).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=os.path.join("benchmarks", "results"))
    ap.add_argument("--readme", default="README.md")
    args = ap.parse_args(argv)
    text = open(args.readme).read()
    if START not in text or END not in text:
        raise SystemExit(f"{args.readme} lacks the markers {START} ... {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    open(args.readme, "w").write(head + START + "\n" + render(args.results) + END + tail)
    print(f"updated the performance section of {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
