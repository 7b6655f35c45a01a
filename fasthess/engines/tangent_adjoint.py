"""The fast sampled-diagonal engine: one tangent stream per entry, one shared backward pass.

For a direction ``v`` the second directional derivative of the loss is, exactly,

    vᵀ H v = Σ_k ⟨λ_k, f_k''[ż, ż]⟩

over the ops ``f_k`` of the computation, where ``ż`` are first-order tangents and
``λ_k = ∂L/∂y_k`` are the adjoints of the op outputs (the 2-jet's second-order
stream is linear in the first-order one, so it is transposed onto the adjoints;
the loss's own curvature is the term of its last ops, whose adjoint is 1).

So the engine

1. records the ATen ops between the selected parameters and the loss once
   (:mod:`fasthess.capture`),
2. replays them with autograd for the primal values and, in one backward pass,
   the adjoints of every op with a second-order term,
3. for each layer pushes K one-hot directions at a time through the ops
   *downstream* of that layer only, with a first-order tangent per direction,
   adding each op's local second-order term (:mod:`.second_order_rules`).

A sampled entry of a linear weight enters as a copy of one input column (no
matmul), the upstream part of the network is never revisited, and no backward
pass runs per entry: a generic forward-over-reverse HVP costs about three times
as much per direction. Models that cannot be recorded (in-place updates of
dependent tensors, random ops) fall back to the generic engine.

Example:
    >>> import torch
    >>> from fasthess.engines.tangent_adjoint import TangentAdjointEngine
    >>> w = torch.tensor([[1.0, 2.0]])
    >>> f = lambda ps: (torch.tanh(torch.ones(1, 2) @ ps[0].t()) ** 2).sum()
    >>> TangentAdjointEngine().entries(f, [w], [torch.tensor([0, 1])], chunk_size=2)[0].shape
    torch.Size([2])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..capture import Graph, Ref, capture
from .base import Engine, ScalarFn
from .second_order_rules import LINEAR_OPS, RULES, OneHot, generic_rule

_PAIRED = {torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor, torch.ops.aten.mm.default,
           torch.ops.aten.bmm.default, torch.ops.aten.addmm.default}


def _needs_adjoint(node) -> bool:  # noqa: ANN001
    if node.func in LINEAR_OPS:
        return False
    if node.func in _PAIRED:  # bilinear: curvature only where two inputs carry tangents
        return len(node.refs()) >= 2 or node.func is torch.ops.aten.div.Tensor
    return True


class TangentAdjointEngine(Engine):
    """Exact ``H_ii`` from first-order tangents and the adjoints of one backward pass."""

    name = "tangent_adjoint"
    supports_hvp = False
    bytes_per_tangent = 0.5  # only the live tangents of the downstream ops, not a saved graph

    def diagonal_entries(self, f: ScalarFn, p: Tensor, indices: Tensor, chunk_size: int) -> Tensor:
        return self.entries(lambda ps: f(ps[0]), [p], [indices], chunk_size)[0]

    def entries(
        self,
        f: Callable[[Sequence[Tensor]], Tensor],
        params: Sequence[Tensor],
        indices: Sequence[Tensor],
        chunk_size: int,
        log: Callable[[str], None] | None = None,
    ) -> list[Tensor]:
        """Exact diagonal entries for several parameters of one scalar function, sharing one backward pass.

        Args:
            f: scalar function of the list of parameter tensors.
            params: the point.
            indices: per parameter, ``(k_j,)`` flat indices.
            chunk_size: directions per batched tangent pass.
            log: called with a line per finished parameter.

        Returns:
            per parameter, ``(k_j,)`` second derivatives.

        Raises:
            fasthess.capture.CaptureError: the loss cannot be recorded (callers fall back).
        """
        graph = capture(f, params)
        values, adjoints = _primal_and_adjoints(graph, params)
        out = []
        # No autograd in the tangent passes: constants such as unselected parameters
        # require grad, and a recorded graph would keep every tangent alive.
        with torch.no_grad():
            for pos, idx in enumerate(indices):
                result = torch.zeros(idx.numel(), dtype=params[pos].dtype, device=params[pos].device)
                order = graph.downstream(graph.placeholders[pos])
                for start in range(0, idx.numel(), max(1, chunk_size)):
                    chunk = idx[start : start + chunk_size]
                    result[start : start + chunk.numel()] = _directional(
                        graph, order, values, adjoints, pos, params[pos], chunk
                    )
                out.append(result)
                if log is not None:
                    log(f"parameter {pos}: {idx.numel()} entries")
        return out


def _primal_and_adjoints(graph: Graph, params: Sequence[Tensor]) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """All recorded values and the loss adjoints of the outputs of curved ops."""
    leaves = [p.detach().requires_grad_(True) for p in params]
    with torch.enable_grad():
        values = graph.replay(leaves)
        wanted = [i for node in graph.nodes if _needs_adjoint(node) for i in node.out_ids if i is not None]
        wanted = [i for i in dict.fromkeys(wanted) if values[i].requires_grad]
        grads = torch.autograd.grad(values[graph.output], [values[i] for i in wanted], allow_unused=True)
    adjoints = {i: g for i, g in zip(wanted, grads) if g is not None}
    return {i: v.detach() for i, v in values.items()}, adjoints


def _directional(
    graph: Graph,
    order: list[int],
    values: dict[int, Tensor],
    adjoints: dict[int, Tensor],
    pos: int,
    param: Tensor,
    chunk: Tensor,
) -> Tensor:
    """``e_iᵀ H e_i`` for the flat indices ``chunk`` of parameter ``pos``."""
    tangents: dict[int, object] = {graph.placeholders[pos]: OneHot(param.shape, chunk)}
    last_use = {}
    for step, node_pos in enumerate(order):
        for r in graph.nodes[node_pos].refs():
            last_use[r] = step
    total = torch.zeros(chunk.numel(), dtype=param.dtype, device=param.device)
    for step, node_pos in enumerate(order):
        node = graph.nodes[node_pos]
        tans = [tangents.get(a.id) if isinstance(a, Ref) else None for a in node.flat_args]
        if all(t is None for t in tans):
            continue
        primal = [values[a.id] if isinstance(a, Ref) else a for a in node.flat_args]
        lams = [adjoints.get(i) if i is not None else None for i in node.out_ids]
        rule = RULES.get(node.func, generic_rule)
        outs, contribution = rule(node, primal, tans, lams)
        if contribution is not None:
            total += contribution
        for i, t in zip(node.out_ids, outs):
            if i is not None and t is not None:
                tangents[i] = t
        for r in node.refs():
            if last_use.get(r) == step:
                tangents.pop(r, None)
    return total
