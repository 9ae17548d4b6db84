"""I-LoRA layer benchmarks: ``python -m benchmarks.run --suite cpu|gpu [--quick] [--dry-run] [--out DIR]``.

Writes ``DIR/<device-slug>-<YYYY-MM-DD>[-quick].csv`` (one row per case x competitor, the fwd / bwd / fwd+bwd
measures as columns), ``<same stem>.md`` (per case: competitors side by side, ratio to the base layer against the
FLOP floor, speedup over the Crab+ loop), ``<stem>-time.png``, ``<stem>-ratio.png`` and ``<stem>-memory.png``
(with matplotlib, the ``[bench]`` extra; without it the plots are skipped and the run says so); prints a short table
and the files it wrote last.
A progress line per case goes to stderr. Every case x competitor is guarded: an error (OOM, a failing backend) becomes
an ``error`` row and the suite moves on; the CSV is rewritten after every case, so a killed run leaves its rows.

``--dry-run`` (meant for ``--suite gpu`` on a machine without CUDA): the GPU case list and all output writing, with
every case replaced by a tiny fp32 CPU stand-in (d_in, d_out / 64, N -> 1 + 2 log2 N) timed with the CPU timer;
the training step runs on a tiny config. Prints the GPU suite's estimated time.

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
from .runner import Budget, Terminated, error_text, log, run_cases
from .timers import CpuTimer, GpuTimer
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=("cpu", "gpu"), required=True)
    ap.add_argument("--quick", action="store_true", help="a handful of cases, fewer repetitions")
    ap.add_argument("--dry-run", action="store_true",
                    help="no CUDA needed: the suite's case list on tiny CPU stand-ins, all outputs written")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget of the layer cases; the rest is recorded as skipped "
                         "(default: 180 for gpu, none for cpu)")
    ap.add_argument("--train-budget-s", type=float, default=35.0, help="extra budget for the training-step benchmark")
    ap.add_argument("--no-train", action="store_true", help="skip the training-step benchmark (GPU suite)")
    ap.add_argument("--competitors", default=None, help="comma-separated subset of competitors")
    ap.add_argument("--only", default=None, help="regex: run only the cases whose label matches")
    ap.add_argument("--warmup-ms", type=float, default=10.0)
    ap.add_argument("--rep-ms", type=float, default=50.0)
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

    if gpu and not dry:
        device, dtype = torch.device("cuda"), torch.bfloat16
        dev_name = torch.cuda.get_device_name()
        timer = GpuTimer(args.warmup_ms, args.rep_ms)
    else:
        device, dtype = torch.device("cpu"), torch.float32
        dev_name = cpu_name()
        if dry:
            timer = CpuTimer(target_s=0.01, min_reps=2, max_reps=3)
        elif args.quick:
            timer = CpuTimer(target_s=0.2, min_reps=5, max_reps=20)
        else:
            timer = CpuTimer(target_s=0.6, min_reps=5, max_reps=100)
    budget_s = args.budget_s if args.budget_s is not None else (180.0 if gpu else None)
    if dry and args.budget_s is None:
        budget_s = None

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    slug = _slug(dev_name)
    if not gpu:
        slug = f"cpu-{slug}"
    stem_name = f"{slug}-{date}" + ("-quick" if args.quick else "")
    if dry:
        stem_name = f"dryrun-{args.suite}-{stem_name}"
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
    scale_note = ""
    if not gpu:
        scale_note = (f"CPU suite: fp32, model widths scaled down (d_in and d_out divided by {S.CPU_WIDTH_DIVISOR}, "
                      f"shape names end in /{S.CPU_WIDTH_DIVISOR}; ranks unchanged); the 'accept' shape is the "
                      f"full-size acceptance shape 1024->2816. torch threads: {torch.get_num_threads()}.")
    elif dry:
        scale_note = ("DRY RUN: every GPU case replaced by a tiny fp32 CPU stand-in (d_in, d_out / 64, "
                      "N -> 1 + 2 log2 N); the numbers mean nothing.")
    est_s, est_lines = S.estimate_gpu_seconds(S.gpu_cases(args.quick), C.GPU_COMPETITORS, args.warmup_ms, args.rep_ms)
    header = [f"# I-LoRA layer benchmarks: {args.suite} suite{' (quick)' if args.quick else ''}"
              f"{' (DRY RUN)' if dry else ''}", "",
              f"- device: {dev_name}; torch {torch.__version__}; triton {meta['triton']}; ilora_kernels {ik_version}; "
              f"dtype {meta['dtype']}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
              f"- timer: {timer.name}",
              "- backends: " + ", ".join(f"{k}: {'ok' if v is None else v}" for k, v in backends.items()),
              "- competitors: base = frozen F.linear (backward: dx only); crab-loop = the Crab+ module (Python loop "
              "over heads, plain autograd); peft = PEFT LoRA, K=1, same rank; others = ilora_kernels backends. "
              "Gradients via torch.autograd.grad w.r.t. x and every trainable tensor; dropout 0.",
              "- ratios: time / time(base) per measure; floor = (base + I-LoRA FLOPs) / base FLOPs (the SPEC target "
              "is within 10% of it); 'vs Crab loop' = time(crab-loop) / time (fwd+bwd); TFLOP/s counts the useful "
              "FLOPs of the competitor's math (peft: K=1 LoRA). saved = bytes autograd keeps for backward, each "
              "storage once, parameters excluded; peak = CUDA max allocated above the inputs during one fwd+bwd "
              "(after a warm-up call). At small N the GPU times are mostly host-side launch overhead (Python, "
              "autograd, one launch per op), not kernel time."]
    if scale_note:
        header.append(f"- {scale_note}")
    if device.type == "cpu":
        try:
            header.append("- load average at start (1/5/15 min): " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
                          + f" on {os.cpu_count()} CPUs: other processes make CPU timings noisy")
        except OSError:
            pass
    if gpu and budget_s is not None:
        header.append(f"- layer-case budget {budget_s:g} s (cases past it are recorded as skipped); "
                      f"estimated {est_s:.0f} s on an H100 before Triton compilation/autotuning")
    log(f"benchmarks: {args.suite} suite{' quick' if args.quick else ''}{' dry-run' if dry else ''}: "
        f"{len(cases)} cases x {len(competitors)} competitors on {dev_name} ({meta['dtype']}) -> {stem}.*")
    if gpu:
        log(f"estimated GPU suite time (H100, {S.H100_BF16_FLOPS / 1e12:.0f} TFLOP/s, do_bench warmup "
            f"{args.warmup_ms:g} ms / rep {args.rep_ms:g} ms, excluding Triton compilation): {est_s:.0f} s")

    rows: List[Dict] = []
    layer_budget = Budget(budget_s)

    def checkpoint(current: List[Dict]) -> None:
        write_csv(stem + ".csv", current)

    terminated = None
    try:
        run_cases(cases, competitors, device, dtype, timer, meta, layer_budget, checkpoint,
                  stand_in=S.dry_run_stand_in if dry else None, all_rows=rows)
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
        print(f"\nestimated GPU suite time on an H100: {est_s:.0f} s for {len(S.gpu_cases(args.quick))} cases x "
              f"{len(C.GPU_COMPETITORS)} competitors (before Triton compilation/autotuning); per case:")
        print("\n".join("  " + line for line in est_lines))
    print(f"\nwrote {stem}.csv, {stem}.md" + (" and " + ", ".join(pngs) if pngs else ""))
    for note in notes:
        if note.startswith(("plots skipped", "plots failed", "time plot skipped")):
            print(note)
    return 130 if terminated is not None else 0


if __name__ == "__main__":
    sys.exit(main())
