"""Shared inputs of the attention 2-jet tests (CPU tests and GPU tests)."""

from __future__ import annotations

import torch

# (B, H, Tq, Tk, D, N): odd sizes, one row, more keys than queries
SHAPES = [(1, 1, 1, 1, 4, 1), (2, 3, 7, 7, 5, 3), (1, 2, 97, 97, 16, 2), (2, 1, 5, 11, 8, 2)]


def inputs(b: int, h: int, tq: int, tk: int, d: int, n: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    """Primal q, k, v and the six tangents, drawn in float64 then cast (same values in every dtype)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, h, tq, d), (b, h, tk, d), (b, h, tk, d)] + [(n, b, h, tq, d), (n, b, h, tk, d), (n, b, h, tk, d)] * 2
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]


def padding(b: int, tk: int, device: str = "cpu") -> torch.Tensor:
    """Batch 0 pads its last third; batch 1 pads its first key (so a causal row 0 sees nothing)."""
    pad = torch.zeros(b, tk, dtype=torch.bool)
    pad[0, tk - tk // 3 :] = True
    if b > 1:
        pad[1, 0] = True
    return pad.to(device)


MASKS = [(False, False), (True, False), (False, True), (True, True)]  # (causal, padding)


# attention HVP: the shapes above plus more queries than keys (causal rows past Tk see every key)
HVP_SHAPES = SHAPES + [(2, 2, 11, 5, 4, 2)]


def hvp_inputs(b: int, h: int, tq: int, tk: int, d: int, n: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    """Primal q, k, v, dout and the tangents q1, k1, v1, dout1 of the attention HVP, drawn in float64 then cast."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, h, tq, d), (b, h, tk, d), (b, h, tk, d), (b, h, tq, d)]
    shapes += [(n, *s) for s in shapes]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]
