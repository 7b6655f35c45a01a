"""The files of a run folder: checkpoints read without running code, every file written atomically.

A checkpoint holds only tensors and plain values (dicts, lists, numbers, strings) and
is read with ``torch.load(weights_only=True)``: opening someone else's run folder runs
nothing that folder holds. Every file is written to a temporary file in the same
folder, flushed to disk and renamed over the old one, so a run killed while saving
leaves the previous version or the new one, never a half-written file. A checkpoint
records the fingerprint of the config that wrote it, the file format and the fasthess
version; one that cannot be read, or was written by another config or version, raises
:class:`CheckpointError` naming the file, the problem and the fix. Nothing here
deletes or overwrites a file it refuses.

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "a.pt"
    >>> save(path, {"step": 3}, fingerprint({"lr": 0.1}))
    >>> load(path, fingerprint({"lr": 0.1}))["step"]
    3
    >>> load(path, fingerprint({"lr": 0.2}))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    checkpoint.CheckpointError: .../a.pt was written by another config ...
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

import fasthess

FORMAT = 1  # raise when what a checkpoint holds changes
FIX = "delete it (that run restarts from its beginning; finished results are kept) or pass a new --out folder"


class CheckpointError(RuntimeError):
    """A file of a run folder cannot be resumed from: unreadable, or written by another config or version."""


def fingerprint(cfg: Any) -> str:
    """A short digest of a JSON-able config (key order does not matter)."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """``write(file)`` into a temporary file next to ``path``, synced, then renamed to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a crash
    finally:
        os.close(folder)


def save(path: Path, payload: dict, config: str) -> None:
    """Write ``payload`` (tensors and plain values) with the config fingerprint ``config`` and the versions."""
    meta = {"format": FORMAT, "fasthess": fasthess.__version__, "config": config}
    write_atomic(path, lambda fh: torch.save({**payload, **meta}, fh))


def load(path: Path, config: str, fix: str = FIX) -> dict:
    """The checkpoint at ``path``, which must have been written by :func:`save` with the fingerprint ``config``."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, empty, not a checkpoint, or objects that would run code
        lines = [line for line in str(err).splitlines() if line.strip()] or ["empty file" * (path.stat().st_size == 0)]
        reason = next((line for line in lines if "unsupported" in line.lower()), lines[0])[:300]  # not torch's advice
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({type(err).__name__}: {reason}); it is "
                              f"truncated, corrupt, or holds objects that loading would have to run. "
                              f"Fix: {fix}") from err
    if not isinstance(saved, dict) or "format" not in saved:
        raise CheckpointError(f"{path} is not a checkpoint of these drivers (no format record). Fix: {fix}")
    if (saved["format"], saved.get("fasthess")) != (FORMAT, fasthess.__version__):
        raise CheckpointError(f"{path} was written by fasthess {saved.get('fasthess')} (checkpoint format "
                              f"{saved['format']}), this is fasthess {fasthess.__version__} (format {FORMAT}). "
                              f"Fix: {fix}")
    if saved.get("config") != config:
        raise CheckpointError(f"{path} was written by another config (fingerprint {saved.get('config')}, this run's "
                              f"{config}). Fix: {fix}")
    return saved


def write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    """``obj`` as JSON at ``path``, atomically."""
    write_atomic(path, lambda fh: fh.write(json.dumps(obj, indent=indent).encode()))


def read_json(path: Path, config: str | None = None, fix: str = FIX) -> Any:
    """The JSON at ``path``; with ``config``, a record whose ``"fingerprint"`` must equal it."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read as JSON ({type(err).__name__}: {err}). Fix: {fix}") from err
    if config is not None and (not isinstance(obj, dict) or obj.get("fingerprint") != config):
        found = obj.get("fingerprint") if isinstance(obj, dict) else None
        raise CheckpointError(f"{path} was written by another config or an older version of the drivers "
                              f"(fingerprint {found}, this run's {config}). Fix: {fix}")
    return obj
