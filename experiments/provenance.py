"""What every experiment run records about where it came from: git commit and versions."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

import fasthess


def provenance() -> dict[str, str]:
    """``git_commit`` of the checkout (``"unknown"`` outside git) and python/torch/fasthess versions."""
    try:
        commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, text=True,
                                         stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"git_commit": commit, "python": platform.python_version(), "torch": torch.__version__,
            "fasthess": fasthess.__version__}
