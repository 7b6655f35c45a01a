"""The tangent-adjoint engine beyond the zoo: its op coverage, its fallbacks, its graph capture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import ENGINE_VS_DENSE, assert_entries_close
from torch import nn

import fasthess
from fasthess.capture import CaptureError, capture

RTOL, ATOL = ENGINE_VS_DENSE[(torch.float64, "tangent_adjoint")]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dense_diagonal(model: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """Diagonal of the dense float64 Hessian of ``model(x)`` (a scalar) in parameter ``name``."""
    p0 = dict(model.named_parameters())[name].detach()

    def f(w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, {name: w}, (x,))

    return torch.func.hessian(f)(p0).reshape(p0.numel(), p0.numel()).diagonal()


class Unusual(nn.Module):
    """Ops without hand-written rules (generic jvp-of-jvp fallback), a weight used twice, reductions."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 4, generator=_gen(0), dtype=torch.float64) * 0.5)
        self.v = nn.Parameter(torch.randn(4, generator=_gen(1), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.atan(x @ self.w)  # atan: generic rule
        h = h @ self.w.t() + torch.cumsum(h, -1).sum(-1, keepdim=True)  # w again; cumsum: generic, linear
        h = F.softplus(h) * self.v.sum()
        pooled = F.max_pool1d(h.unsqueeze(1), 2).squeeze(1)  # piecewise linear, has indices output
        return pooled.square().mean() + (h.amax(-1) ** 3).mean() + torch.logsumexp(h, -1).mean()


@pytest.mark.parametrize("name", ["w", "v"])
def test_generic_rules_weight_reuse_and_reductions_match_dense(name: str) -> None:
    model = Unusual()
    x = torch.randn(7, 5, generator=_gen(2), dtype=torch.float64)
    res = fasthess.diag(model, lambda: model(x), [name], method="exact", engine="tangent_adjoint")
    assert res.meta["engine_fallback"] is None
    want = _dense_diagonal(model, x, name)
    assert_entries_close(res[name].values, want, RTOL, ATOL, name)


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        h.mul_(2.0)  # in-place update of a parameter-dependent tensor: cannot be recorded
        return torch.tanh(h).pow(2).sum()


def test_unrecordable_loss_falls_back_and_is_still_exact() -> None:
    torch.manual_seed(0)
    model = InPlace()
    x = torch.randn(6, 4, generator=_gen(3), dtype=torch.float64)
    with pytest.raises(CaptureError, match="in place"):
        capture(lambda ps: torch.func.functional_call(model, {"lin.weight": ps[0]}, (x,)), [model.lin.weight])
    res = fasthess.diag(model, lambda: model(x), ["lin.weight"], method="exact")
    assert res.meta["engine"] == "double_backward"
    assert "cannot record" in res.meta["engine_fallback"]
    want = _dense_diagonal(model, x, "lin.weight")
    assert_entries_close(res["lin.weight"].values, want, RTOL, ATOL, "fallback")


def test_data_dependent_python_branches_are_specialised_like_autograd() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).double()
    x = torch.randn(4, 3, generator=_gen(4), dtype=torch.float64)

    def loss() -> torch.Tensor:
        h = lin(x)
        if bool((x > 0).any()):  # a branch on the data, as Hugging Face mask checks do
            h = torch.sigmoid(h)
        scale = float(h.detach().abs().max())  # .item() on a dependent value: a constant, as for autograd
        return (h * scale).pow(3).sum()

    res = fasthess.diag(lin, loss, ["weight"], method="exact")
    assert res.meta["engine"] == "tangent_adjoint"

    def f(w: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(F.linear(x, w, lin.bias))
        return (h * float(h.detach().abs().max())).pow(3).sum()

    want = torch.func.hessian(f)(lin.weight.detach()).reshape(9, 9).diagonal()
    assert_entries_close(res["weight"].values, want, RTOL, ATOL, "branch")


def test_capture_records_only_parameter_dependent_ops() -> None:
    w = torch.randn(3, 2, generator=_gen(5))
    x = torch.randn(5, 2, generator=_gen(6))
    g = capture(lambda ps: torch.tanh((x * 2 + 1) @ ps[0].t()).sum(), [w])
    assert [str(n.func) for n in g.nodes] == ["aten.t.default", "aten.mm.default", "aten.tanh.default", "aten.sum.default"]
    assert g.downstream(g.placeholders[0]) == [0, 1, 2, 3]


def test_out_of_memory_halves_the_chunk_and_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass that runs out of memory is retried with half the directions: same numbers, no lost work."""
    from fasthess.engines.tangent_adjoint import TangentAdjointEngine

    model = Unusual()
    x = torch.randn(7, 5, generator=_gen(2), dtype=torch.float64)
    want = fasthess.diag(model, lambda: model(x), ["w"], method="exact", chunk_size=3)
    original = TangentAdjointEngine.entries
    sizes = []

    def tight(self, f, params, indices, chunk_size):  # noqa: ANN001
        sizes.append(chunk_size)
        if chunk_size > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, f, params, indices, chunk_size)

    monkeypatch.setattr(TangentAdjointEngine, "entries", tight)
    got = fasthess.diag(model, lambda: model(x), ["w"], method="exact", chunk_size=16)
    assert sizes == [16, 8, 4, 2] and got.meta["chunk_size"] == 2
    torch.testing.assert_close(got["w"].values, want["w"].values, rtol=1e-12, atol=0)
    monkeypatch.setattr(TangentAdjointEngine, "entries", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError()))
    with pytest.raises(fasthess.MemoryRiskError, match="micro-batches"):
        fasthess.diag(model, lambda: model(x), ["w"], method="exact", chunk_size=4)
