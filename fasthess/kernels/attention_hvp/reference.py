"""Reference (pure torch) attention HVP: the tangent of the attention backward, the spec of every backend.

The backward of ``o = attention(q, k, v)`` (:func:`fasthess.kernels.attention.reference.attention`)
maps an upstream gradient ``dout`` to ``(dq, dk, dv) = VJP(attention)(q, k, v; dout)``. Its
tangent along ``(q1, k1, v1, dout1)``,

    d/dε VJP(attention)(q + ε q1, k + ε k1, v + ε v1; dout + ε dout1)  at ε = 0,

is ``H·(q1, k1, v1) + Jᵀ dout1`` with ``H`` the Hessian of ``⟨dout, attention⟩``: the
piece of a Hessian-vector product that forward-over-reverse (``jvp(grad(f))``) computes
when it passes through an attention layer. Here it is ``torch.func.jvp`` of
``torch.func.vjp`` on the math path, vmapped over ``N`` tangent sets (the definition:
slow, with ``T×T`` scores per tangent).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..attention.reference import attention


def attention_vjp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``: the attention backward (VJP with ``dout``) on the math path.

    Args:
        q: ``(B, H, Tq, D)``; k, v: ``(B, H, Tk, D)``; dout: ``(B, H, Tq, D)``.
        causal, key_padding_mask, scale: as in :func:`fasthess.kernels.attention.reference.attention`.

    Returns:
        Gradients shaped like ``q``, ``k``, ``v``.

    Example:
        >>> x = [torch.ones(1, 1, 2, 4) for _ in range(4)]
        >>> [t.shape[-2] for t in attention_vjp(*x, causal=True)]
        [2, 2, 2]
    """

    def f(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        return attention(a, b, c, causal=causal, key_padding_mask=key_padding_mask, scale=scale)

    return torch.func.vjp(f, q, k, v)[1](dout)


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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The attention backward and its tangents along ``N`` tangent sets (``jvp`` of ``vjp``).

    Args:
        q, k, v, dout: primal inputs and upstream gradient as in :func:`attention_vjp`.
        q1, k1, v1, dout1: ``(N, *shape)`` tangents of ``q``, ``k``, ``v`` and ``dout``.
        causal, key_padding_mask, scale: as in :func:`attention_vjp`.

    Returns:
        ``(dq, dk, dv, dq1, dk1, dv1)``: the primal gradients and their ``(N, *shape)`` tangents.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = [torch.randn(1, 1, 3, 2, generator=g, dtype=torch.float64) for _ in range(4)]
        >>> t = [torch.randn(2, 1, 1, 3, 2, generator=g, dtype=torch.float64) for _ in range(4)]
        >>> out = attention_hvp(*x, *t)
        >>> out[0].shape, out[3].shape
        (torch.Size([1, 1, 3, 2]), torch.Size([2, 1, 1, 3, 2]))
    """

    def backward(a: Tensor, b: Tensor, c: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return attention_vjp(a, b, c, g, causal=causal, key_padding_mask=key_padding_mask, scale=scale)

    def one(*tangents: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        return torch.func.jvp(backward, (q, k, v, dout), tangents)

    primal, tangent = torch.func.vmap(one, out_dims=(None, 0))(q1, k1, v1, dout1)
    return (*primal, *tangent)
