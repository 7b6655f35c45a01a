"""Reference (pure torch) running mean/variance of Hutchinson samples ``z ⊙ Hz``."""

from __future__ import annotations

from torch import Tensor


def hutchinson_update_(mean: Tensor, m2: Tensor, z: Tensor, hz: Tensor, count: int) -> None:
    """Merge ``k`` new samples ``z[j] * hz[j]`` into running statistics, in place.

    Chan et al.'s parallel update of Welford's algorithm, so batches of any size
    merge exactly and stably.

    Args:
        mean: ``(n,)`` running mean of the samples seen so far (updated in place).
        m2: ``(n,)`` running sum of squared deviations (updated in place).
        z: ``(k, n)`` probes.
        hz: ``(k, n)`` Hessian-vector products ``H z[j]``.
        count: number of samples already merged into ``mean`` / ``m2``.

    Example:
        >>> import torch
        >>> mean, m2 = torch.zeros(2), torch.zeros(2)
        >>> hutchinson_update_(mean, m2, torch.ones(2, 2), torch.tensor([[1., 2.], [3., 4.]]), 0)
        >>> mean.tolist(), m2.tolist()
        ([2.0, 3.0], [2.0, 2.0])
    """
    k = z.shape[0]
    samples = (z * hz).to(mean.dtype)
    batch_mean = samples.mean(0)
    batch_m2 = ((samples - batch_mean) ** 2).sum(0)
    total = count + k
    delta = batch_mean - mean
    m2.add_(batch_m2 + delta * delta * (count * k / total))
    mean.add_(delta * (k / total))
