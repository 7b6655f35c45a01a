"""Benchmark: exact Hessian diagonal entries at sampled coordinates, against today's tools.

Every method computes H_ii at the same coordinates (200 per layer by default) of the
same layers, in the same run, each in its own process so peak memory is its own:

* ``naive``: one ``torch.autograd.grad`` of a gradient entry per coordinate, as a
  paper author writes it (written here by hand, independent of fasthess);
* ``torch_func``: ``vmap(jvp(grad))`` over one-hot tangents, chunked;
* ``curvlinops``: ``HessianLinearOperator`` (curvlinops-for-pytorch) applied to
  one-hot matrices, one column block per layer;
* ``fasthess[-ENGINE]``: ``fasthess.diag(..., method="sampled")``.

Reported per method: seconds (median over repeats), entries/s, entries per
gradient-time (the time of one forward+backward measured in the same process),
peak RSS above the process's baseline, and the largest deviation from ``naive``.

Run (quick preset, ~minutes on a laptop CPU):
    python benchmarks/sampled_diag.py --model encoder --preset quick
Writes ``benchmarks/results/sampled_diag-<model>-<preset>.{json,csv,png}``.
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
    # seq2seq Transformer of the translation tutorial (emb 512, 3+3 layers, ff 512)
    ("seq2seq", "paper"): dict(hidden=512, layers=3, heads=8, ff=512, seq=32, batch=128, samples=200),
    ("seq2seq", "quick"): dict(hidden=64, layers=2, heads=4, ff=128, seq=16, batch=16, samples=25),
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


def gradient_seconds(model: nn.Module, loss: callable, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        loss().backward()
        times.append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


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
                t = torch.zeros(sub.numel(), p0.numel())
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
                E = torch.zeros(p.numel(), sub.numel())
                E[sub, range(sub.numel())] = 1
                vals.append(torch.as_tensor(H @ E)[sub, range(sub.numel())])
            out[name] = torch.cat(vals).detach()
    return out


def run_fasthess(engine: str):
    def run(model, loss, params, indices, chunk, **_) -> dict[str, torch.Tensor]:
        import fasthess

        res = fasthess.diag(model, loss, list(params), num_samples=indices[next(iter(indices))].numel(), engine=engine)
        for name in params:
            assert torch.equal(res[name].indices, indices[name])
        return {name: res[name].values for name in params}

    return run


class _Run(nn.Module):
    def __init__(self, model: nn.Module, loss: callable) -> None:
        super().__init__()
        self.model = model
        self._loss = loss

    def forward(self) -> torch.Tensor:
        return self._loss()


METHODS = {
    "naive": run_naive,
    "torch_func": run_torch_func,
    "curvlinops": run_curvlinops,
    "fasthess": run_fasthess("auto"),
    "fasthess-fwd_fwd": run_fasthess("fwd_fwd"),
    "fasthess-fwd_rev": run_fasthess("fwd_rev"),
}


def child(args: argparse.Namespace) -> None:
    """Run one method in this process and print a JSON record."""
    from fasthess.sampling import sample_indices

    c = PRESETS[(args.model, args.preset)]
    model, logits, X, y, layers = build(args.model, c)
    loss = lambda: F.cross_entropy(logits(X), y)  # noqa: E731
    named = dict(model.named_parameters())
    params = {n: named[n] for n in layers}
    indices = {n: sample_indices(p.numel(), c["samples"], 0, n) for n, p in params.items()}
    grad_s = gradient_seconds(model, loss)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, values = [], None
    for _ in range(args.repeats):
        t = time.perf_counter()
        values = METHODS[args.child](model, loss, params, indices, args.chunk, logits=logits, X=X, y=y)
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss
    entries = sum(v.numel() for v in values.values())
    print(json.dumps({
        "method": args.child, "seconds": statistics.median(times), "all_seconds": times, "entries": entries,
        "gradient_seconds": grad_s, "peak_rss_above_baseline_mib": peak / 1024,
        "values": {n: v.double().tolist() for n, v in values.items()},
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["encoder", "seq2seq"], default="encoder")
    parser.add_argument("--preset", choices=["quick", "paper"], default="quick")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=32, help="tangents per batched pass (torch_func, curvlinops)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    records = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--child", method, "--model", args.model, "--preset", args.preset,
               "--repeats", str(args.repeats), "--chunk", str(args.chunk)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{method}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
            records.append({"method": method, "error": proc.stderr.strip().splitlines()[-1]})
            continue
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        records.append(rec)
        print(f"{method:>18}: {rec['seconds']:8.2f} s  ({rec['entries']} entries)", flush=True)

    ref = next((r for r in records if r.get("method") == "naive" and "values" in r), None)
    rows = []
    for r in records:
        if "values" not in r:
            rows.append({"method": r["method"], "error": r["error"]})
            continue
        dev = None
        if ref is not None:
            dev = max(
                float((torch.tensor(r["values"][n]) - torch.tensor(ref["values"][n])).abs().max()
                      / torch.tensor(ref["values"][n]).abs().max().clamp_min(1e-30))
                for n in ref["values"]
            )
        rows.append({
            "method": r["method"], "seconds": r["seconds"], "entries": r["entries"],
            "entries_per_s": r["entries"] / r["seconds"],
            "entries_per_gradient_time": r["entries"] * r["gradient_seconds"] / r["seconds"],
            "gradient_seconds": r["gradient_seconds"],
            "speedup_vs_naive": (ref["seconds"] / r["seconds"]) if ref else None,
            "peak_rss_above_baseline_mib": r["peak_rss_above_baseline_mib"],
            "max_rel_dev_from_naive": dev,
        })

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"sampled_diag-{args.model}-{args.preset}"
    meta = {
        "model": args.model, "preset": args.preset, "config": PRESETS[(args.model, args.preset)],
        "repeats": args.repeats, "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "machine": platform.machine(),
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip(),
    }
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    keys = ["method", "seconds", "entries", "entries_per_s", "entries_per_gradient_time", "gradient_seconds",
            "speedup_vs_naive", "peak_rss_above_baseline_mib", "max_rel_dev_from_naive", "error"]
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, keys)
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k) for k in keys})
    print(f"\n{'method':>18} {'s':>8} {'entries/s':>10} {'per grad-time':>13} {'vs naive':>9} {'peak MiB':>9} {'max dev':>9}")
    for row in rows:
        if "error" in row:
            print(f"{row['method']:>18}  error: {row['error']}")
            continue
        sv = row["speedup_vs_naive"]
        dv = row["max_rel_dev_from_naive"]
        print(f"{row['method']:>18} {row['seconds']:8.2f} {row['entries_per_s']:10.1f} {row['entries_per_gradient_time']:13.2f} "
              f"{sv if sv is None else f'{sv:.2f}x':>9} {row['peak_rss_above_baseline_mib']:9.0f} {dv if dv is None else f'{dv:.1e}':>9}")
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
    ok = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([r["method"] for r in ok], [r["entries_per_gradient_time"] for r in ok], color="tab:blue")
    ax.set_xlabel("exact H_ii entries per gradient-time (higher is better)")
    ax.set_title(f"sampled Hessian diagonal, {meta['model']} ({meta['preset']}), {meta['machine']} CPU x{meta['threads']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
