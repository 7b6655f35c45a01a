"""GELU 2-jet (exact erf form and tanh approximation) with ``N`` tangent pairs.

Backends, in order of preference for ``backend="auto"``:

* ``triton``: one program per block of elements (:mod:`.triton_kernels`) on CUDA tensors.
* ``cuda``: ``torch.ops.fasthess.gelu_jet2`` on CUDA tensors (``csrc/cuda/gelu_jet2.cu``, built only
  against a CUDA torch): one thread per element and its ``N`` tangent pairs; float32/float64.
* ``cpp``: ``torch.ops.fasthess.gelu_jet2`` on CPU tensors (``csrc/gelu_jet2.cpp``): ``g'`` and
  ``g''`` of a block computed once and shared by the ``N`` tangents.
* ``torch``: the closed form below in torch ops, any device.

``y1 = g'(x) x1`` and ``y2 = g'(x) x2 + g''(x) x1²``; erf form: ``g' = Φ + xφ``, ``g'' = φ(2 - x²)``;
tanh form (``t = tanh(u)``, ``u = k(x + c x³)``): ``g' = (1 + t)/2 + x/2 (1 - t²) u'``,
``g'' = (1 - t²)(u' + x/2 (u'' - 2 t u'²))``. The spec is :func:`.reference.gelu_jet2` (nested ``jvp``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..registry import KernelFamily, cuda_op_available, op_available, triton_available
from .reference import APPROXIMATIONS, gelu, gelu_jet2 as gelu_jet2_reference

__all__ = ["family", "gelu", "gelu_derivatives", "gelu_jet2", "gelu_jet2_reference"]

family = KernelFamily("gelu_jet2")


def gelu_derivatives(x: Tensor, approximate: str = "none") -> tuple[Tensor, Tensor, Tensor]:
    """``(g(x), g'(x), g''(x))`` in closed form.

    Example:
        >>> [round(t.item(), 6) for t in gelu_derivatives(torch.zeros(1, dtype=torch.float64))]
        [0.0, 0.5, 0.797885]
    """
    if approximate == "tanh":
        k, c = math.sqrt(2.0 / math.pi), 0.044715
        u = k * (x + c * x * x * x)
        # 1 + t = 2σ(2u) and 1 - t² = 4σ(2u)σ(-2u): no cancellation where t ≈ ±1
        s, s_neg = torch.sigmoid(2 * u), torch.sigmoid(-2 * u)
        t, du, sech2 = s - s_neg, k * (1 + 3 * c * x * x), 4 * s * s_neg
        return x * s, s + 0.5 * x * sech2 * du, sech2 * (du + 0.5 * x * (6 * c * k * x - 2 * t * du * du))
    phi = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(x * math.sqrt(0.5)))
    return x * cdf, cdf + x * phi, phi * (2 - x * x)


@family.register("triton", available=lambda: triton_available(f"{__name__}.triton_kernels"), devices=("cuda",))
def _triton(x: Tensor, x1: Tensor, x2: Tensor, approximate: str) -> tuple[Tensor, Tensor, Tensor]:
    from .triton_kernels import gelu_jet2_triton

    return gelu_jet2_triton(x, x1, x2, approximate)


@family.register("cuda", available=lambda: cuda_op_available("gelu_jet2"), devices=("cuda",),
                 dtypes=(torch.float32, torch.float64))
def _cuda(x: Tensor, x1: Tensor, x2: Tensor, approximate: str) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.fasthess.gelu_jet2(x, x1, x2, approximate)


@family.register("cpp", available=lambda: op_available("gelu_jet2"), devices=("cpu",))
def _cpp(x: Tensor, x1: Tensor, x2: Tensor, approximate: str) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.fasthess.gelu_jet2(x, x1, x2, approximate)


@family.register("torch", available=lambda: True)
def _torch(x: Tensor, x1: Tensor, x2: Tensor, approximate: str) -> tuple[Tensor, Tensor, Tensor]:
    g, d1, d2 = gelu_derivatives(x, approximate)
    return g, d1 * x1, d1 * x2 + d2 * x1 * x1


def gelu_jet2(
    x: Tensor, x1: Tensor, x2: Tensor, approximate: str = "none", backend: str = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """GELU and its first/second directional derivatives along ``N`` tangent pairs.

    Args:
        x: any shape; x1, x2: ``(N, *x.shape)`` first- and second-order tangents.
        approximate: ``"none"`` (erf, as ``F.gelu``) or ``"tanh"``.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpp"`` or ``"torch"``.

    Returns:
        ``(y, y1, y2)``: ``x.shape`` and two ``(N, *x.shape)``.

    Raises:
        ValueError: bad ``approximate``, or shapes, dtypes or devices do not fit together.
        BackendUnavailableError: an explicit backend is unavailable here or not for these tensors.
        TypeError: an explicit backend does not take this dtype.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2, 7, generator=g, dtype=torch.float64)
        >>> x1, x2 = torch.randn(2, 3, 2, 7, generator=g, dtype=torch.float64).unbind()  # N = 3
        >>> got, want = gelu_jet2(x, x1, x2, "tanh"), gelu_jet2_reference(x, x1, x2, "tanh")
        >>> all(torch.allclose(a, b) for a, b in zip(got, want))
        True
    """
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    for name, t in (("x1", x1), ("x2", x2)):
        if t.dim() != x.dim() + 1 or t.shape[1:] != x.shape or t.shape != x1.shape:
            raise ValueError(f"{name} must be (N, *x.shape) with x.shape = {tuple(x.shape)}; got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} must have x's dtype and device ({x.dtype}, {x.device}); got {t.dtype}, {t.device}")
    _, fn = family.select(backend, x.device.type, x.dtype)
    return fn(x, x1, x2, approximate)


def _register_fake() -> None:
    """Shape function of the C++ op, for torch.compile / opcheck (only when the extension loaded)."""
    if not op_available("gelu_jet2"):
        return

    @torch.library.register_fake("fasthess::gelu_jet2")
    def _(x, x1, x2, approximate):  # noqa: ANN001, ANN202
        return x.new_empty(x.shape), x1.new_empty(x1.shape), x1.new_empty(x1.shape)


_register_fake()
