"""Attention HVP: the tangent of the attention backward along ``N`` tangent sets, in one pass.

For forward-over-reverse Hessian-vector products (Hutchinson): through an attention layer,
``jvp(grad(f))`` needs ``d/dε (dq, dk, dv)`` at ``(q, k, v, dout) + ε (q1, k1, v1, dout1)``.

Backends, in order of preference for ``backend="auto"``:

* ``triton``: FlashAttention-2-style Triton kernels (:mod:`.triton_kernels`) on CUDA tensors,
  as the custom op ``torch.ops.fasthess.attention_hvp_triton`` (for its vmap rule); float32/16/bf16.
* ``cuda``: ``torch.ops.fasthess.attention_hvp`` on CUDA tensors (``csrc/cuda/attention_hvp.cu``, built
  only against a CUDA torch); float32/float64, any head dim, the ``N`` tangents of a call share the primal
  score tiles. After ``triton`` for ``"auto"``: it takes float64 (which ``triton`` does not), while which of
  the two is faster in float32 has not been measured yet (``benchmarks/kernels.py --ops attention_hvp``).
* ``cpp``: ``torch.ops.fasthess.attention_hvp`` on CPU tensors (``csrc/attention_hvp.cpp``); float32/float64.
* ``torch``: the same query-block algorithm in torch ops (:mod:`.blocked`), any device.

:mod:`.forward_over_reverse` routes attention through it inside the ``fwd_rev`` engine.

The spec is :func:`.reference.attention_hvp` (``torch.func.jvp`` of ``torch.func.vjp`` on the math path).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..registry import KernelFamily, cuda_op_available, op_available, triton_available
from .blocked import attention_hvp_blocked
from .reference import attention_hvp as attention_hvp_reference
from .reference import attention_vjp

__all__ = ["attention_hvp", "attention_hvp_reference", "attention_vjp", "family", "select_backend"]

family = KernelFamily("attention_hvp")


def _keep(key_padding_mask: Tensor | None) -> Tensor | None:
    return None if key_padding_mask is None else ~key_padding_mask.to(torch.bool)


@functools.lru_cache(maxsize=None)
def triton_op():  # noqa: ANN201
    """The Triton kernels as ``torch.ops.fasthess.attention_hvp_triton`` (same schema as the C++ op), with a vmap rule."""
    from .forward_over_reverse import register_fold_vmap
    from .triton_kernels import attention_hvp_triton

    @torch.library.custom_op("fasthess::attention_hvp_triton", mutates_args=())
    def op(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, q1: Tensor, k1: Tensor, v1: Tensor, dout1: Tensor,
           keep: Tensor | None, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        pad = None if keep is None else ~keep.to(torch.bool)
        return attention_hvp_triton(q, k, v, dout, q1, k1, v1, dout1, causal=causal, key_padding_mask=pad, scale=scale)

    @op.register_fake
    def _(q, k, v, dout, q1, k1, v1, dout1, keep, causal, scale):  # noqa: ANN001, ANN202
        return tuple(t.new_empty(t.shape) for t in (q, k, v, q1, k1, v1))

    register_fold_vmap("fasthess::attention_hvp_triton", op)
    return op


@family.register("triton", available=lambda: triton_available(f"{__name__}.triton_kernels"), devices=("cuda",))
def _triton(q, k, v, dout, q1, k1, v1, dout1, *, causal, key_padding_mask, scale):
    return triton_op()(q, k, v, dout, q1, k1, v1, dout1, _keep(key_padding_mask), causal, scale)


def _op(q, k, v, dout, q1, k1, v1, dout1, *, causal, key_padding_mask, scale):
    """``torch.ops.fasthess.attention_hvp``: its CPU kernel (``cpp``) or its CUDA kernel (``cuda``)."""
    return torch.ops.fasthess.attention_hvp(q, k, v, dout, q1, k1, v1, dout1, _keep(key_padding_mask), causal, scale)


family.register("cuda", available=lambda: cuda_op_available("attention_hvp"), devices=("cuda",))(_op)
family.register("cpp", available=lambda: op_available("attention_hvp"), devices=("cpu",))(_op)


@family.register("torch", available=lambda: True)
def _torch(q, k, v, dout, q1, k1, v1, dout1, *, causal, key_padding_mask, scale):
    return attention_hvp_blocked(q, k, v, dout, q1, k1, v1, dout1, causal=causal, key_padding_mask=key_padding_mask,
                                 scale=scale)


# dtypes each compiled backend takes; "auto" passes over a backend for other dtypes
_DTYPES = {"triton": (torch.float32, torch.float16, torch.bfloat16), "cuda": (torch.float32, torch.float64),
           "cpp": (torch.float32, torch.float64)}


def select_backend(backend: str, device: str, dtype: torch.dtype):  # noqa: ANN201
    """``(name, implementation)`` for tensors of ``device`` type and ``dtype``; see :func:`attention_hvp`."""
    if backend == "auto":
        for name in family.backends:
            if dtype in _DTYPES.get(name, (dtype,)) and family._runs_on(name, device) and family.backends[name][0]():
                return family.select(name, device)
    name, fn = family.select(backend, device)
    if dtype not in _DTYPES.get(name, (dtype,)):
        raise TypeError(f"backend {name!r} takes {_DTYPES[name]}, not {dtype}; use backend='auto'")
    return name, fn


def _check(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, tangents: list[Tensor]) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k and v must be (B, H, Tk, D) with q's B, H, D; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if dout.shape != q.shape:
        raise ValueError(f"dout must have the output's shape {tuple(q.shape)}; got {tuple(dout.shape)}")
    n = tangents[0].shape[0] if tangents[0].dim() == 5 else -1
    for name, t, like in zip(("q1", "k1", "v1", "dout1"), tangents, (q, k, v, dout)):
        if t.shape != (n, *like.shape):
            raise ValueError(f"{name} must be (N, *{tuple(like.shape)}) with N = q1.shape[0]; got {tuple(t.shape)}")
    for name, t in zip(("k", "v", "dout", "q1", "k1", "v1", "dout1"), (k, v, dout, *tangents)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must have q's dtype and device ({q.dtype}, {q.device}); got {t.dtype}, {t.device}")


def attention_hvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    q1: Tensor,
    k1: Tensor,
    v1: Tensor,
    dout1: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The attention backward ``(dq, dk, dv)`` and its tangents along ``N`` tangent sets.

    Args:
        q: ``(B, H, Tq, D)`` queries; k, v: ``(B, H, Tk, D)``; dout: ``(B, H, Tq, D)`` upstream gradient.
        q1, k1, v1, dout1: ``(N, *shape)`` tangents of q, k, v and dout.
        causal: key ``j`` visible to query ``i`` only when ``j <= i``.
        key_padding_mask: ``(B, Tk)`` bool, ``True`` = padding (ignored).
        scale: default ``1/sqrt(D)``.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpp"`` or ``"torch"``.

    Returns:
        ``(dq, dk, dv, dq1, dk1, dv1)``: gradients shaped like q, k, v and their ``(N, *shape)``
        tangents (``N = 0``: the backward only); a query row that sees no key contributes 0.

    Raises:
        ValueError: inconsistent shapes, dtypes or devices.
        BackendUnavailableError: an explicit backend is unavailable here or not for these tensors.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = [torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(4)]
        >>> t = [torch.randn(3, 2, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(4)]
        >>> got = attention_hvp(*x, *t, causal=True)
        >>> want = attention_hvp_reference(*x, *t, causal=True)
        >>> all(torch.allclose(a, b) for a, b in zip(got, want))
        True
    """
    tangents = [q1, k1, v1, dout1]
    _check(q, k, v, dout, tangents)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    _, fn = select_backend(backend, q.device.type, q.dtype)
    return fn(q, k, v, dout, q1, k1, v1, dout1, causal=causal, key_padding_mask=key_padding_mask, scale=scale)


def _register_fake() -> None:
    """Shape functions of the C++ op, for torch.compile / opcheck (only when the extension loaded)."""
    if not op_available("attention_hvp"):
        return

    @torch.library.register_fake("fasthess::attention_hvp")
    def _(q, k, v, dout, q1, k1, v1, dout1, keep, causal, scale):  # noqa: ANN001, ANN202
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
                q1.new_empty(q1.shape), k1.new_empty(k1.shape), v1.new_empty(v1.shape))


_register_fake()

from . import forward_over_reverse  # noqa: E402, F401 - registers the C++ op's vmap rule
