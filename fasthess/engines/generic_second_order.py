"""The tangent and second-order term of an op without a hand-written rule: checked, not trusted.

For a recorded op ``y = f(x)`` (the inputs that carry tangents), K directions ``ẋ`` and the
loss adjoint ``λ`` of its outputs, the tangent-adjoint engine needs ``ẏ = J ẋ`` and
``⟨λ, f''[ẋ, ẋ]⟩``. Torch has two ways to get them, and in 2.13 each is wrong or missing for
some op:

* **forward**: nested forward AD, ``jvp(f)`` and ``jvp(jvp(f))``. Silently wrong for
  ``linalg.solve`` (half the term), instance norm, ``scatter_reduce(reduce="prod")``; missing
  for ops whose backward has no forward-AD rule (``glu``, ``huber_loss``, ``det``).
* **reverse**: torch's backward formulas, the convention every autograd engine follows. The
  vector-Jacobian product ``v ↦ Jᵀv`` is linear in ``v``, so its own vjp is ``ẋ ↦ J ẋ``; the
  term is ``ẋᵀ ∇²⟨λ, f⟩ ẋ``, the vjp of the vjp (double backward). Missing for ops without a
  double-backward formula (``hardsigmoid``, ``cdist``).

So the first time an op *signature* (op, shapes, dtypes, which inputs carry tangents, the
non-tensor arguments) is met, both paths run on the recorded inputs in float64 with two random
directions and a random ``λ``, and

* both run and agree: **forward** (the cheaper one on the small ops that reach this rule);
* both run and disagree: **reverse**, torch's autograd convention, which the generic engines
  and the dense reference follow too;
* only one runs: it is checked against central finite differences of ``f`` in float64 and used
  if it agrees;
* otherwise :class:`~fasthess.errors.UnsupportedOpError` names the op (``diag(engine="auto")``
  then falls back to a generic engine, with the reason in ``meta``).

The verdicts are kept per signature and reported through :func:`record_generic_ops` into
``diag(...).meta["generic_ops"]``.

Example:
    >>> import torch
    >>> op = torch.ops.aten.linalg_solve.default
    >>> a, b = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    >>> v = choose_path(op, lambda a, b: (op(a, b),), [a, b])  # jvp∘jvp gives half the term
    >>> v.path, v.note.startswith("nested forward AD disagrees")
    ('reverse', True)
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

from ..errors import UnsupportedOpError, first_line

Fn = Callable[..., tuple[Tensor, ...]]


@dataclass(frozen=True)
class Verdict:
    path: str  # "forward" or "reverse"
    note: str  # why, for meta["generic_ops"]


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


def reverse(f: Fn, xs: Sequence[Tensor], dense: Sequence[Tensor], lams: Sequence[Tensor | None]) -> tuple:
    """(tangents, ẋᵀ ∇²⟨λ, f⟩ ẋ or None) from torch's backward formulas (vjp of the vjp), batched over K."""
    outs, vjp_f = torch.func.vjp(f, *xs)
    _, transposed = torch.func.vjp(vjp_f, tuple(torch.zeros_like(o) for o in outs))  # ẋ ↦ J ẋ
    tangents = torch.vmap(lambda *ts: transposed(ts)[0])(*dense)
    if all(lam is None for lam in lams):
        return tangents, None
    lam = tuple(torch.zeros_like(o) if lam is None else lam for lam, o in zip(lams, outs))
    _, hvp = torch.func.vjp(lambda *ys: torch.func.vjp(f, *ys)[1](lam), *xs)
    products = torch.vmap(lambda *ts: hvp(ts))(*dense)
    return tangents, sum(_k_sum(h * t) for h, t in zip(products, dense))


PATHS = {"forward": forward, "reverse": reverse}

_verdicts: dict[Any, Verdict] = {}
_report: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("fasthess_generic_ops", default=None)


@contextlib.contextmanager
def record_generic_ops() -> Iterator[dict[str, str]]:
    """Collect ``{op: verdict}`` of every op that took the generic rule inside (``meta["generic_ops"]``)."""
    seen: dict[str, str] = {}
    token = _report.set(seen)
    try:
        yield seen
    finally:
        _report.reset(token)


def _signature_part(a: Any) -> Any:
    if isinstance(a, Tensor):
        return ("tensor", tuple(a.shape), a.dtype, a.device.type)
    try:
        hash(a)
    except TypeError:
        return repr(a)
    return a


def verdict(func: Any, flat: Sequence[Any], pos: Sequence[int], make_f: Callable[[Sequence[Any]], Fn]) -> Verdict:
    """The path for ``func`` with arguments ``flat`` (tangents at ``pos``), decided once per signature.

    ``make_f(flat)`` returns the op as a function of the arguments at ``pos`` (a tuple of outputs).
    """
    key = (func, tuple(_signature_part(a) for a in flat), tuple(pos))
    found = _verdicts.get(key)
    if found is None:
        if len(_verdicts) > 4096:
            _verdicts.clear()
        found = _verdicts[key] = choose_path(func, make_f(_upcast(flat)), [_upcast([flat[p]])[0] for p in pos])
    seen = _report.get()
    if seen is not None:
        seen[str(func)] = f"{found.path}: {found.note}"
    return found


def _upcast(flat: Sequence[Any]) -> list[Any]:
    return [a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in flat]


def choose_path(func: Any, f: Fn, xs: Sequence[Tensor], directions: int = 2) -> Verdict:
    """Run both paths on ``f`` at ``xs`` (float64) with random directions and adjoints; pick one (see module doc)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(t: Tensor, *lead: int) -> Tensor:
        return torch.randn((*lead, *t.shape), generator=g, dtype=torch.float64).to(t.device)

    dense = [randn(x, directions) for x in xs]
    lams = [randn(o) for o in f(*xs)]
    results, errors = {}, {}
    for name, path in PATHS.items():
        try:
            tangents, term = path(f, xs, dense, lams)
            results[name] = (tuple(tangents), term)
        except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, NotImplementedError, IndexError
            errors[name] = err
    if len(results) == 2:
        gap = _gap(results["forward"], results["reverse"])
        if gap is None:
            return Verdict("forward", "nested forward AD agrees with double backward")
        return Verdict("reverse", f"nested forward AD disagrees with double backward ({gap}); used double backward")
    if len(results) == 1:
        (name, result), (other, error) = next(iter(results.items())), next(iter(errors.items()))
        reason = first_line(error)
        *fd, floors = _finite_differences(f, xs, dense, lams)
        gap = _gap(result, tuple(fd), FD_RTOL, floors)
        if gap is None:
            return Verdict(name, f"{other} path unavailable ({reason}); {name} agrees with finite differences")
        raise UnsupportedOpError(
            f"the second derivative of {func} cannot be trusted: torch's {other} path is unavailable ({reason}) and its "
            f"{name} path disagrees with finite differences ({gap}). Use engine='double_backward', or write this part "
            "of the loss from ops with reliable derivatives.",
            op=str(func), reason=f"{name} disagrees with finite differences",
        ) from error
    raise UnsupportedOpError(
        f"torch has no second derivative of {func}: nested forward AD fails ({first_line(errors['forward'])}) and so "
        f"does double backward ({first_line(errors['reverse'])}), which engine='double_backward' would need too. "
        "Write this part of the loss from twice-differentiable ops.",
        op=str(func), reason=first_line(errors["reverse"]),
    ) from errors["reverse"]


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
