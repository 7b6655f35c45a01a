"""Kernel benchmark: each kernel family's backends against its torch reference, measured in the same run.

Ops (``--ops``): ``attention`` (2-jet; reference: nested jvp on the math path), ``attention_hvp``
(tangent of the attention backward for N tangent sets (q1, k1, v1, dout1); reference: jvp of vjp
on the math path; TFLOP/s counts 5 primal + 10 per-tangent products; not in the default ``--ops``), ``onehot`` (one-hot
weight tangents of a linear layer, ``B·T`` rows of width ``H·D``; reference: dense seeds + einsum),
``seeded`` (Hutchinson accumulation of ``N`` probes over ``T·4096`` coordinates with probes
regenerated from the seed, every seeded backend; reference: torch regeneration + update; rows
``stored-probes-<backend>``: the plain update of every backend reading the probes from memory),
``crossentropy`` (2-jet of the mean cross-entropy of ``B·T`` rows of ``--vocab`` logits, default 8192 on the
CPU and 32768 on CUDA, each backend also with ``z2=None``; reference: nested jvp), ``layernorm`` and
``gelu`` (2-jets of layer norm / erf GELU on ``B·T`` rows of width ``H·D``; reference: nested jvp
on the decomposition).

The Triton attention kernel has one row per precision of its float32 tile products
(``triton-ieee``, ``triton-tf32x3``, ``triton-tf32``; see :mod:`fasthess.kernels.attention`).
Each attention backend also has a ``<backend>-first-order`` row: the same call with the
second-order tangents ``None`` (zero, skipped), as the tangent-adjoint engine's fused rule makes
it; its TFLOP/s and GB/s count the full 2-jet's work, so its speed ratio to the full row is the
saving (7 instead of 10 products per tangent), and its error column covers ``o`` and ``o1`` only.
For attention, per sequence length T and backend: median seconds over repeats, tangents/s, GB/s (the
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
from experiments.provenance import provenance  # noqa: E402
from fasthess.kernels import linear  # noqa: E402
from fasthess.kernels.attention import PRECISIONS, attention_jet2, family  # noqa: E402
from fasthess.kernels.attention.reference import attention_jet2 as reference  # noqa: E402
from fasthess.kernels.attention_hvp import attention_hvp  # noqa: E402
from fasthess.kernels.attention_hvp import attention_hvp_reference  # noqa: E402
from fasthess.kernels.attention_hvp import family as hvp_family  # noqa: E402
from fasthess.kernels.attention_hvp import select_backend as select_hvp_backend  # noqa: E402
from fasthess.kernels.hutchinson import family as hutchinson_family, hutchinson_update_  # noqa: E402


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


def measure(fn, device: str, repeats: int):
    """(median seconds, peak bytes above the starting point, last output) of ``fn()``."""
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
        if len(times) < repeats:
            del out
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else _cpu_peak_bytes() - base
    return statistics.median(times), max(peak, 0), out


def attention_cases(a, t: int, h: int, n: int, dtype):
    """(backend -> callable, FLOPs, minimal bytes, tangents) of the attention 2-jet at length ``t``."""
    g = torch.Generator().manual_seed(0)
    shapes = [(a.B, h, t, a.D)] * 3 + [(n, a.B, h, t, a.D)] * 6
    x = [torch.randn(s, generator=g).to(device=a.device, dtype=dtype) for s in shapes]
    pairs = (t * t + t) / 2 if a.causal else t * t
    flops = (2 + 10 * n) * 2 * a.B * h * pairs * a.D
    nbytes = (3 + 6 * n + 1 + 2 * n) * a.B * h * t * a.D * x[0].element_size()
    cases = {}
    if t <= a.reference_max_T:
        cases["reference"] = lambda: reference(*x, causal=a.causal)
    for backend in family.backends:
        if backend in family.available() and a.device in family.devices.get(backend, (a.device,)):
            if backend == "triton":  # one row per precision of its float32 tile products
                for p in PRECISIONS:
                    cases[f"triton-{p}"] = lambda p=p: attention_jet2(*x, causal=a.causal, backend="triton", precision=p)
                    cases[f"triton-{p}-first-order"] = lambda p=p: attention_jet2(
                        *x[:6], causal=a.causal, backend="triton", precision=p)[:2]
            else:
                cases[backend] = lambda backend=backend: attention_jet2(*x, causal=a.causal, backend=backend)
                cases[f"{backend}-first-order"] = lambda backend=backend: attention_jet2(
                    *x[:6], causal=a.causal, backend=backend)[:2]  # o2 differs from the reference's by design
    return cases, flops, nbytes, n


def attention_hvp_cases(a, t: int, h: int, n: int, dtype):
    """(backend -> callable, FLOPs, minimal bytes, tangents) of the attention HVP at length ``t``."""
    g = torch.Generator().manual_seed(0)
    shapes = [(a.B, h, t, a.D)] * 4 + [(n, a.B, h, t, a.D)] * 4
    x = [torch.randn(s, generator=g).to(device=a.device, dtype=dtype) for s in shapes]
    pairs = (t * t + t) / 2 if a.causal else t * t
    flops = (5 + 10 * n) * 2 * a.B * h * pairs * a.D
    nbytes = (4 + 4 * n + 3 + 3 * n) * a.B * h * t * a.D * x[0].element_size()
    cases = {}
    if t <= a.reference_max_T:
        cases["reference"] = lambda: attention_hvp_reference(*x, causal=a.causal)
    for backend in hvp_family.backends:  # on CUDA: triton, cuda (--dtype float64: cuda only), torch
        if backend in hvp_family.available() and a.device in hvp_family.devices.get(backend, (a.device,)):
            try:
                select_hvp_backend(backend, a.device, dtype)
            except TypeError:  # not for this dtype
                continue
            cases[backend] = lambda backend=backend: attention_hvp(*x, causal=a.causal, backend=backend)
    return cases, flops, nbytes, n


def onehot_cases(a, t: int, h: int, n: int, dtype):
    """One-hot weight tangents of a (H·D, H·D) linear layer on B·T rows, N directions."""
    g = torch.Generator().manual_seed(0)
    width = h * a.D
    x = torch.randn(a.B, t, width, generator=g).to(device=a.device, dtype=dtype)
    rows = torch.randint(0, width, (n,), generator=g).to(a.device)
    cols = torch.randint(0, width, (n,), generator=g).to(a.device)
    nbytes = (n * a.B * t * width + a.B * t * width) * x.element_size()
    cases = {"reference": lambda: linear.onehot_weight_tangent_reference(x, rows, cols, width)}
    for backend in linear.onehot_family.backends:
        if backend in linear.onehot_family.available() and a.device in linear.onehot_family.devices.get(backend, (a.device,)):
            cases[backend] = lambda backend=backend: linear.onehot_weight_tangent(x, rows, cols, width, backend=backend)
    return cases, None, nbytes, n


def seeded_cases(a, t: int, h: int, n: int, dtype):
    """Hutchinson accumulation of N probes over T·4096 coordinates: regenerated probes vs stored probes."""
    g = torch.Generator().manual_seed(0)
    size = t * 4096
    hz = torch.randn(n, size, generator=g).to(device=a.device, dtype=torch.float64)
    mean, m2 = torch.zeros(size, dtype=torch.float64, device=a.device), torch.zeros(size, dtype=torch.float64, device=a.device)
    z = linear.rademacher(0, 0, n, size, device=a.device)
    nbytes = (n * size + 4 * size) * 8  # hz read, mean/m2 read and written
    cases = {
        "reference": lambda: linear.hutchinson_update_seeded_(mean, m2, hz, 0, 0, 0, backend="torch"),
    }
    for backend in hutchinson_family.backends:  # the plain update, reading stored probes
        if backend in hutchinson_family.available() and a.device in hutchinson_family.devices.get(backend, (a.device,)):
            cases[f"stored-probes-{backend}"] = lambda backend=backend: hutchinson_update_(
                mean, m2, z, hz, 0, backend=backend
            )
    for backend in linear.seeded_family.backends:
        if backend in linear.seeded_family.available() and a.device in linear.seeded_family.devices.get(backend, (a.device,)):
            cases[backend] = lambda backend=backend: linear.hutchinson_update_seeded_(mean, m2, hz, 0, 0, 0, backend=backend)
    return cases, None, nbytes, n


def crossentropy_cases(a, t: int, h: int, n: int, dtype):
    """Cross-entropy 2-jet over B·T rows of a ``--vocab`` vocabulary, N logit tangent pairs.

    Each backend also runs with ``z2=None`` (rows ``<backend>-z2none``: zero second-order tangents, not read,
    as the fused rule calls it), compared with ``reference-z2none`` (the reference with zeros); the minimal
    bytes count the z2 read for every row.
    """
    from fasthess.kernels import loss

    g = torch.Generator(device=a.device).manual_seed(0)  # drawn on the device: GBs of tangents at V = 32768
    vocab = a.vocab or (32768 if a.device == "cuda" else 8192)
    z = torch.randn(a.B * t, vocab, generator=g, device=a.device).to(dtype)
    y = torch.randint(0, vocab, (a.B * t,), generator=g, device=a.device)
    z1, z2 = (torch.randn(n, a.B * t, vocab, generator=g, device=a.device).to(dtype) for _ in range(2))
    nbytes = (1 + 2 * n) * a.B * t * vocab * z.element_size()
    backends = [b for b in loss.family.backends
                if b in loss.family.available() and a.device in loss.family.devices.get(b, (a.device,))]
    cases = {"reference": lambda: loss.cross_entropy_jet2_reference(z, y, z1, z2)}
    for backend in backends:
        cases[backend] = lambda backend=backend: loss.cross_entropy_jet2(z, y, z1, z2, backend=backend)
    cases["reference-z2none"] = lambda: loss.cross_entropy_jet2_reference(z, y, z1, None)
    for backend in backends:
        cases[f"{backend}-z2none"] = lambda backend=backend: loss.cross_entropy_jet2(z, y, z1, None, backend=backend)
    return cases, None, nbytes, n


def layernorm_cases(a, t: int, h: int, n: int, dtype):
    """Layer-norm 2-jet (with weight and bias) over B·T rows of width H·D, N input tangent pairs."""
    from fasthess.kernels import layer_norm

    return _pointwise_cases(a, t, h, n, dtype, layer_norm.family, layer_norm.layer_norm_jet2_reference,
                            layer_norm.layer_norm_jet2, affine=True)


def gelu_cases(a, t: int, h: int, n: int, dtype):
    """GELU (erf form) 2-jet over B·T rows of width H·D, N tangent pairs."""
    from fasthess.kernels import gelu

    return _pointwise_cases(a, t, h, n, dtype, gelu.family, gelu.gelu_jet2_reference, gelu.gelu_jet2, affine=False)


def _pointwise_cases(a, t, h, n, dtype, family_, reference_fn, fn, affine: bool):
    g = torch.Generator().manual_seed(0)
    width = h * a.D
    x = torch.randn(a.B, t, width, generator=g).to(device=a.device, dtype=dtype)
    x1, x2 = (torch.randn(n, a.B, t, width, generator=g).to(device=a.device, dtype=dtype) for _ in range(2))
    args = [x, x1, x2]
    if affine:
        w, b = (torch.randn(width, generator=g).to(device=a.device, dtype=dtype) for _ in range(2))
        args = [x, w, b, x1, x2]
    nbytes = 2 * (1 + 2 * n) * x.numel() * x.element_size()  # x, x1, x2 read; y, y1, y2 written
    cases = {"reference": lambda: reference_fn(*args)}
    for backend in family_.backends:
        if backend in family_.available() and a.device in family_.devices.get(backend, (a.device,)):
            cases[backend] = lambda backend=backend: fn(*args, backend=backend)
    return cases, None, nbytes, n


CASES = {"attention": attention_cases, "onehot": onehot_cases, "seeded": seeded_cases, "crossentropy": crossentropy_cases,
         "layernorm": layernorm_cases, "gelu": gelu_cases, "attention_hvp": attention_hvp_cases}  # the last: opt-in


def run_cases(a, op: str, t: int, cases: dict, flops, nbytes: int, n_items: int, rows: list, extra: dict) -> None:
    """Time every case (reference first) and append one row per backend; a case named ``reference-...`` is the
    reference of the cases after it."""
    ref_time = ref_mem = ref_out = None
    for backend, fn in cases.items():
        try:
            sec, peak, out = measure(fn, a.device, a.repeats)
        except (torch.OutOfMemoryError, RuntimeError) as exc:  # record and go on
            rows.append(dict(op=op, T=t, backend=backend, error=str(exc).splitlines()[0][:200]))
            print(f"{op} T={t} {backend}: FAILED {exc}", flush=True)
            if a.device == "cuda":
                torch.cuda.empty_cache()
            continue
        err = None
        if backend.startswith("reference"):
            ref_time, ref_mem, ref_out = sec, peak, out
        elif ref_out is not None and isinstance(out, (tuple, torch.Tensor)):
            # largest deviation from the reference output, relative to its largest entry, over all outputs
            outs, refs = (out, ref_out) if isinstance(out, tuple) else ((out,), (ref_out,))
            err = max(float((u.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-300))
                      for u, r in zip(outs, refs))
        del out
        row = dict(
            op=op, T=t, backend=backend, **extra, dtype=a.dtype, causal=a.causal, device=a.device,
            seconds=sec, tangents_per_s=n_items / sec, GB_per_s=nbytes / sec / 1e9,
            TFLOP_per_s=flops / sec / 1e12 if flops else None, peak_MB=peak / 2**20,
            speedup_vs_reference=(ref_time / sec) if ref_time else None,
            memory_ratio_vs_reference=(ref_mem / peak) if ref_mem and peak else None,
            max_rel_err_vs_reference=err,
        )
        rows.append(row)
        print(
            f"{op:9s} T={t:5d} {backend:13s} {sec * 1e3:10.2f} ms  {row['tangents_per_s']:10.1f} tangents/s  "
            f"{row['GB_per_s']:8.2f} GB/s"
            + (f"  {row['TFLOP_per_s']:7.3f} TFLOP/s" if flops else "")
            + f"  peak {row['peak_MB']:9.1f} MB"
            + (f"  x{row['speedup_vs_reference']:.2f} speed" if row["speedup_vs_reference"] else "")
            + (f"  /{row['memory_ratio_vs_reference']:.1f} memory" if row["memory_ratio_vs_reference"] else "")
            + (f"  err {err:.1e}" if err is not None else ""),
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--T", default=None, help="comma-separated sequence lengths (default: cuda 128,512,2048; cpu 128,256,512)")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=None, help="heads (default: cuda 8, cpu 4)")
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--N", type=int, default=None, help="tangent pairs per call (default: cuda 8, cpu 4)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--vocab", type=int, default=None, help="crossentropy vocabulary (default: cuda 32768, cpu 8192)")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ops", default="attention,onehot,seeded,crossentropy,layernorm,gelu")
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
    for op in a.ops.split(","):
        for t in ts:
            cases, flops, nbytes, n_items = CASES[op](a, t, h, n, dtype)
            run_cases(a, op, t, cases, flops, nbytes, n_items, rows, dict(B=a.B, H=h, D=a.D, N=n))
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"kernels-{a.device}"
    meta = dict(git_commit=provenance()["git_commit"], torch=torch.__version__, python=platform.python_version(),
                machine=platform.machine(),
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
