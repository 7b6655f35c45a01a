"""Attention 2-jet in closed form with an online softmax over key blocks (the ``torch`` backend).

The same algorithm as the Triton, C++ and CUDA kernels, written with torch ops so
it runs anywhere and documents the kernels. Per query row ``i`` and tangent ``n``,
with scores ``s = scale·q kᵀ``, ``s1 = scale·(q1 kᵀ + q k1ᵀ)``,
``s2 = scale·(q2 kᵀ + 2 q1 k1ᵀ + q k2ᵀ)`` and ``P = softmax(s)``:

    P1 = P ⊙ (s1 − μ1),   μ1 = Σ P s1
    P2 = P ⊙ (s2 − μ2 + (s1 − μ1)² − σ1²),   μ2 = Σ P s2,   σ1² = Σ P (s1 − μ1)²
    o = P v,   o1 = P1 v + P v1,   o2 = P2 v + 2 P1 v1 + P v2.

Expanding the squares, everything is a ``P``-weighted sum, so it accumulates over
key blocks with unnormalised weights ``w = exp(s − m)`` and a running max ``m``
(each accumulator rescaled by ``exp(m_old − m_new)`` when the max grows):

    l = Σ w,  A = Σ w v,  a1 = Σ w s1,  a2 = Σ w s2,  b = Σ w s1²,
    C1 = Σ w (s1 v + v1),  C2 = Σ w ((s2 + s1²) v + 2 s1 v1 + v2),

and at the end (``μ1 = a1/l``, ``μ2 = a2/l``, ``β = b/l``)

    o = A/l,  o1 = C1/l − μ1 o,  o2 = C2/l − 2 μ1 (C1/l) − (μ2 + β − 2 μ1²) o.

Only a ``(N, B, H, Tq, block)`` score block exists at a time, never ``T×T`` per tangent.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def attention_jet2_online(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q1: Tensor | None,
    k1: Tensor | None,
    v1: Tensor | None,
    q2: Tensor | None = None,
    k2: Tensor | None = None,
    v2: Tensor | None = None,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    block: int = 128,
) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as :func:`fasthess.kernels.attention.reference.attention_jet2`; a ``None`` tangent is 0.

    A missing tangent is skipped, not materialised: its products (e.g. ``q2 kᵀ``, ``P v2``) are
    not done. At least one of ``q1, k1, v1`` must be given (it sets ``N``).

    Example:
        >>> from fasthess.kernels.attention.reference import attention_jet2
        >>> g = torch.Generator().manual_seed(0)
        >>> x = [torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(3)]
        >>> t = [torch.randn(3, 1, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(6)]
        >>> got, want = attention_jet2_online(*x, *t, block=2), attention_jet2(*x, *t)
        >>> all(torch.allclose(a, b) for a, b in zip(got, want))
        True
        >>> got = attention_jet2_online(*x, *t[:3], block=2)  # second-order tangents 0
        >>> want = attention_jet2(*x, *t[:3], *(torch.zeros_like(a) for a in t[:3]))
        >>> all(torch.allclose(a, b) for a, b in zip(got, want))
        True
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out_dtype = q.dtype
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    q, k, v, q1, k1, v1, q2, k2, v2 = (None if t is None else t.to(acc) for t in (q, k, v, q1, k1, v1, q2, k2, v2))
    n = next(t.shape[0] for t in (q1, k1, v1) if t is not None)
    b, h, tq, d = q.shape
    tk = k.shape[-2]
    m = torch.full((b, h, tq, 1), float("-inf"), dtype=acc, device=q.device)
    l = torch.zeros((b, h, tq, 1), dtype=acc, device=q.device)
    a0 = torch.zeros((b, h, tq, d), dtype=acc, device=q.device)
    a1 = torch.zeros((n, b, h, tq, 1), dtype=acc, device=q.device)
    a2, bb = torch.zeros_like(a1), torch.zeros_like(a1)
    c1 = torch.zeros((n, b, h, tq, d), dtype=acc, device=q.device)
    c2 = torch.zeros_like(c1)
    rows = torch.arange(tq, device=q.device)[:, None]
    keep = None if key_padding_mask is None else ~key_padding_mask.to(device=q.device, dtype=torch.bool)
    for j0 in range(0, tk, block):
        if causal and j0 >= tq:  # no query sees these keys
            break
        j1 = min(j0 + block, tk)
        kb, vb = k[..., j0:j1, :], v[..., j0:j1, :]
        k1b, v1b, k2b, v2b = (None if t is None else t[..., j0:j1, :] for t in (k1, v1, k2, v2))
        kt = kb.transpose(-1, -2)
        s = (q @ kt) * scale
        # s1 = (q1 kᵀ + q k1ᵀ)·scale, s2 = (q2 kᵀ + 2 q1 k1ᵀ + q k2ᵀ)·scale: only the terms with both factors
        s1 = _sum_products([(q1, kt, 1.0), (q, _t(k1b), 1.0)], scale)
        s2 = _sum_products([(q2, kt, 1.0), (q1, _t(k1b), 2.0), (q, _t(k2b), 1.0)], scale)
        ok = None
        if causal:
            ok = (torch.arange(j0, j1, device=q.device)[None, :] <= rows)[None, None]
        if keep is not None:
            kp = keep[:, None, None, j0:j1]
            ok = kp if ok is None else ok & kp
        if ok is not None:
            s = s.masked_fill(~ok, float("-inf"))
            s1, s2 = (None if t is None else t.masked_fill(~ok, 0.0) for t in (s1, s2))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with nothing visible yet
        alpha = torch.exp(m - m_safe)
        w = torch.exp(s - m_safe)
        l = l * alpha + w.sum(-1, keepdim=True)
        a0 = a0 * alpha + w @ vb
        a1, a2, bb, c1, c2 = (t * alpha for t in (a1, a2, bb, c1, c2))
        # C1 += w s1 v + w v1,  C2 += (w s2 + w s1²) v + 2 w s1 v1 + w v2
        pv = None  # the weights that multiply v in C2
        if s1 is not None:
            ws1 = w * s1
            a1 = a1 + ws1.sum(-1, keepdim=True)
            bb = bb + (ws1 * s1).sum(-1, keepdim=True)
            c1 = c1 + ws1 @ vb
            pv = ws1 * s1
            if v1b is not None:
                c2 = c2 + (2 * ws1) @ v1b
        if s2 is not None:
            ws2 = w * s2
            a2 = a2 + ws2.sum(-1, keepdim=True)
            pv = ws2 if pv is None else pv + ws2
        if pv is not None:
            c2 = c2 + pv @ vb
        if v1b is not None:
            c1 = c1 + w @ v1b
        if v2b is not None:
            c2 = c2 + w @ v2b
        m = m_new
    inv = torch.where(l > 0, 1.0 / l.clamp_min(torch.finfo(acc).tiny), torch.zeros_like(l))
    o = a0 * inv
    mu1, mu2, beta, e1 = a1 * inv, a2 * inv, bb * inv, c1 * inv
    o1 = e1 - mu1 * o
    o2 = c2 * inv - 2 * mu1 * e1 - (mu2 + beta - 2 * mu1 * mu1) * o
    return o.to(out_dtype), o1.to(out_dtype), o2.to(out_dtype)


def _t(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.transpose(-1, -2)


def _sum_products(terms: list[tuple[Tensor | None, Tensor | None, float]], scale: float) -> Tensor | None:
    """``scale · Σ c·(a @ b)`` over the terms whose factors are both given; ``None`` when none is (a zero block)."""
    out = None
    for a, b, c in terms:
        if a is None or b is None:
            continue
        p = a @ b if c == 1.0 else c * (a @ b)
        out = p if out is None else out + p
    return None if out is None else out * scale
