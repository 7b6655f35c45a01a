"""Benchmark: exact Hessian diagonal entries at sampled coordinates, against today's tools.

Every method computes H_ii at the same coordinates (200 per layer by default) of the
same layers, in the same run, each in its own process so peak memory is its own:

* ``naive``: one ``torch.autograd.grad`` of a gradient entry per coordinate, as a
  paper author writes it (written here by hand, independent of fasthess);
* ``torch_func``: ``vmap(jvp(grad))`` over one-hot tangents, chunked;
* ``curvlinops``: ``HessianLinearOperator`` (curvlinops-for-pytorch) applied to
  one-hot matrices, one column block per layer;
* ``fasthess[-ENGINE]``: ``fasthess.diag(..., method="sampled")``;
  ``fasthess-unfused``: the tangent-adjoint engine with attention, layer norm and cross-entropy
  as plain ops, not fused nodes (``fasthess.fused_nodes.disabled()``, the same as
  ``FASTHESS_FUSED_NODES=0``); ``fasthess`` (default policy) / ``fasthess-unfused`` is their gain.

Reported per method: seconds (median over repeats), entries/s, entries per
gradient-time (the time of one forward+backward measured in the same process),
peak memory above the process's baseline (RSS on the CPU, allocated bytes on a
GPU) and its ratio to the peak of one gradient evaluation (the ``gradient`` row),
and the largest deviation from ``naive`` on the coordinates both computed.

The per-coordinate baselines take seconds per entry at the paper's sizes on a
CPU, so ``--slow-samples N`` gives them the first N of the sampled coordinates of
each layer; speed-ups are ratios of entries/s.

Run (quick preset, ~minutes on a laptop CPU):
    python benchmarks/sampled_diag.py --model encoder --preset quick
Writes ``benchmarks/results/sampled_diag-<model>-<preset>[-<device>].{json,csv,png}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent

PRESETS = {
    # BERT-small-shaped encoder classifier (issue 3, model (i))
    ("encoder", "paper"): dict(hidden=512, layers=4, heads=8, ff=2048, seq=128, batch=32, samples=200),
    ("encoder", "quick"): dict(hidden=128, layers=2, heads=4, ff=512, seq=32, batch=8, samples=25),
    # between the two: attention at T = 128, D = 64 as in the paper preset, on one CPU core in seconds
    ("encoder", "medium"): dict(hidden=256, layers=2, heads=4, ff=1024, seq=128, batch=4, samples=10),
    # seq2seq Transformer of the translation tutorial (emb 512, 3+3 layers, ff 512)
    ("seq2seq", "paper"): dict(hidden=512, layers=3, heads=8, ff=512, seq=32, batch=128, samples=200),
    ("seq2seq", "quick"): dict(hidden=64, layers=2, heads=4, ff=128, seq=16, batch=16, samples=25),
    ("seq2seq", "medium"): dict(hidden=256, layers=2, heads=4, ff=256, seq=32, batch=32, samples=10),
}
VOCAB = 1000


class EncoderClassifier(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, c["hidden"])
        self.pos = nn.Parameter(torch.randn(c["seq"], c["hidden"]) * 0.02)
        layer = nn.TransformerEncoderLayer(c["hidden"], c["heads"], c["ff"], batch_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, c["layers"], enable_nested_tensor=False)
        self.head = nn.Linear(c["hidden"], 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids) + self.pos)[:, 0])


class Seq2Seq(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.src = nn.Embedding(VOCAB, c["hidden"])
        self.tgt = nn.Embedding(VOCAB, c["hidden"])
        self.transformer = nn.Transformer(
            c["hidden"], c["heads"], c["layers"], c["layers"], c["ff"], batch_first=True
        )
        self.out = nn.Linear(c["hidden"], VOCAB)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.out(self.transformer(self.src(src), self.tgt(tgt), tgt_mask=mask, tgt_is_causal=True))


class Logits(nn.Module):
    """Maps one input tensor to flat logits, so every tool sees ``CE(Logits(X), y)``."""

    def __init__(self, model: nn.Module, model_name: str, src_len: int) -> None:
        super().__init__()
        self.model, self.model_name, self.src_len = model, model_name, src_len

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if self.model_name == "encoder":
            return self.model(X)
        return self.model(X[:, : self.src_len], X[:, self.src_len :]).flatten(0, 1)


def build(model_name: str, c: dict) -> tuple[nn.Module, Logits, torch.Tensor, torch.Tensor, list[str]]:
    """Model, its logits function, one batch ``(X, y)`` and the (>= 8) layers measured."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if model_name == "encoder":
        model = EncoderClassifier(c).eval()
        X = torch.randint(0, VOCAB, (c["batch"], c["seq"]), generator=g)
        y = torch.randint(0, 2, (c["batch"],), generator=g)
    else:
        model = Seq2Seq(c).eval()
        src = torch.randint(0, VOCAB, (c["batch"], c["seq"]), generator=g)
        tgt = torch.randint(0, VOCAB, (c["batch"], c["seq"] + 1), generator=g)
        X, y = torch.cat([src, tgt[:, :-1]], 1), tgt[:, 1:].flatten()
    import fasthess

    layers = list(fasthess.default_parameters(model))
    step = max(1, len(layers) // 8)  # 8 layers spread over the depth
    return model, Logits(model, model_name, c["seq"]), X, y, layers[::step][:8]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gradient_seconds(model: nn.Module, loss: callable, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        _sync()
        t = time.perf_counter()
        loss().backward()
        _sync()
        times.append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


class PeakMemory:
    """Peak memory above the level at construction: allocated bytes on a GPU, RSS on the CPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def mib(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base) / 2**20


# ------------------------------------------------------------------ the methods
def run_naive(model, loss, params, indices, chunk, **_) -> dict[str, torch.Tensor]:
    """One double backward per coordinate (with the math-path attention torch needs for it)."""
    import fasthess

    out = {}
    with fasthess.autodiff_safe():  # the CPU flash kernel has no double backward
        for name, p in params.items():
            (g,) = torch.autograd.grad(loss(), p, create_graph=True)
            g = g.reshape(-1)
            out[name] = torch.stack(
                [torch.autograd.grad(g[i], p, retain_graph=True)[0].reshape(-1)[i] for i in indices[name].tolist()]
            )
    return out


def run_torch_func(model, loss, params, indices, chunk, **_) -> dict[str, torch.Tensor]:
    from torch.func import functional_call, grad, jvp, vmap

    import fasthess

    out = {}
    with fasthess.autodiff_safe():  # the fused kernels have no forward AD
        for name, p in params.items():
            def f(w: torch.Tensor, name: str = name) -> torch.Tensor:
                return functional_call(_Run(model, loss), {"model." + name: w}, ())

            p0 = p.detach()
            idx = indices[name]
            vals = []
            for s in range(0, idx.numel(), chunk):
                sub = idx[s : s + chunk]
                t = torch.zeros(sub.numel(), p0.numel(), device=p0.device)
                t[range(sub.numel()), sub] = 1
                cols = vmap(lambda v: jvp(grad(f), (p0,), (v,))[1])(t.view(-1, *p0.shape))
                vals.append(cols.reshape(sub.numel(), -1)[range(sub.numel()), sub])
            out[name] = torch.cat(vals).detach()
    return out


def run_curvlinops(model, loss, params, indices, chunk, logits=None, X=None, y=None) -> dict[str, torch.Tensor]:
    from curvlinops import HessianLinearOperator

    import fasthess

    out = {}
    with fasthess.autodiff_safe():
        for name, p in params.items():
            H = HessianLinearOperator(
                logits, nn.CrossEntropyLoss(), [p], [(X, y)], check_deterministic=False, progressbar=False
            )
            idx = indices[name]
            vals = []
            for s in range(0, idx.numel(), chunk):
                sub = idx[s : s + chunk]
                E = torch.zeros(p.numel(), sub.numel(), device=p.device)
                E[sub, range(sub.numel())] = 1
                vals.append(torch.as_tensor(H @ E)[sub, range(sub.numel())])
            out[name] = torch.cat(vals).detach()
    return out


def run_fasthess(engine: str, wide: bool = False, fused: bool = True):
    """``fasthess.diag``; ``wide``: let the batched directions use half of free memory, not ~1 gradient's;
    ``fused=False``: attention and layer norm as plain ops in the tangent-adjoint engine."""

    def run(model, loss, params, indices, chunk, **_) -> dict[str, torch.Tensor]:
        import contextlib

        import fasthess
        from fasthess.fused_nodes import disabled
        from fasthess.objective import available_memory_bytes

        full = max(idx.numel() for idx in indices.values())
        device = next(iter(params.values())).device
        budget = available_memory_bytes(device) // 2 if wide else None
        with contextlib.nullcontext() if fused else disabled():
            res = fasthess.diag(model, loss, list(params), num_samples=full, engine=engine, memory_budget=budget)
        out = {}
        for name, idx in indices.items():  # a prefix of fasthess's own sample when --slow-samples applies
            assert torch.equal(res[name].indices[: idx.numel()].to(idx.device), idx)
            out[name] = res[name].values[: idx.numel()]
        return out

    return run


class _Run(nn.Module):
    def __init__(self, model: nn.Module, loss: callable) -> None:
        super().__init__()
        self.model = model
        self._loss = loss

    def forward(self) -> torch.Tensor:
        return self._loss()


def run_gradient(model, loss, params, indices, chunk, **_) -> dict[str, torch.Tensor]:
    """One forward+backward: the yardstick for time and memory (no entries)."""
    grads = torch.autograd.grad(loss(), list(params.values()))
    return {name: g.reshape(-1)[:0] for name, g in zip(params, grads)}


METHODS = {
    "gradient": run_gradient,
    "naive": run_naive,
    "torch_func": run_torch_func,
    "curvlinops": run_curvlinops,
    "fasthess": run_fasthess("auto"),
    "fasthess-wide": run_fasthess("auto", wide=True),
    "fasthess-unfused": run_fasthess("auto", fused=False),
    "fasthess-fwd_fwd": run_fasthess("fwd_fwd"),
    "fasthess-fwd_rev": run_fasthess("fwd_rev"),
    "fasthess-double_backward": run_fasthess("double_backward"),
}
SLOW = {"naive", "torch_func", "curvlinops", "fasthess-fwd_fwd", "fasthess-fwd_rev", "fasthess-double_backward"}


def child(args: argparse.Namespace) -> None:
    """Run one method in this process and print a JSON record."""
    from fasthess.sampling import sample_indices

    c = PRESETS[(args.model, args.preset)]
    model, logits, X, y, layers = build(args.model, c)
    model, X, y = model.to(args.device), X.to(args.device), y.to(args.device)
    loss = lambda: F.cross_entropy(logits(X), y)  # noqa: E731
    named = dict(model.named_parameters())
    params = {n: named[n] for n in layers}
    samples = c["samples"]
    if args.child in SLOW and args.slow_samples:
        samples = min(samples, args.slow_samples)
    indices = {n: sample_indices(p.numel(), c["samples"], 0, n)[:samples].to(args.device) for n, p in params.items()}
    with torch.no_grad():  # warm-up outside the measurement, without a graph to inflate the baseline
        loss().item()
    peak = PeakMemory(args.device)
    times, values = [], None
    for _ in range(1 if args.child == "gradient" else args.repeats):
        _sync()
        t = time.perf_counter()
        values = METHODS[args.child](model, loss, params, indices, args.chunk, logits=logits, X=X, y=y)
        _sync()
        times.append(time.perf_counter() - t)
    peak_mib = peak.mib()
    grad_s = gradient_seconds(model, loss)
    entries = sum(v.numel() for v in values.values())
    print(json.dumps({
        "method": args.child, "seconds": statistics.median(times), "all_seconds": times, "entries": entries,
        "gradient_seconds": grad_s, "peak_mib": peak_mib,
        "values": {n: v.double().cpu().tolist() for n, v in values.items()},
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["encoder", "seq2seq"], default="encoder")
    parser.add_argument("--preset", choices=["quick", "medium", "paper"], default="quick")
    parser.add_argument("--methods", default="gradient,naive,torch_func,curvlinops,fasthess,fasthess-fwd_rev")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=32, help="tangents per batched pass (torch_func, curvlinops)")
    parser.add_argument("--slow-samples", type=int, default=0,
                        help="coordinates per layer for the per-coordinate baselines (0: all)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    records = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--child", method, "--model", args.model, "--preset", args.preset,
               "--repeats", str(args.repeats), "--chunk", str(args.chunk),
               "--slow-samples", str(args.slow_samples), "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{method}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
            lines = proc.stderr.strip().splitlines()
            records.append({"method": method, "error": lines[-1] if lines else f"killed (exit status {proc.returncode})"})
            continue
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        records.append(rec)
        print(f"{method:>18}: {rec['seconds']:8.2f} s  ({rec['entries']} entries)", flush=True)

    ref = next((r for r in records if r.get("method") == "naive" and "values" in r), None)
    grad = next((r for r in records if r.get("method") == "gradient" and "values" in r), None)
    rows = []
    for r in records:
        if "values" not in r:
            rows.append({"method": r["method"], "error": r["error"]})
            continue
        dev = None
        if ref is not None and r["entries"]:
            devs = []
            for n in ref["values"]:
                k = min(len(ref["values"][n]), len(r["values"][n]))
                a, b = torch.tensor(r["values"][n][:k]), torch.tensor(ref["values"][n][:k])
                devs.append(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)))
            dev = max(devs)
        rate = r["entries"] / r["seconds"]
        rows.append({
            "method": r["method"], "seconds": r["seconds"], "entries": r["entries"],
            "entries_per_s": rate,
            "entries_per_gradient_time": rate * r["gradient_seconds"],
            "gradient_seconds": r["gradient_seconds"],
            "speedup_vs_naive": rate / (ref["entries"] / ref["seconds"]) if ref and r["entries"] else None,
            "peak_mib": r["peak_mib"],
            "peak_vs_gradient": r["peak_mib"] / grad["peak_mib"] if grad and grad["peak_mib"] > 0 else None,
            "max_rel_dev_from_naive": dev,
        })

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"sampled_diag-{args.model}-{args.preset}{'-cuda' if args.device == 'cuda' else ''}"
    meta = {
        "model": args.model, "preset": args.preset, "config": PRESETS[(args.model, args.preset)],
        "repeats": args.repeats, "slow_samples": args.slow_samples, "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "machine": platform.machine(),
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip(),
    }
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    keys = ["method", "seconds", "entries", "entries_per_s", "entries_per_gradient_time", "gradient_seconds",
            "speedup_vs_naive", "peak_mib", "peak_vs_gradient", "max_rel_dev_from_naive", "error"]
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, keys)
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k) for k in keys})
    print(f"\n{'method':>24} {'s':>8} {'entries':>7} {'entries/s':>10} {'per grad-time':>13} {'vs naive':>9} "
          f"{'peak MiB':>9} {'x grad':>7} {'max dev':>9}")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for row in rows:
        if "error" in row:
            print(f"{row['method']:>24}  error: {row['error']}")
            continue
        print(f"{row['method']:>24} {row['seconds']:8.2f} {row['entries']:7d} {row['entries_per_s']:10.2f} "
              f"{row['entries_per_gradient_time']:13.2f} {fmt(row['speedup_vs_naive'], '.2f'):>9} {row['peak_mib']:9.0f} "
              f"{fmt(row['peak_vs_gradient'], '.2f'):>7} {fmt(row['max_rel_dev_from_naive'], '.1e'):>9}")
    by = {r["method"]: r for r in rows if "error" not in r}
    if "fasthess" in by and "fasthess-unfused" in by:
        f, u = by["fasthess"], by["fasthess-unfused"]
        print(f"\nfused nodes (default policy) / off: {f['entries_per_s'] / u['entries_per_s']:.2f}x entries/s, "
              f"peak memory {f['peak_mib']:.0f} / {u['peak_mib']:.0f} MiB")
    _plot(rows, stem.with_suffix(".png"), meta)
    print(f"\nwrote {stem}.json/.csv/.png")


def _plot(rows: list[dict], path: Path, meta: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    ok = [r for r in rows if "error" not in r and r["entries"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([r["method"] for r in ok], [r["entries_per_gradient_time"] for r in ok], color="tab:blue")
    ax.set_xlabel("exact H_ii entries per gradient-time (higher is better)")
    where = meta["gpu"] or f"{meta['machine']} CPU x{meta['threads']}"
    ax.set_title(f"sampled Hessian diagonal, {meta['model']} ({meta['preset']}), {where}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
