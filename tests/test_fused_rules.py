"""Fused attention / layer-norm / cross-entropy nodes in the tangent-adjoint engine (fasthess.fused_nodes).

Every kernel backend available here must give the dense float64 Hessian's entries; the
fused nodes must really be recorded (and their kernels called), only while that engine
captures; mask forms the kernels do not take must fall back to the plain decomposition.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from tolerances import ENGINE_VS_DENSE, assert_entries_close
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from zoo import ZOO, Case, dense_hessian_diagonals

import fasthess
from fasthess import fused_nodes
from fasthess.capture import capture
from fasthess.kernels import attention, layer_norm, loss

ATTENTION = "fasthess.attention_fused.default"
LAYER_NORM = "fasthess.layer_norm_fused.default"
CROSS_ENTROPY = "fasthess.cross_entropy_fused.default"
FAMILIES = (attention.family, layer_norm.family, loss.family)
BACKENDS = [b for b in ("torch", "cpp") if all(b in family.available() for family in FAMILIES)]

_dense: dict[str, tuple[Case, dict[str, Tensor]]] = {}


@pytest.fixture(autouse=True)
def fuse_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """The zoo's attention has few keys, which "auto" leaves unfused on a CPU: fuse every supported case."""
    monkeypatch.setenv("FASTHESS_FUSED_NODES", "all")


def _case(name: str) -> tuple[Case, dict[str, Tensor]]:
    if name not in _dense:
        case = ZOO[name]()
        _dense[name] = (case, dense_hessian_diagonals(case, list(fasthess.resolve_parameters(case.model, case.layers))))
    return _dense[name]


def _recorded(case: Case, fused: bool = True) -> collections.Counter:
    """Op name -> count in the graph the tangent-adjoint engine records for all of the case's parameters."""
    params = dict(case.model.named_parameters())
    names = list(params)

    class Run(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = case.model

        def forward(self) -> Tensor:
            return case.loss()

    with fasthess.autodiff_safe():
        graph = capture(
            lambda ps: functional_call(Run(), {"model." + n: p for n, p in zip(names, ps)}, ()),
            [params[n] for n in names],
            fused=fused,
        )
    return collections.Counter(str(n.func) for n in graph.nodes)


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    """Counts calls of every kernel backend the fused rules use, by (family, backend); ``.dtypes``: their dtypes."""
    calls: collections.Counter = collections.Counter()
    calls.dtypes = set()
    for family in FAMILIES:
        for name, (ok, fn) in list(family.backends.items()):

            def counted(*args, _fn=fn, _key=(family.name, name), **kwargs):  # noqa: ANN002, ANN003, ANN202
                calls[_key] += 1
                calls.dtypes.add(args[0].dtype)
                return _fn(*args, **kwargs)

            monkeypatch.setitem(family.backends, name, (ok, counted))
    return calls


# (zoo model, attention, layer-norm, cross-entropy nodes) recorded for the whole model
FUSED_COUNTS = [
    ("mlp", 0, 0, 1), ("mha", 1, 1, 1), ("encoder", 2, 4, 1), ("decoder", 4, 6, 0), ("sdpa", 1, 1, 1),
    ("hf_bert", 2, 5, 1), ("hf_gpt2", 2, 5, 1),
]


@pytest.mark.parametrize(("model", "n_attention", "n_layer_norm", "n_cross_entropy"), FUSED_COUNTS)
def test_fused_nodes_are_recorded_only_when_asked(
    model: str, n_attention: int, n_layer_norm: int, n_cross_entropy: int
) -> None:
    case = ZOO[model]()
    fused = _recorded(case)
    assert (fused[ATTENTION], fused[LAYER_NORM], fused[CROSS_ENTROPY]) == (n_attention, n_layer_norm, n_cross_entropy)
    assert "aten._softmax.default" not in fused and "aten._log_softmax.default" not in fused  # none left as plain ops
    plain = _recorded(case, fused=False)
    assert plain[ATTENTION] == plain[LAYER_NORM] == plain[CROSS_ENTROPY] == 0
    assert (plain["aten._softmax.default"], plain["aten._log_softmax.default"]) == (n_attention, n_cross_entropy)
    with fused_nodes.disabled():
        assert _recorded(case)[ATTENTION] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", ["mha", "encoder", "decoder", "sdpa", "hf_bert", "hf_gpt2"])
def test_sampled_entries_match_dense_for_every_backend(model: str, backend: str, kernel_calls) -> None:  # noqa: ANN001
    case, dense = _case(model)
    res = fasthess.diag(
        case.model, case.loss, case.layers, num_samples=12, engine="tangent_adjoint", seed=3, backend=backend
    )
    assert res.meta["engine_fallback"] is None
    rtol, atol = ENGINE_VS_DENSE[(torch.float64, "tangent_adjoint")]
    for name, layer in res.layers.items():
        assert_entries_close(layer.values, dense[name][layer.indices], rtol, atol, f"{model}/{backend}/{name}")
    # the fused rules ran, on the backend asked for
    assert kernel_calls[("attention_jet2", backend)] > 0 and kernel_calls[("layer_norm_jet2", backend)] > 0
    assert kernel_calls[("cross_entropy_jet2", backend)] > 0 or model == "decoder"
    assert all(b == backend for _, b in kernel_calls)
    # and meta names exactly the kernels that ran (plus the one-hot weight tangents)
    ran = {family for family, _ in kernel_calls}
    assert {f: b for f, b in res.meta["kernels"].items() if f in ran} == {f: backend for f in ran}
    assert set(res.meta["kernels"]) - ran <= {"onehot_weight_tangent"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", ["mha", "sdpa"])
def test_exact_diagonal_matches_dense_for_every_backend(model: str, backend: str) -> None:
    case, dense = _case(model)
    res = fasthess.diag(case.model, case.loss, case.layers, method="exact", engine="tangent_adjoint", backend=backend)
    rtol, atol = ENGINE_VS_DENSE[(torch.float64, "tangent_adjoint")]
    for name, layer in res.layers.items():
        assert_entries_close(layer.values, dense[name], rtol, atol, f"{model}/{backend}/{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_model_with_fused_nodes(backend: str, kernel_calls) -> None:  # noqa: ANN001
    case, dense = _case("encoder")
    model32 = case.model.float()
    try:
        res = fasthess.diag(
            model32, case.loss, case.layers, num_samples=12, engine="tangent_adjoint", dtype=torch.float32,
            backend=backend,
        )
    finally:
        case.model.double()
    rtol, atol = ENGINE_VS_DENSE[(torch.float32, "tangent_adjoint")]
    assert kernel_calls.dtypes == {torch.float32} and kernel_calls[("attention_jet2", backend)] > 0
    for name, layer in res.layers.items():
        assert_entries_close(layer.values, dense[name][layer.indices], rtol, atol, f"f32/{backend}/{name}")


class MaskedAttention(nn.Module):
    """q, k, v from one projection into F.scaled_dot_product_attention with a given mask form."""

    def __init__(self, mask_kind: str, d: int = 6, heads: int = 2, t: int = 5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.heads, self.mask_kind = heads, mask_kind
        self.qkv = nn.Linear(d, 3 * d)
        self.norm = nn.LayerNorm(d)
        self.bias = nn.Parameter(0.3 * torch.randn(heads, t, t, generator=g))  # used by "learned_bias"
        self.fixed_bias = 0.5 * torch.randn(1, heads, t, t, generator=g)
        self.pattern = torch.rand(2, 1, t, t, generator=g) > 0.4  # neither causal nor key padding
        self.pattern[..., 0] = True  # every query sees a key
        pad = torch.zeros(2, t, dtype=torch.bool)
        pad[1, 3:] = True
        self.pad = pad

    def mask(self) -> tuple[Tensor | None, bool]:
        t = self.pad.shape[1]
        future = torch.ones(t, t, dtype=torch.bool).triu(1)
        future = torch.zeros(t, t, dtype=torch.float64).masked_fill(future, float("-inf"))
        padding = torch.zeros(2, 1, 1, t, dtype=torch.float64).masked_fill(self.pad[:, None, None, :], float("-inf"))
        return {
            "none": (None, False),
            "is_causal": (None, True),
            "bool_padding": (~self.pad[:, None, None, :], False),
            "float_padding_min": (padding.clamp_min(torch.finfo(torch.float64).min), False),
            "causal_and_padding": (padding + future, False),
            "bool_pattern": (self.pattern, False),
            "additive_bias": (self.fixed_bias.double(), False),
            "learned_bias": (self.bias, False),
        }[self.mask_kind]

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask, causal = self.mask()
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.norm(a.transpose(1, 2).reshape(b, t, d)).tanh().pow(2).sum()


MASK_FORMS = {  # mask form -> whether the attention kernels take it (a fused node is recorded)
    "none": True,
    "is_causal": True,
    "bool_padding": True,
    "float_padding_min": True,
    "causal_and_padding": True,
    "bool_pattern": False,
    "additive_bias": False,
    "learned_bias": False,
}


@pytest.mark.parametrize("kind", list(MASK_FORMS))
def test_mask_forms_fuse_or_fall_back_and_match_dense(kind: str) -> None:
    torch.manual_seed(0)
    model = MaskedAttention(kind).double().eval()
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    layers = ["qkv.weight", "norm.weight", "norm.bias"] + (["bias"] if kind == "learned_bias" else [])
    case = Case(kind, model, lambda: model(x), layers)
    recorded = _recorded(case)
    assert recorded[ATTENTION] == int(MASK_FORMS[kind]), recorded
    assert recorded["aten._softmax.default"] == int(not MASK_FORMS[kind])
    assert recorded[LAYER_NORM] == 1
    dense = dense_hessian_diagonals(case, layers)
    res = fasthess.diag(model, case.loss, layers, method="exact", engine="tangent_adjoint")
    assert res.meta["engine_fallback"] is None
    rtol, atol = ENGINE_VS_DENSE[(torch.float64, "tangent_adjoint")]
    for name in layers:
        assert_entries_close(res[name].values, dense[name], rtol, atol, f"{kind}/{name}")


CROSS_ENTROPY_FORMS = {  # keyword arguments -> whether the cross-entropy node is fused
    "default": ({}, True),
    "ignore_index": ({"ignore_index": 2}, True),
    # (label smoothing is not fused either; its ATen form updates a dependent tensor in place, so the
    # engine cannot record it and falls back to a generic one, as without fused nodes)
    "class_weights": ({"weight": torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)}, False),
    "sum": ({"reduction": "sum"}, False),
}


@pytest.mark.parametrize("form", list(CROSS_ENTROPY_FORMS))
def test_cross_entropy_forms_fuse_or_fall_back_and_match_dense(form: str) -> None:
    kwargs, fused = CROSS_ENTROPY_FORMS[form]
    case = ZOO["mlp"]()
    x = torch.randn(11, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (11,), generator=torch.Generator().manual_seed(2))
    case = Case(form, case.model, lambda: F.cross_entropy(case.model(x), y, **kwargs), case.layers)
    recorded = _recorded(case)
    assert recorded[CROSS_ENTROPY] == int(fused) and recorded["aten._log_softmax.default"] == int(not fused)
    dense = dense_hessian_diagonals(case, list(fasthess.resolve_parameters(case.model, case.layers)))
    res = fasthess.diag(case.model, case.loss, case.layers, method="exact", engine="tangent_adjoint")
    rtol, atol = ENGINE_VS_DENSE[(torch.float64, "tangent_adjoint")]
    for name, layer in res.layers.items():
        assert_entries_close(layer.values, dense[name], rtol, atol, f"{form}/{name}")


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.seen.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("engine", ["double_backward", "fwd_rev", "fwd_fwd"])
def test_other_engines_never_see_fused_nodes(engine: str) -> None:
    case, dense = _case("sdpa")
    with _Ops() as ops:
        res = fasthess.diag(case.model, case.loss, case.layers, num_samples=4, engine=engine, seed=1)
    assert not any("fused" in op for op in ops.seen)
    assert "aten._softmax.default" in ops.seen
    rtol, atol = ENGINE_VS_DENSE[(torch.float64, engine)]
    for name, layer in res.layers.items():
        assert_entries_close(layer.values, dense[name][layer.indices], rtol, atol, f"{engine}/{name}")


def test_auto_fuses_cpu_attention_from_enough_keys_and_always_layer_norm_and_loss() -> None:
    case = ZOO["sdpa"]()  # 5 keys
    with fused_nodes.using("auto"):
        small = _recorded(case)
    assert (small[ATTENTION], small[LAYER_NORM], small[CROSS_ENTROPY]) == (0, 1, 1)
    q = torch.randn(1, 1, fused_nodes.CPU_MIN_KEYS, 2, dtype=torch.float64)
    w = torch.randn(2, 2, dtype=torch.float64)
    f = lambda ps: F.scaled_dot_product_attention(q @ ps[0], q, q, is_causal=True).sum()  # noqa: E731
    with fasthess.autodiff_safe(), fused_nodes.using("auto"):
        long = capture(f, [w], fused=True)
    assert [str(n.func) for n in long.nodes].count(ATTENTION) == 1
    with pytest.raises(ValueError, match="FASTHESS_FUSED_NODES"), pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTHESS_FUSED_NODES", "yes")
        fused_nodes.mode()


def test_environment_switch_turns_fused_nodes_off(
    monkeypatch: pytest.MonkeyPatch, kernel_calls  # noqa: ANN001
) -> None:
    monkeypatch.setenv("FASTHESS_FUSED_NODES", "0")
    case, dense = _case("sdpa")
    assert _recorded(case)[ATTENTION] == 0
    res = fasthess.diag(case.model, case.loss, case.layers, num_samples=6, engine="tangent_adjoint")
    assert not kernel_calls
    rtol, atol = ENGINE_VS_DENSE[(torch.float64, "tangent_adjoint")]
    for name, layer in res.layers.items():
        assert_entries_close(layer.values, dense[name][layer.indices], rtol, atol, f"off/{name}")


def test_fused_ops_gradients_and_registration() -> None:
    """The hand-written backward formulas (the replay's adjoints) against finite differences; opcheck."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 4, 3, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    pad = torch.tensor([[False] * 4, [False, False, True, True]])
    x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w, b = (torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    y = torch.tensor([0, 4, -100])
    cases = [  # (op, args, opcheck it)
        (fused_nodes.attention_fused, (q, k, v, pad, True, 0.7), True),
        (fused_nodes.attention_fused, (q, k, v, None, False, 0.5), False),
        (fused_nodes.layer_norm_fused, (x, w, b, 1e-5), True),
        (fused_nodes.layer_norm_fused, (x, None, None, 1e-5), False),
        (fused_nodes.cross_entropy_fused, (x, y, -100), True),
    ]
    for op, args, check in cases:
        assert torch.autograd.gradcheck(op, args), op
        if check:
            # schema, fake (meta) function, autograd registration (not the slow AOT-dispatch check)
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    assert torch.allclose(fused_nodes.cross_entropy_fused(x, y, -100), F.cross_entropy(x, y))
    assert torch.allclose(fused_nodes.layer_norm_fused(x, w, b, 1e-5), F.layer_norm(x, (5,), w, b))
    visible = ~pad[:, None, None, :] & torch.ones(4, 4, dtype=torch.bool).tril()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=0.7)
    assert torch.allclose(fused_nodes.attention_fused(q, k, v, pad, True, 0.7), want)


@pytest.mark.parametrize("model", ["hf_bert", "decoder"])
def test_fused_rules_pass_zero_tangents_as_none(model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The zero second-order tangents, and the first-order tangents of attention inputs that do not depend
    on the layer (hf_bert: its query projection; decoder: cross-attention keys/values from the memory),
    reach the kernels as None: no zero tensors are made and the kernels skip their products."""
    absent: dict[str, list[tuple[bool, ...]]] = {"attention_jet2": [], "layer_norm_jet2": []}
    for family, tangents in ((attention.family, slice(3, 9)), (layer_norm.family, slice(3, 5))):
        for name, (ok, fn) in list(family.backends.items()):

            def spy(*args, _fn=fn, _key=family.name, _t=tangents, **kwargs):  # noqa: ANN002, ANN003, ANN202
                absent[_key].append(tuple(a is None for a in args[_t]))
                return _fn(*args, **kwargs)

            monkeypatch.setitem(family.backends, name, (ok, spy))
    case, _ = _case(model)
    fasthess.diag(case.model, case.loss, case.layers, num_samples=4, engine="tangent_adjoint", seed=3)
    calls = absent["attention_jet2"]
    assert calls and all(c[3:] == (True, True, True) for c in calls), calls  # q2 = k2 = v2 = None
    assert any(c[:3] == (False, True, True) for c in calls), calls  # only q depends on the layer: k1 = v1 = None
    assert not any(all(c[:3]) for c in calls)
    assert absent["layer_norm_jet2"] and set(absent["layer_norm_jet2"]) == {(False, True)}  # x2 = None
