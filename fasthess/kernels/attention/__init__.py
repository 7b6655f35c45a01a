"""Attention 2-jet: ``softmax(q kᵀ·scale + mask) v`` with ``N`` first/second-order tangent pairs in one pass.

Backends, in order of preference for ``backend="auto"``:

* ``cuda``: ``torch.ops.fasthess.attention_jet2`` on CUDA tensors (``csrc/cuda/attention_jet2.cu``,
  built only against a CUDA torch); float32/float64.
* ``triton``: flash-style Triton kernel (:mod:`.triton_kernels`) on CUDA tensors; float32/16/bf16.
* ``cpp``: ``torch.ops.fasthess.attention_jet2`` on CPU tensors (``csrc/attention_jet2.cpp``).
* ``torch``: the same online-softmax algorithm in torch ops (:mod:`.online`), any device.

The spec is :func:`.reference.attention_jet2` (nested ``torch.func.jvp`` on the math path).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..registry import KernelFamily, op_available
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
    if not (op_available("attention_jet2") and torch.cuda.is_available()):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fasthess::attention_jet2", "CUDA")


def _keep(key_padding_mask: Tensor | None) -> Tensor | None:
    return None if key_padding_mask is None else ~key_padding_mask.to(torch.bool)


@family.register("cuda", available=cuda_ext_available, devices=("cuda",))
def _cuda(q, k, v, q1, k1, v1, q2, k2, v2, *, causal, key_padding_mask, scale):
    return torch.ops.fasthess.attention_jet2(q, k, v, q1, k1, v1, q2, k2, v2, _keep(key_padding_mask), causal, scale)


@family.register("triton", available=triton_available, devices=("cuda",))
def _triton(q, k, v, q1, k1, v1, q2, k2, v2, *, causal, key_padding_mask, scale):
    from .triton_kernels import attention_jet2_triton

    return attention_jet2_triton(q, k, v, q1, k1, v1, q2, k2, v2, causal=causal, key_padding_mask=key_padding_mask, scale=scale)


@family.register("cpp", available=lambda: op_available("attention_jet2"), devices=("cpu",))
def _cpp(q, k, v, q1, k1, v1, q2, k2, v2, *, causal, key_padding_mask, scale):
    return torch.ops.fasthess.attention_jet2(q, k, v, q1, k1, v1, q2, k2, v2, _keep(key_padding_mask), causal, scale)


@family.register("torch", available=lambda: True)
def _torch(q, k, v, q1, k1, v1, q2, k2, v2, *, causal, key_padding_mask, scale):
    return attention_jet2_online(q, k, v, q1, k1, v1, q2, k2, v2, causal=causal, key_padding_mask=key_padding_mask, scale=scale)


# dtypes each compiled backend takes; "auto" passes over a backend for other dtypes
_DTYPES = {
    "cuda": (torch.float32, torch.float64),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "cpp": (torch.float32, torch.float64),
}


def select_backend(backend: str, device: str, dtype: torch.dtype):  # noqa: ANN201
    """``(name, implementation)`` for tensors of ``device`` type and ``dtype``; see :func:`attention_jet2`."""
    if backend == "auto":
        for name in family.backends:
            if dtype in _DTYPES.get(name, (dtype,)) and family._runs_on(name, device) and family.backends[name][0]():
                return family.select(name, device)
    name, fn = family.select(backend, device)
    if dtype not in _DTYPES.get(name, (dtype,)):
        raise TypeError(f"backend {name!r} takes {_DTYPES[name]}, not {dtype}; use backend='auto'")
    return name, fn


def _check(q: Tensor, k: Tensor, v: Tensor, tangents: list[Tensor]) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k and v must be (B, H, Tk, D) with q's B, H, D; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    n = tangents[0].shape[0]
    for name, t, like in zip(("q1", "k1", "v1", "q2", "k2", "v2"), tangents, (q, k, v) * 2):
        if t.shape != (n, *like.shape):
            raise ValueError(f"{name} must be (N, *{like.shape}) with N = {n}; got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must have q's dtype and device ({q.dtype}, {q.device}); got {t.dtype}, {t.device}")


def attention_jet2(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q1: Tensor,
    k1: Tensor,
    v1: Tensor,
    q2: Tensor,
    k2: Tensor,
    v2: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention and its first and second directional derivatives along ``N`` tangent pairs.

    Args:
        q: ``(B, H, Tq, D)`` queries; k, v: ``(B, H, Tk, D)``.
        q1, k1, v1: ``(N, *shape)`` first-order tangents; q2, k2, v2: second-order tangents.
        causal: key ``j`` visible to query ``i`` only when ``j <= i``.
        key_padding_mask: ``(B, Tk)`` bool, ``True`` = padding (ignored).
        scale: default ``1/sqrt(D)``.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpp"`` or ``"torch"``.

    Returns:
        ``(o, o1, o2)``: ``(B, H, Tq, D)`` and two ``(N, B, H, Tq, D)``; rows that see no key are 0.

    Raises:
        BackendUnavailableError: an explicit backend is unavailable here or not for these tensors.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = [torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
        >>> t = [torch.randn(3, 2, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(6)]
        >>> got = attention_jet2(*x, *t, causal=True)
        >>> want = attention_jet2_reference(*x, *t, causal=True)
        >>> all(torch.allclose(a, b) for a, b in zip(got, want))
        True
    """
    tangents = [q1, k1, v1, q2, k2, v2]
    _check(q, k, v, tangents)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    device = q.device.type
    name, fn = select_backend(backend, device, q.dtype)
    if q1.shape[0] == 0:  # no tangents: only the primal
        o = attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
        return o, q1.new_zeros(q1.shape), q1.new_zeros(q1.shape)
    return fn(q, k, v, q1, k1, v1, q2, k2, v2, causal=causal, key_padding_mask=key_padding_mask, scale=scale)


def _register_fake() -> None:
    """Shape functions of the C++ op, for torch.compile / opcheck (only when the extension loaded)."""
    if not op_available("attention_jet2"):
        return

    @torch.library.register_fake("fasthess::attention_jet2")
    def _(q, k, v, q1, k1, v1, q2, k2, v2, keep, causal, scale):  # noqa: ANN001, ANN202
        return q.new_empty(q.shape), q1.new_empty(q1.shape), q1.new_empty(q1.shape)


_register_fake()
