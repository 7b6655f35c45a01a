"""Second directional derivatives ``vᵀHv`` by nested forward mode, vmapped."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jvp, vmap

from .base import Engine, ScalarFn, chunks, one_hot_tangents


class ForwardOverForwardEngine(Engine):
    """``vmap(jvp(jvp(f)))`` with one-hot ``v``: ``H_ii`` with no backward pass.

    Gives only the scalars ``vᵀHv``, so it serves the sampled and exact methods,
    not Hutchinson (which needs the vector ``Hv``).

    Example:
        >>> f = lambda p: (p ** 3).sum()
        >>> ForwardOverForwardEngine().diagonal_entries(f, torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), 2)
        tensor([ 6., 12.])
    """

    name = "fwd_fwd"
    supports_hvp = False
    audited_path = "forward"
    # benchmarks/engine_memory.py, CPU: 5.3x (T=128) and 1.6x (T=32) one gradient's saved bytes per
    # tangent (the T x T attention tangents grow faster than the activations a gradient saves)
    bytes_per_tangent = 6.0

    def diagonal_entries(self, f: ScalarFn, p: Tensor, indices: Tensor, chunk_size: int) -> Tensor:
        engine = self.audited(lambda ps: f(ps[0]), [p])
        if engine is not self:
            return engine.diagonal_entries(f, p, indices, chunk_size)

        def second(t: Tensor) -> Tensor:
            return jvp(lambda q: jvp(f, (q,), (t,))[1], (p,), (t,))[1]

        # forward mode needs no autograd graph: without no_grad, the model's other parameters (which
        # require grad) make every op save its batched dual inputs for a backward that never comes
        with torch.no_grad():
            parts = [vmap(second)(one_hot_tangents(p, indices[sl])) for sl in chunks(indices.numel(), chunk_size)]
        return torch.cat(parts)
