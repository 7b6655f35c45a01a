"""A symmetric matrix over the concatenated selected parameters, seen only through products.

Every diagonal estimator in :mod:`fasthess.estimators` works on flat ``(k, n)``
batches of directions, ``n`` the total number of selected entries, so that it is
one short piece of linear algebra; :class:`FlatOperator` turns that into the
engine's per-parameter Hessian-vector products (or a dense matrix, in tests) and
counts the products it paid for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..sampling import probes

BlockApply = Callable[[list[Tensor]], Sequence[Tensor]]


class FlatOperator:
    """``V ↦ V Aᵀ`` for a symmetric ``(n, n)`` matrix ``A`` split into parameter blocks.

    Args:
        shapes: the parameter shapes, in order; ``n`` is the sum of their sizes.
        apply: takes one ``(k, *shape)`` batch per parameter and returns ``A v``
            in the same layout (e.g. the engine's Hessian-vector products).
        dtype: dtype the blocks are handed to ``apply`` in.
        device: where they live.

    Products are counted in :attr:`products` (one per direction).

    Example:
        >>> A = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 4.0]], dtype=torch.float64)
        >>> op = FlatOperator.from_matrix(A, [(2,), (1,)])
        >>> op(torch.eye(3, dtype=torch.float64)).diagonal().tolist(), op.products
        ([2.0, 3.0, 4.0], 3)
    """

    def __init__(self, shapes: Sequence[tuple[int, ...]], apply: BlockApply, dtype: torch.dtype, device) -> None:
        self.shapes = [tuple(s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.n = sum(self.sizes)
        self._apply = apply
        self.dtype, self.device = dtype, device
        self.products = 0

    @classmethod
    def from_matrix(cls, A: Tensor, shapes: Sequence[tuple[int, ...]]) -> "FlatOperator":
        """The operator of a dense symmetric matrix (tests and small studies)."""
        op = cls(shapes, lambda blocks: None, A.dtype, A.device)
        op._apply = lambda blocks: op.split(op.join(blocks) @ A.T)
        return op

    def segments(self) -> list[slice]:
        """Where each parameter's entries sit in a flat vector."""
        ends = [0]
        for s in self.sizes:
            ends.append(ends[-1] + s)
        return [slice(a, b) for a, b in zip(ends, ends[1:])]

    def split(self, V: Tensor) -> list[Tensor]:
        """``(k, n)`` → one ``(k, *shape)`` block per parameter."""
        return [V[:, sl].reshape(V.shape[0], *shape) for sl, shape in zip(self.segments(), self.shapes)]

    def join(self, blocks: Sequence[Tensor]) -> Tensor:
        """One ``(k, *shape)`` block per parameter → ``(k, n)``."""
        return torch.cat([b.reshape(b.shape[0], -1) for b in blocks], dim=1)

    def __call__(self, V: Tensor) -> Tensor:
        """``A`` applied to each row of ``V`` (``(k, n)`` in, ``(k, n)`` float64 out)."""
        if V.shape[0] == 0:
            return V.to(torch.float64)
        blocks = [b.to(self.dtype).contiguous() for b in self.split(V.to(self.device))]
        self.products += V.shape[0]
        return self.join([b.detach() for b in self._apply(blocks)]).to(torch.float64)

    def probes(self, start: int, count: int, distribution: str, seed: int) -> Tensor:
        """Probes ``start .. start+count-1`` of :func:`fasthess.sampling.probes`, flat ``(count, n)`` float64."""
        zs = probes(self.shapes, start, count, distribution, seed)
        return self.join(zs).to(device=self.device, dtype=torch.float64)
