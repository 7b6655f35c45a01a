"""The op-coverage sweep's catalogue: tiny float64 models whose loss passes through one op each.

Every :class:`OpCase` builds a :class:`zoo.Case` in eval mode: ``pre`` (a ``Linear`` from 2
features to the last dim of the op's input, so every selected parameter moves whole slices of
that input), the op or layer under test (``body``), and a readout ``⟨out, c⟩ + ½‖out‖²`` with a
fixed random ``c`` (losses are their own readout). The selected parameters are ``pre``'s and, where
it has any, the layer's own, at most :data:`MAX_ENTRIES` entries in all, so a dense Hessian is
cheap. Inputs are drawn around a *domain* (``POS`` for ``log``, ``UNIT`` for ``logit``, ...).

Kinds: ``layer``, ``activation`` and ``loss`` (``torch.nn`` modules: every module class of the
groups in :data:`MODULE_GROUPS` has a case, see ``tests/test_op_coverage.py``), ``functional``
(torch / ``F.`` ops), ``rule`` (one case per entry of the tangent-adjoint engine's rule table),
``decomposition`` (the ``F.`` functions :func:`fasthess.autodiff_safe` replaces) and ``fused``
(the fused nodes, recorded with ``fasthess.fused_nodes.using("all")``). ``covers`` names the
rule-table ops (``str(op)``) and decompositions (``"F.<name>"``, ``"torch.<name>"``) a case is *the* case for; the
tests check that every table entry is covered and that the case really records / calls it.

The losses are ``tests/test_losses.py``'s variants (``reduction="mean"``). ``slow`` cases (further
variants of an op or layer class that has a default case, and the less central functional ops) run
only in the full sweep (``pytest -m slow``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from test_losses import CASES as LOSS_VARIANTS
from test_losses import _case as loss_case
from torch import Tensor, nn
from zoo import Case

D = torch.float64
KINDS = ("layer", "activation", "loss", "functional", "rule", "decomposition", "fused")
MAX_ENTRIES = 64  # selected parameter entries per case (each costs a dense-Hessian row)

# the groups of torch.nn.modules whose every module class needs a case (Lazy* variants excepted:
# they become the plain class on their first call)
MODULE_GROUPS = (
    "activation", "loss", "normalization", "batchnorm", "instancenorm", "pooling", "padding", "conv", "rnn",
    "sparse", "pixelshuffle", "upsampling", "flatten", "fold", "linear", "dropout", "channelshuffle", "distance",
    "transformer",
)


@dataclass(frozen=True)
class OpCase:
    name: str
    kind: str
    build: Callable[[], Case]
    covers: tuple[str, ...] = ()  # rule-table ops ("aten.mm.default"), decompositions ("F.layer_norm", "torch.cdist")
    fused: str = "auto"  # fasthess.fused_nodes mode the engines run under
    slow: bool = False  # only in the full sweep


CASES: dict[str, OpCase] = {}


def _register(name: str, kind: str, build: Callable[[], Case], **kw) -> None:  # noqa: ANN003
    assert kind in KINDS and name not in CASES, name
    CASES[name] = OpCase(name, kind, build, **kw)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(shape, dtype=D, generator=_gen(seed))


def _rand(*shape: int, seed: int) -> Tensor:
    return torch.rand(shape, dtype=D, generator=_gen(seed))


# ----------------------------------------------------------------------------- models

# Domains of the op's input, (centre, spread): pre(x) ≈ centre + spread · N(0, 1).
REAL, WIDE, POS, UNIT, GT1 = (0.0, 1.5), (0.0, 5.0), (2.0, 0.5), (0.5, 0.12), (3.0, 0.5)

# Shapes of the op's input: features, sequence (N, T, E), 1-d signal (N, C, L), image, volume, matrices.
VEC, SEQ, SIG, IMG, VOL, MAT = (3, 6), (2, 4, 4), (2, 2, 7), (2, 2, 5, 5), (2, 2, 3, 4, 4), (2, 3, 3)


class Fn(nn.Module):
    """A function as a module (functional ops)."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Tensor) -> Tensor:
        return self.fn(*args)


class Call(nn.Module):
    """``fn(self.m, h)``: a module called with extra constant inputs, or with one of its outputs picked."""

    def __init__(self, m: nn.Module, fn: Callable[[nn.Module, Tensor], Tensor]) -> None:
        super().__init__()
        self.m, self.fn = m, fn

    def forward(self, h: Tensor) -> Tensor:
        return self.fn(self.m, h)


class Net(nn.Module):
    """``body(pre(x))``; ``pre``: a Linear over the last dim, or none (integer inputs)."""

    def __init__(self, body: nn.Module, pre: nn.Module | None) -> None:
        super().__init__()
        self.pre, self.body = pre, body

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.pre(x) if self.pre is not None else x)


def _pre(features: int, domain: tuple[float, float]) -> nn.Linear:
    centre, spread = domain
    pre = nn.Linear(2, features)
    with torch.no_grad():
        pre.weight.copy_(_randn(features, 2, seed=11) * (0.6 * spread))
        pre.bias.copy_(centre + _randn(features, seed=12) * (0.3 * spread))
    return pre


def _readout(out: Tensor, c: Tensor) -> Tensor:
    return (out * c).sum() + 0.5 * (out * out).sum()


def _finish(name: str, model: nn.Module, x: Tensor, select: Sequence[str] | None, readout: bool) -> Case:
    model = model.to(D).eval()
    layers = list(select) if select is not None else [n for n, _ in model.named_parameters()]
    if not readout:
        return Case(name, model, lambda: model(x), layers)
    with torch.no_grad():
        c = _randn(*model(x).shape, seed=13)
    return Case(name, model, lambda: _readout(model(x), c), layers)


def _layer(
    name: str,
    make: Callable[[], nn.Module],
    shape: tuple[int, ...] = VEC,
    kind: str = "layer",
    domain: tuple[float, float] = REAL,
    select: Sequence[str] | None = None,
    readout: bool = True,
    **kw,  # noqa: ANN003
) -> None:
    """Register ``make()`` applied to ``pre(x)`` of ``shape`` (``x``: ``shape`` with last dim 2)."""

    def build() -> Case:
        torch.manual_seed(0)
        body = make()
        model = Net(body, _pre(shape[-1], domain))
        return _finish(name, model, _randn(*shape[:-1], 2, seed=1), select, readout)

    _register(name, kind, build, **kw)


def _fn(name: str, fn: Callable[[Tensor], Tensor], shape: tuple[int, ...] = VEC, kind: str = "functional",
        **kw) -> None:  # noqa: ANN003
    _layer(name, lambda: Fn(fn), shape, kind, **kw)


def _ids_layer(name: str, make: Callable[[], nn.Module], ids: Tensor, select: Sequence[str] | None = None,
               **kw) -> None:  # noqa: ANN003
    """Register ``make()`` applied to the integer input ``ids`` (embeddings): its own parameters only."""

    def build() -> Case:
        torch.manual_seed(0)
        return _finish(name, Net(make(), None), ids, select, True)

    _register(name, "layer", build, **kw)


# ----------------------------------------------------------------------------- constants

IDS = torch.tensor([[0, 2, 4], [1, 2, 2]])  # token ids (vocabulary 5), with a repeat and the padding id 0
MASK_VEC = _rand(*VEC, seed=21) > 0.5
IDX_VEC = torch.tensor([[5, 0, 2], [1, 1, 4], [3, 0, 0]])  # (3, 3) column indices into (3, 6), with repeats
IDX_UNIQUE = torch.tensor([[5, 0, 2], [1, 3, 4], [3, 0, 5]])  # without repeats in a row
W64 = _randn(6, 4, seed=22) * 0.5
W46 = _randn(4, 6, seed=23) * 0.5
CLS3 = torch.tensor([1, 0, 5])
EYE3 = torch.eye(3, dtype=D)
RHS = _randn(2, 3, 2, seed=24)
BOUNDARIES = torch.tensor([-1.0, -0.2, 0.3, 1.1], dtype=D)
TABLE5 = _randn(5, seed=25)


# ----------------------------------------------------------------------------- activations: every nn module

# A softmax over another dim than the last is invariant to pre's bias (it shifts every entry along that dim
# equally): the bias's Hessian diagonal is exactly zero, so only pre.weight is selected there.
WEIGHT_ONLY = ["pre.weight"]
BIAS_INVARIANT = {"nn.Softmax[dim=0]", "nn.Softmax2d"}

ACTIVATIONS: list[tuple[str, Callable[[], nn.Module], tuple, tuple]] = [
    # (name, module, input shape, domain)
    ("nn.Threshold", lambda: nn.Threshold(0.1, 20.0), VEC, REAL),
    ("nn.ReLU", nn.ReLU, VEC, REAL),
    ("nn.RReLU", lambda: nn.RReLU(0.1, 0.3), VEC, REAL),  # eval: a fixed slope
    ("nn.Hardtanh", nn.Hardtanh, VEC, REAL),
    ("nn.Hardtanh[min=-0.5,max=2]", lambda: nn.Hardtanh(-0.5, 2.0), VEC, REAL),
    ("nn.ReLU6", nn.ReLU6, VEC, WIDE),
    ("nn.Sigmoid", nn.Sigmoid, VEC, REAL),
    ("nn.Hardsigmoid", nn.Hardsigmoid, VEC, WIDE),
    ("nn.Tanh", nn.Tanh, VEC, REAL),
    ("nn.SiLU", nn.SiLU, VEC, REAL),
    ("nn.Mish", nn.Mish, VEC, REAL),
    ("nn.Hardswish", nn.Hardswish, VEC, WIDE),
    ("nn.ELU", nn.ELU, VEC, REAL),
    ("nn.ELU[alpha=0.5]", lambda: nn.ELU(0.5), VEC, REAL),
    ("nn.CELU", lambda: nn.CELU(0.7), VEC, REAL),
    ("nn.SELU", nn.SELU, VEC, REAL),
    ("nn.GLU", nn.GLU, VEC, REAL),
    ("nn.GELU", nn.GELU, VEC, REAL),
    ("nn.GELU[tanh]", lambda: nn.GELU("tanh"), VEC, REAL),
    ("nn.Hardshrink", lambda: nn.Hardshrink(0.3), VEC, REAL),
    ("nn.LeakyReLU", lambda: nn.LeakyReLU(0.1), VEC, REAL),
    ("nn.LogSigmoid", nn.LogSigmoid, VEC, REAL),
    ("nn.Softplus", nn.Softplus, VEC, REAL),
    ("nn.Softplus[beta=2,threshold=1]", lambda: nn.Softplus(2.0, 1.0), VEC, REAL),  # both branches
    ("nn.Softshrink", lambda: nn.Softshrink(0.3), VEC, REAL),
    ("nn.PReLU", nn.PReLU, VEC, REAL),
    ("nn.PReLU[num_parameters=6]", lambda: nn.PReLU(6), VEC, REAL),
    ("nn.Softsign", nn.Softsign, VEC, REAL),
    ("nn.Tanhshrink", nn.Tanhshrink, VEC, REAL),
    ("nn.Softmin", lambda: nn.Softmin(-1), VEC, REAL),
    ("nn.Softmax", lambda: nn.Softmax(-1), VEC, REAL),
    ("nn.Softmax[dim=0]", lambda: nn.Softmax(0), VEC, REAL),  # BIAS_INVARIANT
    ("nn.Softmax2d", nn.Softmax2d, IMG, REAL),  # BIAS_INVARIANT
    ("nn.LogSoftmax", lambda: nn.LogSoftmax(-1), VEC, REAL),
]
for _name, _make, _shape, _domain in ACTIVATIONS:  # the variants ([...]) in the full sweep only
    _layer(_name, _make, _shape, "activation", _domain, select=WEIGHT_ONLY if _name in BIAS_INVARIANT else None,
           slow="[" in _name)


# ----------------------------------------------------------------------------- losses: every nn loss variant


DEFAULT_LOSS_VARIANTS = {"label_smoothing", "full", "cosine"}  # the others in the full sweep only


def _register_losses() -> None:
    for loss_name, variants in LOSS_VARIANTS.items():
        for label, kwargs, args in variants:
            name = f"nn.{loss_name}[{label}]" if label else f"nn.{loss_name}"
            _register(name, "loss", lambda n=loss_name, k=kwargs, a=args: loss_case(n, k, a, "mean"),
                      slow=bool(label) and label not in DEFAULT_LOSS_VARIANTS)


_register_losses()


# ----------------------------------------------------------------------------- normalization


def _running(bn: nn.Module) -> nn.Module:
    """Give batch / instance norm non-trivial running statistics and affine parameters."""
    c = bn.num_features
    with torch.no_grad():
        if bn.running_mean is not None:
            bn.running_mean.copy_(_randn(c, seed=31) * 0.3)
            bn.running_var.copy_(_rand(c, seed=32) + 0.5)
        if bn.weight is not None:
            bn.weight.copy_(1 + _randn(c, seed=33) * 0.3)
            bn.bias.copy_(_randn(c, seed=34) * 0.3)
    return bn


def _affine(m: nn.Module) -> nn.Module:
    """Non-trivial weight / bias for a norm layer (they start at one and zero)."""
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.add_(_randn(*p.shape, seed=35 + i) * 0.3)
    return m


NORMS: list[tuple] = [
    # (name, module, shape, covers, slow)
    ("nn.BatchNorm1d", lambda: _running(nn.BatchNorm1d(2)), SIG, (), False),
    ("nn.BatchNorm1d[features]", lambda: _running(nn.BatchNorm1d(6)), VEC, (), True),
    ("nn.BatchNorm1d[affine=False]", lambda: _running(nn.BatchNorm1d(2, affine=False)), SIG, (), True),
    ("nn.BatchNorm1d[track_running_stats=False]",  # eval with batch statistics
     lambda: _running(nn.BatchNorm1d(2, track_running_stats=False)), SIG, (), False),
    ("nn.BatchNorm2d", lambda: _running(nn.BatchNorm2d(2)), IMG, (), False),
    ("nn.BatchNorm3d", lambda: _running(nn.BatchNorm3d(2)), VOL, (), False),
    ("nn.SyncBatchNorm", lambda: _running(nn.SyncBatchNorm(2)), IMG, (), False),
    ("nn.InstanceNorm1d", lambda: nn.InstanceNorm1d(2), SIG, (), False),
    ("nn.InstanceNorm1d[affine]", lambda: _running(nn.InstanceNorm1d(2, affine=True)), SIG, (), False),
    ("nn.InstanceNorm2d", lambda: nn.InstanceNorm2d(2), IMG, (), False),
    ("nn.InstanceNorm2d[affine,track_running_stats]",  # eval: running statistics
     lambda: _running(nn.InstanceNorm2d(2, affine=True, track_running_stats=True)), IMG, (), True),
    ("nn.InstanceNorm3d", lambda: nn.InstanceNorm3d(2), VOL, (), False),
    ("nn.LayerNorm", lambda: _affine(nn.LayerNorm(6)), VEC, (), False),
    ("nn.LayerNorm[elementwise_affine=False]", lambda: nn.LayerNorm(6, elementwise_affine=False), VEC, (), True),
    ("nn.LayerNorm[bias=False]", lambda: _affine(nn.LayerNorm(6, bias=False)), VEC, (), True),
    ("nn.LayerNorm[2 dims]", lambda: _affine(nn.LayerNorm((2, 7))), SIG, (), True),
    ("nn.GroupNorm", lambda: _affine(nn.GroupNorm(2, 4)), (2, 4, 5), (), False),
    ("nn.GroupNorm[one group]", lambda: _affine(nn.GroupNorm(1, 2)), IMG, (), True),
    ("nn.GroupNorm[affine=False]", lambda: nn.GroupNorm(2, 2, affine=False), SIG, (), True),
    ("nn.RMSNorm", lambda: _affine(nn.RMSNorm(6)), VEC, (), False),
    ("nn.RMSNorm[eps=1e-6,2 dims]", lambda: _affine(nn.RMSNorm((2, 7), eps=1e-6)), SIG, (), True),
    ("nn.RMSNorm[elementwise_affine=False]", lambda: nn.RMSNorm(6, elementwise_affine=False), VEC, (), True),
    ("nn.LocalResponseNorm", lambda: nn.LocalResponseNorm(2), (2, 4, 5), (), False),
    ("nn.LocalResponseNorm[2d]", lambda: nn.LocalResponseNorm(3, alpha=0.1, k=1.5), IMG, (), True),
    ("nn.CrossMapLRN2d", lambda: nn.CrossMapLRN2d(3, alpha=0.1, k=1.5), (2, 4, 3, 3), (), False),
]
for _name, _make, _shape, _covers, _slow in NORMS:
    _layer(_name, _make, _shape, covers=_covers, slow=_slow)


# ----------------------------------------------------------------------------- pooling

FRACTIONAL_2D = _rand(2, 2, 2, seed=41)  # fixed random samples: a deterministic fractional pool
FRACTIONAL_3D = _rand(2, 2, 3, seed=42)


def _unpool(d: int) -> nn.Module:
    pool = getattr(nn, f"MaxPool{d}d")(2, return_indices=True)
    unpool = getattr(nn, f"MaxUnpool{d}d")(2)
    return Fn(lambda h: unpool(*pool(h), output_size=h.shape[2:]))


POOLS: list[tuple] = [
    # (name, module, shape, slow)
    ("nn.MaxPool1d", lambda: nn.MaxPool1d(2), SIG, False),
    ("nn.MaxPool1d[k3,stride=2,padding=1]", lambda: nn.MaxPool1d(3, 2, 1), SIG, True),
    ("nn.MaxPool1d[dilation=2,ceil_mode]", lambda: nn.MaxPool1d(2, 2, dilation=2, ceil_mode=True), SIG, True),
    ("nn.MaxPool2d", lambda: nn.MaxPool2d(2), IMG, False),
    ("nn.MaxPool2d[k3,stride=2,padding=1]", lambda: nn.MaxPool2d(3, 2, 1), IMG, True),
    ("nn.MaxPool3d", lambda: nn.MaxPool3d(2, padding=(1, 0, 0)), VOL, False),
    ("nn.MaxUnpool1d", lambda: _unpool(1), SIG, False),
    ("nn.MaxUnpool2d", lambda: _unpool(2), IMG, False),
    ("nn.MaxUnpool3d", lambda: _unpool(3), (2, 2, 4, 4, 4), False),
    ("nn.AvgPool1d", lambda: nn.AvgPool1d(2), SIG, False),
    ("nn.AvgPool1d[k3,stride=2,padding=1,count_include_pad=False]",
     lambda: nn.AvgPool1d(3, 2, 1, count_include_pad=False), SIG, True),
    ("nn.AvgPool2d", lambda: nn.AvgPool2d(2), IMG, False),
    ("nn.AvgPool2d[ceil_mode,divisor_override=3]",
     lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, divisor_override=3), IMG, True),
    ("nn.AvgPool3d", lambda: nn.AvgPool3d(2, padding=(1, 0, 0)), VOL, False),
    ("nn.FractionalMaxPool2d", lambda: nn.FractionalMaxPool2d(2, output_size=3, _random_samples=FRACTIONAL_2D),
     IMG, False),
    ("nn.FractionalMaxPool3d",
     lambda: nn.FractionalMaxPool3d((1, 2, 2), output_size=(2, 2, 2), _random_samples=FRACTIONAL_3D), VOL, False),
    ("nn.LPPool1d", lambda: nn.LPPool1d(2, 2), SIG, False),
    ("nn.LPPool1d[norm_type=3]", lambda: nn.LPPool1d(3, 3, stride=2), SIG, True),
    ("nn.LPPool2d", lambda: nn.LPPool2d(2, 2), IMG, False),
    ("nn.LPPool3d", lambda: nn.LPPool3d(2, 2), VOL, False),
    ("nn.AdaptiveMaxPool1d", lambda: nn.AdaptiveMaxPool1d(3), SIG, False),
    ("nn.AdaptiveMaxPool2d", lambda: nn.AdaptiveMaxPool2d((2, 3)), IMG, False),
    ("nn.AdaptiveMaxPool3d", lambda: nn.AdaptiveMaxPool3d(2), VOL, False),
    ("nn.AdaptiveAvgPool1d", lambda: nn.AdaptiveAvgPool1d(3), SIG, False),
    ("nn.AdaptiveAvgPool2d", lambda: nn.AdaptiveAvgPool2d((2, 3)), IMG, False),
    ("nn.AdaptiveAvgPool3d", lambda: nn.AdaptiveAvgPool3d(2), VOL, False),
]
for _name, _make, _shape, _slow in POOLS:
    _layer(_name, _make, _shape, slow=_slow, domain=POS if "norm_type=3" in _name else REAL)


# ----------------------------------------------------------------------------- convolutions (BackPACK's settings)


def _kernel(d: int, k: int) -> tuple[int, ...]:
    return (k,) * d if d < 3 else (1, k, k)  # 3-d: a flat kernel keeps the weight small


CONV_SETTINGS = [  # (label, kwargs without kernel_size, kernel size) for Conv{1,2,3}d(2, ...)
    ("", {"out_channels": 3}, 2),
    ("bias=False", {"out_channels": 3, "bias": False}, 2),
    ("stride=2,padding=1", {"out_channels": 2, "stride": 2, "padding": 1}, 3),
    ("dilation=2", {"out_channels": 2, "dilation": 2}, 2),
    ("groups=2", {"out_channels": 4, "groups": 2}, 2),
    ("padding=same", {"out_channels": 2, "padding": "same"}, 3),
    ("padding_mode=reflect", {"out_channels": 2, "padding": 1, "padding_mode": "reflect"}, 2),
    ("padding_mode=replicate", {"out_channels": 2, "padding": 1, "padding_mode": "replicate"}, 2),
    ("padding_mode=circular", {"out_channels": 2, "padding": 1, "padding_mode": "circular"}, 2),
]
TRANSPOSED_SETTINGS = [
    ("", {"out_channels": 3}, 2),
    ("bias=False", {"out_channels": 3, "bias": False}, 2),
    ("stride=2,padding=1,output_padding=1", {"out_channels": 2, "stride": 2, "padding": 1, "output_padding": 1}, 3),
    ("dilation=2", {"out_channels": 2, "dilation": 2}, 2),
    ("groups=2", {"out_channels": 4, "groups": 2}, 2),
]
for _d, _shape in ((1, SIG), (2, IMG), (3, VOL)):
    for _transposed, _settings in ((False, CONV_SETTINGS), (True, TRANSPOSED_SETTINGS)):
        _cls = f"Conv{'Transpose' if _transposed else ''}{_d}d"
        for _label, _kwargs, _k in _settings:
            _layer(
                f"nn.{_cls}[{_label}]" if _label else f"nn.{_cls}",
                lambda c=_cls, kw=_kwargs, k=_kernel(_d, _k): getattr(nn, c)(2, kernel_size=k, **kw),
                _shape,
                # every setting in 2-d; in 1-d and 3-d the plain layer and circular padding (a fallback)
                slow=bool(_label) and _d != 2 and "circular" not in _label,
            )


# ----------------------------------------------------------------------------- padding modules

for _kind in ("Reflection", "Replication", "Zero", "Constant", "Circular"):
    for _d, _shape, _pad in ((1, SIG, (2, 1)), (2, IMG, (1, 2, 0, 1)), (3, VOL, (1, 0, 0, 1, 1, 0))):
        _args = (_pad, 0.5) if _kind == "Constant" else (_pad,)
        _layer(f"nn.{_kind}Pad{_d}d", lambda c=f"{_kind}Pad{_d}d", a=_args: getattr(nn, c)(*a), _shape)


# ----------------------------------------------------------------------------- embeddings

BAG_IDS = torch.tensor([0, 2, 4, 1, 2, 2, 3])
BAG_OFFSETS = torch.tensor([0, 3, 5])
BAG_WEIGHTS = _rand(7, seed=51) + 0.5

EMBEDDINGS: list[tuple] = [
    # (name, module, forward, slow)
    ("nn.Embedding", lambda: nn.Embedding(5, 4), None, False),
    ("nn.Embedding[padding_idx=0]", lambda: nn.Embedding(5, 4, padding_idx=0), None, False),
    ("nn.Embedding[scale_grad_by_freq]", lambda: nn.Embedding(5, 4, scale_grad_by_freq=True), None, False),
    ("nn.Embedding[max_norm]", lambda: nn.Embedding(5, 4, max_norm=100.0), None, False),  # no row reaches it
    ("nn.Embedding[sparse]", lambda: nn.Embedding(5, 4, sparse=True), None, True),
    ("nn.EmbeddingBag", lambda: nn.EmbeddingBag(5, 4), None, False),  # mean of each row of ids
    ("nn.EmbeddingBag[mode=sum,offsets,per_sample_weights]", lambda: nn.EmbeddingBag(5, 4, mode="sum"),
     lambda m, ids: m(BAG_IDS, BAG_OFFSETS, per_sample_weights=BAG_WEIGHTS), False),
    ("nn.EmbeddingBag[mode=max]", lambda: nn.EmbeddingBag(5, 4, mode="max"), None, True),
    ("nn.EmbeddingBag[padding_idx=0]", lambda: nn.EmbeddingBag(5, 4, padding_idx=0), None, True),
    ("nn.EmbeddingBag[include_last_offset]", lambda: nn.EmbeddingBag(5, 4, include_last_offset=True),
     lambda m, ids: m(BAG_IDS, torch.tensor([0, 3, 7])), True),
]
for _name, _make, _forward, _slow in EMBEDDINGS:
    _ids_layer(_name, _make if _forward is None else lambda mk=_make, fw=_forward: Call(mk(), fw), IDS, slow=_slow,
               covers=("torch.embedding_bag",) if _name == "nn.EmbeddingBag" else ())
_ids_layer("F.embedding", lambda: Call(nn.Embedding(5, 4), lambda m, ids: F.embedding(ids, m.weight)), IDS,
           covers=("F.embedding",))
_ids_layer("F.one_hot @ weight", lambda: Call(nn.Embedding(5, 4), lambda m, ids: F.one_hot(ids, 5).to(D) @ m.weight),
           IDS, slow=True)


# ----------------------------------------------------------------------------- recurrent layers


def _first(m: nn.Module, h: Tensor) -> Tensor:
    return m(h)[0]


def _lstm_state(m: nn.Module, h: Tensor) -> Tensor:
    out, (hn, cn) = m(h)
    return torch.cat([out.flatten(), hn.flatten(), cn.flatten()])


H0 = _randn(1, 2, 3, seed=61) * 0.5
PACK_LENGTHS = torch.tensor([4, 2])
LSTM_SELECT = ["pre.weight", "body.m.weight_ih_l0", "body.m.weight_hh_l0"]

RECURRENT: list[tuple] = [
    # (name, module, forward, shape, select, slow)
    ("nn.RNN", lambda: nn.RNN(4, 3, batch_first=True), _first, SEQ, None, False),
    ("nn.RNN[relu]", lambda: nn.RNN(4, 3, nonlinearity="relu", batch_first=True), _first, SEQ, None, True),
    ("nn.RNN[h0]", lambda: nn.RNN(4, 3, batch_first=True), lambda m, h: m(h, H0)[0], SEQ, None, True),
    ("nn.RNN[2 layers]", lambda: nn.RNN(4, 3, num_layers=2, batch_first=True), _first, SEQ,
     ["pre.weight", "body.m.weight_ih_l0", "body.m.weight_hh_l1", "body.m.bias_ih_l1"], True),
    ("nn.RNN[bidirectional]", lambda: nn.RNN(4, 3, bidirectional=True, batch_first=True), _first, SEQ,
     ["pre.weight", "body.m.weight_ih_l0", "body.m.weight_hh_l0_reverse"], True),
    ("nn.RNN[time-major]", lambda: nn.RNN(4, 3), _first, SEQ, None, True),
    ("nn.LSTM", lambda: nn.LSTM(4, 2, batch_first=True), _lstm_state, SEQ, LSTM_SELECT, False),
    ("nn.LSTM[proj_size=1]", lambda: nn.LSTM(4, 2, proj_size=1, batch_first=True), _first, SEQ,
     ["pre.weight", "body.m.weight_ih_l0", "body.m.weight_hr_l0"], True),
    ("nn.LSTM[bidirectional]", lambda: nn.LSTM(4, 2, bidirectional=True, batch_first=True), _first, SEQ,
     ["pre.weight", "body.m.weight_hh_l0", "body.m.weight_ih_l0_reverse"], True),
    ("nn.LSTM[packed]", lambda: nn.LSTM(4, 2, batch_first=True),
     lambda m, h: m(nn.utils.rnn.pack_padded_sequence(h, PACK_LENGTHS, batch_first=True))[0].data, SEQ, LSTM_SELECT,
     True),
    ("nn.GRU", lambda: nn.GRU(4, 2, batch_first=True), _first, SEQ, None, False),
    ("nn.GRU[2 layers]", lambda: nn.GRU(4, 2, num_layers=2, batch_first=True), _first, SEQ,
     ["pre.weight", "body.m.weight_ih_l0", "body.m.weight_hh_l1"], True),
    ("nn.RNNCell", lambda: nn.RNNCell(6, 3), lambda m, h: m(h), VEC, None, False),
    ("nn.LSTMCell", lambda: nn.LSTMCell(6, 2), lambda m, h: torch.cat(m(h), 1), VEC,
     ["body.m.weight_ih", "body.m.weight_hh"], False),
    ("nn.GRUCell", lambda: nn.GRUCell(6, 2), lambda m, h: m(h), VEC,
     ["pre.weight", "body.m.weight_ih", "body.m.bias_hh"], False),
]
for _name, _make, _forward, _shape, _select, _slow in RECURRENT:
    _layer(_name, lambda mk=_make, fw=_forward: Call(mk(), fw), _shape, select=_select, slow=_slow)


# ----------------------------------------------------------------------------- attention and transformers

CAUSAL4 = nn.Transformer.generate_square_subsequent_mask(4, dtype=D)
PAD = torch.tensor([[False, False, False, True], [False, False, False, False]])
MEMORY = _randn(2, 3, 4, seed=71)
KV = _randn(2, 3, 5, seed=72)


def _mha(**kwargs) -> nn.MultiheadAttention:  # noqa: ANN003
    return nn.MultiheadAttention(4, 2, batch_first=True, **kwargs)


def _heads(h: Tensor) -> Tensor:
    """(N, T, 4) -> (N, 2 heads, T, 2)."""
    return h.view(h.shape[0], h.shape[1], 2, 2).transpose(1, 2)


ATTENTION: list[tuple] = [
    # (name, module, forward, select, slow)
    ("nn.MultiheadAttention", _mha, lambda m, h: m(h, h, h, need_weights=False)[0],
     ["pre.weight", "body.m.in_proj_weight"], False),
    ("nn.MultiheadAttention[need_weights]", _mha, lambda m, h: torch.cat([t.flatten() for t in m(h, h, h)]),
     ["pre.weight", "body.m.in_proj_weight"], True),
    ("nn.MultiheadAttention[key_padding_mask,attn_mask]", _mha,
     lambda m, h: m(h, h, h, key_padding_mask=PAD, attn_mask=CAUSAL4.isinf(), need_weights=False)[0],
     ["pre.weight", "body.m.out_proj.weight", "body.m.in_proj_bias"], False),
    ("nn.MultiheadAttention[is_causal]", _mha,
     lambda m, h: m(h, h, h, attn_mask=CAUSAL4, is_causal=True, need_weights=False)[0],
     ["pre.weight", "body.m.in_proj_weight"], True),
    ("nn.MultiheadAttention[kdim,vdim]", lambda: _mha(kdim=5, vdim=5), lambda m, h: m(h, KV, KV)[0],
     ["pre.weight", "body.m.q_proj_weight", "body.m.k_proj_weight"], False),
    ("nn.MultiheadAttention[add_bias_kv,add_zero_attn]", lambda: _mha(add_bias_kv=True, add_zero_attn=True),
     lambda m, h: m(h, h, h)[0], ["pre.weight", "body.m.bias_k", "body.m.in_proj_weight"], True),
    ("nn.TransformerEncoderLayer", lambda: nn.TransformerEncoderLayer(4, 2, 6, batch_first=True),
     lambda m, h: m(h, src_key_padding_mask=PAD), ["pre.weight", "body.m.self_attn.in_proj_weight"], False),
    ("nn.TransformerEncoderLayer[norm_first,gelu]",
     lambda: nn.TransformerEncoderLayer(4, 2, 6, activation="gelu", norm_first=True, batch_first=True),
     lambda m, h: m(h, src_mask=CAUSAL4, is_causal=True),
     ["pre.weight", "body.m.linear1.weight", "body.m.norm1.weight"], True),
    ("nn.TransformerDecoderLayer", lambda: nn.TransformerDecoderLayer(4, 2, 6, batch_first=True),
     lambda m, h: m(h, MEMORY, tgt_mask=CAUSAL4, tgt_is_causal=True),
     ["pre.weight", "body.m.multihead_attn.in_proj_weight"], False),
    ("nn.TransformerEncoder",
     lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(4, 2, 6, batch_first=True), 2,
                                   enable_nested_tensor=False),
     lambda m, h: m(h, src_key_padding_mask=PAD), ["pre.weight", "body.m.layers.1.linear2.weight"], False),
    ("nn.TransformerDecoder", lambda: nn.TransformerDecoder(nn.TransformerDecoderLayer(4, 2, 6, batch_first=True), 2),
     lambda m, h: m(h, MEMORY), ["pre.weight", "body.m.layers.0.linear1.weight"], False),
    ("nn.Transformer",
     lambda: nn.Transformer(4, 2, 1, 1, 6, batch_first=True),
     lambda m, h: m(MEMORY, h, tgt_mask=CAUSAL4), ["pre.weight", "body.m.decoder.layers.0.linear1.weight"], False),
]
for _name, _make, _forward, _select, _slow in ATTENTION:
    _layer(_name, lambda mk=_make, fw=_forward: Call(mk(), fw), SEQ, select=_select, slow=_slow)


# ----------------------------------------------------------------------------- other layers

LAYERS: list[tuple] = [
    # (name, module, shape, select, slow)
    ("nn.Identity", nn.Identity, VEC, None, False),
    ("nn.Linear", lambda: nn.Linear(6, 3), VEC, None, False),
    ("nn.Linear[bias=False,3-d input]", lambda: nn.Linear(4, 3, bias=False), SEQ, None, False),
    ("nn.Bilinear", lambda: Call(nn.Bilinear(6, 6, 1), lambda m, h: m(h, h.flip(1))), VEC, None, False),
    ("nn.Flatten", nn.Flatten, SIG, None, False),
    ("nn.Unflatten", lambda: nn.Unflatten(1, (2, 3)), VEC, None, False),
    ("nn.PixelShuffle", lambda: nn.PixelShuffle(2), (2, 4, 3, 3), None, False),
    ("nn.PixelUnshuffle", lambda: nn.PixelUnshuffle(2), (2, 1, 4, 4), None, False),
    ("nn.ChannelShuffle", lambda: nn.ChannelShuffle(2), (2, 4, 3, 3), None, False),
    ("nn.Upsample[nearest]", lambda: nn.Upsample(scale_factor=2), SIG, None, False),
    ("nn.Upsample[linear]", lambda: nn.Upsample(scale_factor=2, mode="linear"), SIG, None, False),
    ("nn.Upsample[linear,align_corners]", lambda: nn.Upsample(size=9, mode="linear", align_corners=True), SIG, None,
     True),
    ("nn.Upsample[bilinear]", lambda: nn.Upsample(scale_factor=1.5, mode="bilinear"), IMG, None, False),
    ("nn.Upsample[bicubic]", lambda: nn.Upsample(scale_factor=2, mode="bicubic"), (2, 1, 3, 3), None, True),
    ("nn.Upsample[trilinear]", lambda: nn.Upsample(scale_factor=2, mode="trilinear"), (1, 1, 2, 2, 2), None, True),
    ("nn.Upsample[nearest-exact]", lambda: nn.Upsample(scale_factor=1.5, mode="nearest-exact"), IMG, None, True),
    ("nn.UpsamplingNearest2d", lambda: nn.UpsamplingNearest2d(scale_factor=2), IMG, None, False),
    ("nn.UpsamplingBilinear2d", lambda: nn.UpsamplingBilinear2d(scale_factor=2), IMG, None, False),
    ("nn.Fold", lambda: nn.Fold((3, 3), 2), (2, 8, 4), None, False),
    ("nn.Unfold", lambda: nn.Unfold(2, stride=1), IMG, None, False),
    ("nn.Dropout", lambda: nn.Dropout(0.5), VEC, None, False),  # eval: identity
    ("nn.Dropout1d", lambda: nn.Dropout1d(0.5), SIG, None, False),
    ("nn.Dropout2d", lambda: nn.Dropout2d(0.5), IMG, None, False),
    ("nn.Dropout3d", lambda: nn.Dropout3d(0.5), VOL, None, False),
    ("nn.AlphaDropout", lambda: nn.AlphaDropout(0.5), VEC, None, False),
    ("nn.FeatureAlphaDropout", lambda: nn.FeatureAlphaDropout(0.5), SIG, None, False),
    ("nn.PairwiseDistance", lambda: Fn(lambda h: nn.PairwiseDistance()(h, h.flip(0))), VEC, None, False),
    ("nn.CosineSimilarity", lambda: Fn(lambda h: nn.CosineSimilarity()(h, h.flip(0))), VEC, None, False),
]
for _name, _make, _shape, _select, _slow in LAYERS:
    _layer(_name, _make, _shape, select=_select, slow=_slow)

# ----------------------------------------------------------------------------- functional ops


def _spd(h: Tensor) -> Tensor:
    """A symmetric positive definite matrix from (N, 3, 3)."""
    return h @ h.mT + EYE3


GUMBEL = -torch.log(-torch.log(_rand(*VEC, seed=81)))
GRID = torch.tanh(_randn(2, 3, 3, 2, seed=82))
IMAGE = _randn(2, 1, 4, 4, seed=83)
BILINEAR = _randn(1, 6, 6, seed=84) * 0.3

FUNCTIONAL: list[tuple] = [
    # (name, fn, shape, domain, slow): pointwise unary
    ("torch.abs", torch.abs, VEC, REAL, False),
    ("torch.acos", torch.acos, VEC, UNIT, True),
    ("torch.acosh", torch.acosh, VEC, GT1, True),
    ("torch.asin", torch.asin, VEC, UNIT, True),
    ("torch.asinh", torch.asinh, VEC, REAL, True),
    ("torch.atan", torch.atan, VEC, REAL, False),
    ("torch.atanh", torch.atanh, VEC, UNIT, True),
    ("torch.cos", torch.cos, VEC, REAL, True),
    ("torch.cosh", torch.cosh, VEC, REAL, True),
    ("torch.sin", torch.sin, VEC, REAL, True),
    ("torch.sinh", torch.sinh, VEC, REAL, True),
    ("torch.tan", torch.tan, VEC, UNIT, True),
    ("torch.deg2rad", torch.deg2rad, VEC, REAL, True),
    ("torch.digamma", torch.digamma, VEC, POS, True),
    ("torch.lgamma", torch.lgamma, VEC, POS, False),
    ("torch.special.polygamma[n=1]", lambda h: torch.special.polygamma(1, h), VEC, POS, True),
    ("torch.mvlgamma", lambda h: torch.mvlgamma(h, 2), VEC, POS, True),
    ("torch.erfc", torch.erfc, VEC, REAL, True),
    ("torch.erfinv", torch.erfinv, VEC, UNIT, False),
    ("torch.exp2", torch.exp2, VEC, REAL, True),
    ("torch.expm1", torch.expm1, VEC, REAL, True),
    ("torch.log10", torch.log10, VEC, POS, True),
    ("torch.log1p", torch.log1p, VEC, POS, True),
    ("torch.log2", torch.log2, VEC, POS, True),
    ("torch.logit", torch.logit, VEC, UNIT, False),
    ("torch.logit[eps]", lambda h: torch.logit(h, eps=1e-6), VEC, UNIT, False),
    ("torch.i0", torch.i0, VEC, REAL, True),
    ("torch.special.i0e", torch.special.i0e, VEC, REAL, True),
    ("torch.special.i1", torch.special.i1, VEC, REAL, True),
    ("torch.special.i1e", torch.special.i1e, VEC, REAL, True),
    ("torch.sinc", torch.sinc, VEC, REAL, True),
    ("torch.square", torch.square, VEC, REAL, True),
    ("torch.rad2deg", torch.rad2deg, VEC, REAL, True),
    ("torch.special.entr", torch.special.entr, VEC, POS, True),
    ("torch.special.ndtr", torch.special.ndtr, VEC, REAL, True),
    ("torch.special.ndtri", torch.special.ndtri, VEC, UNIT, True),
    ("torch.special.log_ndtr", torch.special.log_ndtr, VEC, REAL, True),
    ("torch.special.erfcx", torch.special.erfcx, VEC, REAL, True),
    ("torch.special.xlog1py", lambda h: torch.special.xlog1py(h, h * h), VEC, POS, True),
    ("torch.xlogy", lambda h: torch.xlogy(h, h), VEC, POS, True),
    ("torch.nan_to_num", lambda h: torch.nan_to_num(h.log()), VEC, POS, True),
    ("torch.positive", lambda h: torch.positive(h) * h, VEC, REAL, True),
    # zero-derivative and piecewise ops, times a smooth factor so the Hessian is not zero
    ("torch.floor", lambda h: torch.floor(h) * h * h, VEC, WIDE, False),
    ("torch.ceil", lambda h: torch.ceil(h) * h * h, VEC, WIDE, True),
    ("torch.round", lambda h: torch.round(h) * h * h, VEC, WIDE, True),
    ("torch.trunc", lambda h: torch.trunc(h) * h * h, VEC, WIDE, True),
    ("torch.frac", lambda h: torch.frac(h) * h, VEC, WIDE, True),
    ("torch.sign", lambda h: torch.sign(h) * h * h, VEC, REAL, False),
    ("torch.sgn", lambda h: torch.sgn(h) * h * h, VEC, REAL, True),
    ("torch.clamp", lambda h: torch.clamp(h, -0.5, 0.8) ** 3, VEC, REAL, False),
    ("torch.clamp[tensor bounds]", lambda h: torch.clamp(h, MASK_VEC * -0.5, 0.5 + MASK_VEC) ** 3, VEC, REAL, True),
    ("torch.clamp_min", lambda h: torch.clamp_min(h, 0.2) ** 3, VEC, REAL, True),
    ("torch.clamp_max", lambda h: torch.clamp_max(h, 0.2) ** 3, VEC, REAL, True),
    ("torch.clip[one side]", lambda h: torch.clip(h, max=0.3) ** 3, VEC, REAL, True),
    ("F.hardtanh", lambda h: F.hardtanh(h) ** 3, VEC, REAL, True),
    ("F.relu6", lambda h: F.relu6(h) ** 2, VEC, WIDE, True),
    ("F.rrelu[training=False]", lambda h: F.rrelu(h, training=False) ** 2, VEC, REAL, False),
    ("F.softplus", F.softplus, VEC, REAL, True),
    ("F.mish", F.mish, VEC, REAL, False),
    ("F.normalize", F.normalize, VEC, REAL, True),
    ("F.normalize[p=1]", lambda h: F.normalize(h, p=1.0), VEC, REAL, True),
    ("F.softmin", lambda h: F.softmin(h, 1), VEC, REAL, True),
    ("F.gumbel_softmax[tau=1,fixed noise]",  # the noise is drawn outside: gumbel_softmax itself is random
     lambda h: torch.softmax(h + GUMBEL, -1), VEC, REAL, True),
    # binary
    ("torch.atan2", lambda h: torch.atan2(h, h.flip(1) + 2), VEC, REAL, False),
    ("torch.hypot", lambda h: torch.hypot(h, h.flip(1)), VEC, REAL, True),
    ("torch.pow[scalar exponent 2.5]", lambda h: torch.pow(h, 2.5), VEC, POS, False),
    ("torch.pow[tensor exponent]", lambda h: torch.pow(h, h.flip(1)), VEC, POS, False),
    ("torch.pow[scalar base]", lambda h: torch.pow(1.7, h), VEC, REAL, False),
    ("torch.pow[constant tensor exponent]", lambda h: torch.pow(h, MASK_VEC + 1.5), VEC, POS, True),
    ("torch.float_power", lambda h: torch.float_power(h, 3), VEC, REAL, True),
    ("torch.fmod", lambda h: torch.fmod(h, 0.7) * h, VEC, REAL, True),
    ("torch.remainder", lambda h: torch.remainder(h, 0.7) * h, VEC, REAL, True),
    ("torch.copysign", lambda h: torch.copysign(h * h, h.flip(1)), VEC, REAL, True),
    ("torch.maximum", lambda h: torch.maximum(h, h.flip(1)) ** 2, VEC, REAL, False),
    ("torch.minimum", lambda h: torch.minimum(h, h.flip(1)) ** 2, VEC, REAL, True),
    ("torch.fmax", lambda h: torch.fmax(h, h.flip(1)) ** 2, VEC, REAL, True),
    ("torch.fmin", lambda h: torch.fmin(h, h.flip(1)) ** 2, VEC, REAL, True),
    ("torch.logaddexp", lambda h: torch.logaddexp(h, h.flip(1)), VEC, REAL, True),
    ("torch.logaddexp2", lambda h: torch.logaddexp2(h, h.flip(1)), VEC, REAL, True),
    ("torch.lerp[scalar weight]", lambda h: torch.lerp(h, h.flip(1) ** 2, 0.3), VEC, REAL, True),
    ("torch.lerp[tensor weight]", lambda h: torch.lerp(h, h.flip(1) ** 2, torch.sigmoid(h)), VEC, REAL, False),
    ("torch.addcmul", lambda h: torch.addcmul(h, h, h.flip(1), value=0.5), VEC, REAL, True),
    ("torch.addcdiv", lambda h: torch.addcdiv(h, h, h.flip(1), value=0.5), VEC, POS, True),
    ("torch.div[rounding_mode=floor]", lambda h: torch.div(h, 0.3, rounding_mode="floor") * h * h, VEC, REAL, True),
    # masks from comparisons (non-float outputs that depend on the parameters)
    ("torch.where[h > 0]", lambda h: torch.where(h > 0, h * h, -h), VEC, REAL, False),
    ("torch.where[==]", lambda h: torch.where(h == h.amax(1, keepdim=True), h ** 3, h), VEC, REAL, False),
    ("torch.where[isfinite]", lambda h: torch.where(torch.isfinite(h), h * h, 0.0), VEC, REAL, False),
    ("Tensor.masked_fill[h < 0]", lambda h: (h * h).masked_fill(h < 0, 0.0), VEC, REAL, False),
    ("Tensor.masked_fill[argmax one_hot]",
     lambda h: (h ** 3).masked_fill(F.one_hot(h.argmax(1), 6).bool(), 0.0), VEC, REAL, False),
    ("torch.bucketize[as index]", lambda h: TABLE5[torch.bucketize(h, BOUNDARIES)] * h * h, VEC, REAL, False),
    ("torch.searchsorted[mask]", lambda h: torch.where(torch.searchsorted(BOUNDARIES, h) > 2, h ** 3, h), VEC, REAL,
     True),
    ("Tensor[bool mask]", lambda h: h[h > 0] ** 3, VEC, REAL, False),
    ("torch.signbit[mask]", lambda h: torch.where(torch.signbit(h), h * h, h ** 3), VEC, REAL, True),
    ("torch.logical_and[mask]", lambda h: torch.where((h > 0) & (h < 1), h * h, h ** 3), VEC, REAL, True),
    # reductions and scans
    ("torch.prod", lambda h: torch.prod(h), VEC, POS, False),
    ("torch.prod[dim]", lambda h: torch.prod(h, 1), VEC, REAL, True),
    ("torch.nansum", torch.nansum, VEC, REAL, True),
    ("torch.nanmean", lambda h: torch.nanmean(h, 1), VEC, REAL, True),
    ("torch.cumsum", lambda h: torch.cumsum(h, 1), VEC, REAL, True),
    ("torch.cumprod", lambda h: torch.cumprod(h, 1), VEC, REAL, False),
    ("torch.cummax", lambda h: torch.cummax(h, 1).values, VEC, REAL, False),
    ("torch.cummin", lambda h: torch.cummin(h, 1).values, VEC, REAL, True),
    ("torch.logcumsumexp", lambda h: torch.logcumsumexp(h, 1), VEC, REAL, False),
    ("torch.max", torch.max, VEC, REAL, True),
    ("torch.max[dim]", lambda h: torch.max(h, 1).values, VEC, REAL, False),
    ("torch.min[dim]", lambda h: torch.min(h, 1).values, VEC, REAL, True),
    ("torch.amax", lambda h: torch.amax(h, 1), VEC, REAL, True),
    ("torch.amin", lambda h: torch.amin(h, 0), VEC, REAL, True),
    ("torch.aminmax", lambda h: torch.stack(torch.aminmax(h, dim=1)), VEC, REAL, True),
    ("torch.median", torch.median, VEC, REAL, False),
    ("torch.median[dim]", lambda h: torch.median(h, 1).values, VEC, REAL, True),
    ("torch.nanmedian", lambda h: torch.nanmedian(h, 1).values, VEC, REAL, True),
    ("torch.kthvalue", lambda h: torch.kthvalue(h, 2, 1).values, VEC, REAL, False),
    ("torch.mode", lambda h: torch.mode(torch.round(h), 1).values * h[:, 0], VEC, WIDE, True),
    ("torch.sort[values]", lambda h: torch.sort(h, 1).values * W64[:, 0], VEC, REAL, False),
    ("torch.sort[indices as index]", lambda h: h.gather(1, torch.argsort(h, 1)) ** 3, VEC, REAL, True),
    ("torch.topk", lambda h: torch.topk(h, 2, 1).values, VEC, REAL, False),
    ("torch.msort", lambda h: torch.msort(h) * W64[:3, :1], VEC, REAL, True),
    ("torch.std", lambda h: torch.std(h, 1), VEC, REAL, True),
    ("torch.var[correction=0]", lambda h: torch.var(h, 1, correction=0), VEC, REAL, False),
    ("torch.var_mean", lambda h: torch.stack(torch.var_mean(h, 1)), VEC, REAL, True),
    ("torch.std_mean", lambda h: torch.stack(torch.std_mean(h, 0)), VEC, REAL, True),
    ("torch.norm", lambda h: torch.norm(h, dim=1), VEC, REAL, True),
    ("torch.norm[p=1]", lambda h: torch.norm(h, p=1, dim=1), VEC, REAL, True),
    ("torch.norm[p=3]", lambda h: torch.norm(h, p=3, dim=1), VEC, REAL, True),
    ("torch.linalg.vector_norm[ord=inf]", lambda h: torch.linalg.vector_norm(h, float("inf"), 1), VEC, REAL, True),
    ("torch.linalg.vector_norm[ord=0.5]", lambda h: torch.linalg.vector_norm(h, 0.5, 1), VEC, POS, True),
    ("torch.linalg.matrix_norm[fro]", lambda h: torch.linalg.matrix_norm(h), MAT, REAL, True),
    ("torch.linalg.matrix_norm[nuc]", lambda h: torch.linalg.matrix_norm(h, "nuc"), MAT, REAL, False),
    ("torch.linalg.matrix_norm[ord=2]", lambda h: torch.linalg.matrix_norm(h, 2), MAT, REAL, True),
    ("torch.logsumexp", lambda h: torch.logsumexp(h, 1), VEC, REAL, False),
    ("torch.dist", lambda h: torch.dist(h, h.flip(0)), VEC, REAL, True),
    ("torch.renorm", lambda h: torch.renorm(h, 2, 0, 1.0), VEC, REAL, True),
    ("torch.quantile", lambda h: torch.quantile(h, 0.3, 1), VEC, REAL, False),
    ("torch.diff", lambda h: torch.diff(h, 2, 1), VEC, REAL, True),
    ("torch.trace", lambda h: torch.trace(h[0]), MAT, REAL, True),
    ("torch.trapezoid", lambda h: torch.trapezoid(h ** 2, dim=1), VEC, REAL, True),
    ("torch.cumulative_trapezoid", lambda h: torch.cumulative_trapezoid(h ** 2, dim=1), VEC, REAL, True),
    # data movement and indexing
    ("Tensor.repeat", lambda h: h.repeat(2, 1), VEC, REAL, True),
    ("torch.repeat_interleave", lambda h: torch.repeat_interleave(h, 2, 1), VEC, REAL, True),
    ("torch.tile", lambda h: torch.tile(h, (1, 2)), VEC, REAL, True),
    ("torch.flip", lambda h: torch.flip(h, (0, 1)) * h, VEC, REAL, True),
    ("torch.roll", lambda h: torch.roll(h, 2, 1) * h, VEC, REAL, True),
    ("torch.rot90", lambda h: torch.rot90(h, 1, (1, 2)) * h, MAT, REAL, True),
    ("torch.movedim", lambda h: torch.movedim(h, 0, 2), MAT, REAL, True),
    ("torch.diagonal", lambda h: torch.diagonal(h, 0, 1, 2) ** 3, MAT, REAL, True),
    ("torch.diag_embed", lambda h: torch.diag_embed(h) @ h.unsqueeze(-1), VEC, REAL, True),
    ("torch.take", lambda h: torch.take(h, IDX_VEC) ** 3, VEC, REAL, True),
    ("torch.take_along_dim", lambda h: torch.take_along_dim(h, IDX_VEC, 1) ** 3, VEC, REAL, True),
    ("Tensor[int index, step slice]", lambda h: h[[2, 0, 0]][:, ::2] ** 3, VEC, REAL, False),
    ("Tensor[two index tensors]", lambda h: h[torch.tensor([2, 0, 2]), IDX_VEC[1]] ** 3, VEC, REAL, True),
    ("torch.masked_select", lambda h: torch.masked_select(h, MASK_VEC) ** 3, VEC, REAL, False),
    ("torch.scatter[src]", lambda h: torch.zeros(3, 6, dtype=D).scatter(1, IDX_UNIQUE, h[:, :3] ** 2) * h,
     VEC, REAL, False),
    ("torch.scatter[into h]", lambda h: h.scatter(1, IDX_VEC, 0.5) ** 3, VEC, REAL, True),
    ("torch.scatter_add", lambda h: (h * h).scatter_add(1, IDX_VEC, h[:, :3]) ** 2, VEC, REAL, False),
    ("torch.scatter_reduce[sum]", lambda h: h.scatter_reduce(1, IDX_VEC, h[:, 3:], "sum") ** 2, VEC, REAL, True),
    ("torch.scatter_reduce[prod]", lambda h: h.scatter_reduce(1, IDX_VEC, h[:, 3:], "prod"), VEC, REAL, False),
    ("torch.scatter_reduce[prod,include_self=False]",
     lambda h: h.scatter_reduce(1, IDX_VEC, h[:, 3:] ** 2, "prod", include_self=False), VEC, REAL, True),
    ("torch.scatter_reduce[amax]", lambda h: h.scatter_reduce(1, IDX_VEC, h[:, 3:] * 2, "amax") ** 2, VEC, REAL,
     False),
    ("torch.scatter_reduce[amin]", lambda h: h.scatter_reduce(1, IDX_VEC, h[:, 3:] * 2, "amin") ** 2, VEC, REAL,
     True),
    ("torch.scatter_reduce[mean]", lambda h: h.scatter_reduce(1, IDX_VEC, h[:, 3:] ** 2, "mean") ** 2, VEC, REAL,
     False),
    ("torch.index_add", lambda h: (h * h).index_add(1, torch.tensor([0, 0, 3]), h[:, 3:]) ** 2, VEC, REAL, True),
    ("torch.index_copy", lambda h: (h * h).index_copy(1, torch.tensor([5, 0, 3]), h[:, :3] ** 3), VEC, REAL, True),
    ("torch.index_fill", lambda h: h.index_fill(1, torch.tensor([1, 4]), 0.5) ** 3, VEC, REAL, True),
    ("torch.index_put[accumulate]",
     lambda h: (h * h).index_put((torch.tensor([0, 0, 2]), torch.tensor([1, 1, 5])), h[0, :3], accumulate=True) ** 2,
     VEC, REAL, False),
    ("torch.index_put", lambda h: (h * h).index_put((torch.tensor([0, 2]), torch.tensor([1, 5])), h[1, :2]) ** 2,
     VEC, REAL, True),
    ("torch.masked_scatter", lambda h: (h * h).masked_scatter(MASK_VEC, h.flip(0) ** 3), VEC, REAL, True),
    ("Tensor.unfold", lambda h: h.unfold(1, 3, 2) ** 2, VEC, REAL, True),
    ("torch.as_strided", lambda h: torch.as_strided(h, (3, 2), (6, 2), 1) ** 3, VEC, REAL, True),
    ("torch.hstack", lambda h: torch.hstack([h, h ** 2]), VEC, REAL, True),
    ("torch.tensor_split", lambda h: torch.tensor_split(h, [1, 4], 1)[1] ** 3, VEC, REAL, True),
    # products
    ("torch.matmul[3-d @ 2-d]", lambda h: h @ W46, SEQ, REAL, False),
    ("torch.matmul[vectors]", lambda h: h[0] @ h[1], VEC, REAL, True),
    ("torch.mv", lambda h: torch.mv(h, h[0]), VEC, REAL, True),
    ("torch.dot", lambda h: torch.dot(h[0], h[1]), VEC, REAL, True),
    ("torch.vdot", lambda h: torch.vdot(h[0], h[2]), VEC, REAL, True),
    ("torch.inner", lambda h: torch.inner(h, h), VEC, REAL, True),
    ("torch.outer", lambda h: torch.outer(h[0], h[1]), VEC, REAL, True),
    ("torch.addmv", lambda h: torch.addmv(h[0, :3], h[:, :3], h[1, :3], beta=0.5, alpha=2.0), VEC, REAL, True),
    ("torch.addr", lambda h: torch.addr(h[:, :3], h[0, :3], h[1, :3], alpha=2.0), VEC, REAL, True),
    ("torch.addmm[alpha,beta]", lambda h: torch.addmm(h[:, :3], h, W64[:, :3], beta=0.5, alpha=2.0), VEC, REAL,
     True),
    ("torch.baddbmm", lambda h: torch.baddbmm(h, h, h.mT, alpha=0.5), MAT, REAL, True),
    ("torch.addbmm", lambda h: torch.addbmm(h[0], h, h), MAT, REAL, True),
    ("torch.einsum[bij,bjk]", lambda h: torch.einsum("bij,bjk->bik", h, h), MAT, REAL, False),
    ("torch.einsum[trace,outer]", lambda h: torch.einsum("bii,bj->bj", h, h[:, 0]), MAT, REAL, True),
    ("torch.tensordot", lambda h: torch.tensordot(h, h, ([1, 2], [2, 1])), MAT, REAL, True),
    ("torch.kron", lambda h: torch.kron(h[0], h[1]), MAT, REAL, True),
    ("torch.linalg.multi_dot", lambda h: torch.linalg.multi_dot([h[0], h[1], h[0]]), MAT, REAL, True),
    ("torch.linalg.cross", lambda h: torch.linalg.cross(h[0], h[1]), MAT, REAL, True),
    ("F.linear[weight from h]", lambda h: F.linear(h, h[0], h[1, 0]), SEQ, REAL, True),
    ("F.bilinear", lambda h: F.bilinear(h, h.flip(0), BILINEAR), VEC, REAL, True),
    ("torch.cdist[p=1]", lambda h: torch.cdist(h, h.flip(1), p=1.0), MAT, REAL, True),
    ("F.cosine_similarity", lambda h: F.cosine_similarity(h, h.flip(0)), VEC, REAL, False),
    ("F.pairwise_distance", lambda h: F.pairwise_distance(h, h.flip(0)), VEC, REAL, True),
    # linear algebra
    ("torch.linalg.det", lambda h: torch.linalg.det(h + 2 * EYE3), MAT, REAL, False),
    ("torch.linalg.slogdet", lambda h: torch.linalg.slogdet(h + 2 * EYE3).logabsdet, MAT, REAL, False),
    ("torch.logdet", lambda h: torch.logdet(_spd(h)), MAT, REAL, False),
    ("torch.linalg.solve", lambda h: torch.linalg.solve(h + 2 * EYE3, RHS), MAT, REAL, False),
    ("torch.linalg.solve[constant matrix]", lambda h: torch.linalg.solve(RHS[:, :, :1] + 2 * EYE3, h), MAT, REAL,
     True),
    ("torch.linalg.inv", lambda h: torch.linalg.inv(h + 2 * EYE3), MAT, REAL, False),
    ("torch.linalg.cholesky", lambda h: torch.linalg.cholesky(_spd(h)), MAT, REAL, False),
    ("torch.cholesky_solve", lambda h: torch.cholesky_solve(RHS, torch.linalg.cholesky(_spd(h))), MAT, REAL, True),
    ("torch.linalg.solve_triangular", lambda h: torch.linalg.solve_triangular(h.triu() + 2 * EYE3, RHS, upper=True),
     MAT, REAL, True),
    ("torch.linalg.eigh[eigenvalues]", lambda h: torch.linalg.eigh(_spd(h)).eigenvalues, MAT, REAL, False),
    ("torch.linalg.eigvalsh", lambda h: torch.linalg.eigvalsh(_spd(h)), MAT, REAL, True),
    ("torch.linalg.svdvals", torch.linalg.svdvals, MAT, REAL, False),
    ("torch.linalg.qr[R]", lambda h: torch.linalg.qr(h + 2 * EYE3).R, MAT, REAL, True),
    ("torch.linalg.matrix_exp", lambda h: torch.linalg.matrix_exp(h * 0.5), MAT, REAL, True),
    ("torch.linalg.pinv", lambda h: torch.linalg.pinv(h + 2 * EYE3), MAT, REAL, True),
    ("torch.linalg.matrix_power[-2]", lambda h: torch.linalg.matrix_power(h + 2 * EYE3, -2), MAT, REAL, True),
    ("torch.linalg.lstsq", lambda h: torch.linalg.lstsq(h + 2 * EYE3, RHS).solution, MAT, REAL, True),
    # complex intermediates and FFTs
    ("torch.complex", lambda h: torch.complex(h, h.flip(1)).abs(), VEC, REAL, False),
    ("torch.view_as_complex", lambda h: torch.view_as_complex(h.view(3, 3, 2)).abs() ** 2, VEC, REAL, True),
    ("torch.polar", lambda h: torch.view_as_real(torch.polar(h.abs(), h.flip(1))), VEC, REAL, True),
    ("torch.fft.rfft", lambda h: torch.fft.rfft(h).abs(), VEC, REAL, False),
    ("torch.fft.fft[real part]", lambda h: torch.fft.fft(h).real ** 2, VEC, REAL, True),
    ("torch.fft.irfft", lambda h: torch.fft.irfft(torch.fft.rfft(h) * h[:, :4]), VEC, REAL, True),
    ("torch.fft.fft2", lambda h: torch.view_as_real(torch.fft.fft2(h)), MAT, REAL, True),
    # sampling grids and resizing
    ("F.grid_sample", lambda h: F.grid_sample(h, GRID, align_corners=False), IMG, REAL, False),
    ("F.grid_sample[grid from h]", lambda h: F.grid_sample(IMAGE, torch.tanh(h.view(2, 5, 5, 2)[:, :3, :3]),
                                                           align_corners=True), (2, 2, 5, 5), REAL, False),
    ("F.grid_sample[nearest,border]", lambda h: F.grid_sample(h, GRID, "nearest", "border", False) * h[:, :, :3, :3],
     IMG, REAL, True),
    ("F.grid_sample[bicubic,reflection]", lambda h: F.grid_sample(h, GRID, "bicubic", "reflection", True), IMG, REAL,
     True),
    ("F.affine_grid", lambda h: F.affine_grid(h[:, :2, :3], (2, 1, 3, 3), align_corners=False), MAT, REAL, True),
    ("F.interpolate[area]", lambda h: F.interpolate(h, size=(3, 2), mode="area"), IMG, REAL, True),
    ("F.interpolate[bilinear,antialias]", lambda h: F.interpolate(h, size=(3, 3), mode="bilinear", antialias=True),
     IMG, REAL, False),
    ("F.pixel_shuffle", lambda h: F.pixel_shuffle(h, 2) ** 2, (2, 4, 3, 3), REAL, True),
    ("F.unfold[dilation,padding]", lambda h: F.unfold(h, 2, dilation=2, padding=1), IMG, REAL, True),
    ("F.pad[reflect]", lambda h: F.pad(h, (2, 1), mode="reflect"), SIG, REAL, True),
    ("F.pad[circular]", lambda h: F.pad(h, (1, 2, 2, 0), mode="circular"), IMG, REAL, False),
    ("F.local_response_norm", lambda h: F.local_response_norm(h, 2), (2, 4, 5), REAL, True),
    ("F.instance_norm[weight]", lambda h: F.instance_norm(h, weight=W46[0, :2] + 1, bias=W46[1, :2]), IMG, REAL,
     True),
    ("F.alpha_dropout[training=False]", lambda h: F.alpha_dropout(h, 0.5, False) ** 2, VEC, REAL, True),
    ("F.feature_alpha_dropout[training=False]", lambda h: F.feature_alpha_dropout(h, 0.5, False) ** 2, SIG, REAL,
     True),
]
for _name, _fn_, _shape, _domain, _slow in FUNCTIONAL:
    _fn(_name, _fn_, _shape, domain=_domain, slow=_slow)


# ----------------------------------------------------------------------------- the rule table: one case each

aten = torch.ops.aten


def _alias(h: Tensor) -> Tensor:
    return aten.alias.default(h) * h


def _split(h: Tensor) -> Tensor:
    a, b = h.split(3, 1)
    return a * b


RULE_CASES: list[tuple] = [
    # (rule-table op, fn, shape, domain)
    (aten.view.default, lambda h: h.view(2, 9) ** 2, VEC, REAL),
    (aten._unsafe_view.default, lambda h: (h.view(3, 2, 3) @ W64[:3, :2]) ** 2, VEC, REAL),
    (aten.reshape.default, lambda h: h.mT.reshape(-1) ** 2, VEC, REAL),  # decomposed before it is recorded
    (aten.squeeze.dim, lambda h: h[:, :1].squeeze(1) * h[:, 1], VEC, REAL),
    (aten.squeeze.dims, lambda h: h[:, :1].squeeze((1,)) * h[:, 2], VEC, REAL),
    (aten.squeeze.default, lambda h: h[:1, :1].squeeze() * h, VEC, REAL),
    (aten.unsqueeze.default, lambda h: h.unsqueeze(1) * h.unsqueeze(2), VEC, REAL),
    (aten.t.default, lambda h: h.t() @ h, VEC, REAL),
    (aten.transpose.int, lambda h: h.transpose(1, 2) * h, MAT, REAL),
    (aten.permute.default, lambda h: h.permute(0, 2, 1) * h, MAT, REAL),
    (aten.select.int, lambda h: h[:, 2] * h[:, 4], VEC, REAL),
    (aten.slice.Tensor, lambda h: h[:, 1:5:2] * h[:, :2], VEC, REAL),
    (aten.split.Tensor, _split, VEC, REAL),
    (aten.split_with_sizes.default, lambda h: h.split([2, 4], 1)[1] * h[:, 2:3], VEC, REAL),
    (aten.unbind.int, lambda h: h.unbind(1)[3] * h[:, 0], VEC, REAL),
    (aten.chunk.default, lambda h: h.chunk(2, 1)[1] * h[:, :3], VEC, REAL),  # decomposed before it is recorded
    (aten.narrow.default, lambda h: h.narrow(1, 1, 3) * h[:, 3:], VEC, REAL),  # decomposed before it is recorded
    (aten.clone.default, lambda h: h.clone() * h, VEC, REAL),
    (aten.alias.default, _alias, VEC, REAL),
    (aten.expand.default, lambda h: h[:, :1].expand(3, 4) * h[:, 2:], VEC, REAL),
    (aten.sum.dim_IntList, lambda h: h.sum(1) * h[:, 0], VEC, REAL),
    (aten.sum.default, lambda h: h.sum() * h, VEC, REAL),
    (aten.mean.dim, lambda h: h.mean(0) * h[0], VEC, REAL),
    (aten.mean.default, lambda h: h.mean() * h, VEC, REAL),
    (aten.neg.default, lambda h: -h * h.flip(1), VEC, REAL),
    (aten._to_copy.default, lambda h: h.to(D, copy=True) * h, VEC, REAL),
    (aten.embedding.default, lambda h: F.embedding(IDS, h.t()) ** 2, VEC, REAL),
    (aten.index_select.default, lambda h: h.index_select(1, torch.tensor([4, 0, 4])) * h[:, :3], VEC, REAL),
    (aten.gather.default, lambda h: h.gather(1, IDX_VEC) * h[:, :3], VEC, REAL),
    (aten.nll_loss_forward.default, lambda h: F.nll_loss(torch.log_softmax(h, 1), CLS3), VEC, REAL),
    (aten.nll_loss2d_forward.default,  # log-softmax over dim 1 (of 4 dims): pre.weight only, see WEIGHT_ONLY
     lambda h: F.nll_loss(torch.log_softmax(h, 1), torch.tensor([[[0, 1], [1, 1]], [[1, 0], [0, 0]]])),
     (2, 2, 2, 2), REAL),
    (aten.tril.default, lambda h: h.tril() * h, MAT, REAL),
    (aten.triu.default, lambda h: h.triu(1) * h, MAT, REAL),
    (aten.index.Tensor, lambda h: h[:, torch.tensor([5, 1, 1])] * h[:, :3], VEC, REAL),
    (aten.add.Tensor, lambda h: (h + h.flip(1)) * h, VEC, REAL),
    (aten.sub.Tensor, lambda h: (h - 2 * h.flip(0)) * h, VEC, REAL),
    (aten.cat.default, lambda h: torch.cat([h, h * h], 1) * torch.cat([h, h], 1), VEC, REAL),
    (aten.stack.default, lambda h: torch.stack([h, h * h]) * h, VEC, REAL),
    (aten.where.self, lambda h: torch.where(MASK_VEC, h, h * h) * h, VEC, REAL),
    (aten.masked_fill.Scalar, lambda h: h.masked_fill(MASK_VEC, 0.3) * h, VEC, REAL),
    (aten.masked_fill.Tensor, lambda h: h.masked_fill(MASK_VEC, h[0, 0]) * h, VEC, REAL),
    (aten.mm.default, lambda h: h @ h.t(), VEC, REAL),
    (aten.bmm.default, lambda h: torch.bmm(h, h), MAT, REAL),
    (aten.addmm.default, lambda h: torch.addmm(h[:, :4], h, W64) * h[:, :4], VEC, REAL),
    (aten.tanh.default, torch.tanh, VEC, REAL),
    (aten.sigmoid.default, torch.sigmoid, VEC, REAL),
    (aten.exp.default, torch.exp, VEC, REAL),
    (aten.log.default, torch.log, VEC, POS),
    (aten.rsqrt.default, torch.rsqrt, VEC, POS),
    (aten.sqrt.default, torch.sqrt, VEC, POS),
    (aten.reciprocal.default, torch.reciprocal, VEC, POS),
    (aten.relu.default, lambda h: torch.relu(h) * h, VEC, REAL),
    (aten.erf.default, torch.erf, VEC, REAL),
    (aten.silu.default, F.silu, VEC, REAL),
    (aten.gelu.default, lambda h: F.gelu(h) + F.gelu(h.flip(1), approximate="tanh"), VEC, REAL),
    (aten.pow.Tensor_Scalar, lambda h: h ** 3 + h.abs() ** 0.5 + h ** -2, VEC, WIDE),
    (aten.mul.Tensor, lambda h: h * h.flip(1) * 3.0, VEC, REAL),
    (aten.div.Tensor, lambda h: h / (h * h + 1) + h.flip(1) / 3.0, VEC, REAL),
    (aten._softmax.default, lambda h: torch.softmax(h, 1) * h, VEC, REAL),
    (aten._log_softmax.default, lambda h: torch.log_softmax(h, 0) * h, VEC, REAL),
    (aten.detach.default, lambda h: h.detach() * h * h, VEC, REAL),
    (aten.abs.default, torch.abs, VEC, REAL),
    (aten.clamp.default, lambda h: torch.clamp(h, -0.5, 0.8), VEC, REAL),
    (aten.clamp_min.default, lambda h: torch.clamp_min(h, 0.2), VEC, REAL),
    (aten.clamp_max.default, lambda h: torch.clamp_max(h, 0.2), VEC, REAL),
    (aten.elu.default, F.elu, VEC, REAL),
    (aten.celu.default, lambda h: F.celu(h, 0.7), VEC, REAL),
    (aten.hardshrink.default, lambda h: F.hardshrink(h, 0.3), VEC, REAL),
    (aten.softshrink.default, lambda h: F.softshrink(h, 0.3), VEC, REAL),
    (aten.hardsigmoid.default, aten.hardsigmoid.default, VEC, WIDE),  # F.hardsigmoid is decomposed: the op itself
    (aten.hardswish.default, F.hardswish, VEC, WIDE),
    (aten.hardtanh.default, F.hardtanh, VEC, REAL),
    (aten.leaky_relu.default, lambda h: F.leaky_relu(h, 0.1), VEC, REAL),
    (aten.log_sigmoid_forward.default, F.logsigmoid, VEC, REAL),
    (aten.logit.default, torch.logit, VEC, UNIT),
    (aten.mish.default, F.mish, VEC, REAL),
    (aten.softplus.default, lambda h: F.softplus(h, 2.0, 1.0), VEC, REAL),
    (aten.threshold.default, lambda h: F.threshold(h, 0.1, 20.0), VEC, REAL),
    (aten.native_batch_norm.default,  # torch.batch_norm called directly (F.batch_norm is decomposed)
     lambda h: torch.batch_norm(h, None, None, W46[0, :2] + 1, W46[1, :2], True, 0.1, 1e-5, False), SIG, REAL),
    (aten.flip.default, lambda h: torch.flip(h, (1,)) * h, VEC, REAL),
    (aten.roll.default, lambda h: torch.roll(h, 2, 1) * h, VEC, REAL),
    (aten.repeat.default, lambda h: h.repeat(1, 2)[:, 3:9] * h, VEC, REAL),
    (aten.index_add.default, lambda h: (h * h).index_add(1, torch.tensor([0, 0, 3]), h[:, 3:]) * h, VEC, REAL),
]
for _op, _fn_, _shape, _domain in RULE_CASES:
    _fn(str(_op), _fn_, _shape, kind="rule", domain=_domain, covers=(str(_op),),
        select=WEIGHT_ONLY if _op is aten.nll_loss2d_forward.default else None)


# ----------------------------------------------------------------------------- decompositions and fused nodes

Q4 = _randn(2, 2, 4, 2, seed=91)


def _sdpa(h: Tensor, **kwargs) -> Tensor:  # noqa: ANN003
    q = _heads(h)
    return F.scaled_dot_product_attention(q, q * 0.5, q.flip(2), **kwargs)


BN_MEAN, BN_VAR = _randn(2, seed=92) * 0.3, _rand(2, seed=93) + 0.5
CLS_SEQ = torch.tensor([[1, 0, 3, 2], [2, 2, 0, 1]])
TARGET_VEC = _randn(*VEC, seed=94)
PROB_VEC = _rand(*VEC, seed=95)

DECOMPOSITIONS: list[tuple] = [
    # (name, fn, shape, covers, fused)
    ("F.layer_norm[last dim]", lambda h: F.layer_norm(h, (6,), W64[:, 0] + 1, W64[:, 1]), VEC,
     ("F.layer_norm",), "off"),
    ("F.layer_norm[2 dims]", lambda h: F.layer_norm(h, (2, 7)), SIG, ("F.layer_norm",), "auto"),
    ("F.rms_norm", lambda h: F.rms_norm(h, (6,), W64[:, 0] + 1), VEC, ("F.rms_norm",), "auto"),
    ("F.batch_norm[running statistics]", lambda h: F.batch_norm(h, BN_MEAN, BN_VAR, W46[0, :2], W46[1, :2]), SIG,
     ("F.batch_norm",), "auto"),
    ("F.batch_norm[batch statistics]", lambda h: F.batch_norm(h, None, None, training=True), SIG,
     ("F.batch_norm",), "auto"),
    ("F.group_norm", lambda h: F.group_norm(h, 2, W64[0], W64[1]), (2, 4, 5), ("F.group_norm",), "auto"),
    ("F.scaled_dot_product_attention", _sdpa, SEQ, ("F.scaled_dot_product_attention",), "auto"),
    ("F.scaled_dot_product_attention[is_causal]", lambda h: _sdpa(h, is_causal=True), SEQ,
     ("F.scaled_dot_product_attention",), "auto"),
    ("F.scaled_dot_product_attention[bool mask,scale]", lambda h: _sdpa(h, attn_mask=~PAD[:, None, None], scale=0.3),
     SEQ, ("F.scaled_dot_product_attention",), "auto"),
    ("F.scaled_dot_product_attention[float mask]", lambda h: _sdpa(h, attn_mask=Q4[0, 0, :, :1] * Q4[0, 1, :, 0]),
     SEQ, ("F.scaled_dot_product_attention",), "auto"),
    ("F.scaled_dot_product_attention[enable_gqa]",
     lambda h: F.scaled_dot_product_attention(_heads(h), Q4[:, :1], Q4[:, 1:], enable_gqa=True), SEQ,
     ("F.scaled_dot_product_attention",), "auto"),
    ("F.mse_loss", lambda h: F.mse_loss(h, TARGET_VEC), VEC, ("F.mse_loss",), "auto"),
    ("F.mse_loss[weight]", lambda h: F.mse_loss(h, TARGET_VEC, weight=PROB_VEC), VEC, ("F.mse_loss",), "auto"),
    ("F.huber_loss", lambda h: F.huber_loss(h, TARGET_VEC, delta=0.5), VEC, ("F.huber_loss",), "auto"),
    ("F.soft_margin_loss", lambda h: F.soft_margin_loss(h, TARGET_VEC.sign()), VEC, ("F.soft_margin_loss",), "auto"),
    ("F.binary_cross_entropy_with_logits", lambda h: F.binary_cross_entropy_with_logits(h, PROB_VEC), VEC,
     ("F.binary_cross_entropy_with_logits",), "auto"),
    ("F.binary_cross_entropy_with_logits[pos_weight]",
     lambda h: F.binary_cross_entropy_with_logits(h, PROB_VEC, pos_weight=W64[:, 0].abs() + 0.5), VEC,
     ("F.binary_cross_entropy_with_logits",), "auto"),
    ("F.cross_entropy[plain ops]", lambda h: F.cross_entropy(h, CLS3), VEC, ("F.cross_entropy",), "off"),
    ("F.cross_entropy[sequence,label_smoothing]",
     lambda h: F.cross_entropy(h.transpose(1, 2), CLS_SEQ, label_smoothing=0.1), SEQ, ("F.cross_entropy",), "auto"),
    ("F.instance_norm", lambda h: F.instance_norm(h), SIG, ("F.instance_norm",), "auto"),
    ("F.glu[dim=1]", lambda h: F.glu(h, 1), VEC, ("F.glu",), "auto"),
    ("F.hardsigmoid", lambda h: F.hardsigmoid(h), VEC, ("F.hardsigmoid",), "auto"),  # on WIDE inputs, below
    ("torch.cdist", lambda h: torch.cdist(h, h.flip(1)), MAT, ("torch.cdist",), "auto"),
    ("torch.pdist", lambda h: torch.pdist(h), VEC, ("torch.pdist",), "auto"),
    ("F.pdist[p=3]", lambda h: F.pdist(h, 3.0), VEC, ("F.pdist",), "auto"),
    ("F.dropout[training=False]", lambda h: F.dropout(h, 0.5, False) ** 2, VEC, ("F.dropout",), "auto"),
    ("F.dropout1d[training=False]", lambda h: F.dropout1d(h, 0.5, False) ** 2, SIG, ("F.dropout1d",), "auto"),
    ("F.dropout2d[training=False]", lambda h: F.dropout2d(h, 0.5, False) ** 2, IMG, ("F.dropout2d",), "auto"),
    ("F.dropout3d[training=False]", lambda h: F.dropout3d(h, 0.5, False) ** 2, VOL, ("F.dropout3d",), "auto"),
]
for _name, _fn_, _shape, _covers, _fused in DECOMPOSITIONS:
    _fn(_name, _fn_, _shape, kind="decomposition", covers=_covers, fused=_fused,
        domain=WIDE if _name == "F.hardsigmoid" else REAL)

FUSED = "fasthess.{}_fused.default"
FUSED_CASES: list[tuple] = [
    # (name, module or function, shape, select, covers): recorded with fused_nodes.using("all")
    ("fused:attention", lambda: Fn(_sdpa), SEQ, None, (FUSED.format("attention"),)),
    ("fused:attention[key padding]", lambda: Fn(lambda h: _sdpa(h, attn_mask=~PAD[:, None, None])), SEQ, None,
     (FUSED.format("attention"),)),
    ("fused:attention[is_causal]", lambda: Fn(lambda h: _sdpa(h, is_causal=True)), SEQ, None,
     (FUSED.format("attention"),)),
    ("fused:nn.MultiheadAttention[key_padding_mask]",
     lambda: Call(_mha(), lambda m, h: m(h, h, h, key_padding_mask=PAD, need_weights=False)[0]), SEQ,
     ["pre.weight", "body.m.in_proj_weight"], (FUSED.format("attention"),)),
    ("fused:layer_norm", lambda: _affine(nn.LayerNorm(6)), VEC, None, (FUSED.format("layer_norm"),)),
    ("fused:nn.TransformerEncoderLayer",
     lambda: Call(nn.TransformerEncoderLayer(4, 2, 6, batch_first=True), lambda m, h: m(h, is_causal=False)), SEQ,
     ["pre.weight", "body.m.self_attn.in_proj_weight", "body.m.norm2.weight"], ()),
    ("fused:cross_entropy", lambda: Fn(lambda h: F.cross_entropy(h, CLS3)), VEC, None,
     (FUSED.format("cross_entropy"),)),
    ("fused:cross_entropy[ignore_index]", lambda: Fn(lambda h: F.cross_entropy(h, CLS3, ignore_index=0)), VEC, None,
     (FUSED.format("cross_entropy"),)),
]
for _name, _make, _shape, _select, _covers in FUSED_CASES:
    _layer(_name, _make, _shape, kind="fused", select=_select, covers=_covers, fused="all",
           readout="cross_entropy" not in _name)


def module_classes() -> dict[str, type]:
    """Every module class of :data:`MODULE_GROUPS` (Lazy* and abstract bases excepted), by name."""
    out = {}
    for group in MODULE_GROUPS:
        for name in getattr(nn.modules, group).__all__:
            cls = getattr(nn, name, None)
            if cls is None or name.startswith("Lazy") or name in ("RNNBase", "RNNCellBase"):
                continue
            out[name] = cls
    return out


def module_name(case: str) -> str | None:
    """``"nn.Conv2d[stride=2]"`` -> ``"Conv2d"``; None for a case that is not a module."""
    if not case.startswith("nn."):
        return None
    return case[3:].split("[")[0]


def entries(case: Case) -> int:
    params = dict(case.model.named_parameters())
    return sum(params[n].numel() for n in case.layers)


__all__ = ["CASES", "KINDS", "MAX_ENTRIES", "OpCase", "entries", "module_classes", "module_name"]
