"""Every tolerance the tests use, in one table.

Entries are compared as ``|got - want| <= atol_rel * max|want| + rtol * |want|``
per layer: ``rtol`` bounds the relative error of each entry, ``atol_rel`` (scaled
by the layer's largest entry) covers entries that are zero up to round-off.
"""

from __future__ import annotations

import torch

# (dtype, engine) -> (rtol, atol_rel)
ENGINE_VS_DENSE = {
    (torch.float64, "double_backward"): (1e-6, 1e-9),
    (torch.float64, "fwd_rev"): (1e-6, 1e-9),
    (torch.float64, "fwd_fwd"): (1e-6, 1e-9),
    (torch.float64, "tangent_adjoint"): (1e-6, 1e-9),
    (torch.float32, "double_backward"): (1e-3, 1e-4),
    (torch.float32, "fwd_rev"): (1e-3, 1e-4),
    (torch.float32, "fwd_fwd"): (1e-3, 1e-4),
    (torch.float32, "tangent_adjoint"): (1e-3, 1e-4),
}

# fasthess.diag on 2 ranks (any sharding) against one process, float64: only the
# order of the sums differs. (rtol, atol_rel) as for ENGINE_VS_DENSE.
DISTRIBUTED_VS_SINGLE = (1e-9, 1e-12)

# fasthess.rows / fasthess.block (HVP engines) against a dense Hessian or diagonal:
# dtype -> (rtol, atol_rel), as in ENGINE_VS_DENSE
BLOCK_VS_DENSE = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-3, 1e-4),
}

# Kernel backends against their pure-torch reference: dtype -> (rtol, atol)
KERNEL_VS_REFERENCE = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
}

# Hutchinson statistics (fixed seeds): mean squared standardised error must lie
# within this factor of 1, and the error ratio between K and 16K probes within
# this band around the 1/sqrt(K) prediction of 4.
HUTCHINSON_MSE_BAND = (0.7, 1.3)
HUTCHINSON_RATE_BAND = (3.0, 5.3)


def assert_entries_close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol_rel: float, what: str) -> None:
    got, want = got.double(), want.double()
    scale = float(want.abs().max())
    bound = atol_rel * scale + rtol * want.abs()
    err = (got - want).abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{what}: entry {worst} got {float(got[worst]):.10e}, want {float(want[worst]):.10e} "
        f"(|err| {float(err[worst]):.3e} > bound {float(bound[worst]):.3e})"
    )

# Attention 2-jet kernels (o, o1, o2) against the nested-jvp reference: dtype -> (rtol, atol).
# float32: o2 sums terms that cancel (P2 = P(s2 - μ2 + (s1 - μ1)² - σ1²)), so it keeps ~5 digits.
ATTENTION_JET2_VS_REFERENCE = {
    torch.float64: (1e-10, 1e-11),
    torch.float32: (2e-4, 2e-4),
}
# Triton attention at precision="tf32x3" (each float32 product as three TF32 tensor-core products) is held
# to the float32 tolerance above, and its largest error to at most this multiple of precision="ieee"'s
# on the same inputs (CPU emulation of the tensor-core rounding, tests/tensor_core_emulation.py: up to 2.3x).
ATTENTION_TF32X3_VS_IEEE_ERROR = 4.0
# precision="tf32" (one TF32 product, 10-bit mantissa): (rtol, atol). Largest errors are 1.5-5e-3 of the
# largest entry (emulated; H200 benchmark 2.1-4.6e-3), 50x the float32 tolerance at worst.
ATTENTION_JET2_TF32_VS_REFERENCE = (3e-2, 3e-2)
# Reference 2-jet against a central second difference of o(t) in float64 (step 1e-3: error ~1e-6).
ATTENTION_FINITE_DIFFERENCE = (1e-4, 1e-5)

# Rademacher probes regenerated from a seed (fixed seeds): |mean| of 10^5 signs below this (5.5 sigma),
# and the fraction of agreeing signs of two different seeds within 0.5 ± this.
RADEMACHER_MEAN_BOUND = 0.0175
RADEMACHER_AGREEMENT_BAND = 0.0175

# Variance-reduced estimators (tests/test_estimators.py, fixed seeds).
# Unbiasedness: over R repeats, each entry's mean error divided by its standard error
# of the mean is ~N(0, 1); the largest |z| over a layer's entries stays below this.
ESTIMATOR_BIAS_Z = 4.5
# Reported standard errors: mean reported variance / empirical variance over repeats.
STDERR_CALIBRATION_BAND = (0.75, 1.3)
# XDiag's std_i(d_i)/sqrt(m) is a heuristic (the d_i share the sketch): a looser band.
XDIAG_STDERR_BAND = (0.5, 2.0)
# Diag++ / XDiag must beat plain Hutchinson's mean squared error at an equal budget
# on a dense Hessian with a dominant eigenvalue by at least this factor.
DEFLATION_MSE_GAIN = 1.5
# Plumbing: fasthess.diag against the same estimator on the dense float64 Hessian
# with the same seed (same probes): equal up to round-off.
SAME_PROBES_RTOL = 1e-8
# Adaptive stopping: the true relative error at the stop, median over seeds, is at
# most this multiple of target_rel_error.
ADAPTIVE_TRUE_ERROR_FACTOR = 1.5
# stats.r_med_noise_bias against the bias of Hutchinson R_med measured with the exact
# diagonal (mean over 20 seeds): predicted / measured. Re-noising an already noisy
# estimate under-predicts (measured on the zoo MLP: 0.41-0.45), hence a wide band.
NOISE_BIAS_PREDICTION_BAND = (0.2, 2.0)

# Layer-norm and GELU 2-jet kernels (y, y1, y2) against their nested-jvp references: dtype -> (rtol, atol).
# float32/bfloat16 inputs are the float64 inputs rounded; the reference runs on the float64 ones.
POINTWISE_JET2_VS_REFERENCE = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (3e-2, 3e-2),
}
# The float64 references against dense jacrev∘jacrev of F.layer_norm / autograd of F.gelu (round-off only),
# and against a central second difference (step 1e-3: error ~1e-6).
POINTWISE_JET2_VS_DENSE = (1e-9, 1e-11)
POINTWISE_FINITE_DIFFERENCE = (1e-4, 1e-5)

# Attention HVP kernels (dq, dk, dv and their tangents) against the jvp-of-vjp reference: dtype -> (rtol, atol).
# float32/bfloat16 inputs are the float64 inputs rounded; the reference runs on the float64 ones.
ATTENTION_HVP_VS_REFERENCE = {
    torch.float64: (1e-10, 1e-11),
    torch.float32: (2e-4, 2e-4),
    torch.bfloat16: (5e-2, 1e-1),
}
# The float64 reference against the dense reverse-over-reverse Hessian (round-off only), and against a
# central difference of the backward (step 1e-4: truncation ~1e-8).
ATTENTION_HVP_VS_DENSE = (1e-9, 1e-11)
ATTENTION_HVP_FINITE_DIFFERENCE = (1e-6, 1e-7)

# Cross-entropy 2-jet kernels (loss, loss1, loss2) against the nested-jvp reference: dtype -> (rtol, atol).
# CPU backends: float32 inputs are the float64 inputs rounded, the reference runs on the float64 ones;
# Triton and CUDA tests run the reference in float64 on the rounded inputs (bfloat16: the outputs' rounding).
CROSS_ENTROPY_JET2_VS_REFERENCE = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (3e-2, 3e-2),
}

# Hand-written op rules (tests/test_op_rules.py) against float64 central differences of their op on random
# inputs (step 1e-3: truncation ~1e-6): (rtol, atol_rel) as in ENGINE_VS_DENSE. Also the dense reference against
# central differences (step 1e-4) of torch's gradient where torch has no double backward.
RULE_FINITE_DIFFERENCE = (1e-4, 1e-5)
# Decompositions (fasthess.decompositions) against torch's function, float64: values and first derivatives
# differ only in the order of sums. (rtol, atol)
DECOMPOSITION_VS_TORCH = (1e-12, 1e-12)
# Activation rules' f' and f'' at their kinks against torch's backward and double backward: rtol (torch's
# backward rounds 1/6 in hardsigmoid and 1/alpha in celu to float32; any other difference is O(1)).
ACTIVATION_KINKS_VS_TORCH = 1e-7

# Op-coverage sweep (tests/op_sweep.py): the reverse-over-reverse Hessian diagonal against central
# differences of torch's gradient (relative step 1e-5), (rtol, atol_rel) as for ENGINE_VS_DENSE but with
# atol_rel scaled by the largest entry of the whole case. Measured over the 575 cases: at most 6.7e-8 of
# that scale (x ** -2 near 0), 0.6 % of the bound; the bugs hunted are off by 0.1-10. Also the tolerance
# of the engines where torch has no second-order path and the finite differences are the reference.
OP_SWEEP_FINITE_DIFFERENCE = (1e-5, 1e-6)
