"""Reference (pure torch) linear-layer tangent ops: the spec of the ``linear`` kernel family.

* :func:`linear_jet2`: ``y = x wᵀ + b`` with ``K`` first/second-order tangent pairs (nested ``jvp``).
* :func:`onehot_weight_tangent`: the tangent ``x E_abᵀ`` of the output along a one-hot weight
  direction ``E_ab`` (a sampled coordinate ``(a, b)`` of ``w``), here with the dense seed.
* :func:`rademacher`: Hutchinson probes regenerated from ``(seed, probe index, coordinate)`` by a
  counter-based hash, so a probe never has to be stored; :func:`hutchinson_update_seeded_` merges
  ``z ⊙ Hz`` into running statistics with ``z`` regenerated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..hutchinson.reference import hutchinson_update_
from ..jet import nested_jvp_jet2

_M32 = 0xFFFFFFFF


def linear_jet2(
    x: Tensor, w: Tensor, b: Tensor | None, x1: Tensor, w1: Tensor, x2: Tensor, w2: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Primal, first- and second-order output of ``F.linear`` along ``K`` tangent pairs (nested ``jvp``).

    Args:
        x: ``(..., in)``; w: ``(out, in)``; b: ``(out,)`` or ``None`` (no bias tangent: it enters linearly).
        x1, x2: ``(K, ..., in)`` input tangents; w1, w2: ``(K, out, in)`` weight tangents.

    Returns:
        ``y (..., out)``, ``y1, y2 (K, ..., out)`` with ``y2 = x2 wᵀ + 2 x1 w1ᵀ + x w2ᵀ``.

    Example:
        >>> x, w = torch.ones(2, 3), torch.ones(4, 3)
        >>> y, y1, y2 = linear_jet2(x, w, None, torch.ones(1, 2, 3), torch.ones(1, 4, 3), torch.zeros(1, 2, 3), torch.zeros(1, 4, 3))
        >>> y1[0, 0, 0].item(), y2[0, 0, 0].item()
        (6.0, 6.0)
    """

    def f(a: Tensor, c: Tensor) -> Tensor:
        return torch.nn.functional.linear(a, c, b)

    return nested_jvp_jet2(f, (x, w), (x1, w1), (x2, w2))


def onehot_weight_tangent(x: Tensor, rows: Tensor, cols: Tensor, out_features: int) -> Tensor:
    """``x E_kᵀ`` for one-hot weight directions ``E_k`` (a 1 at ``(rows[k], cols[k])`` of an ``(out, in)`` weight).

    Args:
        x: ``(..., in)`` layer input.
        rows, cols: ``(K,)`` int64 coordinates; ``rows[k] < 0`` marks a zero direction.
        out_features: the weight's ``out``.

    Returns:
        ``(K, ..., out)``: zero except ``[k, ..., rows[k]] = x[..., cols[k]]``.

    Example:
        >>> x = torch.tensor([[1., 2., 3.]])
        >>> onehot_weight_tangent(x, torch.tensor([1]), torch.tensor([2]), 2).tolist()
        [[[0.0, 3.0]]]
    """
    k = rows.numel()
    seeds = torch.zeros(k, out_features, x.shape[-1], dtype=x.dtype, device=x.device)
    valid = rows >= 0
    seeds[torch.arange(k, device=x.device)[valid], rows[valid], cols[valid]] = 1
    return torch.einsum("...i,koi->k...o", x, seeds)


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x · c) mod 2³²`` for ``x`` holding uint32 values in int64, without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def hash32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of int64 tensors holding uint32 values.

    Twin of ``csrc/probe_hash.h`` (the C++ and CUDA kernels) and of the Triton kernels' ``_hash32``.
    """
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def rademacher(seed: int, first_probe: int, k: int, n: int, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """Probes ``first_probe .. first_probe + k - 1`` of the stream of ``seed``: ``(k, n)`` of ±1.

    Entry ``(j, i)`` is the top bit of ``hash32(hash32(hash32(seed) + probe_j) ^ i)``, so any probe can be
    regenerated anywhere (CPU, GPU, another process) from three integers.

    Example:
        >>> z = rademacher(0, 0, 2, 5)
        >>> bool(((z == 1) | (z == -1)).all()), torch.equal(z[1:], rademacher(0, 1, 1, 5))
        (True, True)
    """
    probe = torch.arange(first_probe, first_probe + k, device=device, dtype=torch.int64)
    h = hash32(hash32(torch.tensor(seed & _M32, dtype=torch.int64, device=device)) + probe)[:, None]
    v = hash32(h ^ torch.arange(n, device=device, dtype=torch.int64)[None, :])
    return 1.0 - 2.0 * (v >> 31).to(dtype)


def hutchinson_update_seeded_(mean: Tensor, m2: Tensor, hz: Tensor, seed: int, first_probe: int, count: int) -> None:
    """Merge samples ``z_j ⊙ hz_j`` with ``z = rademacher(seed, first_probe, k, n)`` into ``mean``/``m2`` in place.

    Example:
        >>> mean, m2 = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        >>> z = rademacher(7, 0, 4, 3)
        >>> hutchinson_update_seeded_(mean, m2, 2 * z, seed=7, first_probe=0, count=0)  # Hz = 2z: every sample is 2
        >>> mean.tolist(), m2.tolist()
        ([2.0, 2.0, 2.0], [0.0, 0.0, 0.0])
    """
    z = rademacher(seed, first_probe, hz.shape[0], hz.shape[1], dtype=mean.dtype, device=mean.device)
    hutchinson_update_(mean, m2, z, hz, count)
