"""Engines on a CUDA device against the CPU float64 reference loop (run by benchmarks/gpu_check.sh)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tolerances import ENGINE_VS_DENSE, assert_entries_close
from torch import nn

import fasthess

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


class Classifier(nn.Module):
    """Post-norm transformer encoder with a padding mask and a GELU MLP head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x, src_key_padding_mask=pad).mean(1))


def _case(device: str, dtype: torch.dtype) -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    model = Classifier().to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 9, 16, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # same data in any dtype
    pad = torch.zeros(6, 9, dtype=torch.bool)
    pad[:, 7:] = True
    pad = pad.to(device)
    y = torch.randint(0, 3, (6,), generator=g).to(device)
    return model, lambda: F.cross_entropy(model(x, pad), y)


@pytest.fixture(scope="module")
def reference() -> fasthess.DiagResult:
    model, loss = _case("cpu", torch.float64)
    return fasthess.diag(model, loss, num_samples=40, engine="double_backward", seed=5)


@pytest.mark.parametrize("engine", ["tangent_adjoint", "fwd_rev", "double_backward"])
def test_cuda_float64_matches_cpu_reference(engine: str, reference: fasthess.DiagResult) -> None:
    model, loss = _case("cuda", torch.float64)
    res = fasthess.diag(model, loss, num_samples=40, engine=engine, seed=5)
    rtol, atol = ENGINE_VS_DENSE[(torch.float64, engine)]
    for name, layer in res.layers.items():
        assert torch.equal(layer.indices, reference[name].indices)
        assert_entries_close(layer.values, reference[name].values, rtol, atol, f"cuda/{engine}/{name}")


def test_cuda_float32_auto_within_float32_tolerance(reference: fasthess.DiagResult) -> None:
    model, loss = _case("cuda", torch.float32)
    res = fasthess.diag(model, loss, num_samples=40, seed=5)
    assert res.meta["engine"] == "tangent_adjoint" and res.meta["engine_fallback"] is None
    rtol, atol = ENGINE_VS_DENSE[(torch.float32, "tangent_adjoint")]
    for name, layer in res.layers.items():
        assert_entries_close(layer.values, reference[name].values, rtol, atol, f"cuda-f32/{name}")


def test_cuda_model_is_not_modified() -> None:
    model, loss = _case("cuda", torch.float32)
    before = copy.deepcopy(model.state_dict())
    fasthess.diag(model, loss, num_samples=10)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
