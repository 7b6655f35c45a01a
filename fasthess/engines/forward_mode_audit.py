"""Whether torch's forward-mode derivatives can be trusted on every op of a loss.

``engine="fwd_fwd"`` differentiates the whole loss by nested forward AD and ``engine="fwd_rev"``
by forward AD of the backward formulas, and torch 2.13 gets each silently wrong for some ops
(:mod:`.generic_second_order`: ``linalg.solve``, ``slogdet``, instance norm,
``scatter_reduce(reduce="prod")``, ``embedding(padding_idx=...)``). Before such an engine
differentiates a loss, the loss runs once under :func:`fasthess.capture.trace` and each op is
assessed on its inputs as it runs, once per op signature, against torch's double backward; the
first op whose path is not trusted is named.

Example:
    >>> import torch
    >>> a, b = torch.eye(3, dtype=torch.float64) * 2, torch.ones(3, dtype=torch.float64)
    >>> untrusted_op(lambda ps: torch.linalg.solve(ps[0], b).square().sum(), [a], "forward")[:33]
    'aten._linalg_solve_ex.default: ne'
    >>> untrusted_op(lambda ps: torch.tanh(ps[0]).square().sum(), [a], "forward") is None
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from ..capture import Node, trace
from .generic_second_order import assess_node, signature

PATH_NAMES = {"forward": "nested forward AD", "forward_over_reverse": "forward AD of the backward"}


def untrusted_op(f: Callable[[Sequence[Tensor]], Tensor], params: Sequence[Tensor], path: str) -> str | None:
    """The first op of ``f(params)`` whose ``path`` (``"forward"`` or ``"forward_over_reverse"``) is not trusted.

    Returns ``None`` if every op's is; else ``"op: why"``. The ops are seen as they run
    (:func:`fasthess.capture.trace`), so losses with in-place updates are checked too.

    Raises:
        fasthess.capture.CaptureError: a complex intermediate, which the assessment cannot take.
    """
    seen: set[tuple] = set()
    pending: list[tuple[Node, list[int]]] = []  # new signatures, assessed once the loss has run

    def visit(node: Node, positions: list[int]) -> None:
        key = signature(node, node.flat_args, positions)
        if key not in seen:
            seen.add(key)
            # values as they are now (later in-place updates must not change them)
            copies = [a.clone() if isinstance(a, Tensor) else a for a in node.flat_args]
            pending.append((Node(node.func, copies, node.spec, node.out_ids, node.out_shapes), positions))

    trace(f, params, visit)
    for node, positions in pending:
        assessment = assess_node(node, node.flat_args, positions)
        if not assessment.trusted(path):
            return f"{node.func}: {PATH_NAMES[path]} {assessment.status[path]}"
    return None
