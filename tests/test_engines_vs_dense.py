"""Every method x engine against the dense float64 Hessian on the whole model zoo."""

from __future__ import annotations

import pytest
import torch
from tolerances import ENGINE_VS_DENSE, assert_entries_close
from zoo import ZOO, dense_hessian_diagonals

import fasthess

ENGINES = ["tangent_adjoint", "double_backward", "fwd_rev", "fwd_fwd"]

_dense_cache: dict[str, tuple] = {}


def case_and_dense(name: str):
    if name not in _dense_cache:
        case = ZOO[name]()
        params = fasthess.resolve_parameters(case.model, case.layers)
        _dense_cache[name] = (case, dense_hessian_diagonals(case, list(params)))
    return _dense_cache[name]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("model", list(ZOO))
def test_sampled_matches_dense(model: str, engine: str) -> None:
    case, dense = case_and_dense(model)
    res = fasthess.diag(case.model, case.loss, case.layers, num_samples=12, engine=engine, seed=3)
    assert set(res.layers) == set(dense)
    rtol, atol = ENGINE_VS_DENSE[(torch.float64, engine)]
    for name, layer in res.layers.items():
        assert layer.indices is not None and layer.indices.numel() == min(12, layer.numel)
        assert_entries_close(layer.values, dense[name][layer.indices], rtol, atol, f"{model}/{engine}/{name}")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("model", ["mlp", "mha", "sdpa", "conv_bn", "hf_gpt2"])
def test_exact_matches_dense(model: str, engine: str) -> None:
    case, dense = case_and_dense(model)
    res = fasthess.diag(case.model, case.loss, case.layers, method="exact", engine=engine)
    rtol, atol = ENGINE_VS_DENSE[(torch.float64, engine)]
    for name, layer in res.layers.items():
        assert layer.diagonal().shape == dict(case.model.named_parameters())[name].shape
        assert_entries_close(layer.values, dense[name], rtol, atol, f"{model}/{engine}/{name}")


@pytest.mark.parametrize("engine", ["double_backward", "fwd_rev"])
@pytest.mark.parametrize("model", list(ZOO))
def test_hutchinson_runs_and_is_reasonable(model: str, engine: str) -> None:
    """Few probes: the estimate must lie within 6 standard errors of the truth almost everywhere."""
    case, dense = case_and_dense(model)
    res = fasthess.diag(case.model, case.loss, case.layers, method="hutchinson", num_probes=40, engine=engine)
    for name, layer in res.layers.items():
        z = (layer.values - dense[name]) / layer.stderr.clamp_min(1e-12 * float(dense[name].abs().max()))
        assert float((z.abs() > 6).double().mean()) < 0.02, f"{model}/{name}: {z.abs().max()}"


def test_float32_model_against_float64_truth() -> None:
    case, dense = case_and_dense("encoder")
    model32 = case.model.float()
    try:
        for engine in ENGINES:
            res = fasthess.diag(model32, case.loss, case.layers, num_samples=12, engine=engine, dtype=torch.float64)
            rtol, atol = ENGINE_VS_DENSE[(torch.float64, engine)]
            for name, layer in res.layers.items():
                # computed in float64 from float32-rounded weights: float32-level agreement
                assert_entries_close(layer.values, dense[name][layer.indices], 1e-4, 1e-5, f"dtype=f64/{engine}/{name}")
            # dtype=float32 also casts the (float64) inputs the closure feeds the model
            res32 = fasthess.diag(model32, case.loss, case.layers, num_samples=12, engine=engine, dtype=torch.float32)
            rtol, atol = ENGINE_VS_DENSE[(torch.float32, engine)]
            for name, layer in res32.layers.items():
                assert_entries_close(layer.values, dense[name][layer.indices], rtol, atol, f"f32/{engine}/{name}")
    finally:
        case.model.double()


def test_forward_ad_trap_is_real_and_avoided() -> None:
    """Nested forward AD through the fused F.layer_norm is wrong in torch 2.13; the engines avoid it."""
    from torch.func import jvp

    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def f(x: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.layer_norm(x, (6,), w) ** 3).sum()

    e = torch.zeros_like(x)
    e[0, 0] = 1
    raw = jvp(lambda p: jvp(f, (p,), (e,))[1], (x,), (e,))[1]
    with fasthess.autodiff_safe():
        safe = jvp(lambda p: jvp(f, (p,), (e,))[1], (x,), (e,))[1]
    truth = torch.autograd.functional.hessian(f, x).reshape(24, 24)[0, 0]
    assert torch.allclose(safe, truth, rtol=1e-10)
    if torch.__version__.startswith("2.13"):
        assert not torch.allclose(raw, truth, rtol=1e-3), "torch fixed the layer_norm trap: the decomposition may go"


@pytest.mark.parametrize("engine", ["fwd_fwd", "fwd_rev"])
def test_forward_mode_engines_record_no_outer_graph(engine: str) -> None:
    """With other parameters requiring grad, an outer autograd graph would save every batched tangent
    (measured 4-7x the memory per tangent, benchmarks/engine_memory.py): the passes run under no_grad."""
    from fasthess.engines import ENGINES

    w = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)  # a parameter the function closes over
    f = lambda p: (torch.tanh(w @ p) ** 2).sum()  # noqa: E731
    p = torch.randn(4, dtype=torch.float64)
    eng = ENGINES[engine]()
    entries = eng.diagonal_entries(f, p, torch.arange(4), 4)
    assert entries.grad_fn is None
    torch.testing.assert_close(entries, torch.func.hessian(f)(p).diagonal())
    if eng.supports_hvp:
        (hv,) = eng.hvp(lambda q: f(q), [p], [torch.eye(4, dtype=torch.float64)], 4)
        assert hv.grad_fn is None
        torch.testing.assert_close(hv, torch.func.hessian(f)(p))
