"""I-LoRA layer benchmarks: ``python -m benchmarks.run --suite cpu|gpu [--quick] [--dry-run] [--out DIR]``.

Writes ``DIR/<device-slug>-<YYYY-MM-DD>[-quick].csv`` (one row per case x competitor), ``<same stem>.md`` (per case:
competitors side by side, ratio to the base layer against the floor, PEFT and the Crab+ loop), ``<stem>-time.png``,
``<stem>-ratio.png`` and ``<stem>-memory.png`` (with matplotlib, the ``[bench]`` extra; without it the plots are
skipped and the run says so); prints a short table and the files it wrote last.

The GPU suite times every competitor the same way (``runner.run_cases_interleaved``): fwd+bwd together (decode
cases: the no-grad forward), as CUDA-graph replay time and as host wall time of eager calls, in interleaved rounds,
min over rounds. The CPU suite times fwd, bwd and fwd+bwd separately per competitor (``runner.run_cases``).
A progress line per case goes to stderr. Every case x competitor is guarded: an error (OOM, a failing backend) becomes
an ``error`` row and the suite moves on; the CSV is rewritten after every case, so a killed run leaves its rows.

``--dry-run`` (meant for ``--suite gpu`` on a machine without CUDA): the GPU case list and all output writing, with
every case replaced by a tiny fp32 CPU stand-in (d_in, d_out / 64, training N -> 1 + 2 log2 N), the cpu backend in
place of cuda, triton under TRITON_INTERPRET=1 when that is set, no CUDA graphs; the training step runs on a tiny
config. Prints the GPU suite's estimated time.

This module is the command line; the jobs live beside it: ``suites.py`` (the case lists), ``competitors.py`` (what is
timed), ``timers.py``, ``runner.py`` (case x competitor), ``train_step.py`` and ``writers.py`` (CSV, markdown, plots).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import signal
import sys
from typing import Dict, List, Optional, Sequence

import torch

from . import competitors as C
from . import suites as S
from .runner import Budget, Interleaved, Terminated, error_text, log, run_cases, run_cases_interleaved
from .timers import CpuTimer
from .train_step import train_step_rows
from .writers import short_table, write_csv, write_markdown, write_plots

# ---------------------------------------------------------------------------------------------------------------
# environment


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "none"


def _on_sigterm(signum, frame):
    raise Terminated(f"signal {signum}")


# ---------------------------------------------------------------------------------------------------------------
# main


def result_stem(suite: str, dry: bool = False, quick: bool = False, date: Optional[str] = None) -> str:
    """``<device-slug>-<YYYY-MM-DD>[-quick]`` (``cpu-`` before the CPU suite's slug, ``dryrun-<suite>-`` before a dry
    run's): the file name stem of a run's outputs."""
    gpu = suite == "gpu"
    date = date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    if gpu and not dry:
        slug = _slug(torch.cuda.get_device_name())
    else:
        slug = _slug(cpu_name())
        if not gpu:
            slug = f"cpu-{slug}"
    stem = f"{slug}-{date}" + ("-quick" if quick else "")
    return f"dryrun-{suite}-{stem}" if dry else stem


def _header(args, dev_name: str, meta: Dict, timer_name: str, budget_s: Optional[float], est_s: float,
            ik_version: str, backends: Dict, substitutions: str) -> List[str]:
    gpu, dry = args.suite == "gpu", args.dry_run
    lines = [f"# I-LoRA layer benchmarks: {args.suite} suite{' (quick)' if args.quick else ''}"
             f"{' (DRY RUN)' if dry else ''}", "",
             f"- device: {dev_name}; torch {torch.__version__}; triton {meta['triton']}; ilora_kernels {ik_version}; "
             f"dtype {meta['dtype']}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- timer: {timer_name}",
             "- backends: " + ", ".join(f"{k}: {'ok' if v is None else v}" for k, v in backends.items()),
             "- competitors: base = frozen F.linear (backward: dx only); crab-loop = the Crab+ module (Python loop "
             "over heads, plain autograd); peft = PEFT LoRA, K=1, same rank; others = ilora_kernels backends. "
             "Gradients via torch.autograd.grad w.r.t. x and every trainable tensor. Dropout p (when shown) is "
             "applied by every competitor but base; decode = forward without autograd, dropout off."]
    if gpu:
        lines.append("- every competitor is timed the same way: fwd+bwd together (decode: the no-grad forward), "
                     "as CUDA-graph replay time (GPU time, no host overhead) and as host wall time of eager calls "
                     "(what an eager training loop pays, launch overhead included). ratio = time / time(base) in the "
                     "same measure; floor = (base + I-LoRA FLOPs) / base FLOPs for training (the SPEC target is "
                     "within 10% of it) and the weight-byte ratio (W0 + [W_r; A] + B_cat) / W0 for decode; vs PEFT = "
                     "time / time(peft) (< 1: faster than PEFT LoRA K=1); vs Crab loop = time(crab-loop) / time. "
                     "saved = bytes autograd keeps for backward, each storage once, parameters excluded; peak = CUDA "
                     "max allocated above the inputs during one call (after warm-up).")
    else:
        lines.append("- ratios: time / time(base) per measure; floor = (base + I-LoRA FLOPs) / base FLOPs (the SPEC "
                     "target is within 10% of it); 'vs Crab loop' = time(crab-loop) / time (fwd+bwd); TFLOP/s counts "
                     "the useful FLOPs of the competitor's math (peft: K=1 LoRA). saved = bytes autograd keeps for "
                     "backward, each storage once, parameters excluded.")
    if substitutions:
        lines.append(f"- {substitutions}")
    if not gpu:
        lines.append(f"- CPU suite: fp32, model widths scaled down (d_in and d_out divided by {S.CPU_WIDTH_DIVISOR}, "
                     f"shape names end in /{S.CPU_WIDTH_DIVISOR}; ranks unchanged); the 'accept' shape is the "
                     f"full-size acceptance shape 1024->2816. torch threads: {torch.get_num_threads()}.")
    elif dry:
        lines.append("- DRY RUN: every GPU case replaced by a tiny fp32 CPU stand-in (d_in, d_out / 64, training "
                     "N -> 1 + 2 log2 N); no CUDA graphs; the numbers mean nothing.")
    if not gpu or dry:
        try:
            lines.append("- load average at start (1/5/15 min): " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
                         + f" on {os.cpu_count()} CPUs: other processes make CPU timings noisy")
        except OSError:
            pass
    if gpu and budget_s is not None:
        lines.append(f"- layer-case budget {budget_s:g} s (cases past it are recorded as skipped); "
                     f"estimated {est_s:.0f} s on an H100 before Triton compilation/autotuning")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=("cpu", "gpu"), required=True)
    ap.add_argument("--quick", action="store_true", help="a handful of cases, fewer repetitions")
    ap.add_argument("--dry-run", action="store_true",
                    help="no CUDA needed: the suite's case list on tiny CPU stand-ins, all outputs written")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    ap.add_argument("--stem", default=None, help="file name stem of the outputs (default: <device>-<date>...)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget of the layer cases; the rest is recorded as skipped "
                         "(default: 180 for gpu, none for cpu)")
    ap.add_argument("--train-budget-s", type=float, default=35.0, help="extra budget for the training-step benchmark")
    ap.add_argument("--no-train", action="store_true", help="skip the training-step benchmark (GPU suite)")
    ap.add_argument("--competitors", default=None, help="comma-separated subset of competitors")
    ap.add_argument("--only", default=None, help="regex: run only the cases whose label matches")
    ap.add_argument("--skip", action="append", default=[], metavar="NAME=REASON",
                    help="GPU suite: keep competitor NAME's rows but do not run it; their error column says "
                         "'skipped: REASON' (repeatable; cuda means its cpu stand-in in a dry run)")
    ap.add_argument("--preamble", default=None, help="a markdown file whose text goes under the report's header")
    ap.add_argument("--rounds", type=int, default=None, help="GPU suite: interleaved rounds (default 5, dry run 2)")
    ap.add_argument("--target-ms", type=float, default=None,
                    help="GPU suite: length of one timed measure (default 20 ms, dry run 2 ms)")
    args = ap.parse_args(argv)

    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):
        pass

    gpu = args.suite == "gpu"
    dry = args.dry_run
    if gpu and not dry and not torch.cuda.is_available():
        log("error: --suite gpu needs a CUDA device (use --dry-run to exercise it without one)")
        return 2
    cases = S.gpu_cases(args.quick) if gpu else S.cpu_cases(args.quick)
    if args.only:
        cases = [c for c in cases if re.search(args.only, c.label)]
    competitors = list(C.GPU_COMPETITORS if gpu else C.CPU_COMPETITORS)
    if args.competitors:
        wanted = [c.strip() for c in args.competitors.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in C.BUILDERS]
        if unknown:
            ap.error(f"unknown competitors {unknown}; known: {sorted(C.BUILDERS)}")
        competitors = wanted
    skipped: Dict[str, str] = {}
    for item in args.skip:
        name, _, reason = item.partition("=")
        if name not in C.BUILDERS:
            ap.error(f"--skip: unknown competitor {name!r}; known: {sorted(C.BUILDERS)}")
        if not gpu:
            ap.error("--skip is an option of the GPU suite")
        skipped["cpu" if dry and name == "cuda" else name] = reason or "on request"
    substitutions = ""
    if gpu and dry:
        # CPU stand-ins: the C++ CPU kernels stand in for the CUDA ones, the Triton interpreter for Triton on a GPU
        competitors = ["cpu" if c == "cuda" else c for c in competitors]
        C.ALLOW_INTERPRETED_TRITON = os.environ.get("TRITON_INTERPRET", "") == "1"
        substitutions = ("dry-run substitutions: the cpu backend stands in for cuda; triton runs "
                         + ("under TRITON_INTERPRET=1" if C.ALLOW_INTERPRETED_TRITON
                            else "nowhere (set TRITON_INTERPRET=1 to run it under the interpreter)"))

    timing = None
    if gpu and not dry:
        device, dtype = torch.device("cuda"), torch.bfloat16
        dev_name = torch.cuda.get_device_name()
        timing = _interleaved_timing(args, dry=False)
        timer_name = timing.describe()
    elif gpu:
        device, dtype = torch.device("cpu"), torch.float32
        dev_name = cpu_name()
        timing = _interleaved_timing(args, dry=True)
        timer_name = timing.describe()
    else:
        device, dtype = torch.device("cpu"), torch.float32
        dev_name = cpu_name()
        if args.quick:
            timer = CpuTimer(target_s=0.2, min_reps=5, max_reps=20)
        else:
            timer = CpuTimer(target_s=0.6, min_reps=5, max_reps=100)
        timer_name = timer.name
    budget_s = args.budget_s if args.budget_s is not None else (180.0 if gpu and not dry else None)

    stem_name = args.stem or result_stem(args.suite, dry, args.quick)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, stem_name)
    ik_version = "?"
    try:
        import ilora_kernels as ik

        ik_version = ik.__version__
        backends = ik.available_backends()
    except Exception as exc:
        backends = {"error": error_text(exc)}

    meta = {"suite": args.suite + ("-dryrun" if dry else "") + ("-quick" if args.quick else ""), "device": dev_name,
            "torch": torch.__version__, "triton": triton_version(), "dtype": str(dtype).replace("torch.", "")}
    est_s, est_lines = 0.0, []
    if gpu:
        est_s, est_lines = S.estimate_gpu_seconds(cases, C.GPU_COMPETITORS, timing.rounds, timing.target_ms)
    header = _header(args, dev_name, meta, timer_name, budget_s, est_s, ik_version, backends, substitutions)
    if args.preamble:
        try:
            with open(args.preamble) as f:
                header += [""] + f.read().rstrip().splitlines()
        except OSError as exc:
            header.append(f"- preamble {args.preamble} unreadable: {exc}")
    log(f"benchmarks: {args.suite} suite{' quick' if args.quick else ''}{' dry-run' if dry else ''}: "
        f"{len(cases)} cases x {len(competitors)} competitors on {dev_name} ({meta['dtype']}) -> {stem}.*")
    if gpu:
        log(f"estimated GPU suite time (H100, {S.H100_BF16_FLOPS / 1e12:.0f} TFLOP/s, {timing.rounds} rounds of "
            f"{timing.target_ms:g} ms measures, excluding Triton compilation): {est_s:.0f} s")

    rows: List[Dict] = []
    layer_budget = Budget(budget_s)

    def checkpoint(current: List[Dict]) -> None:
        write_csv(stem + ".csv", current)

    terminated = None
    try:
        if gpu:
            run_cases_interleaved(cases, competitors, device, dtype, timing, meta, layer_budget, checkpoint,
                                  stand_in=S.dry_run_stand_in if dry else None, all_rows=rows, skipped=skipped)
        else:
            run_cases(cases, competitors, device, dtype, timer, meta, layer_budget, checkpoint, all_rows=rows)
        if gpu and not args.no_train and not args.quick:
            train_budget = Budget(args.train_budget_s if not dry else None)
            rows += train_step_rows(device, dtype, meta, train_budget, tiny=dry)
            checkpoint(rows)
    except (Terminated, KeyboardInterrupt) as exc:
        terminated = exc
        log(f"interrupted ({exc!r}): writing what was measured")
    finally:
        write_csv(stem + ".csv", rows)
        pngs: List[str] = []
        try:
            notes = write_plots(stem, rows, competitors, f"{args.suite}{' dry-run' if dry else ''}: {dev_name} "
                                f"({meta['dtype']})", written=pngs)
        except Exception as exc:
            notes = [f"plots failed: {error_text(exc)}"]
        write_markdown(stem + ".md", rows, header + [f"- {n}" for n in notes], competitors)

    print(short_table(rows, competitors))
    if gpu and dry:
        print(f"\nestimated GPU suite time on an H100: {est_s:.0f} s for {len(cases)} cases x "
              f"{len(C.GPU_COMPETITORS)} competitors (before Triton compilation/autotuning); per case:")
        print("\n".join("  " + line for line in est_lines))
    print(f"\nwrote {stem}.csv, {stem}.md" + (" and " + ", ".join(pngs) if pngs else ""))
    for note in notes:
        if note.startswith(("plots skipped", "plots failed", "time plot skipped")):
            print(note)
    return 130 if terminated is not None else 0


def _interleaved_timing(args, dry: bool) -> Interleaved:
    """The GPU suite's timing settings from the command line (CPU stand-ins: 2 short rounds, no graphs)."""
    rounds = args.rounds if args.rounds is not None else (2 if dry else 5)
    target = args.target_ms if args.target_ms is not None else (2.0 if dry else 20.0)
    if dry:
        return Interleaved(rounds=rounds, target_ms=target, graphs=False,
                           no_graph_note="graph capture skipped: no CUDA device (dry run on CPU stand-ins)")
    return Interleaved(rounds=rounds, target_ms=target, graphs=True)


if __name__ == "__main__":
    sys.exit(main())
