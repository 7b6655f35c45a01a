"""Hutchinson's diagonal estimator with standard errors and adaptive stopping.

Reference: M. F. Hutchinson (1989), "A stochastic estimator of the trace of the
influence matrix for Laplacian smoothing splines", Communications in Statistics -
Simulation and Computation 18(3); for the diagonal, C. Bekas, E. Kokiopoulou and
Y. Saad (2007), "An estimator for the diagonal of a matrix", Applied Numerical
Mathematics 57(11-12).

For probes ``z`` with ``E[z zᵀ] = I`` the samples ``s = z ⊙ A z`` have ``E[s_i] = A_ii``
and ``Var(s_i) = Σ_{j≠i} A_ij²`` (Rademacher; Gaussian adds ``2 A_ii²``): the error
of entry ``i`` scales with the off-diagonal mass of row ``i``, so the small entries are
the least reliable. Samples are merged by the fused Welford kernel
(:mod:`fasthess.kernels.hutchinson`), which gives the per-entry standard error
``sqrt(sample variance / K)`` for free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..kernels.hutchinson import hutchinson_update_
from .operator import FlatOperator

# Below this many probes the standard error itself is too noisy to stop on.
MIN_PROBES_TO_STOP = 10

Correction = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Estimate:
    """A flat diagonal estimate.

    Attributes:
        values: ``(n,)`` float64 estimate of the diagonal.
        stderr: ``(n,)`` float64 per-entry standard error, or ``None``.
        probes: random probes spent on the stochastic part.
        info: estimator-specific facts (rank of the deflation, convergence, backend).
    """

    values: Tensor
    stderr: Tensor | None
    probes: int
    info: dict[str, Any] = field(default_factory=dict)


def relative_errors(op: FlatOperator, values: Tensor, stderr: Tensor) -> list[float]:
    """Per parameter block: ``‖stderr‖₂ / ‖values‖₂``, the estimated relative RMS error of the block."""
    out = []
    for sl in op.segments():
        norm = float(values[sl].norm())
        out.append(float(stderr[sl].norm()) / norm if norm > 0 else float("inf"))
    return out


def hutchinson(
    op: FlatOperator,
    num_probes: int,
    *,
    distribution: str = "rademacher",
    seed: int = 0,
    target_rel_error: float | None = None,
    batch: int = 32,
    first_probe: int = 0,
    correct: Correction | None = None,
    backend: str = "auto",
    log: Callable[[str], None] | None = None,
) -> Estimate:
    """Estimate ``diag(A)`` from up to ``num_probes`` products ``A z``.

    Args:
        op: the matrix ``A``.
        num_probes: probes to use (the most, with ``target_rel_error``).
        distribution: ``"rademacher"`` or ``"gaussian"``.
        seed: probe seed; probe ``j`` is the same whatever the batching.
        target_rel_error: stop once every parameter block's estimated relative
            error ``‖stderr‖₂ / ‖estimate‖₂`` is at most this (after at least
            ``MIN_PROBES_TO_STOP`` probes); ``info["converged"]`` says whether it was reached.
        batch: probes per call of ``op``.
        first_probe: index of the first probe (estimators that also draw sketch
            vectors use disjoint indices).
        correct: ``(Z, AZ) -> BZ``: estimate ``diag(B)`` instead, where ``B z`` is
            computed from ``z`` and ``A z`` (deflation, control variates).
        backend: kernel backend of the Welford accumulation.
        log: progress callback.

    Returns:
        :class:`Estimate` with per-entry standard errors.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> est = hutchinson(FlatOperator.from_matrix(A, [(2,)]), 400, seed=0)
        >>> bool(((est.values - A.diagonal()).abs() < 4 * est.stderr).all())
        True
    """
    if num_probes < 2:
        raise ValueError("num_probes must be >= 2 to give a standard error")

    def sample(start: int, k: int) -> tuple[Tensor, Tensor]:
        Z = op.probes(first_probe + start, k, distribution, seed)
        AZ = op(Z)
        return Z, AZ if correct is None else correct(Z, AZ)

    return running_mean(op, sample, num_probes, target_rel_error=target_rel_error, batch=batch, backend=backend, log=log)


def running_mean(
    op: FlatOperator,
    sample: Callable[[int, int], tuple[Tensor, Tensor]],
    num_samples: int,
    *,
    target_rel_error: float | None = None,
    batch: int = 32,
    backend: str = "auto",
    log: Callable[[str], None] | None = None,
) -> Estimate:
    """Mean and standard error of samples ``a ⊙ b``, ``(a, b) = sample(start, k)`` (each ``(k, n)``).

    The Monte-Carlo loop shared by the estimators: merged by the fused Welford
    kernel, stopped early once every parameter block's relative error
    ``‖stderr‖₂ / ‖mean‖₂`` is at most ``target_rel_error``.
    """
    if target_rel_error is not None and not target_rel_error > 0:
        raise ValueError(f"target_rel_error must be > 0 (got {target_rel_error})")
    mean = torch.zeros(op.n, dtype=torch.float64, device=op.device)
    m2 = torch.zeros_like(mean)
    done, used = 0, backend
    while done < num_samples:
        k = min(batch, num_samples - done)
        a, b = sample(done, k)
        used = hutchinson_update_(mean, m2, a, b, done, backend=backend)
        done += k
        if log is not None:
            log(f"{done}/{num_samples} samples")
        if target_rel_error is not None and done >= MIN_PROBES_TO_STOP:
            if max(relative_errors(op, mean, (m2 / (done - 1) / done).sqrt())) <= target_rel_error:
                break
    stderr = (m2 / (done - 1) / done).sqrt()
    info: dict[str, Any] = {"backend": used}
    if target_rel_error is not None:
        rel = relative_errors(op, mean, stderr)
        info.update(converged=max(rel) <= target_rel_error, relative_errors=rel)
    return Estimate(mean, stderr, done, info)


def shared_probes(
    op: FlatOperator,
    plan: Any,
    chunk: Any,
    num_probes: int,
    *,
    distribution: str = "rademacher",
    seed: int = 0,
    batch: int = 32,
    backend: str = "auto",
    log: Callable[[str], None] | None = None,
) -> Estimate:
    """Plain Hutchinson with the probes shared between ranks (``plan`` of :mod:`fasthess.distributed`).

    Each rank merges its contiguous share of the probes, then the ranks' running
    means and ``M2`` are combined exactly (Chan et al.), so every rank returns what
    one process computing every probe would.
    """
    lo, hi = plan.probe_range(num_probes)
    mean = torch.zeros(op.n, dtype=torch.float64, device=op.device)
    m2 = torch.zeros_like(mean)
    used, done = backend, lo
    while done < hi:
        k = min(batch, hi - done)
        Z = op.probes(done, k, distribution, seed)
        used = hutchinson_update_(mean, m2, Z, op(Z), done - lo, backend=backend)
        done += k
        if log is not None:
            log(f"probes {done - lo}/{hi - lo} of this rank")
    plan.merge_welford_([mean], [m2], hi - lo, num_probes, chunk)
    return Estimate(mean, (m2 / (num_probes - 1) / num_probes).sqrt(), num_probes, {"backend": used})
