"""Attention whose backward is one ``torch.autograd.Function`` with the HVP kernel as its forward-mode rule.

Forward-over-reverse Hessian-vector products (``vmap(jvp(grad(f)))``, the ``fwd_rev`` engine)
differentiate the backward pass in forward mode. Through the plain math path every tangent is
pushed through the attention backward op by op (several ``T×T`` tensors per tangent). Here
attention is :class:`_Attention`, whose backward is :class:`_AttentionBackward` (``(dq, dk, dv)``
from ``dout``), whose ``jvp`` is :func:`~fasthess.kernels.attention_hvp.attention_hvp`: one call
for all the tangents of a ``vmap`` (the C++ op's vmap rule folds the vmapped dimension into ``N``;
the ``torch`` backend is vmapped op by op).

:func:`route` turns it on for :func:`fasthess.decompositions.scaled_dot_product_attention`
(for calls it covers: 4-d inputs, no ``attn_mask`` or one that is exactly a key-padding mask, optionally
with the causal one, as :func:`fasthess.fused_nodes.padding_form` reads it; no dropout, no GQA; see :func:`routes`);
the ``fwd_rev`` engine's ``hvp`` enters it. Other transforms (double backward, forward-over-forward) keep the
plain decomposition: this Function has no second-order reverse rule.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import Tensor

from ...errors import BackendUnavailableError
from ..attention.reference import attention as attention_math
from ..registry import op_available, preferred_backend

__all__ = ["attention", "mask_form", "route", "routed", "routes"]

_active: contextvars.ContextVar[bool] = contextvars.ContextVar("fasthess_attention_hvp_route", default=False)


@contextlib.contextmanager
def route() -> Iterator[None]:
    """Inside, :func:`fasthess.decompositions.scaled_dot_product_attention` uses :func:`attention` where it can.

    Example:
        >>> with route():
        ...     routed()
        True
        >>> routed()
        False
    """
    token = _active.set(True)
    try:
        yield
    finally:
        _active.reset(token)


def routed() -> bool:
    """Whether :func:`route` is active in this context."""
    return _active.get()


# backends "auto" routes through; "triton" and "cuda" join once their end-to-end GPU tests
# (tests/test_gpu_kernels.py: test_fwd_rev_hutchinson_routed_through_*) have passed
AUTO_ROUTED = ("cpp",)


def routes(q: Tensor) -> bool:
    """Whether attention on tensors like ``q`` goes through :func:`attention` here.

    Inside :func:`route`, when ``"auto"`` picks a backend in :data:`AUTO_ROUTED` for these tensors,
    or a backend chosen with :func:`~fasthess.kernels.registry.use_backend` takes them. On the CPU
    the C++ op makes fwd_rev Hutchinson faster, while the ``torch`` backend under ``vmap`` is no
    faster than the plain decomposition (README, Kernels), so ``"auto"`` keeps the latter there.
    """
    if not routed():
        return False
    from . import family, select_backend

    backend = preferred_backend(family.name, family.backends)
    try:
        name = select_backend(backend, q.device.type, q.dtype)[0]
    except (TypeError, BackendUnavailableError):  # the preferred backend does not take these tensors
        return False
    return backend != "auto" or name in AUTO_ROUTED


def mask_form(attn_mask: Tensor, q: Tensor, k: Tensor, is_causal: bool) -> tuple[Tensor | None, bool] | None:
    """``(key_padding_mask, causal)`` of a constant SDPA ``attn_mask`` the kernel takes, else None.

    A mask inside a function transform (one that depends on the parameters or the tangents: a
    bias) is not read: the plain decomposition differentiates it.
    """
    from ...fused_nodes import padding_form

    if is_causal or torch._C._functorch.is_functorch_wrapped_tensor(attn_mask) or attn_mask.requires_grad:
        return None
    return padding_form(attn_mask, q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _hvp(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, tangents: list[Tensor], pad: Tensor | None, causal: bool,
         scale: float):
    from . import attention_hvp, family  # the package imports this module's users, not the reverse

    backend = preferred_backend(family.name, family.backends)
    return attention_hvp(q, k, v, dout, *tangents, causal=causal, key_padding_mask=pad, scale=scale, backend=backend)


class _AttentionBackward(torch.autograd.Function):
    """``(q, k, v, dout) ↦ (dq, dk, dv)``; forward-mode rule: the attention HVP kernel."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, pad: Tensor | None, causal: bool, scale: float):  # noqa: ANN205
        none = [t.new_zeros((0, *t.shape)) for t in (q, k, v, dout)]  # N = 0: the backward only
        return _hvp(q, k, v, dout, none, pad, causal, scale)[:3]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        q, k, v, dout, ctx.pad, ctx.causal, ctx.scale = inputs
        ctx.save_for_forward(q, k, v, dout)

    @staticmethod
    def jvp(ctx, q1, k1, v1, dout1, _pad, _causal, _scale):  # noqa: ANN001, ANN205
        primals = ctx.saved_tensors
        tangents = [(p.new_zeros(p.shape) if t is None else t)[None] for t, p in zip((q1, k1, v1, dout1), primals)]
        out = _hvp(*primals, tangents, ctx.pad, ctx.causal, ctx.scale)
        return out[3][0], out[4][0], out[5][0]


class _Attention(torch.autograd.Function):
    """Math-path attention whose backward is :class:`_AttentionBackward`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, pad: Tensor | None, causal: bool, scale: float) -> Tensor:
        return attention_math(q, k, v, causal=causal, key_padding_mask=pad, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        q, k, v, ctx.pad, ctx.causal, ctx.scale = inputs  # the mask is a constant: no derivative
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v)

    @staticmethod
    def backward(ctx, dout):  # noqa: ANN001, ANN205
        q, k, v = ctx.saved_tensors
        return (*_AttentionBackward.apply(q, k, v, dout, ctx.pad, ctx.causal, ctx.scale), None, None, None)

    @staticmethod
    def jvp(ctx, q1, k1, v1, _pad, _causal, _scale):  # noqa: ANN001, ANN205
        primals = ctx.saved_tensors
        tangents = tuple(p.new_zeros(p.shape) if t is None else t for t, p in zip((q1, k1, v1), primals))

        def f(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
            return attention_math(a, b, c, causal=ctx.causal, key_padding_mask=ctx.pad, scale=ctx.scale)

        return torch.func.jvp(f, primals, tangents)[1]


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float, key_padding_mask: Tensor | None = None
) -> Tensor:
    """Attention ``(B, H, Tq, D) × (B, H, Tk, D)² → (B, H, Tq, D)`` routed through the HVP kernel.

    ``key_padding_mask``: ``(B, Tk)`` bool, ``True`` = ignored; a constant (no derivative).

    Same values and derivatives as :func:`fasthess.kernels.attention.reference.attention`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> q, k, v, t = (torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64) for _ in range(4))
        >>> def hvp(fn):
        ...     grad = torch.func.grad(lambda x: fn(x, k, v, causal=True, scale=0.5).sin().sum())
        ...     return torch.func.jvp(grad, (q,), (t,))[1]
        >>> torch.allclose(hvp(attention), hvp(attention_math))
        True
    """
    return _Attention.apply(q, k, v, key_padding_mask, causal, scale)


def register_fold_vmap(name: str, op) -> None:  # noqa: ANN001
    """vmap rule of an attention-HVP op ``name`` (schema of ``torch.ops.fasthess.attention_hvp``): vmapped
    tangents become more tangents, one kernel call; batched primals fall back to a loop."""

    @torch.library.register_vmap(name)
    def _(info, in_dims, q, k, v, dout, q1, k1, v1, dout1, keep, causal, scale):  # noqa: ANN001, ANN202
        size = info.batch_size
        if any(d is not None for d in in_dims[:4]) or in_dims[8] is not None:  # batched primals: a loop
            args = (q, k, v, dout, q1, k1, v1, dout1, keep)
            outs = [op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)), causal, scale)
                    for i in range(size)]
            return tuple(torch.stack(o) for o in zip(*outs)), (0,) * 6
        n = (q1 if in_dims[4] is None else q1.movedim(in_dims[4], 0)[0]).shape[0]

        def fold(t: Tensor, d: int | None) -> Tensor:  # (size, N, ...) -> (size·N, ...)
            t = t.expand(size, *t.shape) if d is None else t.movedim(d, 0)
            return t.reshape(size * n, *t.shape[2:])

        ts = [fold(t, d) for t, d in zip((q1, k1, v1, dout1), in_dims[4:8])]
        dq, dk, dv, dq1, dk1, dv1 = op(q, k, v, dout, *ts, keep, causal, scale)
        unfold = [t.reshape(size, n, *t.shape[1:]) for t in (dq1, dk1, dv1)]
        return (dq, dk, dv, *unfold), (None, None, None, 0, 0, 0)


if op_available("attention_hvp"):
    register_fold_vmap("fasthess::attention_hvp", torch.ops.fasthess.attention_hvp)
