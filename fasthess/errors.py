"""Exceptions raised by fasthess. Each message names the problem and the fix."""

from __future__ import annotations

import torch


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


class UnsupportedOpError(FasthessError, RuntimeError):
    """An engine cannot take the second derivative of an op of the loss.

    ``op`` names the op where known; ``reason`` is the first line of torch's error (also chained
    as ``__cause__``). ``engine="auto"`` falls back to a generic engine on this error from the
    tangent-adjoint engine and records why in ``meta["engine_fallback"]``.
    """

    def __init__(self, message: str, op: str | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.op, self.reason = op, reason


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (torch's often run on to a bug-report request)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (retried with fewer directions, never wrapped)."""
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)
