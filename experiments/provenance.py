"""What every experiment run records: where it came from (git commit, versions) and its rows as CSV."""

from __future__ import annotations

import csv
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


def write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    """``rows`` as CSV with a header: ``fields`` (default: the first row's keys; other keys are left out)."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fields or list(rows[0]), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
