"""Hutchinson with a control variate: estimate ``diag(H − G)`` and add ``diag(G)`` exactly.

References: control variates, A. B. Owen (2013), "Monte Carlo theory, methods and
examples", chapter 8; the generalised Gauss-Newton matrix as the exactly computable
part of the Hessian ``H = G + Σ_o (∂ℓ/∂f_o) ∇²f_o``: N. N. Schraudolph (2002), "Fast
curvature matrix-vector products for second-order gradient descent", Neural
Computation 14(7).

``diag(H) = diag(G) + E[z ⊙ (H − G) z]``: unbiased whatever ``G`` is, with variance
``Σ_{j≠i} (H − G)_ij²`` instead of ``Σ_{j≠i} H_ij²``. It helps where the residual term
is small (losses near a fit, where ``∂ℓ/∂f ≈ 0``) and costs, per probe, one GGN-vector
product on top of the Hessian-vector product, plus the exact ``diag(G)`` once
(one vector-Jacobian product per network output; see :mod:`.ggn`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .hutchinson import Estimate, hutchinson
from .operator import FlatOperator


def control_variate(
    hessian: FlatOperator,
    control: FlatOperator,
    control_diagonal: Tensor,
    num_probes: int,
    **hutchinson_kwargs,
) -> Estimate:
    """``diag(control) + Hutchinson(hessian − control)``.

    Args:
        hessian: the matrix ``H`` whose diagonal is wanted.
        control: ``G``, applied to the same probes.
        control_diagonal: ``(n,)`` exact ``diag(G)``.
        num_probes: probes (each one product with ``H`` and one with ``G``).
        **hutchinson_kwargs: passed on to :func:`.hutchinson.hutchinson`.

    Returns:
        :class:`Estimate`; ``stderr`` is the residual's (``diag(G)`` is exact).

    Example:
        >>> import torch
        >>> H = torch.tensor([[4.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> G = torch.tensor([[3.9, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> est = control_variate(FlatOperator.from_matrix(H, [(2,)]), FlatOperator.from_matrix(G, [(2,)]),
        ...                       G.diagonal(), 10, seed=0)
        >>> [round(v, 6) for v in est.values.tolist()]  # H - G is diagonal: no noise left
        [4.0, 2.0]
    """
    subtract: Callable[[Tensor, Tensor], Tensor] = lambda Z, HZ: HZ - control(Z)  # noqa: E731
    residual = hutchinson(hessian, num_probes, correct=subtract, **hutchinson_kwargs)
    return Estimate(control_diagonal.to(residual.values) + residual.values, residual.stderr, residual.probes, residual.info)
