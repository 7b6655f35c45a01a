"""fasthess.rows / fasthess.block against dense float64 Hessians on the model zoo."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import BLOCK_VS_DENSE, assert_entries_close
from torch.func import functional_call, jacrev
from zoo import ZOO, full_hessian

import fasthess

RTOL, ATOL = BLOCK_VS_DENSE[torch.float64]


@pytest.mark.parametrize("engine", ["double_backward", "fwd_rev"])
@pytest.mark.parametrize("model", ["mlp", "mha", "encoder", "sdpa", "hf_gpt2"])
def test_rows_match_dense_hessian(model: str, engine: str) -> None:
    case = ZOO[model]()
    name = case.layers[0]
    dense = full_hessian(case, name)
    idx = torch.randperm(dense.shape[0], generator=torch.Generator().manual_seed(0))[:7]
    got = fasthess.rows(case.model, case.loss, name, idx, engine=engine)
    assert got.shape == (7, dense.shape[0])
    for r, i in enumerate(idx.tolist()):
        assert_entries_close(got[r], dense[i], RTOL, ATOL, f"{model}/{engine}/{name} row {i}")


def test_block_of_two_parameters_is_the_dense_hessian_of_their_concatenation() -> None:
    """A module stands for weight and bias: the block covers the cross terms, in resolve_parameters order."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.GELU(), torch.nn.Linear(6, 3)).double().eval()
    x = torch.randn(9, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    mod = model[2]
    assert list(fasthess.resolve_parameters(model, mod)) == ["2.weight", "2.bias"]
    w = mod.weight.detach()

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params = {"2.weight": flat[: w.numel()].view_as(w), "2.bias": flat[w.numel():]}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    dense = jacrev(jacrev(loss))(torch.cat([w.reshape(-1), mod.bias.detach()])).detach()
    got = fasthess.block(model, lambda: F.cross_entropy(model(x), y), mod)
    assert got.shape == dense.shape == (6 * 3 + 3, 6 * 3 + 3)
    assert_entries_close(got.reshape(-1), dense.reshape(-1), RTOL, ATOL, "mlp block of layer 2")
    assert float(dense[: w.numel(), w.numel():].abs().max()) > 1e-3  # the cross terms are really there


def test_micro_batches_average_and_dtype_casts() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    whole = fasthess.block(model, lambda: F.cross_entropy(model(x), y), "0.weight", dtype=torch.float64)
    parts = fasthess.block(model, [lambda s=s: F.cross_entropy(model(x[s:s + 4]), y[s:s + 4]) for s in (0, 4)],
                           "0.weight", dtype=torch.float64)
    assert whole.dtype == torch.float64 and model[0].weight.dtype == torch.float32
    assert_entries_close(parts.reshape(-1), whole.reshape(-1), RTOL, ATOL, "micro-batches vs whole batch")
    diag = fasthess.diag(model, lambda: F.cross_entropy(model(x), y), ["0.weight"], method="exact",
                         dtype=torch.float64)["0.weight"].values
    assert_entries_close(whole.diagonal(), diag, RTOL, ATOL, "block diagonal vs fasthess.diag exact")


def test_bad_indices_and_oversized_blocks_raise_with_the_fix() -> None:
    model = torch.nn.Linear(50, 100)
    x = torch.randn(4, 50)
    loss = lambda: model(x).pow(2).mean()  # noqa: E731
    with pytest.raises(IndexError, match=r"\[0, 5000\)"):
        fasthess.rows(model, loss, "weight", [0, 5000])
    with pytest.raises(fasthess.MemoryRiskError, match="fasthess.rows.*raise max_size"):
        fasthess.block(model, loss, "weight")
    assert fasthess.block(model, loss, "bias", max_size=100).shape == (100, 100)
