"""Case lists of the CPU and GPU suites, and the arithmetic behind the GPU suite's time budget."""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

from .competitors import Case, adapter_flops, base_flops

# d_in -> d_out of the layers I-LoRA adapts (one name per distinct shape; the aliases share it)
SHAPES: Dict[str, Tuple[int, int]] = {
    "qwen.q_proj": (3584, 3584),  # Qwen2.5-Omni-7B thinker; o_proj has the same shape
    "qwen.k_proj": (3584, 512),  # = v_proj
    "qwen.gate_proj": (3584, 18944),  # = up_proj
    "qwen.down_proj": (18944, 3584),
    "audio.attn_proj": (1280, 1280),  # audio tower self_attn.{q,k,v}_proj
    "vision.gate_proj": (1280, 3420),  # vision tower mlp.{gate,up}_proj
    "vision.down_proj": (3420, 1280),
    "llama2.q_proj": (4096, 4096),
    "llama2.gate_proj": (4096, 11008),
    "llama2.down_proj": (11008, 4096),
}
RANKS = {"crab+": (128, 3), "crab-v1": (8, 3), "r16-k8": (16, 8)}  # (r, K)
TOKENS = (1, 16, 512, 4096, 16384)

# the CPU acceptance shape (SPEC section 5, "on CPU here"): T = 1024 tokens, 1024 -> 2816, r = 16, K = 3
ACCEPT = ("accept", 1024, 2816)
CPU_WIDTH_DIVISOR = 4  # CPU suite: the model shapes above with d_in and d_out divided by this (ranks unchanged)


def _case(shape: str, n: int, rk: Tuple[int, int], divisor: int = 1, dropout: float = 0.0,
          decode: bool = False) -> Case:
    d_in, d_out = SHAPES[shape]
    name = shape if divisor == 1 else f"{shape}/{divisor}"
    return Case(name, d_in // divisor, d_out // divisor, n, rk[0], rk[1], dropout=dropout, decode=decode)


CRAB_LLM_SHAPES = ("qwen.gate_proj", "qwen.down_proj", "qwen.q_proj", "qwen.k_proj")  # up = gate, o = q, v = k
DECODE_TOKENS = (1, 2, 4, 8, 16)


def gpu_cases(quick: bool = False) -> List[Case]:
    """Priority order (if the time budget runs out, the tail is what gets skipped): the Crab+ training shapes
    (N = 4096, r = 128, K = 3) at dropout 0 and 0.1, decode (N = 1..16, no grad) at the same shapes, then other
    token counts, ranks and models."""
    crab = RANKS["crab+"]
    cases = [_case(s, 4096, crab, dropout=p) for p in (0.0, 0.1) for s in CRAB_LLM_SHAPES]
    if quick:
        return cases[:4] + [_case("qwen.gate_proj", n, crab, decode=True) for n in (1, 16)]
    cases += [_case(s, n, crab, decode=True) for s in CRAB_LLM_SHAPES for n in DECODE_TOKENS]
    cases += [_case("qwen.gate_proj", n, crab) for n in (512, 16384)]
    cases += [_case(s, 4096, RANKS[rk]) for rk in ("crab-v1", "r16-k8") for s in ("qwen.gate_proj", "qwen.q_proj")]
    cases += [_case(s, 4096, crab) for s in ("audio.attn_proj", "vision.gate_proj", "vision.down_proj")]
    cases += [_case(s, 4096, crab) for s in ("llama2.q_proj", "llama2.gate_proj", "llama2.down_proj")]
    return cases


def cpu_cases(quick: bool = False) -> List[Case]:
    """fp32; the model shapes are scaled down (d_in, d_out divided by CPU_WIDTH_DIVISOR), the acceptance shape
    is not."""
    name, d_in, d_out = ACCEPT
    div = CPU_WIDTH_DIVISOR
    crab = RANKS["crab+"]
    if quick:
        return ([Case(name, d_in, d_out, n, 16, 3) for n in (16, 1024)]
                + [_case("qwen.q_proj", n, crab, div) for n in (16, 512)])
    cases = [Case(name, d_in, d_out, n, 16, 3) for n in (1, 16, 512, 1024)]
    cases += [Case(name, d_in, d_out, n, 128, 3) for n in (1, 16, 512, 1024)]
    cases += [_case(s, n, crab, div) for s in ("qwen.q_proj", "qwen.gate_proj") for n in (1, 16, 512, 1024)]
    cases += [_case(s, n, crab, div) for s in ("qwen.k_proj", "qwen.down_proj") for n in (16, 1024)]
    cases += [_case("qwen.q_proj", 1024, RANKS[rk], div) for rk in ("crab-v1", "r16-k8")]
    cases += [_case(s, 1024, crab, div) for s in ("audio.attn_proj", "vision.gate_proj", "vision.down_proj",
                                                   "llama2.q_proj", "llama2.gate_proj", "llama2.down_proj")]
    return cases


def dry_run_stand_in(case: Case, divisor: int = 64) -> Case:
    """A tiny CPU stand-in of a GPU case (same name, r, K, dropout and mode) for --dry-run: widths / 64, training
    N -> 1 + 2 log2(N) (16 -> 9, 512 -> 19, 4096 -> 25, 16384 -> 29: small, and distinct where the real N differ);
    decode N unchanged."""
    n = case.n if case.decode else 1 + 2 * int(round(math.log2(max(1, case.n))))
    return Case(case.shape, max(8, case.d_in // divisor), max(8, case.d_out // divisor), n, case.r, case.k,
                dropout=case.dropout, decode=case.decode)


# ---------------------------------------------------------------------------------------------------------------
# GPU time budget: FLOPs / peak per call, times the calls the interleaved timing makes

H100_BF16_FLOPS = 700e12  # sustained bf16 GEMM, a little under the ~800 TFLOP/s measured on the lent H100
LAUNCH_FLOOR_S = {"base": 10e-6, "crab-loop": 150e-6, "peft": 60e-6}  # CPU-side launch cost of one fwd+bwd
OURS_LAUNCH_FLOOR_S = 60e-6
SETUP_S = 0.15  # per case x competitor: build, first call, memory run, Python


def _executed_flops(case: Case, competitor: str) -> Tuple[float, float]:
    bf, bb = base_flops(case.n, case.d_in, case.d_out)
    if competitor == "base":
        return bf, bb
    if competitor == "peft":
        af, ab = adapter_flops(case.n, case.d_in, case.d_out, case.r, 1, router=False)
        return bf + af, bb + ab
    af, ab = adapter_flops(case.n, case.d_in, case.d_out, case.r, case.k)
    if competitor == "crab-loop":  # A re-applied per head: K shrinks forward and backward
        extra = (case.k - 1) * 2.0 * case.n * case.d_in * case.r
        return bf + af + extra, bb + ab + 2 * extra
    return bf + af, bb + ab


def interleaved_wall_s(t: float, rounds: int, target_ms: float) -> float:
    """Wall time of one competitor in ``runner.run_cases_interleaved`` for a call of t seconds: 2 warm-up calls, a
    memory call, a capture (2 warm-up calls + the captured one), 2 estimate calls, then per round one graph and one
    eager measure of at least 3 calls (or target_ms) each."""
    measure = max(target_ms * 1e-3, 3 * t)
    return SETUP_S + 8 * t + rounds * 2 * measure


def estimate_gpu_seconds(cases: Sequence[Case], competitors: Sequence[str], rounds: int = 5,
                         target_ms: float = 20.0, peak_flops: float = H100_BF16_FLOPS) -> Tuple[float, List[str]]:
    """Estimated wall seconds of the GPU suite (interleaved timing; excluding Triton compilation/autotuning) and one
    line per case."""
    total, lines = 0.0, []
    for case in cases:
        case_s = 0.0
        for comp in competitors:
            f, b = _executed_flops(case, comp)
            floor = LAUNCH_FLOOR_S.get(comp, OURS_LAUNCH_FLOOR_S)
            t = max(f / peak_flops, floor / 2) if case.decode else max((f + b) / peak_flops, floor)
            case_s += interleaved_wall_s(t, rounds, target_ms)
        f0, b0 = base_flops(case.n, case.d_in, case.d_out)
        work = f0 if case.decode else f0 + b0
        lines.append(f"{case.label:<62} base {'fwd' if case.decode else 'fwd+bwd'} {work / 1e9:9.1f} GFLOP = "
                     f"{1e3 * work / peak_flops:7.3f} ms -> case {case_s:5.2f} s")
        total += case_s
    return total, lines
