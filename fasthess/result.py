"""Result objects of :func:`fasthess.diag`, with statistics and a JSON round trip."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import stats


@dataclass
class LayerDiag:
    """Hessian-diagonal information for one parameter tensor.

    Attributes:
        name: parameter name in ``model.named_parameters()``.
        shape: the parameter's shape.
        method: ``"sampled"``, ``"exact"`` or ``"hutchinson"``.
        values: ``(k,)`` float64. Sampled: exact ``H_ii`` at ``indices``. Exact:
            the whole diagonal, flattened. Hutchinson: the estimate, flattened.
        indices: ``(k,)`` int64 flat indices for the sampled method, else ``None``.
        stderr: ``(numel,)`` per-entry standard error (Hutchinson only).
    """

    name: str
    shape: tuple[int, ...]
    method: str
    values: Tensor
    indices: Tensor | None = None
    stderr: Tensor | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def diagonal(self) -> Tensor:
        """The diagonal reshaped like the parameter (exact and Hutchinson methods)."""
        if self.indices is not None:
            raise ValueError(f"{self.name}: a sampled result holds {self.values.numel()} entries, not the diagonal")
        return self.values.reshape(self.shape)

    def nonfinite(self) -> int:
        return int((~torch.isfinite(self.values)).sum())

    def r_med(self, stabilized: bool = False) -> float:
        """The paper's R_med over this layer's entries."""
        return stats.r_med(self.values, stabilized=stabilized)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "method": self.method,
            "values": self.values.tolist(),
            "indices": None if self.indices is None else self.indices.tolist(),
            "stderr": None if self.stderr is None else self.stderr.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerDiag":
        opt = lambda v, dt: None if v is None else torch.tensor(v, dtype=dt)  # noqa: E731
        return cls(
            name=d["name"],
            shape=tuple(d["shape"]),
            method=d["method"],
            values=torch.tensor(d["values"], dtype=torch.float64),
            indices=opt(d["indices"], torch.long),
            stderr=opt(d["stderr"], torch.float64),
        )


@dataclass
class DiagResult:
    """What :func:`fasthess.diag` returns: one :class:`LayerDiag` per parameter plus metadata.

    Example:
        >>> r = DiagResult({"w": LayerDiag("w", (3,), "exact", torch.tensor([1.0, 2.0, 8.0]))}, {})
        >>> r.r_med()
        {'w': 4.0}
        >>> DiagResult.from_json(r.to_json()).r_med() == r.r_med()
        True
    """

    layers: dict[str, LayerDiag]
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerDiag:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def r_med(self, stabilized: bool = False) -> dict[str, float]:
        """``{layer: R_med}``; ``stabilized=True`` is the paper's table variant."""
        return {n: layer.r_med(stabilized) for n, layer in self.layers.items()}

    def quantiles(self, qs: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> dict[str, dict[float, float]]:
        return {n: stats.quantiles(layer.values, qs) for n, layer in self.layers.items()}

    def summary(self, stabilized: bool = True) -> str:
        """A plain-text table: layer, entries, median |H_ii|, max |H_ii|, R_med."""
        rows = [f"{'layer':<48} {'entries':>8} {'median|H_ii|':>13} {'max|H_ii|':>11} {'R_med':>9}"]
        for n, layer in self.layers.items():
            q = stats.quantiles(layer.values, (0.5, 1.0))
            rows.append(
                f"{n:<48} {layer.values.numel():>8} {q[0.5]:>13.4e} {q[1.0]:>11.4e} {layer.r_med(stabilized):>9.3f}"
            )
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "layers": [layer.to_dict() for layer in self.layers.values()]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiagResult":
        layers = [LayerDiag.from_dict(x) for x in d["layers"]]
        return cls({layer.name: layer for layer in layers}, dict(d.get("meta", {})))

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise (and write to ``path`` if given); NaN/Inf are kept as JSON extensions."""
        text = json.dumps(self.to_dict())
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "DiagResult":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))
