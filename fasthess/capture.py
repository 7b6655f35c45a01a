"""Record the parameter-dependent part of a loss as a graph of ATen ops.

The tangent-adjoint engine needs the computation below the user's Python: which
ATen ops turn the selected parameters into the loss, with their primal values.
:func:`capture` runs the loss once under a ``TorchDispatchMode`` and records
every op that has a parameter-dependent input, except ops the loss runs under its own
``torch.no_grad()``: their results are constants, as autograd treats them (the recording runs
with grad mode on and detached parameters, so such blocks show). Everything else (inputs, buffers,
masks, other parameters, Python control flow, ``.item()`` checks) is evaluated
eagerly and enters the graph as a constant, so models with data-dependent
branches (Hugging Face attention masks) capture where ``make_fx`` refuses.

Tensors are identified by Python identity first and, where user code holds a
different object for the same view, by the memory they view (storage pointer,
offset, shape, strides, dtype); the first recorded tensor keeps a memory key, so
``detach()`` (same memory, no derivative) never shadows the tensor it came from.
Every recorded tensor is kept alive while recording, so neither its identity nor
its memory can be reused by an unrelated constant.

Example:
    >>> import torch
    >>> w = torch.randn(3, 2)
    >>> x = torch.randn(5, 2)
    >>> g = capture(lambda ps: torch.tanh(x @ ps[0].t()).sum(), [w])
    >>> [str(n.func) for n in g.nodes]
    ['aten.t.default', 'aten.mm.default', 'aten.tanh.default', 'aten.sum.default']
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import fused_nodes
from .errors import first_line

__all__ = ["CaptureError", "Graph", "Node", "OnCopies", "Ref", "capture", "trace"]


class CaptureError(RuntimeError):
    """The loss cannot be recorded faithfully (in-place update of a dependent tensor, random op, ...)."""


@dataclass(frozen=True)
class Ref:
    """Argument slot holding the recorded value with this id."""

    id: int


@dataclass
class Node:
    """One recorded ATen call. ``flat_args`` holds :class:`Ref`, constants and Python values."""

    func: Any
    flat_args: list[Any]
    spec: Any
    out_ids: list[int | None]  # one per flattened output; None for non-tensor or non-float outputs
    out_shapes: list[torch.Size | None]
    cache: dict[Any, Any] = field(default_factory=dict)  # per-op constants the engine derives once

    def refs(self) -> list[int]:
        return [a.id for a in self.flat_args if isinstance(a, Ref)]

    def call(self, values: dict[int, Tensor], replace: Callable[[int], Any] | None = None) -> Any:
        """Run the op with ``Ref`` slots filled from ``values`` (or ``replace(id)`` where given)."""
        flat = [(replace(a.id) if replace else values[a.id]) if isinstance(a, Ref) else a for a in self.flat_args]
        args, kwargs = tree_unflatten(flat, self.spec)
        return self.func(*args, **kwargs)


@dataclass
class Graph:
    """Recorded ops from ``placeholders`` (value ids of the parameters) to ``output``."""

    placeholders: list[int]
    nodes: list[Node]
    output: int

    def downstream(self, placeholder: int) -> list[int]:
        """Positions of the nodes that depend on ``placeholder``, in execution order."""
        live = {placeholder}
        out = []
        for pos, node in enumerate(self.nodes):
            if any(r in live for r in node.refs()):
                out.append(pos)
                live.update(i for i in node.out_ids if i is not None)
        return out

    def replay(self, params: Sequence[Tensor]) -> dict[int, Tensor]:
        """Values of every recorded tensor for ``params`` (autograd records if enabled).

        Raises:
            CaptureError: an op as recorded fails on these inputs (names the op).
        """
        values: dict[int, Tensor] = dict(zip(self.placeholders, params))
        for node in self.nodes:
            try:
                out = node.call(values)
            except Exception as err:  # noqa: BLE001 - e.g. a no-grad-only variant (_embedding_bag_forward_only)
                raise CaptureError(f"{node.func} as recorded cannot be replayed with autograd ({first_line(err)})") from err
            flat, _ = tree_flatten(out)
            for i, t in zip(node.out_ids, flat):
                if i is not None:
                    values[i] = t
        return values


def _key(t: Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def _tracked(t: Any) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point() and t.numel() > 0


Visit = Callable[[Node, list[int]], None]


def _in_no_grad_block() -> bool:
    """Inside the loss's own ``torch.no_grad()``; not inside an autograd.Function's forward (or a custom op's),
    which runs with grad mode off too but also turns forward AD off."""
    return not torch.is_grad_enabled() and torch._C._is_fwd_grad_enabled()


class _Recorder(TorchDispatchMode):
    """Records the ops with a parameter-dependent input; with ``visit``, only shows each one to it (see :func:`trace`)."""

    def __init__(self, params: Sequence[Tensor], visit: Visit | None = None) -> None:
        super().__init__()
        self.visit = visit
        self.ids: dict[tuple, int] = {}
        self.by_id: dict[int, int] = {}
        self.keep: list[Tensor] = []  # holds recorded tensors so their memory is not reused
        self.nodes: list[Node] = []
        self.constants: list[tuple[Tensor, int]] = []  # (tensor, version when captured)
        self.placeholders = [self._register(p) for p in params]

    def _register(self, t: Tensor) -> int:
        i = len(self.keep)
        self.keep.append(t)
        self.by_id[id(t)] = i
        self.ids.setdefault(_key(t), i)
        return i

    def _lookup(self, a: Any) -> int | None:
        if not _tracked(a):
            return None
        found = self.by_id.get(id(a))
        return found if found is not None else self.ids.get(_key(a))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        flat, spec = tree_flatten((args, kwargs))
        deps = [self._lookup(a) for a in flat]
        if self.visit is not None and any(d is not None for d in deps):
            return self._visit(func, flat, spec, deps, args, kwargs)
        out = func(*args, **kwargs)
        if all(d is None for d in deps):
            return out
        if func._schema.is_mutable:
            raise CaptureError(f"{func} updates a parameter-dependent tensor in place")
        if _in_no_grad_block():
            return out  # inside the loss's own torch.no_grad(): a constant, as autograd treats it
        if torch.Tag.nondeterministic_seeded in func.tags:
            raise CaptureError(f"{func} is random and depends on the parameters")
        out_flat, out_spec = tree_flatten(out)
        if any(isinstance(t, Tensor) and t.is_complex() for t in out_flat):
            raise CaptureError(f"{func} makes a complex tensor from the parameters (the engine follows real tensors)")
        if not any(_tracked(t) for t in out_flat):
            # .item(), comparisons, argmax, integer casts: constants of the point, as autograd treats them
            return out
        flat_args = []
        for a, d in zip(flat, deps):
            if d is not None:
                flat_args.append(Ref(d))
            else:
                if isinstance(a, Tensor):
                    self.constants.append((a, a._version))
                flat_args.append(a)
        out_ids = [self._register(t) if _tracked(t) else None for t in out_flat]
        shapes = [t.shape if i is not None else None for t, i in zip(out_flat, out_ids)]
        self.nodes.append(Node(func, flat_args, spec, out_ids, shapes))
        return out


    def _visit(self, func: Any, flat: list[Any], spec: Any, deps: list[int | None], args: Any, kwargs: Any) -> Any:
        if _in_no_grad_block():
            raise CaptureError(
                f"{func} runs under the loss's own torch.no_grad() on a parameter-dependent tensor: autograd takes its "
                "result as a constant, forward-mode AD differentiates it"
            )
        # an in-place op's inputs as they were before it ran, the op as its functional variant where there is one
        mutable = func._schema.is_mutable
        shown = [a.clone() if mutable and isinstance(a, Tensor) else a for a in flat]
        out = func(*args, **kwargs)
        out_flat, _ = tree_flatten(out)
        if any(isinstance(t, Tensor) and t.is_complex() for t in out_flat):
            raise CaptureError(f"{func} makes a complex tensor from the parameters (the engine follows real tensors)")
        tracked = [_tracked(t) for t in out_flat]
        if any(tracked):
            for t, keep in zip(out_flat, tracked):
                if keep and self._lookup(t) is None:
                    self._register(t)
            op = func
            if mutable:  # out= ops as their functional variant, in-place ops on copies of what they write
                op = (functional_variant(func) if "out" in _written(func) else None) or OnCopies(func)
            node = Node(op, shown, spec, [0 if k else None for k in tracked], [None] * len(out_flat))
            self.visit(node, [i for i, d in enumerate(deps) if d is not None])
        return out


def _written(func: Any) -> set[str]:
    return {a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write}


def functional_variant(func: Any) -> Any:
    """The out-of-place op of an ``out=`` op (``aten.mm.out`` → ``aten.mm.default``), or None."""
    packet = getattr(torch.ops.aten, func._schema.name.split("::")[-1], None)
    op = getattr(packet, "default", None)
    return op if op is not None and not op._schema.is_mutable else None


class OnCopies:
    """An in-place op applied to copies of the tensors it writes: as differentiable as its functional form.

    Example:
        >>> OnCopies(torch.ops.aten.add_.Tensor)(x := torch.zeros(2), torch.ones(2)), x
        (tensor([1., 1.]), tensor([0., 0.]))
    """

    def __init__(self, func: Any) -> None:
        self.func, self.written = func, _written(func)
        self.names = [a.name for a in func._schema.arguments]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args = [a.clone() if n in self.written and isinstance(a, Tensor) else a for n, a in zip(self.names, args)]
        kwargs = {k: v.clone() if k in self.written and isinstance(v, Tensor) else v for k, v in kwargs.items()}
        return self.func(*args, **kwargs)

    def __str__(self) -> str:
        return str(self.func)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OnCopies) and other.func == self.func

    def __hash__(self) -> int:
        return hash(("OnCopies", self.func))


def trace(f: Callable[[Sequence[Tensor]], Tensor], params: Sequence[Tensor], visit: Visit) -> None:
    """Run ``f(params)`` once and show ``visit(node, positions)`` every op with a parameter-dependent input.

    Unlike :func:`capture` nothing is refused but complex intermediates and ops the loss runs under its
    own ``torch.no_grad()`` (which autograd and forward-mode AD treat differently): an in-place op is shown on its
    inputs before the update, applied to copies (:class:`OnCopies`; an ``out=`` op as its functional
    variant), a random op as it ran.
    ``node.flat_args`` hold the values, ``positions`` the dependent ones; ``node.out_ids`` mark the
    floating outputs (0) and the others (None).

    Raises:
        CaptureError: a complex intermediate or a ``torch.no_grad()`` block depends on the parameters.
    """
    params = [p.detach() for p in params]
    with torch.enable_grad(), _Recorder(params, visit):  # grad mode on: the loss's own torch.no_grad() shows
        f(params)


def capture(f: Callable[[Sequence[Tensor]], Tensor], params: Sequence[Tensor], fused: bool = False) -> Graph:
    """Record ``f(params)`` (a scalar) as a :class:`Graph` of the ops that depend on ``params``.

    Args:
        f: function of the list of parameter tensors returning a scalar tensor.
        params: the point; each becomes a placeholder.
        fused: let the decompositions of :func:`fasthess.autodiff_safe` record attention,
            layer norm and cross-entropy as single nodes (:mod:`fasthess.fused_nodes`); only
            for an engine with rules for them.

    Raises:
        CaptureError: the loss updates a dependent tensor in place, draws random
            numbers from dependent values, or a captured constant changes later.
    """
    params = [p.detach() for p in params]
    # A parameter passed twice (or two views of one memory) would be one value.
    if len({_key(p) for p in params}) != len(params):
        params = [p.clone() for p in params]
    # grad mode on (the parameters are detached): an op the loss runs under its own torch.no_grad() is seen so
    rec = _Recorder(params)
    fusing = fused_nodes.recording(lambda t: rec._lookup(t) is not None) if fused else contextlib.nullcontext()
    with torch.enable_grad(), fusing, rec:
        loss = f(params)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise CaptureError("the loss is not a scalar tensor")
    output = rec._lookup(loss)
    if output is None:
        raise CaptureError("the loss does not depend on the selected parameters")
    for t, version in rec.constants:
        if t._version != version:
            raise CaptureError("a tensor used by the loss was modified in place after its use")
    return Graph(rec.placeholders, rec.nodes, output)
