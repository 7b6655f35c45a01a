"""Hutchinson's estimator, tested statistically against the dense float64 Hessian (fixed seeds).

For a probe z with E[z zᵀ] = I, the sample s = z ⊙ Hz has E[s_i] = H_ii and
Var(s_i) = Σ_{j≠i} H_ij² (Rademacher) or Σ_{j≠i} H_ij² + 2 H_ii² (Gaussian).
"""

from __future__ import annotations

import pytest
import torch
from tolerances import HUTCHINSON_MSE_BAND, HUTCHINSON_RATE_BAND
from zoo import ZOO, full_hessian

import fasthess

LAYER = "2.weight"  # 42 entries of the MLP's middle layer


@pytest.fixture(scope="module")
def setup():
    case = ZOO["mlp"]()
    H = full_hessian(case, LAYER)
    return case, H


def sample_variance(H: torch.Tensor, distribution: str) -> torch.Tensor:
    off = (H**2).sum(1) - H.diagonal() ** 2
    return off if distribution == "rademacher" else off + 2 * H.diagonal() ** 2


def runs(case, num_probes: int, seeds: range, distribution: str = "rademacher"):
    return [
        fasthess.diag(case.model, case.loss, [LAYER], method="hutchinson", num_probes=num_probes, seed=s, probe=distribution)[LAYER]
        for s in seeds
    ]


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_error_matches_the_theoretical_variance(setup, distribution: str) -> None:
    """Mean squared standardised error ≈ 1: unbiased, with exactly the predicted spread."""
    case, H = setup
    K = 50
    sigma = (sample_variance(H, distribution) / K).sqrt()
    z = torch.stack([(r.values - H.diagonal()) / sigma for r in runs(case, K, range(30), distribution)])
    lo, hi = HUTCHINSON_MSE_BAND
    assert lo < float((z**2).mean()) < hi
    # no systematic bias: the mean standardised error over 30 runs x 42 entries is ~ N(0, 1/1260)
    assert abs(float(z.mean())) < 4 / 1260**0.5


def test_reported_standard_errors_are_calibrated(setup) -> None:
    case, H = setup
    K = 50
    true_var = sample_variance(H, "rademacher") / K
    reported = torch.stack([r.stderr**2 for r in runs(case, K, range(30))]).mean(0)
    ratio = float(reported.sum() / true_var.sum())
    assert 0.85 < ratio < 1.15


def test_error_shrinks_like_one_over_sqrt_k(setup) -> None:
    case, H = setup

    def rms(K: int) -> float:
        errs = torch.stack([r.values - H.diagonal() for r in runs(case, K, range(100, 120))])
        return float(errs.pow(2).mean().sqrt())

    lo, hi = HUTCHINSON_RATE_BAND
    assert lo < rms(16) / rms(256) < hi  # 1/sqrt(K) predicts 4
