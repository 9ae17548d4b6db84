"""Timers of the benchmarks.

``CpuTimer`` (the CPU suite's per-measure timer), called with a function, returns (median, p20, p80) in ms of
``time.perf_counter`` around each call.

The GPU suite's interleaved timing (``runner.run_cases_interleaved``) uses ``wall_ms_per_call`` (host wall time of
back-to-back eager calls) and ``CapturedGraph`` (CUDA-graph replay time), the same for every competitor.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Sequence, Tuple

import torch


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


class CpuTimer:
    """time.perf_counter around each call; the number of repetitions targets ``target_s`` of timed calls."""

    def __init__(self, target_s: float = 0.5, min_reps: int = 5, max_reps: int = 100):
        self.target_s, self.min_reps, self.max_reps = target_s, min_reps, max_reps
        self.name = f"time.perf_counter median of {min_reps}..{max_reps} reps (~{target_s:g} s per measure)"

    def __call__(self, fn: Callable) -> Tuple[float, float, float]:
        fn()  # warm-up
        t0 = time.perf_counter()
        fn()
        est = time.perf_counter() - t0
        reps = int(min(self.max_reps, max(self.min_reps, self.target_s / max(est, 1e-6))))
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        samples.sort()
        return statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8)


# ---------------------------------------------------------------------------------------------------------------
# the GPU suite's timers: every competitor timed the same way, host wall time (eager) and CUDA-graph replay


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms_per_call(fn: Callable, reps: int, device: torch.device) -> float:
    """Host wall time of ``reps`` back-to-back eager calls (one synchronize before and after), in ms per call:
    what an eager training loop pays, launch overhead included."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3 / reps


class CapturedGraph:
    """``fn`` captured once into a CUDA graph (after warm-up calls on a side stream, as torch's documentation does
    it); ``ms_per_replay(reps)`` times back-to-back replays with CUDA events: the GPU time without host overhead.
    Raises whatever the capture raises (e.g. a synchronizing op inside ``fn``)."""

    def __init__(self, fn: Callable, warmup: int = 2):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn()  # kept: the graph's outputs live in its private pool
        torch.cuda.synchronize()

    def ms_per_replay(self, reps: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.graph.replay()  # the first replay of a round may pay for uploading the graph
        start.record()
        for _ in range(reps):
            self.graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps

    def release(self) -> None:
        self.output = None
        self.graph.reset()


def reps_for(ms_per_call: float, target_ms: float, lo: int = 3, hi: int = 200) -> int:
    """Repetitions that make one timed measure last about ``target_ms``."""
    return int(min(hi, max(lo, math.ceil(target_ms / max(ms_per_call, 1e-3)))))
