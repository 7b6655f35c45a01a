"""Triton kernels of the linear family: the seeded Hutchinson accumulation and one-hot weight tangents.

* ``_seeded_update_kernel``: one program per block of ``BLOCK`` coordinates regenerates the Rademacher
  probes ``z_j`` of the block from the counter-based hash (uint32 arithmetic, bit-identical to
  :func:`.reference.rademacher` and the C++/CUDA kernels), forms ``z_j ⊙ hz_j`` for the ``k`` new probes
  (Welford) and merges them into ``mean`` / ``m2`` in place (Chan et al.), in one pass over ``hz``;
  ``z`` is never stored.
* ``_onehot_kernel``: the ``(K·M, out)`` output as ``BLOCK_R x BLOCK_O`` tiles, each written once:
  ``x[m, cols[k]]`` at column ``rows[k]`` of row ``k·M + m``, zeros elsewhere (``rows[k] = -1``: a zero
  direction). No dense seed, no matmul, no separate zero fill.

Importing this module needs ``triton``; on a CPU it runs only under ``TRITON_INTERPRET=1``
(set before triton is imported).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..hutchinson.triton_kernels import _chan_merge, accumulator, check_statistics
from .reference import _M32, hash32

BLOCK = 1024


@triton.jit
def _hash32(x):
    """Wellons' lowbias32 on uint32 (wrapping products, logical shifts): :func:`.reference.hash32`'s twin."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


# integer arguments may be 1, which Triton would otherwise turn into compile-time constants
@triton.jit(do_not_specialize=["N", "K", "BASE", "count"])
def _seeded_update_kernel(MEAN, M2, HZ, N, K, BASE, count, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    coord = offs.to(tl.uint32)  # N <= 2^32
    base = tl.cast(BASE, tl.uint32)  # (hash32(seed) + first_probe) mod 2^32
    bmean = tl.zeros([BLOCK], ACC)
    bm2 = tl.zeros([BLOCK], ACC)
    for j in range(0, K):
        key = _hash32(base + tl.cast(j, tl.uint32))  # probe first_probe + j
        h = tl.load(HZ + tl.cast(j, tl.int64) * N + offs, mask=ok, other=0.0).to(ACC)
        s = tl.where((_hash32(key ^ coord) >> 31) != 0, -h, h)  # z = 1 - 2 · top bit
        d = s - bmean
        bmean += d * (1.0 / tl.cast(j + 1, ACC))
        bm2 += d * (s - bmean)
    _chan_merge(MEAN, M2, offs, ok, bmean, bm2, K, count, ACC)


@triton.jit(do_not_specialize=["KM", "M", "IN", "OUT"])
def _onehot_kernel(X, ROWS, COLS, Y, KM, M, IN, OUT, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # output rows k·M + m
    o0 = tl.program_id(1).to(tl.int64) * BLOCK_O
    o = o0 + tl.arange(0, BLOCK_O)
    r_ok = r < KM
    k = r // M  # one division per row, not per entry
    m = r - k * M
    row = tl.load(ROWS + k, mask=r_ok, other=-1)
    col = tl.load(COLS + k, mask=r_ok, other=0)
    in_tile = r_ok & (row >= o0) & (row < o0 + BLOCK_O)  # the row's one value lies in this tile (never for -1)
    v = tl.load(X + m * IN + col, mask=in_tile, other=0.0)
    y = tl.where(o[None, :] == row[:, None], v[:, None], tl.zeros([BLOCK_R, BLOCK_O], v.dtype))
    tl.store(Y + r[:, None] * OUT + o[None, :], y, mask=r_ok[:, None] & (o[None, :] < OUT))


def hutchinson_update_seeded_triton(
    mean: Tensor, m2: Tensor, hz: Tensor, seed: int, first_probe: int, count: int
) -> None:
    """Triton backend; same contract as :func:`.reference.hutchinson_update_seeded_` (``mean``, ``m2`` contiguous)."""
    check_statistics(mean, m2, hz)
    k, n = hz.shape
    if n > 2**32:
        raise ValueError(f"the probe hash takes at most 2^32 coordinates per tensor; got {n}")
    if k == 0 or n == 0:
        return
    base = (int(hash32(torch.tensor(seed & _M32))) + first_probe) & _M32
    _seeded_update_kernel[(triton.cdiv(n, BLOCK),)](
        mean, m2, hz.contiguous(), n, k, base, count, ACC=accumulator(mean.dtype), BLOCK=BLOCK
    )


def onehot_weight_tangent_triton(x: Tensor, rows: Tensor, cols: Tensor, out_features: int) -> Tensor:
    """Triton backend; same contract as :func:`.reference.onehot_weight_tangent` (coordinates already checked)."""
    k, inp = rows.numel(), x.shape[-1]
    m = math.prod(x.shape[:-1])
    out = torch.empty(k, *x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if inp == 0:  # no coordinates: every direction is a zero one
        return out.zero_()
    block_o = min(128, max(16, triton.next_power_of_2(out_features)))
    block_r = 4096 // block_o
    grid = (triton.cdiv(k * m, block_r), triton.cdiv(out_features, block_o))
    _onehot_kernel[grid](x.reshape(m, inp).contiguous(), rows.contiguous(), cols.contiguous(), out, k * m, m, inp,
                         out_features, BLOCK_R=block_r, BLOCK_O=block_o)
    return out
