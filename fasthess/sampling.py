"""Reproducible coordinate samples and probe vectors.

Each parameter gets its own generator, seeded from the run seed and a stable hash
of the parameter's name, so a parameter's coordinates do not depend on which other
layers were selected, on the device, or on the engine.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import Tensor


def generator_for(seed: int, name: str) -> torch.Generator:
    """CPU generator seeded from ``(seed, name)``."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
    return g


def sample_indices(numel: int, num_samples: int, seed: int, name: str) -> Tensor:
    """``min(num_samples, numel)`` distinct flat indices drawn uniformly, sorted.

    Example:
        >>> sample_indices(10, 3, seed=0, name="w").tolist() == sample_indices(10, 3, 0, "w").tolist()
        True
    """
    k = min(int(num_samples), int(numel))
    g = generator_for(seed, name)
    if numel <= 1 << 22 or k * 4 > numel:
        idx = torch.randperm(numel, generator=g)[:k]
    else:  # avoid permuting a huge tensor: draw with replacement, keep first occurrences
        kept: dict[int, None] = {}
        while len(kept) < k:
            for v in torch.randint(numel, (2 * k,), generator=g).tolist():
                kept.setdefault(v, None)
        idx = torch.tensor(list(kept)[:k], dtype=torch.long)
    return idx.sort().values


def probes(
    shapes: Sequence[tuple[int, ...]], start: int, count: int, distribution: str, seed: int
) -> list[Tensor]:
    """Probes number ``start .. start+count-1``: one ``(count, *shape)`` batch per shape.

    Probe ``j`` comes from its own generator, so the numbers do not depend on how
    probes are chunked, which engine runs them, or which process computes them.
    Each probe has ``E[z zᵀ] = I``.

    Args:
        distribution: ``"rademacher"`` (±1, the minimum-variance choice for the
            diagonal) or ``"gaussian"`` (standard normal).

    Example:
        >>> a = probes([(2, 3)], 0, 4, "rademacher", seed=0)[0]
        >>> torch.equal(a[2:], probes([(2, 3)], 2, 2, "rademacher", seed=0)[0])
        True
    """
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"unknown probe distribution {distribution!r}; use 'rademacher' or 'gaussian'")
    per_probe = []
    for j in range(start, start + count):
        g = generator_for(seed, f"probe/{j}")
        if distribution == "rademacher":
            per_probe.append([torch.randint(0, 2, s, generator=g).mul_(2).sub_(1).float() for s in shapes])
        else:
            per_probe.append([torch.randn(s, generator=g) for s in shapes])
    return [torch.stack([zs[i] for zs in per_probe]) for i in range(len(shapes))]
