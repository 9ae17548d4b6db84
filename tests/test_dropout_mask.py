"""Statistical checks of the counter-based dropout mask (ilora_kernels/_dropout.py), the mask every backend
regenerates from (seed, token, feature) instead of Philox (see the module docstring for why).

Each check compares an empirical frequency with its binomial expectation and fails beyond 6 standard deviations
(or a chi-square beyond its mean + 6 sd), so a false alarm has odds of about 1e-9 while a biased, periodic or
correlated mask (the hash replaced by something weaker) fails by a wide margin."""

from __future__ import annotations

import math

import pytest
import torch

from ilora_kernels._dropout import keep_mask, keep_threshold

ROWS, COLS = 2048, 1024  # 2M elements


def expected_keep(p: float) -> float:
    return 1.0 - keep_threshold(p) / 2.0**24


def assert_rate(hits: float, trials: int, prob: float, what: str) -> None:
    sd = math.sqrt(trials * prob * (1.0 - prob))
    mean = trials * prob
    assert abs(hits - mean) <= 6.0 * sd, f"{what}: {hits} of {trials}, expected {mean:.1f} +- {sd:.1f}"


def assert_chi_square(counts: torch.Tensor, trials_each: int, prob: float, what: str) -> None:
    """Counts of kept elements per group (rows or columns) against Binomial(trials_each, prob)."""
    var = trials_each * prob * (1.0 - prob)
    chi2 = (((counts.double() - trials_each * prob) ** 2) / var).sum().item()
    dof = counts.numel()
    assert chi2 <= dof + 6.0 * math.sqrt(2.0 * dof), f"{what}: chi-square {chi2:.0f} for {dof} groups"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2**31 - 1])
def test_keep_rate_per_row_and_per_column(p, seed):
    mask = keep_mask(seed, ROWS, COLS, p)
    q = expected_keep(p)
    assert_rate(mask.sum().item(), mask.numel(), q, "overall keep rate")
    assert_chi_square(mask.sum(dim=1), COLS, q, "per-row keep counts")
    assert_chi_square(mask.sum(dim=0), ROWS, q, "per-column keep counts")


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_neighbours_are_independent(p):
    """Adjacent features, adjacent tokens and masks of adjacent seeds: joint keep rates are q^2."""
    q = expected_keep(p)
    mask = keep_mask(7, ROWS, COLS, p)
    other_seed = keep_mask(8, ROWS, COLS, p)
    pairs = {
        "feature j and j + 1": (mask[:, :-1] & mask[:, 1:]),
        "token i and i + 1": (mask[:-1] & mask[1:]),
        "feature j and j + 64": (mask[:, :-64] & mask[:, 64:]),
        "seed s and s + 1": (mask & other_seed),
    }
    for what, both in pairs.items():
        assert_rate(both.sum().item(), both.numel(), q * q, what)


def test_no_short_period_along_features_or_tokens():
    """The mask never repeats with a period below 4096 along a row or a column (a weak hash would)."""
    mask = keep_mask(123, 512, 4096, 0.5)
    for shift in (1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048):
        same = (mask[:, :-shift] == mask[:, shift:]).float().mean().item()
        assert abs(same - 0.5) < 0.01, (shift, same)
    for shift in (1, 2, 4, 64, 256):
        same = (mask[:-shift] == mask[shift:]).float().mean().item()
        assert abs(same - 0.5) < 0.01, (shift, same)


def test_threshold_resolution():
    """p is resolved to 2^-24: the keep probability of any p is within 6e-8 of 1 - p."""
    for p in (1e-6, 0.1, 1.0 / 3.0, 0.5, 0.999):
        assert abs(expected_keep(p) - (1.0 - p)) < 6e-8
