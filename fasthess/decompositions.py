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
* ``F.instance_norm`` (batch statistics): nested forward AD through ``native_batch_norm``
  is silently wrong, as for batch norm.
* ``F.glu``, ``F.hardsigmoid``: no forward AD of the backward (``hardsigmoid``: no double
  backward either).
* ``torch.cdist``, ``F.pdist`` / ``torch.pdist``: no double backward, no forward AD of the
  backward.
* ``torch.embedding_bag`` (``nn.EmbeddingBag``, ``F.embedding_bag``): no double backward and no
  forward AD; without grad it runs as ``_embedding_bag_forward_only``, which cannot be replayed.
* ``F.embedding`` with ``padding_idx``: torch's backward gives the padding row zero gradient,
  which is not the derivative of the lookup, so forward-mode AD disagrees with it
  (:func:`embedding` makes every engine follow the backward's convention).

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

Functions outside ``torch.nn.functional`` (``torch.cdist``, ``torch.pdist``,
``torch.embedding_bag``) are swapped on the ``torch`` module, where ``F.embedding_bag`` and user
code look them up.

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

__all__ = [
    "autodiff_safe", "cdist", "embedding_bag", "glu", "hardsigmoid", "instance_norm", "layer_norm", "pdist",
    "scaled_dot_product_attention",
]


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


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Decomposed ``F.instance_norm``: each (sample, channel) normalised over its spatial dims.

    ``y = (x − mean) / sqrt(var + eps) · weight + bias`` (biased variance). With
    ``use_input_stats=False`` the running statistics normalise, as batch norm in eval mode.
    Like :func:`batch_norm` it never updates the running statistics.
    """
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("Expected running_mean and running_var to be defined when use_input_stats is false")
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    if math.prod(input.shape[2:]) == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {input.size()}")
    return _channel_affine(_normalize(input, range(2, input.dim()), eps), weight, bias)


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


def glu(input: Tensor, dim: int = -1) -> Tensor:
    """Decomposed ``F.glu``: ``a ⊙ σ(b)`` with ``a, b`` the two halves of ``input`` along ``dim``."""
    if input.dim() == 0:
        raise RuntimeError("glu does not support scalars because halving size must be even")
    size = input.shape[dim]
    if size % 2:
        raise RuntimeError(f"Halving dimension must be even, but dimension {dim % input.dim()} is size {size}")
    a, b = input.split(size // 2, dim)
    return a * torch.sigmoid(b)


def hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    """Decomposed ``F.hardsigmoid``: ``hardtanh(x + 3, 0, 6) / 6``.

    The same values as torch's (``min(max(x + 3, 0), 6) / 6``) and the same derivative ``1/6`` on
    ``(−3, 3)``, ``0`` elsewhere, the kinks included (torch's backward rounds ``1/6`` to float32).
    """
    out = F.hardtanh(input + 3.0, 0.0, 6.0) / 6.0
    return input.copy_(out) if inplace else out


def _root_or_zero(s: Tensor, p: float) -> Tensor:
    """``s^(1/p)`` where ``s > 0`` and ``0`` where ``s <= 0``, with every derivative 0 there.

    Torch's distance backward gives a zero gradient at distance 0 (where ``s^(1/p)`` has none);
    masking the argument as well keeps the masked branch's derivatives finite.
    """
    positive = s > 0
    safe = s.masked_fill(~positive, 1)
    root = safe.sqrt() if p == 2 else safe.pow(1.0 / p)
    return root.masked_fill(~positive, 0)


def _p_norm(diff: Tensor, p: float) -> Tensor:
    """``‖diff‖_p`` over the last dim, as ``cdist`` / ``pdist`` compute it, with their backward's conventions.

    With ``u = diff``, ``d = (Σ|u_m|^p)^(1/p)``: torch's backward is ``sign(u)|u|^(p−1) / d^(p−1)``,
    and 0 where ``d = 0`` or (``p < 1``) ``u = 0``; ``p = 1``: ``sign(u)``; ``p = ∞``
    (``d = max|u_m|``): ``sign(u_m)`` for every ``m`` that attains the maximum; ``p = 0`` (the count
    of nonzeros): 0. The second derivative is that of the formula (0 for ``p ∈ {0, 1, ∞}``).
    """
    if p == 0:
        return (diff != 0).to(diff.dtype).sum(-1)
    a = diff.abs()
    if p == 1:
        return a.sum(-1)
    if math.isinf(p):
        top = a.detach().amax(-1, keepdim=True)
        # the value of max|u|; the derivative of Σ over the maximising m of |u_m|, as torch's backward
        through = (a - a.detach()).masked_fill(a.detach() != top, 0).sum(-1)
        return top.squeeze(-1) + through
    if p == 2:
        return _root_or_zero((diff * diff).sum(-1), 2)
    positive = a > 0
    powered = a.masked_fill(~positive, 1).pow(p).masked_fill(~positive, 0)
    return _root_or_zero(powered.sum(-1), p)


def _euclidean_dist(x1: Tensor, x2: Tensor) -> Tensor:
    """``cdist``'s matrix-product path for ``p = 2``: ``sqrt(max(|x1|² + |x2|² − 2 x1·x2, 0))``, as torch's."""
    x1_norm = x1.pow(2).sum(-1, keepdim=True)
    x2_norm = x2.pow(2).sum(-1, keepdim=True)
    x1_pad = torch.ones(x1_norm.shape, dtype=x1.dtype, device=x1.device)  # not recorded as a dependent op
    x2_pad = torch.ones(x2_norm.shape, dtype=x2.dtype, device=x2.device)
    x1_ = torch.cat([x1.mul(-2), x1_norm, x1_pad], -1)
    x2_ = torch.cat([x2, x2_pad, x2_norm], -1)
    return _root_or_zero(x1_.matmul(x2_.mT), 2)


_CDIST_MODES = {
    "use_mm_for_euclid_dist_if_necessary": 0, "use_mm_for_euclid_dist": 1, "donot_use_mm_for_euclid_dist": 2,
}


def _check_distance_input(x: Tensor, p: float, name: str) -> None:
    if p < 0:
        raise RuntimeError(f"{name} only supports non-negative p values")
    if not x.is_floating_point():
        raise RuntimeError(f"{name} only supports floating-point dtypes, X1 got: {str(x.dtype).split('.')[-1].title()}")


def cdist(x1: Tensor, x2: Tensor, p: float = 2.0, compute_mode: str = "use_mm_for_euclid_dist_if_necessary") -> Tensor:
    """Decomposed ``torch.cdist``: ``(..., P, M)`` and ``(..., R, M)`` to ``(..., P, R)`` p-norm distances.

    Takes torch's path: for ``p = 2`` with ``compute_mode="use_mm_for_euclid_dist"``, or the
    default mode and more than 25 rows in either input, the matrix-product form
    (:func:`_euclidean_dist`); otherwise the norm of the differences (:func:`_p_norm`, whose
    derivatives follow torch's backward where the norm has a kink).
    """
    if compute_mode not in _CDIST_MODES:
        raise ValueError(f"{compute_mode} is not a valid value for compute_mode")
    _check_distance_input(x1, p, "cdist")
    if x1.dim() < 2 or x2.dim() < 2:
        which, dims = (1, x1.dim()) if x1.dim() < 2 else (2, x2.dim())
        raise RuntimeError(f"cdist only supports at least 2D tensors, X{which} got: {dims}D")
    if x1.shape[-1] != x2.shape[-1]:
        raise RuntimeError(f"X1 and X2 must have the same number of columns. X1: {x1.shape[-1]} X2: {x2.shape[-1]}")
    mode = _CDIST_MODES[compute_mode]
    if p == 2 and (mode == 1 or (mode == 0 and max(x1.shape[-2], x2.shape[-2]) > 25)):
        return _euclidean_dist(x1, x2)
    return _p_norm(x1.unsqueeze(-2) - x2.unsqueeze(-3), p)


def pdist(input: Tensor, p: float = 2.0) -> Tensor:
    """Decomposed ``F.pdist``: the ``N(N−1)/2`` p-norm distances of rows ``i < j`` of an ``(N, M)`` input, row-major."""
    if input.dim() != 2:
        raise RuntimeError(f"pdist only supports 2D tensors, got: {input.dim()}D")
    _check_distance_input(input, p, "pdist")
    i, j = torch.triu_indices(input.shape[0], input.shape[0], 1, device=input.device)
    return _p_norm(input[i] - input[j], p)


def _detached_at_padding(out: Tensor, input: Tensor, padding_idx: int) -> Tensor:
    """``out`` with the lookups of ``padding_idx`` detached: same values, no derivative of any order there."""
    return torch.where((input == padding_idx).unsqueeze(-1), out.detach(), out)


def embedding_bag(
    weight: Tensor,
    indices: Tensor,
    offsets: Tensor,
    scale_grad_by_freq: bool = False,
    mode: int = 0,
    sparse: bool = False,
    per_sample_weights: Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decomposed ``torch.embedding_bag`` (``F.embedding_bag`` calls it with 1-D indices and offsets).

    Index ``e`` belongs to bag ``b`` with ``offsets[b] <= e`` (the last bag runs to the end; with
    ``include_last_offset`` the last offset only closes the count of bags); indices equal to
    ``padding_idx`` are left out. Mode 0 (sum): ``Σ_e w_e W[i_e]`` (``w``: ``per_sample_weights``
    or 1); 1 (mean): the sum over the bag's size; 2 (max): per feature the first row that attains
    the bag's maximum (torch's choice at ties). An empty bag gives zeros. Built from a lookup, a
    masked ``index_add`` and a ``gather``: the same values, and derivatives of every order in
    every mode (torch's own has neither forward AD nor a double backward). Besides the output it
    returns the bag of every index, the bag sizes and (max mode) the row of every maximum.
    """
    n, num_weights, dim = indices.numel(), weight.shape[0], weight.shape[1]
    if per_sample_weights is not None and mode != 0:
        raise RuntimeError("embedding_bag: per_sample_weights only supported with mode='sum'")
    if padding_idx is not None and not -num_weights <= padding_idx < num_weights:
        raise RuntimeError(f"padding_idx must be within the number of embeddings, -{num_weights} through "
                           f"{num_weights - 1}, but got {padding_idx}")
    starts = (offsets[:-1] if include_last_offset else offsets).long()
    bags = starts.numel()
    if n and bags and int(starts[0]) != 0:
        raise RuntimeError(
            "offsets[0] has to be 0, i.e., the first sequence in the mini-batch has to start from position 0. "
            f"However, got {int(starts[0])}"
        )
    bag = torch.bucketize(torch.arange(n, device=indices.device), starts, right=True) - 1
    keep = torch.ones_like(indices, dtype=torch.bool) if padding_idx is None else indices != padding_idx % num_weights
    sizes = torch.zeros(bags, dtype=torch.long, device=indices.device).index_add_(0, bag, keep.long())
    rows = torch.embedding(weight, indices, -1, False, sparse)
    if mode == 2:
        if n == 0:
            empty_bags = torch.zeros(bags, dim, dtype=weight.dtype, device=weight.device)
            return empty_bags, bag, sizes, indices.new_zeros(bags, dim)
        values = rows.detach().masked_fill(~keep[:, None], -math.inf)
        at = bag[:, None].expand(n, dim)
        top = torch.full((bags, dim), -math.inf, dtype=values.dtype, device=values.device)
        top = top.scatter_reduce(0, at, values, "amax")
        position = torch.arange(n, device=indices.device)[:, None].expand(n, dim)
        candidate = torch.where((values == top[bag]) & keep[:, None], position, n)
        first = torch.full((bags, dim), n, device=indices.device).scatter_reduce(0, at, candidate, "amin")
        empty = first == n
        first = first.masked_fill(empty, 0)
        return rows.gather(0, first).masked_fill(empty, 0), bag, sizes, indices[first].masked_fill(empty, 0)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(-1)
    # torch.zeros, not rows.new_zeros: a factory method of a recorded tensor is recorded as an op of the loss
    total = torch.zeros(bags, dim, dtype=rows.dtype, device=rows.device)
    total = total.index_add(0, bag, rows.masked_fill(~keep[:, None], 0))
    if mode == 1:
        total = total / sizes.clamp_min(1).to(total.dtype).unsqueeze(-1)
    return total, bag, sizes, indices.new_zeros(bags)


class _Patcher:
    """Reference-counted, thread-safe swap of ``torch.nn.functional`` (and a few ``torch``) attributes."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self._allow_dropout = 0
        self._saved: dict[tuple[Any, str], Any] = {}
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

    @staticmethod
    def _embedding() -> Any:
        """``F.embedding`` with ``padding_idx``: a plain lookup whose padding lookups are detached.

        Torch's backward gives the padding row zero gradient, so ``double_backward`` differentiates the
        loss with the padding lookups held constant, while forward mode differentiates the lookup
        itself. A lookup without ``padding_idx`` (same values) followed by detaching the padding
        lookups makes every engine compute that same, symmetric Hessian, also for weights tied
        elsewhere (and leaves no ``padding_idx`` for an engine to distrust).
        """
        original = F.embedding

        def embedding(
            input: Tensor, weight: Tensor, padding_idx: int | None = None, *args: Any, **kwargs: Any
        ) -> Tensor:
            if padding_idx is None:
                return original(input, weight, None, *args, **kwargs)
            if not -weight.shape[0] <= padding_idx < weight.shape[0]:
                raise AssertionError("Padding_idx must be within num_embeddings")  # torch's check and message
            out = original(input, weight, None, *args, **kwargs)
            return _detached_at_padding(out, input, padding_idx % weight.shape[0])

        return embedding

    @staticmethod
    def _embedding_bag() -> Any:
        """:func:`embedding_bag`, except with ``scale_grad_by_freq``, which keeps torch's op.

        Torch 2.13's backward then scales rows by factors that are not their counts (tested: the rows of
        ``[1, 2, 2, 3, 1, 1]`` all get 1/3), a first-order convention the decomposition does not copy; with
        torch's op no engine has a second derivative, so each one fails loudly instead.
        """
        original = torch.embedding_bag

        def bag(weight: Tensor, indices: Tensor, offsets: Tensor, scale_grad_by_freq: bool = False, *args: Any,
                **kwargs: Any) -> Any:
            if scale_grad_by_freq:
                return original(weight, indices, offsets, scale_grad_by_freq, *args, **kwargs)
            return embedding_bag(weight, indices, offsets, False, *args, **kwargs)

        return bag

    def replacements(self) -> dict[tuple[Any, str], Any]:
        functional = {
            "layer_norm": layer_norm,
            "rms_norm": rms_norm,
            "batch_norm": batch_norm,
            "group_norm": group_norm,
            "instance_norm": instance_norm,
            "scaled_dot_product_attention": scaled_dot_product_attention,
            "mse_loss": mse_loss,
            "huber_loss": huber_loss,
            "soft_margin_loss": soft_margin_loss,
            "binary_cross_entropy_with_logits": binary_cross_entropy_with_logits,
            "cross_entropy": self._cross_entropy(),
            "glu": glu,
            "hardsigmoid": hardsigmoid,
            "pdist": pdist,
            "embedding": self._embedding(),
            "dropout": self._dropout_guard("dropout"),
            "dropout1d": self._dropout_guard("dropout1d"),
            "dropout2d": self._dropout_guard("dropout2d"),
            "dropout3d": self._dropout_guard("dropout3d"),
        }
        on_torch = {"cdist": cdist, "pdist": pdist, "embedding_bag": self._embedding_bag()}
        return {**{(F, k): v for k, v in functional.items()}, **{(torch, k): v for k, v in on_torch.items()}}

    @contextlib.contextmanager
    def __call__(self, allow_dropout: bool = False) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                new = self.replacements()
                self._saved = {where: getattr(*where) for where in new}
                for (module, name), fn in new.items():
                    setattr(module, name, fn)
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
                    for (module, name), fn in self._saved.items():
                        setattr(module, name, fn)
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
