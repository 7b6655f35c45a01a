"""Ops whose higher-order derivatives torch gets wrong or lacks: hand-written rules and decompositions (issue 20).

Three layers of checks:

* every op inside a tiny float64 model (``MODELS``), ``fasthess.diag(method="exact")`` on every engine against
  the dense reverse-over-reverse Hessian (``zoo.full_hessian``, which trusts no forward-mode rule); the fast
  engine must not fall back. That reference is itself checked: equal to torch's own ops differentiated
  reverse-over-reverse where torch has a double backward, and to central differences of torch's own gradient
  where it has none (``NO_TORCH_DOUBLE_BACKWARD``);
* every new rule of :mod:`fasthess.engines.second_order_rules` against central differences of its op on
  random inputs, and each activation's derivatives at its kinks against torch's backward and double backward;
* every decomposition of :mod:`fasthess.decompositions` against torch's function: values, shapes, first
  derivatives (also at the kinks), errors.

Where an engine cannot be right because torch's own forward-mode AD is wrong or missing, ``REFUSED`` says so and
the test checks that the engine refuses with fasthess's ``UnsupportedOpError`` (never a silently different number).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from tolerances import (
    ACTIVATION_KINKS_VS_TORCH,
    DECOMPOSITION_VS_TORCH,
    ENGINE_VS_DENSE,
    RULE_FINITE_DIFFERENCE,
    assert_entries_close,
)
from torch import Tensor, nn
from zoo import Case, full_hessian

import fasthess
from fasthess import decompositions, fused_nodes
from fasthess.capture import Node, Ref, capture
from fasthess.engines.second_order_rules import RULES, OneHot, generic_rule
from fasthess.objective import Objective

D = torch.float64
ENGINES = ["tangent_adjoint", "double_backward", "fwd_rev", "fwd_fwd", "auto"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# tiny models: one intra-op thread (conftest.one_thread; this file: 8 s at one thread, 30-55 s at two)
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- tiny models


class Around(nn.Module):
    """``b(op(a(x)))``: the op between two linear layers, so ``a.weight``'s curvature runs through its f''."""

    def __init__(self, op: Callable[[Tensor], Tensor], width: int = 6, after: int | None = None, inputs: int = 4):
        super().__init__()
        self.a, self.op, self.b = nn.Linear(inputs, width), op, nn.Linear(after or width, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.op(self.a(x)))


def _regression(model: nn.Module, layers: list[str], outputs: Callable[[], Tensor]) -> Case:
    """A regression loss of the float64 ``model``'s ``outputs()``, with curvature of both signs."""
    y = torch.randn(outputs().shape, dtype=D, generator=_gen(2))

    def loss() -> Tensor:
        out = outputs()
        return ((out - y) ** 2).mean() + 0.1 * (out**3).mean()

    return Case("", model, loss, layers)


def _around(op: Callable[[Tensor], Tensor], width: int = 6, after: int | None = None, rows: int = 5,
            extra: tuple[str, ...] = ()) -> Callable[[], Case]:
    def build() -> Case:
        torch.manual_seed(0)
        x = torch.randn(rows, 4, dtype=D, generator=_gen(1)) * 3  # pre-activations on both sides of ±3
        model = Around(op, width, after).to(D).eval()
        return _regression(model, ["a.weight", *extra], lambda: model(x))

    return build


def _view(shape: tuple[int, ...], module: nn.Module) -> nn.Module:
    """``module`` applied to the activations viewed as ``(batch, *shape)``, flattened back."""

    class Viewed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, h: Tensor) -> Tensor:
            return self.inner(h.view(h.shape[0], *shape)).flatten(1)

    return Viewed()


def _with_running_stats(norm: nn.Module) -> nn.Module:
    norm.running_mean.copy_(torch.tensor([0.3, -0.2]))
    norm.running_var.copy_(torch.tensor([0.7, 1.6]))
    return norm.eval()


class Direct(nn.Module):
    """Calls the torch function that the ``F.`` decomposition does not intercept (the rule must take it)."""

    def __init__(self, which: str) -> None:
        super().__init__()
        self.which = which
        self.weight = nn.Parameter(torch.tensor([1.3, -0.6]))
        self.bias = nn.Parameter(torch.tensor([0.2, 0.1]))

    def forward(self, h: Tensor) -> Tensor:
        h = h.view(h.shape[0], 2, 3)
        if self.which == "batch_norm":  # batch statistics, no running statistics
            h = torch.batch_norm(h, self.weight, self.bias, None, None, True, 0.1, 1e-5, False)
        else:
            h = torch.instance_norm(h, self.weight, self.bias, None, None, True, 0.1, 1e-5, False)
        return h.flatten(1)


def _pairs(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Distances among each sample's 3 points in 2-D (coincident pairs included) and to shifted copies."""

    def op(h: Tensor) -> Tensor:
        p = h.view(h.shape[0], 3, 2)
        return torch.cat([fn(p, p).flatten(1), fn(p, 0.5 * p.flip(1) + 0.5).flatten(1)], 1)

    return op


def _pdist(p: float) -> Callable[[Tensor], Tensor]:
    return lambda h: torch.stack([F.pdist(r.view(3, 2), p) for r in h])


ANCHORS = torch.randn(4, 6, dtype=D, generator=_gen(7))


class Bag(nn.Module):
    """``nn.EmbeddingBag`` → linear; optionally per-sample weights computed from features by ``w``."""

    def __init__(self, mode: str, weighted: bool = False, **kwargs: object) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(7, 3, mode=mode, **kwargs)
        self.w = nn.Linear(2, 1) if weighted else None
        self.out = nn.Linear(3, 3)

    def forward(self, ids: Tensor, offsets: Tensor | None, feats: Tensor) -> Tensor:
        psw = torch.sigmoid(self.w(feats)).view(ids.shape) if self.w is not None else None
        return self.out(torch.tanh(self.bag(ids, offsets, per_sample_weights=psw)))


IDS = torch.tensor([1, 0, 4, 4, 2, 3, 0, 0, 5, 6, 6])
OFFSETS = torch.tensor([0, 3, 3, 7])  # bag 1 is empty


def _bag(mode: str, ids: Tensor = IDS, offsets: Tensor | None = OFFSETS, weighted: bool = False,
         **kwargs: object) -> Callable[[], Case]:
    def build() -> Case:
        torch.manual_seed(0)
        model = Bag(mode, weighted, **kwargs).to(D).eval()
        feats = torch.randn(ids.numel(), 2, dtype=D, generator=_gen(3))
        layers = ["bag.weight"] + (["w.weight"] if weighted else [])
        return _regression(model, layers, lambda: model(ids, offsets, feats))

    return build


class Words(nn.Module):
    """Embedding → tanh(linear) → next-token logits, by a head or by the embedding itself (tied)."""

    def __init__(self, tied: bool, direct: bool, **kwargs: object) -> None:
        super().__init__()
        self.e, self.l, self.head = nn.Embedding(7, 3, **kwargs), nn.Linear(3, 3), nn.Linear(3, 7, bias=False)
        self.tied, self.direct = tied, direct

    def forward(self, ids: Tensor) -> Tensor:
        if self.direct:  # torch.embedding: the rule, not the F.embedding decomposition
            pad = self.e.padding_idx if self.e.padding_idx is not None else -1
            h = torch.embedding(self.e.weight, ids, pad, self.e.scale_grad_by_freq)
        else:
            h = self.e(ids)
        h = torch.tanh(self.l(h))
        logits = h @ self.e.weight.t() if self.tied else self.head(h)
        return F.cross_entropy(logits.flatten(0, 1), ids.flatten().roll(1))


WORDS = torch.tensor([[1, 0, 4, 4, 2], [3, 0, 0, 5, 6]])


def _words(tied: bool = False, direct: bool = False, **kwargs: object) -> Callable[[], Case]:
    def build() -> Case:
        torch.manual_seed(0)
        model = Words(tied, direct, **kwargs).to(D).eval()
        return Case("", model, lambda: model(WORDS), ["e.weight"])

    return build


MODELS: dict[str, Callable[[], Case]] = {
    # activations: rules (or, for GLU / hardsigmoid, decompositions)
    "mish": _around(nn.Mish()),
    "logit": _around(lambda h: torch.logit(0.8 * torch.sigmoid(h) + 0.1)),
    "logit_eps": _around(lambda h: torch.logit(torch.sigmoid(h), eps=0.2)),
    "glu": _around(nn.GLU(), after=3),
    "hardsigmoid": _around(nn.Hardsigmoid()),
    "hardswish": _around(nn.Hardswish()),
    "hardtanh": _around(nn.Hardtanh(-0.5, 1.0)),
    "relu6": _around(nn.ReLU6()),
    "softplus": _around(nn.Softplus(beta=2.0, threshold=1.0)),
    "elu": _around(nn.ELU(0.7)),
    "selu": _around(nn.SELU()),
    "celu": _around(nn.CELU(0.6)),
    "leaky_relu": _around(nn.LeakyReLU(0.1)),
    "logsigmoid": _around(nn.LogSigmoid()),
    "softsign": _around(nn.Softsign()),
    "tanhshrink": _around(nn.Tanhshrink()),
    "silu": _around(nn.SiLU()),
    "softshrink": _around(nn.Softshrink(0.3)),
    "hardshrink": _around(nn.Hardshrink(0.3)),
    "threshold": _around(nn.Threshold(0.1, 0.5)),
    "clamp": _around(lambda h: h.clamp(-0.5, 1.0) + h.clamp_min(0.2) * h.clamp_max(0.3)),
    # instance norm (decomposition) and native_batch_norm with batch statistics (rule)
    "instance_norm1d": _around(_view((2, 3), nn.InstanceNorm1d(2))),
    "instance_norm2d_affine": _around(_view((2, 2, 2), nn.InstanceNorm2d(2, affine=True)), width=8,
                                      extra=("op.inner.weight", "op.inner.bias")),
    "instance_norm3d_affine": _around(_view((1, 2, 2, 2), nn.InstanceNorm3d(1, affine=True)), width=8,
                                      extra=("op.inner.weight",)),
    "instance_norm_running_stats": _around(
        _view((2, 3), _with_running_stats(nn.InstanceNorm1d(2, affine=True, track_running_stats=True))),
        extra=("op.inner.weight",),
    ),
    "batch_norm_direct": _around(Direct("batch_norm"), extra=("op.weight", "op.bias")),
    "instance_norm_direct": _around(Direct("instance_norm"), extra=("op.weight",)),
    # distances (decompositions)
    "cdist": _around(_pairs(lambda a, b: torch.cdist(a, b)), after=18),
    "cdist_mm": _around(
        lambda h: torch.cdist(h.view(-1, 3, 2), 0.5 * h.view(-1, 3, 2).flip(1) + 0.5,
                              compute_mode="use_mm_for_euclid_dist").flatten(1), after=9),
    "cdist_many_rows": _around(lambda h: torch.cdist(h, ANCHORS), after=4, rows=30),  # > 25 rows: matrix products
    "cdist_p1": _around(_pairs(lambda a, b: torch.cdist(a, b, p=1.0)), after=18),
    "cdist_p3": _around(_pairs(lambda a, b: torch.cdist(a, b, p=3.0)), after=18),
    "cdist_p0.5": _around(_pairs(lambda a, b: torch.cdist(a, b, p=0.5)), after=18),
    "cdist_pinf": _around(_pairs(lambda a, b: torch.cdist(a, b, p=math.inf)), after=18),
    "pdist": _around(_pdist(2.0), after=3),
    "pdist_p3": _around(_pdist(3.0), after=3),
    # EmbeddingBag (decomposition)
    "bag_sum": _bag("sum"),
    "bag_mean_2d": _bag("mean", ids=IDS[:10].view(5, 2), offsets=None),
    "bag_max_padding": _bag("max", padding_idx=0),
    "bag_weighted_padding": _bag("sum", weighted=True, padding_idx=4),
    "bag_mean_last_offset": _bag("mean", offsets=torch.tensor([0, 3, 3, 7]), include_last_offset=True, padding_idx=0),
    # embeddings: torch's backward convention
    "embedding_padding": _words(padding_idx=0),
    "embedding_padding_tied": _words(tied=True, padding_idx=0),
    "embedding_padding_direct": _words(direct=True, padding_idx=0),
    "embedding_padding_tied_direct": _words(tied=True, direct=True, padding_idx=0),
    "embedding_scale_grad_by_freq": _words(scale_grad_by_freq=True),
    "embedding_scale_grad_by_freq_tied": _words(tied=True, scale_grad_by_freq=True),
}

# (model, engine) pairs that cannot be right: the engine raises UnsupportedOpError naming the op
REFUSED: set[tuple[str, str]] = {
    # torch has no forward AD for the backward of mish / logit / silu
    *((name, "fwd_fwd") for name in ("mish", "logit", "logit_eps", "silu")),
    # nested forward AD through native_batch_norm with batch statistics is wrong in torch 2.13: fwd_fwd's audit
    # (fasthess/engines/forward_mode_audit.py) refuses it
    ("batch_norm_direct", "fwd_fwd"),
    ("instance_norm_direct", "fwd_fwd"),
    # torch.embedding(padding_idx) called directly: forward mode differentiates the padding lookups, which torch's
    # backward does not (F.embedding is decomposed and right on every engine): the audits refuse the op
    *((name, engine) for name in ("embedding_padding_direct", "embedding_padding_tied_direct")
      for engine in ("fwd_fwd", "fwd_rev")),
    # scale_grad_by_freq: torch's backward is not the adjoint of its derivative; the fast engine and the audits refuse
    *((name, engine) for name in ("embedding_scale_grad_by_freq", "embedding_scale_grad_by_freq_tied")
      for engine in ("tangent_adjoint", "fwd_fwd", "fwd_rev")),
}
FALLS_BACK = {"embedding_scale_grad_by_freq", "embedding_scale_grad_by_freq_tied"}  # under engine="auto"
# torch has no double backward here: the dense reference is the decomposition's, checked against torch's gradient
# (cdist's matrix-product path is torch's differentiable _euclidean_dist)
NO_TORCH_DOUBLE_BACKWARD = {"hardsigmoid"} | {
    n for n in MODELS if n.startswith(("cdist", "pdist", "bag_")) and n not in ("cdist_mm", "cdist_many_rows")
}

_built: dict[str, tuple[Case, dict[str, Tensor]]] = {}


def _model(name: str) -> tuple[Case, dict[str, Tensor]]:
    """The case and its dense reverse-over-reverse Hessian diagonals (under the decompositions), built once."""
    if name not in _built:
        case = MODELS[name]()
        _built[name] = case, {layer: full_hessian(case, layer).diagonal().clone() for layer in case.layers}
    return _built[name]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(MODELS))
def test_op_in_a_model_matches_the_dense_hessian(name: str, engine: str) -> None:
    case, dense = _model(name)
    if (name, engine) in REFUSED:
        with pytest.raises(fasthess.UnsupportedOpError):
            fasthess.diag(case.model, case.loss, case.layers, method="exact", engine=engine)
        return
    res = fasthess.diag(case.model, case.loss, case.layers, method="exact", engine=engine)
    if engine in ("tangent_adjoint", "auto"):
        if name in FALLS_BACK:
            assert res.meta["engine"] == "double_backward" and "scale_grad_by_freq" in res.meta["engine_fallback"]
        else:
            assert (res.meta["engine"], res.meta["engine_fallback"]) == ("tangent_adjoint", None)
    rtol, atol = ENGINE_VS_DENSE[(D, res.meta["engine"])]
    for layer in case.layers:
        assert_entries_close(res[layer].values, dense[layer], rtol, atol, f"{name}/{engine}/{layer}")


def _torch_gradient(case: Case, layer: str, value: Tensor) -> Tensor:
    """The gradient of the loss in ``layer`` at ``value`` by torch's own ops (no decompositions)."""
    param = dict(case.model.named_parameters())[layer]
    saved = param.detach().clone()
    with torch.no_grad():
        param.copy_(value)
    try:
        (grad,) = torch.autograd.grad(case.loss(), param)
    finally:
        with torch.no_grad():
            param.copy_(saved)
    return grad


@pytest.mark.parametrize("name", list(MODELS))
def test_the_dense_reference_is_torchs_derivative(name: str) -> None:
    """The decompositions change no derivative torch defines: the dense reference equals torch's own ops
    differentiated reverse-over-reverse, or (no double backward in torch) central differences of torch's gradient."""
    case, dense = _model(name)
    if name not in NO_TORCH_DOUBLE_BACKWARD:
        for layer in case.layers:
            raw = full_hessian(case, layer, decomposed=False).diagonal()
            assert_entries_close(dense[layer], raw, *ENGINE_VS_DENSE[(D, "double_backward")], f"{name}/{layer}")
        return
    with pytest.raises(RuntimeError, match="not implemented"):
        full_hessian(case, case.layers[0], decomposed=False)  # torch fixed it: use its Hessian instead
    step = 1e-4
    for layer in case.layers:
        p = dict(case.model.named_parameters())[layer].detach()
        want = torch.empty(p.numel(), dtype=D)
        for i in range(p.numel()):
            e = torch.zeros(p.numel(), dtype=D)
            e[i] = step
            e = e.view(p.shape)
            g = _torch_gradient(case, layer, p + e) - _torch_gradient(case, layer, p - e)
            want[i] = g.flatten()[i] / (2 * step)
        assert_entries_close(dense[layer], want, *RULE_FINITE_DIFFERENCE, f"{name}/{layer}")


# ----------------------------------------------------------------------------- rules against central differences


def _node_of(fn: Callable[..., Tensor | tuple[Tensor, ...]], inputs: list[Tensor]):  # noqa: ANN202
    """The one recorded op of ``fn(*inputs)`` (its outputs then summed): (graph, node, primal arguments)."""

    def total(ps: list[Tensor]) -> Tensor:
        out = fn(*ps)
        return sum(o.sum() for o in out) if isinstance(out, (tuple, list)) else out.sum()

    graph = capture(total, inputs)
    values = graph.replay([x.detach() for x in inputs])
    (node,) = [n for n in graph.nodes if n.func not in (torch.ops.aten.sum.default, torch.ops.aten.add.Tensor)]
    primal = [values[a.id] if isinstance(a, Ref) else a for a in node.flat_args]
    return graph, node, primal


def _outputs(node: Node, values: dict[int, Tensor]) -> list[Tensor]:
    out = node.call(values)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _check_rule_by_differences(fn: Callable[..., Tensor], inputs: list[Tensor], what: str, k: int = 3) -> None:
    """The rule's output tangents and ⟨λ, f''[ẋ, ẋ]⟩ against central differences along random directions.

    ``λ`` is random on the outputs the rule gives a tangent (the others, such as ``log_sigmoid_forward``'s
    buffer, are not differentiable in torch either). The second difference's round-off, ``4ε Σ|λ f| / step²``,
    is added to the bound of the second-order term.
    """
    graph, node, primal = _node_of(fn, inputs)
    assert node.func in RULES, f"{what}: {node.func} has no rule"
    gen = _gen(11)
    directions = [torch.rand(k, *x.shape, dtype=D, generator=gen) * 2 - 1 for x in inputs]
    slot = {pid: j for j, pid in enumerate(graph.placeholders)}
    tans = [directions[slot[a.id]] if isinstance(a, Ref) else None for a in node.flat_args]
    at_zero = _outputs(node, dict(zip(graph.placeholders, inputs)))
    no_lams = [None] * len(node.out_ids)
    differentiable = [t is not None for t in RULES[node.func](node, list(primal), tans, no_lams)[0]]
    lams = [torch.randn(o.shape, dtype=D, generator=gen) if i is not None and j < len(differentiable)
            and differentiable[j] else None for j, (o, i) in enumerate(zip(at_zero, node.out_ids))]
    node.cache.clear()  # the rule caches λ-weighted factors
    got_tangents, got_second = RULES[node.func](node, primal, tans, lams)
    step, rtol, atol = 1e-3, *RULE_FINITE_DIFFERENCE
    for j in range(k):
        def at(s: float) -> list[Tensor]:
            return _outputs(node, {pid: x + s * d[j] for pid, x, d in zip(graph.placeholders, inputs, directions)})

        plus, minus = at(step), at(-step)
        second, noise = torch.zeros((), dtype=D), torch.zeros((), dtype=D)
        for o, (a, b, c, lam) in enumerate(zip(plus, minus, at_zero, lams)):
            if lam is None:
                continue
            assert_entries_close(got_tangents[o][j].flatten(), ((a - b) / (2 * step)).flatten(), rtol, atol,
                                 f"{what}: tangent of output {o}")
            second = second + (lam * (a - 2 * c + b)).sum() / step**2
            noise = noise + 4 * torch.finfo(D).eps * (lam * c).abs().sum() / step**2
        got = torch.zeros((), dtype=D) if got_second is None else got_second[j]
        assert abs(got - second) <= rtol * abs(second) + noise + atol * abs(second), (
            f"{what}: second-order term {float(got):.10e}, central difference {float(second):.10e}"
        )


def _away_from(x: Tensor, kinks: list[float], margin: float = 0.02) -> Tensor:
    """``x`` with entries near a kink moved off it (a central difference must not straddle one)."""
    for kink in kinks:
        near = (x - kink).abs() < margin
        x = torch.where(near, x + 2 * margin, x)
    return x


# name -> (function of one tensor, its kinks, input scale/offset). Each records exactly one op with a rule.
ACTIVATION_CASES: dict[str, tuple[Callable[[Tensor], Tensor], list[float], tuple[float, float]]] = {
    "mish": (F.mish, [], (3.0, 0.0)),
    "logit": (torch.logit, [], (0.4, 0.5)),
    "logit_eps": (lambda x: torch.logit(x, eps=0.2), [0.2, 0.8], (0.45, 0.5)),
    "hardtanh": (lambda x: F.hardtanh(x, -0.5, 1.0), [-0.5, 1.0], (2.0, 0.0)),
    "relu6": (F.relu6, [0.0, 6.0], (5.0, 2.0)),
    "hardsigmoid": (torch.ops.aten.hardsigmoid, [-3.0, 3.0], (5.0, 0.0)),  # torch's op (F.hardsigmoid is decomposed)
    "hardswish": (F.hardswish, [-3.0, 3.0], (5.0, 0.0)),
    "softplus": (lambda x: F.softplus(x, beta=2.0, threshold=1.0), [0.5], (2.0, 0.0)),
    "elu": (lambda x: F.elu(x, 0.7), [0.0], (2.0, 0.0)),
    "selu": (F.selu, [0.0], (2.0, 0.0)),
    "celu": (lambda x: F.celu(x, 0.6), [0.0], (2.0, 0.0)),
    "leaky_relu": (lambda x: F.leaky_relu(x, 0.1), [0.0], (2.0, 0.0)),
    "logsigmoid": (F.logsigmoid, [], (4.0, 0.0)),
    "abs": (torch.abs, [0.0], (2.0, 0.0)),
    "softshrink": (lambda x: F.softshrink(x, 0.3), [-0.3, 0.3], (1.0, 0.0)),
    "hardshrink": (lambda x: F.hardshrink(x, 0.3), [-0.3, 0.3], (1.0, 0.0)),
    "threshold": (lambda x: F.threshold(x, 0.1, 0.5), [0.1], (1.0, 0.0)),
    "clamp": (lambda x: x.clamp(-0.5, 1.0), [-0.5, 1.0], (2.0, 0.0)),
    "clamp_min": (lambda x: x.clamp_min(0.2), [0.2], (1.0, 0.0)),
    "clamp_max": (lambda x: x.clamp_max(0.2), [0.2], (1.0, 0.0)),
}


@pytest.mark.parametrize("name", list(ACTIVATION_CASES))
def test_activation_rule_matches_central_differences(name: str) -> None:
    fn, kinks, (scale, shift) = ACTIVATION_CASES[name]
    x = torch.rand(4, 5, dtype=D, generator=_gen(5)) * 2 - 1
    _check_rule_by_differences(fn, [_away_from(x * scale + shift, kinks)], name)


@pytest.mark.parametrize("name", list(ACTIVATION_CASES))
def test_activation_rule_at_its_kinks_is_torchs(name: str) -> None:
    """At (and beside) each kink: f' and f'' of the rule equal torch's backward and double backward."""
    fn, kinks, (scale, shift) = ACTIVATION_CASES[name]
    x = torch.tensor(kinks + [k + d for k in kinks for d in (-1e-3, 1e-3)] + [shift, shift + 0.4 * scale], dtype=D)
    _, node, primal = _node_of(fn, [x])
    n = x.numel()
    (tangent,), second = RULES[node.func](node, primal, [OneHot(x.shape, torch.arange(n), D)] + [None] * 5,
                                          [torch.ones(n, dtype=D)] + [None] * 2)
    xg = x.clone().requires_grad_(True)
    (d1,) = torch.autograd.grad(fn(xg).sum(), xg, create_graph=True)
    rtol = ACTIVATION_KINKS_VS_TORCH
    torch.testing.assert_close(tangent.diagonal(), d1.detach(), rtol=rtol, atol=0)
    d2 = torch.zeros(n, dtype=D)
    if d1.requires_grad:  # else piecewise linear in torch too (clamp's backward is a mask)
        try:
            (d2,) = torch.autograd.grad(d1.sum(), xg)
        except RuntimeError as err:  # hardsigmoid: torch has none; the rule's f'' is 0 (piecewise linear)
            assert "not implemented" in str(err)
    got = second if second is not None else torch.zeros(n, dtype=D)  # no adjoint: a piecewise-linear op
    torch.testing.assert_close(got, torch.zeros(n, dtype=D) + d2, rtol=rtol, atol=0)


def test_batch_norm_rule_matches_central_differences() -> None:
    """``native_batch_norm`` with batch statistics (its saved mean and inverse deviation are outputs too) and
    with running statistics, with and without affine weights."""
    x = torch.randn(4, 3, 5, dtype=D, generator=_gen(6))
    w, b = torch.randn(3, dtype=D, generator=_gen(7)), torch.randn(3, dtype=D, generator=_gen(8))
    stats = torch.randn(3, dtype=D, generator=_gen(9)), torch.rand(3, dtype=D, generator=_gen(10)) + 0.5
    norm = torch.ops.aten.native_batch_norm
    _check_rule_by_differences(lambda x, w, b: norm(x, w, b, None, None, True, 0.1, 1e-5), [x, w, b], "batch")
    _check_rule_by_differences(lambda x: norm(x, None, None, None, None, True, 0.1, 1e-5), [x], "batch, no affine")
    _check_rule_by_differences(lambda w: norm(x, w, None, None, None, True, 0.1, 1e-5), [w], "batch, weight only")
    _check_rule_by_differences(lambda x, w, b: norm(x, w, b, *stats, False, 0.1, 1e-5)[0], [x, w, b], "running")


@pytest.mark.parametrize("padding_idx", [-1, 2])
def test_embedding_rule_zeroes_the_padding_lookups_and_takes_one_hot_seeds(padding_idx: int) -> None:
    weight = torch.randn(5, 3, dtype=D, generator=_gen(12))
    ids = torch.tensor([[0, 2, 4], [2, 2, 1]])
    fn = lambda w: torch.embedding(w, ids, padding_idx)  # noqa: E731
    graph, node, primal = _node_of(fn, [weight])
    dense = torch.rand(4, 5, 3, dtype=D, generator=_gen(13))
    if padding_idx >= 0:
        dense[:, padding_idx] = 0  # the forward op reads the padding row; torch's backward does not
    if padding_idx < 0:  # with padding the rule is torch's backward, not the lookup's derivative: below
        _check_rule_by_differences(fn, [weight], "embedding")
    (got,), none = RULES[node.func](node, primal, [dense, None, None, None, None], [None])
    assert none is None
    torch.testing.assert_close(got, torch.stack([fn(d) for d in dense]), rtol=0, atol=0)
    seeds = torch.tensor([0, 7, 6, 14, -1])  # rows 0, 2 (the padding row), 2, 4; a zero direction
    (onehot,), _ = RULES[node.func](node, primal, [OneHot(weight.shape, seeds, D), None, None, None, None], [None])
    want = generic_rule(node, primal, [OneHot(weight.shape, seeds, D).dense(), None, None, None, None], [None])[0][0]
    if padding_idx >= 0:
        want = want.masked_fill((ids == padding_idx).unsqueeze(-1), 0)
    torch.testing.assert_close(onehot, want, rtol=0, atol=0)


def test_where_rule_matches_central_differences() -> None:
    cond = torch.rand(4, 1, 3, generator=_gen(14)) > 0.5
    a, b = torch.randn(4, 2, 3, dtype=D, generator=_gen(15)), torch.randn(3, dtype=D, generator=_gen(16))
    _check_rule_by_differences(lambda a, b: torch.where(cond, a, b), [a, b], "both")
    _check_rule_by_differences(lambda a: torch.where(cond, a, b), [a], "a")
    _check_rule_by_differences(lambda b: torch.where(cond, a, b), [b], "b (broadcast)")


MOVEMENTS = {
    "flip": lambda t: t.flip(1), "flip2": lambda t: t.flip(0, 1), "roll_dim": lambda t: t.roll(2, 1),
    "roll_flat": lambda t: t.roll(1), "repeat": lambda t: t.repeat(2, 3),
}


@pytest.mark.parametrize("name", list(MOVEMENTS))
def test_data_movement_rules_take_one_hot_seeds(name: str) -> None:
    """flip / roll move a one-hot seed (it stays one-hot), repeat copies it: the op applied to each direction."""
    fn = MOVEMENTS[name]
    x = torch.randn(3, 4, dtype=D, generator=_gen(34))
    _, node, primal = _node_of(fn, [x])
    seed = OneHot(x.shape, torch.tensor([0, 5, 11, -1]), D)
    (out,), none = RULES[node.func](node, primal, [seed] + [None] * (len(primal) - 1), [None])
    assert none is None and isinstance(out, OneHot) == (node.func is not torch.ops.aten.repeat.default)
    got = out.dense() if isinstance(out, OneHot) else out
    torch.testing.assert_close(got, torch.stack([fn(d) for d in seed.dense()]), rtol=0, atol=0)


def test_index_add_rule_matches_central_differences() -> None:
    """``index_add`` (the sums of the EmbeddingBag decomposition): linear in both tensors, repeated indices."""
    index = torch.tensor([0, 2, 2, 1, 0])
    base, source = torch.randn(3, 4, dtype=D, generator=_gen(32)), torch.randn(5, 4, dtype=D, generator=_gen(33))
    _check_rule_by_differences(lambda s, x: s.index_add(0, index, x), [base, source], "both")
    _check_rule_by_differences(lambda x: base.index_add(0, index, x, alpha=0.5), [source], "source")


# ----------------------------------------------------------------------------- decompositions against torch


def _close(got: Tensor, want: Tensor, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape} {got.dtype} vs {want.shape}"
    rtol, atol = DECOMPOSITION_VS_TORCH
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _same_gradient(ours: Callable[..., Tensor], theirs: Callable[..., Tensor], inputs: list[Tensor], what: str) -> None:
    """Values and first derivatives (torch's backward, the convention at kinks) of a decomposition."""
    xs = [x.clone().requires_grad_(True) for x in inputs]
    out_ours, out_theirs = ours(*xs), theirs(*xs)
    _close(out_ours, out_theirs, what)
    cotangent = torch.randn(out_theirs.shape, dtype=D, generator=_gen(17))

    def grads(out: Tensor) -> tuple[Tensor | None, ...]:  # None: no dependence (cdist with p = 0)
        return torch.autograd.grad(out, xs, cotangent, allow_unused=True) if out.requires_grad else (None,) * len(xs)

    got, want = grads(out_ours), grads(out_theirs)
    for i, (g, w) in enumerate(zip(got, want)):
        _close(g if g is not None else torch.zeros_like(xs[i]), w if w is not None else torch.zeros_like(xs[i]),
               f"{what}: gradient {i}")


def test_norm_and_activation_decompositions_match_torch() -> None:
    x = torch.randn(4, 3, 5, 6, dtype=D, generator=_gen(18))
    w, b = torch.randn(3, dtype=D, generator=_gen(19)), torch.randn(3, dtype=D, generator=_gen(20))
    rm, rv = torch.randn(3, dtype=D, generator=_gen(21)), torch.rand(3, dtype=D, generator=_gen(22)) + 0.1
    for shape in [(4, 3, 5), (4, 3, 5, 6), (2, 3, 2, 2, 3)]:
        xs = x.flatten()[: math.prod(shape)].view(shape)
        _same_gradient(decompositions.instance_norm, F.instance_norm, [xs], f"instance_norm {shape}")
        _same_gradient(lambda x, w, b: decompositions.instance_norm(x, weight=w, bias=b),
                       lambda x, w, b: F.instance_norm(x, weight=w, bias=b), [xs, w, b], f"affine {shape}")
        _same_gradient(lambda x, w: decompositions.instance_norm(x, rm, rv, w, None, False),
                       lambda x, w: F.instance_norm(x, rm, rv, w, None, False), [xs, w], f"running stats {shape}")
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        decompositions.instance_norm(x[:, :, :1, :1])
    with pytest.raises(ValueError, match="running_mean and running_var"):
        decompositions.instance_norm(x, use_input_stats=False)
    for dim in (-1, 0, 3):
        _same_gradient(lambda x: decompositions.glu(x, dim), lambda x: F.glu(x, dim), [x], f"glu dim {dim}")
    with pytest.raises(RuntimeError, match="Halving dimension must be even, but dimension 2 is size 5"):
        decompositions.glu(x, 2)
    kinks = torch.tensor([-3.0, 3.0, 0.0, -3 - 1e-12, 3 + 1e-12], dtype=D)
    z = torch.cat([torch.randn(50, dtype=D, generator=_gen(23)) * 4, kinks])
    _close(decompositions.hardsigmoid(z), F.hardsigmoid(z), "hardsigmoid")
    zg = z.clone().requires_grad_(True)
    (ours,) = torch.autograd.grad(decompositions.hardsigmoid(zg).sum(), zg)
    (theirs,) = torch.autograd.grad(F.hardsigmoid(zg).sum(), zg)
    # the same kinks (0 at ±3); torch's backward rounds 1/6 to float32
    torch.testing.assert_close(ours, theirs, rtol=ACTIVATION_KINKS_VS_TORCH, atol=0)
    y = z.clone()
    assert decompositions.hardsigmoid(y, inplace=True) is y and torch.equal(y, F.hardsigmoid(z))


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, math.inf])
def test_distance_decompositions_match_torch(p: float) -> None:
    """Values, shapes and torch's gradient, also at coincident points (distance 0), ties of the ∞-norm and zero
    coordinate differences; every compute mode of cdist, batch broadcasting."""
    a = torch.randn(2, 7, 4, dtype=D, generator=_gen(24))
    b = torch.randn(2, 5, 4, dtype=D, generator=_gen(25))
    b[0, 0] = a[0, 0]  # a coincident pair
    b[1, 1, :2] = a[1, 2, :2]  # zero differences in two coordinates
    b[1, 2] = a[1, 3] + torch.tensor([0.5, -0.5, 0.25, 0.5], dtype=D)  # a tie of |differences|
    modes = ["use_mm_for_euclid_dist_if_necessary", "use_mm_for_euclid_dist", "donot_use_mm_for_euclid_dist"]
    for mode in modes if p == 2 else modes[:1]:
        _same_gradient(lambda a, b: decompositions.cdist(a, b, p, mode), lambda a, b: torch.cdist(a, b, p, mode),
                       [a, b], f"cdist p={p} {mode}")
    _same_gradient(lambda a: decompositions.cdist(a, a, p), lambda a: torch.cdist(a, a, p), [a], f"cdist(a, a) p={p}")
    _same_gradient(lambda a: decompositions.pdist(a, p), lambda a: F.pdist(a, p), [a[1]], f"pdist p={p}")
    _same_gradient(lambda a: decompositions.pdist(a, p), lambda a: F.pdist(a, p),
                   [torch.cat([a[1], a[1, :2]])], f"pdist with repeated rows p={p}")
    many, few = torch.randn(3, 1, 30, 4, dtype=D, generator=_gen(26)), torch.randn(2, 6, 4, dtype=D, generator=_gen(27))
    _close(decompositions.cdist(many, few, p), torch.cdist(many, few, p), f"cdist > 25 rows, broadcast p={p}")
    empty = torch.zeros(0, 4, dtype=D)
    _close(decompositions.cdist(empty, a[0], p), torch.cdist(empty, a[0], p), "cdist of no rows")
    _close(decompositions.pdist(a[0, :1], p), F.pdist(a[0, :1], p), "pdist of one row")


def test_distance_decompositions_raise_torchs_errors() -> None:
    x = torch.randn(3, 2, dtype=D)
    for call, match in [
        (lambda: decompositions.cdist(x, x, -1.0), "non-negative p"),
        (lambda: decompositions.cdist(x, torch.randn(3, 3, dtype=D)), "same number of columns"),
        (lambda: decompositions.cdist(x[0], x), "at least 2D"),
        (lambda: decompositions.cdist(x.long(), x.long()), "floating-point"),
        (lambda: decompositions.pdist(x[None]), "2D"),
        (lambda: decompositions.pdist(x, -1.0), "non-negative p"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            call()
    with pytest.raises(ValueError, match="not a valid value for compute_mode"):
        decompositions.cdist(x, x, compute_mode="x")


def test_embedding_bag_decomposition_matches_torch() -> None:
    """Every mode, offsets with an empty bag, 2-D input, include_last_offset, padding_idx (also negative),
    per-sample weights: values, and torch's first derivatives (weight and per-sample weights)."""
    weight = torch.randn(10, 3, dtype=D, generator=_gen(28))
    ids = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9, 9, 0])
    offsets = torch.tensor([0, 4, 4, 7])
    psw = torch.randn(10, dtype=D, generator=_gen(29))
    original = F.embedding_bag
    with fasthess.autodiff_safe():
        patched = F.embedding_bag
    assert patched is original  # torch.embedding_bag, which F.embedding_bag calls, is the one swapped

    def ours(*args: object, **kwargs: object) -> Tensor:
        with fasthess.autodiff_safe():
            return F.embedding_bag(*args, **kwargs)

    for mode in ("sum", "mean", "max"):
        for padding_idx in (None, 4, -1):
            for last in (False, True):
                kwargs = dict(mode=mode, padding_idx=padding_idx, include_last_offset=last)
                _same_gradient(lambda w: ours(ids, w, offsets, **kwargs), lambda w: original(ids, w, offsets, **kwargs),
                               [weight], f"{kwargs}")
        _same_gradient(lambda w: ours(ids.view(2, 5), w, mode=mode), lambda w: original(ids.view(2, 5), w, mode=mode),
                       [weight], f"2-D {mode}")
    _same_gradient(lambda w, s: ours(ids, w, offsets, mode="sum", per_sample_weights=s, padding_idx=2),
                   lambda w, s: original(ids, w, offsets, mode="sum", per_sample_weights=s, padding_idx=2),
                   [weight, psw], "per-sample weights")
    tied = weight.clone()
    tied[5] = tied[4]  # equal rows in a max bag: torch takes the first
    _same_gradient(lambda w: ours(ids, w, offsets, mode="max"), lambda w: original(ids, w, offsets, mode="max"),
                   [tied], "max with ties")
    with pytest.raises(RuntimeError, match="offsets\\[0\\] has to be 0"):
        ours(ids, weight, torch.tensor([1, 4]))
    with pytest.raises(RuntimeError, match="padding_idx must be within"):
        ours(ids, weight, offsets, padding_idx=10)
    with pytest.raises(RuntimeError, match="per_sample_weights only supported with mode='sum'"):
        with fasthess.autodiff_safe():
            torch.embedding_bag(weight, ids, offsets, False, 1, False, psw, False, None)


def test_embedding_decomposition_keeps_values_and_torchs_gradient() -> None:
    weight = torch.randn(7, 3, dtype=D, generator=_gen(30))
    for padding_idx in (None, 0, -1):
        def ours(w: Tensor, p: int | None = padding_idx) -> Tensor:
            with fasthess.autodiff_safe():
                return F.embedding(WORDS, w, p)

        _same_gradient(ours, lambda w, p=padding_idx: F.embedding(WORDS, w, p), [weight], f"padding_idx {padding_idx}")
    with fasthess.autodiff_safe(), pytest.raises(AssertionError, match="Padding_idx must be within num_embeddings"):
        F.embedding(WORDS, weight, padding_idx=7)
    with fasthess.autodiff_safe():  # the lookup is recorded without padding_idx: nothing left for an engine to distrust
        graph = capture(lambda ps: F.embedding(WORDS, ps[0], padding_idx=0).sum(), [weight])
    (lookup,) = [n for n in graph.nodes if n.func is torch.ops.aten.embedding.default]
    assert lookup.flat_args[2:3] in ([], [-1])


def test_the_swaps_are_undone_and_trap_is_real() -> None:
    """Inside autodiff_safe torch.cdist, torch.pdist, torch.embedding_bag and the F functions are decomposed,
    outside they are torch's; nested forward AD through torch's instance norm is wrong (torch 2.13)."""
    before = torch.cdist, torch.pdist, torch.embedding_bag, F.instance_norm, F.glu, F.hardsigmoid, F.pdist, F.embedding
    with fasthess.autodiff_safe():
        assert torch.cdist is decompositions.cdist and F.pdist is decompositions.pdist is torch.pdist
        assert F.instance_norm is decompositions.instance_norm and F.glu is decompositions.glu
        assert F.hardsigmoid is decompositions.hardsigmoid
    assert (torch.cdist, torch.pdist, torch.embedding_bag, F.instance_norm, F.glu, F.hardsigmoid, F.pdist,
            F.embedding) == before
    x = torch.randn(2, 3, 4, dtype=D, generator=_gen(31))
    e = torch.zeros_like(x)
    e[0, 0, 0] = 1
    f = lambda x: (F.instance_norm(x) ** 3).sum()  # noqa: E731
    nested = torch.func.jvp(lambda p: torch.func.jvp(f, (p,), (e,))[1], (x,), (e,))[1]
    truth = torch.autograd.functional.hessian(f, x).flatten()[0]
    if torch.__version__.startswith("2.13"):
        assert not torch.allclose(nested, truth, rtol=1e-3), "torch fixed nested forward AD of instance norm"
    with fasthess.autodiff_safe():
        safe = torch.func.jvp(lambda p: torch.func.jvp(f, (p,), (e,))[1], (x,), (e,))[1]
    torch.testing.assert_close(safe, truth, rtol=DECOMPOSITION_VS_TORCH[0], atol=DECOMPOSITION_VS_TORCH[1])


def test_scale_grad_by_freq_is_refused_by_name_on_the_fast_engine() -> None:
    case, _ = _model("embedding_scale_grad_by_freq_tied")
    with pytest.raises(fasthess.UnsupportedOpError, match=r"scale_grad_by_freq.*engine='double_backward'") as info:
        fasthess.diag(case.model, case.loss, case.layers, method="exact", engine="tangent_adjoint")
    assert info.value.op == "aten.embedding.default"
    res = fasthess.diag(case.model, case.loss, case.layers, method="exact")
    assert "aten.embedding.default" in res.meta["engine_fallback"]


def _bag_scaled_by_frequency() -> Case:
    return _bag("sum", scale_grad_by_freq=True)()


@pytest.mark.parametrize("engine", ["double_backward", "fwd_rev", "fwd_fwd"])
def test_embedding_bag_scaled_by_frequency_raises_on_generic_engines(engine: str) -> None:
    """``scale_grad_by_freq`` keeps torch's ``embedding_bag`` (see ``decompositions``): no second derivative."""
    case = _bag_scaled_by_frequency()
    with pytest.raises(fasthess.UnsupportedOpError, match="_embedding_bag"):
        fasthess.diag(case.model, case.loss, case.layers, method="exact", engine=engine)


def test_embedding_bag_scaled_by_frequency_raises_fasthess_error_on_the_fast_engine() -> None:
    case = _bag_scaled_by_frequency()
    with pytest.raises(fasthess.UnsupportedOpError, match="_embedding_bag"):
        fasthess.diag(case.model, case.loss, case.layers, method="exact")


def _ops_without_a_rule(case: Case) -> set[str]:
    """Ops the fast engine would send to its generic rule: recorded as it records (decomposed, fused nodes), reached
    by a tangent of a selected parameter (``detach`` stops tangents) and with a floating output."""
    objective = Objective(case.model, [case.loss], fasthess.resolve_parameters(case.model, case.layers))
    with fasthess.autodiff_safe():
        graph = capture(lambda ps: objective(0, ps), objective.primals, fused=fused_nodes.enabled())
    live, missing = set(graph.placeholders), set()
    for node in graph.nodes:
        if node.func is torch.ops.aten.detach.default or not live.intersection(node.refs()):
            continue
        outputs = [i for i in node.out_ids if i is not None]
        if outputs and node.func not in RULES:
            missing.add(str(node.func))
        live.update(outputs)
    return missing


@pytest.mark.parametrize("name", [n for n in MODELS if n not in FALLS_BACK])
def test_the_fast_engine_has_a_rule_for_every_op(name: str) -> None:
    """Fast: no op of these models takes the generic rule (nested forward AD per op and pass)."""
    case, _ = _model(name)
    assert _ops_without_a_rule(case) == set()
