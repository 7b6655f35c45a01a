"""Fused Hutchinson accumulation: running mean and variance of ``z ⊙ Hz``.

Backends, in order of preference for ``backend="auto"`` (each on its device):

* ``triton``: one program per block of coordinates (:mod:`.triton_kernels`), CUDA tensors.
* ``cuda``: ``torch.ops.fasthess.hutchinson_update_`` on CUDA tensors (``csrc/cuda/hutchinson_update.cu``,
  built only against a CUDA torch); float32/float64 statistics.
* ``cpp``: ``torch.ops.fasthess.hutchinson_update_`` on CPU tensors, one pass over the ``(k, n)``
  samples with no temporaries; float32/float64 statistics.
* ``torch``: :mod:`.reference`, any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import KernelFamily, cuda_op_available, op_available, triton_available
from .reference import hutchinson_update_ as reference_update_

family = KernelFamily("hutchinson_update_")
_FLOATS = (torch.float32, torch.float64)


@family.register("triton", available=lambda: triton_available(f"{__name__}.triton_kernels"), devices=("cuda",))
def _triton(mean: Tensor, m2: Tensor, z: Tensor, hz: Tensor, count: int) -> None:
    from .triton_kernels import hutchinson_update_triton

    hutchinson_update_triton(mean, m2, z, hz, count)


@family.register("cuda", available=lambda: cuda_op_available("hutchinson_update_"), devices=("cuda",), dtypes=_FLOATS)
def _cuda(mean: Tensor, m2: Tensor, z: Tensor, hz: Tensor, count: int) -> None:
    torch.ops.fasthess.hutchinson_update_(mean, m2, z.to(mean.dtype), hz.to(mean.dtype), count)


@family.register("cpp", available=lambda: op_available("hutchinson_update_"), devices=("cpu",), dtypes=_FLOATS)
def _cpp(mean: Tensor, m2: Tensor, z: Tensor, hz: Tensor, count: int) -> None:
    torch.ops.fasthess.hutchinson_update_(mean, m2, z.to(mean.dtype), hz.to(mean.dtype), count)


family.register("torch", available=lambda: True)(reference_update_)


def hutchinson_update_(
    mean: Tensor, m2: Tensor, z: Tensor, hz: Tensor, count: int, backend: str = "auto"
) -> str:
    """Merge samples ``z ⊙ hz`` (``(k, n)``) into ``mean`` / ``m2`` (``(n,)``); returns the backend used.

    Example:
        >>> mean, m2 = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        >>> hutchinson_update_(mean, m2, torch.ones(2, 2), torch.tensor([[1., 2.], [3., 4.]]), 0, backend="torch")
        'torch'
        >>> mean.tolist(), m2.tolist()
        ([2.0, 3.0], [2.0, 2.0])
    """
    name, fn = family.select(backend, mean.device.type, mean.dtype)
    fn(mean, m2, z, hz, count)
    return name
