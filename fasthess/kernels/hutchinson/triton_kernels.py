"""Triton kernel of the Hutchinson accumulation, and the merge it shares with the seeded one.

One program per block of ``BLOCK`` coordinates: Welford over the ``k`` new samples ``z_j ⊙ hz_j`` of the
block (one coalesced pass over ``z`` and ``hz``), then Chan et al.'s merge into ``mean`` / ``m2`` in
place (:func:`_chan_merge`, also used by :mod:`fasthess.kernels.linear.triton_kernels`). Statistics
accumulate in float64 for float64 ``mean``, else float32; ``z`` and ``hz`` of any floating dtype are
converted on load. Math as in ``csrc/fasthess_ops.cpp``.

Importing this module needs ``triton``; on a CPU it runs only under ``TRITON_INTERPRET=1``
(set before triton is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024


@triton.jit
def _chan_merge(MEAN, M2, offs, ok, bmean, bm2, K, count, ACC: tl.constexpr):
    """Merge a batch of ``K`` samples (mean ``bmean``, M2 ``bm2``) into the statistics of ``count`` earlier ones."""
    kf = tl.cast(K, ACC)
    cf = tl.cast(count, ACC)
    total = cf + kf
    mean = tl.load(MEAN + offs, mask=ok, other=0.0).to(ACC)
    m2 = tl.load(M2 + offs, mask=ok, other=0.0).to(ACC)
    delta = bmean - mean
    tl.store(M2 + offs, (m2 + (bm2 + delta * delta * (cf * kf / total))).to(M2.dtype.element_ty), mask=ok)
    tl.store(MEAN + offs, (mean + delta * (kf / total)).to(MEAN.dtype.element_ty), mask=ok)


# integer arguments may be 1, which Triton would otherwise turn into compile-time constants
@triton.jit(do_not_specialize=["N", "K", "count"])
def _hutchinson_update_kernel(MEAN, M2, Z, HZ, N, K, count, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    bmean = tl.zeros([BLOCK], ACC)
    bm2 = tl.zeros([BLOCK], ACC)
    for j in range(0, K):
        row = tl.cast(j, tl.int64) * N
        z = tl.load(Z + row + offs, mask=ok, other=0.0).to(ACC)
        s = z * tl.load(HZ + row + offs, mask=ok, other=0.0).to(ACC)
        d = s - bmean
        bmean += d * (1.0 / tl.cast(j + 1, ACC))
        bm2 += d * (s - bmean)
    _chan_merge(MEAN, M2, offs, ok, bmean, bm2, K, count, ACC)


def accumulator(dtype: torch.dtype):
    """The Triton type the statistics of ``dtype`` accumulate in."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_statistics(mean: Tensor, m2: Tensor, hz: Tensor) -> None:
    """The kernels update ``mean`` and ``m2`` in place through their data pointers: both ``(n,)`` contiguous."""
    if not (mean.dim() == 1 and m2.shape == mean.shape and mean.is_contiguous() and m2.is_contiguous()):
        raise ValueError(f"mean and m2 must be contiguous (n,) tensors; got {tuple(mean.shape)}, {tuple(m2.shape)}")
    if hz.dim() != 2 or hz.shape[1] != mean.shape[0]:
        raise ValueError(f"hz must be (k, n) with n = mean.numel() = {mean.shape[0]}; got {tuple(hz.shape)}")


def hutchinson_update_triton(mean: Tensor, m2: Tensor, z: Tensor, hz: Tensor, count: int) -> None:
    """Triton backend; same contract as :func:`.reference.hutchinson_update_` (``mean``, ``m2`` contiguous)."""
    check_statistics(mean, m2, hz)
    if z.shape != hz.shape:
        raise ValueError(f"z and hz must have one shape; got {tuple(z.shape)} and {tuple(hz.shape)}")
    k, n = hz.shape
    if k == 0 or n == 0:
        return
    _hutchinson_update_kernel[(triton.cdiv(n, BLOCK),)](
        mean, m2, z.contiguous(), hz.contiguous(), n, k, count, ACC=accumulator(mean.dtype), BLOCK=BLOCK
    )
