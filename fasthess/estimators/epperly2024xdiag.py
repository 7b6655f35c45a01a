"""XDiag: the exchangeable low-rank-plus-Hutchinson diagonal estimator.

Reference: E. N. Epperly, J. A. Tropp and R. J. Webber (2024), "XTrace: making the most
of every sample in stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45(1)
(section 2.4, XDiag), arXiv:2301.07825.

With ``m`` Rademacher test vectors ``w_1..w_m`` (``2m`` products: ``Y = A W`` and ``A Q``),
XDiag averages ``m`` Diag++-type estimates; the ``i``-th deflates with the range of ``Y``
*without* column ``i`` and runs Hutchinson on the complement with ``w_i`` itself, so every
product serves both the low-rank part and the residual. The leave-one-out projections
come in closed form from one QR of ``Y`` (``Q_{-i} Q_{-i}ᵀ = Q (I - s_i s_iᵀ) Qᵀ`` with
``s_i`` the normalised ``i``-th column of ``R⁻ᵀ``).

As in Diag++, the **joint** Hessian of all selected parameters is deflated (one set of
products for every layer; see :mod:`.baston2022diagpp`). The standard error is the
XTrace-style ``std_i(d_i) / sqrt(m)`` over the ``m`` exchangeable estimates ``d_i``: a
heuristic (the ``d_i`` share the sketch), checked for calibration in the tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .hutchinson import Estimate
from .operator import FlatOperator


def xdiag(
    op: FlatOperator,
    num_products: int,
    *,
    seed: int = 0,
    batch: int = 32,
    log: Callable[[str], None] | None = None,
) -> Estimate:
    """XDiag estimate of ``diag(A)`` from ``2 · (num_products // 2)`` products.

    Args:
        op: the symmetric matrix ``A``.
        num_products: budget; ``m = num_products // 2`` test vectors (``2 <= m <= n``).
        seed: seed of the Rademacher test vectors.
        batch: directions per call of ``op``.
        log: progress callback.

    Returns:
        :class:`Estimate`; ``info["rank"] = m``.

    Example:
        >>> L = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> A = L @ L.T + 0.01 * torch.eye(8, dtype=torch.float64)  # rank 2 plus a little
        >>> est = xdiag(FlatOperator.from_matrix(A, [(2, 4)]), 6, seed=0)
        >>> bool((est.values - A.diagonal()).abs().max() < 0.05), est.info["rank"]
        (True, 3)
    """
    m = num_products // 2
    if m < 2:
        raise ValueError(f"XDiag needs num_probes >= 4 (two test vectors, each two products); got {num_products}")
    if m > op.n:
        raise ValueError(
            f"XDiag with {m} test vectors needs at most as many as diagonal entries ({op.n}); "
            "lower num_probes or use method='exact'"
        )
    W = op.probes(0, m, "rademacher", seed).T  # (n, m)
    Y = torch.cat([op(W.T[i : i + batch]) for i in range(0, m, batch)]).T  # (n, m)
    Q, C, S = _leave_one_out_bases(Y)
    Z = torch.cat([op(Q.T[i : i + batch]) for i in range(0, Q.shape[1], batch)]).T  # A Q, (n, r)
    if log is not None:
        log(f"xdiag: {m + Q.shape[1]} products done")
    QS, ZS = Q @ S, Z @ S
    # d_i = diag(Q_{-i} Q_{-i}ᵀ A) + w_i ⊙ (I - Q_{-i} Q_{-i}ᵀ) A w_i, one column per i (Rademacher: w_i² = 1),
    # with Q_{-i} Q_{-i}ᵀ = Q (I - s_i s_iᵀ) Qᵀ and Qᵀ y_i = c_i
    D = (Q * Z).sum(1, keepdim=True) - QS * ZS + W * (Y - Q @ C) + W * QS * (S * C).sum(0)
    return Estimate(D.mean(1), D.std(1) / m**0.5, m, {"rank": Q.shape[1]})


def _leave_one_out_bases(Y: torch.Tensor, rtol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Q`` (n, r) orthonormal basis of range(Y), ``C = Qᵀ Y`` (r, m), and ``S`` (r, m).

    Column ``s_i`` of ``S`` is the unit vector of range(C) orthogonal to every column
    of ``C`` but the ``i``-th, so ``Q (I - s_i s_iᵀ) Qᵀ`` projects onto range(Y without
    column i); it is zero when column ``i`` depends on the others (then dropping it
    changes nothing). For full-rank ``Y`` this is the normalised ``i``-th column of
    ``R⁻ᵀ`` of the paper; the rank-aware form keeps low-rank matrices (rank < m) and
    repeated probes finite, and each projection depends on the other test vectors only,
    which is what keeps the estimate unbiased.
    """
    Q, R = torch.linalg.qr(Y)
    U, sigma, _ = torch.linalg.svd(R)
    r = int((sigma > rtol * sigma[0]).sum()) if sigma.numel() and sigma[0] > 0 else 0
    Q = Q @ U[:, :r]
    C = Q.T @ Y
    m = Y.shape[1]
    S = torch.zeros(r, m, dtype=Y.dtype, device=Y.device)
    for i in range(m):
        others = torch.cat([C[:, :i], C[:, i + 1 :]], dim=1)
        Ui, si, _ = torch.linalg.svd(others, full_matrices=True)
        rank = int((si > rtol * sigma[0]).sum())
        if rank < r:
            S[:, i] = Ui[:, r - 1]  # r - rank == 1 here: one direction is lost by dropping column i
    return Q, C, S
