"""fasthess.diag across 2 gloo ranks on localhost equals the single-process run; failures do not hang.

Each group of checks runs in one pair of spawned processes (starting two Python
processes with torch costs most of the time), which write what they saw to a file
the tests below read.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tolerances import DISTRIBUTED_VS_SINGLE, ENGINE_VS_DENSE, assert_entries_close
from torch.torch_version import TorchVersion
from zoo import mlp

import fasthess
from fasthess.errors import DistributedError
from fasthess.result import LayerDiag

WORLD = 2
CASES = {
    "sampled-closures": dict(method="sampled", shard="closures", num_samples=6),
    "sampled-directions": dict(method="sampled", shard="directions", num_samples=6),
    "sampled-auto": dict(method="sampled", num_samples=6),
    # one coordinate per layer: one rank's share is empty (generic engine path)
    "sampled-directions-fwd_fwd": dict(method="sampled", shard="directions", num_samples=1, engine="fwd_fwd"),
    "exact-closures": dict(method="exact", shard="closures"),
    "exact-directions": dict(method="exact", shard="directions"),
    "hutchinson-closures": dict(method="hutchinson", shard="closures", num_probes=7, chunk_size=2),
    "hutchinson-directions": dict(method="hutchinson", shard="directions", num_probes=7, chunk_size=2),
    "hutchinson-closures-gaussian": dict(method="hutchinson", shard="closures", num_probes=5, probe="gaussian"),
    # variance-reduced estimators share the closures (auto), every HVP summed over the ranks
    "hutchinson-diagpp-auto": dict(method="hutchinson", variance_reduction="diagpp", num_probes=6),
    "hutchinson-xdiag-closures": dict(method="hutchinson", shard="closures", variance_reduction="xdiag", num_probes=6),
}


def _problem(num_closures: int = 3, device: str = "cpu"):
    """The zoo MLP with its 11 examples as ``num_closures`` micro-batches (3 on 2 ranks: not divisible)."""
    case = mlp()
    torch.manual_seed(3)
    x, y = torch.randn(11, 5, dtype=torch.float64).to(device), torch.randint(0, 3, (11,)).to(device)
    parts = torch.arange(11).tensor_split(num_closures)
    model = case.model.to(device)
    closures = [lambda s=s: F.cross_entropy(model(x[s]), y[s]) for s in parts]
    return model, closures, case.layers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, tmp_path: Path, timeout: float = 120, backend: str = "gloo") -> list[dict]:
    """Run ``fn(rank, out_dir)`` on 2 ranks; return what each rank saved."""
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(fn, r, port, str(tmp_path), backend)) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} still running after {timeout} s: a hang"
    saved = []
    for r in range(WORLD):
        path = tmp_path / f"rank{r}.pt"
        assert path.exists(), f"rank {r} saved nothing (exit code {procs[r].exitcode}); see the captured stderr"
        with torch.serialization.safe_globals([fasthess.DiagResult, LayerDiag, TorchVersion]):  # results, no code
            saved.append(torch.load(path, weights_only=True))
    return saved


def _entry(fn, rank: int, port: int, out: str, backend: str = "gloo") -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                           timeout=datetime.timedelta(seconds=60))
    record = fn(rank, Path(out))
    torch.save(record, Path(out) / f"rank{rank}.pt")
    # a rank that died is absent here; the rest leave without a collective
    os._exit(0)


# ----------------------------------------------------------------- equal to one process
def _equality_worker(rank: int, out_dir: Path) -> dict:
    out = {}
    model, closures, layers = _problem()
    for name, kw in CASES.items():
        res = fasthess.diag(model, closures, layers, process_group="world", **kw)
        out[name] = res
    # a DDP-wrapped model, closures calling the wrapper: names of the inner model, no gradient all-reduce
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    ddp = torch.nn.parallel.DistributedDataParallel(model)
    calls = []

    def counting_hook(state, bucket):
        calls.append(1)
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, counting_hook)
    x, y = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5)), torch.arange(8) % 3
    ddp_closures = [lambda s=s: F.cross_entropy(ddp(x[s]), y[s]) for s in torch.arange(8).tensor_split(4)]
    res = fasthess.diag(ddp, ddp_closures, method="sampled", num_samples=6, process_group="world")
    out["ddp"] = res
    out["ddp_hook_calls_during_diag"] = len(calls)
    out["ddp_grads_after_diag"] = [p.grad is not None for p in ddp.parameters()]
    ddp.train()
    F.cross_entropy(ddp(x), y).backward()  # the next training step still synchronises gradients
    out["ddp_hook_calls_training"] = len(calls)
    ddp.eval()
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _spawn(_equality_worker, tmp_path_factory.mktemp("dist_equal"))


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process(two_ranks: list[dict], case: str) -> None:
    model, closures, layers = _problem()
    kw = {k: v for k, v in CASES[case].items() if k != "shard"}
    want = fasthess.diag(model, closures, layers, **kw)
    rtol, atol_rel = DISTRIBUTED_VS_SINGLE
    for rank, saved in enumerate(two_ranks):
        got = saved[case]
        assert got.meta["world_size"] == WORLD and got.meta["num_closures"] == 3
        auto = "closures" if "variance_reduction" in kw else "directions"  # auto: 3 closures on 2 ranks
        assert got.meta["shard"] == CASES[case].get("shard", auto)
        assert list(got.layers) == list(want.layers)
        for name, w in want.layers.items():
            g = got[name]
            if w.indices is not None:  # same seed: the same coordinates on every rank
                assert torch.equal(g.indices, w.indices)
            assert_entries_close(g.values, w.values, rtol, atol_rel, f"rank {rank} {case} {name}")
            if w.stderr is not None:
                assert_entries_close(g.stderr, w.stderr, rtol, atol_rel, f"rank {rank} {case} {name} stderr")
    for name in two_ranks[0][case].layers:  # and the ranks agree exactly
        assert torch.equal(two_ranks[0][case][name].values, two_ranks[1][case][name].values)


def test_ddp_model_unwrapped_without_triggering_its_hooks(two_ranks: list[dict]) -> None:
    model, _, _ = _problem()
    x, y = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5)), torch.arange(8) % 3
    closures = [lambda s=s: F.cross_entropy(model(x[s]), y[s]) for s in torch.arange(8).tensor_split(4)]
    want = fasthess.diag(model, closures, method="sampled", num_samples=6)
    for saved in two_ranks:
        got = saved["ddp"]
        assert list(got.layers) == ["0.weight", "2.weight", "4.weight"]  # no "module." prefix
        assert got.meta["shard"] == "closures"  # 4 closures on 2 ranks
        for name, w in want.layers.items():
            assert_entries_close(got[name].values, w.values, *DISTRIBUTED_VS_SINGLE, f"ddp {name}")
        assert saved["ddp_hook_calls_during_diag"] == 0
        assert not any(saved["ddp_grads_after_diag"])
        assert saved["ddp_hook_calls_training"] > 0


# ----------------------------------------------------------------- failures: clear errors, no hang
TIMEOUT_S = 2.0


def _outcome(fn) -> dict:
    start = time.monotonic()
    try:
        fn()
        return {"error": None, "seconds": time.monotonic() - start}
    except Exception as err:  # noqa: BLE001 - recorded for the test to inspect
        return {"error": type(err).__name__, "message": str(err), "seconds": time.monotonic() - start}


def _failure_worker(rank: int, out_dir: Path) -> dict:
    out = {}
    group = dist.new_group(timeout=datetime.timedelta(seconds=TIMEOUT_S))
    model, closures, layers = _problem(num_closures=4)
    fasthess.diag(model, closures, layers, num_samples=4)  # warm-up: the first call pays one-off set-up costs

    def run(cls, **kw):
        dist.barrier()  # start each case together (default group)
        return _outcome(lambda: fasthess.diag(model, cls, layers, process_group=group, **kw))

    # the ranks pass different closure lists
    out["mismatch"] = run(closures if rank == 0 else closures[:3], shard="closures")
    dist.barrier()
    out["layers"] = _outcome(lambda: fasthess.diag(model, closures, layers if rank == 0 else layers[:2], process_group=group))
    dist.barrier()
    other = layers if rank == 0 else layers[:2] + ["2.weight"]
    out["names"] = _outcome(lambda: fasthess.diag(model, closures, other, process_group=group))

    def failing(c):
        def f():
            raise ValueError("bad micro-batch on rank 1")
        return f if c == 3 else closures[c]

    # closure 3 (rank 1's share) raises during the local computation
    out["raises"] = run([failing(c) for c in range(4)], method="sampled", num_samples=4, shard="closures")
    # the same in a closure-sharded Hutchinson loop (one synchronisation per probe chunk), in its second chunk
    calls = {"n": 0}

    def late(c):
        def f():
            calls["n"] += 1
            if rank == 1 and calls["n"] > 3:  # 1: validation, 2-3: the first chunk
                raise ValueError("rank 1 fails in the second probe chunk")
            return closures[c]()
        return f

    out["raises_hutchinson"] = run([late(c) for c in range(4)], method="hutchinson", num_probes=4, chunk_size=2,
                                   shard="closures", engine="double_backward")

    # rank 1 stalls longer than the group's timeout
    def slow(c):
        def f():
            if rank == 1 and c == 1:
                time.sleep(TIMEOUT_S + 2)
            return closures[c]()
        return f

    out["stall"] = run([slow(c) for c in range(4)], method="sampled", num_samples=4, shard="closures")

    # rank 1 dies (on the default group, which is still intact)
    def dying(c):
        def f():
            if rank == 1 and c == 1:
                os._exit(3)
            return closures[c]()
        return f

    torch.save(out, out_dir / f"rank{rank}.pt")  # rank 1 does not come back from the next case
    dist.barrier()
    out["dies"] = _outcome(lambda: fasthess.diag(model, [dying(c) for c in range(4)], layers, method="exact",
                                                  process_group="world", shard="closures"))
    return out


@pytest.fixture(scope="module")
def failures(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _spawn(_failure_worker, tmp_path_factory.mktemp("dist_fail"))


def test_ranks_that_disagree_raise_naming_the_mismatch(failures: list) -> None:
    for saved in failures:  # every rank raises the same error
        got = saved["mismatch"]
        assert got["error"] == "DistributedError", got
        assert "number of loss closures" in got["message"] and "rank 0: 4, rank 1: 3" in got["message"]
        got = saved["layers"]
        assert got["error"] == "DistributedError", got
        assert "number of selected layers" in got["message"] and "rank 0: 3, rank 1: 2" in got["message"]
        got = saved["names"]
        assert got["error"] == "DistributedError", got
        assert "the selected layers' names" in got["message"] and "rank(s) [1] differ from rank 0" in got["message"]


def test_a_rank_that_raises_is_named_on_the_others(failures: list) -> None:
    for case in ("raises", "raises_hutchinson"):
        got = failures[0][case]
        assert got["error"] == "DistributedError", got
        assert "rank 1 of 2 failed" in got["message"] and "ValueError" in got["message"]
        assert got["seconds"] < TIMEOUT_S  # told at once, not after a timeout
        assert failures[1][case]["error"] == "ValueError"  # the failing rank raises its own error


def test_a_stalled_rank_times_out_with_a_clear_error(failures: list) -> None:
    got = failures[0]["stall"]
    assert got["error"] == "DistributedError", got
    assert "stalled for more than 2 s" in got["message"] and "Ranks 1 failed to pass monitoredBarrier" in got["message"]
    assert TIMEOUT_S <= got["seconds"] < TIMEOUT_S + 2
    assert failures[1]["stall"]["error"] == "DistributedError"  # the late rank finds the others gone


def test_a_dead_rank_gives_a_clear_error(failures: list) -> None:
    assert "dies" not in failures[1]  # rank 1 saved its record before it died
    got = failures[0]["dies"]
    assert got["error"] == "DistributedError", got
    assert "another rank died" in got["message"]


def test_process_group_without_init_process_group() -> None:
    model, closures, layers = _problem()
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(DistributedError, match="init_process_group"):
        fasthess.diag(model, closures, layers, process_group="world")
    with pytest.raises(ValueError, match="shard"):
        fasthess.diag(model, closures, layers, shard="rows")


# ----------------------------------------------------------------- CUDA tensors (run by benchmarks/gpu_check.sh)
CUDA_CASES = {k: CASES[k] for k in ("sampled-closures", "exact-directions", "hutchinson-closures", "hutchinson-directions")}


def _cuda_worker(rank: int, out_dir: Path) -> dict:
    device = f"cuda:{rank % torch.cuda.device_count()}"  # gloo: both ranks may share one GPU
    model, closures, layers = _problem(device=device)
    return {name: fasthess.diag(model, closures, layers, process_group="world", **kw) for name, kw in CUDA_CASES.items()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_two_ranks_on_cuda_equal_one_cpu_process(backend: str, tmp_path: Path) -> None:
    if backend == "nccl" and torch.cuda.device_count() < WORLD:
        pytest.skip("NCCL needs a GPU per rank")
    saved = _spawn(_cuda_worker, tmp_path, backend=backend)
    model, closures, layers = _problem()
    rtol, atol_rel = ENGINE_VS_DENSE[(torch.float64, "fwd_rev")]  # another device: the engines' float64 tolerance
    for case, kw in CUDA_CASES.items():
        want = fasthess.diag(model, closures, layers, **{k: v for k, v in kw.items() if k != "shard"})
        for rank, got in enumerate(saved):
            assert got[case].meta["dist_backend"] == backend and got[case].meta["shard"] == kw["shard"]
            for name, w in want.layers.items():
                assert_entries_close(got[case][name].values, w.values, rtol, atol_rel, f"{backend} rank {rank} {case} {name}")


def test_estimators_that_cannot_be_shared_say_how() -> None:
    model, closures, layers = _problem()
    with pytest.raises(ValueError, match="shard='closures'"):
        fasthess.diag(model, closures, layers, method="hutchinson", variance_reduction="diagpp", num_probes=4,
                      process_group="world", shard="directions")
    with pytest.raises(ValueError, match="without process_group"):
        fasthess.diag(model, closures, layers, method="ggn", process_group="world")
