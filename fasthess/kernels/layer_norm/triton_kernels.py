"""Triton kernel of the layer-norm 2-jet (over the last dim).

One program per block of rows: it loads the primal rows once, keeps their mean, ``r =
(var + eps)^(-1/2)`` and ``x̂`` in registers, writes ``y``, then streams the ``N``
tangent pairs of those rows through the closed form of :mod:`fasthess.kernels.layer_norm`.
A whole row (``D`` rounded up to a power of two) sits in one tile.

Importing this module needs ``triton``; on a CPU it runs only under
``TRITON_INTERPRET=1`` (set before triton is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_D = 1 << 16  # one row per tile: wider rows would not fit in registers


@triton.jit
def _layer_norm_jet2_kernel(
    X, W, B, X1, X2, Y, Y1, Y2, R, N, D, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_X2: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask = (rows < R)[:, None] & col_ok[None, :]
    idx = rows[:, None].to(tl.int64) * D + cols[None, :]
    x = tl.load(X + idx, mask=mask, other=0.0).to(ACC)
    c = tl.where(mask, x - (tl.sum(x, 1) / D)[:, None], 0.0)
    r = 1.0 / tl.sqrt(tl.sum(c * c, 1) / D + eps)
    xh = c * r[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    else:
        w = tl.full([1, BLOCK_D], 1.0, ACC)
    if HAS_B:
        y = xh * w + tl.load(B + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    else:
        y = xh * w
    tl.store(Y + idx, y.to(Y.dtype.element_ty), mask=mask)
    for n in range(0, N):
        off = tl.cast(n, tl.int64) * R * D
        a = tl.load(X1 + off + idx, mask=mask, other=0.0).to(ACC)
        u1 = tl.where(mask, a - (tl.sum(a, 1) / D)[:, None], 0.0) * r[:, None]
        s1 = tl.sum(xh * u1, 1) / D
        coef = 3.0 * s1 * s1 - tl.sum(u1 * u1, 1) / D
        y2 = coef[:, None] * xh - 2.0 * s1[:, None] * u1
        if HAS_X2:  # + u2 - s2 x̂; without x2 (zero) no load, no products
            b = tl.load(X2 + off + idx, mask=mask, other=0.0).to(ACC)
            u2 = tl.where(mask, b - (tl.sum(b, 1) / D)[:, None], 0.0) * r[:, None]
            y2 += u2 - (tl.sum(xh * u2, 1) / D)[:, None] * xh
        y1 = (u1 - s1[:, None] * xh) * w
        y2 = y2 * w
        tl.store(Y1 + off + idx, y1.to(Y1.dtype.element_ty), mask=mask)
        tl.store(Y2 + off + idx, y2.to(Y2.dtype.element_ty), mask=mask)


def launch_config(d: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_D, num_warps)``: about 4096 elements per tile (each of ~6 live tiles in registers)."""
    block_d = triton.next_power_of_2(d)
    return max(1, min(16, 4096 // block_d)), block_d, 4 if block_d <= 1024 else 8


def layer_norm_jet2_triton(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, x1: Tensor, x2: Tensor | None = None, eps: float = 1e-5
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backend; same contract as :func:`.reference.layer_norm_jet2` (float64 math for float64 inputs).

    ``x2=None`` is a zero second-order tangent: the kernel is compiled without its loads and products.

    Triton passes the float ``eps`` as float32: a float64 row whose variance is far below ``eps``
    sees ``eps`` rounded to 7 digits.
    """
    d = x.shape[-1]
    if d > MAX_D:
        raise ValueError(f"the triton layer-norm kernel takes D <= {MAX_D}, got {d}; use backend='torch'")
    xc, x1c = x.contiguous(), x1.contiguous()
    x2c = x2.contiguous() if x2 is not None else None
    y, y1, y2 = torch.empty_like(xc), torch.empty_like(x1c), torch.empty_like(x1c)
    rows = xc.numel() // d
    if rows == 0:
        return y, y1, y2
    block_r, block_d, warps = launch_config(d)
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    _layer_norm_jet2_kernel[(triton.cdiv(rows, block_r),)](
        xc, *(t.contiguous() if t is not None else xc for t in (weight, bias)), x1c, x2c if x2c is not None else x1c,
        y, y1, y2, rows, x1.shape[0], d, float(eps),
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_X2=x2c is not None, ACC=acc, BLOCK_R=block_r,
        BLOCK_D=block_d, num_warps=warps,
    )
    return y, y1, y2
