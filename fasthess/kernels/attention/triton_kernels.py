"""Triton kernel of the attention 2-jet (flash-style tiles, online softmax).

One program per (query block, batch·head, tangent): it streams key/value tiles of
the primal and of its tangent pair, keeps the running max, the row sums and the
accumulators of :mod:`.online` in registers, and writes ``o1``/``o2`` of its
tangent (and ``o`` from the programs of tangent 0). The primal scores are
recomputed per tangent (2 of the 12 tile products), which buys one program per
tangent in the grid; the primal tiles come from L2. The products run at the ``precision``
of :func:`attention_jet2_triton` (tensor cores unless ``"ieee"``).

Importing this module needs ``triton``; on a CPU it runs only under
``TRITON_INTERPRET=1`` (set before triton is imported).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import PRECISIONS


# H, BH, TQ, TK bound the grid and the masks only (every offset is a multiple of D, whose divisibility
# by 16 vectorises the loads): not specialising on them compiles one kernel for all sequence lengths.
@triton.jit(do_not_specialize=["H", "BH", "TQ", "TK"])
def _attention_jet2_kernel(
    Q, K, V, Q1, K1, V1, Q2, K2, V2, KEEP, O, O1, O2,
    H, BH, TQ, TK, D, scale,
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_Q1: tl.constexpr, HAS_K1: tl.constexpr, HAS_V1: tl.constexpr,
    HAS_Q2: tl.constexpr, HAS_K2: tl.constexpr, HAS_V2: tl.constexpr,
):
    # HAS_*: the tangent is given; a missing one (zero) is compiled out with its loads and products
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < TQ
    d_ok = offs_d < D
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_idx = offs_m[:, None] * D + offs_d[None, :]
    q_base = bh * TQ * D  # primal (BH, TQ, D)
    qt_base = (n * BH + bh) * TQ * D  # tangents (N, BH, TQ, D)
    k_base = bh * TK * D
    kt_base = (n * BH + bh) * TK * D
    q = tl.load(Q + q_base + q_idx, mask=q_mask, other=0.0).to(ACC)
    if HAS_Q1:
        q1 = tl.load(Q1 + qt_base + q_idx, mask=q_mask, other=0.0).to(ACC)
    if HAS_Q2:
        q2 = tl.load(Q2 + qt_base + q_idx, mask=q_mask, other=0.0).to(ACC)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    a1 = tl.zeros([BLOCK_M], ACC)
    a2 = tl.zeros([BLOCK_M], ACC)
    bb = tl.zeros([BLOCK_M], ACC)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D], ACC)

    hi = TK
    if CAUSAL:
        hi = tl.minimum(TK, (pid_m + 1) * BLOCK_M)  # keys past the block's last query are masked for all its rows
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < TK
        kv_mask = col_ok[:, None] & d_ok[None, :]
        kv_idx = cols[:, None] * D + offs_d[None, :]
        k = tl.load(K + k_base + kv_idx, mask=kv_mask, other=0.0).to(ACC)
        v = tl.load(V + k_base + kv_idx, mask=kv_mask, other=0.0).to(ACC)
        kt = tl.trans(k)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale
        # s1 = (q1 kᵀ + q k1ᵀ)·scale, s2 = (q2 kᵀ + 2 q1 k1ᵀ + q k2ᵀ)·scale: the products of given tangents
        s1 = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        s2 = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        if HAS_Q1:
            s1 += tl.dot(q1, kt, input_precision=PRECISION)
        if HAS_K1:
            k1t = tl.trans(tl.load(K1 + kt_base + kv_idx, mask=kv_mask, other=0.0).to(ACC))
            s1 += tl.dot(q, k1t, input_precision=PRECISION)
            if HAS_Q1:
                s2 += 2.0 * tl.dot(q1, k1t, input_precision=PRECISION)
        if HAS_Q2:
            s2 += tl.dot(q2, kt, input_precision=PRECISION)
        if HAS_K2:
            k2 = tl.load(K2 + kt_base + kv_idx, mask=kv_mask, other=0.0).to(ACC)
            s2 += tl.dot(q, tl.trans(k2), input_precision=PRECISION)
        s1 = s1 * scale
        s2 = s2 * scale
        ok = col_ok[None, :] & (offs_m[:, None] >= 0)
        if CAUSAL:
            ok = ok & (cols[None, :] <= offs_m[:, None])
        if HAS_KEEP:
            keep = tl.load(KEEP + (bh // H) * TK + cols, mask=col_ok, other=0)
            ok = ok & (keep[None, :] != 0)
        s = tl.where(ok, s, float("-inf"))
        s1 = tl.where(ok, s1, 0.0)
        s2 = tl.where(ok, s2, 0.0)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
        alpha = tl.exp(m_i - m_safe)
        w = tl.exp(s - m_safe[:, None])
        ws1 = w * s1
        l_i = l_i * alpha + tl.sum(w, 1)
        a1 = a1 * alpha + tl.sum(ws1, 1)
        a2 = a2 * alpha + tl.sum(w * s2, 1)
        bb = bb * alpha + tl.sum(ws1 * s1, 1)
        acc0 = acc0 * alpha[:, None] + tl.dot(w, v, input_precision=PRECISION)
        acc1 = acc1 * alpha[:, None]
        acc2 = acc2 * alpha[:, None]
        if HAS_Q1 or HAS_K1:  # s1 != 0
            acc1 += tl.dot(ws1, v, input_precision=PRECISION)
            acc2 += tl.dot(w * s2 + ws1 * s1, v, input_precision=PRECISION)
        elif HAS_Q2 or HAS_K2:  # s1 = 0, s2 != 0
            acc2 += tl.dot(w * s2, v, input_precision=PRECISION)
        if HAS_V1:
            v1 = tl.load(V1 + kt_base + kv_idx, mask=kv_mask, other=0.0).to(ACC)
            acc1 += tl.dot(w, v1, input_precision=PRECISION)
            if HAS_Q1 or HAS_K1:
                acc2 += tl.dot(2.0 * ws1, v1, input_precision=PRECISION)
        if HAS_V2:
            v2 = tl.load(V2 + kt_base + kv_idx, mask=kv_mask, other=0.0).to(ACC)
            acc2 += tl.dot(w, v2, input_precision=PRECISION)
        m_i = m_new

    inv = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
    o = acc0 * inv[:, None]
    mu1 = a1 * inv
    mu2 = a2 * inv
    beta = bb * inv
    e1 = acc1 * inv[:, None]
    o1 = e1 - mu1[:, None] * o
    o2 = acc2 * inv[:, None] - 2.0 * mu1[:, None] * e1 - (mu2 + beta - 2.0 * mu1 * mu1)[:, None] * o
    tl.store(O1 + qt_base + q_idx, o1.to(O1.dtype.element_ty), mask=q_mask)
    tl.store(O2 + qt_base + q_idx, o2.to(O2.dtype.element_ty), mask=q_mask)
    if n == 0:
        tl.store(O + q_base + q_idx, o.to(O.dtype.element_ty), mask=q_mask)


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # Triton 3.7 cannot lower fp64 tl.dot with K > 16


def launch_config(d: int) -> tuple[int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages)``.

    Three ``BLOCK_M×BLOCK_D`` float32 accumulators live in registers and six key/value
    tiles are staged in shared memory (2 stages, 64×32×64: 115 KB of the H100/H200's 227 KB).
    ``FASTHESS_TRITON_ATTENTION="BM,BN,WARPS,STAGES"`` overrides it (for tuning on a GPU).
    """
    block_d = max(16, triton.next_power_of_2(d))
    env = os.environ.get("FASTHESS_TRITON_ATTENTION")
    if env:
        bm, bn, warps, stages = (int(x) for x in env.split(","))
        return bm, bn, block_d, warps, stages
    if block_d > 64:  # six 32×128 tiles per stage: one stage
        return 32, 32, block_d, 4, 1
    return 64, 32, block_d, 4, 2


def attention_jet2_triton(
    q: Tensor, k: Tensor, v: Tensor, q1: Tensor | None, k1: Tensor | None, v1: Tensor | None,
    q2: Tensor | None = None, k2: Tensor | None = None, v2: Tensor | None = None,
    *, causal: bool = False, key_padding_mask: Tensor | None = None, scale: float | None = None,
    precision: str = "ieee",
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backend; same contract as :func:`.reference.attention_jet2` (inputs made contiguous).

    ``precision``: the ``input_precision`` of the 12 tile products (each tile is float32 in registers,
    whatever the input dtype). ``"ieee"``: float32 FMAs, no tensor cores. ``"tf32x3"``: Triton splits
    each operand ``a = a_hi + a_lo`` into TF32 parts (``cvt.rna.tf32``) and sums ``a_lo·b_hi +
    a_hi·b_lo + a_hi·b_hi`` on the tensor cores (3 MMAs; the dropped ``a_lo·b_lo`` and the rounding
    of ``a_lo`` leave ~2^-21 relative per product). ``"tf32"``: one MMA, operands with a 10-bit mantissa.

    A ``None`` tangent is zero: the kernel is compiled without its loads and products (with the
    second-order tangents ``None``, 9 of the 12 products remain). One of ``q1, k1, v1`` must be given.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the triton attention kernel takes {SUPPORTED_DTYPES}, not {q.dtype}; use backend='auto'")
    b, h, tq, d = q.shape
    tk = k.shape[-2]
    n = next(t.shape[0] for t in (q1, k1, v1) if t is not None)
    if b * h > 65535 or n > 65535:
        raise ValueError(f"B·H = {b * h} and N = {n} must be <= 65535 (grid limits); split the call")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    xs = [t.contiguous() if t is not None else None for t in (q, k, v, q1, k1, v1, q2, k2, v2)]
    has = {f"HAS_{name}": t is not None for name, t in zip(("Q1", "K1", "V1", "Q2", "K2", "V2"), xs[3:])}
    o = torch.empty_like(xs[0])
    o1 = q.new_empty((n, *q.shape))
    o2 = q.new_empty((n, *q.shape))
    keep = None
    if key_padding_mask is not None:
        keep = (~key_padding_mask.to(device=q.device, dtype=torch.bool)).to(torch.int8).contiguous()
    block_m, block_n, block_d, warps, stages = launch_config(d)
    grid = (triton.cdiv(tq, block_m), b * h, n)
    if n == 0 or tq == 0:
        return attention_only(q, k, v, causal, key_padding_mask, scale), o1, o2
    _attention_jet2_kernel[grid](
        *(t if t is not None else xs[0] for t in xs), keep if keep is not None else xs[0], o, o1, o2,
        h, b * h, tq, tk, d, scale,
        CAUSAL=causal, HAS_KEEP=keep is not None, ACC=tl.float32, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **has, num_warps=warps, num_stages=stages,
    )
    return o, o1, o2


def attention_only(q: Tensor, k: Tensor, v: Tensor, causal: bool, key_padding_mask: Tensor | None, scale: float) -> Tensor:
    """The primal output when there are no tangents (a degenerate call)."""
    from .reference import attention

    return attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
