"""Stochastic and Gauss-Newton diagonal estimators behind :func:`fasthess.diag`.

One file per method, each with its reference:

* :mod:`.hutchinson` — Hutchinson's estimator, standard errors, adaptive stopping;
* :mod:`.baston2022diagpp` — Diag++ (low-rank deflation, then Hutchinson);
* :mod:`.epperly2024xdiag` — XDiag (exchangeable deflation);
* :mod:`.control_variate` — Hutchinson on ``H − G`` plus the exact GGN diagonal;
* :mod:`.ggn` — the generalised Gauss-Newton diagonal (exact, Monte-Carlo): not the Hessian.

:func:`estimate` is what ``fasthess.diag`` calls for ``method="hutchinson"``,
``"ggn"`` and ``"ggn_mc"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..distributed import ShardPlan
from ..engines import Engine
from ..objective import Objective
from ..result import LayerDiag
from .baston2022diagpp import diagpp
from .control_variate import control_variate
from .epperly2024xdiag import xdiag
from .ggn import GGN, OutputsAndLoss
from .hutchinson import Estimate, hutchinson, shared_probes
from .operator import FlatOperator

VARIANCE_REDUCTIONS = (None, "diagpp", "xdiag", "ggn")
GGN_METHODS = ("ggn", "ggn_mc")

__all__ = [
    "Estimate",
    "FlatOperator",
    "GGN",
    "OutputsAndLoss",
    "control_variate",
    "diagpp",
    "estimate",
    "hessian_operator",
    "hutchinson",
    "xdiag",
]


def hessian_operator(objective: Objective, eng: Engine, chunk: Any, plan: ShardPlan | None = None) -> FlatOperator:
    """The joint Hessian of the selected parameters (mean over closures) as a :class:`FlatOperator`.

    ``chunk`` is the caller's chunk controller (``.run(fn)`` retries ``fn(size)``
    with smaller sizes on out-of-memory errors). With a ``plan`` that shares the
    closures between ranks, each rank evaluates its closures and the products are
    summed over the ranks, so every rank sees the whole operator.
    """
    primals = objective.primals
    plan = plan or ShardPlan(None, "auto", "hutchinson", len(objective))

    def apply(blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        total = [torch.zeros_like(b) for b in blocks]
        for c in plan.closures(len(objective)):
            out = chunk.run(lambda size, c=c: eng.hvp(objective.of_all(c), primals, blocks, size))
            for t, o in zip(total, out):
                t += o.detach()
        plan.sum_over_closures_(total, chunk)
        return [t / len(objective) for t in total]

    return FlatOperator([tuple(p.shape) for p in primals], apply, primals[0].dtype, primals[0].device)


def estimate(
    objective: Objective,
    eng: Engine,
    chunk: Any,
    *,
    method: str,
    num_probes: int,
    probe: str,
    seed: int,
    variance_reduction: str | None,
    target_rel_error: float | None,
    backend: str,
    log: Callable[[str], None],
    plan: ShardPlan | None = None,
) -> tuple[dict[str, LayerDiag], dict[str, Any]]:
    """Run the estimator ``fasthess.diag`` asked for; returns per-layer results and metadata.

    The metadata counts what was paid: ``hvps`` (Hessian-vector products, per
    direction), ``ggn_products`` (GGN-vector products: a JVP and a VJP each, per
    direction) and ``vjps`` (vector-Jacobian products of the exact or Monte-Carlo
    GGN diagonal, per closure).
    """
    if variance_reduction not in VARIANCE_REDUCTIONS:
        raise ValueError(f"unknown variance_reduction {variance_reduction!r}; choose one of {VARIANCE_REDUCTIONS}")
    if variance_reduction == "xdiag" and target_rel_error is not None:
        raise ValueError(
            "variance_reduction='xdiag' spends its whole budget at once and cannot stop adaptively; "
            "use 'diagpp' or None with target_rel_error="
        )
    if variance_reduction == "xdiag" and probe != "rademacher":
        raise ValueError("variance_reduction='xdiag' uses Rademacher test vectors (its formula needs w_i² = 1); "
                         "drop probe= or use 'diagpp'")
    batch = max(1, chunk.size)
    common = dict(seed=seed, batch=batch, log=log)
    H = hessian_operator(objective, eng, chunk, plan) if method == "hutchinson" else None
    ggn = GGN(objective, chunk_size=batch) if method in GGN_METHODS or variance_reduction == "ggn" else None
    if method == "ggn":
        values = ggn.diagonal()
        est = Estimate(values, None, 0, {})
    elif method == "ggn_mc":
        est = ggn.monte_carlo(num_probes, seed, target_rel_error=target_rel_error, batch=batch, backend=backend, log=log)
    elif variance_reduction == "diagpp":
        est = diagpp(H, num_probes, distribution=probe, target_rel_error=target_rel_error, backend=backend, **common)
    elif variance_reduction == "xdiag":
        est = xdiag(H, num_probes, **common)
    elif variance_reduction == "ggn":
        g = ggn.operator()
        est = control_variate(
            H, g, ggn.diagonal(), num_probes, distribution=probe, target_rel_error=target_rel_error, backend=backend,
            **common,
        )
    elif plan is not None and plan.mode == "directions":
        est = shared_probes(H, plan, chunk, num_probes, distribution=probe, backend=backend, **common)
    else:
        est = hutchinson(H, num_probes, distribution=probe, target_rel_error=target_rel_error, backend=backend, **common)

    layers = {}
    op = H if H is not None else ggn.operator()
    for name, p, sl in zip(objective.names, objective.primals, op.segments()):
        layers[name] = LayerDiag(
            name=name,
            shape=tuple(p.shape),
            method=method,
            values=est.values[sl].detach().cpu(),
            stderr=None if est.stderr is None else est.stderr[sl].detach().cpu(),
        )
    meta: dict[str, Any] = {
        "variance_reduction": variance_reduction,
        "target_rel_error": target_rel_error,
        "probes_used": est.probes,
        "hvps": H.products if H is not None else 0,
        "ggn_products": ggn.products if ggn is not None else 0,
        "vjps": ggn.vjps if ggn is not None else 0,
        "quantity": (
            "generalised Gauss-Newton diagonal (NOT the Hessian)" if method in GGN_METHODS else "Hessian diagonal"
        ),
        **{k: v for k, v in est.info.items() if k != "backend"},
    }
    if method in GGN_METHODS:
        meta["engine"] = "torch.func (jvp/vjp)"
    if not est.info.get("converged", True):
        warnings.warn(
            f"target_rel_error={target_rel_error} not reached with num_probes={num_probes} "
            f"(relative errors per layer: {[round(r, 4) for r in est.info['relative_errors']]}); "
            "raise num_probes or relax the target",
            stacklevel=3,
        )
    return layers, {"backend": est.info.get("backend", "torch"), **meta}
