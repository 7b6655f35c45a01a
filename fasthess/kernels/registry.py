"""Backend registry shared by every kernel family."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import BackendUnavailableError


@functools.lru_cache(maxsize=None)
def extension_loaded() -> bool:
    """Whether the compiled ``fasthess._C`` extension imported (it registers ``torch.ops.fasthess``)."""
    try:
        from .. import _C  # noqa: F401
    except ImportError:
        return False
    return True


_preferred: contextvars.ContextVar[str] = contextvars.ContextVar("fasthess_kernel_backend", default="auto")


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Kernels called inside (by the engines) use ``backend`` where their family has it, else ``"auto"``.

    Example:
        >>> with use_backend("torch"):
        ...     preferred_backend("torch_only_family", ["torch"])
        'torch'
    """
    token = _preferred.set(backend)
    try:
        yield
    finally:
        _preferred.reset(token)


_used: contextvars.ContextVar[dict[str, set[str]] | None] = contextvars.ContextVar("fasthess_kernels_used", default=None)


@contextlib.contextmanager
def record_kernels() -> Iterator[dict[str, set[str]]]:
    """Collect ``{family: {backends}}`` of every kernel that runs inside (``fasthess.diag``'s ``meta["kernels"]``).

    Example:
        >>> from fasthess.kernels.gelu import gelu_jet2
        >>> x = torch.randn(3)
        >>> with record_kernels() as used:
        ...     _ = gelu_jet2(x, x[None], x[None], backend="torch")
        >>> used
        {'gelu_jet2': {'torch'}}
    """
    used: dict[str, set[str]] = {}
    token = _used.set(used)
    try:
        yield used
    finally:
        _used.reset(token)


def _noted(family: str, backend: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, noting in :func:`record_kernels`'s dict that it ran (a selection alone is no use)."""
    used = _used.get()
    if used is None:
        return fn

    def call(*args: Any, **kwargs: Any) -> Any:
        used.setdefault(family, set()).add(backend)
        return fn(*args, **kwargs)

    return call


def preferred_backend(family: str, known: Iterator[str] | list[str]) -> str:
    """The backend set by :func:`use_backend` if the family ``known`` it, else ``"auto"``."""
    backend = _preferred.get()
    return backend if backend in list(known) else "auto"


@functools.lru_cache(maxsize=None)
def triton_available(module: str) -> bool:
    """A CUDA device exists and the Triton kernels in ``module`` import (the interpreter is for tests, not ``auto``)."""
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a broken triton install means no triton backend
        return False
    return True


def op_available(name: str) -> bool:
    """Whether the extension loaded and registered ``torch.ops.fasthess.<name>`` (an older build may lack it)."""
    return extension_loaded() and hasattr(torch.ops.fasthess, name)


def cuda_op_available(name: str) -> bool:
    """A CUDA device exists and the extension registered a CUDA kernel of ``torch.ops.fasthess.<name>``.

    Only a build against a CUDA torch with nvcc compiles ``csrc/cuda`` (see ``setup.py``).
    """
    return (op_available(name) and torch.cuda.is_available()
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"fasthess::{name}", "CUDA"))


# what each backend needs, for the error that names it
_NEEDS = {
    "cpp": "It needs the compiled extension: pip install -e . --no-build-isolation.",
    "triton": "It needs an NVIDIA GPU and triton (pip install triton).",
    "cuda": "It needs an NVIDIA GPU and the extension built against a CUDA torch with nvcc "
            "(pip install -e . --no-build-isolation).",
}


@dataclass
class KernelFamily:
    """Implementations of one op by backend, in order of preference for ``"auto"``.

    Each entry maps a backend name to ``(is_available, implementation)``; a backend
    registered with ``devices`` runs only on tensors of those device types, one registered
    with ``dtypes`` only on those dtypes (``"auto"`` skips it elsewhere, an explicit request raises).
    """

    name: str
    backends: dict[str, tuple[Callable[[], bool], Callable[..., Any]]] = field(default_factory=dict)
    devices: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dtypes: dict[str, tuple[torch.dtype, ...]] = field(default_factory=dict)

    def register(
        self,
        backend: str,
        available: Callable[[], bool],
        devices: tuple[str, ...] | None = None,
        dtypes: tuple[torch.dtype, ...] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.backends[backend] = (available, fn)
            if devices is not None:
                self.devices[backend] = devices
            if dtypes is not None:
                self.dtypes[backend] = dtypes
            return fn

        return wrap

    def _runs_on(self, backend: str, device: str | None) -> bool:
        return device is None or backend not in self.devices or device in self.devices[backend]

    def _takes(self, backend: str, dtype: torch.dtype | None) -> bool:
        return dtype is None or backend not in self.dtypes or dtype in self.dtypes[backend]

    def available(self) -> list[str]:
        return [b for b, (ok, _) in self.backends.items() if ok()]

    def select(
        self, backend: str = "auto", device: str | None = None, dtype: torch.dtype | None = None,
        exclude: tuple[str, ...] = (),
    ) -> tuple[str, Callable[..., Any]]:
        """``(backend name, implementation)`` for tensors on ``device`` (a device type; ``None``: any) of ``dtype``.

        ``exclude``: backends ``"auto"`` passes over (an explicit request still gets them).

        Raises:
            BackendUnavailableError: an explicit backend is unknown, unavailable here or not for ``device``.
            TypeError: an explicit backend does not take ``dtype``.
        """
        if backend == "auto":
            for name, (ok, fn) in self.backends.items():
                if name not in exclude and self._runs_on(name, device) and self._takes(name, dtype) and ok():
                    return name, _noted(self.name, name, fn)
            raise BackendUnavailableError(f"no backend of {self.name} is available")  # torch always is
        if backend not in self.backends:
            raise BackendUnavailableError(
                f"{self.name} has no backend {backend!r}; known: {sorted(self.backends)}"
            )
        ok, fn = self.backends[backend]
        if not ok():
            raise BackendUnavailableError(
                f"backend {backend!r} of {self.name} is not available here (available: {self.available()}). "
                + _NEEDS.get(backend, "") + " Or use backend='auto'."
            )
        if not self._runs_on(backend, device):
            raise BackendUnavailableError(
                f"backend {backend!r} of {self.name} runs on {self.devices[backend]} tensors, not {device!r}; "
                "move the tensors or use backend='auto'"
            )
        if not self._takes(backend, dtype):
            raise TypeError(f"backend {backend!r} of {self.name} takes {self.dtypes[backend]}, not {dtype}; use backend='auto'")
        return backend, _noted(self.name, backend, fn)
