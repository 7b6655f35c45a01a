"""Layer-norm 2-jet over the last dim: ``y = LN(x)·weight + bias`` with ``N`` input tangent pairs.

Backends, in order of preference for ``backend="auto"``:

* ``triton``: one program per block of rows (:mod:`.triton_kernels`) on CUDA tensors.
* ``cuda``: ``torch.ops.fasthess.layer_norm_jet2`` on CUDA tensors (``csrc/cuda/layer_norm_jet2.cu``,
  built only against a CUDA torch): one warp per row (``D <= 512``) or one block per row; float32/float64.
* ``cpp``: ``torch.ops.fasthess.layer_norm_jet2`` on CPU tensors (``csrc/layer_norm_jet2.cpp``):
  one pass over the rows, the primal statistics of a row shared by its ``N`` tangents.
* ``torch``: the closed form below in torch ops, any device.

With ``r = (var + eps)^(-1/2)``, ``x̂ = (x - mean) r`` and the centred, scaled tangents
``u_i = (x_i - mean x_i) r``: ``s1 = mean(x̂ u1)``, ``q = mean(u1²)``, ``s2 = mean(x̂ u2)``,
``y1 = w ⊙ (u1 - s1 x̂)`` and ``y2 = w ⊙ (u2 - 2 s1 u1 + (3 s1² - q - s2) x̂)``.
``x2=None`` (second-order input tangent 0, as in the tangent-adjoint engine's fused rule) drops
``u2`` and ``s2`` in every backend.
The spec is :func:`.reference.layer_norm_jet2` (nested ``jvp`` on the mean/variance decomposition).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import KernelFamily, cuda_op_available, op_available, triton_available
from .reference import layer_norm_jet2 as layer_norm_jet2_reference

__all__ = ["family", "layer_norm_jet2", "layer_norm_jet2_reference"]

family = KernelFamily("layer_norm_jet2")


@family.register("triton", available=lambda: triton_available(f"{__name__}.triton_kernels"), devices=("cuda",))
def _triton(x, weight, bias, x1, x2, eps):  # noqa: ANN001, ANN202
    from .triton_kernels import layer_norm_jet2_triton

    return layer_norm_jet2_triton(x, weight, bias, x1, x2, eps)


@family.register("cuda", available=lambda: cuda_op_available("layer_norm_jet2"), devices=("cuda",),
                 dtypes=(torch.float32, torch.float64))
def _cuda(x, weight, bias, x1, x2, eps):  # noqa: ANN001, ANN202
    return torch.ops.fasthess.layer_norm_jet2(x, weight, bias, x1, x2, eps)


@family.register("cpp", available=lambda: op_available("layer_norm_jet2"), devices=("cpu",))
def _cpp(x, weight, bias, x1, x2, eps):  # noqa: ANN001, ANN202
    return torch.ops.fasthess.layer_norm_jet2(x, weight, bias, x1, x2, eps)


@family.register("torch", available=lambda: True)
def _torch(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, x1: Tensor, x2: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    c = x - x.mean(-1, keepdim=True)
    r = torch.rsqrt((c * c).mean(-1, keepdim=True) + eps)
    xh = c * r
    u1 = (x1 - x1.mean(-1, keepdim=True)) * r
    s1 = (xh * u1).mean(-1, keepdim=True)
    coef = 3 * s1 * s1 - (u1 * u1).mean(-1, keepdim=True)
    y, y1, y2 = xh, u1 - s1 * xh, coef * xh - 2 * s1 * u1
    if x2 is not None:  # u2 - s2 x̂
        u2 = (x2 - x2.mean(-1, keepdim=True)) * r
        y2 = y2 + u2 - (xh * u2).mean(-1, keepdim=True) * xh
    if weight is not None:
        y, y1, y2 = y * weight, y1 * weight, y2 * weight
    return (y if bias is None else y + bias), y1, y2


def layer_norm_jet2(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    x1: Tensor,
    x2: Tensor | None = None,
    eps: float = 1e-5,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Layer norm over the last dim and its first/second directional derivatives along ``N`` tangent pairs.

    Args:
        x: ``(..., D)``; weight, bias: ``(D,)`` or ``None``.
        x1, x2: ``(N, *x.shape)`` first- and second-order input tangents; ``x2=None`` stands for 0
            and is skipped by every backend (no zero tensor, no reads or products for it).
        eps: added to the variance.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpp"`` or ``"torch"``.

    Returns:
        ``(y, y1, y2)``: ``x.shape`` and two ``(N, *x.shape)``, ``y2 = d²/dt² y(x + t x1 + t²/2 x2)`` at 0.

    Raises:
        ValueError: shapes, dtypes or devices do not fit together.
        BackendUnavailableError: an explicit backend is unavailable here or not for these tensors.
        TypeError: an explicit backend does not take this dtype.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, w, b = (torch.randn(s, generator=g, dtype=torch.float64) for s in [(3, 5), 5, 5])
        >>> x1, x2 = torch.randn(2, 2, 3, 5, generator=g, dtype=torch.float64).unbind()
        >>> got, want = layer_norm_jet2(x, w, b, x1, x2), layer_norm_jet2_reference(x, w, b, x1, x2)
        >>> all(torch.allclose(a, b) for a, b in zip(got, want))
        True
        >>> got = layer_norm_jet2(x, w, b, x1)  # x2 = 0
        >>> want = layer_norm_jet2_reference(x, w, b, x1, torch.zeros_like(x1))
        >>> all(torch.allclose(a, b) for a, b in zip(got, want))
        True
    """
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be (..., D) with D > 0; got {tuple(x.shape)}")
    for name, t in (("x1", x1), ("x2", x2)):
        if t is None and name == "x2":
            continue
        if t.dim() != x.dim() + 1 or t.shape[1:] != x.shape or t.shape != x1.shape:
            raise ValueError(f"{name} must be (N, *x.shape) = (N, {', '.join(map(str, x.shape))}); got {tuple(t.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != x.shape[-1:]:
            raise ValueError(f"{name} must be (D,) = ({x.shape[-1]},); got {tuple(t.shape)}")
    for name, t in (("x1", x1), ("x2", x2), ("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} must have x's dtype and device ({x.dtype}, {x.device}); got {t.dtype}, {t.device}")
    _, fn = family.select(backend, x.device.type, x.dtype)
    return fn(x, weight, bias, x1, x2, float(eps))


def _register_fake() -> None:
    """Shape function of the C++ op, for torch.compile / opcheck (only when the extension loaded)."""
    if not op_available("layer_norm_jet2"):
        return

    @torch.library.register_fake("fasthess::layer_norm_jet2")
    def _(x, weight, bias, x1, x2, eps):  # noqa: ANN001, ANN202
        return x.new_empty(x.shape), x1.new_empty(x1.shape), x1.new_empty(x1.shape)


_register_fake()
