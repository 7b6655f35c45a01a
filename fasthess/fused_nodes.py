"""Attention and layer norm as single recorded nodes while the tangent-adjoint engine captures.

Under :func:`fasthess.autodiff_safe` ``F.scaled_dot_product_attention`` and ``F.layer_norm``
run as plain-op decompositions, so the recorder of :mod:`fasthess.capture` sees attention as
``bmm + softmax + bmm`` (a ``(K, B, H, T, T)`` tangent per op in every pass) and layer norm
as about ten elementwise ops. While :func:`fasthess.capture.capture` records with
``fused=True`` (the tangent-adjoint engine sets it, see :func:`enabled`), the decompositions
call the custom ops defined here instead, for the cases the 2-jet kernels take:

* ``fasthess::attention_fused(q, k, v, key_padding_mask, causal, scale)``: 4-D ``(B, H, T, D)``
  q, k, v with k and v of one shape, and no mask, ``is_causal``, or a mask that is exactly
  a key-padding mask, optionally combined with the causal one (boolean, or additive with
  0 / ``-inf`` / ``finfo.min`` entries, as ``nn.MultiheadAttention`` and HF models pass it);
* ``fasthess::layer_norm_fused(x, weight, bias, eps)``: layer norm over the last dim;
* ``fasthess::cross_entropy_fused(z, y, ignore_index)``: ``F.cross_entropy`` of ``(N, V)`` logits
  and class indices with the default mean reduction, no class weights, no label smoothing
  (its rule runs the cross-entropy 2-jet kernel instead of log-softmax + ``nll_loss`` rules).

Anything else keeps the plain decomposition. Each op's forward is the math path and its
autograd formula is hand-written (one backward pass is all the engine's replay needs),
so the recorder sees ONE node whose rule in :mod:`fasthess.engines.second_order_rules`
calls the attention / layer-norm 2-jet kernel families. Other engines never see these
ops: the flag is off outside the tangent-adjoint engine's capture.

Which nodes are fused (:func:`mode`; ``FASTHESS_FUSED_NODES`` in the environment, or
:func:`using` within a ``with`` block):

* ``"auto"`` (default): every supported case, except attention on a CPU with fewer than
  :data:`CPU_MIN_KEYS` keys: there the C++ kernel's per-block products cost more than the
  batched ``bmm`` of the plain ops (measured with ``benchmarks/fused_nodes.py``, one core:
  seq2seq 16 keys, head dim 16: 0.56x the entries/s with every attention fused; encoder
  32 keys, head dim 32: 0.96x; 128 keys, head dim 64: 1.04x);
* ``"all"``: every supported case (tests, benchmarks);
* ``"0"`` / ``"off"``: none (:func:`disabled`).

Example:
    >>> import torch
    >>> from fasthess.capture import capture
    >>> from fasthess.decompositions import autodiff_safe
    >>> x = torch.randn(2, 3, 4)
    >>> f = lambda ps: torch.nn.functional.layer_norm(x @ ps[0], (4,)).pow(2).sum()
    >>> with autodiff_safe():
    ...     g = capture(f, [torch.randn(4, 4)], fused=True)
    >>> [str(n.func) for n in g.nodes][-3:]  # one node instead of ~10 elementwise ops
    ['fasthess.layer_norm_fused.default', 'aten.pow.Tensor_Scalar', 'aten.sum.default']
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from .kernels.attention.reference import probabilities

__all__ = [
    "CPU_MIN_KEYS", "attention_fused", "cross_entropy_fused", "disabled", "enabled", "layer_norm_fused", "mode",
    "padding_form",
    "recording", "try_attention", "try_cross_entropy", "try_layer_norm", "using",
]

CPU_MIN_KEYS = 128  # "auto": attention on a CPU is fused from this many keys on

# While the tangent-adjoint engine records: a predicate "does this tensor depend on the
# selected parameters" (from the recorder), else None.
_recording: contextvars.ContextVar[Callable[[Tensor], bool] | None] = contextvars.ContextVar(
    "fasthess_fused_recording", default=None
)
_mode: contextvars.ContextVar[str | None] = contextvars.ContextVar("fasthess_fused_mode", default=None)
_MODES = {"auto": "auto", "all": "all", "1": "all", "on": "all", "0": "off", "off": "off"}


def mode() -> str:
    """``"auto"``, ``"all"`` or ``"off"``: set by :func:`using`, else ``FASTHESS_FUSED_NODES`` (default ``auto``).

    Raises:
        ValueError: ``FASTHESS_FUSED_NODES`` has another value.
    """
    chosen = _mode.get()
    if chosen is not None:
        return chosen
    env = os.environ.get("FASTHESS_FUSED_NODES", "auto").strip().lower()
    if env not in _MODES:
        raise ValueError(f"FASTHESS_FUSED_NODES={env!r}: use 'auto' (default), 'all' or '0' (off)")
    return _MODES[env]


def enabled() -> bool:
    """Whether the tangent-adjoint engine should record fused nodes at all."""
    return mode() != "off"


@contextlib.contextmanager
def using(which: str) -> Iterator[None]:
    """Fuse ``"auto"``, ``"all"`` or ``"off"`` (no) nodes inside this block, whatever the environment says.

    Example:
        >>> with using("off"):
        ...     enabled()
        False
    """
    if which not in ("auto", "all", "off"):
        raise ValueError(f"fused-node mode {which!r}: use 'auto', 'all' or 'off'")
    token = _mode.set(which)
    try:
        yield
    finally:
        _mode.reset(token)


def disabled() -> contextlib.AbstractContextManager[None]:
    """Record attention, layer norm and cross-entropy as their plain ops inside this block."""
    return using("off")


@contextlib.contextmanager
def recording(depends: Callable[[Tensor], bool]) -> Iterator[None]:
    """Set by :func:`fasthess.capture.capture`: the decompositions emit fused nodes inside."""
    token = _recording.set(depends)
    try:
        yield
    finally:
        _recording.reset(token)


# ----------------------------------------------------------------------------- attention


@torch.library.custom_op("fasthess::attention_fused", mutates_args=())
def attention_fused(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool, scale: float
) -> Tensor:
    """``softmax(q kᵀ·scale + mask) v`` on the math path; ``key_padding_mask``: ``(B, Tk)`` bool, True = ignored.

    Shapes: q ``(B, H, Tq, D)``, k and v ``(B, H, Tk, D)``; returns ``(B, H, Tq, D)``.
    """
    return torch.matmul(probabilities(q, k, causal, key_padding_mask, scale), v)


@attention_fused.register_fake
def _(q, k, v, key_padding_mask, causal, scale):  # noqa: ANN001, ANN202
    return q.new_empty(q.shape)


def _attention_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    q, k, v, mask, causal, scale = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.causal, ctx.scale = causal, scale


def _attention_backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    q, k, v, mask = ctx.saved_tensors
    p = probabilities(q, k, ctx.causal, mask, ctx.scale)  # recomputed: the forward keeps no T×T tensor
    dv = torch.matmul(p.transpose(-2, -1), grad)
    dp = torch.matmul(grad, v.transpose(-2, -1))
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * ctx.scale
    return torch.matmul(ds, k), torch.matmul(ds.transpose(-2, -1), q), dv, None, None, None


attention_fused.register_autograd(_attention_backward, setup_context=_attention_setup)


def _blocked(attn_mask: Tensor) -> Tensor | None:
    """Boolean "ignored" positions of a mask, or None when it is not a pure mask (e.g. a learned bias)."""
    if attn_mask.dtype == torch.bool:
        return ~attn_mask
    if not attn_mask.is_floating_point():
        return None
    blocked = (attn_mask == float("-inf")) | (attn_mask == torch.finfo(attn_mask.dtype).min)
    return blocked if bool(((attn_mask == 0) | blocked).all()) else None


def _as_padding(blocked: Tensor, b: int, h: int, tq: int, tk: int) -> tuple[Tensor | None, bool] | None:
    """``(key_padding_mask, causal)`` with ``blocked == causal ∪ padding``, or None when it has another form."""
    try:
        blocked = blocked.expand(b, h, tq, tk)
    except RuntimeError:
        return None
    if not bool((~blocked).any(-1).all()):
        return None  # a row sees no key: the math path's value differs from the kernels' (0)
    pad = blocked[:, 0, 0, :]
    if bool((blocked == pad[:, None, None, :]).all()):
        return (pad if bool(pad.any()) else None), False
    above = torch.ones(tq, tk, dtype=torch.bool, device=blocked.device).triu(1)
    pad = blocked[:, 0, -1, :] & ~above[-1]
    if bool((blocked == (above | pad[:, None, None, :])).all()):
        return (pad if bool(pad.any()) else None), True
    return None


def padding_form(attn_mask: Tensor, b: int, h: int, tq: int, tk: int) -> tuple[Tensor | None, bool] | None:
    """An SDPA ``attn_mask`` as ``(key_padding_mask, causal)`` for ``(B, H, Tq, Tk)`` scores, or None.

    None when the mask is anything but key padding (optionally with the causal mask): a bias,
    another pattern, or a query row that sees no key. The mask must be a plain constant tensor.
    """
    blocked = _blocked(attn_mask)
    return None if blocked is None else _as_padding(blocked, b, h, tq, tk)


def try_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> Tensor | None:
    """The fused node for a ``F.scaled_dot_product_attention`` call it supports (while recording), else None."""
    depends = _recording.get()
    if depends is None or not enabled():
        return None
    if query.dim() != 4 or key.shape != value.shape or key.dim() != 4:
        return None
    if query.shape[:2] != key.shape[:2] or query.shape[-1] != key.shape[-1]:
        return None  # broadcast batch/heads, grouped-query attention, other value width
    if not (query.dtype == key.dtype == value.dtype) or not query.is_floating_point():
        return None
    b, h, tq, d = query.shape
    tk = key.shape[-2]
    if mode() == "auto" and key.device.type == "cpu" and tk < CPU_MIN_KEYS:
        return None  # the plain ops' batched bmm is faster there (see the module docstring)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    causal, pad = bool(is_causal), None
    if attn_mask is not None:
        if is_causal or depends(attn_mask):
            return None  # SDPA refuses both; a parameter-dependent mask is a bias the kernels do not take
        form = padding_form(attn_mask, b, h, tq, tk)
        if form is None:
            return None
        pad, causal = form
    return attention_fused(query, key, value, pad, causal, scale)


# ----------------------------------------------------------------------------- layer norm


def _normalized(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    c = x - x.mean(-1, keepdim=True)
    r = torch.rsqrt((c * c).mean(-1, keepdim=True) + eps)
    return c * r, r


@torch.library.custom_op("fasthess::layer_norm_fused", mutates_args=())
def layer_norm_fused(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Layer norm over the last dim on the mean/variance decomposition; ``x`` ``(..., D)``, weight/bias ``(D,)``."""
    y = _normalized(x, eps)[0]
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


@layer_norm_fused.register_fake
def _(x, weight, bias, eps):  # noqa: ANN001, ANN202
    return x.new_empty(x.shape)


def _layer_norm_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps, ctx.has_bias = eps, bias is not None


def _layer_norm_backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    x, weight = ctx.saved_tensors
    xh, r = _normalized(x, ctx.eps)
    g = grad * weight if weight is not None else grad
    dx = r * (g - g.mean(-1, keepdim=True) - xh * (g * xh).mean(-1, keepdim=True))
    lead = tuple(range(x.dim() - 1))
    dw = (grad * xh).sum(lead) if weight is not None else None
    db = grad.sum(lead) if ctx.has_bias else None
    return dx, dw, db, None


layer_norm_fused.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


def try_layer_norm(
    input: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor | None:
    """The fused node for an ``F.layer_norm`` over the last dim (while recording), else None."""
    if _recording.get() is None or not enabled():
        return None
    if len(normalized_shape) != 1 or input.dim() < 1 or input.shape[-1] != normalized_shape[0]:
        return None
    if not input.is_floating_point() or input.numel() == 0:
        return None
    for t in (weight, bias):
        if t is not None and (t.shape != input.shape[-1:] or t.dtype != input.dtype):
            return None
    return layer_norm_fused(input, weight, bias, float(eps))


# ----------------------------------------------------------------------------- cross-entropy


@torch.library.custom_op("fasthess::cross_entropy_fused", mutates_args=())
def cross_entropy_fused(z: Tensor, y: Tensor, ignore_index: int) -> Tensor:
    """Mean cross-entropy of ``(N, V)`` logits and ``(N,)`` class indices over the rows not ``ignore_index``."""
    keep = y != ignore_index
    picked = torch.log_softmax(z, -1).gather(1, torch.where(keep, y, 0)[:, None])[:, 0]
    return -(picked * keep).sum() / keep.sum()


@cross_entropy_fused.register_fake
def _(z, y, ignore_index):  # noqa: ANN001, ANN202
    return z.new_empty(())


def _cross_entropy_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    z, y, ignore_index = inputs
    ctx.save_for_backward(z, y)
    ctx.ignore_index = ignore_index


def _cross_entropy_backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    z, y = ctx.saved_tensors
    keep = y != ctx.ignore_index
    dz = torch.softmax(z, -1)
    dz[torch.arange(z.shape[0], device=z.device), torch.where(keep, y, 0)] -= 1
    return dz * (keep[:, None] * (grad / keep.sum())), None, None


cross_entropy_fused.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup)


def try_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor | None:
    """The fused node for an ``F.cross_entropy`` call it supports (while recording), else None."""
    if _recording.get() is None or not enabled():
        return None
    if weight is not None or size_average is not None or reduce is not None or reduction != "mean" or label_smoothing:
        return None
    if input.dim() != 2 or not input.is_floating_point() or target.shape != input.shape[:1]:
        return None
    if target.dtype not in (torch.int64, torch.int32) or not bool((target != ignore_index).any()):
        return None
    return cross_entropy_fused(input, target.long(), int(ignore_index))
