"""The checked generic path: ops without a hand-written rule, and the forward-mode engines' audit.

Torch 2.13's nested forward AD is silently wrong for some ops; every engine must give the dense
float64 Hessian (reverse-over-reverse) on them, or refuse with fasthess's own error naming the op.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import ENGINE_VS_DENSE, assert_entries_close
from torch import nn
from zoo import Case, full_hessian

import fasthess
from fasthess.engines import get_engine
from fasthess.engines.generic_second_order import assess, record_generic_ops

D = torch.float64
aten = torch.ops.aten


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _case(head) -> Case:  # noqa: ANN001
    """Linear(3 → 4) on a batch of 5, then ``head`` of its (5, 4) output as the loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4)).double().eval()
    x = torch.randn(5, 3, dtype=D, generator=_gen(1))
    return Case("head", model, lambda: head(model(x)), ["0.weight"])


IDX = torch.tensor([[0, 1, 2, 0], [1, 2, 0, 1], [0, 0, 1, 2], [2, 1, 1, 0], [1, 0, 2, 2]])
EYE = torch.eye(4, dtype=D)
# loss heads through ops torch's nested forward AD gets wrong (silently) or lacks
HEADS = {
    "linalg_solve": lambda y: torch.linalg.solve(EYE + y[:4] / 4, y[1:].T).sin().sum(),
    "slogdet": lambda y: torch.linalg.slogdet(EYE + y[:4] @ y[:4].T / 8)[1],
    "logdet": lambda y: torch.logdet(EYE + y[1:] @ y[1:].T / 8),
    "scatter_reduce_prod": lambda y: torch.ones(3, 4, dtype=D).scatter_reduce(0, IDX, y, "prod").square().sum(),
    "instance_norm": lambda y: F.instance_norm(y.reshape(1, 4, 5)).pow(3).sum(),
    "comparison_mask": lambda y: torch.where(y > 0.1, y.exp(), y.square()).sum(),
    "argmax_mask": lambda y: y.masked_fill(F.one_hot(y.argmax(1), 4).bool(), 0.0).pow(3).sum(),
}


@pytest.mark.parametrize("engine", ["auto", "tangent_adjoint", "double_backward", "fwd_rev", "fwd_fwd"])
@pytest.mark.parametrize("name", sorted(HEADS))
def test_exact_or_refused_naming_the_op(name: str, engine: str) -> None:
    case = _case(HEADS[name])
    want = full_hessian(case, "0.weight").diagonal()
    try:
        res = fasthess.diag(case.model, case.loss, case.layers, method="exact", engine=engine)
    except fasthess.UnsupportedOpError as err:
        assert engine in ("fwd_rev", "fwd_fwd"), f"{engine} refused {name}: {err}"
        assert err.op and err.op.startswith("aten.") and err.op in str(err)
        return
    if engine in ("auto", "tangent_adjoint"):
        assert res.meta["engine"] == "tangent_adjoint", res.meta["engine_fallback"]
    assert_entries_close(res["0.weight"].values, want, *ENGINE_VS_DENSE[(D, res.meta["engine"])], f"{name} {engine}")


def test_meta_reports_the_path_each_generic_op_took() -> None:
    case = _case(HEADS["linalg_solve"])
    res = fasthess.diag(case.model, case.loss, case.layers, method="exact")
    assert res.meta["generic_ops"]["aten._linalg_solve_ex.default"].startswith("reverse: nested forward AD disagrees")


def test_assessment_of_known_ops() -> None:
    """Which path torch gets right, op by op (float64, on the inputs given)."""
    g = _gen(3)
    a, b = torch.randn(3, 3, dtype=D, generator=g) + 3 * torch.eye(3, dtype=D), torch.randn(3, 2, dtype=D, generator=g)
    solve = assess(aten.linalg_solve.default, lambda a, b: (torch.linalg.solve(a, b),), [a, b])
    assert solve.rule_path() == "reverse" and solve.status["forward"].startswith("disagrees")
    assert solve.trusted("forward_over_reverse")
    x = torch.randn(6, dtype=D, generator=g)
    mish = assess(aten.mish.default, lambda x: (F.mish(x),), [x])
    assert mish.rule_path() == "forward" and mish.reference == "double backward"
    glu = assess(aten.glu.default, lambda x: (F.glu(x),), [x])  # no forward AD of its backward
    assert glu.rule_path() == "reverse" and glu.status["forward"].startswith("fails")
    hardsigmoid = assess(aten.hardsigmoid.default, lambda x: (F.hardsigmoid(x),), [x])  # no double backward either
    assert hardsigmoid.reference == "finite differences"
    with pytest.raises(fasthess.UnsupportedOpError, match="torch has no second derivative of aten.hardsigmoid"):
        hardsigmoid.rule_path()


def test_embedding_conventions() -> None:
    """padding_idx: only double backward follows torch's zero gradient row; scale_grad_by_freq: torch's backward
    is not the adjoint of its derivative, so no path reproduces autograd's convention."""
    w, idx = torch.randn(4, 3, dtype=D, generator=_gen(4)), torch.tensor([0, 1, 1, 3])

    def emb(padding_idx: int = -1, freq: bool = False) -> object:
        return assess(aten.embedding.default, lambda w: (aten.embedding(w, idx, padding_idx, freq).square(),), [w])

    assert emb().rule_path() == "forward"
    padded = emb(padding_idx=1)
    assert padded.rule_path() == "reverse" and padded.status["forward"].startswith("disagrees (tangent")
    with pytest.raises(fasthess.UnsupportedOpError, match="not the adjoint of its derivative"):
        emb(freq=True).rule_path()


def test_auto_on_a_gpu_takes_double_backward_where_fwd_rev_cannot_be_trusted() -> None:
    """engine="auto" for Hutchinson on a GPU is fwd_rev with the double-backward loop as fallback (run here on CPU)."""
    x = torch.randn(3, dtype=D, generator=_gen(5))
    f = lambda v: torch.ones(2, dtype=D).scatter_reduce(0, torch.tensor([0, 1, 0]), v, "prod").square().sum()  # noqa: E731
    tangents = [torch.randn(4, 3, dtype=D, generator=_gen(6))]
    with record_generic_ops() as seen:
        (got,) = get_engine("auto", "hutchinson", "cuda").hvp(f, [x], tangents, 4)
    assert "computed by double_backward" in seen["fwd_rev"]
    (want,) = get_engine("double_backward", "hutchinson").hvp(f, [x], tangents, 4)
    torch.testing.assert_close(got, want)
    with pytest.raises(fasthess.UnsupportedOpError, match="aten.scatter_reduce.two"):
        get_engine("fwd_rev", "hutchinson").hvp(f, [x], tangents, 4)


class _Cube(torch.autograd.Function):
    """x³ forward, but a backward that says 3x² · 2/3: autograd follows the backward."""

    @staticmethod
    def forward(x):  # noqa: ANN001, ANN205
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: ANN001, ANN205 - so that torch.func can differentiate it
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        return g * 2 * x * x


def test_custom_autograd_function_follows_its_backward() -> None:
    case = _case(lambda y: _Cube.apply(y).sum())
    want = full_hessian(case, "0.weight").diagonal()  # autograd's convention: the derivative of the backward
    res = fasthess.diag(case.model, case.loss, case.layers, method="exact", engine="tangent_adjoint")
    assert res.meta["engine"] == "double_backward" and "_Cube" in res.meta["engine_fallback"]
    assert_entries_close(res["0.weight"].values, want, *ENGINE_VS_DENSE[(D, "double_backward")], "custom Function")


def test_complex_intermediates_fall_back_and_forward_engines_refuse() -> None:
    case = _case(lambda y: torch.fft.rfft(y, dim=0).abs().square().sum())
    want = full_hessian(case, "0.weight").diagonal()
    res = fasthess.diag(case.model, case.loss, case.layers, method="exact")
    assert res.meta["engine"] == "double_backward" and "complex" in res.meta["engine_fallback"]
    assert_entries_close(res["0.weight"].values, want, *ENGINE_VS_DENSE[(D, "double_backward")], "rfft")
    with pytest.raises(fasthess.UnsupportedOpError, match="cannot be recorded"):
        fasthess.diag(case.model, case.loss, case.layers, method="exact", engine="fwd_fwd")


def test_a_no_grad_block_in_the_loss_is_a_constant_on_every_engine() -> None:
    """Autograd takes what the loss computes under its own ``torch.no_grad()`` as a constant; forward-mode AD would
    differentiate it, so the forward-mode engines refuse such a loss."""

    def head(y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scale = y.norm()
        return (y / scale).pow(3).sum()

    case = _case(head)
    want = full_hessian(case, "0.weight").diagonal()
    for engine in ("tangent_adjoint", "double_backward"):
        res = fasthess.diag(case.model, case.loss, case.layers, method="exact", engine=engine)
        assert res.meta["engine"] == engine
        assert_entries_close(res["0.weight"].values, want, *ENGINE_VS_DENSE[(D, engine)], f"no_grad {engine}")
    for engine in ("fwd_rev", "fwd_fwd"):
        with pytest.raises(fasthess.UnsupportedOpError, match=r"linalg_vector_norm.*torch.no_grad\(\)"):
            fasthess.diag(case.model, case.loss, case.layers, method="exact", engine=engine)

