"""Exceptions raised by fasthess. Each message names the problem and the fix."""

from __future__ import annotations


class FasthessError(Exception):
    """Base class of every error fasthess raises on purpose."""


class LayerNotFoundError(FasthessError, KeyError):
    """A requested layer name or pattern matched nothing in the model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class LossError(FasthessError, ValueError):
    """The loss closure returned something that has no Hessian to take."""


class TrainingModeError(FasthessError, RuntimeError):
    """Dropout or batch-norm statistics would make the loss random or stateful."""


class NonFiniteCurvatureError(FasthessError, FloatingPointError):
    """Some computed curvature entries are NaN or infinite."""


class MemoryRiskError(FasthessError, MemoryError):
    """The requested computation would not fit in the memory available."""


class BackendUnavailableError(FasthessError, RuntimeError):
    """An explicitly requested backend or engine cannot run here."""


class DistributedError(FasthessError, RuntimeError):
    """The ranks of a process group disagree, or one of them failed, died or stalled."""
