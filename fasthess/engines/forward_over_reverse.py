"""Forward-over-reverse Hessian-vector products, vmapped over a batch of tangents."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from ..kernels.attention_hvp.forward_over_reverse import route as attention_route
from .base import Engine, MultiFn, ScalarFn, chunks, one_hot_tangents


class ForwardOverReverseEngine(Engine):
    """``vmap(jvp(grad(f)))``: a batch of HVPs per pass; entries are read off their diagonal.

    Example:
        >>> f = lambda p: (p ** 3).sum()
        >>> ForwardOverReverseEngine().diagonal_entries(f, torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), 2)
        tensor([ 6., 12.])
    """

    name = "fwd_rev"
    audited_path = "forward_over_reverse"
    # benchmarks/engine_memory.py, CPU: 2.5x (T=128) and 2.7x (T=32) one gradient's saved bytes per
    # tangent, since the passes run under no_grad (7.4x and 5.7x before); the H200 gave 6x before it
    bytes_per_tangent = 4.0

    def diagonal_entries(self, f: ScalarFn, p: Tensor, indices: Tensor, chunk_size: int) -> Tensor:
        engine = self.audited(lambda ps: f(ps[0]), [p])
        if engine is not self:
            return engine.diagonal_entries(f, p, indices, chunk_size)
        g = grad(f)

        def column(t: Tensor) -> Tensor:
            return jvp(g, (p,), (t,))[1]

        parts = []
        with torch.no_grad():  # torch.func.grad builds its own graph; the outer one would only hoard tangents
            for sl in chunks(indices.numel(), chunk_size):
                idx = indices[sl]
                cols = vmap(column)(one_hot_tangents(p, idx)).reshape(idx.numel(), -1)
                parts.append(cols[torch.arange(idx.numel()), idx])
        return torch.cat(parts)

    def hvp(
        self, f: MultiFn, primals: Sequence[Tensor], tangents: Sequence[Tensor], chunk_size: int
    ) -> tuple[Tensor, ...]:
        engine = self.audited(lambda ps: f(*ps), primals)
        if engine is not self:
            return engine.hvp(f, primals, tangents, chunk_size)
        g = grad(f, argnums=tuple(range(len(primals))))

        def product(*ts: Tensor) -> tuple[Tensor, ...]:
            return jvp(g, tuple(primals), ts)[1]

        # torch.func.grad builds its own graph; an outer one would only hoard tangents
        with attention_route(), torch.no_grad():  # attention's backward: the attention HVP kernel
            parts = [vmap(product)(*(t[sl] for t in tangents)) for sl in chunks(tangents[0].shape[0], chunk_size)]
        return tuple(torch.cat(blocks) for blocks in zip(*parts))
