"""Statistics of Hessian diagonals: the paper's R_med, quantiles, run ratios.

R_med (eq. 1 of the paper) = max_i |H_ii| / median_i |H_ii|, per layer. The
stabilised variant, used for the paper's tables, adds ``0.001 · max_i |H_ii|`` to
the denominator so a tiny median cannot blow the ratio up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

import torch
from torch import Tensor

ArrayLike = Union[Tensor, Sequence[float]]

STABILIZER = 1e-3

__all__ = ["quantiles", "r_med", "ratio"]


def _abs_values(values: ArrayLike) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1).abs()
    if t.numel() == 0:
        raise ValueError("R_med of an empty set of diagonal entries is undefined")
    if not torch.isfinite(t).all():
        raise FloatingPointError(
            f"{int((~torch.isfinite(t)).sum())} of {t.numel()} diagonal entries are NaN/Inf; "
            "a statistic over them would be meaningless"
        )
    return t


def r_med(values: ArrayLike, stabilized: bool = False, stabilizer: float = STABILIZER) -> float:
    """``max|h| / median|h|`` (or ``max|h| / (median|h| + stabilizer·max|h|)``).

    The median of an even count is the mean of the two middle values.

    Example:
        >>> r_med([1.0, -2.0, 4.0])
        2.0
        >>> round(r_med([0.0, 0.0, 4.0], stabilized=True), 6)
        1000.0
    """
    a = _abs_values(values)
    top = float(a.max())
    median = float(a.quantile(0.5))
    denom = median + stabilizer * top if stabilized else median
    if denom == 0.0:
        return float("inf") if top > 0 else float("nan")
    return top / denom


def quantiles(values: ArrayLike, qs: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> dict[float, float]:
    """Quantiles of ``|h|`` (linear interpolation).

    Example:
        >>> quantiles([1.0, -3.0, 2.0], qs=(0.5,))
        {0.5: 2.0}
    """
    a = _abs_values(values)
    return {float(q): float(v) for q, v in zip(qs, a.quantile(torch.tensor(list(qs), dtype=torch.float64)))}


def ratio(numerator: Mapping[str, float], denominator: Mapping[str, float]) -> dict[str, float]:
    """Per-layer ratio of two runs' statistics, e.g. ``R_med^SGDM / R_med^Adam``.

    Only layers present in both are kept, in the numerator's order.

    Example:
        >>> ratio({"a": 4.0, "b": 3.0}, {"a": 2.0})
        {'a': 2.0}
    """
    return {k: numerator[k] / denominator[k] for k in numerator if k in denominator}
