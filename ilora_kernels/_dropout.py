"""Counter-based dropout shared by every backend.

The keep mask of element (row, col) is a pure function of (seed, row, col), so forward and backward
regenerate it instead of storing it, and every backend (reference, C++ CPU, CUDA, Triton) draws the
same mask from the same seed. The hash is murmur3's 32-bit finaliser; all arithmetic is modulo 2**32.

    r    = fmix32(row * 0x9E3779B9 + seed)
    bits = fmix32(r ^ (col * 0x85EBCA77))
    keep = (bits >> 8) >= threshold(p)            threshold(p) = floor(p * 2**24)

Kept elements are scaled by 1 / (1 - p).

Why not Philox (Triton's ``tl.rand``, cuRAND, torch's CUDA generator): a mask that the reference, the C++ CPU, the
CUDA and the Triton backends reproduce bit for bit needs one generator written four times, and Philox-4x32-10 is
ten rounds of 32x32 -> 64-bit multiplies per four values. One murmur3 finaliser per element is a few integer
operations in every language involved, and the masks it gives pass the checks of tests/test_dropout_mask.py (keep
rates per token and per feature, independence of neighbouring features, tokens and seeds, no short periods). Row
keys are distinct within a mask (row * 0x9E3779B9 is a bijection mod 2**32, and so is fmix32); two masks drawn
with different seeds share some row keys only at the 2**-32-per-pair rate of any 32-bit counter space.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
ROW_MULT = 0x9E3779B9
COL_MULT = 0x85EBCA77
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35


def keep_threshold(p: float) -> int:
    """Integer threshold on the 24 high bits of the hash: an element is kept when bits >= threshold."""
    return int(p * 16777216.0)


def seed32(seed: int) -> int:
    return int(seed) & MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * FMIX_C1) & MASK32
    h = h ^ (h >> 13)
    h = (h * FMIX_C2) & MASK32
    return h ^ (h >> 16)


def keep_mask(seed: int, n_rows: int, n_cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean (n_rows, n_cols) keep mask for dropout probability p (int64 arithmetic, wraps like uint32)."""
    rows = torch.arange(n_rows, device=device, dtype=torch.int64).unsqueeze(1)
    cols = torch.arange(n_cols, device=device, dtype=torch.int64).unsqueeze(0)
    r = _fmix32(((rows & MASK32) * ROW_MULT + seed32(seed)) & MASK32)
    bits = _fmix32(r ^ (((cols & MASK32) * COL_MULT) & MASK32))
    return (bits >> 8) >= keep_threshold(p)


def apply_dropout(x2d: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """dropout_p(x) for a 2-D (N, d_in) tensor with the counter-based mask; identity when p == 0."""
    if p == 0.0:
        return x2d
    mask = keep_mask(seed, x2d.shape[0], x2d.shape[1], p, device=x2d.device)
    return x2d * mask.to(x2d.dtype) * (1.0 / (1.0 - p))
