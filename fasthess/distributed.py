"""Hessian diagonals across the ranks of a ``torch.distributed`` process group.

``fasthess.diag(..., process_group=pg)`` splits one computation between the ranks
of ``pg`` and returns, on every rank, the answer of a single-process run on the
whole batch (equal to float round-off: only the order of the sums changes).
Every rank passes the same model, loss closures, layers and seed; fasthess picks
each rank's share itself. Two ways to share (``shard=``):

* ``"closures"`` (data parallel): rank ``r`` evaluates micro-batches
  ``r, r + W, r + 2W, ...``. Sampled and exact entries are linear in the
  closures, so the ranks' sums are all-reduced once and divided by the global
  count (exact mean for any count, divisible by ``W`` or not). Hutchinson sums
  ``Hz`` over closures per probe chunk, so those blocks are all-reduced before
  the running-statistics update (one collective per chunk).
* ``"directions"``: every rank evaluates every closure, on its contiguous share
  of each layer's sampled/exact coordinates (results summed into place, exact)
  or of the probes (per-rank running mean and ``M2`` merged exactly with Chan's
  formula for several groups, in two all-reduces).

``"auto"`` takes ``"directions"`` for Hutchinson (same compute, one collective
at the end instead of one per chunk) and for sampled/exact entries when the
closures do not split evenly (fewer than ``4 W`` and not a multiple of ``W``),
``"closures"`` otherwise (each rank then records the loss once per closure it
owns, not once per closure).

Coordinates and probes come from ``(seed, name)`` / ``(seed, probe index)``
generators (:mod:`fasthess.sampling`), so every rank draws the same ones.

Failures do not hang: every synchronisation point starts with a status exchange
(a monitored barrier on gloo, then one small all-gather), which also checks that
the ranks agree on the problem; a rank whose own work raised announces it there
before re-raising, and the others raise :class:`DistributedError` naming it. A
rank that died or stalled longer than the process group's timeout (set with
``init_process_group(timeout=...)`` or ``new_group(timeout=...)``) makes the
others raise :class:`DistributedError` after that timeout (a dead process is
usually noticed at once). Tensors travel on the CPU for gloo and on the current
CUDA device for NCCL.

A ``DistributedDataParallel`` model is unwrapped (names and parameters are those
of ``.module``) and, during the call, the wrapper forwards straight to its module,
so closures that call the wrapper neither broadcast buffers nor arm DDP's
gradient all-reduce hooks.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor, nn

from .errors import DistributedError

SHARDS = ("auto", "closures", "directions")
_MSG_BYTES = 240
# Fields every rank must agree on, in the order they travel.
_FIELDS = (
    ("closures", "the number of loss closures (micro-batches)"),
    ("layers", "the number of selected layers"),
    ("names", "the selected layers' names"),
    ("shapes", "the selected layers' shapes"),
    ("dtype", "the compute dtype"),
    ("method", "method="),
    ("count", "num_samples= / num_probes="),
    ("seed", "seed="),
    ("probe", "probe="),
    ("shard", "shard="),
)

__all__ = ["DistributedError", "SHARDS", "ShardPlan", "signature", "unwrap_ddp"]


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def unwrap_ddp(model: nn.Module) -> tuple[nn.Module, contextlib.AbstractContextManager]:
    """The module inside a ``DistributedDataParallel`` wrapper, and a context that bypasses the wrapper.

    Inside the context, calling the wrapper calls its module directly: no buffer
    broadcast, no reducer preparation, so DDP's gradient hooks stay idle and the
    next training step is unaffected. Other models are returned as they are.

    Example:
        >>> m = torch.nn.Linear(2, 2)
        >>> inner, ctx = unwrap_ddp(m)
        >>> inner is m
        True
    """
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return model, contextlib.nullcontext()

    @contextlib.contextmanager
    def direct() -> Iterator[None]:
        inner = model.module
        model.forward = lambda *args, **kwargs: inner(*args, **kwargs)  # instance attribute shadows DDP.forward
        try:
            yield
        finally:
            del model.forward

    return model.module, direct()


class ShardPlan:
    """Which closures and directions this rank computes, and the collectives that combine them.

    With ``process_group=None`` it is the single-process plan: every method is a
    no-op, so the computation code is the same either way.

    Args:
        process_group: a ``torch.distributed`` process group, ``"world"`` for the
            default group, or ``None`` (single process).
        shard: ``"auto"``, ``"closures"`` or ``"directions"``.
        method: the ``fasthess.diag`` method (``"auto"`` depends on it).
        num_closures: how many loss closures every rank passed.
        probes_shareable: whether Hutchinson's probes may be split between ranks
            (a plain mean over probes); variance-reduced or adaptively stopped
            estimates need every probe on every rank, so they share closures.

    Raises:
        DistributedError: a process group is given but torch.distributed is not
            initialised, or this process is not a member of it.

    Example:
        >>> plan = ShardPlan(None, "auto", "sampled", num_closures=3)  # one process: everything is local
        >>> list(plan.closures(3)), plan.probe_range(10), plan.meta()["world_size"]
        ([0, 1, 2], (0, 10), 1)
    """

    def __init__(
        self, process_group: Any, shard: str, method: str, num_closures: int, probes_shareable: bool = True
    ) -> None:
        if shard not in SHARDS:
            raise ValueError(f"unknown shard {shard!r}; choose one of {SHARDS}")
        if method == "hutchinson" and not probes_shareable:
            if process_group is not None and shard == "directions":
                raise ValueError(
                    "shard='directions' splits the probes of plain Hutchinson only; variance_reduction and "
                    "target_rel_error need every probe on every rank: use shard='closures' (or 'auto')"
                )
            shard = "closures"
        self.requested = shard
        self.group = None
        self.rank, self.world = 0, 1
        self.mode: str | None = None
        self.backend: str | None = None
        if process_group is None:
            return
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise DistributedError(
                "process_group was given but torch.distributed is not initialised in this process. Call "
                "torch.distributed.init_process_group('gloo' or 'nccl') first (under torchrun it reads the "
                "rank and world size from the environment), or pass process_group=None for one process."
            )
        if isinstance(process_group, str):
            if process_group != "world":
                raise ValueError(f"process_group={process_group!r}: pass a ProcessGroup, 'world' or None")
            process_group = dist.group.WORLD
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        if self.rank < 0:
            raise DistributedError(
                "this process is not a member of the process_group passed to fasthess.diag; call it only "
                "on the group's ranks"
            )
        self.world = dist.get_world_size(process_group)
        self.backend = str(dist.get_backend(process_group))
        if shard == "auto":
            even = num_closures % self.world == 0 or num_closures >= 4 * self.world
            shard = "closures" if method != "hutchinson" and even else "directions"
        self.mode = shard if self.world > 1 else None

    # ------------------------------------------------------------------ shares
    def closures(self, count: int) -> range:
        """Indices of the closures this rank evaluates."""
        if self.mode == "closures":
            return range(self.rank, count, self.world)
        return range(count)

    def split(self, indices: Sequence[Tensor]) -> list[Tensor]:
        """This rank's contiguous share of each layer's coordinates (all of them unless sharding directions)."""
        if self.mode != "directions":
            return list(indices)
        return [idx.tensor_split(self.world)[self.rank] for idx in indices]

    def probe_range(self, num_probes: int) -> tuple[int, int]:
        """Probe numbers ``[lo, hi)`` this rank evaluates."""
        if self.mode != "directions":
            return 0, num_probes
        share = torch.arange(num_probes).tensor_split(self.world)[self.rank]
        lo = int(share[0]) if share.numel() else num_probes
        return lo, lo + share.numel()

    # ------------------------------------------------------------------ reductions
    def entries(self, local: list[Tensor], indices: Sequence[Tensor], chunk: Any) -> list[Tensor]:
        """Sums of this rank's entry blocks → sums over every closure of every coordinate, on every rank."""
        if self.mode is None:
            return local
        if self.mode == "directions":
            full = []
            for block, idx in zip(local, indices):
                total = block.new_zeros(idx.numel())
                # each coordinate is computed by exactly one rank: the sum of the zero-padded blocks is exact
                total[torch.arange(idx.numel()).tensor_split(self.world)[self.rank]] = block
                full.append(total)
            local = full
        self.sync(chunk, "sum the Hessian entries")
        return self._all_reduce(local)

    def sum_over_closures_(self, blocks: list[Tensor], chunk: Any) -> None:
        """Hutchinson, closure sharding: the per-chunk ``Hz`` blocks summed over every rank's closures, in place."""
        if self.mode != "closures":
            return
        self.sync(chunk, "sum the Hessian-vector products of a probe chunk")
        for block, total in zip(blocks, self._all_reduce(blocks)):
            block.copy_(total)

    def merge_welford_(self, means: list[Tensor], m2s: list[Tensor], count: int, total: int, chunk: Any) -> None:
        """Hutchinson, direction sharding: merge each rank's running mean / ``M2`` of ``count`` probes, in place.

        Chan et al.'s formula for several groups: ``mean = Σ n_r mean_r / N`` and
        ``M2 = Σ [M2_r + n_r (mean_r - mean)²]``.
        """
        if self.mode != "directions":
            return
        self.sync(chunk, "merge the Hutchinson statistics")
        means_all = self._all_reduce([m * (count / total) for m in means])
        spread = self._all_reduce([m2 + count * (m - g) ** 2 for m, m2, g in zip(means, m2s, means_all)])
        for mean, m2, g, s in zip(means, m2s, means_all, spread):
            mean.copy_(g)
            m2.copy_(s)

    # ------------------------------------------------------------------ agreement and failures
    def check(self, signature: dict[str, Any], chunk: Any) -> None:
        """First synchronisation: the ranks must agree on ``signature``; the chunk size becomes the smallest.

        Raises:
            DistributedError: naming the field the ranks disagree on and each rank's value.
        """
        if self.mode is None:
            return
        rows = self.sync(chunk, "start fasthess.diag", signature)
        for pos, (key, what) in enumerate(_FIELDS):
            values = [int(r[2 + pos]) for r in rows]
            if len(set(values)) > 1:
                shown = ", ".join(f"rank {i}: {v}" for i, v in enumerate(values))
                if key in ("names", "shapes", "dtype", "probe", "shard", "method"):
                    shown = f"rank(s) {[i for i, v in enumerate(values) if v != values[0]]} differ from rank 0"
                    shown += f"; this rank (rank {self.rank}) has {signature['_show'][key]!r}"
                raise DistributedError(
                    f"the ranks of the process group disagree on {what} ({shown}). Call fasthess.diag with "
                    "the same model, loss closures (the whole list: fasthess shares it out), layers, dtype, "
                    "method, counts, seed and shard on every rank."
                )

    def sync(self, chunk: Any, what: str, signature: dict[str, Any] | None = None,
             failure: BaseException | None = None) -> list[list[int]]:
        """A synchronisation point: exchange status (and signature); raise if any other rank failed.

        Also sets ``chunk.size`` to the smallest over the ranks, so closure-sharded
        probe chunks stay the same size everywhere after an out-of-memory retry.
        """
        payload = torch.zeros(3 + len(_FIELDS) + _MSG_BYTES, dtype=torch.int64)
        payload[0] = 1 if failure is not None else 0
        payload[1] = chunk.size
        if signature is not None:
            payload[2 : 2 + len(_FIELDS)] = torch.tensor([int(signature[k]) % 2**62 for k, _ in _FIELDS])
        if failure is not None:
            msg = f"{type(failure).__name__}: {failure}".encode()[:_MSG_BYTES]
            payload[2 + len(_FIELDS)] = len(msg)
            payload[3 + len(_FIELDS) : 3 + len(_FIELDS) + len(msg)] = torch.tensor(list(msg), dtype=torch.int64)
        rows = self._all_gather(payload, what)
        chunk.size = int(rows[:, 1].min())
        failed = [i for i in range(self.world) if rows[i, 0] and i != self.rank]
        if failed and failure is None:
            i = failed[0]
            n = int(rows[i, 2 + len(_FIELDS)])
            msg = bytes(rows[i, 3 + len(_FIELDS) : 3 + len(_FIELDS) + n].tolist()).decode(errors="replace")
            raise DistributedError(
                f"rank {i} of {self.world} failed while this rank (rank {self.rank}) waited to {what}: {msg}. "
                "Its own traceback is in that rank's log."
            )
        return rows.tolist()

    @contextlib.contextmanager
    def guard(self, chunk: Any) -> Iterator[None]:
        """Run this rank's share; if it raises, tell the other ranks at their next synchronisation point."""
        try:
            yield
        except DistributedError:
            raise  # raised by a collective: the others already know
        except Exception as err:
            if self.mode is not None:
                with contextlib.suppress(DistributedError):
                    self.sync(chunk, "report a failure", failure=err)
            raise

    def meta(self) -> dict[str, Any]:
        """What ``DiagResult.meta`` records about the sharing."""
        return {"world_size": self.world, "shard": self.mode, "dist_backend": self.backend}

    # ------------------------------------------------------------------ collectives
    def _device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")  # gloo (also "cpu:gloo,cuda:nccl" groups: these buffers are small)

    def _timeout(self) -> timedelta | None:
        try:  # the group's own timeout (init_process_group / new_group(timeout=...))
            return self.group._get_backend(self._device()).options._timeout
        except Exception:  # noqa: BLE001 - private API; fall back to torch's default
            return None

    def _wait(self, work: Any, what: str) -> None:
        timeout = self._timeout()
        try:
            work.wait(timeout) if timeout is not None else work.wait()
        except Exception as err:  # noqa: BLE001 - gloo/NCCL raise RuntimeError subclasses of many kinds
            raise self._error(what, err) from err

    def _error(self, what: str, err: BaseException) -> DistributedError:
        timeout = self._timeout()
        limit = f"{timeout.total_seconds():g} s" if timeout is not None else "the process group's timeout"
        return DistributedError(
            f"rank {self.rank} of {self.world}: could not {what}: another rank died, stalled for more than "
            f"{limit} or is running different code ({type(err).__name__}: {str(err).strip()[:300]}). "
            "Check the other ranks' logs; if their work is just uneven, create the process group with a "
            "longer timeout."
        )

    def _all_gather(self, payload: Tensor, what: str) -> Tensor:
        import torch.distributed as dist

        if self.backend == "gloo":
            try:  # names the ranks that did not arrive, on rank 0
                dist.monitored_barrier(self.group, timeout=self._timeout(), wait_all_ranks=True)
            except Exception as err:  # noqa: BLE001
                raise self._error(what, err) from err
        payload = payload.to(self._device())
        out = [torch.empty_like(payload) for _ in range(self.world)]
        self._wait(dist.all_gather(out, payload, group=self.group, async_op=True), what)
        return torch.stack(out).cpu()

    def _all_reduce(self, tensors: list[Tensor]) -> list[Tensor]:
        """Sum over the ranks of each tensor (one flat buffer, one collective)."""
        import torch.distributed as dist

        if not tensors:
            return []
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors]).to(self._device())
        self._wait(dist.all_reduce(flat, group=self.group, async_op=True), "sum results over the ranks")
        out, start = [], 0
        for t in tensors:
            out.append(flat[start : start + t.numel()].reshape(t.shape).to(t.device, t.dtype))
            start += t.numel()
        return out


def signature(method: str, objective: Any, count: int, seed: int, probe: str, shard: str) -> dict[str, Any]:
    """What every rank must agree on, as integers (plus readable values for the error message)."""
    names = ",".join(objective.names)
    shapes = ";".join(str(tuple(p.shape)) for p in objective.primals)
    dtype = str(objective.primals[0].dtype)
    return {
        "closures": len(objective),
        "layers": len(objective.names),
        "names": _crc(names),
        "shapes": _crc(shapes),
        "dtype": _crc(dtype),
        "method": _crc(method),
        "count": count,
        "seed": seed,
        "probe": _crc(probe),
        "shard": _crc(shard),
        "_show": {"names": objective.names, "shapes": shapes, "dtype": dtype, "method": method,
                  "probe": probe, "shard": shard},
    }
