"""Reference (pure torch) attention and its 2-jet: the spec every backend must match.

``attention(q, k, v) = softmax(q kᵀ · scale + mask) v`` per batch and head, with a
causal mask (key ``j`` visible to query ``i`` when ``j <= i``) and a key padding
mask (``True`` = padded, ignored, as in ``nn.MultiheadAttention``). A query row
that sees no key at all gives zeros (as flash attention does), not NaN.

The 2-jet of attention along a curve ``(q, k, v)(t)`` with first-order tangents
``(q1, k1, v1)`` and second-order tangents ``(q2, k2, v2)`` is

    o1 = d/dt o,   o2 = d²/dt² o,

obtained here by nesting ``torch.func.jvp`` over the plain math path (the
definition, slow and memory-hungry: it materialises ``T×T`` scores per tangent).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..jet import nested_jvp_jet2


def visible(tq: int, tk: int, causal: bool, key_padding_mask: Tensor | None, device: torch.device) -> Tensor | None:
    """Boolean ``(B or 1, 1, Tq, Tk)`` mask of the keys each query sees, or ``None`` when all are visible."""
    mask = None
    if causal:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=device).tril()[None, None]
    if key_padding_mask is not None:
        keep = ~key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        mask = keep if mask is None else mask & keep
    return mask


def probabilities(q: Tensor, k: Tensor, causal: bool, key_padding_mask: Tensor | None, scale: float) -> Tensor:
    """``(B, H, Tq, Tk)`` masked softmax of ``q kᵀ · scale``; a row with no visible key is zero."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    mask = visible(q.shape[-2], k.shape[-2], causal, key_padding_mask, q.device)
    if mask is None:
        return torch.softmax(s, dim=-1)
    s = s.masked_fill(~mask, float("-inf"))
    # a row with no visible key: any finite row keeps softmax finite; its output is zeroed below
    empty = ~mask.any(-1, keepdim=True)
    return torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Masked scaled dot-product attention on the plain math path.

    Args:
        q: ``(B, H, Tq, D)`` queries.
        k: ``(B, H, Tk, D)`` keys.
        v: ``(B, H, Tk, D)`` values.
        causal: mask keys ``j > i``.
        key_padding_mask: ``(B, Tk)`` bool, ``True`` where the key is padding.
        scale: score scale, default ``1/sqrt(D)``.

    Returns:
        ``(B, H, Tq, D)``; rows with no visible key are zero.

    Example:
        >>> q = k = v = torch.ones(1, 1, 2, 4)
        >>> attention(q, k, v, causal=True).shape
        torch.Size([1, 1, 2, 4])
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.matmul(probabilities(q, k, causal, key_padding_mask, scale), v)


def attention_jet2(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q1: Tensor,
    k1: Tensor,
    v1: Tensor,
    q2: Tensor,
    k2: Tensor,
    v2: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Primal, first- and second-order output of attention for ``N`` tangent pairs (nested ``jvp``).

    Args:
        q, k, v: primal ``(B, H, T, D)`` inputs as in :func:`attention`.
        q1, k1, v1: ``(N, *primal shape)`` first-order tangents.
        q2, k2, v2: ``(N, *primal shape)`` second-order tangents.
        causal, key_padding_mask, scale: as in :func:`attention`.

    Returns:
        ``(o, o1, o2)``: ``(B, H, Tq, D)``, ``(N, B, H, Tq, D)``, ``(N, B, H, Tq, D)`` with
        ``o2 = d²/dt² attention(q + t q1 + t²/2 q2, ...)`` at ``t = 0``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> q, k, v = (torch.randn(1, 1, 3, 2, generator=g, dtype=torch.float64) for _ in range(3))
        >>> t = [torch.randn(1, 1, 1, 3, 2, generator=g, dtype=torch.float64) for _ in range(6)]
        >>> o, o1, o2 = attention_jet2(q, k, v, *t)
        >>> o1.shape, o2.shape
        (torch.Size([1, 1, 1, 3, 2]), torch.Size([1, 1, 1, 3, 2]))
    """

    def f(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        return attention(a, b, c, causal=causal, key_padding_mask=key_padding_mask, scale=scale)

    return nested_jvp_jet2(f, (q, k, v), (q1, k1, v1), (q2, k2, v2))
