"""Result objects of :func:`fasthess.diag`, with statistics and a JSON round trip."""

from __future__ import annotations

import json
import math
import warnings
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
        method: ``"sampled"``, ``"exact"``, ``"hutchinson"``, or — not the
            Hessian — ``"ggn"`` / ``"ggn_mc"`` (generalised Gauss-Newton).
        values: ``(k,)`` float64. Sampled: exact ``H_ii`` at ``indices``. Exact:
            the whole diagonal, flattened. Hutchinson: the estimate, flattened.
        indices: ``(k,)`` int64 flat indices for the sampled method, else ``None``.
        stderr: ``(numel,)`` per-entry standard error (estimates only).
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

    def confidence_interval(self, level: float = 0.95) -> tuple[Tensor, Tensor]:
        """Per-entry ``(lower, upper)`` normal-approximation interval ``values ± z·stderr``.

        Example:
            >>> d = LayerDiag("w", (2,), "hutchinson", torch.tensor([1.0, 2.0]), stderr=torch.tensor([0.1, 0.5]))
            >>> [round(x, 3) for x in d.confidence_interval(0.95)[0].tolist()]
            [0.804, 1.02]
        """
        if self.stderr is None:
            raise ValueError(f"{self.name}: method {self.method!r} has no standard errors (exact entries need none)")
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}")
        z = math.sqrt(2.0) * float(torch.erfinv(torch.tensor(level, dtype=torch.float64)))
        return self.values - z * self.stderr, self.values + z * self.stderr

    def r_med(self, stabilized: bool = False) -> float:
        """The paper's R_med over this layer's entries (warns where the entries cannot support it)."""
        self._check_supports_r_med()
        return stats.r_med(self.values, stabilized=stabilized)

    def r_med_ci(
        self, level: float = 0.95, num_boot: int = 2000, stabilized: bool = False, seed: int = 0
    ) -> tuple[float, float, float]:
        """``(R_med, lower, upper)``: bootstrap interval over the coordinate sample (``"sampled"`` only).

        See :func:`fasthess.stats.r_med_bootstrap`. An exact diagonal has no
        sampling error (the interval is the point); estimates are refused, since
        resampling coordinates cannot see the estimation noise that biases their
        R_med (see :func:`fasthess.stats.r_med_noise_bias`).
        """
        if self.method == "exact":
            r = stats.r_med(self.values, stabilized=stabilized)
            return r, r, r
        if self.method != "sampled":
            raise ValueError(
                f"{self.name}: a bootstrap interval for R_med needs exact entries, but this is a {self.method!r} "
                "estimate whose noise biases R_med. Use method='sampled' (exact H_ii at sampled coordinates), "
                "or fasthess.stats.r_med_noise_bias(values, stderr) to size the bias of this estimate."
            )
        return stats.r_med_bootstrap(self.values, level, num_boot, stabilized, seed)

    def _check_supports_r_med(self) -> None:
        if self.method in ("ggn", "ggn_mc"):
            warnings.warn(
                f"{self.name}: R_med of a {self.method!r} result is a statistic of the Gauss-Newton diagonal, "
                "NOT of the Hessian diagonal the paper's R_med is defined on",
                stacklevel=3,
            )
        if self.stderr is not None and self.values.numel() > 0 and bool(torch.isfinite(self.values).all()):
            noise = stats.noise_at_median(self.values, self.stderr)
            if noise > stats.NOISE_WARN:
                bias = stats.r_med_noise_bias(self.values, self.stderr, num_draws=50)["relative_bias"]
                warnings.warn(
                    f"{self.name}: R_med of this {self.method} estimate is unreliable: the typical standard error "
                    f"is {noise:.0%} of the median |H_ii| it divides by (noise inflates the max and the median; "
                    f"re-noising suggests a bias of at least {bias:+.0%}). Use method='sampled' for exact "
                    "entries, more num_probes, or variance_reduction=.",
                    stacklevel=3,
                )

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

    def r_med_ci(
        self, level: float = 0.95, num_boot: int = 2000, stabilized: bool = False, seed: int = 0
    ) -> dict[str, tuple[float, float, float]]:
        """``{layer: (R_med, lower, upper)}``: bootstrap intervals over the sampled coordinates.

        See :meth:`LayerDiag.r_med_ci`.

        Example:
            >>> r = DiagResult({"w": LayerDiag("w", (9,), "sampled", torch.arange(1.0, 10.0), torch.arange(9))})
            >>> est, lo, hi = r.r_med_ci(num_boot=200)["w"]
            >>> est, lo <= est <= hi
            (1.8, True)
        """
        return {n: layer.r_med_ci(level, num_boot, stabilized, seed) for n, layer in self.layers.items()}

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
