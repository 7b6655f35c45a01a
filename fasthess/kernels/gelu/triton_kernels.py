"""Triton kernel of the GELU 2-jet (erf form and tanh approximation).

One program per block of elements: it computes ``g``, ``g'`` and ``g''`` of its primal
block once, writes ``y``, then streams the ``N`` tangent pairs of the block
(``y1 = g' x1``, ``y2 = g' x2 + g'' x1²``); formulas as in ``csrc/gelu_jet2.cpp``.

Importing this module needs ``triton``; on a CPU it runs only under
``TRITON_INTERPRET=1`` (set before triton is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024


@triton.jit
def _gelu_jet2_kernel(X, X1, X2, Y, Y1, Y2, M, N, TANH: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M
    x = tl.load(X + offs, mask=ok, other=0.0).to(ACC)
    # irrational constants as ACC scalars: a bare float literal is an fp32 constant in Triton
    if TANH:
        k = tl.full([], 0.7978845608028654, ACC)  # sqrt(2/pi)
        c = tl.full([], 0.044715, ACC)
        u = k * (x + c * x * x * x)
        du = k * (1.0 + 3.0 * c * x * x)
        # tanh through e = exp(-2|u|) <= 1: no overflow, and 1 ± t, 1 - t² without cancellation
        e = tl.exp(-2.0 * tl.abs(u))
        inv = 1.0 / (1.0 + e)
        t = tl.where(u >= 0, 1.0 - 2.0 * e * inv, 2.0 * e * inv - 1.0)
        one_plus_t = tl.where(u >= 0, 2.0 * inv, 2.0 * e * inv)
        sech2 = 4.0 * e * inv * inv
        g = 0.5 * x * one_plus_t
        d1 = 0.5 * one_plus_t + 0.5 * x * sech2 * du
        d2 = sech2 * (du + 0.5 * x * (6.0 * c * k * x - 2.0 * t * du * du))
    else:
        phi = tl.full([], 0.3989422804014327, ACC) * tl.exp(-0.5 * x * x)  # 1/sqrt(2 pi)
        cdf = 0.5 * (1.0 + tl.math.erf(x * tl.full([], 0.7071067811865476, ACC)))
        g = x * cdf
        d1 = cdf + x * phi
        d2 = phi * (2.0 - x * x)
    tl.store(Y + offs, g.to(Y.dtype.element_ty), mask=ok)
    for n in range(0, N):
        off = tl.cast(n, tl.int64) * M
        a = tl.load(X1 + off + offs, mask=ok, other=0.0).to(ACC)
        b = tl.load(X2 + off + offs, mask=ok, other=0.0).to(ACC)
        tl.store(Y1 + off + offs, (d1 * a).to(Y1.dtype.element_ty), mask=ok)
        tl.store(Y2 + off + offs, (d1 * b + d2 * a * a).to(Y2.dtype.element_ty), mask=ok)


def gelu_jet2_triton(x: Tensor, x1: Tensor, x2: Tensor, approximate: str = "none") -> tuple[Tensor, Tensor, Tensor]:
    """Triton backend; same contract as :func:`.reference.gelu_jet2` (float64 math for float64 inputs)."""
    xc, x1c, x2c = x.contiguous(), x1.contiguous(), x2.contiguous()
    y, y1, y2 = torch.empty_like(xc), torch.empty_like(x1c), torch.empty_like(x1c)
    if xc.numel() == 0:
        return y, y1, y2
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    _gelu_jet2_kernel[(triton.cdiv(xc.numel(), BLOCK),)](
        xc, x1c, x2c, y, y1, y2, xc.numel(), x1.shape[0], TANH=approximate == "tanh", ACC=acc, BLOCK=BLOCK
    )
    return y, y1, y2
