"""fasthess: fast exact and estimated Hessian diagonals of neural-network losses.

Example:
    >>> import torch, fasthess
    >>> model = torch.nn.Linear(3, 2)
    >>> x = torch.randn(8, 3)
    >>> res = fasthess.diag(model, lambda: model(x).pow(2).mean(), method="exact")
    >>> res["weight"].diagonal().shape
    torch.Size([2, 3])
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import stats
from .api import diag
from .blocks import block, rows
from .decompositions import autodiff_safe
from .estimators import OutputsAndLoss
from .errors import (
    BackendUnavailableError,
    DistributedError,
    FasthessError,
    LayerNotFoundError,
    LossError,
    MemoryRiskError,
    NonFiniteCurvatureError,
    TrainingModeError,
    UnsupportedOpError,
)
from .layers import default_parameters, resolve_parameters
from .monitor import HessianCallback, Monitor
from .result import DiagResult, LayerDiag

__all__ = [
    "BackendUnavailableError",
    "DiagResult",
    "DistributedError",
    "FasthessError",
    "HessianCallback",
    "LayerDiag",
    "LayerNotFoundError",
    "LossError",
    "MemoryRiskError",
    "Monitor",
    "NonFiniteCurvatureError",
    "OutputsAndLoss",
    "TrainingModeError",
    "UnsupportedOpError",
    "autodiff_safe",
    "block",
    "default_parameters",
    "diag",
    "resolve_parameters",
    "rows",
    "stats",
]
