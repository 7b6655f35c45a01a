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
