"""Reference (pure torch) 2-jet of layer norm over the last dimension: the spec of the ``layer_norm`` family.

Nested ``jvp`` through ``F.layer_norm`` is silently wrong in torch 2.13, so the reference
differentiates the mean/variance decomposition :func:`fasthess.decompositions.layer_norm`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..jet import nested_jvp_jet2

from ...decompositions import layer_norm


def layer_norm_jet2(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, x1: Tensor, x2: Tensor, eps: float = 1e-5
) -> tuple[Tensor, Tensor, Tensor]:
    """``y = LN(x)·weight + bias`` over the last dim and its derivatives along ``N`` tangent pairs (nested ``jvp``).

    Args:
        x: ``(..., D)``; weight, bias: ``(D,)`` or ``None``.
        x1, x2: ``(N, *x.shape)`` first- and second-order input tangents.
        eps: added to the variance.

    Returns:
        ``(y, y1, y2)``: ``x.shape`` and two ``(N, *x.shape)`` with ``y2 = d²/dt² y(x + t x1 + t²/2 x2)`` at 0.

    Example:
        >>> x = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
        >>> y, y1, y2 = layer_norm_jet2(x, None, None, torch.ones(1, 1, 2, dtype=torch.float64), torch.zeros(1, 1, 2, dtype=torch.float64), eps=0.0)
        >>> y.tolist(), y1.abs().max().item(), y2.abs().max().item()  # a shift changes nothing
        ([[1.0, -1.0]], 0.0, 0.0)
    """

    def f(a: Tensor) -> Tensor:
        return layer_norm(a, (a.shape[-1],), weight, bias, eps)

    return nested_jvp_jet2(f, (x,), (x1,), (x2,))
