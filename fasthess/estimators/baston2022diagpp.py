"""Diag++: Hutchinson's estimator after exact low-rank deflation.

Reference: R. A. Baston and Y. Nakatsukasa (2022), "Stochastic diagonal estimation:
probabilistic bounds and an improved algorithm", arXiv:2201.10684 (the diagonal
analogue of Hutch++: Meyer, Musco, Musco and Woodruff, 2021).

With a budget of ``m`` products: ``m/3`` Gaussian sketch vectors ``S``, ``Q = orth(A S)``
(the dominant range of ``A``), ``m/3`` products ``A Q`` give ``diag(Q Qᵀ A)`` exactly,
and Hutchinson with the remaining ``m/3`` probes estimates ``diag((I - Q Qᵀ) A)``.
The sum is unbiased for every ``Q``; its variance is the off-diagonal mass of the
deflated rows, small when ``A`` has a few dominant eigenvalues (trained networks do).

fasthess deflates the **joint** Hessian of all selected parameters, not each layer
block: one batch of Hessian-vector products serves every layer at once, whereas a
per-layer ``Q`` needs tangents that are zero outside the layer, multiplying the cost
by the number of layers. The price: the ``m/3`` dominant directions are shared, so a
layer whose curvature is small next to the others' is deflated little (its error is
then about plain Hutchinson's with ``m/3`` probes; the estimator study shows where).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .hutchinson import Estimate, hutchinson
from .operator import FlatOperator


def diagpp(
    op: FlatOperator,
    num_products: int,
    *,
    distribution: str = "rademacher",
    seed: int = 0,
    target_rel_error: float | None = None,
    batch: int = 32,
    backend: str = "auto",
    log: Callable[[str], None] | None = None,
) -> Estimate:
    """Diag++ estimate of ``diag(A)`` from at most ``num_products`` products.

    Args:
        op: the symmetric matrix ``A``.
        num_products: total products: rank ``k = num_products // 3`` (at most ``n``),
            ``2k`` products for the deflation and the rest as residual probes.
        distribution: residual probe distribution.
        seed: seed of sketch vectors (indices ``0..k-1``) and probes (from ``k``).
        target_rel_error: stop the residual probes early (see :func:`hutchinson`).
        batch: directions per call of ``op``.
        backend: Welford kernel backend.
        log: progress callback.

    Returns:
        :class:`Estimate`; ``stderr`` is the residual's standard error given ``Q``
        (exact, since ``diag(Q Qᵀ A)`` carries no error given ``Q``); ``info["rank"] = k``.

    Example:
        >>> A = torch.diag(torch.tensor([100.0, 1.0, 1.0, 1.0], dtype=torch.float64)) + 0.1
        >>> est = diagpp(FlatOperator.from_matrix(A, [(4,)]), 9, seed=0)
        >>> bool(((est.values - A.diagonal()).abs() < 5 * est.stderr + 1e-9).all()), est.info["rank"]
        (True, 3)
    """
    if num_products < 6:
        raise ValueError(f"Diag++ needs num_probes >= 6 (rank, its products and >= 2 residual probes); got {num_products}")
    k = min(num_products // 3, op.n)
    S = op.probes(0, k, "gaussian", seed)
    Y = torch.cat([op(S[i : i + batch]) for i in range(0, k, batch)])
    Q = torch.linalg.qr(Y.T).Q  # (n, k), orthonormal basis of A's sketched range
    AQ = torch.cat([op(Q.T[i : i + batch]) for i in range(0, k, batch)])  # (k, n)
    exact_part = (Q.T * AQ).sum(0)  # diag(Q Qᵀ A); A symmetric so (Qᵀ A)ᵀ = A Q
    if log is not None:
        log(f"diag++: rank {k} deflation done")

    def deflate(Z: torch.Tensor, AZ: torch.Tensor) -> torch.Tensor:
        return AZ - (AZ @ Q) @ Q.T  # ((I - Q Qᵀ) A z)ᵀ for each row z

    residual = hutchinson(
        op,
        max(2, num_products - 2 * k),
        distribution=distribution,
        seed=seed,
        target_rel_error=target_rel_error,
        batch=batch,
        first_probe=k,
        correct=deflate,
        backend=backend,
        log=log,
    )
    return Estimate(exact_part + residual.values, residual.stderr, residual.probes, {**residual.info, "rank": k})
