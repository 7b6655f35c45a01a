"""The interface every second-order engine implements."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from torch import Tensor

from ..capture import CaptureError
from ..errors import UnsupportedOpError
from ..objective import LossCheck
from .forward_mode_audit import PATH_NAMES, untrusted_op
from .generic_second_order import report

ScalarFn = Callable[[Tensor], Tensor]
MultiFn = Callable[..., Tensor]


class Engine:
    """Computes exact Hessian diagonal entries and Hessian-vector products.

    Subclasses fill in :meth:`diagonal_entries` (sampled / exact methods) and,
    where they can, :meth:`hvp` (Hutchinson). ``bytes_per_tangent`` is the memory
    of one batched tangent in units of one forward pass's saved activations, used
    to size chunks automatically.
    """

    name: ClassVar[str] = "base"
    supports_hvp: ClassVar[bool] = True
    bytes_per_tangent: ClassVar[float] = 3.0
    # the generic_second_order path this engine takes through every op, checked before it runs
    # (None: torch's double backward, the reference)
    audited_path: ClassVar[str | None] = None

    def __init__(self, fallback: Engine | None = None) -> None:
        self.fallback = fallback  # takes over where an audit fails (engine="auto"); None: the audit raises

    def audited(self, f: Callable[[Sequence[Tensor]], Tensor], params: Sequence[Tensor]) -> Engine:
        """This engine if its derivatives can be trusted on every op of ``f(params)``, else its fallback.

        Raises:
            UnsupportedOpError: without a fallback, an op on which torch's ``audited_path`` is wrong or
                missing, or a loss that cannot be recorded to be checked; names the op and what to use.
        """
        if self.audited_path is None:
            return self
        how = PATH_NAMES[self.audited_path]
        try:
            bad = untrusted_op(f, params, self.audited_path)
        except CaptureError as err:
            bad = f"the loss cannot be recorded to check {how} op by op ({err})"
            cause: Exception | None = err
        else:
            cause = None
        if bad is None:
            return self
        if self.fallback is not None:
            report(self.name, f"not trusted ({bad}); computed by {self.fallback.name}")
            return self.fallback.audited(f, params)
        raise UnsupportedOpError(
            f"engine {self.name!r} ({how}) cannot be trusted on this loss: {bad}. Use engine='auto' or "
            "'double_backward'.",
            op=bad.split(":")[0] if cause is None else None, reason=bad,
        ) from cause

    def per_tangent_bytes(self, check: LossCheck) -> int:
        """Memory of one batched tangent, from what one gradient evaluation saved."""
        return int(self.bytes_per_tangent * max(check.saved_bytes, 1))

    def default_budget(self, check: LossCheck, available: int, device_type: str) -> int:
        """Bytes the batched tangents may take when the caller gives no ``memory_budget``."""
        return available // 2

    def diagonal_entries(self, f: ScalarFn, p: Tensor, indices: Tensor, chunk_size: int) -> Tensor:
        """Exact ``H[i, i]`` of ``f`` at ``p`` for flat ``indices``.

        Args:
            f: scalar function of one tensor.
            p: point, any shape ``S``.
            indices: ``(k,)`` int64 flat indices into ``p``.
            chunk_size: tangents per batched pass.

        Returns:
            ``(k,)`` tensor of second derivatives ``d²f/dp_i²``.
        """
        raise NotImplementedError

    def hvp(
        self, f: MultiFn, primals: Sequence[Tensor], tangents: Sequence[Tensor], chunk_size: int
    ) -> tuple[Tensor, ...]:
        """Batched Hessian-vector products of ``f(*primals)``.

        Args:
            f: scalar function of ``len(primals)`` tensors.
            primals: the point.
            tangents: one ``(k, *primal.shape)`` batch per primal (the same k).
            chunk_size: tangents per batched pass.

        Returns:
            ``(k, *primal.shape)`` blocks of ``H v`` for each primal.
        """
        raise NotImplementedError(f"engine {self.name!r} cannot compute Hessian-vector products")


def one_hot_tangents(p: Tensor, indices: Tensor) -> Tensor:
    """``(k, *p.shape)`` batch with a single 1 at each flat index."""
    t = p.new_zeros((indices.numel(), p.numel()))
    t[range(indices.numel()), indices] = 1
    return t.view(indices.numel(), *p.shape)


def chunks(n: int, size: int) -> list[slice]:
    size = max(1, int(size))
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]
