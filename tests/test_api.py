"""The public API: layer selection, bad input, reproducibility, micro-batches, results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import ZOO, mlp

import fasthess
from fasthess.errors import (
    BackendUnavailableError,
    LayerNotFoundError,
    LossError,
    MemoryRiskError,
    NonFiniteCurvatureError,
    TrainingModeError,
)


# ----------------------------------------------------------------- layer selection
def test_default_layers_are_linear_and_attention_projection_weights() -> None:
    enc = ZOO["encoder"]().model
    names = list(fasthess.default_parameters(enc))
    assert "encoder.layers.0.self_attn.in_proj_weight" in names
    assert "encoder.layers.0.self_attn.out_proj.weight" in names
    assert "encoder.layers.1.linear2.weight" in names
    assert all("norm" not in n and not n.endswith("bias") for n in names)


def test_default_layers_gpt2_conv1d_and_tied_embedding_once() -> None:
    gpt2 = ZOO["hf_gpt2"]().model
    names = list(fasthess.default_parameters(gpt2))
    assert "transformer.h.0.attn.c_attn.weight" in names and "transformer.h.1.mlp.c_fc.weight" in names
    # lm_head is tied to wte: measured once, under its canonical name
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names


def test_layer_specs_names_globs_modules_types_parameters() -> None:
    case = ZOO["hf_bert"]()
    m = case.model
    by_name = fasthess.resolve_parameters(m, "bert.encoder.layer.0.attention.self.query")
    assert list(by_name) == [
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.0.attention.self.query.bias",
    ]
    glob = fasthess.resolve_parameters(m, "bert.encoder.layer.*.attention.self.query")
    assert len(glob) == 4
    module = fasthess.resolve_parameters(m, m.bert.encoder.layer[1].output.dense)
    assert list(module) == ["bert.encoder.layer.1.output.dense.weight", "bert.encoder.layer.1.output.dense.bias"]
    by_type = fasthess.resolve_parameters(m, nn.LayerNorm)
    assert all("LayerNorm" in n for n in by_type) and len(by_type) == 2 * 5
    param = fasthess.resolve_parameters(m, m.classifier.weight)
    assert list(param) == ["classifier.weight"]


def test_unknown_layer_names_closest_matches() -> None:
    m = ZOO["hf_bert"]().model
    with pytest.raises(LayerNotFoundError) as err:
        fasthess.resolve_parameters(m, "bert.encoder.layer.0.atention.self.query")
    assert "bert.encoder.layer.0.attention.self.query" in str(err.value)
    with pytest.raises(LayerNotFoundError, match="not a submodule"):
        fasthess.resolve_parameters(m, nn.Linear(2, 2))
    with pytest.raises(LayerNotFoundError, match="no module of type"):
        fasthess.resolve_parameters(m, nn.Conv2d)


# ----------------------------------------------------------------- bad input
def test_non_scalar_loss() -> None:
    case = mlp()
    with pytest.raises(LossError, match="scalar"):
        fasthess.diag(case.model, lambda: F.cross_entropy(case.model(torch.randn(4, 5).double()), torch.zeros(4, dtype=torch.long), reduction="none"))


def test_loss_not_callable_or_not_a_tensor() -> None:
    case = mlp()
    with pytest.raises(LossError, match="callable"):
        fasthess.diag(case.model, case.loss())
    with pytest.raises(LossError, match="not a tensor"):
        fasthess.diag(case.model, lambda: 1.0)


def test_loss_independent_of_a_layer() -> None:
    case = mlp()
    holder = nn.Module()
    holder.net = case.model
    holder.unused = nn.Linear(2, 2).double()
    with pytest.raises(LossError, match="does not depend on unused.weight"):
        fasthess.diag(holder, case.loss, ["net.0.weight", "unused.weight"])


def test_nan_loss_and_nonfinite_curvature() -> None:
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    holder = nn.Module()
    holder.w = w
    with pytest.raises(LossError, match="nan"):
        fasthess.diag(holder, lambda: holder.w.sum() * float("nan"), ["w"])
    curv = lambda: torch.sqrt(holder.w**2).sum()  # noqa: E731 - finite loss, NaN second derivative at 0
    with pytest.raises(NonFiniteCurvatureError, match="w \\(3 entries\\)") as err:
        fasthess.diag(holder, curv, ["w"], method="exact", engine="double_backward")
    assert err.value.result.meta["nonfinite"] == {"w": 3}  # the computed work comes with the error
    res = fasthess.diag(holder, curv, ["w"], method="exact", engine="double_backward", on_nonfinite="keep")
    assert res.meta["nonfinite"] == {"w": 3}
    with pytest.raises(FloatingPointError):
        res.r_med()


def test_dropout_active_is_refused_with_the_fix() -> None:
    case = ZOO["encoder"]()
    case.model.train()
    with pytest.raises(TrainingModeError, match="model.eval"):
        fasthess.diag(case.model, case.loss)


class _FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.lin(x), p=0.5, training=True)  # no Dropout module to spot


def test_functional_dropout_is_refused() -> None:
    m = _FunctionalDropout().eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(TrainingModeError, match="F.dropout"):
        fasthess.diag(m, lambda: m(x).pow(2).mean())


def test_batchnorm_training_mode_opt_in_never_changes_running_stats() -> None:
    case = ZOO["conv_bn"]()
    case.model.train()
    with pytest.raises(TrainingModeError, match="BatchNorm2d"):
        fasthess.diag(case.model, case.loss)
    before = case.model.bn.running_mean.clone(), case.model.bn.num_batches_tracked.clone()
    res = fasthess.diag(case.model, case.loss, ["fc.weight"], allow_training_mode=True, num_samples=5)
    assert torch.equal(case.model.bn.running_mean, before[0])
    assert torch.equal(case.model.bn.num_batches_tracked, before[1])
    assert torch.isfinite(res["fc.weight"].values).all()


def test_exact_refuses_above_limit_with_the_fix() -> None:
    case = mlp()
    with pytest.raises(MemoryRiskError, match="max_exact_entries"):
        fasthess.diag(case.model, case.loss, method="exact", max_exact_entries=10)


def test_memory_risk_when_one_tangent_cannot_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    import fasthess.objective as objective

    monkeypatch.setattr(objective, "available_memory_bytes", lambda device: 16)
    case = mlp()
    with pytest.raises(MemoryRiskError, match="micro-batches"):
        fasthess.diag(case.model, case.loss, engine="fwd_rev")


def test_unknown_engine_and_wrong_engine_for_method() -> None:
    case = mlp()
    with pytest.raises(BackendUnavailableError, match="unknown engine"):
        fasthess.diag(case.model, case.loss, engine="magic")
    with pytest.raises(BackendUnavailableError, match="hutchinson"):
        fasthess.diag(case.model, case.loss, method="hutchinson", engine="fwd_fwd")
    with pytest.raises(ValueError, match="unknown method"):
        fasthess.diag(case.model, case.loss, method="lanczos")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU backends are available here")
@pytest.mark.parametrize("backend,needs", [("triton", "NVIDIA GPU and triton"), ("cuda", "CUDA torch")])
@pytest.mark.parametrize("method", ["sampled", "hutchinson"])
def test_explicit_gpu_backend_without_a_gpu_names_what_it_needs(method: str, backend: str, needs: str) -> None:
    case = mlp()
    with pytest.raises(BackendUnavailableError, match=f"backend '{backend}' of .* not available here.*{needs}"):
        fasthess.diag(case.model, case.loss, method=method, num_probes=4, backend=backend)


# ----------------------------------------------------------------- reproducibility
def test_same_seed_same_numbers_other_seed_other_coordinates() -> None:
    case = ZOO["encoder"]()
    a = fasthess.diag(case.model, case.loss, num_samples=7, seed=5)
    b = fasthess.diag(case.model, case.loss, num_samples=7, seed=5, engine="double_backward")
    c = fasthess.diag(case.model, case.loss, num_samples=7, seed=6)
    for name in a:
        assert torch.equal(a[name].indices, b[name].indices)
        torch.testing.assert_close(a[name].values, b[name].values, rtol=1e-9, atol=1e-12)
        assert not torch.equal(a[name].indices, c[name].indices)
    # a layer's coordinates do not depend on which other layers are selected
    one = fasthess.diag(case.model, case.loss, ["encoder.layers.1.linear1.weight"], num_samples=7, seed=5)
    assert torch.equal(one["encoder.layers.1.linear1.weight"].indices, a["encoder.layers.1.linear1.weight"].indices)


def test_hutchinson_same_seed_same_probes_across_engines() -> None:
    case = mlp()
    a = fasthess.diag(case.model, case.loss, method="hutchinson", num_probes=6, seed=1, engine="fwd_rev", chunk_size=4)
    b = fasthess.diag(case.model, case.loss, method="hutchinson", num_probes=6, seed=1, engine="double_backward")
    for name in a:
        torch.testing.assert_close(a[name].values, b[name].values, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(a[name].stderr, b[name].stderr, rtol=1e-9, atol=1e-12)


def test_chunk_size_does_not_change_results() -> None:
    case = ZOO["mha"]()
    a = fasthess.diag(case.model, case.loss, num_samples=9, chunk_size=1)
    b = fasthess.diag(case.model, case.loss, num_samples=9, chunk_size=4)
    for name in a:
        torch.testing.assert_close(a[name].values, b[name].values, rtol=1e-10, atol=1e-14)


def test_micro_batches_average_to_the_full_batch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    full = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    halves = [lambda s=s: F.cross_entropy(model(x[s]), y[s]) for s in (slice(0, 4), slice(4, 8))]
    for method in ("sampled", "hutchinson"):
        a = fasthess.diag(model, full, method=method, num_samples=10, num_probes=8)
        b = fasthess.diag(model, halves, method=method, num_samples=10, num_probes=8)
        assert b.meta["num_closures"] == 2
        for name in a:
            torch.testing.assert_close(a[name].values, b[name].values, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------- side effects and results
def test_model_and_torch_are_left_unchanged() -> None:
    case = ZOO["hf_bert"]()
    before = {n: p.detach().clone() for n, p in case.model.named_parameters()}
    originals = (F.layer_norm, F.scaled_dot_product_attention, F.dropout)
    fasthess.diag(case.model, case.loss, num_samples=3, dtype=torch.float32)
    for n, p in case.model.named_parameters():
        assert p.dtype == torch.float64 and torch.equal(p, before[n]) and p.requires_grad
        assert p.grad is None
    assert (F.layer_norm, F.scaled_dot_product_attention, F.dropout) == originals
    assert torch.backends.mha.get_fastpath_enabled()


def test_autodiff_safe_restores_after_an_exception() -> None:
    original = F.layer_norm
    with pytest.raises(RuntimeError, match="boom"):
        with fasthess.autodiff_safe():
            assert F.layer_norm is not original
            raise RuntimeError("boom")
    assert F.layer_norm is original


def test_decompositions_match_the_fused_ops() -> None:
    from fasthess import decompositions as safe

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, generator=g)
    w, b = torch.randn(6, dtype=torch.float64, generator=g), torch.randn(6, dtype=torch.float64, generator=g)
    torch.testing.assert_close(safe.layer_norm(x, (6,), w, b), F.layer_norm(x, (6,), w, b))
    torch.testing.assert_close(safe.rms_norm(x, (5, 6), None, 1e-6), F.rms_norm(x, (5, 6), None, 1e-6))
    rm, rv = torch.randn(4, dtype=torch.float64, generator=g), torch.rand(4, dtype=torch.float64, generator=g) + 0.5
    c4 = torch.randn(4, dtype=torch.float64, generator=g)
    torch.testing.assert_close(safe.batch_norm(x, rm, rv, c4, c4, False), F.batch_norm(x, rm, rv, c4, c4, False))
    torch.testing.assert_close(
        safe.batch_norm(x, None, None, c4, c4, True), F.batch_norm(x, None, None, c4, c4, True)
    )
    torch.testing.assert_close(safe.group_norm(x, 2, c4, c4), F.group_norm(x, 2, c4, c4))
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=g) for _ in range(3))
    mask = torch.rand(5, 5, generator=g) > 0.3
    mask[:, 0] = True
    for kwargs in ({"is_causal": True}, {"attn_mask": mask}, {"attn_mask": mask.double()}, {"scale": 0.3}):
        torch.testing.assert_close(
            safe.scaled_dot_product_attention(q, k, v, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs)
        )
    t = torch.randn_like(x)
    for red in ("mean", "sum", "none"):
        torch.testing.assert_close(safe.mse_loss(x, t, reduction=red), F.mse_loss(x, t, reduction=red))


def test_result_statistics_and_json_round_trip(tmp_path) -> None:
    case = ZOO["mha"]()
    res = fasthess.diag(case.model, case.loss, num_samples=20)
    for name, layer in res.layers.items():
        assert res.r_med()[name] == pytest.approx(fasthess.stats.r_med(layer.values))
        assert res.r_med(stabilized=True)[name] <= res.r_med()[name]
    path = tmp_path / "r.json"
    res.to_json(path)
    back = fasthess.DiagResult.from_json(path)
    assert back.r_med() == res.r_med() and back.meta == res.meta
    for name in res:
        assert torch.equal(back[name].indices, res[name].indices)
    assert "R_med" in res.summary()
    for key in ("method", "engine", "backend", "seed", "seconds", "gradient_seconds", "torch"):
        assert key in res.meta


def test_sampled_covers_small_tensors_entirely() -> None:
    case = mlp()
    res = fasthess.diag(case.model, case.loss, ["2.bias"], num_samples=200)
    assert res["2.bias"].indices.tolist() == list(range(6))
