"""Seeds of the experiments, derived from the config's seed and integers or names, equal in every process.

Python's built-in ``hash`` of a tuple holding a string changes from process to process
(``PYTHONHASHSEED``), so a seed taken from it makes a run unrepeatable. Every
derived seed of the drivers comes from :func:`derive_seed` instead: a BLAKE2b
digest of the parts, the same on every run, platform and Python version.

Example:
    >>> derive_seed(0, "restart", 3) == derive_seed(0, "restart", 3) != derive_seed(0, "restart", 4)
    True
    >>> 0 <= derive_seed(7) < 2**63
    True
"""

from __future__ import annotations

import hashlib
import json

import torch


def derive_seed(*parts: int | str) -> int:
    """A seed in ``[0, 2**63)`` from ``parts`` (ints and names); ``(1,)`` and ``("1",)`` give different seeds."""
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (int, str)):
            raise TypeError(f"derive_seed takes ints and strings, got {part!r} ({type(part).__name__})")
    digest = hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded with ``derive_seed(*parts)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def seed_step(*parts: int | str) -> torch.Generator:
    """One training step's randomness: seeds torch's global RNG (dropout masks) and returns the mini-batch generator.

    ``parts`` name the step, e.g. ``(seed, "run", repeat, step)``; a resumed run draws what
    the uninterrupted run drew at that step, whatever ran before it.
    """
    torch.manual_seed(derive_seed(*parts, "dropout"))
    return generator(*parts, "batch")
