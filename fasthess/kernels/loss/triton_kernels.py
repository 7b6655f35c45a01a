"""Triton kernel of the cross-entropy 2-jet (mean softmax cross-entropy, ``K`` logit tangent pairs).

One program per (row, block of ``BLOCK_K`` tangents) streams the row's logits and its tangent rows
in blocks of ``BLOCK_V`` columns with an online softmax: a running max ``m``, the running sum
``s = Σ exp(z - m)`` and, per tangent, ``Σ exp(z - m) d``, ``Σ exp(z - m) d²`` and
``Σ exp(z - m) w`` with the target-shifted tangents ``d = z1 - z1_t``, ``w = z2 - z2_t``, all
rescaled by ``exp(m_old - m_new)`` when the max grows. So no tile ever holds a whole row (``V`` of
any size), and the row terms are ``l1 = E_p[d]``, ``l2 = E_p[w] + E_p[d²] - E_p[d]²`` (the shift
by the target's value is exact, and spares the cancellations of ``Σ p z1 - z1_t``).
The row terms go to ``(N,)`` and ``(K, N)`` buffers summed by torch afterwards in a fixed order
(deterministic), then divided by the number of rows not ignored.

Importing this module needs ``triton``; on a CPU it runs only under
``TRITON_INTERPRET=1`` (set before triton is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

TILE = 4096  # elements of one (BLOCK_K, BLOCK_V) tangent tile: two live tiles stay in registers


@triton.jit
def _cross_entropy_jet2_kernel(
    Z, Y, Z1, Z2, R0, R1, R2, N, V, K, ignore_index,
    HAS_Z2: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    kblock = tl.program_id(1)
    ks = kblock * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    t = tl.load(Y + row)
    keep = t != ignore_index
    t_ok = keep & (t >= 0) & (t < V)  # the wrapper has checked the targets; never read outside a row anyway
    tc = tl.where(t_ok, t, 0)
    z_row = Z + row.to(tl.int64) * V
    tan = (ks.to(tl.int64) * N + row) * V  # (BLOCK_K,) offsets of the tangent rows
    z_t = tl.load(z_row + tc).to(ACC)
    d_t = tl.load(Z1 + tan + tc, mask=k_ok, other=0.0).to(ACC)
    if HAS_Z2:
        w_t = tl.load(Z2 + tan + tc, mask=k_ok, other=0.0).to(ACC)
    m = tl.full([], float("-inf"), ACC)
    s = tl.zeros([], ACC)
    a1 = tl.zeros([BLOCK_K], ACC)  # Σ e d
    a2 = tl.zeros([BLOCK_K], ACC)  # Σ e d²
    a3 = tl.zeros([BLOCK_K], ACC)  # Σ e w
    hi = tl.where(t_ok, V, 0)  # an ignored row reads nothing
    for start in range(0, hi, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        c_ok = cols < V
        z = tl.load(z_row + cols, mask=c_ok, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(z, 0))
        scale = tl.exp(m - m_new)  # 0 on the first block (m = -inf)
        e = tl.exp(z - m_new)  # 0 on masked columns
        s = s * scale + tl.sum(e, 0)
        mask = k_ok[:, None] & c_ok[None, :]
        d = tl.load(Z1 + tan[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC) - d_t[:, None]
        ed = e[None, :] * d
        a1 = a1 * scale + tl.sum(ed, 1)
        a2 = a2 * scale + tl.sum(ed * d, 1)
        if HAS_Z2:
            w = tl.load(Z2 + tan[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC) - w_t[:, None]
            a3 = a3 * scale + tl.sum(e[None, :] * w, 1)
        m = m_new
    s = tl.where(t_ok, s, 1.0)  # a row not read: s = 0, m = -inf; its terms are replaced below
    m = tl.where(t_ok, m, 0.0)
    inv = 1.0 / s
    mean_d = a1 * inv
    l2 = a2 * inv - mean_d * mean_d
    if HAS_Z2:
        l2 += a3 * inv
    bad = tl.full([], float("nan"), ACC)  # a target outside [0, V) that is not ignore_index
    loss = tl.where(keep, tl.where(t_ok, m + tl.log(s) - z_t, bad), 0.0)
    tl.store(R0 + row, loss, mask=kblock == 0)
    out = ks.to(tl.int64) * N + row
    tl.store(R1 + out, tl.where(keep, tl.where(t_ok, mean_d, bad), 0.0), mask=k_ok)
    tl.store(R2 + out, tl.where(keep, tl.where(t_ok, l2, bad), 0.0), mask=k_ok)


def launch_config(n: int, v: int, k: int, sms: int = 132) -> tuple[int, int, int]:
    """``(BLOCK_K, BLOCK_V, num_warps)``: up to 4 tangents per program, fewer while that would leave
    fewer than two programs per SM (``sms``: multiprocessors), and ``BLOCK_K · BLOCK_V <= TILE``."""
    block_k = min(triton.next_power_of_2(max(k, 1)), 4)
    while block_k > 1 and n * triton.cdiv(k, block_k) < 2 * sms:
        block_k //= 2
    block_v = min(triton.next_power_of_2(v), TILE // block_k)
    return block_k, block_v, 4 if block_v * block_k <= 1024 else 8


def cross_entropy_jet2_triton(
    z: Tensor, y: Tensor, z1: Tensor, z2: Tensor | None, ignore_index: int = -100,
    block_k: int | None = None, block_v: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backend; same contract as :func:`.reference.cross_entropy_jet2` (targets already checked).

    Accumulates in float64 for float64 inputs, else in float32. ``block_k``, ``block_v``
    (powers of two) override :func:`launch_config` (tests force several column blocks per row).
    """
    k, (n, v) = z1.shape[0], z.shape
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    rows0 = torch.empty(n, dtype=acc, device=z.device)  # every entry written by the kernel
    rows1, rows2 = (torch.empty(k, n, dtype=acc, device=z.device) for _ in range(2))
    if n > 0:
        sms = torch.cuda.get_device_properties(z.device).multi_processor_count if z.is_cuda else 132
        bk, bv, warps = launch_config(n, v, k, sms)
        bk, bv = block_k or bk, block_v or bv
        zc = z.contiguous()
        z1c = z1.contiguous() if k > 0 else zc  # K = 0: one block of masked-out tangents, for the loss alone
        _cross_entropy_jet2_kernel[(n, max(1, triton.cdiv(k, bk)))](
            zc, y.contiguous(), z1c, z1c if z2 is None or k == 0 else z2.contiguous(), rows0, rows1, rows2, n, v, k,
            ignore_index, HAS_Z2=z2 is not None, ACC=tl.float64 if acc == torch.float64 else tl.float32,
            BLOCK_K=bk, BLOCK_V=bv, num_warps=warps,
        )
    count = (y != ignore_index).sum().to(acc)  # 0 rows kept: 0/0 = NaN, as F.cross_entropy
    return tuple(t.to(z.dtype) for t in (rows0.sum() / count, rows1.sum(1) / count, rows2.sum(1) / count))
