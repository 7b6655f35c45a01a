"""Reference (pure torch) 2-jet of the softmax cross-entropy loss: the spec of the ``loss`` family."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..jet import nested_jvp_jet2


def cross_entropy_jet2(
    z: Tensor, y: Tensor, z1: Tensor, z2: Tensor | None = None, ignore_index: int = -100
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy of logits ``z`` and its first/second directional derivatives (nested ``jvp``).

    Args:
        z: ``(N, V)`` logits; y: ``(N,)`` int64 targets (``ignore_index`` rows are left out of the mean).
        z1, z2: ``(K, N, V)`` first- and second-order logit tangents (``z2=None``: zero).

    Returns:
        ``(loss, loss1, loss2)``: a scalar and two ``(K,)`` with ``loss2 = d²/dt² L(z + t z1 + t²/2 z2)``;
        NaN when every row is ignored (as ``F.cross_entropy``).

    Example:
        >>> z = torch.zeros(1, 2, dtype=torch.float64)
        >>> l, l1, l2 = cross_entropy_jet2(z, torch.tensor([0]), torch.tensor([[[1., 0.]]], dtype=torch.float64), torch.zeros(1, 1, 2, dtype=torch.float64))
        >>> round(l.item(), 4), l1.tolist(), l2.tolist()  # log 2; -(1 - 1/2); Var of (1, 0) under (1/2, 1/2)
        (0.6931, [-0.5], [0.25])
    """

    def f(a: Tensor) -> Tensor:
        return F.cross_entropy(a, y, ignore_index=ignore_index)

    return nested_jvp_jet2(f, (z,), (z1,), (torch.zeros_like(z1) if z2 is None else z2,))
