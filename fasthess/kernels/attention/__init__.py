"""Attention 2-jet: ``softmax(q kᵀ·scale + mask) v`` with ``N`` first/second-order tangent pairs in one pass.

Backends, in order of preference for ``backend="auto"``:

* ``triton``: flash-style Triton kernel (:mod:`.triton_kernels`) on CUDA tensors; float32/16/bf16;
  its tile products run on the tensor cores at the requested ``precision`` (below).
* ``cuda``: ``torch.ops.fasthess.attention_jet2`` on CUDA tensors (``csrc/cuda/attention_jet2.cu``,
  built only against a CUDA torch); float32/float64, exact scalar FMAs.
* ``cpp``: ``torch.ops.fasthess.attention_jet2`` on CPU tensors (``csrc/attention_jet2.cpp``).
* ``torch``: the same online-softmax algorithm in torch ops (:mod:`.online`), any device.

``precision`` is the least accuracy the float32 matrix products may have: ``"ieee"`` (default:
exact float32), ``"tf32x3"`` (each float32 operand split into two TF32 parts, three tensor-core
products, error of the order of float32 round-off) or ``"tf32"`` (one TF32 product, ~1e-3
relative). Only the Triton kernel uses tensor cores; the other backends always compute in full
precision, which satisfies every setting. Hence ``"auto"`` on a GPU picks Triton for float32 at
``"tf32x3"``/``"tf32"``, and for ``"ieee"`` the exact CUDA kernel (Triton's exact-fp32 products run
on scalar FMAs and are slower than the reference); float64 goes to the CUDA kernel. The default
stays ``"ieee"`` until an H200 run has measured ``"tf32x3"``'s error and speed (only emulated so far).

A ``None`` tangent (any of ``q1, k1, v1, q2, k2, v2``, one of the first three given) is zero and
skipped by every backend: the fused rule of the tangent-adjoint engine passes the second-order
tangents as ``None``, which drops ``q2 kᵀ``, ``q k2ᵀ`` and ``P v2`` and their reads.

The spec is :func:`.reference.attention_jet2` (nested ``torch.func.jvp`` on the math path).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..registry import KernelFamily, cuda_op_available, op_available
from .online import attention_jet2_online
from .reference import attention, attention_jet2 as attention_jet2_reference

__all__ = ["attention", "attention_jet2", "attention_jet2_reference", "family"]

family = KernelFamily("attention_jet2")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Triton imports and a CUDA device exists (the interpreter is for tests, not for ``auto``)."""
    if not torch.cuda.is_available():
        return False
    try:
        from . import triton_kernels  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken triton install means no triton backend
        return False
    return True


@functools.lru_cache(maxsize=None)
def cuda_ext_available() -> bool:
    """The extension was built with the CUDA kernels (it registers a CUDA implementation)."""
    return cuda_op_available("attention_jet2")


def _keep(key_padding_mask: Tensor | None) -> Tensor | None:
    return None if key_padding_mask is None else ~key_padding_mask.to(torch.bool)


FLOAT32_64 = (torch.float32, torch.float64)
PRECISIONS = ("ieee", "tf32x3", "tf32")  # the settings of `precision` (module docstring); .triton_kernels takes them too


@family.register("triton", available=triton_available, devices=("cuda",),
                 dtypes=(torch.float32, torch.float16, torch.bfloat16))
def _triton(q, k, v, q1, k1, v1, q2, k2, v2, *, causal, key_padding_mask, scale, precision):
    from .triton_kernels import attention_jet2_triton

    return attention_jet2_triton(q, k, v, q1, k1, v1, q2, k2, v2, causal=causal, key_padding_mask=key_padding_mask,
                                 scale=scale, precision=precision)


@family.register("cuda", available=cuda_ext_available, devices=("cuda",), dtypes=FLOAT32_64)
def _cuda(q, k, v, q1, k1, v1, q2, k2, v2, *, causal, key_padding_mask, scale, precision):
    return torch.ops.fasthess.attention_jet2(q, k, v, q1, k1, v1, q2, k2, v2, _keep(key_padding_mask), causal, scale)


@family.register("cpp", available=lambda: op_available("attention_jet2"), devices=("cpu",), dtypes=FLOAT32_64)
def _cpp(q, k, v, q1, k1, v1, q2, k2, v2, *, causal, key_padding_mask, scale, precision):
    return torch.ops.fasthess.attention_jet2(q, k, v, q1, k1, v1, q2, k2, v2, _keep(key_padding_mask), causal, scale)


@family.register("torch", available=lambda: True)
def _torch(q, k, v, q1, k1, v1, q2, k2, v2, *, causal, key_padding_mask, scale, precision):
    return attention_jet2_online(q, k, v, q1, k1, v1, q2, k2, v2, causal=causal, key_padding_mask=key_padding_mask, scale=scale)


def select_backend(backend: str, device: str, dtype: torch.dtype, precision: str = "ieee"):  # noqa: ANN201
    """``(name, implementation)`` for tensors of ``device`` type and ``dtype``; see :func:`attention_jet2`.

    Example:
        >>> select_backend("torch", "cpu", torch.float32)[0]
        'torch'
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    # exact float32 on a GPU: the CUDA kernel (Triton's exact products are scalar FMAs, slower still)
    exclude = ("triton",) if precision == "ieee" and dtype == torch.float32 else ()
    return family.select(backend, device, dtype, exclude=exclude)


def _check(q: Tensor, k: Tensor, v: Tensor, tangents: list[Tensor | None]) -> int:
    """Validate the inputs; returns ``N`` (the leading dim of the given tangents)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k and v must be (B, H, Tk, D) with q's B, H, D; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    first = next((t for t in tangents[:3] if t is not None), None)
    if first is None:
        raise ValueError("at least one of q1, k1, v1 must be a tensor (it sets N); pass zeros for an all-zero "
                         "first order")
    n = first.shape[0]
    for name, t, like in zip(("q1", "k1", "v1", "q2", "k2", "v2"), tangents, (q, k, v) * 2):
        if t is None:
            continue
        if t.shape != (n, *like.shape):
            raise ValueError(f"{name} must be (N, *{like.shape}) with N = {n}; got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must have q's dtype and device ({q.dtype}, {q.device}); got {t.dtype}, {t.device}")
    return n


def attention_jet2(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q1: Tensor | None,
    k1: Tensor | None,
    v1: Tensor | None,
    q2: Tensor | None = None,
    k2: Tensor | None = None,
    v2: Tensor | None = None,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    precision: str = "ieee",
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention and its first and second directional derivatives along ``N`` tangent pairs.

    Args:
        q: ``(B, H, Tq, D)`` queries; k, v: ``(B, H, Tk, D)``.
        q1, k1, v1: ``(N, *shape)`` first-order tangents; q2, k2, v2: second-order tangents.
            ``None`` stands for a zero tangent and is skipped by every backend (no zero tensor is
            made, its products are not done): e.g. ``q2 = k2 = v2 = None`` saves the products
            ``q2 kᵀ``, ``q k2ᵀ`` and ``P v2``. At least one of ``q1, k1, v1`` must be given.
        causal: key ``j`` visible to query ``i`` only when ``j <= i``.
        key_padding_mask: ``(B, Tk)`` bool, ``True`` = padding (ignored).
        scale: default ``1/sqrt(D)``.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpp"`` or ``"torch"``.
        precision: least accuracy of the float32 matrix products, ``"ieee"``, ``"tf32x3"`` or
            ``"tf32"`` (module docstring); it changes the result only on the Triton backend.

    Returns:
        ``(o, o1, o2)``: ``(B, H, Tq, D)`` and two ``(N, B, H, Tq, D)``; rows that see no key are 0.

    Raises:
        ValueError: shapes, dtypes or devices do not fit together, or an unknown ``precision``.
        BackendUnavailableError: an explicit backend is unavailable here or not for these tensors.
        TypeError: an explicit backend does not take this dtype.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = [torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
        >>> t = [torch.randn(3, 2, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(6)]
        >>> got = attention_jet2(*x, *t, causal=True)
        >>> want = attention_jet2_reference(*x, *t, causal=True)
        >>> all(torch.allclose(a, b) for a, b in zip(got, want))
        True
        >>> got = attention_jet2(*x, t[0], None, t[2])  # k1 and the second-order tangents 0
        >>> zero = torch.zeros_like(t[0])
        >>> want = attention_jet2_reference(*x, t[0], zero, t[2], zero, zero, zero)
        >>> all(torch.allclose(a, b) for a, b in zip(got, want))
        True
    """
    tangents = [q1, k1, v1, q2, k2, v2]
    n = _check(q, k, v, tangents)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    device = q.device.type
    _, fn = select_backend(backend, device, q.dtype, precision)
    if n == 0:  # no tangents: only the primal
        o = attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
        return o, q.new_zeros((0, *q.shape)), q.new_zeros((0, *q.shape))
    return fn(q, k, v, q1, k1, v1, q2, k2, v2, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
              precision=precision)


def _register_fake() -> None:
    """Shape functions of the C++ op, for torch.compile / opcheck (only when the extension loaded)."""
    if not op_available("attention_jet2"):
        return

    @torch.library.register_fake("fasthess::attention_jet2")
    def _(q, k, v, q1, k1, v1, q2, k2, v2, keep, causal, scale):  # noqa: ANN001, ANN202
        first = next((t for t in (q1, k1, v1) if t is not None), None)
        if first is None:
            raise RuntimeError("attention_jet2: at least one of q1, k1, v1 must be a tensor (it sets N)")
        n = first.shape[0]
        return q.new_empty(q.shape), q.new_empty((n, *q.shape)), q.new_empty((n, *q.shape))


_register_fake()
