"""The definition every kernel family's reference shares: a 2-jet by nested forward mode."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def nested_jvp_jet2(
    f: Callable[..., Tensor], primals: Sequence[Tensor], first: Sequence[Tensor], second: Sequence[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """``f`` and its first and second directional derivatives along ``N`` tangent pairs.

    For each pair ``(x1, x2)`` the curve ``t ↦ f(x + t x1 + t²/2 x2)`` has first
    derivative ``f'[x1]`` and second ``f''[x1, x1] + f'[x2]``: a ``jvp`` of the
    ``jvp`` along ``x1``, plus a ``jvp`` along ``x2``. All pairs go through one
    ``vmap``.

    Args:
        f: function of ``len(primals)`` tensors.
        primals: the point.
        first: one ``(N, *primal.shape)`` batch of first-order tangents per primal.
        second: the same for the second-order tangents.

    Returns:
        ``f(primals)`` and the ``(N, *out.shape)`` first and second derivatives.

    Example:
        >>> x = torch.tensor([2.0])
        >>> y, y1, y2 = nested_jvp_jet2(lambda a: a**3, [x], [torch.ones(1, 1)], [torch.zeros(1, 1)])
        >>> y.item(), y1.item(), y2.item()  # x³, 3x², 6x
        (8.0, 12.0, 12.0)
    """
    primals, k = tuple(primals), len(primals)

    def one(*tangents: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t1, t2 = tangents[:k], tangents[k:]

        def along_first(*x: Tensor) -> Tensor:
            return torch.func.jvp(f, x, t1)[1]

        out1, out11 = torch.func.jvp(along_first, primals, t1)
        out, out2 = torch.func.jvp(f, primals, t2)
        return out, out1, out11 + out2

    return torch.func.vmap(one, out_dims=(None, 0, 0))(*first, *second)
