"""Loss 2-jets: mean softmax cross-entropy with ``K`` logit tangent pairs, without ``K×N×V`` intermediates.

Backends: ``cpp`` (``torch.ops.fasthess.cross_entropy_jet2``: one softmax per row shared by
the tangents, per-row terms summed in a fixed order) and ``torch`` (the closed form with
contractions over the vocabulary). Spec: :func:`.reference.cross_entropy_jet2` (nested ``jvp``).

Per row with ``p = softmax(z)`` and target ``t``: ``l1 = Σ p z1 − z1_t`` and
``l2 = Σ p z2 − z2_t + Σ p z1² − (Σ p z1)²`` (the softmax Hessian ``diag p − p pᵀ`` applied to ``z1``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import KernelFamily, op_available
from .reference import cross_entropy_jet2 as cross_entropy_jet2_reference

__all__ = ["cross_entropy_jet2", "cross_entropy_jet2_reference", "family"]

family = KernelFamily("cross_entropy_jet2")


@family.register("cpp", available=lambda: op_available("cross_entropy_jet2"), devices=("cpu",))
def _cpp(z: Tensor, y: Tensor, z1: Tensor, z2: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.fasthess.cross_entropy_jet2(z, y, z1, z2, ignore_index)


@family.register("torch", available=lambda: True)
def _torch(z: Tensor, y: Tensor, z1: Tensor, z2: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    keep = y != ignore_index
    z, y, z1, z2 = z[keep], y[keep], z1[:, keep], z2[:, keep]
    count = z.shape[0]
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    rows = torch.arange(count, device=z.device)
    m1 = torch.einsum("nv,knv->kn", p, z1)
    m2 = torch.einsum("nv,knv->kn", p, z1 * z1)
    m3 = torch.einsum("nv,knv->kn", p, z2)
    loss = -logp[rows, y].sum() / count
    l1 = (m1 - z1[:, rows, y]).sum(1) / count
    l2 = (m3 - z2[:, rows, y] + m2 - m1 * m1).sum(1) / count
    return loss, l1, l2


def cross_entropy_jet2(
    z: Tensor, y: Tensor, z1: Tensor, z2: Tensor, ignore_index: int = -100, backend: str = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy of ``(N, V)`` logits and its derivatives along ``K`` tangent pairs ``(K, N, V)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> z, z1, z2 = torch.randn(4, 7, generator=g, dtype=torch.float64), torch.randn(2, 4, 7, generator=g, dtype=torch.float64), torch.randn(2, 4, 7, generator=g, dtype=torch.float64)
        >>> y = torch.tensor([1, 6, -100, 0])
        >>> got, want = cross_entropy_jet2(z, y, z1, z2), cross_entropy_jet2_reference(z, y, z1, z2)
        >>> all(torch.allclose(a, b) for a, b in zip(got, want))
        True
    """
    if z.dim() != 2 or y.shape != z.shape[:1] or z1.shape[1:] != z.shape or z2.shape != z1.shape:
        raise ValueError(
            f"need z (N, V), y (N,), z1 and z2 (K, N, V); got {tuple(z.shape)}, {tuple(y.shape)}, "
            f"{tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    _, fn = family.select(backend, z.device.type)
    return fn(z, y.long(), z1, z2, ignore_index)


def _register_fake() -> None:
    if not op_available("cross_entropy_jet2"):
        return

    @torch.library.register_fake("fasthess::cross_entropy_jet2")
    def _(z, y, z1, z2, ignore_index):  # noqa: ANN001, ANN202
        return z.new_empty(()), z.new_empty(z1.shape[0]), z.new_empty(z1.shape[0])


_register_fake()
