"""Fused Hutchinson accumulation: running mean and variance of ``z ⊙ Hz``.

Backends: ``cpp`` (``torch.ops.fasthess.hutchinson_update_``, one pass over the
``(k, n)`` samples with no temporaries) and ``torch`` (:mod:`.reference`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import KernelFamily, extension_loaded
from .reference import hutchinson_update_ as reference_update_

family = KernelFamily("hutchinson_update_")


@family.register("cpp", available=extension_loaded)
def _cpp(mean: Tensor, m2: Tensor, z: Tensor, hz: Tensor, count: int) -> None:
    if mean.device.type != "cpu":  # the cpp kernel is the CPU one
        return reference_update_(mean, m2, z, hz, count)
    torch.ops.fasthess.hutchinson_update_(mean, m2, z.to(mean.dtype), hz.to(mean.dtype), count)


family.register("torch", available=lambda: True)(reference_update_)


def hutchinson_update_(
    mean: Tensor, m2: Tensor, z: Tensor, hz: Tensor, count: int, backend: str = "auto"
) -> str:
    """Merge samples ``z ⊙ hz`` (``(k, n)``) into ``mean`` / ``m2`` (``(n,)``); returns the backend used."""
    name, fn = family.select(backend)
    fn(mean, m2, z, hz, count)
    return name
