"""I-LoRA layer benchmarks: ``python -m benchmarks.run --suite cpu|gpu [--quick] [--dry-run] [--out DIR]``.

Writes ``DIR/<device-slug>-<YYYY-MM-DD>[-quick].csv`` (one row per case x competitor, the fwd / bwd / fwd+bwd
measures as columns), ``<same stem>.md`` (per case: competitors side by side, ratio to the base layer against the
FLOP floor, speedup over the Crab+ loop), ``<stem>-time.png``, ``<stem>-ratio.png`` and ``<stem>-memory.png``;
prints a short table last.
A progress line per case goes to stderr. Every case x competitor is guarded: an error (OOM, a failing backend) becomes
an ``error`` row and the suite moves on; the CSV is rewritten after every case, so a killed run leaves its rows.

``--dry-run`` (meant for ``--suite gpu`` on a machine without CUDA): the GPU case list and all output writing, with
every case replaced by a tiny fp32 CPU stand-in (d_in, d_out / 64, N -> 1 + 2 log2 N) timed with the CPU timer;
the training step runs on a tiny config. Prints the GPU suite's estimated time.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import math
import os
import platform
import re
import signal
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import competitors as C
from . import suites as S

COLUMNS = [
    "suite", "device", "torch", "triton", "dtype", "shape", "d_in", "d_out", "n", "r", "k", "competitor",
    "fwd_ms", "fwd_p20_ms", "fwd_p80_ms", "bwd_ms", "bwd_p20_ms", "bwd_p80_ms",
    "fwdbwd_ms", "fwdbwd_p20_ms", "fwdbwd_p80_ms", "tflops",
    "ratio_fwd", "ratio_bwd", "ratio_to_base", "floor_fwd", "floor_bwd", "floor_ratio", "speedup_vs_crab",
    "saved_bytes", "saved_budget_bytes", "peak_mem_bytes", "tokens_per_s", "note", "error",
]
MEASURES = ("fwd", "bwd", "fwdbwd")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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


# ---------------------------------------------------------------------------------------------------------------
# timers: each returns (median, p20, p80) in ms


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


# ---------------------------------------------------------------------------------------------------------------
# one case x competitor


_STICKY = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
           "CUDA error: an illegal", "cudaErrorLaunchFailure", "illegal instruction")


def _error_text(exc: BaseException) -> str:
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


class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated(f"signal {signum}")


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
                inp_error = f"inputs: {_error_text(exc)}"
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
            except _Terminated:
                row["error"] = "terminated"
                raise
            except Exception as exc:  # OOM, a failing backend, ...: record and move on
                row["error"] = _error_text(exc)
                text = str(exc)
                if any(s in text for s in _STICKY):
                    sticky = row["error"]
            finally:
                if device.type == "cuda" and sticky is None:
                    try:
                        torch.cuda.synchronize()
                    except Exception as exc:
                        sticky = _error_text(exc)
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
# training step: 2 Qwen2 decoder layers, I-LoRA on all seven projections vs the Crab loop


def train_step_rows(device: torch.device, dtype: torch.dtype, meta: Dict, budget: Budget, tiny: bool,
                    tokens: int = 4096, steps: int = 3) -> List[Dict]:
    rows: List[Dict] = []
    try:
        from transformers import Qwen2Config, Qwen2Model
    except Exception as exc:
        return [{**meta, "shape": "train.qwen2x2", "competitor": "-", "error": f"unavailable: {_error_text(exc)}"}]
    import ilora_kernels as ik

    if tiny:
        cfg_kw = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
        tokens, r, k, steps = 32, 8, 3, 2
    else:  # Qwen2.5-Omni-7B thinker LLM widths
        cfg_kw = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4)
        r, k = 128, 3
    shape = f"train.qwen2x2 ({'tiny' if tiny else '7B widths'})"
    targets = ik.CRAB_PLUS_TARGETS
    for variant in ("ilora", "crab-loop"):
        for ckpt in (False, True):
            row = {**meta, "shape": shape, "d_in": cfg_kw["hidden_size"], "d_out": cfg_kw["intermediate_size"],
                   "n": tokens, "r": r, "k": k, "competitor": variant}
            rows.append(row)
            if budget.spent():
                row["error"] = f"skipped: time budget of {budget.seconds:g} s spent"
                continue
            model = None
            try:
                cfg = Qwen2Config(num_hidden_layers=2, vocab_size=128, max_position_embeddings=max(tokens, 128),
                                  **cfg_kw)
                cfg._attn_implementation = "sdpa"
                with torch.device(device):
                    model = Qwen2Model(cfg).to(dtype)
                if variant == "ilora":
                    model = ik.apply_ilora(model, ik.ILoRAConfig(r=r, num_heads=k, alpha=2.0 * r, dropout=0.1,
                                                                 target_modules=targets))
                    for layer in ik.ilora_layers(model).values():  # random B: no zero shortcut
                        torch.nn.init.normal_(layer.lora_b, std=0.1 / math.sqrt(r))
                    x0 = torch.zeros(1, 1, cfg.hidden_size, device=device, dtype=dtype)
                    first = next(iter(ik.ilora_layers(model).values()))
                    backend = ik.functional.resolve_backend(first.backend, x0)
                    row["note"] = f"backend={backend}"
                else:
                    model = C.apply_crab_loop(model, targets, r, k, 2.0 * r, dropout=0.1)
                    row["note"] = "Crab+ loop module"
                row["note"] += f", dropout 0.1, grad_ckpt={'on' if ckpt else 'off'}, fwd+bwd (no optimizer step)"
                model.train()
                if ckpt:
                    with warnings.catch_warnings():  # transformers 5 renamed it activation_checkpointing_enable
                        warnings.simplefilter("ignore", FutureWarning)
                        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                emb = torch.randn(1, tokens, cfg.hidden_size, device=device, dtype=dtype)
                params = [p for p in model.parameters() if p.requires_grad]

                def step():
                    out = model(inputs_embeds=emb).last_hidden_state
                    loss = out.float().pow(2).mean()
                    return torch.autograd.grad(loss, params)

                step()  # warm-up (compilation, autotuning)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                times = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    grads = step()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                    del grads
                if device.type == "cuda":
                    row["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - before
                med = statistics.median(times)
                row["fwdbwd_ms"] = med * 1e3
                row["fwdbwd_p20_ms"], row["fwdbwd_p80_ms"] = min(times) * 1e3, max(times) * 1e3
                row["tokens_per_s"] = tokens / med
            except _Terminated:
                row["error"] = "terminated"
                raise
            except Exception as exc:
                row["error"] = _error_text(exc)
            finally:
                model = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            log(f"[train] {variant} grad_ckpt={ckpt}: "
                f"{row.get('tokens_per_s', 0):.0f} tok/s {row.get('error', '')}")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# outputs


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


def write_plots(stem: str, rows: Sequence[Dict], competitors: Sequence[str], title: str) -> List[str]:
    """time vs tokens (log-log, one line per competitor, one panel per shape/rank) and memory bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return [f"plots skipped: matplotlib unavailable ({exc!r})"]
    notes = []
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
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        fig.savefig(f"{stem}-time.png", dpi=90)
        plt.close(fig)
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
        fig.tight_layout()
        fig.savefig(f"{stem}-ratio.png", dpi=90)
        plt.close(fig)
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
        fig.tight_layout()
        fig.savefig(f"{stem}-memory.png", dpi=90)
        plt.close(fig)
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
        backends = {"error": _error_text(exc)}

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
    except (_Terminated, KeyboardInterrupt) as exc:
        terminated = exc
        log(f"interrupted ({exc!r}): writing what was measured")
    finally:
        write_csv(stem + ".csv", rows)
        try:
            notes = write_plots(stem, rows, competitors, f"{args.suite}{' dry-run' if dry else ''}: {dev_name} "
                                f"({meta['dtype']})")
        except Exception as exc:
            notes = [f"plots failed: {_error_text(exc)}"]
        write_markdown(stem + ".md", rows, header + [f"- {n}" for n in notes], competitors)

    print(short_table(rows, competitors))
    if gpu and dry:
        print(f"\nestimated GPU suite time on an H100: {est_s:.0f} s for {len(S.gpu_cases(args.quick))} cases x "
              f"{len(C.GPU_COMPETITORS)} competitors (before Triton compilation/autotuning); per case:")
        print("\n".join("  " + line for line in est_lines))
    print(f"\nwrote {stem}.csv, {stem}.md and {stem}-{{time,ratio,memory}}.png")
    return 130 if terminated is not None else 0


if __name__ == "__main__":
    sys.exit(main())
