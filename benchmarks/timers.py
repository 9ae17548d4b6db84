"""Timers of the benchmarks: each is called with a function and returns (median, p20, p80) in ms.

``CpuTimer``: ``time.perf_counter`` around each call. ``GpuTimer``: ``triton.testing.do_bench`` (L2 flushed before
every timed call), CUDA events as the fallback.
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


class GpuTimer:
    """triton.testing.do_bench (L2 flushed before every timed call, median and p20/p80); CUDA events as fallback."""

    def __init__(self, warmup_ms: float = 10, rep_ms: float = 50):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        try:
            from triton.testing import do_bench

            self._do_bench = do_bench
            self.name = f"triton.testing.do_bench(warmup={warmup_ms:g} ms, rep={rep_ms:g} ms), median, p20/p80"
        except Exception as exc:  # no triton: an equivalent event timer
            self._do_bench = None
            self.name = f"CUDA events with L2 flush (triton unavailable: {exc!r})"

    def __call__(self, fn: Callable) -> Tuple[float, float, float]:
        if self._do_bench is not None:
            med, p20, p80 = self._do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.5, 0.2, 0.8],
                                           return_mode="median")
            return med, p20, p80
        return self._events(fn)

    def _events(self, fn: Callable) -> Tuple[float, float, float]:
        flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
        fn()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(5):
            flush.zero_()
            fn()
        e.record()
        torch.cuda.synchronize()
        est = max(s.elapsed_time(e) / 5, 1e-3)
        for _ in range(max(1, int(self.warmup_ms / est))):
            fn()
        samples = []
        for _ in range(max(1, int(self.rep_ms / est))):
            flush.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            samples.append(s.elapsed_time(e))
        samples.sort()
        return statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8)
