"""Variance-reduced diagonal estimators and the GGN, tested against dense float64 matrices (fixed seeds).

Hessians come from ``jacrev(jacrev)`` and GGNs from ``Jᵀ H_ℓ J`` with dense Jacobians
(tests/zoo.py). Each estimator is checked for unbiasedness (mean over repeats), for the
calibration of its reported standard errors, and for its variance against plain
Hutchinson at an equal budget; ``fasthess.diag`` is checked to compute exactly what the
estimator computes on the dense matrix with the same probes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tolerances import (
    ADAPTIVE_TRUE_ERROR_FACTOR,
    DEFLATION_MSE_GAIN,
    ESTIMATOR_BIAS_Z,
    HUTCHINSON_MSE_BAND,
    NOISE_BIAS_PREDICTION_BAND,
    SAME_PROBES_RTOL,
    STDERR_CALIBRATION_BAND,
    XDIAG_STDERR_BAND,
    assert_entries_close,
)
from zoo import ZOO, dense_ggn, full_hessian

import fasthess
from fasthess.errors import LossError
from fasthess.estimators import FlatOperator, control_variate, diagpp, hutchinson, xdiag

LAYER = "2.weight"  # 42 entries of the MLP's middle layer
REPEATS = 120


@pytest.fixture(scope="module")
def mlp():
    case = ZOO["mlp"]()
    return case, full_hessian(case, LAYER), dense_ggn(case, LAYER)


def split(case):
    return fasthess.OutputsAndLoss(case.outputs, case.criterion)


def dense(M: torch.Tensor) -> FlatOperator:
    return FlatOperator.from_matrix(M, [(M.shape[0],)])


ESTIMATORS = {
    "hutchinson": lambda H, G, m, s: hutchinson(dense(H), m, seed=s),
    "diagpp": lambda H, G, m, s: diagpp(dense(H), m, seed=s),
    "xdiag": lambda H, G, m, s: xdiag(dense(H), m, seed=s),
    "control_variate": lambda H, G, m, s: control_variate(dense(H), dense(G), G.diagonal(), m, seed=s),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_unbiased_and_calibrated_on_the_dense_hessian(mlp, name: str) -> None:
    _, H, G = mlp
    runs = [ESTIMATORS[name](H, G, 12, s) for s in range(REPEATS)]
    values = torch.stack([r.values for r in runs])
    err = values - H.diagonal()
    sem = values.std(0) / REPEATS**0.5
    z = err.mean(0) / sem.clamp_min(1e-300)
    assert float(z.abs().max()) < ESTIMATOR_BIAS_Z, f"{name}: bias z-scores {z}"
    reported = torch.stack([r.stderr**2 for r in runs]).mean(0).sum()
    ratio = float(reported / values.var(0).sum())
    lo, hi = XDIAG_STDERR_BAND if name == "xdiag" else STDERR_CALIBRATION_BAND
    assert lo < ratio < hi, f"{name}: reported/empirical variance {ratio:.3f}"


def test_control_variate_variance_is_the_residuals(mlp) -> None:
    """Per entry, Var = Σ_{j≠i} (H − G)_ij² / K: mean squared standardised error ≈ 1."""
    _, H, G = mlp
    D = H - G
    K = 12
    sigma = (((D**2).sum(1) - D.diagonal() ** 2) / K).sqrt()
    z = torch.stack([(ESTIMATORS["control_variate"](H, G, K, s).values - H.diagonal()) / sigma for s in range(REPEATS)])
    lo, hi = HUTCHINSON_MSE_BAND
    assert lo < float((z**2).mean()) < hi


@pytest.mark.parametrize("name", ["diagpp", "xdiag"])
def test_deflation_beats_hutchinson_when_one_eigenvalue_dominates(mlp, name: str) -> None:
    _, H, G = mlp
    evals, V = torch.linalg.eigh(H)
    spiked = H + 50 * float(evals.abs().max()) * torch.outer(V[:, -1], V[:, -1])  # a trained-network-like outlier

    def mse(which: str) -> float:
        errs = torch.stack([ESTIMATORS[which](spiked, G, 12, s).values - spiked.diagonal() for s in range(100)])
        return float((errs**2).mean())

    assert mse("hutchinson") > DEFLATION_MSE_GAIN * mse(name)


@pytest.mark.parametrize("reduction", [None, "diagpp", "xdiag", "ggn"])
def test_diag_computes_the_estimator_on_the_hessian(mlp, reduction) -> None:
    """fasthess.diag(..., variance_reduction=…) equals the estimator on the dense float64 Hessian, same probes."""
    case, H, G = mlp
    res = fasthess.diag(
        case.model, split(case), [LAYER], method="hutchinson", num_probes=12, seed=3, variance_reduction=reduction
    )
    key = {None: "hutchinson", "ggn": "control_variate"}.get(reduction, reduction)
    want = ESTIMATORS[key](H, G, 12, 3)
    got = res[LAYER]
    assert_entries_close(got.values, want.values, SAME_PROBES_RTOL, SAME_PROBES_RTOL, f"{reduction} values")
    assert_entries_close(got.stderr, want.stderr, SAME_PROBES_RTOL, SAME_PROBES_RTOL, f"{reduction} stderr")
    assert res.meta["variance_reduction"] == reduction and res.meta["hvps"] == 12
    assert res.meta["ggn_products"] == (12 if reduction == "ggn" else 0)


def test_ggn_exact_and_monte_carlo(mlp) -> None:
    case, H, G = mlp
    exact = fasthess.diag(case.model, split(case), [LAYER, "4.weight"], method="ggn")
    assert exact.meta["method"] == "ggn" and "NOT the Hessian" in exact.meta["quantity"]
    assert_entries_close(exact[LAYER].values, G.diagonal(), 1e-8, 1e-10, "exact GGN diagonal")
    # the last layer enters the outputs linearly: there the GGN is the Hessian
    assert_entries_close(
        exact["4.weight"].values, full_hessian(case, "4.weight").diagonal(), 1e-8, 1e-10, "GGN = H on the last layer"
    )
    runs = [fasthess.diag(case.model, split(case), [LAYER], method="ggn_mc", num_probes=8, seed=s)[LAYER] for s in range(60)]
    values = torch.stack([r.values for r in runs])
    assert bool((values >= 0).all())  # every sample is a square
    z = (values.mean(0) - G.diagonal()) / (values.std(0) / 60**0.5).clamp_min(1e-300)
    assert float(z.abs().max()) < ESTIMATOR_BIAS_Z
    ratio = float(torch.stack([r.stderr**2 for r in runs]).mean(0).sum() / values.var(0).sum())
    assert STDERR_CALIBRATION_BAND[0] < ratio < STDERR_CALIBRATION_BAND[1]


def test_ggn_on_a_transformer_encoder_matches_the_dense_ggn() -> None:
    case = ZOO["encoder"]()
    name = "encoder.layers.1.linear1.weight"
    got = fasthess.diag(case.model, split(case), [name], method="ggn")[name].values
    assert_entries_close(got, dense_ggn(case, name).diagonal(), 1e-8, 1e-10, "encoder GGN diagonal")


def test_adaptive_stopping_reaches_its_target(mlp) -> None:
    case, H, _ = mlp
    target = 0.1
    true_errors, used = [], []
    for s in range(8):
        res = fasthess.diag(case.model, case.loss, [LAYER], method="hutchinson", num_probes=5000, seed=s,
                            target_rel_error=target, chunk_size=8)
        assert res.meta["converged"] and max(res.meta["relative_errors"]) <= target
        used.append(res.meta["probes_used"])
        true_errors.append(float((res[LAYER].values - H.diagonal()).norm() / H.diagonal().norm()))
    assert max(used) < 5000
    assert sorted(true_errors)[len(true_errors) // 2] < ADAPTIVE_TRUE_ERROR_FACTOR * target


def test_adaptive_stopping_warns_when_the_budget_is_too_small(mlp) -> None:
    case, _, _ = mlp
    with pytest.warns(UserWarning, match="target_rel_error=0.001 not reached"):
        res = fasthess.diag(case.model, case.loss, [LAYER], method="hutchinson", num_probes=12, target_rel_error=1e-3)
    assert res.meta["probes_used"] == 12 and not res.meta["converged"]


def test_confidence_intervals_cover_at_their_level(mlp) -> None:
    case, H, _ = mlp
    inside = []
    for s in range(20):
        lo, hi = fasthess.diag(case.model, case.loss, [LAYER], method="hutchinson", num_probes=40, seed=s)[LAYER].confidence_interval(0.9)
        inside.append(((lo <= H.diagonal()) & (H.diagonal() <= hi)).double().mean())
    coverage = float(torch.stack(inside).mean())  # 840 entry-runs
    assert 0.85 < coverage < 0.95


def test_bad_requests_name_the_fix(mlp) -> None:
    case, _, _ = mlp
    with pytest.raises(LossError, match="OutputsAndLoss"):
        fasthess.diag(case.model, case.loss, [LAYER], method="ggn")
    with pytest.raises(LossError, match="OutputsAndLoss"):
        fasthess.diag(case.model, case.loss, [LAYER], method="hutchinson", variance_reduction="ggn")
    with pytest.raises(ValueError, match="cannot stop adaptively"):
        fasthess.diag(case.model, case.loss, [LAYER], method="hutchinson", variance_reduction="xdiag", target_rel_error=0.1)
    with pytest.raises(ValueError, match="Rademacher"):
        fasthess.diag(case.model, case.loss, [LAYER], method="hutchinson", variance_reduction="xdiag", probe="gaussian")
    with pytest.raises(ValueError, match="unknown variance_reduction"):
        fasthess.diag(case.model, case.loss, [LAYER], method="hutchinson", variance_reduction="hutch++")
    with pytest.raises(ValueError, match="method='hutchinson' only"):
        fasthess.diag(case.model, case.loss, [LAYER], method="sampled", variance_reduction="diagpp")


def test_r_med_warnings_and_intervals(mlp) -> None:
    case, H, _ = mlp
    noisy = fasthess.diag(case.model, case.loss, [LAYER], method="hutchinson", num_probes=4)
    with pytest.warns(UserWarning, match="unreliable"):
        noisy.r_med()
    with pytest.raises(ValueError, match="method='sampled'"):
        noisy.r_med_ci()
    with pytest.warns(UserWarning, match="NOT of the Hessian"):
        fasthess.diag(case.model, split(case), [LAYER], method="ggn").r_med()
    sampled = fasthess.diag(case.model, case.loss, [LAYER], num_samples=30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact entries: no warning
        r, lo, hi = sampled.r_med_ci(num_boot=500)[LAYER]
    assert lo <= r <= hi and hi > lo
    exact = fasthess.diag(case.model, case.loss, [LAYER], method="exact")
    assert exact.r_med_ci()[LAYER] == (exact.r_med()[LAYER],) * 3


def test_noise_bias_of_r_med_is_predicted(mlp) -> None:
    """Re-noising predicts the sign of the bias Hutchinson noise puts on R_med, and a part of its size.

    Here the noise inflates the small median more than the max, so R_med is biased low.
    """
    case, H, _ = mlp
    true = fasthess.stats.r_med(H.diagonal())
    measured, predicted = [], []
    for s in range(20):
        d = fasthess.diag(case.model, case.loss, [LAYER], method="hutchinson", num_probes=20, seed=s)[LAYER]
        measured.append(fasthess.stats.r_med(d.values) - true)
        predicted.append(fasthess.stats.r_med_noise_bias(d.values, d.stderr, seed=s)["bias"])
    m, p = sum(measured) / 20, sum(predicted) / 20
    lo, hi = NOISE_BIAS_PREDICTION_BAND
    assert lo < p / m < hi, (m, p)
