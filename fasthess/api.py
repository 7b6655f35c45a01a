"""``fasthess.diag``: Hessian diagonals of a loss, per layer."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn

from .decompositions import autodiff_safe
from .distributed import ShardPlan, signature, unwrap_ddp
from .capture import CaptureError
from .engines import Engine, get_engine
from .engines.generic_second_order import record_generic_ops
from .engines.tangent_adjoint import TangentAdjointEngine
from .errors import (
    FasthessError,
    MemoryRiskError,
    NonFiniteCurvatureError,
    UnsupportedOpError,
    first_line,
    out_of_memory,
)
from .kernels.linear import onehot_family
from .kernels.registry import preferred_backend, record_kernels, use_backend
from .layers import LayerSpec, resolve_parameters
from .objective import (
    LossCheck,
    Objective,
    auto_chunk_size,
    available_memory_bytes,
    check_training_mode,
    describe_environment,
)
from .result import DiagResult, LayerDiag
from .sampling import sample_indices
from . import estimators

LossArg = Union[Callable[[], Tensor], Sequence[Callable[[], Tensor]]]
METHODS = ("sampled", "hutchinson", "exact", "ggn", "ggn_mc")
ESTIMATED = ("hutchinson", "ggn", "ggn_mc")  # the methods run by fasthess.estimators

__all__ = ["diag"]


def diag(
    model: nn.Module,
    loss: LossArg,
    layers: LayerSpec | Iterable[LayerSpec] | None = None,
    *,
    method: str = "sampled",
    num_samples: int = 200,
    num_probes: int = 100,
    seed: int = 0,
    engine: str = "auto",
    chunk_size: int | None = None,
    dtype: torch.dtype | None = None,
    probe: str = "rademacher",
    variance_reduction: str | None = None,
    target_rel_error: float | None = None,
    max_exact_entries: int = 100_000,
    memory_budget: int | None = None,
    allow_training_mode: bool = False,
    on_nonfinite: str = "raise",
    backend: str = "auto",
    progress: bool = False,
    process_group: Any = None,
    shard: str = "auto",
) -> DiagResult:
    """Hessian diagonal of ``loss`` with respect to the parameters of ``layers``.

    Args:
        model: the network; its parameters are read, never changed.
        loss: a zero-argument callable that runs ``model`` and returns a scalar
            tensor (like an optimizer closure), or a sequence of them
            (micro-batches) whose mean is the loss.
        layers: names, glob patterns, modules, parameters or module types
            (see :func:`fasthess.layers.resolve_parameters`). Default: every
            linear and attention-projection weight.
        method: ``"sampled"`` — exact ``H_ii`` at ``num_samples`` coordinates per
            parameter, drawn uniformly without replacement (the paper's
            statistic); ``"hutchinson"`` — unbiased estimate of the whole
            diagonal from ``num_probes`` Hessian-vector products, with per-entry
            standard errors; ``"exact"`` — every ``H_ii``. Not the Hessian:
            ``"ggn"`` — the exact generalised Gauss-Newton diagonal and
            ``"ggn_mc"`` — its Monte-Carlo estimate from ``num_probes`` samples
            (positive semi-definite for convex losses, the Fisher for
            cross-entropy; ``loss`` must be :class:`fasthess.OutputsAndLoss`).
        num_samples: coordinates per parameter tensor for ``"sampled"``.
        num_probes: Hessian-vector products for ``"hutchinson"`` (shared by all
            layers; the most, with ``target_rel_error``), samples for ``"ggn_mc"``.
        seed: fixes coordinates and probes (same seed, same numbers).
        engine: ``"auto"``, ``"tangent_adjoint"`` (the fast sampled/exact
            engine: first-order tangents downstream of each layer plus one
            shared backward pass; falls back to the generic engine for losses it
            cannot record and, under ``"auto"``, for an op whose second-order rule
            fails, noted in ``meta["engine_fallback"]``),
            ``"fwd_fwd"`` (nested forward mode, no backward pass), ``"fwd_rev"``
            (vmapped forward-over-reverse HVPs) or ``"double_backward"`` (the
            reference loop).
        chunk_size: tangents per batched pass; ``None`` sizes it to
            ``memory_budget``.
        dtype: compute in this dtype (e.g. ``torch.float64``); parameters,
            buffers and floating model inputs are cast, the model is unchanged.
        probe: ``"rademacher"`` or ``"gaussian"`` (Hutchinson).
        variance_reduction: for ``"hutchinson"``: ``None`` (plain), ``"diagpp"``
            (Diag++, low-rank deflation of the joint Hessian of the selected
            parameters), ``"xdiag"`` (XDiag) — both within the same
            ``num_probes`` products — or ``"ggn"`` (control variate: Hutchinson
            on ``H − G`` plus the exact GGN diagonal; each probe also costs a
            GGN-vector product; ``loss`` must be :class:`fasthess.OutputsAndLoss`).
            See :mod:`fasthess.estimators`.
        target_rel_error: for ``"hutchinson"`` / ``"ggn_mc"``: stop once every
            layer's estimated relative error ``‖stderr‖₂ / ‖estimate‖₂`` is at most
            this (``num_probes`` is then the cap; a warning if not reached).
        max_exact_entries: refuse ``method="exact"`` above this many entries in
            total (each costs about one forward pass); raise it to go bigger.
        memory_budget: bytes the batched tangents of one pass may use (default:
            for ``tangent_adjoint``, the activation memory of one gradient, so
            the whole computation stays within about two gradients' memory;
            for the other engines, half of free memory).
        allow_training_mode: measure even with dropout / batch norm in training
            mode (the loss is then random or uses batch statistics).
        on_nonfinite: ``"raise"`` on NaN/Inf entries, or ``"keep"`` them (recorded
            in ``meta["nonfinite"]``).
        backend: kernel backend (``"auto"``, ``"triton"``, ``"cuda"``, ``"cpp"``, ``"torch"``):
            of the Hutchinson accumulation and the attention HVP (``fwd_rev`` engine), and for
            sampled/exact entries of the one-hot weight tangents and the fused attention /
            layer-norm / cross-entropy 2-jets (tangent-adjoint engine). A family without the
            requested backend uses ``"auto"``; one whose backend cannot run here raises.
        progress: print one line per layer / probe chunk to stderr.
        process_group: a ``torch.distributed`` process group (or ``"world"``) to
            share the work between its ranks; every rank passes the same
            arguments and gets the single-process answer (see
            :mod:`fasthess.distributed`). ``None``: this process alone.
        shard: with a process group, what the ranks split: ``"closures"``
            (micro-batches), ``"directions"`` (coordinates / probes) or ``"auto"``.

    Returns:
        :class:`DiagResult` mapping parameter name to :class:`LayerDiag`, with
        ``meta`` (method, engine, backend, ``kernels``: the backend each kernel family ran on, seed,
        counts, seconds, versions).

    Raises:
        LayerNotFoundError, LossError, TrainingModeError, MemoryRiskError,
        NonFiniteCurvatureError, BackendUnavailableError, DistributedError,
        UnsupportedOpError (an op torch cannot differentiate twice, for the chosen
        engine or, under ``"auto"``, for every engine): each with the fix.

    Example:
        >>> import torch, fasthess
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> res = fasthess.diag(model, lambda: torch.nn.functional.cross_entropy(model(x), y), num_samples=10)
        >>> sorted(res.layers), res["0.weight"].values.shape
        (['0.weight', '2.weight'], torch.Size([10]))
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if on_nonfinite not in ("raise", "keep"):
        raise ValueError("on_nonfinite must be 'raise' or 'keep'")
    if method == "sampled" and num_samples < 1:
        raise ValueError("num_samples must be >= 1")
    if variance_reduction is not None and method != "hutchinson":
        raise ValueError(f"variance_reduction applies to method='hutchinson' only (got method={method!r})")
    if target_rel_error is not None and method not in ("hutchinson", "ggn_mc"):
        raise ValueError(f"target_rel_error applies to method='hutchinson' or 'ggn_mc' only (got method={method!r})")
    if method in ("hutchinson", "ggn_mc") and num_probes < 2:
        raise ValueError("num_probes must be >= 2 to give a standard error")
    closures = list(loss) if isinstance(loss, (list, tuple)) else [loss]
    if process_group is not None and method in ("ggn", "ggn_mc"):
        raise ValueError(f"method={method!r} does not share work between ranks yet; call it without process_group")
    plan = ShardPlan(process_group, shard, method, len(closures),
                     probes_shareable=variance_reduction is None and target_rel_error is None)
    model, bypass_ddp = unwrap_ddp(model)  # names of the module inside DDP; its hooks stay idle
    if not allow_training_mode:
        check_training_mode(model)
    params = resolve_parameters(model, layers)
    device = next(iter(params.values())).device
    # the GGN methods use torch.func jvp/vjp, not an engine; their chunks are sized as for Hutchinson
    eng = get_engine(engine if method not in ("ggn", "ggn_mc") else "auto", "hutchinson" if method in ESTIMATED else method, device.type)

    start = time.perf_counter()
    with autodiff_safe(allow_dropout=allow_training_mode), bypass_ddp:
        objective = Objective(model, closures, params, dtype=dtype, fresh_buffers=allow_training_mode)
        loss_check = objective.validate()
        if method == "exact":
            total = sum(p.numel() for p in objective.primals)
            if total > max_exact_entries:
                raise MemoryRiskError(
                    f"method='exact' needs {total} diagonal entries (each about one forward pass); the limit "
                    f"is max_exact_entries={max_exact_entries}. Select fewer layers, use method='sampled', "
                    "or raise max_exact_entries."
                )
        sizes = [p.numel() if method == "exact" else min(p.numel(), num_samples) for p in objective.primals]
        per_pass = num_probes if method in ESTIMATED else max(sizes)
        if memory_budget is None:
            memory_budget = eng.default_budget(loss_check, available_memory_bytes(device), device.type)
        log = _Progress(progress)
        chunk = _Chunk(
            chunk_size or auto_chunk_size(loss_check, per_pass, eng.per_tangent_bytes(loss_check), device, memory_budget),
            log,
        )
        fallback, extra = None, {}
        count = num_probes if method in ESTIMATED else num_samples if method == "sampled" else 0
        plan.check(signature(method, objective, count, seed, probe, plan.requested), chunk)
        # a failure is reported to the other ranks
        with plan.guard(chunk), record_kernels() as kernels, record_generic_ops() as generic_ops:
            if method in ESTIMATED:
                layer_results, extra = estimators.estimate(
                    objective, eng, chunk, method=method, num_probes=num_probes, probe=probe, seed=seed,
                    variance_reduction=variance_reduction, target_rel_error=target_rel_error, backend=backend,
                    log=log, plan=plan,
                )
                used_backend = extra.pop("backend")
            else:
                with use_backend(backend):  # the engines' kernels (one-hot weight tangents, fused nodes)
                    used_backend = onehot_family.select(
                        preferred_backend(onehot_family.name, onehot_family.backends), device.type
                    )[0]
                    layer_results, eng, fallback = _entries(
                        objective, eng, method, num_samples, seed, chunk, loss_check, log, plan, engine == "auto"
                    )
    seconds = time.perf_counter() - start

    nonfinite = {n: r.nonfinite() for n, r in layer_results.items() if r.nonfinite()}
    meta = {
        "method": method,
        "engine": eng.name,
        "engine_fallback": fallback,
        "backend": used_backend,
        "kernels": {family: "+".join(sorted(names)) for family, names in sorted(kernels.items())},  # those that ran
        "generic_ops": dict(sorted(generic_ops.items())),  # ops without a rule: the checked path each took
        "seed": seed,
        "num_samples": num_samples if method == "sampled" else None,
        "num_probes": num_probes if method in ("hutchinson", "ggn_mc") else None,
        "probe": probe if method == "hutchinson" else None,
        "num_closures": len(closures),
        "chunk_size": chunk.size,
        "dtype": str(objective.primals[0].dtype),
        "loss": loss_check.loss,
        "gradient_seconds": loss_check.gradient_seconds,
        "seconds": seconds,
        "nonfinite": nonfinite,
        **plan.meta(),
        **extra,
        **describe_environment(),
    }
    result = DiagResult(layer_results, meta)
    if nonfinite and on_nonfinite == "raise":
        listing = ", ".join(f"{n} ({c} entries)" for n, c in nonfinite.items())
        err = NonFiniteCurvatureError(
            f"NaN/Inf Hessian entries in {listing}. The loss may overflow at this point (try dtype=torch.float64) "
            "or the model has a non-differentiable op; pass on_nonfinite='keep' to inspect them "
            "(the computed result is also attached to this error as .result)."
        )
        err.result = result  # the work is not lost
        raise err
    return result


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, text: str) -> None:
        if self.enabled:
            print(f"[fasthess {time.perf_counter() - self.start:7.1f}s] {text}", file=sys.stderr, flush=True)


class _Chunk:
    """Directions per batched pass; halved, and the pass retried, when memory runs out."""

    def __init__(self, size: int, log: _Progress) -> None:
        self.size, self.log = max(1, size), log

    def run(self, fn: Callable[[int], Any]) -> Any:
        while True:
            try:
                return fn(self.size)
            except RuntimeError as err:  # torch.OutOfMemoryError is one
                if not out_of_memory(err):
                    raise
                if self.size == 1:
                    raise MemoryRiskError(
                        "out of memory with one direction per pass. Split the batch into micro-batches "
                        "(loss=[closure_1, closure_2, ...]) or select fewer layers."
                    ) from err
                self.size //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.log(f"out of memory: retrying with {self.size} directions per pass")


def _entries(
    objective: Objective,
    eng: Engine,
    method: str,
    num_samples: int,
    seed: int,
    chunk: _Chunk,
    check: LossCheck,
    log: _Progress,
    plan: ShardPlan,
    auto: bool,
) -> tuple[dict[str, LayerDiag], Engine, str | None]:
    """Entries of every selected parameter; returns them, the engine used and why it fell back (if it did).

    ``auto``: the engine was chosen by ``engine="auto"``, which also falls back when an op's rule fails.
    """
    indices = []
    for name, p in zip(objective.names, objective.primals):
        if method == "sampled":
            indices.append(sample_indices(p.numel(), num_samples, seed, name).to(p.device))
        else:
            indices.append(torch.arange(p.numel(), device=p.device))
    mine = plan.split(indices)  # this rank's coordinates: all of them unless directions are sharded
    totals = [torch.zeros(i.numel(), dtype=torch.float64, device=i.device) for i in mine]
    fallback = None

    def to_generic(reason: str) -> Engine:
        nonlocal fallback
        fallback = f"{reason}; used the generic engine"
        log(fallback)
        generic = get_engine("auto_generic", method, objective.primals[0].device.type)
        chunk.size = max(1, chunk.size * eng.per_tangent_bytes(check) // generic.per_tangent_bytes(check))
        return generic

    # a user's Function: autograd follows its backward (torch's and fasthess's are their forwards' derivatives)
    users = [name for name in check.autograd_functions if not name.startswith(("torch.", "fasthess."))]
    if isinstance(eng, TangentAdjointEngine) and users:
        eng = to_generic(
            f"{eng.name} differentiates the forward ops it records, and the loss calls torch.autograd.Function "
            f"{', '.join(users)}, whose backward autograd follows instead"
        )
    for c in plan.closures(len(objective)):
        if isinstance(eng, TangentAdjointEngine):
            try:
                blocks = chunk.run(
                    lambda k, c=c: eng.entries(lambda ps: objective(c, ps), objective.primals, mine, k)
                )
            except CaptureError as err:
                eng = to_generic(f"{eng.name} cannot record this loss ({err})")
            except UnsupportedOpError as err:
                if not auto:
                    raise  # the user chose this engine: its error names the op and the fix
                eng = to_generic(f"{eng.name} cannot take the second derivative of {err.op} ({err.reason})")
        if not isinstance(eng, TangentAdjointEngine):
            def layer(pos: int, p: torch.Tensor, idx: torch.Tensor, c: int = c) -> torch.Tensor:
                if not idx.numel():  # a rank's share can be empty
                    return idx.new_zeros(0, dtype=p.dtype)
                return chunk.run(lambda k: eng.diagonal_entries(objective.of(c, pos), p, idx, k))

            try:
                blocks = [layer(pos, p, idx) for pos, (p, idx) in enumerate(zip(objective.primals, mine))]
            except RuntimeError as err:  # the loss and its gradient ran (validate): a second-order failure
                if isinstance(err, FasthessError) or out_of_memory(err):
                    raise
                hint = (
                    "No engine can: torch has no double-backward rule for one of its ops (CTCLoss, MultiMarginLoss and "
                    "MultiLabelMarginLoss have none: see the README); write that part from twice-differentiable ops"
                    if eng.name == "double_backward"
                    else "Try engine='double_backward', which needs only torch's double-backward rules"
                )
                before = f"; before that, {fallback}" if fallback else ""
                functions = ", ".join(check.autograd_functions)
                if functions:  # a Function's backward (e.g. nn.CrossMapLRN2d's, with out= ops) may have none
                    before += f"; the loss calls torch.autograd.Function {functions}, whose backward may not be differentiable"
                raise UnsupportedOpError(
                    f"engine {eng.name!r} cannot take the second derivative of this loss "
                    f"(torch: {first_line(err)}){before}. {hint}.",
                    op=functions or None, reason=first_line(err),
                ) from err
        for total, block in zip(totals, blocks):
            total += block.detach().to(torch.float64)
        log(f"closure {c + 1}/{len(objective)}: {sum(i.numel() for i in mine)} entries")
    totals = plan.entries(totals, indices, chunk)  # sums over every rank's closures and coordinates
    out: dict[str, LayerDiag] = {}
    for name, p, idx, total in zip(objective.names, objective.primals, indices, totals):
        out[name] = LayerDiag(
            name=name,
            shape=tuple(p.shape),
            method=method,
            values=(total / len(objective)).cpu(),
            indices=idx.cpu() if method == "sampled" else None,
        )
    return out, eng, fallback
