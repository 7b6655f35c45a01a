"""Second-order engines, by name. ``"auto"`` picks per method."""

from __future__ import annotations

from ..errors import BackendUnavailableError
from .base import Engine
from .double_backward import DoubleBackwardEngine
from .forward_over_forward import ForwardOverForwardEngine
from .forward_over_reverse import ForwardOverReverseEngine

ENGINES: dict[str, type[Engine]] = {
    DoubleBackwardEngine.name: DoubleBackwardEngine,
    ForwardOverReverseEngine.name: ForwardOverReverseEngine,
    ForwardOverForwardEngine.name: ForwardOverForwardEngine,
}

__all__ = ["ENGINES", "Engine", "get_engine"]


def get_engine(name: str, method: str) -> Engine:
    """The engine called ``name`` for ``method``; ``"auto"`` chooses the fastest that applies.

    Raises:
        BackendUnavailableError: unknown engine, or one that cannot do ``method``.
    """
    if name == "auto":
        name = "fwd_fwd" if method in ("sampled", "exact") else "fwd_rev"
    if name not in ENGINES:
        raise BackendUnavailableError(f"unknown engine {name!r}; choose one of {sorted(ENGINES)} or 'auto'")
    engine = ENGINES[name]()
    if method == "hutchinson" and not engine.supports_hvp:
        raise BackendUnavailableError(
            f"engine {name!r} computes only vᵀHv and cannot run method='hutchinson'; "
            "use engine='fwd_rev' or 'double_backward'"
        )
    return engine
