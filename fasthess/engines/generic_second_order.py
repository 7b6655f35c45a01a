"""The tangent and second-order term of an op without a hand-written rule: checked, not trusted.

For a recorded op ``y = f(x)`` (the inputs that carry tangents), K directions ``ẋ`` and the
loss adjoint ``λ`` of its outputs, the tangent-adjoint engine needs ``ẏ = J ẋ`` and
``⟨λ, f''[ẋ, ẋ]⟩``. Torch has several ways to get them, and in 2.13 each is wrong or missing
for some op:

* **forward**: nested forward AD, ``jvp(f)`` and ``jvp(jvp(f))`` (what ``engine="fwd_fwd"``
  does to the whole loss). Silently wrong for ``linalg.solve`` (half the term), instance norm,
  ``scatter_reduce(reduce="prod")``; missing where a backward has no forward-AD rule (``glu``,
  ``huber_loss``, ``det``).
* **forward_over_reverse**: ``jvp`` of the vector-Jacobian product (what ``engine="fwd_rev"``
  does); wrong for ``scatter_reduce(reduce="prod")``.
* **reverse**: torch's backward formulas, the convention every autograd engine follows. The
  vector-Jacobian product ``v ↦ Jᵀv`` is linear in ``v``, so its own vjp is ``ẋ ↦ J ẋ``; the
  term is ``ẋᵀ ∇²⟨λ, f⟩ ẋ``, the vjp of the vjp (``engine="double_backward"``). Missing for
  ops without a double-backward formula (``hardsigmoid``, ``cdist``).

So the first time an op *signature* (op, shapes, dtypes, which inputs carry tangents, the
non-tensor arguments) is met, every path runs on the recorded inputs in float64 with two random
directions and a random ``λ`` (:func:`assess`). The reference is the reverse path where it runs
(torch's autograd convention, followed by the generic engines and the dense reference), else
central finite differences of ``f``; a path is trusted if it agrees with the reference. The
tangent-adjoint engine takes the forward path where it is trusted (the cheaper one on the small
ops that reach this rule), else the reverse one; if neither is trustworthy
:class:`~fasthess.errors.UnsupportedOpError` names the op (``diag(engine="auto")`` then falls
back to a generic engine, with the reason in ``meta``). The forward-mode engines ask the same
question of every op they differentiate (:mod:`.forward_mode_audit`).

Assessments are kept per signature and reported through :func:`record_generic_ops` into
``diag(...).meta["generic_ops"]``.

Example:
    >>> op = torch.ops.aten.linalg_solve.default
    >>> a, b = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    >>> found = assess(op, lambda a, b: (op(a, b),), [a, b])  # jvp∘jvp gives half the term
    >>> found.rule_path(), found.trusted("forward"), found.status["forward"][:9]
    ('reverse', False, 'disagrees')
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..capture import Node
from ..errors import UnsupportedOpError, first_line

Fn = Callable[..., tuple[Tensor, ...]]


def _k_sum(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(1)


def forward(f: Fn, xs: Sequence[Tensor], dense: Sequence[Tensor], lams: Sequence[Tensor | None]) -> tuple:
    """(tangents of f's outputs, ⟨λ, f''[ẋ, ẋ]⟩ or None) by nested forward AD, batched over K."""
    xs = tuple(xs)
    tangents = torch.vmap(lambda *ts: torch.func.jvp(f, xs, ts)[1])(*dense)
    if all(lam is None for lam in lams):
        return tangents, None
    second = torch.vmap(lambda *ts: torch.func.jvp(lambda *ys: torch.func.jvp(f, ys, ts)[1], xs, ts)[1])(*dense)
    return tangents, sum(_k_sum(lam * q) for lam, q in zip(lams, second) if lam is not None)


def _adjoints(outs: Sequence[Tensor], lams: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    return tuple(torch.zeros_like(o) if lam is None else lam for lam, o in zip(lams, outs))


def reverse(f: Fn, xs: Sequence[Tensor], dense: Sequence[Tensor], lams: Sequence[Tensor | None]) -> tuple:
    """(tangents, ẋᵀ ∇²⟨λ, f⟩ ẋ or None) from torch's backward formulas (vjp of the vjp), batched over K."""
    outs, vjp_f = torch.func.vjp(f, *xs)
    # v ↦ Jᵀv is linear, so its vjp ẋ ↦ J ẋ is the same at any v: taken at 1 (some backward formulas, such as
    # logcumsumexp's, take the log of the cotangent, and are NaN at 0)
    _, transposed = torch.func.vjp(vjp_f, tuple(torch.ones_like(o) for o in outs))
    tangents = torch.vmap(lambda *ts: transposed(ts)[0])(*dense)
    if all(lam is None for lam in lams):
        return tangents, None
    lam = _adjoints(outs, lams)
    _, hvp = torch.func.vjp(lambda *ys: torch.func.vjp(f, *ys)[1](lam), *xs)
    products = torch.vmap(lambda *ts: hvp(ts))(*dense)
    return tangents, sum(_k_sum(h * t) for h, t in zip(products, dense))


def forward_over_reverse(f: Fn, xs: Sequence[Tensor], dense: Sequence[Tensor], lams: Sequence[Tensor | None]) -> tuple:
    """(tangents by forward AD, ẋᵀ jvp(∇⟨λ, f⟩)[ẋ] or None): forward AD of the backward, as ``engine="fwd_rev"`` runs it."""
    xs = tuple(xs)
    tangents = torch.vmap(lambda *ts: torch.func.jvp(f, xs, ts)[1])(*dense)
    if all(lam is None for lam in lams):
        return tangents, None
    lam = _adjoints(f(*xs), lams)
    g = torch.func.grad(lambda *ys: sum((a * o).sum() for a, o in zip(lam, f(*ys))), argnums=tuple(range(len(xs))))
    products = torch.vmap(lambda *ts: torch.func.jvp(g, xs, ts)[1])(*dense)
    return tangents, sum(_k_sum(h * t) for h, t in zip(products, dense))


PATHS = {"forward": forward, "reverse": reverse, "forward_over_reverse": forward_over_reverse}


@dataclass
class Assessment:
    """How far each path of one op signature can be trusted.

    ``status[path]``: ``"reference"`` (the reverse path, where it runs), ``"agrees"`` or
    ``"disagrees (...)"`` with the reference, or ``"fails (...)"``; ``reference`` names it.
    """

    op: str
    status: dict[str, str]
    reference: str
    errors: dict[str, BaseException]

    def trusted(self, path: str) -> bool:
        return self.status[path] in ("reference", "agrees")

    def rule_path(self) -> str:
        """The path the tangent-adjoint engine takes for this op.

        Raises:
            UnsupportedOpError: neither nested forward AD nor double backward can be trusted.
        """
        if self.trusted("forward"):
            return "forward"
        if self.trusted("reverse"):
            return "reverse"
        if self.status["reverse"].startswith("inconsistent"):
            raise UnsupportedOpError(
                f"torch's backward of {self.op} is not the adjoint of its derivative ({self.status['reverse']}: "
                "⟨λ, J ẋ⟩ ≠ ⟨Jᵀλ, ẋ⟩, as for embedding(scale_grad_by_freq=True)), so its autograd 'Hessian' is not a "
                "second derivative of the loss. Only engine='double_backward' follows torch's convention here.",
                op=self.op, reason="torch's backward is not the adjoint of its derivative",
            )
        if self.status["forward"].startswith("disagrees"):
            raise UnsupportedOpError(
                f"the second derivative of {self.op} cannot be trusted: torch has no double backward for it "
                f"({self.status['reverse']}) and its nested forward AD {self.status['forward']} with finite "
                "differences. Write this part of the loss from ops with reliable derivatives.",
                op=self.op, reason=f"nested forward AD {self.status['forward']} with finite differences",
            ) from self.errors.get("reverse")
        raise UnsupportedOpError(
            f"torch has no second derivative of {self.op}: nested forward AD {self.status['forward']} and double "
            f"backward {self.status['reverse']}, which engine='double_backward' would need too. Write this part of "
            "the loss from twice-differentiable ops.",
            op=self.op, reason=f"double backward {self.status['reverse']}",
        ) from self.errors.get("reverse")

    def note(self, path: str) -> str:
        """Why ``path`` was taken, for ``meta["generic_ops"]``."""
        if path == "forward":
            return f"forward: nested forward AD agrees with {self.reference}"
        return f"reverse: nested forward AD {self.status['forward']}; used double backward"


# Ops that read a symmetric (Hermitian) matrix: their forward and reverse derivatives extend differently
# off the symmetric matrices (torch's backward returns a symmetric gradient), so they are compared along
# symmetric directions, the only ones a symmetric input receives.
aten = torch.ops.aten
SYMMETRIC_INPUT = {aten._linalg_eigh.default, aten.linalg_cholesky_ex.default, aten.cholesky.default}

_assessments: dict[Any, Assessment] = {}
_report: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("fasthess_generic_ops", default=None)


@contextlib.contextmanager
def record_generic_ops() -> Iterator[dict[str, str]]:
    """Collect ``{op: path and why}`` of every op checked inside (``meta["generic_ops"]``)."""
    seen: dict[str, str] = {}
    token = _report.set(seen)
    try:
        yield seen
    finally:
        _report.reset(token)


def report(op: Any, note: str) -> None:
    """Note in :func:`record_generic_ops`'s dict how ``op`` was differentiated."""
    seen = _report.get()
    if seen is not None:
        seen[str(op)] = note


def _signature_part(a: Any) -> Any:
    if isinstance(a, Tensor):
        return ("tensor", tuple(a.shape), a.dtype, a.device.type)
    try:
        hash(a)
    except TypeError:
        return repr(a)
    return a


def node_function(node: Node, flat: Sequence[Any], pos: Sequence[int]) -> Fn:
    """``node``'s op as a function of its arguments at ``pos`` (the rest from ``flat``), returning its float outputs."""
    keep = [j for j, i in enumerate(node.out_ids) if i is not None]

    def f(*ys: Tensor) -> tuple[Tensor, ...]:
        filled = list(flat)
        for p, y in zip(pos, ys):
            filled[p] = y
        args, kwargs = tree_unflatten(filled, node.spec)
        outs, _ = tree_flatten(node.func(*args, **kwargs))
        return tuple(outs[j] for j in keep)

    return f


def signature(node: Node, flat: Sequence[Any], pos: Sequence[int]) -> tuple:
    """What an assessment of ``node``'s op depends on: the op, argument shapes / dtypes / values, tangent positions."""
    return (node.func, tuple(_signature_part(a) for a in flat), tuple(pos))


def assess_node(node: Node, flat: Sequence[Any], pos: Sequence[int]) -> Assessment:
    """:func:`assess` of a recorded op with arguments ``flat`` and tangents at ``pos``, once per signature."""
    key = signature(node, flat, pos)
    found = _assessments.get(key)
    if found is None:
        if len(_assessments) > 4096:
            _assessments.clear()
        wide = _upcast(flat)
        found = _assessments[key] = assess(node.func, node_function(node, wide, pos), [wide[p].contiguous() for p in pos])
    return found


def _upcast(flat: Sequence[Any]) -> list[Any]:
    return [a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in flat]


def assess(func: Any, f: Fn, xs: Sequence[Tensor], directions: int = 2) -> Assessment:
    """Run every path on ``f`` at ``xs`` (float64) with random directions and adjoints; compare with the reference."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(t: Tensor, *lead: int) -> Tensor:
        return torch.randn((*lead, *t.shape), generator=g, dtype=torch.float64).to(t.device)

    dense = [randn(x, directions) for x in xs]
    if func in SYMMETRIC_INPUT:  # defined on symmetric matrices: forward and reverse agree along symmetric directions
        dense = [(t + t.transpose(-1, -2)) / 2 if t.dim() >= 3 and t.shape[-1] == t.shape[-2] else t for t in dense]
    lams = [randn(o) for o in f(*xs)]
    results, errors = {}, {}
    for name, path in PATHS.items():
        try:
            tangents, term = path(f, xs, dense, lams)
            results[name] = (tuple(tangents), term)
        except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, NotImplementedError, IndexError
            errors[name] = err
    status = {name: f"fails ({first_line(err)})" for name, err in errors.items()}
    inconsistent = _adjoint_gap(f, xs, dense, lams, results["reverse"][0]) if "reverse" in results else None
    if inconsistent:  # e.g. embedding(scale_grad_by_freq=True): no path reproduces torch's convention
        status = {name: "untrusted (torch's backward is not the adjoint of its derivative)" for name in PATHS}
        status["reverse"] = f"inconsistent ({inconsistent})"
        return Assessment(str(func), status, "none", errors)
    if "reverse" in results:
        reference, rtol, floors, want = "double backward", PATHS_RTOL, (1e-12, 1e-12), results["reverse"]
        status["reverse"] = "reference"
    else:
        reference, rtol = "finite differences", FD_RTOL
        *fd, floors = _finite_differences(f, xs, dense, lams)
        want = tuple(fd)
    for name, got in results.items():
        if name != "reverse":
            gap = _gap(got, want, rtol, floors)
            status[name] = "agrees" if gap is None else f"disagrees ({gap})"
    return Assessment(str(func), status, reference, errors)


def _adjoint_gap(f: Fn, xs: Sequence[Tensor], dense: Sequence[Tensor], lams: Sequence[Tensor], tangents: tuple) -> str | None:
    """Whether ⟨λ, J ẋ⟩ (the reverse path's tangents) equals ⟨Jᵀλ, ẋ⟩ (torch's vjp); None if so, else the gap."""
    grads = torch.func.vjp(f, *xs)[1](tuple(lams))
    left = sum(_k_sum(lam * t) for lam, t in zip(lams, tangents))
    right = sum(_k_sum(g * t) for g, t in zip(grads, dense))
    size = float(sum(_k_sum((lam * t).abs()) for lam, t in zip(lams, tangents)).max())
    err = float((left - right).abs().max())
    return None if err <= PATHS_RTOL * size + 1e-12 else f"⟨λ, J ẋ⟩ and ⟨Jᵀλ, ẋ⟩ differ by {err:.3g} of {size:.3g}"


def _finite_differences(f: Fn, xs: Sequence[Tensor], dense: Sequence[Tensor], lams: Sequence[Tensor]) -> tuple:
    """Central differences of ``f`` along each direction, in float64.

    Returns (tangents, ⟨λ, second difference⟩, round-off floors of the two): the floors are
    1000 ulps of the values differenced, divided as the differences are.
    """
    scale = max([1.0] + [float(x.abs().max()) for x in xs if x.numel()])
    h, ulps = 1e-4 * scale, 1e3 * torch.finfo(torch.float64).eps
    tangents, terms, floor_t, floor_q = [], [], 0.0, 0.0
    mid = f(*xs)
    for k in range(dense[0].shape[0]):
        norm = max(float(t[k].abs().max()) for t in dense) or 1.0
        step = [h / norm * t[k] for t in dense]
        plus = f(*[x + s for x, s in zip(xs, step)])
        minus = f(*[x - s for x, s in zip(xs, step)])
        tangents.append([(p - m) * (norm / (2 * h)) for p, m in zip(plus, minus)])
        terms.append(sum(((p - 2 * c + m) * lam).sum() for p, c, m, lam in zip(plus, mid, minus, lams)) * (norm / h) ** 2)
        size = sum(float(((p.abs() + 2 * c.abs() + m.abs()) * lam.abs()).sum()) for p, c, m, lam in zip(plus, mid, minus, lams))
        floor_q = max(floor_q, ulps * size * (norm / h) ** 2)
        floor_t = max([floor_t] + [ulps * float((p.abs() + m.abs()).max()) * norm / (2 * h) for p, m in zip(plus, minus)])
    return tuple(torch.stack(ts) for ts in zip(*tangents)), torch.stack(terms), (floor_t, floor_q)


# Agreement, relative to the larger magnitude: of the two analytic paths in float64 (they differ by
# round-off when both are right; the bugs they catch are O(1)), and of a path with central differences
# (step 1e-4 of the inputs' scale: truncation ~1e-8, round-off ~1e-8 of |f| / |term|).
PATHS_RTOL = 1e-6
FD_RTOL = 1e-3


def _gap(a: tuple, b: tuple, rtol: float = PATHS_RTOL, floors: tuple[float, float] = (1e-12, 1e-12)) -> str | None:
    """None if two (tangents, term) results agree; else which part differs and by how much."""
    parts = [("tangent", u, v, floors[0]) for u, v in zip(a[0], b[0])] + [("second-order term", a[1], b[1], floors[1])]
    for name, x, y, floor in parts:
        if x is None or y is None:
            continue
        size = max(float(x.abs().max()), float(y.abs().max())) if x.numel() else 0.0
        err = float((x - y).abs().max()) if x.numel() else 0.0
        if not math.isfinite(err) or err > rtol * size + floor:
            return f"{name}: max difference {err:.3g} of max magnitude {size:.3g}"
    return None
