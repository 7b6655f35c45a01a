"""Runs a test script with Triton's CPU interpreter, in a fresh process (it must be set before triton loads)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_interpreted(script: str) -> str:
    """``script`` run with ``TRITON_INTERPRET=1`` (one thread, the repository importable); returns its stdout.

    Skips the test without triton; fails it, showing both streams, if the script exits non-zero.
    """
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout
