"""Benchmark: ``fasthess.diag`` on 1 process against 2 processes of one ``torch.distributed`` group.

The same problem (the ``sampled_diag`` encoder, quick preset by default: 8 layers, its
batch as 4 micro-batches) is measured in three set-ups, each in its own processes, in
the same run:

* ``1 proc``: ``fasthess.diag`` without a process group, one thread;
* ``W procs``: ``fasthess.diag(..., process_group="world")`` on a gloo (CPU, one
  thread per rank) or NCCL (``--device cuda``, one GPU per rank) group;
* with ``--threads T`` (T > 1) also ``1 proc x T threads``, the other way to use T cores.

Cases: sampled entries with closure sharding and with direction sharding, and
Hutchinson with direction sharding. Every case is timed ``--repeats`` times after one
warm-up, all ranks starting together after a barrier; the time is rank 0's wall
clock for the whole call (so it includes the reductions). Reported: the median
wall seconds, the median CPU seconds of the busiest rank (``time.process_time``:
the critical path when every rank has a core of its own, which a shared machine
does not guarantee), and the speed-ups of both over the one-process run.

Run:
    python benchmarks/distributed_scaling.py                    # 2 CPU processes (gloo)
    python benchmarks/distributed_scaling.py --device cuda --world 2   # 2 GPUs (NCCL)
Writes ``benchmarks/results/distributed_scaling-<preset>[-cuda].{json,csv,png}``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CASES = {
    "sampled/closures": dict(method="sampled", shard="closures"),
    "sampled/directions": dict(method="sampled", shard="directions"),
    "hutchinson/directions": dict(method="hutchinson", shard="directions"),
}


def _worker(rank: int, world: int, threads: int, port: int, args: argparse.Namespace, out: str) -> None:
    import fasthess
    from sampled_diag import PRESETS, build

    torch.set_num_threads(threads)
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))
    c = PRESETS[("encoder", args.preset)]
    model, logits, X, y, layers = build("encoder", c)
    model, X, y = model.to(device), X.to(device), y.to(device)
    closures = [lambda s=s: F.cross_entropy(logits(X[s]), y[s]) for s in torch.arange(len(X)).tensor_split(args.micro_batches)]
    kw = dict(num_samples=c["samples"], num_probes=args.probes)
    group = "world" if world > 1 else None
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for case, opts in CASES.items():
        opts = {**opts, "shard": opts["shard"] if world > 1 else "auto"}
        for r in range(args.repeats + 1):  # the first is a warm-up
            if world > 1:
                dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            res = fasthess.diag(model, closures, layers, process_group=group, **kw, **opts)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall, busy = time.perf_counter() - start, torch.tensor([time.process_time() - start_cpu])
            if world > 1:  # the busiest rank's CPU time
                dist.all_reduce(busy, op=dist.ReduceOp.MAX)
            if r:
                times.setdefault(case, []).append(wall)
                cpu.setdefault(case, []).append(float(busy))
        assert res.meta["world_size"] == world
    if rank == 0:
        Path(out).write_text(json.dumps({"wall": times, "cpu": cpu}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world: int, threads: int, args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, list[float]]]:
    """``{"wall"|"cpu": {case: seconds per repeat}}`` of ``world`` processes with ``threads`` threads each."""
    out = tmp / f"w{world}t{threads}.json"
    mp.start_processes(_worker, args=(world, threads, _free_port(), args, str(out)), nprocs=world, start_method="spawn")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["quick", "paper"], default="quick")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="also measure one process with this many threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    unit = "GPU" if args.device == "cuda" else "proc"
    setups = [(f"1 {unit}", 1, 1), (f"{args.world} {unit}s", args.world, 1)]
    if args.threads > 1 and args.device == "cpu":
        setups.insert(1, (f"1 proc x {args.threads} threads", 1, args.threads))
    seen = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, world, threads in setups:
            print(f"measuring {label} ...", flush=True)
            seen[label] = measure(world, threads, args, Path(tmp))
    rows = []
    base_label = setups[0][0]
    for case in CASES:
        base = statistics.median(seen[base_label]["wall"][case])
        base_cpu = statistics.median(seen[base_label]["cpu"][case])
        for label, world, threads in setups:
            wall, cpu = seen[label]["wall"][case], seen[label]["cpu"][case]
            med, med_cpu = statistics.median(wall), statistics.median(cpu)
            rows.append({"case": case, "setup": label, "processes": world, "threads_per_process": threads,
                         "median_s": round(med, 4), "min_s": round(min(wall), 4), "max_s": round(max(wall), 4),
                         "speedup": round(base / med, 3), "busiest_rank_cpu_s": round(med_cpu, 4),
                         "cpu_speedup": round(base_cpu / med_cpu, 3)})
            print(f"{case:24s} {label:20s} wall {med:7.3f} s (x{base / med:.2f})   busiest rank CPU "
                  f"{med_cpu:7.3f} s (x{base_cpu / med_cpu:.2f})", flush=True)
    from sampled_diag import PRESETS

    stem = args.out / f"distributed_scaling-{args.preset}{'-cuda' if args.device == 'cuda' else ''}"
    meta = {"preset": args.preset, "config": PRESETS[("encoder", args.preset)], "micro_batches": args.micro_batches,
            "probes": args.probes, "repeats": args.repeats, "device": args.device, "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "seconds": seen}, indent=1))
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    _plot(rows, [label for label, _, _ in setups], stem.with_suffix(".png"), meta)
    print(f"wrote {stem}.json/.csv/.png")


def _plot(rows: list[dict], setups: list[str], path: Path, meta: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cases = list(CASES)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(setups)
    for i, label in enumerate(setups):
        vals = [next(r["median_s"] for r in rows if r["case"] == c and r["setup"] == label) for c in cases]
        ax.bar([j + i * width for j in range(len(cases))], vals, width, label=label)
    ax.set_xticks([j + width * (len(setups) - 1) / 2 for j in range(len(cases))], cases)
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"fasthess.diag, encoder ({meta['preset']}), {meta['device']}, {meta['cpus']} CPUs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
