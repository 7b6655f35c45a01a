"""Loss 2-jets: mean softmax cross-entropy with ``K`` logit tangent pairs, without ``K×N×V`` intermediates.

Backends, in order of preference for ``backend="auto"``:

* ``triton``: one program per (row, block of up to 4 tangents) on CUDA tensors (:mod:`.triton_kernels`),
  streaming the row in column blocks with an online softmax, so any vocabulary size fits;
  float32 accumulation for float16/bfloat16/float32, float64 for float64.
* ``cuda``: ``torch.ops.fasthess.cross_entropy_jet2`` on CUDA tensors (``csrc/cuda/cross_entropy_jet2.cu``,
  built only against a CUDA torch): one block per (row, up to 4 tangents), per-thread online softmax
  merged by a block reduction; float32/float64.
* ``cpp``: ``torch.ops.fasthess.cross_entropy_jet2`` on CPU tensors (``csrc/loss_ops.cpp``): one
  softmax per row shared by the tangents.
* ``torch``: the closed form below with contractions over the vocabulary, any device.

Every backend forms per-row terms and sums them in a fixed order (deterministic), divided by the
number of rows whose target is not ``ignore_index`` (none: NaN, as ``F.cross_entropy``).
Spec: :func:`.reference.cross_entropy_jet2` (nested ``jvp``).

Per row with ``p = softmax(z)`` and target ``t``: ``l1 = Σ p z1 − z1_t`` and
``l2 = Σ p z2 − z2_t + Σ p z1² − (Σ p z1)²`` (the softmax Hessian ``diag p − p pᵀ`` applied to ``z1``).
``z2=None`` stands for zero second-order tangents (the usual case: the tangents of the logits of
a network that is linear in the direction), and the kernels then skip reading them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import KernelFamily, cuda_op_available, op_available, triton_available
from .reference import cross_entropy_jet2 as cross_entropy_jet2_reference

__all__ = ["cross_entropy_jet2", "cross_entropy_jet2_reference", "family"]

family = KernelFamily("cross_entropy_jet2")


@family.register("triton", available=lambda: triton_available(f"{__name__}.triton_kernels"), devices=("cuda",))
def _triton(z: Tensor, y: Tensor, z1: Tensor, z2: Tensor | None, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    from .triton_kernels import cross_entropy_jet2_triton

    return cross_entropy_jet2_triton(z, y, z1, z2, ignore_index)


@family.register("cuda", available=lambda: cuda_op_available("cross_entropy_jet2"), devices=("cuda",),
                 dtypes=(torch.float32, torch.float64))
def _cuda(z: Tensor, y: Tensor, z1: Tensor, z2: Tensor | None, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.fasthess.cross_entropy_jet2(z, y, z1, z2, ignore_index)


@family.register("cpp", available=lambda: op_available("cross_entropy_jet2"), devices=("cpu",),
                 dtypes=(torch.float32, torch.float64))
def _cpp(z: Tensor, y: Tensor, z1: Tensor, z2: Tensor | None, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.fasthess.cross_entropy_jet2(z, y, z1, z2, ignore_index)


@family.register("torch", available=lambda: True)
def _torch(z: Tensor, y: Tensor, z1: Tensor, z2: Tensor | None, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    keep = y != ignore_index
    z, y, z1 = z[keep], y[keep], z1[:, keep]
    count = z.shape[0]
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    rows = torch.arange(count, device=z.device)
    m1 = torch.einsum("nv,knv->kn", p, z1)
    m2 = torch.einsum("nv,knv->kn", p, z1 * z1)
    loss = -logp[rows, y].sum() / count
    l1 = (m1 - z1[:, rows, y]).sum(1) / count
    l2 = m2 - m1 * m1
    if z2 is not None:
        z2 = z2[:, keep]
        l2 = l2 + torch.einsum("nv,knv->kn", p, z2) - z2[:, rows, y]
    return loss, l1, l2.sum(1) / count


def cross_entropy_jet2(
    z: Tensor, y: Tensor, z1: Tensor, z2: Tensor | None = None, ignore_index: int = -100, backend: str = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy of ``(N, V)`` logits and its derivatives along ``K`` tangent pairs ``(K, N, V)``.

    Args:
        z: ``(N, V)`` logits with ``V > 0``; y: ``(N,)`` integer targets in ``[0, V)`` or ``ignore_index``.
        z1, z2: ``(K, N, V)`` first- and second-order logit tangents of ``z``'s dtype and device;
            ``z2=None``: zero (skipped by every backend).
        ignore_index: target of the rows left out of the mean.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpp"`` or ``"torch"``.

    Returns:
        ``(loss, loss1, loss2)``: a scalar and two ``(K,)``, ``loss2 = d²/dt² L(z + t z1 + t²/2 z2)`` at 0;
        NaN when every row is ignored.

    Raises:
        ValueError: shapes, dtypes or devices do not fit together, or a target is outside ``[0, V)``.
        BackendUnavailableError: an explicit backend is unavailable here or not for these tensors.
        TypeError: an explicit backend does not take this dtype.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> z = torch.randn(4, 7, generator=g, dtype=torch.float64)  # N = 4 rows, V = 7
        >>> z1, z2 = torch.randn(2, 2, 4, 7, generator=g, dtype=torch.float64).unbind()  # K = 2 tangent pairs
        >>> y = torch.tensor([1, 6, -100, 0])
        >>> got, want = cross_entropy_jet2(z, y, z1, z2), cross_entropy_jet2_reference(z, y, z1, z2)
        >>> all(torch.allclose(a, b) for a, b in zip(got, want))
        True
        >>> _, _, l2 = cross_entropy_jet2(z, y, z1)  # z2 = 0
        >>> torch.allclose(l2, cross_entropy_jet2_reference(z, y, z1, torch.zeros_like(z1))[2])
        True
    """
    if z.dim() != 2 or z.shape[1] == 0 or y.shape != z.shape[:1] or z1.dim() != 3 or z1.shape[1:] != z.shape:
        raise ValueError(
            f"need z (N, V) with V > 0, y (N,), z1 (K, N, V); got {tuple(z.shape)}, {tuple(y.shape)}, {tuple(z1.shape)}"
        )
    if z2 is not None and z2.shape != z1.shape:
        raise ValueError(f"z2 must be None or z1's shape {tuple(z1.shape)}; got {tuple(z2.shape)}")
    for name, t in (("z1", z1), ("z2", z2)):
        if t is not None and (t.dtype != z.dtype or t.device != z.device):
            raise ValueError(
                f"{name} must have z's dtype and device ({z.dtype}, {z.device}); got {t.dtype}, {t.device}"
            )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.device != z.device:
        raise ValueError(f"y must hold integer class indices on z's device {z.device}; got {y.dtype} on {y.device}")
    y = y.long()
    bad = (y != ignore_index) & ((y < 0) | (y >= z.shape[1]))
    if bool(bad.any()):  # one host sync on a GPU; the kernels never read outside a row anyway
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target {int(y[row])} of row {row} is outside [0, {z.shape[1]}) and is not ignore_index={ignore_index}"
        )
    _, fn = family.select(backend, z.device.type, z.dtype)
    return fn(z, y, z1, z2, int(ignore_index))


def _register_fake() -> None:
    """Shape function of the C++ op, for torch.compile / opcheck (only when the extension loaded)."""
    if not op_available("cross_entropy_jet2"):
        return

    @torch.library.register_fake("fasthess::cross_entropy_jet2")
    def _(z, y, z1, z2, ignore_index):  # noqa: ANN001, ANN202
        return z.new_empty(()), z.new_empty(z1.shape[0]), z.new_empty(z1.shape[0])


_register_fake()
