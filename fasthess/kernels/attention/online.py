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
    block: int = 128,
) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as :func:`fasthess.kernels.attention.reference.attention_jet2`.

    Example:
        >>> from fasthess.kernels.attention.reference import attention_jet2
        >>> g = torch.Generator().manual_seed(0)
        >>> x = [torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(3)]
        >>> t = [torch.randn(3, 1, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(6)]
        >>> got, want = attention_jet2_online(*x, *t, block=2), attention_jet2(*x, *t)
        >>> all(torch.allclose(a, b) for a, b in zip(got, want))
        True
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out_dtype = q.dtype
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    q, k, v, q1, k1, v1, q2, k2, v2 = (t.to(acc) for t in (q, k, v, q1, k1, v1, q2, k2, v2))
    n = q1.shape[0]
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
        k1b, v1b, k2b, v2b = (t[..., j0:j1, :] for t in (k1, v1, k2, v2))
        kt, k1t, k2t = kb.transpose(-1, -2), k1b.transpose(-1, -2), k2b.transpose(-1, -2)
        s = (q @ kt) * scale
        s1 = (q1 @ kt + q @ k1t) * scale
        s2 = (q2 @ kt + 2 * (q1 @ k1t) + q @ k2t) * scale
        ok = None
        if causal:
            ok = (torch.arange(j0, j1, device=q.device)[None, :] <= rows)[None, None]
        if keep is not None:
            kp = keep[:, None, None, j0:j1]
            ok = kp if ok is None else ok & kp
        if ok is not None:
            s = s.masked_fill(~ok, float("-inf"))
            s1, s2 = s1.masked_fill(~ok, 0.0), s2.masked_fill(~ok, 0.0)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with nothing visible yet
        alpha = torch.exp(m - m_safe)
        w = torch.exp(s - m_safe)
        ws1 = w * s1
        l = l * alpha + w.sum(-1, keepdim=True)
        a0 = a0 * alpha + w @ vb
        a1 = a1 * alpha + ws1.sum(-1, keepdim=True)
        a2 = a2 * alpha + (w * s2).sum(-1, keepdim=True)
        bb = bb * alpha + (ws1 * s1).sum(-1, keepdim=True)
        c1 = c1 * alpha + ws1 @ vb + w @ v1b
        c2 = c2 * alpha + (w * s2 + ws1 * s1) @ vb + (2 * ws1) @ v1b + w @ v2b
        m = m_new
    inv = torch.where(l > 0, 1.0 / l.clamp_min(torch.finfo(acc).tiny), torch.zeros_like(l))
    o = a0 * inv
    mu1, mu2, beta, e1 = a1 * inv, a2 * inv, bb * inv, c1 * inv
    o1 = e1 - mu1 * o
    o2 = c2 * inv - 2 * mu1 * e1 - (mu2 + beta - 2 * mu1 * mu1) * o
    return o.to(out_dtype), o1.to(out_dtype), o2.to(out_dtype)
