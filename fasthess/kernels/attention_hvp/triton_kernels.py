"""Triton kernels of the attention HVP (FlashAttention-2-style backward with tangents).

Two kernels per call, each with one program per (block, batch·head, tangent):

* ``_hvp_dq_kernel`` (query blocks): a first sweep over the key tiles accumulates the row
  statistics with an online softmax (running max ``m``, ``l = Σw``, ``Σw·S1``, ``Σw·dP``,
  ``Σw·S1·dP``, ``Σw·dP1`` with ``w = exp(S − m)``) and turns them into ``lse``,
  ``μ1 = rowsum(P∘S1)``, ``D = rowsum(P∘dP)`` and ``D1 = rowsum(P1∘dP + P∘dP1)``; a second
  sweep recomputes ``P = exp(S − lse)``, ``P1``, ``dS``, ``dS1`` per tile and accumulates
  ``dq``, ``dq1``. The row statistics go to a small ``(N, B·H, Tq)`` buffer.
* ``_hvp_dkv_kernel`` (key blocks): sweeps the query tiles, recomputes the same tiles from the
  stored statistics and accumulates ``dk``, ``dv``, ``dk1``, ``dv1`` in registers (no atomics).

Formulas: :mod:`.blocked`. The primal outputs are written by the programs of tangent 0.
Importing this module needs ``triton``; on a CPU it runs only under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _tiles(q, do, q1, do1, k, v, k1, v1, scale, PRECISION: tl.constexpr):
    """Scores of a (query tile, key tile): S, S1, dP, dP1 (BLOCK_M × BLOCK_N)."""
    kt = tl.trans(k)
    s = tl.dot(q, kt, input_precision=PRECISION) * scale
    s1 = (tl.dot(q1, kt, input_precision=PRECISION) + tl.dot(q, tl.trans(k1), input_precision=PRECISION)) * scale
    vt = tl.trans(v)
    dp = tl.dot(do, vt, input_precision=PRECISION)
    dp1 = tl.dot(do1, vt, input_precision=PRECISION) + tl.dot(do, tl.trans(v1), input_precision=PRECISION)
    return s, s1, dp, dp1


@triton.jit
def _visible(rows, cols, row_ok, col_ok, KEEP, bh, H, TK, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr):
    ok = row_ok[:, None] & col_ok[None, :]
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None])
    if HAS_KEEP:
        keep = tl.load(KEEP + (bh // H) * TK + cols, mask=col_ok, other=0)
        ok = ok & (keep[None, :] != 0)
    return ok


@triton.jit
def _hvp_dq_kernel(
    Q, K, V, DO, Q1, K1, V1, DO1, KEEP, DQ, DQ1, STATS,
    H, BH, TQ, TK, D, scale,
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < TQ
    d_ok = offs_d < D
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_idx = rows[:, None] * D + offs_d[None, :]
    q_base = bh * TQ * D
    qt_base = (n * BH + bh) * TQ * D
    k_base = bh * TK * D
    kt_base = (n * BH + bh) * TK * D
    q = tl.load(Q + q_base + q_idx, mask=q_mask, other=0.0).to(ACC)
    do = tl.load(DO + q_base + q_idx, mask=q_mask, other=0.0).to(ACC)
    q1 = tl.load(Q1 + qt_base + q_idx, mask=q_mask, other=0.0).to(ACC)
    do1 = tl.load(DO1 + qt_base + q_idx, mask=q_mask, other=0.0).to(ACC)

    hi = TK
    if CAUSAL:
        hi = tl.minimum(TK, (pid_m + 1) * BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    a_s1 = tl.zeros([BLOCK_M], ACC)
    a_dp = tl.zeros([BLOCK_M], ACC)
    a_s1dp = tl.zeros([BLOCK_M], ACC)
    a_dp1 = tl.zeros([BLOCK_M], ACC)
    for start_n in range(0, hi, BLOCK_N):  # sweep 1: row statistics
        cols = start_n + offs_n
        col_ok = cols < TK
        kv_mask = col_ok[:, None] & d_ok[None, :]
        kv_idx = cols[:, None] * D + offs_d[None, :]
        k = tl.load(K + k_base + kv_idx, mask=kv_mask, other=0.0).to(ACC)
        v = tl.load(V + k_base + kv_idx, mask=kv_mask, other=0.0).to(ACC)
        k1 = tl.load(K1 + kt_base + kv_idx, mask=kv_mask, other=0.0).to(ACC)
        v1 = tl.load(V1 + kt_base + kv_idx, mask=kv_mask, other=0.0).to(ACC)
        s, s1, dp, dp1 = _tiles(q, do, q1, do1, k, v, k1, v1, scale, PRECISION)
        ok = _visible(rows, cols, row_ok, col_ok, KEEP, bh, H, TK, CAUSAL, HAS_KEEP)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        w = tl.exp(s - m_safe[:, None])  # 0 where masked
        ws1 = w * s1
        l_i = l_i * alpha + tl.sum(w, 1)
        a_s1 = a_s1 * alpha + tl.sum(ws1, 1)
        a_dp = a_dp * alpha + tl.sum(w * dp, 1)
        a_s1dp = a_s1dp * alpha + tl.sum(ws1 * dp, 1)
        a_dp1 = a_dp1 * alpha + tl.sum(w * dp1, 1)
        m_i = m_new
    has = l_i > 0.0
    inv = tl.where(has, 1.0 / tl.where(has, l_i, 1.0), 0.0)
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("inf"))  # empty row: P = 0
    mu1 = a_s1 * inv
    dd = a_dp * inv
    dd1 = a_s1dp * inv - mu1 * dd + a_dp1 * inv
    st = STATS + (n * BH + bh) * 4 * TQ + rows
    tl.store(st, lse, mask=row_ok)
    tl.store(st + TQ, mu1, mask=row_ok)
    tl.store(st + 2 * TQ, dd, mask=row_ok)
    tl.store(st + 3 * TQ, dd1, mask=row_ok)

    acc_dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    acc_dq1 = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, hi, BLOCK_N):  # sweep 2: dq, dq1
        cols = start_n + offs_n
        col_ok = cols < TK
        kv_mask = col_ok[:, None] & d_ok[None, :]
        kv_idx = cols[:, None] * D + offs_d[None, :]
        k = tl.load(K + k_base + kv_idx, mask=kv_mask, other=0.0).to(ACC)
        v = tl.load(V + k_base + kv_idx, mask=kv_mask, other=0.0).to(ACC)
        k1 = tl.load(K1 + kt_base + kv_idx, mask=kv_mask, other=0.0).to(ACC)
        v1 = tl.load(V1 + kt_base + kv_idx, mask=kv_mask, other=0.0).to(ACC)
        s, s1, dp, dp1 = _tiles(q, do, q1, do1, k, v, k1, v1, scale, PRECISION)
        ok = _visible(rows, cols, row_ok, col_ok, KEEP, bh, H, TK, CAUSAL, HAS_KEEP)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        p1 = p * (s1 - mu1[:, None])
        ds = p * (dp - dd[:, None])
        ds1 = p1 * (dp - dd[:, None]) + p * (dp1 - dd1[:, None])
        acc_dq += tl.dot(ds, k, input_precision=PRECISION)
        acc_dq1 += tl.dot(ds1, k, input_precision=PRECISION) + tl.dot(ds, k1, input_precision=PRECISION)
    tl.store(DQ1 + qt_base + q_idx, (acc_dq1 * scale).to(DQ1.dtype.element_ty), mask=q_mask)
    if n == 0:
        tl.store(DQ + q_base + q_idx, (acc_dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _hvp_dkv_kernel(
    Q, K, V, DO, Q1, K1, V1, DO1, KEEP, DK, DV, DK1, DV1, STATS,
    H, BH, TQ, TK, D, scale,
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n = tl.program_id(2).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < TK
    d_ok = offs_d < D
    kv_mask = col_ok[:, None] & d_ok[None, :]
    kv_idx = cols[:, None] * D + offs_d[None, :]
    q_base = bh * TQ * D
    qt_base = (n * BH + bh) * TQ * D
    k_base = bh * TK * D
    kt_base = (n * BH + bh) * TK * D
    k = tl.load(K + k_base + kv_idx, mask=kv_mask, other=0.0).to(ACC)
    v = tl.load(V + k_base + kv_idx, mask=kv_mask, other=0.0).to(ACC)
    k1 = tl.load(K1 + kt_base + kv_idx, mask=kv_mask, other=0.0).to(ACC)
    v1 = tl.load(V1 + kt_base + kv_idx, mask=kv_mask, other=0.0).to(ACC)

    lo = 0
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M  # queries before the block's first key see none of it
    acc_dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    acc_dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    acc_dk1 = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    acc_dv1 = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    st_base = STATS + (n * BH + bh) * 4 * TQ
    for start_m in range(lo, TQ, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < TQ
        q_mask = row_ok[:, None] & d_ok[None, :]
        q_idx = rows[:, None] * D + offs_d[None, :]
        q = tl.load(Q + q_base + q_idx, mask=q_mask, other=0.0).to(ACC)
        do = tl.load(DO + q_base + q_idx, mask=q_mask, other=0.0).to(ACC)
        q1 = tl.load(Q1 + qt_base + q_idx, mask=q_mask, other=0.0).to(ACC)
        do1 = tl.load(DO1 + qt_base + q_idx, mask=q_mask, other=0.0).to(ACC)
        lse = tl.load(st_base + rows, mask=row_ok, other=float("inf"))
        mu1 = tl.load(st_base + TQ + rows, mask=row_ok, other=0.0)
        dd = tl.load(st_base + 2 * TQ + rows, mask=row_ok, other=0.0)
        dd1 = tl.load(st_base + 3 * TQ + rows, mask=row_ok, other=0.0)
        s, s1, dp, dp1 = _tiles(q, do, q1, do1, k, v, k1, v1, scale, PRECISION)
        ok = _visible(rows, cols, row_ok, col_ok, KEEP, bh, H, TK, CAUSAL, HAS_KEEP)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        p1 = p * (s1 - mu1[:, None])
        ds = p * (dp - dd[:, None])
        ds1 = p1 * (dp - dd[:, None]) + p * (dp1 - dd1[:, None])
        pt = tl.trans(p)
        dst = tl.trans(ds)
        acc_dv += tl.dot(pt, do, input_precision=PRECISION)
        acc_dv1 += tl.dot(tl.trans(p1), do, input_precision=PRECISION) + tl.dot(pt, do1, input_precision=PRECISION)
        acc_dk += tl.dot(dst, q, input_precision=PRECISION)
        acc_dk1 += tl.dot(tl.trans(ds1), q, input_precision=PRECISION) + tl.dot(dst, q1, input_precision=PRECISION)
    tl.store(DK1 + kt_base + kv_idx, (acc_dk1 * scale).to(DK1.dtype.element_ty), mask=kv_mask)
    tl.store(DV1 + kt_base + kv_idx, acc_dv1.to(DV1.dtype.element_ty), mask=kv_mask)
    if n == 0:
        tl.store(DK + k_base + kv_idx, (acc_dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + k_base + kv_idx, acc_dv.to(DV.dtype.element_ty), mask=kv_mask)


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # Triton 3.7 cannot lower fp64 tl.dot with K > 16


def launch_config(d: int) -> tuple[int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages)``: 32×32 tiles (many live score tiles per program)."""
    block_d = max(16, triton.next_power_of_2(d))
    return 32, 32, block_d, 4, 1


def attention_hvp_triton(
    q: Tensor, k: Tensor, v: Tensor, dout: Tensor, q1: Tensor, k1: Tensor, v1: Tensor, dout1: Tensor,
    *, causal: bool = False, key_padding_mask: Tensor | None = None, scale: float | None = None,
    precision: str = "ieee",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton backend; same contract as :func:`.reference.attention_hvp` (inputs made contiguous).

    ``precision``: ``"ieee"`` (default: float32 products, matching the reference) or ``"tf32"``.
    """
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the triton attention HVP kernel takes {SUPPORTED_DTYPES}, not {q.dtype}; use backend='auto'")
    b, h, tq, d = q.shape
    tk = k.shape[-2]
    n = q1.shape[0]
    if b * h > 65535 or n > 65535:
        raise ValueError(f"B·H = {b * h} and N = {n} must be <= 65535 (grid limits); split the call")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    xs = [t.contiguous() for t in (q, k, v, dout, q1, k1, v1, dout1)]
    outs = [torch.zeros_like(t) for t in xs[:3]] + [torch.zeros_like(t) for t in xs[4:7]]
    if n == 0 or tq == 0 or tk == 0:
        if n == 0 and tq > 0 and tk > 0:  # the backward only: run it as one tangent of zeros
            zeros = [torch.zeros((1, *t.shape), dtype=t.dtype, device=t.device) for t in xs[:4]]
            full = attention_hvp_triton(*xs[:4], *zeros, causal=causal, key_padding_mask=key_padding_mask,
                                        scale=scale, precision=precision)
            return (*full[:3], *outs[3:])
        return tuple(outs)  # type: ignore[return-value]
    keep = None
    if key_padding_mask is not None:
        keep = (~key_padding_mask.to(device=q.device, dtype=torch.bool)).to(torch.int8).contiguous()
    stats = torch.empty((n, b * h, 4, tq), dtype=torch.float32, device=q.device)
    block_m, block_n, block_d, warps, stages = launch_config(d)
    common = dict(CAUSAL=causal, HAS_KEEP=keep is not None, ACC=tl.float32, PRECISION=precision,
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    kp = keep if keep is not None else xs[0]
    _hvp_dq_kernel[(triton.cdiv(tq, block_m), b * h, n)](
        *xs, kp, outs[0], outs[3], stats, h, b * h, tq, tk, d, scale, **common)
    _hvp_dkv_kernel[(triton.cdiv(tk, block_n), b * h, n)](
        *xs, kp, outs[1], outs[2], outs[4], outs[5], stats, h, b * h, tq, tk, d, scale, **common)
    return tuple(outs)  # type: ignore[return-value]
