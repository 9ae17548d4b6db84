"""The Triton backend: fused I-LoRA kernels and the ``ilora_kernels::triton_forward`` / ``triton_backward`` ops.

Forward (2 launches):
  1. ``_shrink_route_kernel``: one pass over x per token block with two fp32 accumulators, router logits
     ``x W_r^T`` (clean x) and ``h = A dropout(x)`` (mask regenerated in registers); fp32 softmax / top-k in
     registers; writes h (N, r), g (N, K) float32 and u = [g_1 h, ..., g_K h] (N, K r).
     With too few token blocks to fill the GPU the d_in reduction is split (``_shrink_split``,
     ILORA_TRITON_SHRINK_SPLIT): ``_shrink_route_partial_kernel`` on a (token blocks, SPLIT) grid writes fp32
     partials (SPLIT, N, KP + RP), ``_route_reduce_kernel`` sums them in a fixed order and runs the same routing
     epilogue (``_route_store``).
  2. ``_base_expand_kernel``: ``y = [x | u] [W | s B_cat]^T + b`` in one fp32 accumulator: K r / BLOCK_K
     iterations over u and B_cat (read straight from lora_b's (K, d_out, r) layout), scaled by s, then the usual
     reduction over d_in.
     ``ILORA_TRITON_BASE_GEMM=cublas`` replaces it by ``addmm(b, x, W^T)`` + ``addmm_(u, B_cat^T, alpha=s)``;
     the default ``auto`` picks by size (see ``_base_gemm_mode``).

Backward:
  1. ``_expand_backward_kernel``: per token block, V = dy B_cat accumulated in fp32 registers over d_out blocks
     (dy read once), then dh = s sum_k g_k v_k, dg_k = s <v_k, h>, dz = g (dg - <g, dg>); writes dh, dz.
     On CUDA by default (and whenever K r is too large for registers) V comes from a cuBLAS GEMM instead and the
     same kernel does only the per-token part (see ``_use_fused_v``).
  2. dB = s dy^T u: one GEMM (torch), u recomputed from g and h.
  3. ``_shrink_backward_kernel``: dW_r = dz^T x and dA = dh^T dropout(x) in one pass over x (split over tokens,
     fp32 partials summed by torch).
  4. dx = dy W (torch) then ``_dx_kernel`` adds dz W_r + mask / (1 - p) * (dh A) (mask regenerated in-kernel).

The dropout mask is the counter-based hash of ``ilora_kernels._dropout`` (murmur3 fmix32 on (seed, row, col)),
computed here in uint32 arithmetic, which wraps exactly like the reference's int64 arithmetic masked to 32 bits.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import settings
from .._dropout import keep_threshold, seed32
from .contract import define
from .layout import concat_heads, heads_grad
from .reference import routed_activations
from .registry import BackendUnavailable, register

_INTERPRET = settings.get().triton_interpret
try:
    import triton
    import triton.language as tl
except ImportError:
    raise BackendUnavailable("triton is not installed") from None
if not _INTERPRET and not torch.cuda.is_available():
    raise BackendUnavailable("no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU "
                             "interpreter)")

# ---------------------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _row_hash(rows, seed):
    """fmix32(row * 0x9E3779B9 + seed) for int64 row indices (uint32 arithmetic); seed is a uint32 scalar."""
    # (rows * 0 + seed): seed may arrive as a specialised Python int (Triton turns an int argument of 1 into a
    # constant), so make it a tensor before the cast
    return _fmix32(rows.to(tl.uint32) * 0x9E3779B9 + (rows * 0 + seed).to(tl.uint32))


@triton.jit
def _keep(row_hash, cols, threshold):
    """Keep mask (rows x cols) from per-row hashes (R,) and int64 column indices (C,)."""
    bits = _fmix32(row_hash[:, None] ^ (cols.to(tl.uint32) * 0x85EBCA77)[None, :])
    return (bits >> 8).to(tl.int64) >= threshold


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


# ---------------------------------------------------------------------------------------------------------------
# forward kernel 1: shrink + route (one program per token block; or, split over d_in, partials + a reduce kernel)


@triton.jit
def _shrink_accumulate(x_ptr, wr_ptr, a_ptr, rows, row_ok, d_lo, d_hi, d_in, K, R,
                       sxm, sxk, swr0, swr1, sa0, sa1,
                       seed, threshold, drop_scale,
                       HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr):
    """The fp32 router logits x W_r^T (clean x) and h = A dropout(x) of the token block ``rows`` over the d_in columns
    [d_lo, d_hi) (d_lo a multiple of BLOCK_D); the dropout mask comes from (seed, row, global column)."""
    cols_d = tl.arange(0, BLOCK_D).to(tl.int64)
    ks = tl.arange(0, KP)
    rs = tl.arange(0, RP)
    k_ok = ks < K
    r_ok = rs < R

    x_ptrs = x_ptr + rows[:, None] * sxm + (d_lo + cols_d)[None, :] * sxk
    wr_ptrs = wr_ptr + ks.to(tl.int64)[None, :] * swr0 + (d_lo + cols_d)[:, None] * swr1   # (BLOCK_D, KP) = W_r^T
    a_ptrs = a_ptr + rs.to(tl.int64)[None, :] * sa0 + (d_lo + cols_d)[:, None] * sa1       # (BLOCK_D, RP) = A^T
    if HAS_DROPOUT:
        rh = _row_hash(rows, seed)

    logits = tl.zeros((BLOCK_M, KP), dtype=tl.float32)
    hacc = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        d_ok = (d0 + cols_d) < d_in
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        wrt = tl.load(wr_ptrs, mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        logits = _dot(xt, wrt, logits, IEEE)
        if HAS_DROPOUT:
            keep = _keep(rh, d0 + cols_d, threshold)
            xd = tl.where(keep, xt.to(tl.float32) * drop_scale, 0.0).to(xt.dtype)
            hacc = _dot(xd, at, hacc, IEEE)
        else:
            hacc = _dot(xt, at, hacc, IEEE)
        x_ptrs += BLOCK_D * sxk
        wr_ptrs += BLOCK_D * swr1
        a_ptrs += BLOCK_D * sa1
    return logits, hacc


@triton.jit
def _route_store(logits, hacc, rows, row_ok, h_ptr, g_ptr, u_ptr, K, R, KR,
                 TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr):
    """The routing epilogue of both shrink-route paths: fp32 softmax / top-k of the logits (BLOCK_M, KP), then the
    stores of g (N, K) float32, h (N, R) and u = [g_1 h, ..., g_K h] (N, K R) in the activation dtype."""
    ks = tl.arange(0, KP)
    rs = tl.arange(0, RP)
    k_ok = ks < K
    r_ok = rs < R
    # router: fp32 softmax (over the TOP_K largest logits when TOP_K > 0)
    # Non-finite logits follow torch (reference backend): a NaN logit ranks above every number in top-k and ties go
    # to the lower head index; a +inf, NaN or all -inf selection makes the selected heads NaN and leaves the
    # unselected heads exactly 0.  (tl.max ignores NaN on GPUs but not in the interpreter, so NaN is handled
    # explicitly.)
    neg_inf = float("-inf")
    lg = tl.where(k_ok[None, :], logits, neg_inf)
    is_nan = lg != lg
    if TOP_K > 0:
        sel = tl.zeros((BLOCK_M, KP), dtype=tl.int32)
        key = tl.where(is_nan, float("inf"), lg)
        order = ks[None, :] + tl.where(is_nan, 0, KP)      # among equal keys: NaN first, then the lower index
        for _ in tl.static_range(TOP_K):
            free = (sel == 0) & k_ok[None, :]
            cand = tl.where(free, key, neg_inf)
            mx = tl.max(cand, axis=1)
            pick = tl.min(tl.where(free & (cand == mx[:, None]), order, 2 * KP), axis=1)
            sel = tl.where(order == pick[:, None], 1, sel)
        chosen = sel != 0
    else:
        chosen = tl.broadcast_to(k_ok[None, :], (BLOCK_M, KP))
    mx = tl.max(tl.where(chosen & ~is_nan, lg, neg_inf), axis=1)
    mx = tl.where(tl.sum(tl.where(chosen & is_nan, 1, 0), axis=1) > 0, float("nan"), mx)
    e = tl.where(chosen, tl.exp(lg - mx[:, None]), 0.0)
    g = tl.where(chosen, e / tl.sum(e, axis=1)[:, None], 0.0)

    tl.store(g_ptr + rows[:, None] * K + ks[None, :], g, mask=row_ok[:, None] & k_ok[None, :])
    h_act = hacc.to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + rows[:, None] * R + rs[None, :], h_act, mask=row_ok[:, None] & r_ok[None, :])
    # u = [g_1 h, ..., g_K h], g cast to the activation dtype first (exact product in fp32, one rounding)
    hf = h_act.to(tl.float32)
    g_act = g.to(h_ptr.dtype.element_ty).to(tl.float32)
    u_ptrs = u_ptr + rows[:, None] * KR + rs[None, :]
    for k in range(0, K):
        gk = tl.sum(tl.where(ks[None, :] == k, g_act, 0.0), axis=1)
        uk = (gk[:, None] * hf).to(u_ptr.dtype.element_ty)
        tl.store(u_ptrs + k * R, uk, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _shrink_route_kernel(x_ptr, wr_ptr, a_ptr, h_ptr, g_ptr, u_ptr,
                         N, d_in, K, R, KR,
                         sxm, sxk, swr0, swr1, sa0, sa1,
                         seed, threshold, drop_scale,
                         HAS_DROPOUT: tl.constexpr, TOP_K: tl.constexpr, IEEE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr):
    """SPLIT = 1: grid (token blocks,); the whole d_in reduction and the routing epilogue in one program."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < N
    logits, hacc = _shrink_accumulate(x_ptr, wr_ptr, a_ptr, rows, row_ok, 0, d_in, d_in, K, R,
                                      sxm, sxk, swr0, swr1, sa0, sa1, seed, threshold, drop_scale,
                                      HAS_DROPOUT, IEEE, BLOCK_M, BLOCK_D, KP, RP)
    _route_store(logits, hacc, rows, row_ok, h_ptr, g_ptr, u_ptr, K, R, KR, TOP_K, BLOCK_M, KP, RP)


@triton.jit
def _shrink_route_partial_kernel(x_ptr, wr_ptr, a_ptr, ws_ptr,
                                 N, d_in, K, R,
                                 sxm, sxk, swr0, swr1, sa0, sa1,
                                 seed, threshold, drop_scale,
                                 HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr):
    """SPLIT > 1, stage 1: grid (token blocks, SPLIT). Program (m, s) reduces the BLOCK_D blocks
    [s * nb // SPLIT, (s + 1) * nb // SPLIT) of d_in (nb = cdiv(d_in, BLOCK_D); SPLIT <= nb, so no chunk is empty)
    and writes its fp32 logits and h, padded to KP and RP columns, to ws[s] (SPLIT, N, KP + RP)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    split = tl.num_programs(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < N
    n_blk = tl.cdiv(d_in + pid_s * 0, BLOCK_D)           # int64 (d_in may arrive as the constant 1)
    d_lo = (pid_s * n_blk) // split * BLOCK_D
    d_hi = tl.minimum((pid_s + 1) * n_blk // split * BLOCK_D, d_in)
    logits, hacc = _shrink_accumulate(x_ptr, wr_ptr, a_ptr, rows, row_ok, d_lo, d_hi, d_in, K, R,
                                      sxm, sxk, swr0, swr1, sa0, sa1, seed, threshold, drop_scale,
                                      HAS_DROPOUT, IEEE, BLOCK_M, BLOCK_D, KP, RP)
    ws_rows = ws_ptr + (pid_s * N + rows) * (KP + RP)
    tl.store(ws_rows[:, None] + tl.arange(0, KP)[None, :], logits, mask=row_ok[:, None])
    tl.store(ws_rows[:, None] + KP + tl.arange(0, RP)[None, :], hacc, mask=row_ok[:, None])


@triton.jit
def _route_reduce_kernel(ws_ptr, h_ptr, g_ptr, u_ptr,
                         N, K, R, KR, SPLIT,
                         TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr):
    """SPLIT > 1, stage 2: grid (token blocks,). Sums the SPLIT fp32 partials of ws in the fixed order s = 0, 1, ...
    (deterministic, no atomics), then the routing epilogue of the single kernel (``_route_store``)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < N
    ws_rows = ws_ptr + rows * (KP + RP)
    lg_ptrs = ws_rows[:, None] + tl.arange(0, KP)[None, :]
    h_ptrs = ws_rows[:, None] + KP + tl.arange(0, RP)[None, :]
    logits = tl.load(lg_ptrs, mask=row_ok[:, None], other=0.0)
    hacc = tl.load(h_ptrs, mask=row_ok[:, None], other=0.0)
    step = (pid * 0 + N) * (KP + RP)                     # int64 (N may arrive as the constant 1)
    for _ in range(1, SPLIT):
        lg_ptrs += step
        h_ptrs += step
        logits += tl.load(lg_ptrs, mask=row_ok[:, None], other=0.0)
        hacc += tl.load(h_ptrs, mask=row_ok[:, None], other=0.0)
    _route_store(logits, hacc, rows, row_ok, h_ptr, g_ptr, u_ptr, K, R, KR, TOP_K, BLOCK_M, KP, RP)


# ---------------------------------------------------------------------------------------------------------------
# forward kernel 2: base GEMM with the expand as an extended reduction


@triton.jit
def _base_expand_kernel(x_ptr, w_ptr, b_ptr, u_ptr, lb_ptr, y_ptr,
                        N, d_out, d_in, KR, R, N_BUCKET,
                        sxm, sxk, swn, swk, sb0, sb1, sb2, sym, syn, sbias, scaling,
                        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """N_BUCKET (min(next_pow2(N), 8192)) is only an autotune key."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    num_n = tl.cdiv(d_out, BLOCK_N)
    group = GROUP_M * num_n
    group_id = pid // group
    first_m = group_id * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % gsize)
    pid_n = (pid % group) // gsize

    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rm_s = rm % N          # clamp ragged rows/cols to valid addresses; masked at the store
    rn_s = rn % d_out
    rk = tl.arange(0, BLOCK_K).to(tl.int64)

    # one fp32 accumulator: the expand first (u (N, K r) against B_cat^T, B_cat[n, k r + j] = lora_b[k, n, j]),
    # scaled by s, then the base reduction over d_in on top of it (two accumulators took 255 registers and spilled
    # in the 128x128 / 4-warp and 128x256 / 8-warp tiles: docs/kernel_design.md, "Ahead-of-time compile report")
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, KR, BLOCK_K):
        cc = c0 + rk
        c_ok = cc < KR
        head = cc // R
        j = cc - head * R
        ut = tl.load(u_ptr + rm_s[:, None] * KR + cc[None, :], mask=c_ok[None, :], other=0.0)
        bt = tl.load(lb_ptr + head[:, None] * sb0 + rn_s[None, :] * sb1 + j[:, None] * sb2, mask=c_ok[:, None],
                     other=0.0)
        acc = _dot(ut, bt, acc, IEEE)
    acc = acc * scaling

    x_ptrs = x_ptr + rm_s[:, None] * sxm + rk[None, :] * sxk
    w_ptrs = w_ptr + rn_s[None, :] * swn + rk[:, None] * swk                         # (BLOCK_K, BLOCK_N) = W^T
    for k0 in range(0, d_in, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            wt = tl.load(w_ptrs)
        else:
            k_ok = (k0 + rk) < d_in
            xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = _dot(xt, wt, acc, IEEE)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk

    if HAS_BIAS:
        bias = tl.load(b_ptr + rn_s * sbias).to(tl.float32)
        acc = acc + bias[None, :]
    mask = (rm < N)[:, None] & (rn < d_out)[None, :]
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _gemm_configs():
    """The autotune candidates of ``_base_expand_kernel``. None may spill registers at sm_80 or sm_90a (compiled ahead
    of time by tests/test_triton_aot.py): 128x256x64 / 8 warps and 128x128x64 / 4 warps still spilled at sm_80 with
    the single accumulator (16 and 160 bytes), so those two tiles take BLOCK_K = 32."""
    cfg = triton.Config
    return [
        cfg({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=8),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=4),
    ]


def _prune_gemm_configs(configs, named_args, **kwargs):
    """Small problems (decode, tests) take the smallest tile without benchmarking; big ones try them all."""
    if named_args["N_BUCKET"] <= 64 or named_args["d_out"] <= 256:
        return [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return configs


if _INTERPRET:   # multi-config autotune needs a real timer: the interpreter uses one fixed config
    _base_expand_tuned = None
else:
    _base_expand_tuned = triton.autotune(configs=_gemm_configs(),
                                         key=["N_BUCKET", "d_out", "d_in", "KR", "HAS_BIAS", "IEEE", "EVEN_K"],
                                         prune_configs_by={"early_config_prune": _prune_gemm_configs})(
        _base_expand_kernel)


# ---------------------------------------------------------------------------------------------------------------
# backward kernel 1: expand backward (V = dy B_cat) + router backward


@triton.jit
def _expand_backward_kernel(dy_ptr, lb_ptr, v_ptr, g_ptr, h_ptr, dh_ptr, dz_ptr,
                            N, d_out, K, R,
                            sdym, sdyn, sb0, sb1, sb2, svm, scaling,
                            FROM_V: tl.constexpr, IEEE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < N
    ks = tl.arange(0, KP)
    rs = tl.arange(0, RP)
    k_ok = ks < K
    r_ok = rs < R

    if FROM_V:
        # V (N, K r) precomputed: load it as (BLOCK_M, KP, RP)
        kk = ks.to(tl.int64)[None, :, None]
        jj = rs.to(tl.int64)[None, None, :]
        vmask = row_ok[:, None, None] & k_ok[None, :, None] & r_ok[None, None, :]
        v3 = tl.load(v_ptr + rows[:, None, None] * svm + kk * R + jj, mask=vmask, other=0.0).to(tl.float32)
    else:
        # columns c = k * RP + j (heads padded to RP), reshaped to (BLOCK_M, KP, RP) after the loop
        cs = tl.arange(0, KP * RP)
        ch = (cs // RP).to(tl.int64)
        cj = (cs % RP).to(tl.int64)
        c_ok = (ch < K) & (cj < R)
        rn = tl.arange(0, BLOCK_N).to(tl.int64)
        dy_ptrs = dy_ptr + rows[:, None] * sdym + rn[None, :] * sdyn
        b_ptrs = lb_ptr + ch[None, :] * sb0 + rn[:, None] * sb1 + cj[None, :] * sb2    # (BLOCK_N, KP*RP)
        vacc = tl.zeros((BLOCK_M, KP * RP), dtype=tl.float32)
        for n0 in range(0, d_out, BLOCK_N):
            n_ok = (n0 + rn) < d_out
            dyt = tl.load(dy_ptrs, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            bt = tl.load(b_ptrs, mask=n_ok[:, None] & c_ok[None, :], other=0.0)
            vacc = _dot(dyt, bt, vacc, IEEE)
            dy_ptrs += BLOCK_N * sdyn
            b_ptrs += BLOCK_N * sb1
        v3 = tl.reshape(vacc, (BLOCK_M, KP, RP))

    g = tl.load(g_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    h = tl.load(h_ptr + rows[:, None] * R + rs[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    hf = h.to(tl.float32)
    g_act = g.to(h_ptr.dtype.element_ty).to(tl.float32)          # the forward multiplied by g in activation dtype
    dh = scaling * tl.sum(v3 * g_act[:, :, None], axis=1)                     # (BLOCK_M, RP)
    dg = scaling * tl.sum(v3 * hf[:, None, :], axis=2)                         # (BLOCK_M, KP)
    dz = g * (dg - tl.sum(g * dg, axis=1)[:, None])
    tl.store(dh_ptr + rows[:, None] * R + rs[None, :], dh.to(dh_ptr.dtype.element_ty),
             mask=row_ok[:, None] & r_ok[None, :])
    tl.store(dz_ptr + rows[:, None] * K + ks[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & k_ok[None, :])


# ---------------------------------------------------------------------------------------------------------------
# backward kernel: dW_r = dz^T x and dA = dh^T dropout(x), reduction over tokens (split, fp32 partials)


@triton.jit
def _shrink_backward_kernel(x_ptr, dz_ptr, dh_ptr, pwr_ptr, pa_ptr,
                            N, d_in, K, R, tokens_per_split,
                            sxm, sxk,
                            seed, threshold, drop_scale,
                            HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr):
    pid_d = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    col_ok = cols < d_in
    ks = tl.arange(0, KP).to(tl.int64)
    rs = tl.arange(0, RP).to(tl.int64)
    k_ok = ks < K
    r_ok = rs < R
    ts = tl.arange(0, BLOCK_T).to(tl.int64)

    acc_r = tl.zeros((KP, BLOCK_D), dtype=tl.float32)
    acc_a = tl.zeros((RP, BLOCK_D), dtype=tl.float32)
    t_start = pid_s * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, N)
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + ts
        t_ok = rows < t_end
        xt = tl.load(x_ptr + rows[:, None] * sxm + cols[None, :] * sxk, mask=t_ok[:, None] & col_ok[None, :],
                     other=0.0)
        dzt = tl.load(dz_ptr + rows[None, :] * K + ks[:, None], mask=k_ok[:, None] & t_ok[None, :], other=0.0)
        dht = tl.load(dh_ptr + rows[None, :] * R + rs[:, None], mask=r_ok[:, None] & t_ok[None, :], other=0.0)
        acc_r = _dot(dzt, xt, acc_r, IEEE)
        if HAS_DROPOUT:
            keep = _keep(_row_hash(rows, seed), cols, threshold)
            xd = tl.where(keep, xt.to(tl.float32) * drop_scale, 0.0).to(xt.dtype)
            acc_a = _dot(dht, xd, acc_a, IEEE)
        else:
            acc_a = _dot(dht, xt, acc_a, IEEE)

    base_r = pwr_ptr + pid_s * K * d_in
    tl.store(base_r + ks[:, None] * d_in + cols[None, :], acc_r, mask=k_ok[:, None] & col_ok[None, :])
    base_a = pa_ptr + pid_s * R * d_in
    tl.store(base_a + rs[:, None] * d_in + cols[None, :], acc_a, mask=r_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------------------------
# backward kernel: dx += dz W_r + mask / (1 - p) * (dh A)   (dx already holds dy W)


@triton.jit
def _dx_kernel(dx_ptr, dz_ptr, dh_ptr, wr_ptr, a_ptr,
               N, d_in, K, R,
               sdxm, sdxk, swr0, swr1, sa0, sa1,
               seed, threshold, drop_scale,
               HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    row_ok = rows < N
    col_ok = cols < d_in
    ks = tl.arange(0, KP).to(tl.int64)
    k_ok = ks < K
    rr = tl.arange(0, BLOCK_R).to(tl.int64)

    dzt = tl.load(dz_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    wrt = tl.load(wr_ptr + ks[:, None] * swr0 + cols[None, :] * swr1, mask=k_ok[:, None] & col_ok[None, :],
                  other=0.0)
    acc_r = _dot(dzt, wrt, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), IEEE)
    acc_a = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_ok = (r0 + rr) < R
        dht = tl.load(dh_ptr + rows[:, None] * R + (r0 + rr)[None, :], mask=row_ok[:, None] & r_ok[None, :],
                      other=0.0)
        at = tl.load(a_ptr + (r0 + rr)[:, None] * sa0 + cols[None, :] * sa1, mask=r_ok[:, None] & col_ok[None, :],
                     other=0.0)
        acc_a = _dot(dht, at, acc_a, IEEE)
    if HAS_DROPOUT:
        keep = _keep(_row_hash(rows, seed), cols, threshold)
        acc_a = tl.where(keep, acc_a * drop_scale, 0.0)
    mask = row_ok[:, None] & col_ok[None, :]
    dx_ptrs = dx_ptr + rows[:, None] * sdxm + cols[None, :] * sdxk
    base = tl.load(dx_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptrs, (base + acc_r + acc_a).to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# launchers


def _empty(*shape, dtype, device) -> Tensor:
    """Allocation of every output buffer (a hook: tests replace it to prefill outputs with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def _dropout_args(dropout_p: float, seed: int):
    has = dropout_p > 0.0
    return has, (seed32(seed) if has else 0), (keep_threshold(dropout_p) if has else 0), \
        (1.0 / (1.0 - dropout_p) if has else 1.0)


_AUTO_FUSED_MAX = 1 << 22     # N * d_out up to which "auto" picks the fused base GEMM (H100 measurement)


def _base_gemm_mode(n: int, d_out: int) -> str:
    """The ILORA_TRITON_BASE_GEMM setting: "fused" (Triton GEMM with the expand as an extended reduction), "cublas"
    (addmm + addmm_) or "auto" (default): on an H100 the Triton GEMM lost to cuBLAS at 4096 x 3584 -> 3584 and
    -> 18944 but won at -> 512 (the cuBLAS path pays two launches and the B_cat copy), so auto picks by size."""
    mode = settings.get().triton_base_gemm
    if mode == "auto":
        mode = "fused" if n * d_out <= _AUTO_FUSED_MAX else "cublas"
    return mode


def _use_fused_v(cols: int) -> bool:
    """V = dy B_cat inside the expand-backward kernel (fp32 registers) or from a cuBLAS GEMM. On an H100 the fused
    kernel was ~9x slower than cuBLAS + the per-token kernel at 4096 x 18944 (K r = 384; 128 programs of tiny MMAs),
    so on CUDA it is opt-in (ILORA_TRITON_FUSED_V=1); the interpreter uses it by default so CPU tests cover it."""
    if cols > _MAX_FUSED_V:
        return False
    chosen = settings.get().triton_fused_v
    return _INTERPRET if chosen is None else chosen


_DETERMINISTIC_TILE = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}

# ---------------------------------------------------------------------------------------------------------------
# tile choices of the launchers: pure functions of the problem (``interpret`` is ``_INTERPRET`` at run time), shared
# with the ahead-of-time compile report (ilora_kernels.ops.triton_aot), which compiles what a GPU run launches


def _head_pads(num_heads: int, rank: int, head_min: int = 16) -> Tuple[int, int]:
    """(KP, RP): the heads and the rank padded to powers of two (tl.dot wants at least 16 in each dimension)."""
    return _pow2(num_heads, head_min), _pow2(rank, 16)


def _shrink_route_tile(rp: int, interpret: bool) -> dict:
    """BLOCK_M, BLOCK_D, num_warps, num_stages of ``_shrink_route_kernel``."""
    if interpret:
        return {"BLOCK_M": 32, "BLOCK_D": 32, "num_warps": 4, "num_stages": 1}
    # H100 sweep at 4096 x 3584, K=3, r=128: (64, 64, 8 warps, 4 stages) 68 us vs (32, 64, 4, 3) 87 us
    return {"BLOCK_M": 64 if rp <= 128 else 16, "BLOCK_D": 64, "num_warps": 8 if rp <= 128 else 4, "num_stages": 4}


_SPLIT_PROGRAMS_PER_SM = 2    # the shrink-route kernel takes ~80-110 KB of shared memory: 2 blocks fit an SM
_SPLIT_MIN_BLOCKS = 8         # BLOCK_D iterations per d_in chunk at least (fp32 partials <= ~half the x bytes read)
_SPLIT_MIN_TOKENS = 128       # fewer tokens (decode): one launch, no workspace
_SPLIT_MAX = 16


def _shrink_split(n: int, d_in: int, block_m: int, block_d: int, sms: Optional[int],
                  forced: Optional[int] = None) -> int:
    """SPLIT, the number of d_in chunks of the shrink-route reduction (1: the single ``_shrink_route_kernel``;
    more: ``_shrink_route_partial_kernel`` on a (token blocks, SPLIT) grid + ``_route_reduce_kernel``).

    ``forced`` (ILORA_TRITON_SHRINK_SPLIT=<int>) is used as given, capped at the number of BLOCK_D blocks of d_in (a
    chunk is a whole number of blocks and never empty). Otherwise (``auto``): 1 under the interpreter (``sms`` None)
    and below ``_SPLIT_MIN_TOKENS`` tokens; else enough chunks for about ``_SPLIT_PROGRAMS_PER_SM`` programs per SM
    (``sms``: the device's multiprocessor count), each chunk at least ``_SPLIT_MIN_BLOCKS`` BLOCK_D blocks, at most
    ``_SPLIT_MAX``. N = 4096 (64 token blocks of 64) on an H100 (132 SMs): 264 // 64 = 4 at d_in 3584 and 18944."""
    n_blk = max(1, triton.cdiv(int(d_in), block_d))
    if forced is not None:
        return max(1, min(int(forced), n_blk))
    if sms is None or n < _SPLIT_MIN_TOKENS:
        return 1
    n_mblk = triton.cdiv(int(n), block_m)
    return max(1, min(_SPLIT_PROGRAMS_PER_SM * sms // n_mblk, n_blk // _SPLIT_MIN_BLOCKS, _SPLIT_MAX))


def _route_reduce_tile(rp: int, interpret: bool) -> dict:
    """BLOCK_M, num_warps of ``_route_reduce_kernel`` (num_stages: Triton's default); its own token block, smaller
    than the partial kernel's (more programs for the epilogue; under the interpreter a different blocking tests the
    row masks)."""
    if interpret:
        return {"BLOCK_M": 16, "num_warps": 4}
    return {"BLOCK_M": 32 if rp <= 128 else 16, "num_warps": 4}


def _expand_backward_tile(kp: int, rp: int, from_v: bool, elem_size: int, interpret: bool) -> dict:
    """BLOCK_M, BLOCK_N, num_warps, num_stages of ``_expand_backward_kernel``; kp * rp fp32 columns of V."""
    cols = kp * rp
    if from_v:          # V from cuBLAS: the per-token part only (BLOCK_N unused)
        bm, bn, warps = 16, 16, 4
    elif interpret:
        bm, bn, warps = 32, 32, 4
    else:
        bm = 64 if cols <= 256 else 32
        bn = max(16, min(64, 32768 // (cols * elem_size)))
        warps = 8 if cols >= 256 else 4
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": 2}


def _shrink_backward_tile(rp: int, interpret: bool) -> dict:
    """BLOCK_T, BLOCK_D, num_warps of ``_shrink_backward_kernel`` (num_stages: Triton's default)."""
    bt, bd = (32, 32) if interpret else (64, 64)
    return {"BLOCK_T": bt, "BLOCK_D": bd, "num_warps": 4 if rp <= 64 else 8}


def _token_splits(n: int, d_in: int, block_t: int, block_d: int, sms: Optional[int]) -> Tuple[int, int]:
    """(splits, tokens_per_split) of the dW_r / dA token reduction: about two programs per SM (``sms``, the device's
    multiprocessor count; None under the interpreter: two splits)."""
    n_dblk = triton.cdiv(d_in, block_d)
    n_tblk = max(1, triton.cdiv(n, block_t))
    splits = min(n_tblk, 2) if sms is None else max(1, min(n_tblk, triton.cdiv(2 * sms, n_dblk)))
    tokens_per_split = triton.cdiv(n_tblk, splits) * block_t
    return max(1, triton.cdiv(n, tokens_per_split)), tokens_per_split


def _dx_tile(rp: int, interpret: bool) -> dict:
    """BLOCK_M, BLOCK_D, BLOCK_R, num_warps of ``_dx_kernel`` (num_stages: Triton's default)."""
    bm, bd = (32, 32) if interpret else (64, 64)
    return {"BLOCK_M": bm, "BLOCK_D": bd, "BLOCK_R": min(rp, 64), "num_warps": 4}


def deterministic_mode() -> bool:
    """Whether the deterministic mode is on: the ILORA_DETERMINISTIC setting or
    ``torch.use_deterministic_algorithms(True)`` (read at call time).

    Every Triton kernel here already reduces in a fixed order (no atomics; the split-token partials of dW_r / dA are
    summed by ``torch.sum`` in split order; the d_in partials of the split shrink-route are summed by
    ``_route_reduce_kernel`` in split order; both split counts depend only on the problem size, the device's SM
    count and the settings), so on one device the only run-to-run variation left is the autotuner of the fused
    base GEMM: it times its candidate tiles and may pick a different BLOCK_K (a different fp32 summation order) in
    another process. The deterministic mode launches that kernel with one fixed tile instead
    (``_DETERMINISTIC_TILE``); its cost is the lost tuning (the fused GEMM only runs for N * d_out <= 4M elements in
    the default ``auto`` mode)."""
    return settings.get().deterministic or torch.are_deterministic_algorithms_enabled()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch_shrink_route(x, router_weight, lora_a, h, g, u, dropout_p: float, seed: int, top: int,
                         split: Optional[int] = None, tile: Optional[dict] = None) -> int:
    """Forward kernel 1: h, g, u of ``x`` (N, d_in) written into ``h`` (N, r), ``g`` (N, K) float32, ``u`` (N, K r).
    ``split`` None: the ILORA_TRITON_SHRINK_SPLIT setting (``auto``: ``_shrink_split``); an int forces it (capped at
    the BLOCK_D blocks of d_in; the GPU sweep passes 1 and the auto value). ``tile``: the BLOCK_M / BLOCK_D /
    num_warps / num_stages of the (partial) shrink kernel (default ``_shrink_route_tile``). Returns the SPLIT run."""
    n, d_in = x.shape
    num_heads, rank = router_weight.shape[0], lora_a.shape[0]
    has_drop, seed_u, thr, dscale = _dropout_args(dropout_p, seed)
    kp, rp = _head_pads(num_heads, rank)
    ieee = x.dtype == torch.float32
    tile = _shrink_route_tile(rp, _INTERPRET) if tile is None else tile
    if split is None:
        chosen = settings.get().triton_shrink_split
        sms = None if _INTERPRET or x.device.type != "cuda" else _sm_count(x.device.index or 0)
        split = _shrink_split(n, d_in, tile["BLOCK_M"], tile["BLOCK_D"], sms, None if chosen == "auto" else chosen)
    else:
        split = _shrink_split(n, d_in, tile["BLOCK_M"], tile["BLOCK_D"], None, split)
    geometry = (n, d_in, num_heads, rank)
    strides_drop = (x.stride(0), x.stride(1), router_weight.stride(0), router_weight.stride(1), lora_a.stride(0),
               lora_a.stride(1), seed_u, thr, dscale)
    if split == 1:
        _shrink_route_kernel[(triton.cdiv(n, tile["BLOCK_M"]),)](
            x, router_weight, lora_a, h, g, u, *geometry, num_heads * rank, *strides_drop,
            HAS_DROPOUT=has_drop, TOP_K=top, IEEE=ieee, KP=kp, RP=rp, **tile)
        return 1
    # fp32 partials (SPLIT, N, KP + RP): logits in columns [0, KP), h in [KP, KP + RP); every row < N written
    ws = _empty(split, n, kp + rp, dtype=torch.float32, device=x.device)
    _shrink_route_partial_kernel[(triton.cdiv(n, tile["BLOCK_M"]), split)](
        x, router_weight, lora_a, ws, *geometry, *strides_drop, HAS_DROPOUT=has_drop, IEEE=ieee, KP=kp, RP=rp, **tile)
    rt = _route_reduce_tile(rp, _INTERPRET)
    _route_reduce_kernel[(triton.cdiv(n, rt["BLOCK_M"]),)](
        ws, h, g, u, n, num_heads, rank, num_heads * rank, split, TOP_K=top, KP=kp, RP=rp, **rt)
    return split


def _launch_base_expand(x, weight, bias, u, lora_b, y, scaling):
    n, d_in = x.shape
    d_out = weight.shape[0]
    k, _, r = lora_b.shape
    ieee = x.dtype == torch.float32
    has_bias = bias is not None
    b_arg = bias if has_bias else weight
    common = (x, weight, b_arg, u, lora_b, y, n, d_out, d_in, k * r, r)
    strides = (x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_b.stride(0), lora_b.stride(1),
               lora_b.stride(2), y.stride(0), y.stride(1), bias.stride(0) if has_bias else 1, float(scaling))
    if _base_expand_tuned is None:
        bm, bn, bk = 32, 32, 32
        grid = (triton.cdiv(n, bm) * triton.cdiv(d_out, bn),)
        _base_expand_kernel[grid](*common, 0, *strides, HAS_BIAS=has_bias, IEEE=ieee, EVEN_K=(d_in % bk == 0),
                                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4)
    elif deterministic_mode():      # one fixed tile: the same summation order in every process
        t = _DETERMINISTIC_TILE
        grid = (triton.cdiv(n, t["BLOCK_M"]) * triton.cdiv(d_out, t["BLOCK_N"]),)
        _base_expand_kernel[grid](*common, 0, *strides, HAS_BIAS=has_bias, IEEE=ieee,
                                  EVEN_K=(d_in % t["BLOCK_K"] == 0), BLOCK_M=t["BLOCK_M"], BLOCK_N=t["BLOCK_N"],
                                  BLOCK_K=t["BLOCK_K"], GROUP_M=t["GROUP_M"], num_warps=t["num_warps"],
                                  num_stages=t["num_stages"])
    else:
        even_k = d_in % 64 == 0      # every config uses BLOCK_K in {32, 64}
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(d_out, meta["BLOCK_N"]),)  # noqa: E731
        _base_expand_tuned[grid](*common, min(_pow2(n), 8192), *strides, HAS_BIAS=has_bias, IEEE=ieee,
                                 EVEN_K=even_k)


def _refuse_interpreted_bf16(x: Tensor) -> None:
    """The Triton interpreter's bf16 ``tl.dot`` gives wrong results (values off by orders of magnitude), so under
    TRITON_INTERPRET=1 bf16 is refused instead of computed."""
    if _INTERPRET and x.dtype == torch.bfloat16:
        raise TypeError("x has dtype torch.bfloat16, which the Triton backend refuses under TRITON_INTERPRET=1 (the "
                        "Triton interpreter's bf16 tl.dot gives wrong results): use float32 or float16, or another "
                        "backend (\"reference\", or \"cpu\" for CPU tensors)")


def forward_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], router_weight: Tensor, lora_a: Tensor,
                 lora_b: Tensor, scaling: float, dropout_p: float, seed: int, top_k: int):
    _refuse_interpreted_bf16(x)
    n, d_in = x.shape
    d_out = weight.shape[0]
    num_heads, rank = router_weight.shape[0], lora_a.shape[0]
    dev, dt = x.device, x.dtype
    y = _empty(n, d_out, dtype=dt, device=dev)
    h = _empty(n, rank, dtype=dt, device=dev)
    g = _empty(n, num_heads, dtype=torch.float32, device=dev)
    if n == 0:
        return y, h, g
    u = _empty(n, num_heads * rank, dtype=dt, device=dev)
    top = int(top_k) if 0 < int(top_k) < num_heads else 0
    _launch_shrink_route(x, router_weight, lora_a, h, g, u, dropout_p, seed, top)
    if _base_gemm_mode(n, d_out) == "cublas":
        if bias is None:
            torch.mm(x, weight.t(), out=y)
        else:
            torch.addmm(bias, x, weight.t(), out=y)
        y.addmm_(u, concat_heads(lora_b).t(), alpha=scaling)
    else:
        _launch_base_expand(x, weight, bias, u, lora_b, y, scaling)
    return y, h, g


_MAX_FUSED_V = 512      # fp32 columns of V kept in registers per token block


def backward_impl(dy: Tensor, x: Tensor, weight: Tensor, router_weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                  h: Tensor, g: Tensor, scaling: float, dropout_p: float, seed: int, output_mask: List[bool]):
    _refuse_interpreted_bf16(x)
    need_dx, need_dwr, need_da, need_db = (bool(m) for m in output_mask)
    n, d_in = x.shape
    num_heads, d_out, rank = lora_b.shape
    dev, dt = x.device, x.dtype
    ieee = dt == torch.float32
    h = h.contiguous()
    g = g.contiguous()
    dx = d_router = d_lora_a = d_lora_b = None

    if need_db:
        d_b_cat = _empty(d_out, num_heads * rank, dtype=lora_b.dtype, device=dev)
        if n == 0:
            d_b_cat.zero_()
        else:       # s dy^T u in one GEMM (beta = 0: the empty output is never read)
            torch.addmm(d_b_cat, dy.t(), routed_activations(g, h), beta=0, alpha=scaling, out=d_b_cat)
        d_lora_b = heads_grad(d_b_cat, lora_b)         # lora_b's layout: a view when packed

    if need_dx or need_dwr or need_da:
        has_drop, seed_u, thr, dscale = _dropout_args(dropout_p, seed)
        dh = _empty(n, rank, dtype=dt, device=dev)
        dz = _empty(n, num_heads, dtype=dt, device=dev)
        kpv, rpv = _head_pads(num_heads, rank, 2)
        if n > 0:
            from_v = not _use_fused_v(kpv * rpv)
            if from_v:
                v = torch.mm(dy, concat_heads(lora_b))                            # (N, K r) cuBLAS
                v_arg, svm = v, v.stride(0)
            else:
                v_arg, svm = dy, 0
            tile = _expand_backward_tile(kpv, rpv, from_v, dy.element_size(), _INTERPRET)
            _expand_backward_kernel[(triton.cdiv(n, tile["BLOCK_M"]),)](
                dy, lora_b, v_arg, g, h, dh, dz, n, d_out, num_heads, rank,
                dy.stride(0), dy.stride(1), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), svm,
                float(scaling), FROM_V=from_v, IEEE=ieee, KP=kpv, RP=rpv, **tile)

        kp16, rp16 = _head_pads(num_heads, rank)
        if need_dwr or need_da:
            tile = _shrink_backward_tile(rp16, _INTERPRET)
            n_dblk = triton.cdiv(d_in, tile["BLOCK_D"])
            sms = None if _INTERPRET else _sm_count(dev.index or 0)
            splits, tokens_per_split = _token_splits(n, d_in, tile["BLOCK_T"], tile["BLOCK_D"], sms)
            pwr = _empty(splits, num_heads, d_in, dtype=torch.float32, device=dev)
            pa = _empty(splits, rank, d_in, dtype=torch.float32, device=dev)
            if n == 0:
                pwr.zero_()
                pa.zero_()
            else:
                _shrink_backward_kernel[(n_dblk, splits)](
                    x, dz, dh, pwr, pa, n, d_in, num_heads, rank, tokens_per_split, x.stride(0), x.stride(1),
                    seed_u, thr, dscale, HAS_DROPOUT=has_drop, IEEE=ieee, KP=kp16, RP=rp16, **tile)
            if need_dwr:
                d_router = _empty(num_heads, d_in, dtype=router_weight.dtype, device=dev)
                d_router.copy_(pwr.sum(dim=0))
            if need_da:
                d_lora_a = _empty(rank, d_in, dtype=lora_a.dtype, device=dev)
                d_lora_a.copy_(pa.sum(dim=0))

        if need_dx:
            dx = _empty(n, d_in, dtype=dt, device=dev)
            torch.mm(dy, weight, out=dx)
            if n > 0:
                tile = _dx_tile(rp16, _INTERPRET)
                _dx_kernel[(triton.cdiv(n, tile["BLOCK_M"]), triton.cdiv(d_in, tile["BLOCK_D"]))](
                    dx, dz, dh, router_weight, lora_a, n, d_in, num_heads, rank,
                    dx.stride(0), dx.stride(1), router_weight.stride(0), router_weight.stride(1), lora_a.stride(0),
                    lora_a.stride(1), seed_u, thr, dscale, HAS_DROPOUT=has_drop, IEEE=ieee, KP=kp16, **tile)

    return tuple(t if t is not None else x.new_empty(0) for t in (dx, d_router, d_lora_a, d_lora_b))


register("triton", define("triton", forward_impl, backward_impl),
         devices=("cuda", "cpu") if _INTERPRET else None,
         dtypes=(torch.float16, torch.float32) if _INTERPRET else None,
         dtypes_reason="bfloat16 is refused under TRITON_INTERPRET=1: the interpreter's bf16 tl.dot is wrong")
