"""Runs benchmark cases: every case x competitor of a suite measured on the same inputs (``run_cases``), one
competitor at a time (``measure``: fwd, bwd and fwd+bwd times, bytes saved for backward, CUDA peak memory).

An error (OOM, a failing backend) becomes an ``error`` row and the suite moves on; an error that leaves the CUDA
context unusable marks every later row as skipped; a ``Budget`` of wall-clock seconds skips the cases past it.
"""

from __future__ import annotations

import gc
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import competitors as C

MEASURES = ("fwd", "bwd", "fwdbwd")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# one case x competitor


_STICKY = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
           "CUDA error: an illegal", "cudaErrorLaunchFailure", "illegal instruction")


def error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:300]


def measure(case: C.Case, name: str, inp: C.Inputs, timer, device: torch.device) -> Dict:
    """Times fwd, bwd and fwd+bwd of one competitor and records its memory; raises on failure."""
    runner = C.build(name, inp, case)
    row: Dict = {"note": runner.note}
    cuda = device.type == "cuda"
    # a first fwd+bwd (compilation, autotuning: Triton's autotuner allocates a 256 MB flush buffer, which must not
    # count), then memory: bytes saved for backward, and on CUDA the peak allocated above what was live (the inputs)
    runner.fwdbwd()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with C.count_saved_bytes(runner.params) as saved:
        y = runner.fwd()
    grads = runner.bwd(y)
    if cuda:
        torch.cuda.synchronize()
        row["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - before
    row["saved_bytes"] = saved[0]
    del y, grads

    row["fwd"] = timer(runner.fwd)
    y_fwd = runner.fwd()
    row["bwd"] = timer(lambda: runner.bwd(y_fwd))
    y_fwd = None  # free it before the next measure
    row["fwdbwd"] = timer(runner.fwdbwd)
    return row


def _fill_ratios(rows: List[Dict], case: C.Case) -> None:
    base = next((r for r in rows if r["competitor"] == "base" and r.get("fwdbwd_ms") not in (None, "")), None)
    crab = next((r for r in rows if r["competitor"] == "crab-loop" and r.get("fwdbwd_ms") not in (None, "")), None)
    floors = C.floor_ratios(case)
    for r in rows:
        r["floor_fwd"], r["floor_bwd"], r["floor_ratio"] = floors["fwd"], floors["bwd"], floors["fwdbwd"]
        if r.get("fwdbwd_ms") in (None, ""):
            continue
        if base is not None:
            r["ratio_fwd"] = r["fwd_ms"] / base["fwd_ms"]
            r["ratio_bwd"] = r["bwd_ms"] / base["bwd_ms"]
            r["ratio_to_base"] = r["fwdbwd_ms"] / base["fwdbwd_ms"]
        if crab is not None:
            r["speedup_vs_crab"] = crab["fwdbwd_ms"] / r["fwdbwd_ms"]


# ---------------------------------------------------------------------------------------------------------------
# the suite


class Budget:
    def __init__(self, seconds: Optional[float]):
        self.start, self.seconds = time.monotonic(), seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def spent(self) -> bool:
        return self.seconds is not None and self.elapsed() > self.seconds


class Terminated(Exception):
    """Raised (by the SIGTERM handler of ``run.main``) to stop a suite and write what was measured."""


def run_cases(cases: Sequence[C.Case], competitors: Sequence[str], device: torch.device, dtype: torch.dtype,
              timer, meta: Dict, budget: Budget, on_case: Callable[[List[Dict]], None],
              stand_in: Optional[Callable[[C.Case], C.Case]] = None,
              all_rows: Optional[List[Dict]] = None) -> List[Dict]:
    """Measures every case x competitor, appending to ``all_rows`` (returned) after each case."""
    all_rows = [] if all_rows is None else all_rows
    sticky: Optional[str] = None
    for i, true_case in enumerate(cases):
        case = stand_in(true_case) if stand_in else true_case
        t_case = time.monotonic()
        rows: List[Dict] = []

        def row_for(name: str) -> Dict:
            return {**meta, "shape": case.shape, "d_in": case.d_in, "d_out": case.d_out, "n": case.n, "r": case.r,
                    "k": case.k, "competitor": name,
                    "saved_budget_bytes": C.saved_budget_bytes(case, dtype)}

        inp, inp_error = None, None
        if sticky is None and not budget.spent():
            try:
                inp = C.make_inputs(case, device, dtype, seed=i)
            except Exception as exc:
                inp_error = f"inputs: {error_text(exc)}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        for name in competitors:
            row = row_for(name)
            rows.append(row)
            if sticky is not None:
                row["error"] = f"skipped: CUDA context unusable after an earlier error ({sticky})"
                continue
            if budget.spent():
                row["error"] = f"skipped: time budget of {budget.seconds:g} s spent"
                continue
            if inp is None:
                row["error"] = inp_error or "skipped"
                continue
            try:
                got = measure(case, name, inp, timer, device)
                for m in MEASURES:
                    med, p20, p80 = got.pop(m)
                    row[f"{m}_ms"], row[f"{m}_p20_ms"], row[f"{m}_p80_ms"] = med, p20, p80
                row.update(got)
                f, b = C.useful_flops(case, name)
                row["tflops"] = (f + b) / (row["fwdbwd_ms"] * 1e-3) / 1e12
            except C.Unavailable as exc:
                row["error"] = f"unavailable: {exc}"
            except Terminated:
                row["error"] = "terminated"
                raise
            except Exception as exc:  # OOM, a failing backend, ...: record and move on
                row["error"] = error_text(exc)
                text = str(exc)
                if any(s in text for s in _STICKY):
                    sticky = row["error"]
            finally:
                if device.type == "cuda" and sticky is None:
                    try:
                        torch.cuda.synchronize()
                    except Exception as exc:
                        sticky = error_text(exc)
        del inp
        gc.collect()
        if device.type == "cuda" and sticky is None:
            torch.cuda.empty_cache()
        _fill_ratios(rows, case)
        all_rows.extend(rows)
        on_case(all_rows)
        ok = [r for r in rows if r.get("fwdbwd_ms") not in (None, "")]
        brief = " ".join(f"{r['competitor']}={r['fwdbwd_ms']:.3g}" for r in ok)
        log(f"[{i + 1}/{len(cases)}] {case.label}: {time.monotonic() - t_case:.1f} s "
            f"(total {budget.elapsed():.0f} s) fwd+bwd ms: {brief or '-'}")
    return all_rows
