"""Per-op rules: first-order tangents and local second-order terms of ATen ops.

For a recorded op ``y = f(x_1, ..., x_m)`` with input tangents ``ẋ_j`` (a batch of
K directions, shape ``(K, *x_j.shape)``) a rule returns

* the output tangent ``ẏ = Σ_j ∂f/∂x_j · ẋ_j``, and
* the contribution ``⟨λ, f''[ẋ, ẋ]⟩`` of the op's second directional derivative,
  contracted with the adjoint ``λ = ∂L/∂y`` of the loss (``(K,)``; ``None`` for
  ops that are linear in their inputs).

Summing the contributions of all ops gives ``vᵀ H v`` exactly (the second-order
tangent of a 2-jet is linear in the first-order one, so it can be transposed
onto the adjoints of one shared backward pass). Ops without a hand-written rule
use ``torch.func.jvp`` on that op alone: nested for the second-order term.

The fused nodes of :mod:`fasthess.fused_nodes` (attention, layer norm, cross-entropy)
have rules that call the 2-jet kernel families (backend from ``diag(..., backend=)``)
with zero second-order input tangents: the kernel's first-order output is the output
tangent and ``⟨λ, second-order output⟩`` the contribution.

A tangent is either a dense ``(K, *shape)`` tensor or a :class:`OneHot` seed
(a single 1 per direction, as for sampled coordinates), which view ops move and
matrix products turn into a scattered copy of one input column without a matmul.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from .. import fused_nodes  # noqa: F401 - defines torch.ops.fasthess.{attention,layer_norm,cross_entropy}_fused
from ..capture import Node
from ..errors import UnsupportedOpError
from .generic_second_order import PATHS, assess_node, node_function, report

aten = torch.ops.aten


@dataclass
class OneHot:
    """K directions, each a single 1 at flat ``index[k]`` of a tensor of ``shape`` (``-1``: zero direction).

    ``lead`` are leading broadcast dimensions: the seed expanded to ``(*lead, *shape)``,
    as ``matmul`` does to a weight before a batched product.
    """

    shape: torch.Size
    index: Tensor  # (K,) int64, on the tensor's device
    dtype: torch.dtype
    lead: tuple[int, ...] = ()

    def dense(self) -> Tensor:
        k = self.index.numel()
        out = torch.zeros((k, math.prod(self.shape)), dtype=self.dtype, device=self.index.device)
        valid = self.index >= 0
        out[torch.arange(k, device=out.device)[valid], self.index[valid]] = 1
        return out.view(k, *self.shape).expand(k, *self.lead, *self.shape)

    def moved(self, shape: torch.Size, index: Tensor, lead: tuple[int, ...] = ()) -> OneHot:
        return OneHot(shape, index, self.dtype, lead)


Tangent = Union[Tensor, OneHot, None]
RuleResult = tuple[list[Union[Tensor, OneHot, None]], Union[Tensor, None]]


def _k_sum(t: Tensor) -> Tensor:
    """Sum over everything but the leading direction dimension."""
    return t.reshape(t.shape[0], -1).sum(1)


def _align(t: Tensor, ndim: int) -> Tensor:
    """Insert unit dims after K so ``t`` (K, *s) broadcasts against a rank-``ndim`` primal."""
    missing = ndim - (t.dim() - 1)
    return t.reshape(t.shape[0], *([1] * missing), *t.shape[1:]) if missing > 0 else t


def _densify(t: Tangent) -> Tangent:
    return t.dense() if isinstance(t, OneHot) else t


def _unflatten_call(node: Node, flat: Sequence[Any]) -> Any:
    args, kwargs = tree_unflatten(list(flat), node.spec)
    return node.func(*args, **kwargs)


def _vcall(node: Node, primal: Sequence[Any], batched: dict[int, Tensor]) -> Any:
    """``node``'s op vmapped over the K directions of the arguments in ``batched``."""
    pos = list(batched)

    def one(*ts: Tensor) -> Any:
        flat = list(primal)
        for p, t in zip(pos, ts):
            flat[p] = t
        return _unflatten_call(node, flat)

    return torch.vmap(one)(*[batched[p] for p in pos])


def _outputs(node: Node, out: Any) -> list[Tensor | None]:
    flat, _ = tree_flatten(out)
    return [t if i is not None else None for t, i in zip(flat, node.out_ids)]


# ----------------------------------------------------------------------------- generic fallback


def generic_rule(node: Node, primal: list[Any], tans: list[Tangent], lams: list[Tensor | None]) -> RuleResult:
    """Any op: tangent and second-order term by the path :mod:`.generic_second_order` trusts for it."""
    pos = [i for i, t in enumerate(tans) if t is not None]
    keep = [j for j, i in enumerate(node.out_ids) if i is not None]
    if not keep:  # no floating output (capture records none such; kept for rules that delegate here)
        return [None] * len(node.out_ids), None
    assessment = assess_node(node, primal, pos)
    path = assessment.rule_path()
    report(node.func, assessment.note(path))
    tangents, contribution = PATHS[path](
        # contiguous: forward AD copies a tangent into its primal's layout, which an expanded primal cannot take
        node_function(node, primal, pos), [primal[i].contiguous() for i in pos], [_densify(tans[i]) for i in pos],
        [lams[j] for j in keep],
    )
    out: list[Tensor | None] = [None] * len(node.out_ids)
    for j, t in zip(keep, tangents):
        out[j] = t
    return out, contribution


# ----------------------------------------------------------------------------- linear ops

_VIEW_LIKE = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def view_rule(node: Node, primal: list[Any], tans: list[Tangent], lams: list[Tensor | None]) -> RuleResult:
    (t,) = [t for t in tans if t is not None]
    shape = node.out_shapes[0]
    if isinstance(t, OneHot):
        if not t.lead:
            return [t.moved(shape, t.index)], None  # row-major order is unchanged by a reshape
        if tuple(shape) == (*t.lead, *t.shape):
            return [t], None
        t = t.dense()
    return [t.reshape(t.shape[0], *shape)], None


def unary_linear_rule(node: Node, primal: list[Any], tans: list[Tangent], lams: list[Tensor | None]) -> RuleResult:
    """Ops linear in their one tangent-carrying argument (views, reductions, gathers, losses)."""
    pos = [i for i, t in enumerate(tans) if t is not None]
    if len(pos) != 1:
        return generic_rule(node, primal, tans, lams)
    (p,) = pos
    t = tans[p]
    if isinstance(t, OneHot) and node.func is aten.expand.default and not t.lead:
        shape = node.out_shapes[0]
        n = len(t.shape)
        if tuple(shape[len(shape) - n :]) == tuple(t.shape):
            return [t.moved(t.shape, t.index, tuple(shape[: len(shape) - n]))], None
    if isinstance(t, OneHot):
        moved = _move_one_hot(node, primal, p, t)
        if moved is not None:
            return moved, None
        t = t.dense()
    if p == 0 and node.func in _DIM_SHIFT:
        args, kwargs = tree_unflatten(list(primal), node.spec)
        out = _DIM_SHIFT[node.func](t, t.dim() - 1, *args[1:], **kwargs)
        return (list(out) if isinstance(out, (list, tuple)) else [out]), None
    return _outputs(node, _vcall(node, primal, {p: t})), None


def _d(dim: int, n: int) -> int:
    """Dimension ``dim`` of a rank-``n`` primal, in its K-batched tangent."""
    return dim % n + 1 if n else 1


def _dims(dims: Any, n: int) -> list[int]:
    return [_d(x, n) for x in ([dims] if isinstance(dims, int) else dims)]


def _reduce(method: str) -> Callable[..., Tensor]:
    def apply(t: Tensor, n: int, dims: Any = None, keepdim: bool = False, dtype: Any = None) -> Tensor:
        ds = list(range(1, n + 1)) if dims is None or len(dims) == 0 else _dims(dims, n)
        return getattr(t, method)(ds, keepdim=keepdim, dtype=dtype)

    return apply


# Linear data-movement ops applied to a K-batched tangent directly (``vmap`` costs
# about a millisecond a call, which dominates passes through small models).
_DIM_SHIFT: dict[Any, Callable[..., Any]] = {
    aten.t.default: lambda t, n: t.transpose(1, 2) if n == 2 else t,
    aten.transpose.int: lambda t, n, a, b: t.transpose(_d(a, n), _d(b, n)),
    aten.permute.default: lambda t, n, dims: t.permute(0, *_dims(dims, n)),
    aten.select.int: lambda t, n, dim, index: t.select(_d(dim, n), index),
    aten.unsqueeze.default: lambda t, n, dim: t.unsqueeze(dim % (n + 1) + 1),
    aten.squeeze.dim: lambda t, n, dim: t.squeeze(_d(dim, n)),
    aten.clone.default: lambda t, n, **_: t,  # tangents are never written to: no copy needed
    aten.alias.default: lambda t, n: t,
    aten.split.Tensor: lambda t, n, size, dim=0: t.split(size, _d(dim, n)),
    aten.split_with_sizes.default: lambda t, n, sizes, dim=0: t.split(list(sizes), _d(dim, n)),
    aten.unbind.int: lambda t, n, dim=0: t.unbind(_d(dim, n)),
    aten.sum.dim_IntList: _reduce("sum"),
    aten.mean.dim: _reduce("mean"),
    aten.neg.default: lambda t, n: -t,
    aten.expand.default: lambda t, n, size, implicit=False: _align(t, len(size)).expand(t.shape[0], *size),
    aten._to_copy.default: lambda t, n, **kw: t.to(
        dtype=kw.get("dtype") or t.dtype, device=kw.get("device") or t.device
    ),
}


def _move_one_hot(node: Node, primal: list[Any], p: int, t: OneHot) -> list[Any] | None:
    """Follow a one-hot seed through a pure data-movement op; ``None`` where it stops being one-hot."""
    if node.func not in _MOVES or t.lead:
        return None
    key = ("one_hot_map", p)
    if key not in node.cache:
        numel, device = math.prod(t.shape), t.index.device
        ar = torch.arange(numel, device=device).view(t.shape)
        flat = list(primal)
        flat[p] = ar
        outs, _ = tree_flatten(_unflatten_call(node, flat))
        maps: list[Tensor | None] = []
        for o in outs:
            if not isinstance(o, Tensor) or o.numel() != o.unique().numel():
                maps.append(None)
                continue
            inverse = torch.full((numel,), -1, dtype=torch.long, device=device)
            inverse[o.reshape(-1)] = torch.arange(o.numel(), device=device)
            maps.append(inverse)
        node.cache[key] = maps
    maps = node.cache[key]
    if any(m is None for m in maps):
        return None
    result: list[Any] = []
    for m, shape in zip(maps, node.out_shapes):
        if shape is None:
            result.append(None)
            continue
        idx = torch.where(t.index >= 0, m[t.index.clamp_min(0)], -1)
        result.append(t.moved(shape, idx))
    return result


_MOVES = {
    aten.t.default,
    aten.transpose.int,
    aten.permute.default,
    aten.select.int,
    aten.slice.Tensor,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.unbind.int,
    aten.chunk.default,
    aten.clone.default,
    aten.alias.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.narrow.default,
}


def add_sub_rule(node: Node, primal: list[Any], tans: list[Tangent], lams: list[Tensor | None]) -> RuleResult:
    """``a ± α b``: a Python-number or absent operand contributes no tangent (reads no values)."""
    ta, tb = _densify(tans[0]), (_densify(tans[1]) if len(tans) > 1 else None)
    alpha = node_kwarg(node, primal, "alpha", 1)
    if node.func is aten.sub.Tensor:
        alpha = -alpha
    ndim = len(node.out_shapes[0])
    out = None
    if ta is not None:
        out = _align(ta, ndim)
    if tb is not None:
        tb = _align(tb, ndim) * alpha if alpha != 1 else _align(tb, ndim)
        out = tb if out is None else out + tb
    shape = node.out_shapes[0]
    return [out.expand(out.shape[0], *shape) if tuple(out.shape[1:]) != tuple(shape) else out], None


def node_kwarg(node: Node, primal: list[Any], name: str, default: Any) -> Any:
    args, kwargs = tree_unflatten(list(primal), node.spec)
    if name in kwargs:
        return kwargs[name]
    schema_args = node.func._schema.arguments
    for i, arg in enumerate(schema_args):
        if arg.name == name and i < len(args):
            return args[i]
    return default


def zero_fill_rule(node: Node, primal: list[Any], tans: list[Tangent], lams: list[Tensor | None]) -> RuleResult:
    """Ops additive in their tensor arguments (cat, stack, where): absent tangents count as zeros."""
    batched = {}
    flat = list(primal)
    for i, (x, t) in enumerate(zip(primal, tans)):
        if t is not None:
            batched[i] = _densify(t)
        elif isinstance(x, Tensor) and x.is_floating_point():
            flat[i] = torch.zeros((), dtype=x.dtype, device=x.device).expand(x.shape)
    return _outputs(node, _vcall(node, flat, batched)), None


def masked_fill_rule(node: Node, primal: list[Any], tans: list[Tangent], lams: list[Tensor | None]) -> RuleResult:
    mask = primal[1]
    if tans[0] is None:  # only a tensor fill value carries a tangent: rare, go generic
        return generic_rule(node, primal, tans, lams)
    t = _densify(tans[0])
    if len(tans) > 2 and tans[2] is not None:
        return generic_rule(node, primal, tans, lams)
    return [t.masked_fill(mask, 0)], None


def detach_rule(node: Node, primal: list[Any], tans: list[Tangent], lams: list[Tensor | None]) -> RuleResult:
    return [None] * len(node.out_ids), None


# ----------------------------------------------------------------------------- (multi)linear products


def mul_rule(node: Node, primal: list[Any], tans: list[Tangent], lams: list[Tensor | None]) -> RuleResult:
    a, b = primal[0], primal[1]
    ta, tb = _densify(tans[0]), (_densify(tans[1]) if len(tans) > 1 else None)
    ndim = len(node.out_shapes[0])
    out = None
    if ta is not None:
        out = _align(ta, ndim) * b
    if tb is not None:
        term = a * _align(tb, ndim)
        out = term if out is None else out + term
    contribution = None
    if ta is not None and tb is not None and lams[0] is not None:
        contribution = 2 * _k_sum((_align(ta, ndim) * _align(tb, ndim)).mul_(lams[0]))
    shape = node.out_shapes[0]
    if tuple(out.shape[1:]) != tuple(shape):
        out = out.expand(out.shape[0], *shape)
    return [out], contribution


def div_rule(node: Node, primal: list[Any], tans: list[Tangent], lams: list[Tensor | None]) -> RuleResult:
    a, b = primal[0], primal[1]
    if not isinstance(b, Tensor) or node.func not in (aten.div.Tensor,):
        if isinstance(a, Tensor) and tans[0] is not None and (len(tans) < 2 or tans[1] is None):
            return unary_linear_rule(node, primal, tans, lams)
        return generic_rule(node, primal, tans, lams)
    ta, tb = _densify(tans[0]), _densify(tans[1])
    ndim = len(node.out_shapes[0])
    if tb is None:
        return [_align(ta, ndim) / b], None
    tb = _align(tb, ndim)
    y = a / b
    out = -y * tb / b
    q_num = 2 * y * tb * tb / (b * b)  # d²(a/b) along ḃ with a fixed
    if ta is not None:
        ta = _align(ta, ndim)
        out = out + ta / b
        q_num = q_num - 2 * ta * tb / (b * b)
    contribution = _k_sum(lams[0] * q_num) if lams[0] is not None else None
    return [out], contribution


def _matmul_args(node: Node, primal: list[Any]) -> tuple[Any, Tensor, Tensor, float, float, int, int]:
    """(bias, m1, m2, beta, alpha, position of m1, position of m2) for mm / bmm / addmm."""
    if node.func in (aten.mm.default, aten.bmm.default):
        return None, primal[0], primal[1], 1.0, 1.0, 0, 1
    beta = node_kwarg(node, primal, "beta", 1)
    alpha = node_kwarg(node, primal, "alpha", 1)
    return primal[0], primal[1], primal[2], beta, alpha, 1, 2


def matmul_rule(node: Node, primal: list[Any], tans: list[Tangent], lams: list[Tensor | None]) -> RuleResult:
    """mm, bmm, addmm: products with K-batched tangents; one-hot weight seeds scatter one column."""
    bias, m1, m2, beta, alpha, p1, p2 = _matmul_args(node, primal)
    t1, t2 = tans[p1], tans[p2]
    tb = tans[0] if bias is not None else None
    out = None
    if isinstance(t2, OneHot) and t1 is None and (not t2.lead or m1.dim() == 3):
        out = _one_hot_right(m1, t2) * alpha if alpha != 1 else _one_hot_right(m1, t2)
    elif isinstance(t1, OneHot) and t2 is None and (not t1.lead or m2.dim() == 3):
        out = _one_hot_left(t1, m2) * alpha if alpha != 1 else _one_hot_left(t1, m2)
    else:
        t1, t2 = _densify(t1), _densify(t2)
        if t1 is not None:
            out = torch.matmul(t1, m2)
        if t2 is not None:
            term = torch.matmul(m1, t2)
            out = term if out is None else out.add_(term)
        if alpha != 1 and out is not None:
            out = out * alpha
    contribution = None
    if t1 is not None and t2 is not None and lams[0] is not None:
        # ⟨λ, ṫ1 ṫ2⟩ = ⟨ṫ1, λ ṫ2ᵀ⟩: take whichever product has the smaller result
        if t1.shape[-1] < t2.shape[-1]:
            contribution = 2 * alpha * _k_sum(t1 * torch.matmul(lams[0], t2.transpose(-1, -2)))
        else:
            contribution = 2 * alpha * _k_sum(lams[0] * torch.matmul(t1, t2))
    if tb is not None:
        tb = _densify(tb)
        shape = node.out_shapes[0]
        term = _align(tb, len(shape))
        term = term * beta if beta != 1 else term
        out = term.expand(term.shape[0], *shape) if out is None else out.add_(term)
    return [out], contribution


def _one_hot_right(m1: Tensor, seed: OneHot) -> Tensor:
    """``m1 @ E_k`` for one-hot ``E_k`` of shape (i, n), m1 ``(..., M, i)``: column ``c`` gets ``m1[..., r]``.

    This is a linear layer's output tangent along a sampled weight coordinate: the
    ``onehot_weight_tangent`` kernel (backend chosen by ``diag(..., backend=)``).
    """
    from ..kernels.linear import onehot_family, onehot_weight_tangent
    from ..kernels.registry import preferred_backend

    n = seed.shape[-1]
    valid = seed.index >= 0
    out_idx = torch.where(valid, seed.index % n, -1)  # -1: a zero direction
    in_idx = torch.where(valid, seed.index // n, 0)
    backend = preferred_backend(onehot_family.name, onehot_family.backends)
    return onehot_weight_tangent(m1, out_idx, in_idx, n, backend=backend)


def _one_hot_left(seed: OneHot, m2: Tensor) -> Tensor:
    """``E_k @ m2`` for one-hot ``E_k`` of shape (m, i), m2 ``(..., i, N)``: row ``r`` gets ``m2[..., c, :]``."""
    k = seed.index.numel()
    m, inner = seed.shape
    out = m2.new_zeros((k, *m2.shape[:-2], m, m2.shape[-1]))
    valid = seed.index >= 0
    rows, cols = seed.index[valid] // inner, seed.index[valid] % inner
    target = out.movedim(-2, 1)  # (K, m, ..., N) view
    target[torch.arange(k, device=m2.device)[valid], rows] = m2[..., cols, :].movedim(-2, 0)
    return out


# ----------------------------------------------------------------------------- pointwise nonlinear ops

_SQRT_2PI = math.sqrt(2 * math.pi)


def _gelu_derivatives(x: Tensor, approximate: str) -> tuple[Tensor, Tensor]:
    if approximate == "tanh":
        c = math.sqrt(2 / math.pi)
        u = c * (x + 0.044715 * x**3)
        du = c * (1 + 3 * 0.044715 * x**2)
        d2u = c * 6 * 0.044715 * x
        th = torch.tanh(u)
        sech2 = 1 - th * th
        d1 = 0.5 * (1 + th) + 0.5 * x * sech2 * du
        d2 = sech2 * du + 0.5 * x * (-2 * th * sech2 * du * du + sech2 * d2u)
        return d1, d2
    phi = torch.exp(-0.5 * x * x) / _SQRT_2PI
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    return cdf + x * phi, phi * (2 - x * x)


def _pointwise(node: Node, primal: list[Any]) -> tuple[Tensor, Tensor]:
    """(f'(x), f''(x)) for the unary pointwise op of ``node``."""
    x = primal[0]
    f = node.func
    if f is aten.tanh.default:
        y = torch.tanh(x)
        d1 = 1 - y * y
        return d1, -2 * y * d1
    if f is aten.sigmoid.default:
        s = torch.sigmoid(x)
        d1 = s * (1 - s)
        return d1, d1 * (1 - 2 * s)
    if f is aten.exp.default:
        y = torch.exp(x)
        return y, y
    if f is aten.log.default:
        return 1 / x, -1 / (x * x)
    if f is aten.rsqrt.default:
        r = torch.rsqrt(x)
        return -0.5 * r / x, 0.75 * r / (x * x)
    if f is aten.sqrt.default:
        s = torch.sqrt(x)
        return 0.5 / s, -0.25 / (s * x)
    if f is aten.reciprocal.default:
        return -1 / (x * x), 2 / (x * x * x)
    if f is aten.relu.default:
        return (x > 0).to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device)
    if f is aten.erf.default:
        d1 = 2 / math.sqrt(math.pi) * torch.exp(-x * x)
        return d1, -2 * x * d1
    if f is aten.silu.default:
        s = torch.sigmoid(x)
        d1 = s * (1 + x * (1 - s))
        return d1, s * (1 - s) * (2 + x * (1 - 2 * s))
    if f is aten.gelu.default:
        return _gelu_derivatives(x, node_kwarg(node, primal, "approximate", "none"))
    if f is aten.pow.Tensor_Scalar:
        e = primal[1]
        return e * x ** (e - 1), e * (e - 1) * x ** (e - 2) if e != 1 else torch.zeros_like(x)
    return ACTIVATIONS[f](x, lambda name, default: node_kwarg(node, primal, name, default))


def pointwise_rule(node: Node, primal: list[Any], tans: list[Tangent], lams: list[Tensor | None]) -> RuleResult:
    if tans[0] is None or any(t is not None for t in tans[1:]):
        return generic_rule(node, primal, tans, lams)
    t = _densify(tans[0])
    if "d1" not in node.cache:  # primal-only factors, shared by every chunk and layer
        d1, d2 = _pointwise(node, primal)
        node.cache["d1"] = d1
        node.cache["w2"] = lams[0] * d2 if lams[0] is not None else None
    w2 = node.cache["w2"]
    contribution = _k_sum(t * t * w2) if w2 is not None else None
    return [node.cache["d1"] * t], contribution


# ----------------------------------------------------------------------------- activations
#
# (f'(x), f''(x)) of unary pointwise ops with Python-number parameters, read by name from the
# op's schema (``arg(name, default)``). At a kink each takes the values of torch's backward and
# double backward, so the tangent-adjoint engine agrees with the generic engines everywhere:
# tests/test_op_rules.py checks every entry at its kinks against torch and elsewhere against
# central differences.

Arg = Callable[[str, Any], Any]


def _zero(x: Tensor) -> Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def _between(x: Tensor, low: float, high: float) -> Tensor:
    """1 on the open interval (low, high), else 0."""
    return ((x > low) & (x < high)).to(x.dtype)


def _mish(x: Tensor, arg: Arg) -> tuple[Tensor, Tensor]:
    """``x tanh(sp(x))``, ``sp = log(1 + eˣ)``: with ``s = σ(x)``, ``t = tanh(sp(x))``, ``tanh(sp)' = (1 − t²)s``:
    ``f' = t + x s (1 − t²)``, ``f'' = s (1 − t²) (2 + x (1 − s) − 2 x s t)``."""
    s, t = torch.sigmoid(x), torch.tanh(F.softplus(x))
    sech2 = 1 - t * t
    return t + x * s * sech2, s * sech2 * (2 + x * (1 - s) - 2 * x * s * t)


def _logit(x: Tensor, arg: Arg) -> tuple[Tensor, Tensor]:
    """``log(x / (1 − x))`` of ``x`` clamped to ``[eps, 1 − eps]``: ``f' = 1 / (x(1 − x))``,
    ``f'' = (2x − 1) / (x(1 − x))²`` inside the closed interval, 0 outside (torch's backward)."""
    eps = arg("eps", None)
    q = 1 / (x * (1 - x))
    d1, d2 = q, (2 * x - 1) * q * q
    if eps is None:
        return d1, d2
    inside = ((x >= eps) & (x <= 1 - eps)).to(x.dtype)
    return d1 * inside, d2 * inside


def _hardtanh(x: Tensor, arg: Arg) -> tuple[Tensor, Tensor]:
    """``clamp(x, min_val, max_val)`` (``relu6`` too): ``f' = 1`` on the open interval, 0 at and beyond its ends."""
    return _between(x, arg("min_val", -1.0), arg("max_val", 1.0)), _zero(x)


def _hardsigmoid(x: Tensor, arg: Arg) -> tuple[Tensor, Tensor]:
    """``hardtanh(x + 3, 0, 6) / 6``: ``f' = 1/6`` on ``(−3, 3)``."""
    return _between(x, -3.0, 3.0) / 6, _zero(x)


def _hardswish(x: Tensor, arg: Arg) -> tuple[Tensor, Tensor]:
    """``x · hardsigmoid(x)``: ``f' = 0`` for ``x <= −3``, ``x/3 + 1/2`` on ``(−3, 3)``, 1 for ``x >= 3``;
    ``f'' = 1/3`` on ``(−3, 3)``."""
    d1 = torch.where(x <= -3, 0.0, torch.where(x >= 3, 1.0, x / 3 + 0.5))
    return d1, _between(x, -3.0, 3.0) / 3


def _softplus(x: Tensor, arg: Arg) -> tuple[Tensor, Tensor]:
    """``log(1 + e^{βx}) / β``, and ``x`` where ``βx > threshold``: with ``s = σ(βx)``, ``f' = s`` (1 beyond the
    threshold), ``f'' = β s (1 − s)`` where ``βx < threshold`` (torch: 0 at the threshold itself)."""
    beta, threshold = arg("beta", 1.0), arg("threshold", 20.0)
    z = x * beta
    s = torch.sigmoid(z)
    return torch.where(z > threshold, 1.0, s), torch.where(z < threshold, beta * s * (1 - s), 0.0)


def _elu_derivatives(x: Tensor, alpha: float, scale: float, input_scale: float) -> tuple[Tensor, Tensor]:
    """``scale · x`` for ``x > 0``, ``scale · α (e^{i x} − 1)`` for ``x <= 0`` (``i``: input_scale):
    ``f' = scale · α i e^{i x}`` for ``x <= 0``, ``scale`` above; ``f'' = scale · α i² e^{i x}`` for ``x < 0``
    (torch's double backward: 0 at ``x = 0``)."""
    e = scale * alpha * input_scale * torch.exp(x * input_scale)
    return torch.where(x <= 0, e, scale), torch.where(x < 0, e * input_scale, 0.0)


def _elu(x: Tensor, arg: Arg) -> tuple[Tensor, Tensor]:
    """``elu`` (``selu`` is ``elu`` with torch's fixed ``alpha`` and ``scale``): see :func:`_elu_derivatives`."""
    return _elu_derivatives(x, arg("alpha", 1.0), arg("scale", 1.0), arg("input_scale", 1.0))


def _celu(x: Tensor, arg: Arg) -> tuple[Tensor, Tensor]:
    """``celu(x, α) = elu(x, α, scale 1, input_scale 1/α)``. (Torch's backward rounds ``α`` to float32
    in ``1/α``, a relative error of ~1e-8; this is the derivative of the forward.)"""
    alpha = arg("alpha", 1.0)
    return _elu_derivatives(x, alpha, 1.0, 1.0 / alpha)


def _leaky_relu(x: Tensor, arg: Arg) -> tuple[Tensor, Tensor]:
    """``x`` for ``x > 0``, ``slope · x`` else: ``f' = 1`` for ``x > 0``, the slope at and below 0."""
    return torch.where(x > 0, x.new_ones(()), arg("negative_slope", 0.01)), _zero(x)


def _log_sigmoid(x: Tensor, arg: Arg) -> tuple[Tensor, Tensor]:
    """``log σ(x)`` (``log_sigmoid_forward``'s first output): ``f' = σ(−x)``, ``f'' = −σ(x) σ(−x)``."""
    s = torch.sigmoid(-x)
    return s, -s * (1 - s)


def _abs(x: Tensor, arg: Arg) -> tuple[Tensor, Tensor]:
    """``|x|``: ``f' = sign(x)`` (0 at 0)."""
    return torch.sign(x), _zero(x)


def _shrink(x: Tensor, arg: Arg) -> tuple[Tensor, Tensor]:
    """``softshrink`` / ``hardshrink``: ``f' = 1`` for ``|x| > λ``, 0 on ``[−λ, λ]``."""
    return (x.abs() > arg("lambd", 0.5)).to(x.dtype), _zero(x)


def _threshold(x: Tensor, arg: Arg) -> tuple[Tensor, Tensor]:
    """``x`` for ``x > threshold``, else ``value``: ``f' = 1`` above the threshold, 0 at and below it."""
    return (x > arg("threshold", 0.0)).to(x.dtype), _zero(x)


def _clamp(x: Tensor, arg: Arg) -> tuple[Tensor, Tensor]:
    """``clamp`` / ``clamp_min`` / ``clamp_max`` with number bounds: ``f' = 1`` on the closed interval (torch's
    backward passes the gradient at the bounds), 0 outside."""
    low, high = arg("min", None), arg("max", None)
    inside = torch.ones_like(x, dtype=torch.bool)
    if low is not None:
        inside &= x >= low
    if high is not None:
        inside &= x <= high
    return inside.to(x.dtype), _zero(x)


ACTIVATIONS: dict[Any, Callable[[Tensor, Arg], tuple[Tensor, Tensor]]] = {
    aten.mish.default: _mish,
    aten.logit.default: _logit,
    aten.hardtanh.default: _hardtanh,
    aten.hardsigmoid.default: _hardsigmoid,
    aten.hardswish.default: _hardswish,
    aten.softplus.default: _softplus,
    aten.elu.default: _elu,
    aten.celu.default: _celu,
    aten.leaky_relu.default: _leaky_relu,
    aten.log_sigmoid_forward.default: _log_sigmoid,
    aten.abs.default: _abs,
    aten.softshrink.default: _shrink,
    aten.hardshrink.default: _shrink,
    aten.threshold.default: _threshold,
    aten.clamp.default: _clamp,
    aten.clamp_min.default: _clamp,
    aten.clamp_max.default: _clamp,
}
# Piecewise linear: no second-order term, so the engine needs no adjoint for them.
PIECEWISE_LINEAR = {
    aten.relu.default, aten.hardtanh.default, aten.hardsigmoid.default, aten.leaky_relu.default, aten.abs.default,
    aten.softshrink.default, aten.hardshrink.default, aten.threshold.default, aten.clamp.default,
    aten.clamp_min.default, aten.clamp_max.default,
}


def _schema_args(node: Node, flat: Sequence[Any]) -> dict[str, Any]:
    """The op's arguments by schema name, from ``flat`` (primal values or tangents) laid out as ``node.flat_args``."""
    args, kwargs = tree_unflatten(list(flat), node.spec)
    named = {a.name: v for a, v in zip(node.func._schema.arguments, args)}
    named.update(kwargs)
    return named


# ----------------------------------------------------------------------------- batch norm with batch statistics


def native_batch_norm_rule(
    node: Node, primal: list[Any], tans: list[Tangent], lams: list[Tensor | None]
) -> RuleResult:
    """``native_batch_norm(x, w, b, running_mean, running_var, training, momentum, eps)``, channels on dim 1.

    Over the dims ``R`` other than the channel's (``mean``: the mean over ``R``), with batch
    statistics (``training``): ``c = x − mean(x)``, ``v = mean(c²)``, ``r = (v + eps)^(−1/2)``,
    ``x̂ = c r``, ``y = x̂ w + b``; outputs ``y``, ``mean(x)`` and ``r``. First order:

        ċ = ẋ − mean(ẋ),  v̇ = 2 mean(c ċ),  ṙ = −½ r³ v̇,  x̂̇ = r ċ + c ṙ,  ẏ = x̂̇ w + x̂ ẇ + ḃ;

    second order (``c̈ = 0``; ``w`` and ``b`` enter linearly):

        v̈ = 2 mean(ċ²),  r̈ = ¾ r⁵ v̇² − ½ r³ v̈,  x̂̈ = 2 ċ ṙ + c r̈,  ÿ = x̂̈ w + 2 x̂̇ ẇ,

    so ``⟨λ, ÿ⟩ = Σ_channels (r̈ Σ_R λwc + 2 ṙ Σ_R λwċ) + 2 ⟨λ, x̂̇ ẇ⟩`` (plus ``⟨λ_r, r̈⟩`` when the
    saved ``r`` is used). With running statistics (``not training``) ``c = x − running_mean`` and
    ``r = (running_var + eps)^(−1/2)`` are constants: ``ṙ = r̈ = 0``. Nested forward AD through the
    fused kernel is wrong in torch 2.13 for batch statistics (``F.instance_norm`` reaches it).
    """
    a = _schema_args(node, primal)
    t = _schema_args(node, [_densify(x) for x in tans])
    if t["running_mean"] is not None or t["running_var"] is not None:
        return generic_rule(node, primal, tans, lams)
    x, w, training, eps = a["input"], a["weight"], a["training"], a["eps"]
    tx, tw, tb = t["input"], t["weight"], t["bias"]
    red = [0, *range(2, x.dim())]
    channel = [1, -1] + [1] * (x.dim() - 2)
    cache = node.cache
    if "xh" not in cache:  # primal-only factors, shared by every chunk and layer
        if training:
            c = x - x.mean(red, keepdim=True)
            r = torch.rsqrt((c * c).mean(red, keepdim=True) + eps)
        else:
            c, r = x - a["running_mean"].view(channel), torch.rsqrt(a["running_var"].view(channel) + eps)
        lam = lams[0]
        lw = lam * w.view(channel) if lam is not None and w is not None else lam
        cache.update(c=c, r=r, xh=c * r, lw=lw, lwc=(lw * c).sum(red, keepdim=True) if lw is not None else None)
    c, r, xh, lw = cache["c"], cache["r"], cache["xh"], cache["lw"]
    k = next(v.shape[0] for v in (tx, tw, tb) if v is not None)
    tw = tw.view(k, *channel) if tw is not None else None
    rd = [d + 1 for d in red]
    out = xh * tw if tw is not None else None
    stats: list[Tensor | None] = [None, None]
    contribution = None
    if tx is not None:
        ct, rt, rtt = tx, None, None
        if training:
            ct = tx - tx.mean(rd, keepdim=True)
            vt = 2 * (c * ct).mean(rd, keepdim=True)
            rt = -0.5 * r**3 * vt
            rtt = 0.75 * r**5 * vt * vt - r**3 * (ct * ct).mean(rd, keepdim=True)  # v̈ = 2 mean(ċ²)
            stats = [tx.mean(rd), rt.reshape(k, -1)]
        xht = r * ct + c * rt if rt is not None else r * ct
        term = xht * w.view(channel) if w is not None else xht
        out = term if out is None else out + term
        terms = []
        if rt is not None and lw is not None:
            terms += [_k_sum(rtt * cache["lwc"]), 2 * _k_sum(rt * (lw * ct).sum(rd, keepdim=True))]
        if rtt is not None and len(lams) > 2 and lams[2] is not None:
            terms.append(_k_sum(rtt.reshape(k, -1) * lams[2]))
        if tw is not None and lams[0] is not None:
            terms.append(2 * _k_sum(lams[0] * xht * tw))
        contribution = sum(terms) if terms else None
    if tb is not None:
        tb = tb.view(k, *channel)
        out = tb.expand(k, *x.shape) if out is None else out + tb
    return [out, *stats][: len(node.out_ids)], contribution


# ----------------------------------------------------------------------------- lookups and selections


def embedding_rule(node: Node, primal: list[Any], tans: list[Tangent], lams: list[Tensor | None]) -> RuleResult:
    """``embedding(W, idx, padding_idx, scale_grad_by_freq, sparse)``: ``ẏ = Ẇ[idx]``, 0 where ``idx = padding_idx``.

    Torch's backward gives the padding row zero gradient; zeroing the tangent of the padding
    lookups differentiates the loss with them held constant, which is what ``double_backward``
    computes (its second backward masks them too), also for a weight tied to an output head.
    A one-hot seed on ``W[r, c]`` becomes ``[idx == r] e_c`` without materialising ``(K, *W.shape)``.

    ``scale_grad_by_freq``: torch's backward divides row ``r``'s gradient by the count ``n_r`` of
    ``r`` in ``idx``, which is not the derivative of the lookup; its "Hessian" ``d(grad)/dW`` has
    diagonal ``A_ii / n_r + (1 + 1/n_r) C_ii + B_ii`` (``A``: the lookup's own curvature, ``C``: the
    cross term with another use of ``W``, ``B``: that use's), which a tangent of any scale cannot
    give (it gives ``α² A + 2α C + B``): refused with :class:`~fasthess.errors.UnsupportedOpError`.
    """
    a = _schema_args(node, primal)
    if a.get("scale_grad_by_freq", False):
        raise UnsupportedOpError(
            f"{node.func} with scale_grad_by_freq=True: torch's backward divides each row's gradient by the row's "
            "count in the batch, which is not the derivative of the lookup, and the tangent-adjoint engine cannot "
            "reproduce the second derivative of that convention. Use engine='double_backward' (or engine='auto', "
            "which falls back to it), or scale_grad_by_freq=False.",
            op=str(node.func), reason="scale_grad_by_freq=True",
        )
    indices, padding_idx = a["indices"], a.get("padding_idx", -1)
    t = tans[0]
    if isinstance(t, OneHot) and not t.lead:
        out = _one_hot_rows(t, indices)
    else:
        out = unary_linear_rule(node, primal, tans, lams)[0][0]
    if padding_idx is not None and padding_idx >= 0:
        out = out.masked_fill((indices == padding_idx).unsqueeze(-1), 0)
    return [out], None


def _one_hot_rows(seed: OneHot, indices: Tensor) -> Tensor:
    """``E_k[indices]`` for one-hot ``E_k`` of shape ``(V, D)`` at ``(r, c)``: ``[indices == r]`` in column ``c``."""
    k, dim = seed.index.numel(), seed.shape[-1]
    valid = seed.index >= 0
    row = torch.where(valid, seed.index // dim, -1)
    col = seed.index.clamp_min(0) % dim
    flat = indices.reshape(1, -1)
    hit = (flat == row[:, None]).to(seed.dtype)
    out = hit.new_zeros(k, flat.shape[1], dim)
    out.scatter_(2, col.view(k, 1, 1).expand(k, flat.shape[1], 1), hit.unsqueeze(-1))
    return out.view(k, *indices.shape, dim)


def where_rule(node: Node, primal: list[Any], tans: list[Tangent], lams: list[Tensor | None]) -> RuleResult:
    """``where(c, a, b)``: ``ẏ = where(c, ȧ, ḃ)``, a missing tangent counting as 0 (linear in ``a`` and ``b``)."""
    shape = node.out_shapes[0]
    ta, tb = _densify(tans[1]), _densify(tans[2])
    some = ta if ta is not None else tb
    zero = torch.zeros((), dtype=some.dtype, device=some.device)
    out = torch.where(
        primal[0],
        _align(ta, len(shape)) if ta is not None else zero,
        _align(tb, len(shape)) if tb is not None else zero,
    )
    return [out.expand(some.shape[0], *shape) if tuple(out.shape[1:]) != tuple(shape) else out], None


# ----------------------------------------------------------------------------- softmax family


def softmax_rule(node: Node, primal: list[Any], tans: list[Tangent], lams: list[Tensor | None]) -> RuleResult:
    """ṗ = p⊙c with c = ẋ − ⟨p, ẋ⟩; second-order term ṗ⊙c − p⟨ṗ, ẋ⟩ (⟨·,·⟩ along ``dim``)."""
    x, dim = primal[0], primal[1]
    t = _densify(tans[0])
    d = dim % x.dim()
    if "p" not in node.cache:
        p = torch.softmax(x, d)
        node.cache["p"] = p
        node.cache["lp"] = (lams[0] * p).sum(d, keepdim=True) if lams[0] is not None else None
    p, lp = node.cache["p"], node.cache["lp"]
    centred = t - (p * t).sum(d + 1, keepdim=True)
    tp = p * centred
    contribution = None
    if lp is not None:
        contribution = _k_sum(tp * centred * lams[0]) - _k_sum(lp * (tp * t).sum(d + 1, keepdim=True))
    return [tp], contribution


def log_softmax_rule(node: Node, primal: list[Any], tans: list[Tangent], lams: list[Tensor | None]) -> RuleResult:
    x, dim = primal[0], primal[1]
    t = _densify(tans[0])
    p = torch.softmax(x, dim)
    d = dim % x.dim() + 1
    mean = (p * t).sum(d, keepdim=True)
    contribution = None
    if lams[0] is not None:
        var = (p * t * t).sum(d, keepdim=True) - mean * mean
        contribution = -_k_sum(lams[0].sum(dim % x.dim(), keepdim=True) * var)
    return [t - mean], contribution


# ----------------------------------------------------------------------------- fused nodes (fasthess.fused_nodes)


def attention_fused_rule(
    node: Node, primal: list[Any], tans: list[Tangent], lams: list[Tensor | None]
) -> RuleResult:
    """``fasthess::attention_fused``: the attention 2-jet kernel with second-order input tangents 0.

    Then ``o2 = f''[ẋ, ẋ]``, so the contribution is ``⟨λ, o2⟩`` per direction. The zero
    second-order tangents, and the first-order tangents of inputs that do not depend on the layer,
    go to the kernel as ``None``: no zero tensors, and their products are skipped.
    """
    from ..kernels.attention import attention_jet2, family
    from ..kernels.registry import preferred_backend

    (q, k, v, mask, causal, scale), _ = tree_unflatten(list(primal), node.spec)
    (tq, tk, tv, *_), _ = tree_unflatten([_densify(t) for t in tans], node.spec)
    backend = preferred_backend(family.name, family.backends)
    _, o1, o2 = attention_jet2(q, k, v, tq, tk, tv, causal=causal, key_padding_mask=mask, scale=scale, backend=backend)
    return [o1], (_k_sum(o2.mul_(lams[0])) if lams[0] is not None else None)


def layer_norm_fused_rule(
    node: Node, primal: list[Any], tans: list[Tangent], lams: list[Tensor | None]
) -> RuleResult:
    """``fasthess::layer_norm_fused``: the layer-norm 2-jet kernel for the input tangent, weight/bias by hand.

    With ``x̂ = LN(x)`` (no affine), ``y = x̂ ⊙ w + b``: ``ẏ = ẋ̂ ⊙ w + x̂ ⊙ ẇ + ḃ`` and
    ``ÿ = ẍ̂ ⊙ w + 2 ẋ̂ ⊙ ẇ`` (b and w enter linearly), where the kernel gives ``ẋ̂`` and ``ẍ̂``.
    """
    from ..kernels.layer_norm import family, layer_norm_jet2
    from ..kernels.registry import preferred_backend

    (x, w, b, eps), _ = tree_unflatten(list(primal), node.spec)
    (tx, tw, tb, _), _ = tree_unflatten([_densify(t) for t in tans], node.spec)
    ndim = x.dim()
    tw = _align(tw, ndim) if tw is not None else None
    out, second = None, None
    if tx is not None:
        backend = preferred_backend(family.name, family.backends)
        # weight folded into the kernel unless it carries a tangent itself
        # second-order input tangent 0: None, skipped by the kernel
        xh, out, second = layer_norm_jet2(x, w if tw is None else None, None, tx, None, eps, backend)
        if tw is not None:
            second = second * w + 2 * out * tw
            out = out * w + xh * tw
    elif tw is not None:
        if "xh" not in node.cache:
            c = x - x.mean(-1, keepdim=True)
            node.cache["xh"] = c * torch.rsqrt((c * c).mean(-1, keepdim=True) + eps)
        out = node.cache["xh"] * tw
    if tb is not None:
        tb = _align(tb, ndim)
        out = tb.expand(tb.shape[0], *x.shape) if out is None else out + tb
    contribution = _k_sum(second.mul_(lams[0])) if second is not None and lams[0] is not None else None
    return [out], contribution


def cross_entropy_fused_rule(
    node: Node, primal: list[Any], tans: list[Tangent], lams: list[Tensor | None]
) -> RuleResult:
    """``fasthess::cross_entropy_fused``: the cross-entropy 2-jet kernel, second-order logit tangents 0 (``None``)."""
    from ..kernels.loss import cross_entropy_jet2, family
    from ..kernels.registry import preferred_backend

    (z, y, ignore_index), _ = tree_unflatten(list(primal), node.spec)
    tz = _densify(tans[0])
    backend = preferred_backend(family.name, family.backends)
    _, l1, l2 = cross_entropy_jet2(z, y, tz, None, ignore_index, backend)
    return [l1], (l2 * lams[0] if lams[0] is not None else None)


# ----------------------------------------------------------------------------- table

Rule = Callable[[Node, list, list, list], RuleResult]

RULES: dict[Any, Rule] = {}
for _op in _VIEW_LIKE:
    RULES[_op] = view_rule
for _op in _MOVES | {
    aten.expand.default,
    aten.sum.dim_IntList,
    aten.sum.default,
    aten.mean.dim,
    aten.mean.default,
    aten.neg.default,
    aten._to_copy.default,
    aten.index_select.default,
    aten.gather.default,
    aten.nll_loss_forward.default,
    aten.nll_loss2d_forward.default,
    aten.tril.default,
    aten.triu.default,
    aten.index.Tensor,
}:
    RULES[_op] = unary_linear_rule
for _op in (aten.add.Tensor, aten.sub.Tensor):
    RULES[_op] = add_sub_rule
for _op in (aten.cat.default, aten.stack.default, aten.where.self):
    RULES[_op] = zero_fill_rule
for _op in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
    RULES[_op] = masked_fill_rule
for _op in (aten.mm.default, aten.bmm.default, aten.addmm.default):
    RULES[_op] = matmul_rule
for _op in (
    aten.tanh.default,
    aten.sigmoid.default,
    aten.exp.default,
    aten.log.default,
    aten.rsqrt.default,
    aten.sqrt.default,
    aten.reciprocal.default,
    aten.relu.default,
    aten.erf.default,
    aten.silu.default,
    aten.gelu.default,
    aten.pow.Tensor_Scalar,
):
    RULES[_op] = pointwise_rule
for _op in ACTIVATIONS:
    RULES[_op] = pointwise_rule
# linear data movement: permutations (one-hot seeds move through them) and copies
_MOVES |= {aten.flip.default, aten.roll.default}
for _op in (aten.flip.default, aten.roll.default, aten.repeat.default):
    RULES[_op] = unary_linear_rule
RULES[aten.native_batch_norm.default] = native_batch_norm_rule
RULES[aten.embedding.default] = embedding_rule
RULES[aten.where.self] = where_rule
RULES[aten.index_add.default] = zero_fill_rule
RULES[aten.mul.Tensor] = mul_rule
RULES[aten.div.Tensor] = div_rule
RULES[aten._softmax.default] = softmax_rule
RULES[aten._log_softmax.default] = log_softmax_rule
RULES[aten.detach.default] = detach_rule
RULES[torch.ops.fasthess.attention_fused.default] = attention_fused_rule
RULES[torch.ops.fasthess.layer_norm_fused.default] = layer_norm_fused_rule
RULES[torch.ops.fasthess.cross_entropy_fused.default] = cross_entropy_fused_rule

# Ops whose rules never produce a second-order term (no adjoint needed).
LINEAR_OPS = {op for op, r in RULES.items() if r in (view_rule, unary_linear_rule, add_sub_rule, zero_fill_rule,
                                                       masked_fill_rule, detach_rule, embedding_rule, where_rule)}
LINEAR_OPS |= PIECEWISE_LINEAR
# Bilinear ops: a second-order term only where two inputs carry tangents of the same direction.
PAIRED_OPS = {aten.mul.Tensor, aten.mm.default, aten.bmm.default, aten.addmm.default}


def reads_primal_inputs(node: Node) -> bool:
    """Whether the rule of ``node`` reads the values of its recorded (parameter-dependent) inputs."""
    rule = RULES.get(node.func, generic_rule)
    if rule in (view_rule, detach_rule, add_sub_rule, where_rule):
        return False
    return not (rule in (unary_linear_rule, embedding_rule) and len(node.refs()) == 1)
