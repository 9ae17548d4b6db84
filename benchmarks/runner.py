"""Runs benchmark cases: every case x competitor of a suite measured on the same inputs.

``run_cases`` (the CPU suite): one competitor at a time (``measure``: fwd, bwd and fwd+bwd times, bytes saved for
backward, CUDA peak memory). ``run_cases_interleaved`` (the GPU suite): fwd+bwd (or the decode forward) of every
competitor timed the same way, in interleaved rounds, as host wall time and CUDA-graph replay time.

An error (OOM, a failing backend) becomes an ``error`` row and the suite moves on; an error that leaves the CUDA
context unusable marks every later row as skipped; a ``Budget`` of wall-clock seconds skips the cases past it.
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import competitors as C
from . import timers as T

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


# ---------------------------------------------------------------------------------------------------------------
# the GPU suite: every competitor of a case timed the same way, interleaved


@dataclass
class Interleaved:
    """How ``run_cases_interleaved`` times: ``rounds`` rounds, each timing every competitor once (the order rotated
    per round) as host wall time of back-to-back eager calls and, where CUDA graphs can be used, as CUDA-graph replay
    time; a measure lasts about ``target_ms``; the minimum over rounds is reported, the p80 shows the spread."""

    rounds: int = 5
    target_ms: float = 20.0
    graphs: bool = True
    no_graph_note: str = ""  # why graphs are off (shown in every row's graph_note)

    def describe(self) -> str:
        graphs = "CUDA-graph replay (CUDA events) and " if self.graphs else ""
        return (f"interleaved: {self.rounds} rounds, each timing every competitor once (order rotated) as "
                f"{graphs}host wall time of back-to-back eager calls (synchronize before and after), about "
                f"{self.target_ms:g} ms per measure; min over rounds (p80 of the rounds for the spread)")


def _memory(runner: C.Runner, device: torch.device, decode: bool) -> Dict:
    """Bytes saved for backward (training) and CUDA peak allocated above what was live, for one call."""
    out: Dict = {}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    if decode:
        y = runner.infer()
        grads = None
    else:
        with C.count_saved_bytes(runner.params) as saved:
            y = runner.fwd()
        grads = runner.bwd(y)
        out["saved_bytes"] = saved[0]
    if cuda:
        torch.cuda.synchronize()
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - before
    del y, grads
    return out


def _row_base(meta: Dict, case: C.Case, name: str, dtype: torch.dtype) -> Dict:
    row = {**meta, "timing": "interleaved", "mode": case.mode, "shape": case.shape, "d_in": case.d_in,
           "d_out": case.d_out, "n": case.n, "r": case.r, "k": case.k, "dropout": case.dropout, "competitor": name}
    if case.decode:
        row["floor_ratio"] = C.decode_byte_floor(case)
    else:
        floors = C.floor_ratios(case)
        row.update(floor_fwd=floors["fwd"], floor_bwd=floors["bwd"], floor_ratio=floors["fwdbwd"],
                   saved_budget_bytes=C.saved_budget_bytes(case, dtype))
    return row


def _fill_interleaved_ratios(rows: Dict[str, Dict], case: C.Case) -> None:
    for measure in ("wall", "graph"):
        key = f"{measure}_ms"
        base = rows.get("base", {}).get(key)
        peft = rows.get("peft", {}).get(key)
        crab = rows.get("crab-loop", {}).get(key)
        for r in rows.values():
            t = r.get(key)
            if t in (None, ""):
                continue
            if base:
                r[f"ratio_{measure}"] = t / base
            if peft and r["competitor"] != "peft":
                r[f"vs_peft_{measure}"] = t / peft
            if crab and r["competitor"] != "crab-loop":
                r[f"vs_crab_{measure}"] = crab / t
    for r in rows.values():
        t = r.get("graph_ms") or r.get("wall_ms")
        if t and not case.decode:
            f, b = C.useful_flops(case, r["competitor"])
            r["tflops"] = (f + b) / (t * 1e-3) / 1e12


def run_cases_interleaved(cases: Sequence[C.Case], competitors: Sequence[str], device: torch.device,
                          dtype: torch.dtype, timing: Interleaved, meta: Dict, budget: Budget,
                          on_case: Callable[[List[Dict]], None],
                          stand_in: Optional[Callable[[C.Case], C.Case]] = None,
                          all_rows: Optional[List[Dict]] = None,
                          skipped: Optional[Dict[str, str]] = None) -> List[Dict]:
    """Per case: builds every competitor on the same inputs, warms each up (compilation, autotuning), records its
    memory, captures it into a CUDA graph (training cases: x -> y -> autograd.grad; decode cases: the no-grad
    forward), then times all of them in ``timing.rounds`` interleaved rounds. Errors become ``error`` rows (a failed
    capture only a ``graph_note``); the competitors in ``skipped`` (name -> reason) are not run, their rows say why;
    appends to ``all_rows`` (returned) after each case."""
    all_rows = [] if all_rows is None else all_rows
    skipped = skipped or {}
    sticky: Optional[str] = None
    cuda = device.type == "cuda"
    for i, true_case in enumerate(cases):
        case = stand_in(true_case) if stand_in else true_case
        t_case = time.monotonic()
        rows = {name: _row_base(meta, case, name, dtype) for name in competitors}
        live: Dict[str, C.Runner] = {}
        graphs: Dict[str, object] = {}
        skip = None
        if sticky is not None:
            skip = f"skipped: CUDA context unusable after an earlier error ({sticky})"
        elif budget.spent():
            skip = f"skipped: time budget of {budget.seconds:g} s spent"
        inp = None
        if skip is None:
            try:
                inp = C.make_inputs(case, device, dtype, seed=i)
            except Exception as exc:
                skip = f"inputs: {error_text(exc)}"
                if cuda:
                    torch.cuda.empty_cache()

        def fail(name: str, exc: BaseException) -> None:
            nonlocal sticky
            if isinstance(exc, Terminated):
                rows[name]["error"] = "terminated"
                raise exc
            rows[name]["error"] = (f"unavailable: {exc}" if isinstance(exc, C.Unavailable) else error_text(exc))
            live.pop(name, None)
            if any(s in str(exc) for s in _STICKY):
                sticky = rows[name]["error"]

        try:
            for name in competitors:
                if skip is not None:
                    rows[name]["error"] = skip
                    continue
                if sticky is not None:
                    rows[name]["error"] = f"skipped: CUDA context unusable after an earlier error ({sticky})"
                    continue
                if name in skipped:
                    rows[name]["error"] = f"skipped: {skipped[name]}"
                    continue
                try:
                    runner = C.build(name, inp, case)
                    rows[name]["note"] = runner.note
                    fn = runner.infer if case.decode else runner.fwdbwd
                    fn()
                    fn()  # compilation and autotuning happen in the first call
                    rows[name].update(_memory(runner, device, case.decode))
                    live[name] = runner
                except Exception as exc:  # Terminated is re-raised by fail
                    fail(name, exc)
            for name, runner in list(live.items()):
                fn = runner.infer if case.decode else runner.fwdbwd
                if not (cuda and timing.graphs):
                    rows[name]["graph_note"] = timing.no_graph_note or "no CUDA graphs on this device"
                    continue
                try:
                    graphs[name] = T.CapturedGraph(fn)
                except Terminated:
                    raise
                except Exception as exc:
                    rows[name]["graph_note"] = f"graph capture failed: {error_text(exc)}"
                    try:
                        torch.cuda.synchronize()
                    except Exception as exc2:
                        fail(name, exc2)
            reps: Dict[str, Tuple[int, int]] = {}
            for name, runner in list(live.items()):
                fn = runner.infer if case.decode else runner.fwdbwd
                try:
                    one = T.wall_ms_per_call(fn, 1, device)
                    g_one = graphs[name].ms_per_replay(1) if name in graphs else one
                    reps[name] = (T.reps_for(one, timing.target_ms), T.reps_for(g_one, timing.target_ms))
                except Exception as exc:
                    fail(name, exc)
            wall: Dict[str, List[float]] = {n: [] for n in live}
            graph: Dict[str, List[float]] = {n: [] for n in graphs}
            names = list(live)
            for rnd in range(timing.rounds):
                order = names[rnd % len(names):] + names[:rnd % len(names)] if names else []
                for name in order:
                    if name not in live:
                        continue
                    fn = live[name].infer if case.decode else live[name].fwdbwd
                    try:
                        if name in graphs:
                            graph[name].append(graphs[name].ms_per_replay(reps[name][1]))
                        wall[name].append(T.wall_ms_per_call(fn, reps[name][0], device))
                    except Exception as exc:
                        fail(name, exc)
            for name in live:
                for key, values in (("wall", wall.get(name)), ("graph", graph.get(name))):
                    if values:
                        vals = sorted(values)
                        rows[name][f"{key}_ms"] = vals[0]
                        rows[name][f"{key}_p80_ms"] = T._quantile(vals, 0.8)
                rows[name]["rounds"] = len(wall[name])
        finally:
            for g in graphs.values():
                try:
                    g.release()
                except Exception:
                    pass
            graphs.clear()
            live.clear()
            del inp
            gc.collect()
            if cuda and sticky is None:
                try:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                except Exception as exc:
                    sticky = error_text(exc)
            _fill_interleaved_ratios(rows, case)
            all_rows.extend(rows.values())
            on_case(all_rows)
        ok = [r for r in rows.values() if r.get("wall_ms") not in (None, "")]
        brief = " ".join(f"{r['competitor']}={r.get('graph_ms') or r['wall_ms']:.3g}" for r in ok)
        log(f"[{i + 1}/{len(cases)}] {case.label}: {time.monotonic() - t_case:.1f} s (total {budget.elapsed():.0f} s) "
            f"{'decode' if case.decode else 'fwd+bwd'} ms ({'graph' if cuda and timing.graphs else 'wall'}): "
            f"{brief or '-'}")
    return all_rows
