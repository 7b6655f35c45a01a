"""Hessian rows and dense blocks of chosen layers: ``fasthess.rows`` and ``fasthess.block``.

Row ``i`` of the Hessian is ``H e_i`` (the Hessian is symmetric), so each row
costs one Hessian-vector product with a one-hot tangent, computed by the HVP
engines of :func:`fasthess.diag`'s Hutchinson method (``double_backward`` on
a CPU, ``fwd_rev`` on a GPU). Rows are restricted to the selected layers: the
columns are the coordinates of the same parameters, flattened and concatenated
in the order :func:`fasthess.resolve_parameters` returns them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .api import LossArg, _Chunk, _Progress
from .decompositions import autodiff_safe
from .engines import get_engine
from .errors import MemoryRiskError
from .layers import LayerSpec, resolve_parameters
from .objective import Objective, auto_chunk_size, available_memory_bytes, check_training_mode

__all__ = ["block", "rows"]


def rows(
    model: nn.Module,
    loss: LossArg,
    layers: LayerSpec | Iterable[LayerSpec],
    indices: Tensor | Iterable[int],
    *,
    dtype: torch.dtype | None = None,
    engine: str = "auto",
    chunk_size: int | None = None,
    allow_training_mode: bool = False,
) -> Tensor:
    """Rows ``H[indices, :]`` of the Hessian restricted to the parameters of ``layers``.

    Args:
        model: the network; its parameters are read, never changed.
        loss: a zero-argument callable returning a scalar tensor, or a sequence
            of them (micro-batches; the loss is their mean), as for :func:`fasthess.diag`.
        layers: names, glob patterns, modules, parameters or module types (see
            :func:`fasthess.resolve_parameters`); their parameters, flattened and
            concatenated in that order, index both the rows and the columns.
        indices: ``(k,)`` flat row indices into that concatenation (length ``n``).
        dtype: compute in this dtype (e.g. ``torch.float64``); the model is unchanged.
        engine: an HVP engine: ``"auto"``, ``"double_backward"`` or ``"fwd_rev"``.
        chunk_size: rows per batched pass (``None``: sized to free memory).
        allow_training_mode: measure even with dropout / batch norm in training mode.

    Returns:
        ``(k, n)`` tensor: row ``r`` is ``H[indices[r], :]`` (also column ``indices[r]``).

    Raises:
        IndexError: an index outside ``[0, n)``.
        LayerNotFoundError, LossError, TrainingModeError, MemoryRiskError,
        BackendUnavailableError: as for :func:`fasthess.diag`.

    Example:
        >>> import torch, fasthess
        >>> w = torch.nn.Linear(3, 1, bias=False)
        >>> x = torch.eye(3)
        >>> fasthess.rows(w, lambda: w(x).pow(2).sum(), "weight", [0, 2])  # 2 xᵀx = 2 I
        tensor([[2., 0., 0.],
                [0., 0., 2.]])
    """
    closures = list(loss) if isinstance(loss, (list, tuple)) else [loss]
    if not allow_training_mode:
        check_training_mode(model)
    params = resolve_parameters(model, layers)
    n = sum(p.numel() for p in params.values())
    idx = torch.as_tensor(list(indices) if not isinstance(indices, Tensor) else indices).reshape(-1).long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise IndexError(
            f"row indices must lie in [0, {n}) (the {len(params)} selected parameter(s) "
            f"{', '.join(list(params)[:3])} have {n} coordinates); got {int(idx.min())}..{int(idx.max())}"
        )
    device = next(iter(params.values())).device
    eng = get_engine(engine, "hutchinson", device.type)
    with autodiff_safe(allow_dropout=allow_training_mode):
        objective = Objective(model, closures, params, dtype=dtype, fresh_buffers=allow_training_mode)
        check = objective.validate()
        primals = objective.primals
        out = torch.zeros(idx.numel(), n, dtype=primals[0].dtype, device=device)
        if not idx.numel():
            return out
        per_row = eng.per_tangent_bytes(check)
        budget = eng.default_budget(check, available_memory_bytes(device), device.type)
        chunk = _Chunk(chunk_size or auto_chunk_size(check, idx.numel(), per_row, device, budget), _Progress(False))
        sizes = [p.numel() for p in primals]
        done = 0
        while done < idx.numel():
            k = min(chunk.size, idx.numel() - done)
            onehot = torch.zeros(k, n, dtype=primals[0].dtype, device=device)
            onehot[torch.arange(k), idx[done : done + k].to(device)] = 1
            tangents = [t.reshape(k, *p.shape) for t, p in zip(onehot.split(sizes, dim=1), primals)]
            for c in range(len(objective)):
                hv = chunk.run(lambda size, c=c: eng.hvp(objective.of_all(c), primals, tangents, size))
                out[done : done + k] += torch.cat([h.detach().reshape(k, -1) for h in hv], dim=1)
            done += k
    return out / len(objective)


def block(
    model: nn.Module,
    loss: LossArg,
    layers: LayerSpec | Iterable[LayerSpec],
    *,
    max_size: int = 4096,
    dtype: torch.dtype | None = None,
    engine: str = "auto",
    chunk_size: int | None = None,
    allow_training_mode: bool = False,
) -> Tensor:
    """The dense Hessian block ``(n, n)`` of the parameters of (small) ``layers``.

    Costs ``n`` Hessian-vector products and ``n²`` stored entries, so it is refused
    above ``max_size`` coordinates or when ``n²`` entries would not fit in free memory.

    Args:
        model, loss, layers, dtype, engine, chunk_size, allow_training_mode: as for :func:`rows`.
        max_size: the largest ``n`` accepted (4096: 128 MiB in float64 and 4096 HVPs).

    Returns:
        ``(n, n)`` tensor: the Hessian of the loss with respect to the selected
        parameters, flattened and concatenated in :func:`fasthess.resolve_parameters` order.

    Raises:
        MemoryRiskError: ``n > max_size`` or the block would not fit, with the fix.

    Example:
        >>> import torch, fasthess
        >>> lin = torch.nn.Linear(2, 1)
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> fasthess.block(lin, lambda: lin(x).pow(2).sum(), lin)  # 2 [x, 1]ᵀ[x, 1], weight then bias
        tensor([[2., 4., 2.],
                [4., 8., 4.],
                [2., 4., 2.]])
    """
    params = resolve_parameters(model, layers)
    n = sum(p.numel() for p in params.values())
    itemsize = (dtype or next(iter(params.values())).dtype).itemsize
    device = next(iter(params.values())).device
    fix = (
        "Select a smaller layer (or one parameter of it, e.g. 'linear1.weight' rather than the module), "
        "take sampled rows with fasthess.rows(model, loss, layers, indices)"
    )
    if n > max_size:
        raise MemoryRiskError(
            f"the Hessian block of {', '.join(list(params)[:3])} has {n} x {n} entries "
            f"({n * n * itemsize / 2**30:.2f} GiB, {n} Hessian-vector products); the limit is max_size={max_size}. "
            f"{fix}, or raise max_size."
        )
    if n * n * itemsize > available_memory_bytes(device) // 2:
        raise MemoryRiskError(
            f"the Hessian block of {n} x {n} entries needs {n * n * itemsize / 2**30:.2f} GiB, more than half of "
            f"the free memory. {fix}."
        )
    return rows(model, loss, layers, torch.arange(n), dtype=dtype, engine=engine, chunk_size=chunk_size,
                allow_training_mode=allow_training_mode)
