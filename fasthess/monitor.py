"""Watch R_med per layer during training: a hook for any loop, and a Hugging Face callback.

Every ``every`` steps :class:`Monitor` measures exact Hessian-diagonal entries at
sampled coordinates (``fasthess.diag``) on a fixed Hessian batch, in eval mode,
and appends one row per layer to ``<out>/rmed.csv`` (step, layer, R_med, the
stabilised R_med, median and max |H_ii|) and the full result to
``<out>/hessians.jsonl``. Steps already in the CSV are skipped, so a resumed run
continues the log without recomputing or duplicating finished points. With
``tensorboard=True`` (and tensorboard installed) the R_med curves also go to
``<out>/tensorboard``.

Example:
    >>> import torch, tempfile, fasthess
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    >>> loss = lambda: torch.nn.functional.cross_entropy(model(x), y)
    >>> opt = torch.optim.Adam(model.parameters(), 1e-2)
    >>> mon = fasthess.Monitor(model, loss, every=2, out=tempfile.mkdtemp(), num_samples=8)
    >>> for step in range(4):
    ...     opt.zero_grad(); loss().backward(); opt.step()
    ...     _ = mon.step(step)
    >>> sorted({row["step"] for row in mon.history})
    [0, 2]
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .api import LossArg, diag
from .layers import LayerSpec
from .result import DiagResult

__all__ = ["HessianCallback", "Monitor"]

_FIELDS = ["step", "layer", "r_med", "r_med_stabilized", "median_abs", "max_abs", "entries", "seconds"]


class Monitor:
    """Measure sampled Hessian diagonals every ``every`` steps and log R_med per layer.

    Args:
        model: the network being trained.
        loss: closure (or list of micro-batch closures) on a fixed Hessian batch.
        every: measure at steps that are multiples of ``every``.
        out: folder for ``rmed.csv``, ``hessians.jsonl`` and TensorBoard logs
            (``None``: keep the history in memory only).
        layers: as for :func:`fasthess.diag` (default: linear/attention weights).
        tensorboard: also log to TensorBoard when it is installed.
        **diag_kwargs: passed to :func:`fasthess.diag` (``num_samples``, ``seed``,
            ``engine``, ``dtype``, ...). The seed stays fixed, so every step
            measures the same coordinates.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossArg,
        every: int = 100,
        out: str | Path | None = None,
        layers: LayerSpec | list[LayerSpec] | None = None,
        tensorboard: bool = False,
        **diag_kwargs: Any,
    ) -> None:
        if every < 1:
            raise ValueError("every must be >= 1")
        self.model, self.loss, self.every, self.layers = model, loss, every, layers
        self.diag_kwargs = diag_kwargs
        self.out = Path(out) if out is not None else None
        self.history: list[dict[str, Any]] = []
        self._writer = None
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.csv_path.exists():
                with open(self.csv_path, newline="") as fh:
                    self.history = [_parse(row) for row in csv.DictReader(fh)]
            if tensorboard:
                self._writer = _tensorboard_writer(self.out / "tensorboard")

    @property
    def csv_path(self) -> Path:
        assert self.out is not None
        return self.out / "rmed.csv"

    def done(self, step: int) -> bool:
        """Whether ``step`` was measured already (in this run or a resumed one)."""
        return any(row["step"] == step for row in self.history)

    def step(self, step: int, loss: LossArg | None = None) -> DiagResult | None:
        """Call once per training step; measures when ``step % every == 0`` and not done yet.

        Args:
            step: the global step.
            loss: a different Hessian batch for this measurement (default: the one given at construction).

        Returns:
            the :class:`DiagResult` when a measurement ran, else ``None``.
        """
        if step % self.every != 0 or self.done(step):
            return None
        return self.measure(step, loss)

    def measure(self, step: int, loss: LossArg | None = None) -> DiagResult:
        """Measure now, in eval mode (the model's modes are restored afterwards), and log."""
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            res = diag(self.model, loss if loss is not None else self.loss, self.layers, **self.diag_kwargs)
        finally:
            for m, training in modes.items():
                m.train(training)
        rows = [_row(step, name, layer, res.meta["seconds"]) for name, layer in res.layers.items()]
        self.history.extend(rows)
        if self.out is not None:
            new = not self.csv_path.exists()
            with open(self.csv_path, "a", newline="") as fh:
                w = csv.DictWriter(fh, _FIELDS)
                if new:
                    w.writeheader()
                w.writerows(rows)
            with open(self.out / "hessians.jsonl", "a") as fh:
                fh.write(json.dumps({"step": step, **res.to_dict()}) + "\n")
        if self._writer is not None:
            for row in rows:
                self._writer.add_scalar(f"r_med/{row['layer']}", row["r_med_stabilized"], step)
            self._writer.flush()
        return res

    def r_med(self, layer: str, stabilized: bool = True) -> list[tuple[int, float]]:
        """``[(step, R_med)]`` of one layer, in step order."""
        key = "r_med_stabilized" if stabilized else "r_med"
        return sorted((row["step"], row[key]) for row in self.history if row["layer"] == layer)


def _row(step: int, name: str, layer: Any, seconds: float) -> dict[str, Any]:
    abs_values = layer.values.abs()
    return {
        "step": step,
        "layer": name,
        "r_med": layer.r_med(),
        "r_med_stabilized": layer.r_med(stabilized=True),
        "median_abs": float(abs_values.quantile(0.5)),
        "max_abs": float(abs_values.max()),
        "entries": layer.values.numel(),
        "seconds": seconds,
    }


def _parse(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(row)
    out["step"], out["entries"] = int(row["step"]), int(row["entries"])
    for k in ("r_med", "r_med_stabilized", "median_abs", "max_abs", "seconds"):
        out[k] = float(row[k])
    return out


def _tensorboard_writer(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(path))


class HessianCallback:
    """A ``transformers.TrainerCallback`` that runs a :class:`Monitor` every ``every`` steps.

    The loss is ``model(**batch).loss`` on a fixed Hessian batch (a dict of tensors,
    labels included, on the model's device).

    Args:
        batch: the Hessian batch.
        every, out, layers, tensorboard, **diag_kwargs: as for :class:`Monitor`.

    Example (not run here)::

        trainer = Trainer(model, args, train_dataset=ds, callbacks=[fasthess.HessianCallback(batch, every=250, out="runs/x")])
    """

    def __new__(cls, batch: dict[str, Tensor], every: int = 100, **kwargs: Any) -> Any:
        from transformers import TrainerCallback

        class _Callback(TrainerCallback):
            def __init__(self) -> None:
                self.monitor: Monitor | None = None

            def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **_: Any) -> Any:
                if model is None:
                    return control
                if self.monitor is None:
                    loss: Callable[[], Tensor] = lambda: model(**batch).loss  # noqa: E731
                    self.monitor = Monitor(model, loss, every=every, **kwargs)
                self.monitor.step(state.global_step)
                return control

        return _Callback()
