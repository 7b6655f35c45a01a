"""The loss as a pure function of the selected parameters.

The user hands fasthess a model and a zero-argument closure that runs it (like an
optimizer closure). :class:`Objective` turns that into ``f(params) -> scalar`` via
``torch.func.functional_call``, so torch.func transforms and plain autograd see
the same function, validates it once, and measures what a gradient costs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .errors import LossError, MemoryRiskError, TrainingModeError

LossClosure = Callable[[], Tensor]

_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


class _ClosureModule(nn.Module):
    """Holds the model as a submodule so ``functional_call`` can swap its parameters."""

    def __init__(self, model: nn.Module, closure: LossClosure) -> None:
        super().__init__()
        self.model = model
        self._closure = closure

    def forward(self) -> Tensor:
        return self._closure()


def check_training_mode(model: nn.Module) -> None:
    """Refuse modules whose training mode makes the loss random or stateful.

    Raises:
        TrainingModeError: listing the offending modules and the fix.
    """
    offenders = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        if isinstance(m, _DROPOUT_TYPES) and m.p > 0:
            offenders.append(f"{name or '<root>'} ({type(m).__name__}, p={m.p})")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            offenders.append(f"{name or '<root>'} ({type(m).__name__} in training mode)")
        elif isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
            offenders.append(f"{name or '<root>'} (MultiheadAttention, dropout={m.dropout})")
    if offenders:
        shown = ", ".join(offenders[:5]) + (f" and {len(offenders) - 5} more" if len(offenders) > 5 else "")
        raise TrainingModeError(
            f"modules in training mode would make the loss random or change the model: {shown}. "
            "Call model.eval() before fasthess.diag, or pass allow_training_mode=True to measure "
            "the Hessian of the training-mode loss anyway (batch norm then uses batch statistics "
            "without updating its running statistics)."
        )


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free bytes, or MemAvailable on the host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


@dataclass
class LossCheck:
    """What one validated evaluation of the loss told us."""

    loss: float
    saved_bytes: int
    gradient_seconds: float
    largest_saved_bytes: int = 0
    # torch.autograd.Function classes in the loss (module.name): a user's backward need not be the derivative
    # of its forward, so an engine that differentiates the recorded forward ops would not follow it
    autograd_functions: tuple[str, ...] = ()


class Objective:
    """``f(params) = mean_c closure_c()`` as a function of the selected parameters.

    Args:
        model: the network.
        closures: one or more zero-argument callables running ``model``; the
            objective is their mean (micro-batches of one large batch).
        params: ``{name: parameter}`` to differentiate with respect to.
        dtype: if set, parameters, buffers and floating inputs of ``model`` are
            cast to it for the computation (the model itself is not changed).
        fresh_buffers: give every call its own copy of the model's buffers, so
            modules that update them in training mode (batch norm's counters)
            neither change the model nor trip torch.func's ban on mutating
            captured tensors.
    """

    def __init__(
        self,
        model: nn.Module,
        closures: Sequence[LossClosure],
        params: dict[str, nn.Parameter],
        dtype: torch.dtype | None = None,
        fresh_buffers: bool = False,
    ) -> None:
        if not closures:
            raise LossError("loss= is an empty sequence; pass a callable or a non-empty list of callables")
        for c in closures:
            if not callable(c):
                raise LossError(
                    f"loss= must be a zero-argument callable returning a scalar tensor (got {type(c).__name__}); "
                    "wrap the computation: loss=lambda: criterion(model(x), y)"
                )
        self.model = model
        self.closures = list(closures)
        self.names = list(params)
        self.dtype = dtype
        self._wrappers = [_ClosureModule(model, c) for c in self.closures]
        self._fixed: dict[str, Tensor] = {}
        if dtype is not None:
            for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                if t.is_floating_point() and name not in params:
                    self._fixed["model." + name] = t.detach().to(dtype)
        self.primals = tuple(self._cast(p.detach()) for p in params.values())
        self._buffers = (
            {"model." + n: self._fixed.get("model." + n, b) for n, b in model.named_buffers()} if fresh_buffers else {}
        )

    def _cast(self, t: Tensor) -> Tensor:
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

    def _cast_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cast = lambda x: self._cast(x) if isinstance(x, Tensor) else x  # noqa: E731
        return torch.utils._pytree.tree_map(cast, args), torch.utils._pytree.tree_map(cast, kwargs)

    def __len__(self) -> int:
        return len(self.closures)

    def __call__(self, index: int, values: Sequence[Tensor]) -> Tensor:
        """Loss of closure ``index`` with the selected parameters set to ``values``."""
        loss = self.evaluate(index, values)
        if not isinstance(loss, Tensor):
            raise LossError(f"the loss closure returned {type(loss).__name__}, not a tensor")
        if loss.dim() != 0:
            raise LossError(
                f"the loss closure returned a tensor of shape {tuple(loss.shape)}; the Hessian needs a "
                "scalar. Reduce it, e.g. loss=lambda: criterion(model(x), y).mean()"
            )
        return loss

    def evaluate(self, index: int, values: Sequence[Tensor]) -> Any:
        """Whatever closure ``index`` returns (unchecked), with the selected parameters set to ``values``."""
        mapping = dict(self._fixed)
        mapping.update({n: b.clone() for n, b in self._buffers.items()})
        mapping.update({"model." + n: v for n, v in zip(self.names, values)})
        handle = None
        if self.dtype is not None:
            handle = self.model.register_forward_pre_hook(self._cast_inputs, with_kwargs=True)
        try:
            loss = functional_call(self._wrappers[index], mapping, ())
        finally:
            if handle is not None:
                handle.remove()
        return loss

    def of(self, index: int, position: int) -> Callable[[Tensor], Tensor]:
        """Loss of closure ``index`` as a function of selected parameter ``position`` alone."""
        rest = list(self.primals)

        def f(p: Tensor) -> Tensor:
            values = list(rest)
            values[position] = p
            return self(index, values)

        return f

    def of_all(self, index: int) -> Callable[..., Tensor]:
        """Loss of closure ``index`` as a function of all selected parameters (positional)."""
        return lambda *values: self(index, values)

    def validate(self) -> LossCheck:
        """Evaluate the first closure with a gradient; check the loss and measure memory.

        Raises:
            LossError: not a finite scalar, or independent of a selected parameter.
        """
        leaves = [p.detach().requires_grad_(True) for p in self.primals]
        sizes: dict[int, int] = {}

        def pack(t: Tensor) -> Tensor:
            try:
                key = t.untyped_storage().data_ptr()
                sizes[key] = max(sizes.get(key, 0), t.untyped_storage().nbytes())
            except (RuntimeError, NotImplementedError):
                pass
            return t

        device = self.primals[0].device
        if device.type == "cuda":  # the allocator's peak also counts what the hook cannot see
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self(0, leaves)
        if not loss.requires_grad:
            raise LossError(
                "the loss does not depend on any selected parameter (it has no grad_fn). Is the "
                "closure computing the loss from this model, outside torch.no_grad()?"
            )
        functions = autograd_functions(loss)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        seconds = time.perf_counter() - start
        if not torch.isfinite(loss):
            raise LossError(f"the loss is {loss.item()}: no curvature can be measured at a non-finite loss")
        unused = [n for n, g in zip(self.names, grads) if g is None]
        if unused:
            raise LossError(
                f"the loss does not depend on {', '.join(unused[:5])}; remove "
                f"{'it' if len(unused) == 1 else 'them'} from layers= (frozen or unused parameters)"
            )
        saved = sum(sizes.values())
        if device.type == "cuda":
            saved = max(saved, torch.cuda.max_memory_allocated(device) - before)
        return LossCheck(
            loss=float(loss.detach()),
            saved_bytes=saved,
            gradient_seconds=seconds,
            largest_saved_bytes=max(sizes.values(), default=0),
            autograd_functions=functions,
        )


def autograd_functions(loss: Tensor) -> tuple[str, ...]:
    """Names (``module.qualname``) of the ``torch.autograd.Function`` classes in ``loss``'s autograd graph.

    Example:
        >>> class Straight(torch.autograd.Function):  # a straight-through estimator, in a user's module
        ...     __module__ = "user_code"
        ...     forward = staticmethod(lambda ctx, x: x.round())
        ...     backward = staticmethod(lambda ctx, g: g)
        >>> x = torch.randn(3, requires_grad=True)
        >>> autograd_functions((Straight.apply(x) * x).sum())
        ('user_code.Straight',)
    """
    found, stack, seen = [], [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        cls = getattr(node, "_forward_cls", None)  # torch.autograd.function.BackwardCFunction
        if cls is not None:
            found.append(f"{cls.__module__}.{cls.__qualname__}")
        stack.extend(next_node for next_node, _ in node.next_functions)
    return tuple(sorted(set(found)))


# Wider batches bought nothing in measurements (32 vs 200 tangents, same time)
# while their allocations cost page faults; larger chunks remain available by hand.
MAX_AUTO_CHUNK = 32


def auto_chunk_size(
    check: LossCheck,
    num_tangents: int,
    per_tangent_bytes: int,
    device: torch.device,
    memory_budget: int | None,
) -> int:
    """How many tangents to push through one batched pass within ``memory_budget`` bytes.

    Args:
        check: what one gradient evaluation of the loss cost.
        num_tangents: tangents wanted in all (no chunk is larger).
        per_tangent_bytes: the engine's estimate of one batched tangent's memory.
        device: where the computation runs.
        memory_budget: bytes for the batched tangents (default: half of free memory).

    Raises:
        MemoryRiskError: even a single tangent would not fit.
    """
    available = available_memory_bytes(device)
    per_tangent = max(1, int(per_tangent_bytes))
    budget = memory_budget if memory_budget is not None else available // 2
    if per_tangent > available:
        raise MemoryRiskError(
            f"one tangent needs about {per_tangent / 2**30:.2f} GiB but only {available / 2**30:.2f} GiB "
            "is free. Split the batch into micro-batches (loss=[closure_1, closure_2, ...]) or pass "
            "a smaller batch."
        )
    return int(max(1, min(num_tangents, MAX_AUTO_CHUNK, budget // per_tangent)))


def describe_environment() -> dict[str, Any]:
    """Versions worth recording next to every measurement."""
    from . import __version__

    return {"torch": torch.__version__, "fasthess": __version__, "cuda": torch.version.cuda}
