"""Whether torch's forward-mode derivatives can be trusted on every op of a loss.

``engine="fwd_fwd"`` differentiates the whole loss by nested forward AD and ``engine="fwd_rev"``
by forward AD of the backward formulas, and torch 2.13 gets each silently wrong for some ops
(:mod:`.generic_second_order`: ``linalg.solve``, ``slogdet``, instance norm,
``scatter_reduce(reduce="prod")``, ``embedding(padding_idx=...)``). Before such an engine
differentiates a loss, the loss is recorded (:func:`fasthess.capture.capture`) and each op is
assessed on its recorded inputs, once per op signature, against torch's double backward; the
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

import torch
from torch import Tensor

from ..capture import Ref, capture
from .generic_second_order import assess_node

PATH_NAMES = {"forward": "nested forward AD", "forward_over_reverse": "forward AD of the backward"}


def untrusted_op(f: Callable[[Sequence[Tensor]], Tensor], params: Sequence[Tensor], path: str) -> str | None:
    """The first op of ``f(params)`` whose ``path`` (``"forward"`` or ``"forward_over_reverse"``) is not trusted.

    Returns ``None`` if every op's is; else ``"op: why"``.

    Raises:
        fasthess.capture.CaptureError: the loss cannot be recorded, so its ops cannot be checked.
    """
    graph = capture(f, params)
    with torch.no_grad():
        values = graph.replay([p.detach() for p in params])
    for node in graph.nodes:
        pos = [i for i, a in enumerate(node.flat_args) if isinstance(a, Ref)]
        flat = [values[a.id] if isinstance(a, Ref) else a for a in node.flat_args]
        assessment = assess_node(node, flat, pos)
        if not assessment.trusted(path):
            return f"{node.func}: {PATH_NAMES[path]} {assessment.status[path]}"
    return None
