"""Attention HVP in closed form, one query block at a time (the ``torch`` backend).

The same algorithm as the C++ kernel, in torch ops, so it runs anywhere and documents the
kernel. With ``S = scale·q kᵀ`` (masked), ``P = softmax(S)`` and the upstream gradient ``dO``,
the attention backward (as in FlashAttention-2) is

    dP = dO vᵀ,   D = rowsum(P ∘ dP) (= rowsum(dO ∘ O)),   dS = P ∘ (dP − D),
    dv = Pᵀ dO,   dq = scale·dS k,   dk = scale·dSᵀ q.

Differentiating each line along ``(q1, k1, v1, dO1)``:

    S1 = scale·(q1 kᵀ + q k1ᵀ),          P1 = P ∘ (S1 − rowsum(P ∘ S1)),
    dP1 = dO1 vᵀ + dO v1ᵀ,                D1 = rowsum(P1 ∘ dP + P ∘ dP1),
    dS1 = P1 ∘ (dP − D) + P ∘ (dP1 − D1),
    dv1 = P1ᵀ dO + Pᵀ dO1,   dq1 = scale·(dS1 k + dS k1),   dk1 = scale·(dS1ᵀ q + dSᵀ q1).

A block of query rows sees every key it attends to, so its ``P`` is recomputed exactly from
its own scores (softmax over the whole row: the block's logsumexp) and shared by the ``N``
tangents; ``dq``/``dq1`` of the block are final, ``dk``/``dv``/``dk1``/``dv1`` accumulate over
blocks. Only ``(N, B, H, block, Tk)`` score tensors exist at a time, never ``T×T`` per tangent.
Masked entries have ``P = P1 = 0``, hence ``dS = dS1 = 0``; a row that sees no key gives 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def attention_hvp_blocked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    q1: Tensor,
    k1: Tensor,
    v1: Tensor,
    dout1: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    block: int = 128,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Same contract as :func:`fasthess.kernels.attention_hvp.reference.attention_hvp`.

    Example:
        >>> from fasthess.kernels.attention_hvp.reference import attention_hvp
        >>> g = torch.Generator().manual_seed(0)
        >>> x = [torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(4)]
        >>> t = [torch.randn(3, 1, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(4)]
        >>> got, want = attention_hvp_blocked(*x, *t, causal=True, block=2), attention_hvp(*x, *t, causal=True)
        >>> all(torch.allclose(a, b) for a, b in zip(got, want))
        True
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out_dtype = q.dtype
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    q, k, v, dout, q1, k1, v1, dout1 = (t.to(acc) for t in (q, k, v, dout, q1, k1, v1, dout1))
    tq, tk = q.shape[-2], k.shape[-2]
    # out of place, so that it also runs under vmap with some tangents not batched (zero tangents)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    dk1, dv1 = torch.zeros_like(k1), torch.zeros_like(v1)
    dq, dq1 = [], []  # per query block
    keep = None if key_padding_mask is None else ~key_padding_mask.to(device=q.device, dtype=torch.bool)
    for i0 in range(0, tq, block):
        i1 = min(i0 + block, tq)
        cols = min(tk, i1) if causal else tk  # later keys are masked for every row of the block
        if cols == 0:
            dq.append(torch.zeros_like(q[..., i0:i1, :]))
            dq1.append(torch.zeros_like(q1[..., i0:i1, :]))
            continue
        kc, vc, k1c, v1c = k[..., :cols, :], v[..., :cols, :], k1[..., :cols, :], v1[..., :cols, :]
        qb, dob, q1b, do1b = q[..., i0:i1, :], dout[..., i0:i1, :], q1[..., i0:i1, :], dout1[..., i0:i1, :]
        p = _masked_softmax((qb @ kc.transpose(-1, -2)) * scale, i0, causal, keep)
        dp = dob @ vc.transpose(-1, -2)
        d = (p * dp).sum(-1, keepdim=True)
        ds = p * (dp - d)
        dv = dv + _pad_keys(p.transpose(-1, -2) @ dob, tk)
        dq.append((ds @ kc) * scale)
        dk = dk + _pad_keys((ds.transpose(-1, -2) @ qb) * scale, tk)
        # all N tangents at once: (N, B, H, rows, cols)
        s1 = (q1b @ kc.transpose(-1, -2) + qb @ k1c.transpose(-1, -2)) * scale
        p1 = p * (s1 - (p * s1).sum(-1, keepdim=True))
        dp1 = do1b @ vc.transpose(-1, -2) + dob @ v1c.transpose(-1, -2)
        d1 = (p1 * dp + p * dp1).sum(-1, keepdim=True)
        ds1 = p1 * (dp - d) + p * (dp1 - d1)
        dv1 = dv1 + _pad_keys(p1.transpose(-1, -2) @ dob + p.transpose(-1, -2) @ do1b, tk)
        dq1.append((ds1 @ kc + ds @ k1c) * scale)
        dk1 = dk1 + _pad_keys((ds1.transpose(-1, -2) @ qb + ds.transpose(-1, -2) @ q1b) * scale, tk)
    dq = torch.cat(dq, -2) if dq else torch.zeros_like(q)  # Tq = 0: no block
    dq1 = torch.cat(dq1, -2) if dq1 else torch.zeros_like(q1)
    return tuple(t.to(out_dtype) for t in (dq, dk, dv, dq1, dk1, dv1))  # type: ignore[return-value]


def _pad_keys(x: Tensor, tk: int) -> Tensor:
    """Zero rows appended to a ``(..., cols, D)`` key-side block up to ``tk`` rows."""
    return x if x.shape[-2] == tk else torch.nn.functional.pad(x, (0, 0, 0, tk - x.shape[-2]))


def _masked_softmax(s: Tensor, row0: int, causal: bool, keep: Tensor | None) -> Tensor:
    """Row softmax of a ``(B, H, rows, cols)`` score block whose rows start at query ``row0``; empty rows give 0."""
    ok = None
    if causal:
        rows = torch.arange(row0, row0 + s.shape[-2], device=s.device)[:, None]
        ok = (torch.arange(s.shape[-1], device=s.device)[None, :] <= rows)[None, None]
    if keep is not None:
        kp = keep[:, None, None, : s.shape[-1]]
        ok = kp if ok is None else ok & kp
    if ok is None:
        return torch.softmax(s, dim=-1)
    s = s.masked_fill(~ok, float("-inf"))
    m = s.amax(-1, keepdim=True)
    w = torch.exp(s - m.masked_fill(m == float("-inf"), 0.0))  # exp(-inf) = 0 on masked entries
    l = w.sum(-1, keepdim=True)
    return w / torch.where(l > 0, l, torch.ones_like(l))
