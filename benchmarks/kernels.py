"""Kernel benchmark: the attention 2-jet backends against the torch reference (nested jvp on the math path).

Per sequence length T and backend: median seconds over repeats, tangents/s, GB/s (the
inputs read and outputs written once, the least traffic possible), TFLOP/s (the
algorithm's matrix products: 2 for the primal + 10 per tangent, each 2·B·H·Tq·Tk·D,
halved for causal) and peak memory above the inputs (CUDA: the allocator's peak;
CPU: growth of the process's peak resident set, approximate), with speed and memory
ratios against the reference measured in the same run. Writes CSV and JSON to --out.

    python benchmarks/kernels.py --device cpu --T 128,256,512
    python benchmarks/kernels.py --device cuda --T 128,512,2048 --out runs/kernels
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fasthess.kernels.attention import attention_jet2, family  # noqa: E402
from fasthess.kernels.attention.reference import attention_jet2 as reference  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _cpu_peak_reset() -> None:
    try:  # Linux: writing 5 resets the peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _cpu_peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(fn, device: str, repeats: int) -> tuple[float, int]:
    """(median seconds, peak bytes above the starting point) of ``fn()``."""
    fn()  # warm-up (and Triton JIT)
    _sync(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        _cpu_peak_reset()
        base = _cpu_rss_bytes()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        del out
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else _cpu_peak_bytes() - base
    return statistics.median(times), max(peak, 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--T", default=None, help="comma-separated sequence lengths (default: cuda 128,512,2048; cpu 128,256,512)")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=None, help="heads (default: cuda 8, cpu 4)")
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--N", type=int, default=None, help="tangent pairs per call (default: cuda 8, cpu 4)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--backends", default="reference,torch,cpp,triton,cuda")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--reference-max-T", type=int, default=4096, help="skip the (slow) reference above this T")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    a = p.parse_args()
    cuda = a.device == "cuda"
    ts = [int(t) for t in (a.T or ("128,512,2048" if cuda else "128,256,512")).split(",")]
    h, n = a.H or (8 if cuda else 4), a.N or (8 if cuda else 4)
    dtype = getattr(torch, a.dtype)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference and the kernels in full float32
    rows = []
    for t in ts:
        g = torch.Generator().manual_seed(0)
        shapes = [(a.B, h, t, a.D)] * 3 + [(n, a.B, h, t, a.D)] * 6
        x = [torch.randn(s, generator=g).to(device=a.device, dtype=dtype) for s in shapes]
        pairs = (t * t + t) / 2 if a.causal else t * t
        flops = (2 + 10 * n) * 2 * a.B * h * pairs * a.D
        nbytes = (3 + 6 * n + 1 + 2 * n) * a.B * h * t * a.D * x[0].element_size()
        ref_time = ref_mem = None
        for backend in a.backends.split(","):
            if backend == "reference":
                if t > a.reference_max_T:
                    continue

                def fn(x=x):
                    return reference(*x, causal=a.causal)
            else:
                if backend not in family.available() or (family.devices.get(backend) and a.device not in family.devices[backend]):
                    continue

                def fn(x=x, backend=backend):
                    return attention_jet2(*x, causal=a.causal, backend=backend)
            try:
                sec, peak = measure(fn, a.device, a.repeats)
            except (torch.OutOfMemoryError, RuntimeError) as exc:  # record and go on
                rows.append(dict(T=t, backend=backend, error=str(exc).splitlines()[0][:200]))
                print(f"T={t} {backend}: FAILED {exc}", flush=True)
                if cuda:
                    torch.cuda.empty_cache()
                continue
            if backend == "reference":
                ref_time, ref_mem = sec, peak
            row = dict(
                T=t, backend=backend, B=a.B, H=h, D=a.D, N=n, dtype=a.dtype, causal=a.causal, device=a.device,
                seconds=sec, tangents_per_s=n / sec, GB_per_s=nbytes / sec / 1e9, TFLOP_per_s=flops / sec / 1e12,
                peak_MB=peak / 2**20,
                speedup_vs_reference=(ref_time / sec) if ref_time else None,
                memory_ratio_vs_reference=(ref_mem / peak) if ref_mem and peak else None,
            )
            rows.append(row)
            print(
                f"T={t:5d} {backend:9s} {sec * 1e3:10.2f} ms  {row['tangents_per_s']:10.1f} tangents/s  "
                f"{row['GB_per_s']:8.2f} GB/s  {row['TFLOP_per_s']:7.3f} TFLOP/s  peak {row['peak_MB']:9.1f} MB"
                + (f"  x{row['speedup_vs_reference']:.2f} speed" if row["speedup_vs_reference"] else "")
                + (f"  /{row['memory_ratio_vs_reference']:.1f} memory" if row["memory_ratio_vs_reference"] else ""),
                flush=True,
            )
        del x
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"kernels-attention_jet2-{a.device}"
    meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                threads=torch.get_num_threads(), repeats=a.repeats, args={k: str(v) for k, v in vars(a).items()})
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else math.inf)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {stem}.csv/.json")


if __name__ == "__main__":
    main()
