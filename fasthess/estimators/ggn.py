"""The generalised Gauss-Newton (GGN) matrix: exact diagonal, Monte-Carlo diagonal, products.

**Not the Hessian.** For a loss ``ℓ(f(θ))`` of network outputs ``f``, the Hessian is
``H = Jᵀ H_ℓ J + Σ_o (∂ℓ/∂f_o) ∇²f_o``; the GGN keeps the first term,
``G = Jᵀ H_ℓ J`` (``J = ∂f/∂θ``, ``H_ℓ = ∂²ℓ/∂f²``). It is positive semi-definite for
convex losses (cross-entropy, squared error) and, for cross-entropy on softmax
outputs, equals the Fisher information. References: N. N. Schraudolph (2002), "Fast
curvature matrix-vector products for second-order gradient descent", Neural
Computation 14(7); J. Martens (2020), "New insights and perspectives on the natural
gradient method", JMLR 21; the Monte-Carlo diagonal as in BackPACK's DiagGGN-MC
(F. Dangel, F. Kunstner and P. Hennig, 2020, ICLR).

The opaque loss closures fasthess takes elsewhere hide ``f`` and ``ℓ``; the GGN needs
them apart, so these methods take :class:`OutputsAndLoss` closures:
``OutputsAndLoss(outputs=lambda: model(x), loss=lambda out: F.cross_entropy(out, y))``.

* exact: ``diag(G) = Σ_k λ_k (Jᵀ v_k)²`` from the eigendecomposition ``H_ℓ = Σ_k λ_k v_k v_kᵀ``:
  one vector-Jacobian product per output with ``λ_k ≠ 0`` (batched), so it costs about
  ``#outputs / 2`` Hessian-vector products;
* Monte-Carlo: ``r = Σ_k sqrt(λ_k) ε_k v_k`` with Rademacher ``ε`` has ``E[r rᵀ] = H_ℓ``,
  so ``(Jᵀ r)²`` is an unbiased, non-negative sample of ``diag(G)``: one vector-Jacobian
  product per sample.

``H_ℓ`` is formed densely, ``(#outputs, #outputs)`` per closure: pass micro-batches
(a list of :class:`OutputsAndLoss`) when the outputs are many.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import hessian, jvp, vjp, vmap

from ..errors import LossError, MemoryRiskError
from ..objective import Objective
from ..sampling import generator_for
from .hutchinson import Estimate, running_mean
from .operator import FlatOperator

MAX_OUTPUTS = 4096


class OutputsAndLoss:
    """A loss closure split at the network outputs, for the GGN methods.

    Calling it returns ``loss(outputs())``, so it works as ``loss=`` for every
    method of :func:`fasthess.diag`.

    Args:
        outputs: zero-argument callable running the model, returning its outputs
            (any shape; the loss Hessian with respect to them is formed densely).
        loss: callable mapping those outputs to the scalar loss (it may close
            over targets; it must not run the model again).

    Example:
        >>> import torch, torch.nn.functional as F, fasthess
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
        >>> split = fasthess.OutputsAndLoss(lambda: model(x), lambda out: F.cross_entropy(out, y))
        >>> g = fasthess.diag(model, split, ["weight"], method="ggn")
        >>> g.meta["method"], bool((g["weight"].values >= 0).all())
        ('ggn', True)
    """

    def __init__(self, outputs: Callable[[], Tensor], loss: Callable[[Tensor], Tensor]) -> None:
        if not callable(outputs) or not callable(loss):
            raise LossError("OutputsAndLoss(outputs, loss) takes two callables: lambda: model(x) and lambda out: ...")
        self.outputs, self.loss = outputs, loss

    def __call__(self) -> Tensor:
        return self.loss(self.outputs())


def require_splits(closures: Sequence[Callable], what: str) -> list[OutputsAndLoss]:
    """The closures, checked to be :class:`OutputsAndLoss` (the GGN needs the outputs)."""
    if not all(isinstance(c, OutputsAndLoss) for c in closures):
        raise LossError(
            f"{what} needs the network outputs and the loss of the outputs separately; pass "
            "loss=fasthess.OutputsAndLoss(outputs=lambda: model(x), loss=lambda out: criterion(out, y)) "
            "(or a list of them for micro-batches) instead of a plain closure"
        )
    return list(closures)


class GGN:
    """``G = mean_c J_cᵀ H_ℓ,c J_c`` over the closures (micro-batches) of ``objective``.

    Args:
        objective: the loss objective (its closures must be :class:`OutputsAndLoss`).
        chunk_size: vector-Jacobian products per batched pass.

    Counts ``products`` (GGN-vector products, each a JVP and a VJP per closure) and
    ``vjps`` (vector-Jacobian products of the exact / Monte-Carlo diagonal, per closure).
    """

    def __init__(self, objective: Objective, chunk_size: int = 32) -> None:
        splits = require_splits(objective.closures, "the Gauss-Newton matrix")
        self.primals = objective.primals
        self.outputs = Objective(
            objective.model,
            [s.outputs for s in splits],
            dict(zip(objective.names, objective.primals)),
            dtype=objective.dtype,
            fresh_buffers=bool(objective._buffers),
        )
        self.splits = splits
        self.chunk_size = max(1, int(chunk_size))
        self.products = self.vjps = 0
        self._factors: dict[int, tuple[Tensor, Tensor, tuple[int, ...]]] = {}
        self.clipped_negative = False

    def __len__(self) -> int:
        return len(self.splits)

    def _f(self, c: int) -> Callable[..., Tensor]:
        def f(*values: Tensor) -> Tensor:
            out = self.outputs.evaluate(c, values)
            if not isinstance(out, Tensor):
                raise LossError(f"OutputsAndLoss.outputs returned {type(out).__name__}, not a tensor")
            return out

        return f

    def factor(self, c: int) -> tuple[Tensor, Tensor, tuple[int, ...]]:
        """Eigenvalues ``(O,)``, eigenvectors ``(O, O)`` of ``H_ℓ`` for closure ``c``, and the output shape."""
        if c not in self._factors:
            with torch.no_grad():
                out = self._f(c)(*self.primals).detach()
            if out.numel() > MAX_OUTPUTS:
                raise MemoryRiskError(
                    f"the GGN forms the loss Hessian w.r.t. the outputs densely; closure {c} has {out.numel()} "
                    f"outputs (limit {MAX_OUTPUTS}). Split the batch into micro-batches "
                    "(loss=[OutputsAndLoss(...), ...])."
                )
            loss = self.splits[c].loss
            H = hessian(lambda o: loss(o.reshape(out.shape)))(out.reshape(-1)).detach().to(torch.float64)
            lam, V = torch.linalg.eigh((H + H.T) / 2)
            self._factors[c] = (lam, V, tuple(out.shape))
        return self._factors[c]

    def _vjp(self, c: int, U: Tensor) -> list[Tensor]:
        """``J_cᵀ u`` for each row of ``U`` (``(k, O)``): one ``(k, *shape)`` block per parameter."""
        _, _, shape = self.factor(c)
        _, pullback = vjp(self._f(c), *self.primals)
        dtype = self.primals[0].dtype
        parts = [vmap(pullback)(U[i : i + self.chunk_size].to(dtype).reshape(-1, *shape)) for i in range(0, U.shape[0], self.chunk_size)]
        return [torch.cat(blocks) for blocks in zip(*parts)]

    def _jvp(self, c: int, blocks: list[Tensor]) -> Tensor:
        """``J_c v`` for each of the ``k`` directions: ``(k, O)``."""
        f = self._f(c)
        out = vmap(lambda *t: jvp(f, tuple(self.primals), t)[1])(*blocks)
        return out.reshape(blocks[0].shape[0], -1).to(torch.float64)

    def apply(self, blocks: list[Tensor]) -> list[Tensor]:
        """``G v`` per direction (the :class:`FlatOperator` interface)."""
        total = [torch.zeros_like(b, dtype=torch.float64) for b in blocks]
        self.products += blocks[0].shape[0]
        for c in range(len(self)):
            lam, V, _ = self.factor(c)
            U = ((self._jvp(c, blocks) @ V) * lam) @ V.T  # H_ℓ J v, rows
            for t, b in zip(total, self._vjp(c, U)):
                t += b.to(torch.float64)
        return [(t / len(self)).to(blocks[0].dtype) for t in total]

    def operator(self) -> FlatOperator:
        p = self.primals[0]
        return FlatOperator([tuple(q.shape) for q in self.primals], self.apply, p.dtype, p.device)

    def diagonal(self) -> Tensor:
        """Exact ``diag(G)``, flat ``(n,)`` float64."""
        total = None
        for c in range(len(self)):
            lam, V, _ = self.factor(c)
            keep = lam.abs() > 1e-12 * float(lam.abs().max().clamp_min(1e-300))
            blocks = self._vjp(c, V[:, keep].T)  # Jᵀ v_k for each kept eigenvector
            self.vjps += int(keep.sum())
            flat = torch.cat([b.reshape(b.shape[0], -1).to(torch.float64) for b in blocks], 1)
            d = (lam[keep, None] * flat**2).sum(0)
            total = d if total is None else total + d
        return total / len(self)

    def monte_carlo(self, num_samples: int, seed: int, **running_mean_kwargs) -> Estimate:
        """Monte-Carlo ``diag(G)`` from ``num_samples`` samples ``(Jᵀ r)²`` (one VJP per closure each)."""
        op = self.operator()

        def sample(start: int, k: int) -> tuple[Tensor, Tensor]:
            out = torch.zeros(k, op.n, dtype=torch.float64, device=op.device)
            for c in range(len(self)):
                lam, V, _ = self.factor(c)
                if bool((lam < -1e-10 * lam.abs().max()).any()) and not self.clipped_negative:
                    self.clipped_negative = True
                    warnings.warn(
                        "the loss Hessian w.r.t. the outputs has negative eigenvalues (a non-convex loss): "
                        "ggn_mc samples only its positive part; use method='ggn' for the exact signed value",
                        stacklevel=2,
                    )
                eps = torch.stack(
                    [
                        torch.randint(0, 2, (lam.numel(),), generator=generator_for(seed, f"ggn_mc/{c}/{j}"))
                        for j in range(start, start + k)
                    ]
                ).to(V) * 2 - 1
                R = (eps * lam.clamp_min(0).sqrt()) @ V.T  # rows r with E[r rᵀ] = H_ℓ (its PSD part)
                out += op.join(self._vjp(c, R)).to(torch.float64) ** 2
                self.vjps += k
            return out / len(self), torch.ones_like(out)

        return running_mean(op, sample, num_samples, **running_mean_kwargs)
