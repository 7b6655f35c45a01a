"""The reference engine: a plain double-backward loop, as a paper author writes it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import Engine, MultiFn, ScalarFn


class DoubleBackwardEngine(Engine):
    """One ``torch.autograd.grad`` of a gradient entry per coordinate or probe.

    Slow but built from the most-tested autograd path; the others are checked
    against it and against dense Hessians.

    Example:
        >>> f = lambda p: (p ** 3).sum()
        >>> DoubleBackwardEngine().diagonal_entries(f, torch.tensor([1.0, 2.0]), torch.tensor([1]), 1)
        tensor([12.])
    """

    name = "double_backward"
    bytes_per_tangent = 2.0  # one tangent at a time, over the graph of the gradient

    def diagonal_entries(self, f: ScalarFn, p: Tensor, indices: Tensor, chunk_size: int) -> Tensor:
        with torch.enable_grad():
            leaf = p.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(f(leaf), leaf, create_graph=True)
            g = (g.to_dense() if g.is_sparse else g).reshape(-1)  # nn.Embedding(sparse=True): a sparse gradient
            out = torch.empty(indices.numel(), dtype=p.dtype, device=p.device)
            for j, i in enumerate(indices.tolist()):
                if not g[i].requires_grad:  # the gradient entry is constant in p
                    out[j] = 0.0
                    continue
                (row,) = torch.autograd.grad(g[i], leaf, retain_graph=True, allow_unused=True)
                out[j] = 0.0 if row is None else (row.to_dense() if row.is_sparse else row).reshape(-1)[i]
        return out

    def hvp(
        self, f: MultiFn, primals: Sequence[Tensor], tangents: Sequence[Tensor], chunk_size: int
    ) -> tuple[Tensor, ...]:
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(True) for p in primals]
            grads = torch.autograd.grad(f(*leaves), leaves, create_graph=True)
            k = tangents[0].shape[0]
            out = [torch.empty_like(t) for t in tangents]
            for j in range(k):
                rows = torch.autograd.grad(
                    grads, leaves, grad_outputs=[t[j] for t in tangents], retain_graph=True, allow_unused=True
                )
                for o, r in zip(out, rows):
                    o[j] = 0.0 if r is None else (r.to_dense() if r.is_sparse else r)
        return tuple(out)
