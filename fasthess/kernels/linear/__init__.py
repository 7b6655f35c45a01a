"""Linear-layer tangent kernels: batched 2-jets sharing the primal weight, one-hot weight seeds, and
the Hutchinson accumulation with probes regenerated from a seed.

Families (backend ``"auto"`` takes the first available for the tensors' device, in this order):

* ``onehot_weight_tangent``: ``triton`` (CUDA, :mod:`.triton_kernels`: the output written once, in
  tiles), ``cuda`` (CUDA, ``csrc/cuda/onehot_weight_tangent.cu``), ``cpp`` (CPU, writes the output
  directly), ``torch`` (an indexed copy, any device); the reference builds the dense ``(K, out, in)`` seeds.
* ``hutchinson_update_seeded_``: ``triton`` (CUDA), ``cuda`` (CUDA, ``csrc/cuda/hutchinson_update.cu``),
  ``cpp`` (CPU) — each regenerates the probes per coordinate in the pass over ``hz`` and never stores
  them; float32/float64 statistics for ``cuda`` and ``cpp`` — and ``torch`` (regenerates the ``(k, n)``
  probes, then the plain update). Every backend draws bit-identical probes (one hash, ``csrc/probe_hash.h``
  and its twins), so a probe can be regenerated on any device.

The spec of each is in :mod:`.reference`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import KernelFamily, cuda_op_available, op_available, triton_available
from .reference import hutchinson_update_seeded_ as _seeded_reference
from .reference import linear_jet2 as linear_jet2_reference
from .reference import onehot_weight_tangent as onehot_weight_tangent_reference
from .reference import rademacher

__all__ = [
    "hutchinson_update_seeded_", "linear_jet2", "linear_jet2_reference", "onehot_weight_tangent",
    "onehot_weight_tangent_reference", "rademacher", "onehot_family", "seeded_family",
]

onehot_family = KernelFamily("onehot_weight_tangent")
seeded_family = KernelFamily("hutchinson_update_seeded_")
_FLOATS = (torch.float32, torch.float64)
_TRITON = f"{__name__}.triton_kernels"


@onehot_family.register("triton", available=lambda: triton_available(_TRITON), devices=("cuda",))
def _onehot_triton(x: Tensor, rows: Tensor, cols: Tensor, out_features: int) -> Tensor:
    from .triton_kernels import onehot_weight_tangent_triton

    return onehot_weight_tangent_triton(x, rows, cols, out_features)


@onehot_family.register("cuda", available=lambda: cuda_op_available("onehot_weight_tangent"), devices=("cuda",))
def _onehot_cuda(x: Tensor, rows: Tensor, cols: Tensor, out_features: int) -> Tensor:
    return torch.ops.fasthess.onehot_weight_tangent(x, rows, cols, out_features)


@onehot_family.register("cpp", available=lambda: op_available("onehot_weight_tangent"), devices=("cpu",))
def _onehot_cpp(x: Tensor, rows: Tensor, cols: Tensor, out_features: int) -> Tensor:
    return torch.ops.fasthess.onehot_weight_tangent(x, rows, cols, out_features)


@onehot_family.register("torch", available=lambda: True)
def _onehot_torch(x: Tensor, rows: Tensor, cols: Tensor, out_features: int) -> Tensor:
    k = rows.numel()
    flat = x.reshape(-1, x.shape[-1])
    valid = (rows >= 0)[:, None]
    vals = torch.where(valid, flat[:, cols.clamp_min(0)].T, torch.zeros((), dtype=x.dtype, device=x.device))
    out = x.new_zeros(k, flat.shape[0], out_features)
    # out[k, :, rows[k]] = x[:, cols[k]]: one scatter along the output dim (a zero direction writes 0s)
    out.scatter_(2, rows.clamp_min(0).view(k, 1, 1).expand(k, flat.shape[0], 1), vals.unsqueeze(-1))
    return out.view(k, *x.shape[:-1], out_features)


@seeded_family.register("triton", available=lambda: triton_available(_TRITON), devices=("cuda",))
def _seeded_triton(mean: Tensor, m2: Tensor, hz: Tensor, seed: int, first_probe: int, count: int) -> None:
    from .triton_kernels import hutchinson_update_seeded_triton

    hutchinson_update_seeded_triton(mean, m2, hz, seed, first_probe, count)


@seeded_family.register("cuda", available=lambda: cuda_op_available("hutchinson_update_seeded_"), devices=("cuda",),
                        dtypes=_FLOATS)
def _seeded_cuda(mean: Tensor, m2: Tensor, hz: Tensor, seed: int, first_probe: int, count: int) -> None:
    torch.ops.fasthess.hutchinson_update_seeded_(mean, m2, hz.to(mean.dtype), seed, first_probe, count)


@seeded_family.register("cpp", available=lambda: op_available("hutchinson_update_seeded_"), devices=("cpu",),
                        dtypes=_FLOATS)
def _seeded_cpp(mean: Tensor, m2: Tensor, hz: Tensor, seed: int, first_probe: int, count: int) -> None:
    torch.ops.fasthess.hutchinson_update_seeded_(mean, m2, hz.to(mean.dtype), seed, first_probe, count)


seeded_family.register("torch", available=lambda: True)(_seeded_reference)


def onehot_weight_tangent(x: Tensor, rows: Tensor, cols: Tensor, out_features: int, backend: str = "auto") -> Tensor:
    """Output tangents ``x E_kᵀ`` of a linear layer along one-hot weight directions, without dense seeds.

    Args:
        x: ``(..., in)`` layer input.
        rows, cols: ``(K,)`` int64 weight coordinates (``rows[k] = -1``: a zero direction).
        out_features: rows of the ``(out, in)`` weight.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpp"`` or ``"torch"``.

    Returns:
        ``(K, ..., out)``, zero except ``[k, ..., rows[k]] = x[..., cols[k]]``.

    Example:
        >>> x = torch.arange(6.).view(2, 3)
        >>> onehot_weight_tangent(x, torch.tensor([0, -1]), torch.tensor([2, 0]), 2)[0].tolist()
        [[2.0, 0.0], [5.0, 0.0]]
    """
    rows, cols = rows.to(device=x.device, dtype=torch.long), cols.to(device=x.device, dtype=torch.long)
    if rows.shape != cols.shape or rows.dim() != 1:
        raise ValueError(f"rows and cols must be (K,) of equal size; got {tuple(rows.shape)} and {tuple(cols.shape)}")
    valid = rows >= 0
    if bool((rows >= out_features).any() | (valid & ((cols < 0) | (cols >= x.shape[-1]))).any()):
        raise IndexError(f"a coordinate lies outside the ({out_features}, {x.shape[-1]}) weight")
    _, fn = onehot_family.select(backend, x.device.type)
    return fn(x, rows, cols, out_features)


def linear_jet2(
    x: Tensor, w: Tensor, b: Tensor | None, x1: Tensor | None, w1: Tensor | None,
    x2: Tensor | None = None, w2: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """2-jet of ``F.linear`` along ``K`` tangent pairs; every input tangent product shares ``w`` in one matmul.

    ``y1 = x1 wᵀ + x w1ᵀ``, ``y2 = x2 wᵀ + 2 x1 w1ᵀ + x w2ᵀ``; a ``None`` tangent is zero (and costs
    nothing). Shapes as in :func:`.reference.linear_jet2`; at least one of ``x1``, ``w1`` is given.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, w = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
        >>> x1, w1 = torch.randn(2, 5, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
        >>> got = linear_jet2(x, w, None, x1, w1)
        >>> want = linear_jet2_reference(x, w, None, x1, w1, torch.zeros_like(x1), torch.zeros_like(w1))
        >>> all(torch.allclose(a, b) for a, b in zip(got, want))
        True
    """
    y = torch.nn.functional.linear(x, w, b)
    k = (x1 if x1 is not None else w1).shape[0]
    zero = y.new_zeros(k, *y.shape)

    def in_w(t: Tensor | None) -> Tensor:  # (K, ..., in) @ wᵀ as one (K·M, in) x (in, out) product
        return zero if t is None else (t.reshape(-1, w.shape[1]) @ w.T).view(k, *y.shape)

    def x_in(t: Tensor | None) -> Tensor:  # x @ t_kᵀ for every k, one batched product
        return zero if t is None else torch.matmul(x.reshape(-1, x.shape[-1]), t.transpose(-1, -2)).view(k, *y.shape)

    y1 = in_w(x1) + x_in(w1)
    y2 = in_w(x2) + x_in(w2)
    if x1 is not None and w1 is not None:
        y2 = y2 + 2 * torch.matmul(x1.reshape(k, -1, x1.shape[-1]), w1.transpose(-1, -2)).view(k, *y.shape)
    return y, y1, y2


def hutchinson_update_seeded_(
    mean: Tensor, m2: Tensor, hz: Tensor, seed: int, first_probe: int, count: int, backend: str = "auto"
) -> str:
    """Merge ``z_j ⊙ hz_j`` into ``mean``/``m2`` with ``z = rademacher(seed, first_probe, k, n)`` regenerated; returns the backend.

    Example:
        >>> mean, m2 = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
        >>> hz = 3 * rademacher(1, 0, 2, 4)  # H = 3 I: every sample z ⊙ Hz is 3
        >>> _ = hutchinson_update_seeded_(mean, m2, hz, seed=1, first_probe=0, count=0)
        >>> mean.tolist()
        [3.0, 3.0, 3.0, 3.0]
    """
    name, fn = seeded_family.select(backend, mean.device.type, mean.dtype)
    fn(mean, m2, hz, seed, first_probe, count)
    return name


def _register_fake() -> None:
    if not op_available("onehot_weight_tangent"):
        return

    @torch.library.register_fake("fasthess::onehot_weight_tangent")
    def _(x, rows, cols, out_features):  # noqa: ANN001, ANN202
        return x.new_empty(rows.shape[0], *x.shape[:-1], out_features)


_register_fake()
