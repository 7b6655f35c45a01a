"""Reference (pure torch) 2-jet of GELU (exact erf form and tanh approximation): the spec of the ``gelu`` family.

The reference differentiates the written-out formulas with nested ``jvp`` (no fused
``F.gelu`` kernel in the derivative chain).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..jet import nested_jvp_jet2

APPROXIMATIONS = ("none", "tanh")


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """``x·Φ(x)`` (``"none"``) or ``x/2·(1 + tanh(√(2/π)(x + 0.044715 x³)))`` (``"tanh"``), as ``F.gelu``.

    Example:
        >>> x = torch.linspace(-3, 3, 7, dtype=torch.float64)
        >>> all(torch.allclose(gelu(x, a), torch.nn.functional.gelu(x, approximate=a)) for a in APPROXIMATIONS)
        True
    """
    if approximate == "none":
        return 0.5 * x * (1.0 + torch.erf(x * math.sqrt(0.5)))
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


def gelu_jet2(x: Tensor, x1: Tensor, x2: Tensor, approximate: str = "none") -> tuple[Tensor, Tensor, Tensor]:
    """``y = gelu(x)`` and its derivatives along ``N`` tangent pairs (nested ``jvp``).

    Args:
        x: any shape; x1, x2: ``(N, *x.shape)`` first- and second-order tangents.
        approximate: ``"none"`` (erf) or ``"tanh"``.

    Returns:
        ``(y, y1, y2)`` with ``y1 = g'(x) x1`` and ``y2 = g'(x) x2 + g''(x) x1²``.

    Example:
        >>> x = torch.zeros(1, dtype=torch.float64)
        >>> y, y1, y2 = gelu_jet2(x, torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))
        >>> y1.item(), round(y2.item(), 6)  # g'(0) = 1/2, g''(0) = 2φ(0) = 0.797885
        (0.5, 0.797885)
    """

    def f(a: Tensor) -> Tensor:
        return gelu(a, approximate)

    return nested_jvp_jet2(f, (x,), (x1,), (x2,))
