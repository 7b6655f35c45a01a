"""Every ``torch.nn`` loss module on the default engine against a dense float64 Hessian.

The modules are enumerated from ``torch.nn.modules.loss``, so a loss a new torch adds fails
:func:`test_every_torch_loss_module_has_a_case` until it gets a row in ``CASES``. Each variant
(class weights, ``pos_weight``, label smoothing, ...) runs with ``reduction="mean"`` and ``"sum"``
on a tiny float64 model, Linear → Tanh → Linear; the ground truth is torch's own loss, differentiated
reverse-over-reverse without fasthess's decompositions. A loss either runs on the tangent-adjoint
engine or is listed in ``FALLS_BACK`` (it cannot be recorded; ``engine="auto"`` uses the generic
engine and says why in ``meta["engine_fallback"]``), and is exact either way; the losses torch
cannot differentiate twice are listed in ``NO_SECOND_DERIVATIVE`` and must raise fasthess's
:class:`~fasthess.UnsupportedOpError`, never a bare torch error.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from tolerances import ENGINE_VS_DENSE, assert_entries_close
from torch import Tensor, nn
from zoo import Case, full_hessian

import fasthess
from fasthess import decompositions
from fasthess.engines import second_order_rules

D = torch.float64
N, C = 6, 4  # batch, outputs of the model


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


X, X2 = (torch.randn(N, 3, dtype=D, generator=_gen(s)) for s in (1, 2))
REAL = torch.randn(N, C, dtype=D, generator=_gen(3))
PROB = torch.rand(N, C, dtype=D, generator=_gen(4))  # Bernoulli probabilities (BCE targets)
DIST = torch.softmax(REAL, 1)  # a distribution per row
CLS = torch.randint(0, C, (N,), generator=_gen(5))
SIGN = torch.randint(0, 2, (N,), generator=_gen(6)).to(D) * 2 - 1  # ±1 per row
SIGNS = REAL.sign()  # ±1 per entry
W = torch.rand(C, dtype=D, generator=_gen(7)) + 0.5  # class weights / pos_weight
COUNTS = torch.poisson(PROB * 4, generator=_gen(8))

Args = Callable[[Tensor, Tensor], tuple]  # (net(X), net(X2)) -> the loss module's arguments
# loss name -> variants (label, constructor kwargs, arguments)
CASES: dict[str, list[tuple[str, dict, Args]]] = {
    "L1Loss": [("", {}, lambda o, o2: (o, REAL))],
    "MSELoss": [("", {}, lambda o, o2: (o, REAL))],
    "HuberLoss": [("", {"delta": 0.5}, lambda o, o2: (o, REAL))],  # both branches of the piecewise loss
    "SmoothL1Loss": [("", {"beta": 0.5}, lambda o, o2: (o, REAL))],
    "BCELoss": [
        ("", {}, lambda o, o2: (torch.sigmoid(o), PROB)),
        ("weight", {"weight": W}, lambda o, o2: (torch.sigmoid(o), PROB)),
    ],
    "BCEWithLogitsLoss": [
        ("", {}, lambda o, o2: (o, PROB)),
        ("weight", {"weight": W}, lambda o, o2: (o, PROB)),
        ("pos_weight", {"pos_weight": W}, lambda o, o2: (o, PROB)),
        ("weight+pos_weight", {"weight": W.flip(0), "pos_weight": W}, lambda o, o2: (o, PROB)),
    ],
    "CrossEntropyLoss": [
        ("", {}, lambda o, o2: (o, CLS)),
        ("weight+ignore_index", {"weight": W, "ignore_index": int(CLS[0])}, lambda o, o2: (o, CLS)),
        ("label_smoothing", {"label_smoothing": 0.1}, lambda o, o2: (o, CLS)),
        ("probabilities", {}, lambda o, o2: (o, DIST)),
    ],
    "NLLLoss": [
        ("", {}, lambda o, o2: (F.log_softmax(o, 1), CLS)),
        ("weight", {"weight": W}, lambda o, o2: (F.log_softmax(o, 1), CLS)),
    ],
    "NLLLoss2d": [("", {}, lambda o, o2: (F.log_softmax(o, 1).view(2, 3, C).transpose(1, 2), CLS.view(2, 3)))],
    "KLDivLoss": [
        ("", {}, lambda o, o2: (F.log_softmax(o, 1), DIST)),
        ("log_target", {"log_target": True}, lambda o, o2: (F.log_softmax(o, 1), DIST.log())),
    ],
    "GaussianNLLLoss": [("full", {"full": True}, lambda o, o2: (o[:, :2], REAL[:, :2], F.softplus(o[:, 2:])))],
    "PoissonNLLLoss": [
        ("", {}, lambda o, o2: (o, COUNTS)),
        ("full", {"full": True}, lambda o, o2: (o, COUNTS)),
        ("rate", {"log_input": False}, lambda o, o2: (torch.exp(o), COUNTS)),
    ],
    "CosineEmbeddingLoss": [("", {"margin": -0.5}, lambda o, o2: (o, o2, SIGN))],
    "HingeEmbeddingLoss": [("", {"margin": 1.0}, lambda o, o2: (o, SIGNS))],
    "MarginRankingLoss": [("", {"margin": 0.1}, lambda o, o2: (o[:, 0], o2[:, 0], SIGN))],
    "MultiLabelSoftMarginLoss": [
        ("", {}, lambda o, o2: (o, (PROB > 0.5).to(D))),
        ("weight", {"weight": W}, lambda o, o2: (o, (PROB > 0.5).to(D))),
    ],
    "SoftMarginLoss": [("", {}, lambda o, o2: (o, SIGNS))],
    "TripletMarginLoss": [
        ("", {"margin": 3.0}, lambda o, o2: (o, o2, REAL)),
        ("p1+swap", {"margin": 3.0, "p": 1.0, "swap": True}, lambda o, o2: (o, o2, REAL)),
    ],
    "TripletMarginWithDistanceLoss": [
        ("", {"margin": 3.0}, lambda o, o2: (o, o2, REAL)),
        ("cosine", {"margin": 1.0, "distance_function": lambda a, b: 1 - F.cosine_similarity(a, b)},
         lambda o, o2: (o, o2, REAL)),
    ],
    # holds its own linear layer (C -> 3 classes), differentiated too
    "LinearCrossEntropyLoss": [("", {"in_features": C, "num_classes": 3, "bias": True}, lambda o, o2: (o, CLS % 3))],
    # torch has no second derivative for these: fasthess must say so (test_losses_without_a_second_derivative...)
    "MultiMarginLoss": [("", {}, lambda o, o2: (o, CLS))],
    "MultiLabelMarginLoss": [("", {}, lambda o, o2: (o, torch.tensor([[1, 3, -1, 0]] * N)))],
    "CTCLoss": [("", {}, lambda o, o2: (
        F.log_softmax(o, 1).view(3, 2, C), torch.tensor([[1, 2], [3, 3]]), torch.tensor([3, 3]), torch.tensor([2, 1])
    ))],
}

# The losses torch cannot differentiate twice, and the op that has no second derivative.
NO_SECOND_DERIVATIVE = {
    "MultiMarginLoss": "aten.multi_margin_loss",
    "MultiLabelMarginLoss": "aten.multilabel_margin_loss_forward",
    "CTCLoss": "aten._ctc_loss",
}
# Variants the tangent-adjoint engine cannot record (torch updates a parameter-dependent tensor in
# place), with that op: engine="auto" runs the generic engine. Documented in the README.
FALLS_BACK = {
    "CrossEntropyLoss[label_smoothing]": "aten.masked_fill_.Scalar",
    "GaussianNLLLoss[full]": "aten.clamp_.default",
    "PoissonNLLLoss[full]": "aten.add_.Tensor",
    "CosineEmbeddingLoss": "aten.sqrt_.default",
    "HingeEmbeddingLoss": "aten.fill_.Scalar",
    "MarginRankingLoss": "aten.clamp_min_.default",
    "TripletMarginWithDistanceLoss[cosine]": "aten.clamp_min_.Tensor",  # F.cosine_similarity
}


def _variant(name: str, label: str) -> str:
    return f"{name}[{label}]" if label else name


def _case(name: str, kwargs: dict, args: Args, reduction: str) -> Case:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, C))
    model = nn.ModuleDict({"net": net, "loss": getattr(nn, name)(reduction=reduction, **kwargs)}).to(D).eval()
    layers = ["net.0.weight", "net.2.weight"] + ["loss." + n for n, _ in model["loss"].named_parameters()]
    return Case(name, model, lambda: model["loss"](*args(net(X), net(X2))), layers)


def _runs() -> list:
    out = []
    for name, variants in CASES.items():
        if name in NO_SECOND_DERIVATIVE:
            continue
        for label, kwargs, args in variants:
            for reduction in ("mean", "sum") + (("batchmean",) if name == "KLDivLoss" else ()):
                run_id = f"{_variant(name, label)}-{reduction}"
                out.append(pytest.param(name, label, kwargs, args, reduction, id=run_id))
    return out


def test_every_torch_loss_module_has_a_case() -> None:
    assert set(torch.nn.modules.loss.__all__) == set(CASES)
    assert set(NO_SECOND_DERIVATIVE) <= set(CASES)
    assert {v.split("[")[0] for v in FALLS_BACK} <= set(CASES)


@pytest.mark.parametrize("name, label, kwargs, args, reduction", _runs())
def test_loss_module_is_exact_on_the_default_engine(
    name: str, label: str, kwargs: dict, args: Args, reduction: str
) -> None:
    case = _case(name, kwargs, args, reduction)
    res = fasthess.diag(case.model, case.loss, case.layers, method="exact")
    variant = _variant(name, label)
    if variant in FALLS_BACK:
        assert res.meta["engine"] == "double_backward"
        assert "cannot record" in res.meta["engine_fallback"] and FALLS_BACK[variant] in res.meta["engine_fallback"]
    else:
        assert (res.meta["engine"], res.meta["engine_fallback"]) == ("tangent_adjoint", None)
    rtol, atol = ENGINE_VS_DENSE[(D, res.meta["engine"])]
    for layer in case.layers:
        want = full_hessian(case, layer, decomposed=False).diagonal()  # torch's own loss, reverse-over-reverse
        assert_entries_close(res[layer].values, want, rtol, atol, f"{variant}-{reduction} {layer}")


@pytest.mark.parametrize("name", sorted(NO_SECOND_DERIVATIVE))
@pytest.mark.parametrize("engine", ["auto", "tangent_adjoint", "double_backward"])
def test_losses_without_a_second_derivative_raise_fasthess_error(name: str, engine: str) -> None:
    (_, kwargs, args), = CASES[name]
    case = _case(name, kwargs, args, "mean")
    with pytest.raises(fasthess.UnsupportedOpError) as info:
        fasthess.diag(case.model, case.loss, case.layers, method="exact", engine=engine)
    message = str(info.value)
    assert "double_backward" in message  # the failing engine, or the one to try
    if engine != "double_backward":
        assert NO_SECOND_DERIVATIVE[name] in message
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's error, chained
    assert not isinstance(info.value.__cause__, fasthess.FasthessError)


def test_a_failing_rule_falls_back_under_auto_and_names_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule (or generic rule) that raises: the documented fallback under "auto", fasthess's error otherwise."""
    case = _case("MSELoss", {}, CASES["MSELoss"][0][2], "mean")

    def broken(*args: object) -> None:
        raise RuntimeError("a torch error inside the rule")

    monkeypatch.setitem(second_order_rules.RULES, torch.ops.aten.tanh.default, broken)
    res = fasthess.diag(case.model, case.loss, case.layers, method="exact")
    assert res.meta["engine"] == "double_backward"
    assert "aten.tanh.default" in res.meta["engine_fallback"]
    assert "a torch error inside the rule" in res.meta["engine_fallback"]
    rtol, atol = ENGINE_VS_DENSE[(D, "double_backward")]
    for layer in case.layers:
        assert_entries_close(res[layer].values, full_hessian(case, layer, False).diagonal(), rtol, atol, layer)
    with pytest.raises(fasthess.UnsupportedOpError, match=r"aten\.tanh\.default.*engine='double_backward'") as info:
        fasthess.diag(case.model, case.loss, case.layers, method="exact", engine="tangent_adjoint")
    assert info.value.op == "aten.tanh.default" and isinstance(info.value.__cause__, RuntimeError)


def test_the_fused_bce_op_without_a_rule_takes_double_backward() -> None:
    """``torch.binary_cross_entropy_with_logits`` (not ``F.``: not decomposed): nested forward AD fails on it in
    torch 2.13, so the generic rule takes its double backward, checked by finite differences, on the fast engine."""
    case = _case("MSELoss", {}, CASES["MSELoss"][0][2], "mean")
    net = case.model["net"]
    loss = lambda: torch.binary_cross_entropy_with_logits(net(X), PROB, None, None, 1)  # noqa: E731 - 1: mean
    res = fasthess.diag(case.model, loss, case.layers, method="exact")
    assert res.meta["engine"] == "tangent_adjoint" and res.meta["engine_fallback"] is None
    assert res.meta["generic_ops"]["aten.binary_cross_entropy_with_logits.default"].startswith("reverse: nested forward AD fails")
    want = fasthess.diag(case.model, lambda: nn.BCEWithLogitsLoss()(net(X), PROB), case.layers, method="exact")
    assert want.meta["engine"] == "tangent_adjoint"
    rtol, atol = ENGINE_VS_DENSE[(D, "double_backward")]
    for layer in case.layers:
        assert_entries_close(res[layer].values, want[layer].values, rtol, atol, layer)


def test_loss_decompositions_match_torch() -> None:
    """Values (and gradients where the logits are extreme) of the decomposed losses against torch's fused ops."""
    x = torch.cat([REAL.flatten()[:20] * 3, torch.tensor([0.0, 40.0, -40.0, 800.0, -800.0], dtype=D)]).view(-1, 5)
    y = torch.rand(x.shape, dtype=D, generator=_gen(9))
    w, pw = torch.rand(x.shape, dtype=D, generator=_gen(10)), torch.rand(5, dtype=D, generator=_gen(11)) * 3
    signs = torch.randint(0, 2, x.shape, generator=_gen(12)).to(D) * 2 - 1
    fused = F.binary_cross_entropy_with_logits
    for reduction in ("mean", "sum", "none"):
        for kwargs in ({}, {"weight": w}, {"pos_weight": pw}, {"weight": w[0], "pos_weight": pw}):
            torch.testing.assert_close(
                decompositions.binary_cross_entropy_with_logits(x, y, reduction=reduction, **kwargs),
                fused(x, y, reduction=reduction, **kwargs),
            )
        torch.testing.assert_close(
            decompositions.huber_loss(x, y, reduction, 0.7, w), F.huber_loss(x, y, reduction, 0.7, w)
        )
        torch.testing.assert_close(decompositions.huber_loss(x, y, reduction), F.huber_loss(x, y, reduction))
        # torch's log1p(exp(-y x)) overflows at |x| = 800; the decomposition does not
        torch.testing.assert_close(
            decompositions.soft_margin_loss(x[:4], signs[:4], reduction=reduction),
            F.soft_margin_loss(x[:4], signs[:4], reduction=reduction),
        )
        torch.testing.assert_close(
            decompositions.mse_loss(x, y, reduction=reduction, weight=w),
            F.mse_loss(x, y, reduction=reduction, weight=w),
        )
    torch.testing.assert_close(
        decompositions.binary_cross_entropy_with_logits(x, y, size_average=False), fused(x, y, size_average=False)
    )
    assert torch.isfinite(decompositions.soft_margin_loss(x, signs, reduction="none")).all()
    # first and second derivatives, also at x = 0 and at extreme logits
    d1, d2 = torch.func.jacrev, lambda f: torch.func.jacrev(torch.func.jacrev(f))
    for kwargs in ({}, {"pos_weight": pw}):
        ours = lambda z: decompositions.binary_cross_entropy_with_logits(z, y, **kwargs)  # noqa: E731
        theirs = lambda z: fused(z, y, **kwargs)  # noqa: E731
        torch.testing.assert_close(d1(ours)(x), d1(theirs)(x))
        torch.testing.assert_close(d2(ours)(x), d2(theirs)(x))
    with pytest.raises(ValueError, match="Target size"):
        decompositions.binary_cross_entropy_with_logits(x, y[:1])
    with fasthess.autodiff_safe():
        assert F.binary_cross_entropy_with_logits is decompositions.binary_cross_entropy_with_logits
    assert F.binary_cross_entropy_with_logits is fused
