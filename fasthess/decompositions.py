"""Make an unmodified model give correct higher-order derivatives under torch 2.13.

Some fused kernels have no (or a wrong) higher-order derivative rule, and they fail
in ways that range from an error to a silently wrong number:

* ``F.layer_norm`` / ``F.batch_norm`` / ``F.group_norm``: nested forward AD
  (``jvp(jvp)``) through the fused kernel gives wrong second derivatives with
  respect to the input.
* ``F.scaled_dot_product_attention``: the CPU flash kernel has neither a
  forward-AD rule nor a double backward.
* ``F.mse_loss``: forward-over-reverse raises on an immutable ZeroTensor.
* ``F.binary_cross_entropy_with_logits`` (without ``pos_weight``): nested forward AD
  raises on an immutable ZeroTensor.
* ``F.huber_loss`` / ``F.soft_margin_loss``: the fused backward has no forward-AD rule.
* ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` fast path: a fused
  kernel with no forward-AD rule.

:func:`autodiff_safe` swaps these for plain-op decompositions, whose derivative
rules of every order are right, for the duration of a ``with`` block. The swap is
done on the ``torch.nn.functional`` module attributes, which is where ``nn``
modules, ``F.multi_head_attention_forward`` and HF ``transformers`` look them up
at call time. Code that bound one of these functions to a local name before the
block starts keeps the original; the dense-Hessian tests exist to catch that.

While the tangent-adjoint engine records a loss (:mod:`fasthess.fused_nodes`), layer norm
over the last dim, the attention cases the 2-jet kernels take and plain ``F.cross_entropy``
(otherwise passed through unchanged) become single custom ops instead, so that engine can
run the fused kernels on them.

The same hook refuses functional dropout that is active (``training=True``,
``p > 0``), since it would make the loss a random function.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import TrainingModeError
from .fused_nodes import try_attention, try_cross_entropy, try_layer_norm

__all__ = ["autodiff_safe", "layer_norm", "scaled_dot_product_attention"]


def _normalize(x: Tensor, dims: Sequence[int], eps: float) -> Tensor:
    mean = x.mean(dim=tuple(dims), keepdim=True)
    centered = x - mean
    var = (centered * centered).mean(dim=tuple(dims), keepdim=True)
    return centered * torch.rsqrt(var + eps)


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Decomposed ``F.layer_norm`` (same signature, correct derivatives of any order)."""
    fused = try_layer_norm(input, tuple(normalized_shape), weight, bias, eps)
    if fused is not None:
        return fused
    n = len(normalized_shape)
    out = _normalize(input, range(input.dim() - n, input.dim()), eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """Decomposed ``F.rms_norm``."""
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    dims = tuple(range(input.dim() - len(normalized_shape), input.dim()))
    out = input * torch.rsqrt((input * input).mean(dim=dims, keepdim=True) + eps)
    return out * weight if weight is not None else out


def _channel_shape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _channel_affine(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """Per-channel (dim 1) scale and shift."""
    shape = _channel_shape(x)
    if weight is not None:
        x = x * weight.view(shape)
    if bias is not None:
        x = x + bias.view(shape)
    return x


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Decomposed ``F.batch_norm``.

    In training mode it normalises with batch statistics but, unlike the fused
    kernel, never updates the running statistics: a curvature measurement must
    not change the model.
    """
    shape = _channel_shape(input)
    if training or running_mean is None or running_var is None:
        dims = [0] + list(range(2, input.dim()))
        out = _normalize(input, dims, eps)
    else:
        out = (input - running_mean.view(shape)) * torch.rsqrt(running_var.view(shape) + eps)
    return _channel_affine(out, weight, bias)


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Decomposed ``F.group_norm``."""
    grouped = input.reshape(input.shape[0], num_groups, -1)
    return _channel_affine(_normalize(grouped, [2], eps).reshape(input.shape), weight, bias)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Math-path ``F.scaled_dot_product_attention`` built from matmul and softmax.

    Shapes: query ``(..., L, E)``, key ``(..., S, E)``, value ``(..., S, Ev)``;
    returns ``(..., L, Ev)``. A boolean mask marks positions that take part.
    """
    if dropout_p > 0.0:
        raise TrainingModeError(
            f"scaled_dot_product_attention was called with dropout_p={dropout_p}: the loss "
            "would be random. Call model.eval() before measuring curvature."
        )
    fused = try_attention(query, key, value, attn_mask, is_causal, scale)
    if fused is not None:
        return fused
    if not enable_gqa and query.dim() == 4:
        from .kernels.attention_hvp import forward_over_reverse as fwd_rev

        if fwd_rev.routes(query) and key.shape == value.shape and key.shape[:2] == query.shape[:2] \
                and key.shape[-1] == query.shape[-1]:
            # inside the fwd_rev engine: the backward's tangent is the attention HVP kernel
            form = (None, is_causal) if attn_mask is None else fwd_rev.mask_form(attn_mask, query, key, is_causal)
            if form is not None:
                scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
                return fwd_rev.attention(query, key, value, causal=form[1], scale=scale, key_padding_mask=form[0])
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    L, S = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.matmul(torch.softmax(scores, dim=-1), value)


def _reduction(size_average: Any, reduce: Any, reduction: str) -> str:
    if size_average is not None or reduce is not None:
        return torch.nn._reduction.legacy_get_string(size_average, reduce)
    return reduction


def _reduced(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"{reduction} is not a valid value for reduction")


def _check_weight(weight: Tensor | None, input: Tensor) -> None:
    if weight is not None and weight.size() != input.size():
        raise ValueError("Weights and input must have the same size.")


def mse_loss(
    input: Tensor,
    target: Tensor,
    size_average: Any = None,
    reduce: Any = None,
    reduction: str = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    """Decomposed ``F.mse_loss`` (weighted ``"mean"``: divided by the sum of the weights, as torch does)."""
    reduction = _reduction(size_average, reduce, reduction)
    _check_weight(weight, input)
    diff = input - target
    sq = diff * diff
    if weight is None:
        return _reduced(sq, reduction)
    sq = sq * weight
    return sq.sum() / weight.sum() if reduction == "mean" else _reduced(sq, reduction)


def huber_loss(
    input: Tensor, target: Tensor, reduction: str = "mean", delta: float = 1.0, weight: Tensor | None = None
) -> Tensor:
    """Decomposed ``F.huber_loss`` (torch's fused one has no forward-mode derivative of its backward)."""
    _check_weight(weight, input)
    diff = input - target
    size = diff.abs()
    loss = torch.where(size < delta, 0.5 * diff * diff, delta * (size - 0.5 * delta))
    return _reduced(loss * weight if weight is not None else loss, reduction)


def soft_margin_loss(
    input: Tensor, target: Tensor, size_average: Any = None, reduce: Any = None, reduction: str = "mean"
) -> Tensor:
    """Decomposed ``F.soft_margin_loss``: ``log(1 + exp(-y x)) = -log σ(y x)`` (finite where torch's overflows)."""
    return _reduced(-F.logsigmoid(input * target), _reduction(size_average, reduce, reduction))


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: Any = None,
    reduce: Any = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor:
    """Decomposed ``F.binary_cross_entropy_with_logits``: ``(1 - y) x - (1 + (p - 1) y) log σ(x)``.

    The fused op's nested forward-mode derivative fails in torch 2.13 without ``pos_weight``.
    (``log σ`` is torch's stable ``logsigmoid``; a ``max(-x, 0) + log1p(exp(-|x|))`` form would
    get the derivative at ``x = 0`` wrong, where ``relu`` and ``abs`` have subgradient 0.)
    """
    reduction = _reduction(size_average, reduce, reduction)
    if target.size() != input.size():
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    log_weight = 1 if pos_weight is None else 1 + (pos_weight - 1) * target
    loss = (1 - target) * input - log_weight * F.logsigmoid(input)
    return _reduced(loss * weight if weight is not None else loss, reduction)


class _Patcher:
    """Reference-counted, thread-safe swap of ``torch.nn.functional`` attributes."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self._allow_dropout = 0
        self._saved: dict[str, Any] = {}
        self._saved_fastpath = True

    def _dropout_guard(self, name: str) -> Any:
        original = getattr(F, name)

        def guarded(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
            if training and p > 0.0 and not self._allow_dropout:
                raise TrainingModeError(
                    f"F.{name}(p={p}, training=True) ran inside the loss: the Hessian of a "
                    "random function is not defined. Call model.eval() first, or pass "
                    "allow_training_mode=True to measure it anyway."
                )
            return original(input, p, training, inplace)

        return guarded

    @staticmethod
    def _cross_entropy() -> Any:
        """``F.cross_entropy`` unchanged, except that it is one fused node while the tangent-adjoint engine records."""
        original = F.cross_entropy

        def cross_entropy(input: Tensor, target: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            fused = try_cross_entropy(input, target, *args, **kwargs)
            return fused if fused is not None else original(input, target, *args, **kwargs)

        return cross_entropy

    def replacements(self) -> dict[str, Any]:
        return {
            "layer_norm": layer_norm,
            "rms_norm": rms_norm,
            "batch_norm": batch_norm,
            "group_norm": group_norm,
            "scaled_dot_product_attention": scaled_dot_product_attention,
            "mse_loss": mse_loss,
            "huber_loss": huber_loss,
            "soft_margin_loss": soft_margin_loss,
            "binary_cross_entropy_with_logits": binary_cross_entropy_with_logits,
            "cross_entropy": self._cross_entropy(),
            "dropout": self._dropout_guard("dropout"),
            "dropout1d": self._dropout_guard("dropout1d"),
            "dropout2d": self._dropout_guard("dropout2d"),
            "dropout3d": self._dropout_guard("dropout3d"),
        }

    @contextlib.contextmanager
    def __call__(self, allow_dropout: bool = False) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                new = self.replacements()
                self._saved = {name: getattr(F, name) for name in new}
                for name, fn in new.items():
                    setattr(F, name, fn)
                self._saved_fastpath = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)
            self._depth += 1
            self._allow_dropout += int(allow_dropout)
        try:
            yield
        finally:
            with self._lock:
                self._allow_dropout -= int(allow_dropout)
                self._depth -= 1
                if self._depth == 0:
                    for name, fn in self._saved.items():
                        setattr(F, name, fn)
                    torch.backends.mha.set_fastpath_enabled(self._saved_fastpath)


_patcher = _Patcher()


def autodiff_safe(allow_dropout: bool = False) -> contextlib.AbstractContextManager[None]:
    """Context in which fused kernels with broken higher-order AD are decomposed.

    Args:
        allow_dropout: let active dropout run (the loss becomes random).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x = torch.randn(3, 4)
        >>> with autodiff_safe():
        ...     y = F.layer_norm(x, (4,))
        >>> torch.allclose(y, torch.nn.functional.layer_norm(x, (4,)), atol=1e-6)
        True
    """
    return _patcher(allow_dropout=allow_dropout)
