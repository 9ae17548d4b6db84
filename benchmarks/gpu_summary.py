"""The summary ``scripts/gpu_check.sh`` prints last (and returns as summary.txt), from its stages' outputs.

    python -m benchmarks.gpu_summary --work DIR --csv RESULTS.csv --out summary.txt
                                     [--correctness-md F] [--returned "f1 f2 ..."] [--elapsed-s S] [--budget-s S]

Reads DIR/stages.tsv (name, status, seconds, budget, note per stage), ceilings.json, correctness-*.json (merged into
``--correctness-md``), pytest-*.log, sweep.json, profile.json and the suite's CSV; a missing piece is reported as
missing, never an error.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import re
import sys
from typing import List, Optional, Sequence

from . import gpu_common as G


def _stages(work: str) -> List[List[str]]:
    rows = []
    try:
        with open(os.path.join(work, "stages.tsv")) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                rows.append((parts + [""] * 5)[:5])
    except OSError:
        pass
    return rows


def _ceilings(work: str) -> List[str]:
    data = G.read_json(os.path.join(work, "ceilings.json"))
    if not data:
        return ["ceilings: not measured (see the ceilings stage)"]
    parts = []
    for r in data.get("rows", []):
        if "value" in r:
            parts.append(f"{r['name']}: {r['value']:.4g} {r['unit']}")
        else:
            parts.append(f"{r['name']}: {r.get('error', 'no value')}")
    return ["ceilings: " + "; ".join(parts)]


def _correctness(work: str, md_path: Optional[str]) -> List[str]:
    from .gpu_correctness import render, summary_rows

    rows, complete = [], []
    for path in sorted(glob.glob(os.path.join(work, "correctness-*.json"))):
        data = G.read_json(path) or {}
        rows += data.get("rows", [])
        complete.append(f"{os.path.basename(path)}: {'complete' if data.get('complete') else 'INCOMPLETE'}")
    if not rows:
        return ["correctness: no results (see the correctness stages)"]
    if md_path:
        G.write_text(md_path, render(rows, ["## Correctness against float64 (SPEC section 1)", "",
                                            "Cell: max |got - want| / max |want| (ratio to PyTorch's own error in "
                                            "that dtype). PASS: fp32 <= 1e-4, fp16 / bf16 <= 4 x PyTorch's error + "
                                            "2 ulp. " + "; ".join(complete), ""]))
    cells = summary_rows(rows)
    cols = list(dict.fromkeys(c for _, c, _ in cells))
    backends = list(dict.fromkeys(b for b, _, _ in cells))
    by = {(b, c): v for b, c, v in cells}
    table = [[b] + [by.get((b, c), "-")[:40] for c in cols] for b in backends]
    lines = ["correctness vs float64 (PASS + worst error / PyTorch's own error at that dtype; full table in the "
             "correctness file):"]
    lines += ["  " + line for line in G.text_table(["backend"] + cols, table)]
    failing = [f"  {b} {c}: {v}" for b, c, v in cells if not v.startswith("PASS")]
    if failing:
        lines += ["not PASS:"] + failing
    return lines


_PYTEST_TALLY = re.compile(r"(\d+ (passed|failed|skipped|error|errors|xfailed|xpassed|deselected)[, ]*)+( in [\d.]+s)?")


def _pytest(work: str) -> List[str]:
    lines = []
    for path in sorted(glob.glob(os.path.join(work, "pytest-*.log"))):
        tally = "no result line (killed by its time limit?)"
        try:
            with open(path, errors="replace") as f:
                text = f.read().splitlines()
        except OSError:
            text = []
        for line in reversed(text):
            m = _PYTEST_TALLY.search(line)
            if m and ("passed" in line or "failed" in line or "error" in line or "skipped" in line):
                tally = line.strip("= ").strip()
                break
        if tally.startswith("no result line"):  # killed: count the verbose per-test lines it printed
            counts = {w: sum(1 for line in text if f" {w}" in line and "::" in line)
                      for w in ("PASSED", "FAILED", "SKIPPED", "ERROR")}
            if any(counts.values()):
                tally += " -- so far: " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v)
        failed = [line.split(" - ")[0] for line in text if line.startswith(("FAILED", "ERROR"))][:8]
        lines.append(f"pytest {os.path.basename(path)[7:-4]}: {tally}")
        lines += [f"  {f}" for f in failed]
    return lines or ["pytest: not run"]


def _timings(csv_path: Optional[str]) -> List[str]:
    from . import competitors as C
    from .writers import short_table

    if not csv_path or not os.path.exists(csv_path):
        return ["timings: no results CSV (see the suite stage)"]
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return ["timings: the results CSV is empty"]
    comps = [c for c in C.GPU_COMPETITORS + ("cpu", "triton-fused", "triton-cublas")
             if any(r["competitor"] == c for r in rows)]
    lines = ["timings (fwd+bwd or decode; CUDA graph / eager wall ms, min of interleaved rounds; 'best ours / base' "
             "and 'vs PEFT' in graph time where measured):"]
    lines += short_table(rows, comps).splitlines()
    errors = sorted({f"{r['competitor']}: {r['error']}" for r in rows if r.get("error")
                     and not r["error"].startswith("skipped: time budget")})
    skipped = sum(1 for r in rows if (r.get("error") or "").startswith("skipped: time budget"))
    if errors:
        lines.append("timing errors: " + "; ".join(e[:160] for e in errors[:6]))
    if skipped:
        lines.append(f"{skipped} rows skipped: the suite's time budget was spent")
    graph_notes = sorted({f"{r['competitor']}: {r['graph_note']}" for r in rows
                          if (r.get("graph_note") or "").startswith("graph capture failed")})
    if graph_notes:
        lines.append("graph capture failures: " + "; ".join(n[:160] for n in graph_notes[:6]))
    return lines


def _sweep(work: str) -> List[str]:
    data = G.read_json(os.path.join(work, "sweep.json"))
    if not data:
        return ["sweep: no results (see the sweep stage)"]
    lines = ["tile sweep (fastest correct config per kernel and shape):" + (f" {data['error']}"
                                                                          if data.get("error") else "")]
    for b in data.get("best", []):
        if "error" in b:
            lines.append(f"  {b['kernel']} {b['shape']}: {b['error'][:120]}")
        else:
            spills = f", spills seen {b['spills']}" if b.get("spills") else ""
            lines.append(f"  {b['kernel']} {b['shape']}: {b['best']} {b['ms']:.4g} ms ({b['timed']}/{b['configs']} "
                         f"timed{spills})")
    return lines


def _profile(work: str) -> List[str]:
    data = G.read_json(os.path.join(work, "profile.json"))
    if not data:
        return ["profile: no results (see the profile stage)"]
    lines = ["profile (one fwd+bwd at gate_proj N=4096): busy = sum of kernel times"]
    for r in data.get("results", []):
        if "error" in r:
            lines.append(f"  {r['competitor']:<10} {r.get('case', '')[-8:]:<8} {r['error'][:140]}")
            continue
        top = r.get("top") or [{}]
        p = " p=0.1" if "p=0.1" in r.get("case", "") else ""
        lines.append(f"  {r['competitor'] + p:<16} busy {r['busy_us'] / 1e3:7.3f} ms, {r['launches']:>4} launches, "
                     f"wall {r['wall_ms']:7.3f} ms; top {top[0].get('us', 0):.0f} us {top[0].get('name', '')[:60]}")
    return lines


def build_summary(work: str, csv_path: Optional[str], correctness_md: Optional[str], returned: Sequence[str],
                  elapsed_s: Optional[float], budget_s: Optional[float], dry_run: bool) -> List[str]:
    machine = ""
    try:
        with open(os.path.join(work, "machine.txt")) as f:
            machine = " | ".join(line.strip() for line in f.read().splitlines()[:3] if line.strip())
    except OSError:
        pass
    lines = ["=" * 100, "GPU CHECK SUMMARY" + (" (DRY RUN on CPU stand-ins: plumbing only, numbers meaningless)"
                                               if dry_run else ""),
             machine,
             f"total {elapsed_s:.0f} s of a {budget_s:.0f} s budget" if elapsed_s is not None and budget_s else "",
             ""]
    stages = _stages(work)
    if stages:
        lines += G.text_table(["stage", "status", "s", "budget s", "note"], stages)
    lines += [""] + _ceilings(work) + [""] + _correctness(work, correctness_md) + [""] + _pytest(work)
    lines += [""] + _timings(csv_path) + [""] + _sweep(work) + [""] + _profile(work)
    if returned:
        lines += ["", f"returned files ({len(returned)}): " + ", ".join(returned)]
    lines.append("=" * 100)
    return [line for line in lines if line is not None]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_summary", description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--csv", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--correctness-md", default=None)
    ap.add_argument("--returned", default="", help="space-separated names of the files returned")
    ap.add_argument("--elapsed-s", type=float, default=None)
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    lines = build_summary(args.work, args.csv, args.correctness_md, args.returned.split(), args.elapsed_s,
                          args.budget_s, args.dry_run)
    G.write_text(args.out, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
