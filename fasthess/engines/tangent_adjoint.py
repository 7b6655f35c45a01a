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

Attention (the cases the 2-jet kernels take), layer norm over the last dim and
cross-entropy are recorded as single nodes (:mod:`fasthess.fused_nodes`, which also
says when attention is left as plain ops) whose rules run the 2-jet kernels
(``diag(..., backend=)`` picks the backend): no ``(K, B, H, T, T)`` tangent is
materialised by the blocked kernels, and each node keeps one adjoint.
A sampled entry of a linear weight enters as a copy of one input column (no
matmul), the upstream part of the network is never revisited, and no backward
pass runs per entry: a generic forward-over-reverse HVP costs about three times
as much per direction. Models that cannot be recorded (in-place updates of
dependent tensors, random ops) fall back to the generic engine, and so, under
``diag(engine="auto")``, do losses with an op whose rule fails
(:class:`fasthess.errors.UnsupportedOpError`).

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

from .. import fused_nodes
from ..capture import Graph, Ref, capture
from ..errors import FasthessError, UnsupportedOpError, first_line, out_of_memory
from ..objective import LossCheck
from .base import Engine, ScalarFn
from .second_order_rules import LINEAR_OPS, PAIRED_OPS, RULES, OneHot, generic_rule, reads_primal_inputs


def _dependencies(graph: Graph) -> dict[int, frozenset[int]]:
    """For every recorded value, the positions of the parameters it depends on."""
    deps = {v: frozenset([pos]) for pos, v in enumerate(graph.placeholders)}
    for node in graph.nodes:
        d = frozenset().union(*(deps[r] for r in node.refs()))
        for i in node.out_ids:
            if i is not None:
                deps[i] = d
    return deps


def _needs_adjoint(node, deps: dict[int, frozenset[int]]) -> bool:  # noqa: ANN001
    if node.func in LINEAR_OPS:
        return False
    if node.func in PAIRED_OPS:  # curvature only where one direction reaches two inputs
        seen: set[int] = set()
        for r in node.refs():
            if seen & deps[r]:
                return True
            seen |= deps[r]
        return False
    return True


CPU_TANGENT_BYTES = 16 * 2**20  # one activation's tangents per pass, on a CPU


class TangentAdjointEngine(Engine):
    """Exact ``H_ii`` from first-order tangents and the adjoints of one backward pass."""

    name = "tangent_adjoint"
    supports_hvp = False

    def per_tangent_bytes(self, check: LossCheck) -> int:
        # A pass holds a few live activation-sized tangents plus a rule's temporaries:
        # measured about 2.3 activations live (BERT-small layer, batch 2, 8 directions).
        if check.largest_saved_bytes:
            return 5 * check.largest_saved_bytes
        return check.saved_bytes // 4

    def default_budget(self, check: LossCheck, available: int, device_type: str) -> int:
        # The values and adjoints kept between passes take about one gradient's
        # activations; tangents get as much again: about two gradients in all.
        budget = min(available // 2, max(check.saved_bytes, self.per_tangent_bytes(check)))
        if device_type == "cpu" and check.largest_saved_bytes:
            # Few directions per pass are fastest on a CPU: BERT-small layers, batch 8,
            # 0.25 / 0.27 / 0.29 / 0.43 s per entry at 1 / 4 / 8 / 16 directions
            # (larger batches of fresh allocations cost page faults, not compute).
            directions = max(1, CPU_TANGENT_BYTES // check.largest_saved_bytes)
            budget = min(budget, self.per_tangent_bytes(check) * directions)
        return budget

    def diagonal_entries(self, f: ScalarFn, p: Tensor, indices: Tensor, chunk_size: int) -> Tensor:
        return self.entries(lambda ps: f(ps[0]), [p], [indices], chunk_size)[0]

    def entries(
        self,
        f: Callable[[Sequence[Tensor]], Tensor],
        params: Sequence[Tensor],
        indices: Sequence[Tensor],
        chunk_size: int,
    ) -> list[Tensor]:
        """Exact diagonal entries for several parameters of one scalar function, sharing one backward pass.

        Args:
            f: scalar function of the list of parameter tensors.
            params: the point.
            indices: per parameter, ``(k_j,)`` flat indices.
            chunk_size: directions per batched tangent pass.

        Returns:
            per parameter, ``(k_j,)`` second derivatives.

        Raises:
            fasthess.capture.CaptureError: the loss cannot be recorded (callers fall back).
            fasthess.errors.UnsupportedOpError: an op's rule failed (torch has no usable
                higher-order derivative for it); ``diag(engine="auto")`` falls back.
        """
        graph = capture(f, params, fused=fused_nodes.enabled())
        values, adjoints = _primal_and_adjoints(graph, params)
        out = []
        # No autograd in the tangent passes: constants such as unselected parameters
        # require grad, and a recorded graph would keep every tangent alive.
        with torch.no_grad():
            for pos, idx in enumerate(indices):
                result = torch.zeros(idx.numel(), dtype=params[pos].dtype, device=params[pos].device)
                order = graph.downstream(graph.placeholders[pos])
                last_use = {r: step for step, node_pos in enumerate(order) for r in graph.nodes[node_pos].refs()}
                for start in range(0, idx.numel(), max(1, chunk_size)):
                    chunk = idx[start : start + chunk_size]
                    result[start : start + chunk.numel()] = _directional(
                        graph, order, last_use, values, adjoints, pos, params[pos], chunk
                    )
                out.append(result)
        return out


def _primal_and_adjoints(graph: Graph, params: Sequence[Tensor]) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """The recorded values the rules read, and the loss adjoints of the outputs of curved ops.

    Only what the tangent passes use is kept, so the memory held between passes is
    close to what autograd saves for one gradient.
    """
    deps = _dependencies(graph)
    leaves = [p.detach().requires_grad_(True) for p in params]
    with torch.enable_grad():
        values = graph.replay(leaves)
        wanted = [i for node in graph.nodes if _needs_adjoint(node, deps) for i in node.out_ids if i is not None]
        wanted = [i for i in dict.fromkeys(wanted) if values[i].requires_grad]
        grads = torch.autograd.grad(values[graph.output], [values[i] for i in wanted], allow_unused=True)
    adjoints = {i: g for i, g in zip(wanted, grads) if g is not None}
    read = {r for node in graph.nodes if reads_primal_inputs(node) for r in node.refs()}
    return {i: v.detach() for i, v in values.items() if i in read}, adjoints


def _directional(
    graph: Graph,
    order: list[int],
    last_use: dict[int, int],
    values: dict[int, Tensor],
    adjoints: dict[int, Tensor],
    pos: int,
    param: Tensor,
    chunk: Tensor,
) -> Tensor:
    """``e_iᵀ H e_i`` for the flat indices ``chunk`` of parameter ``pos``.

    ``order``: the nodes downstream of the parameter; ``last_use``: value id -> the
    last step of ``order`` that reads it (its tangent is dropped after that step).
    """
    tangents: dict[int, object] = {graph.placeholders[pos]: OneHot(param.shape, chunk, param.dtype)}
    total = torch.zeros(chunk.numel(), dtype=param.dtype, device=param.device)
    for step, node_pos in enumerate(order):
        node = graph.nodes[node_pos]
        tans = [tangents.get(a.id) if isinstance(a, Ref) else None for a in node.flat_args]
        if all(t is None for t in tans):
            continue
        primal = [values.get(a.id) if isinstance(a, Ref) else a for a in node.flat_args]
        lams = [adjoints.get(i) if i is not None else None for i in node.out_ids]
        rule = RULES.get(node.func, generic_rule)
        try:
            outs, contribution = rule(node, primal, tans, lams)
        except RuntimeError as err:  # NotImplementedError is one
            if isinstance(err, FasthessError) or out_of_memory(err):
                raise
            raise UnsupportedOpError(
                f"the tangent-adjoint engine cannot take the second derivative of {node.func} "
                f"(torch: {first_line(err)}). Try engine='double_backward' (plain autograd), or "
                "engine='auto', which falls back to it.",
                op=str(node.func), reason=first_line(err),
            ) from err
        if contribution is not None:
            total += contribution
        for i, t in zip(node.out_ids, outs):
            if i is not None and t is not None:
                tangents[i] = t
        for r in node.refs():
            if last_use.get(r) == step:
                tangents.pop(r, None)
    return total
