"""Benchmark: memory per batched tangent of each engine, measured against the estimate that sizes its chunks.

``fasthess.diag`` chooses how many tangents go through one pass from each engine's
``per_tangent_bytes`` (a multiple of one gradient's saved activations); an estimate that is
too small risks running out of memory, one that is too large wastes passes. For each engine
this runs ``fasthess.diag(method="sampled")`` on one layer with ``chunk_size`` ``a`` and ``b``
(each in its own process, so the peak is its own) and reports the slope
``(peak_b - peak_a) / (b - a)`` against the estimate. Peak is RSS above the process baseline
on a CPU, allocated bytes on a GPU.

Run:
    python benchmarks/engine_memory.py --preset quick
Writes ``benchmarks/results/engine_memory-<preset>[-cuda].{json,csv}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from sampled_diag import PRESETS, PeakMemory, build  # noqa: E402

ENGINE_NAMES = ["fwd_rev", "fwd_fwd", "double_backward", "tangent_adjoint"]


def child(args: argparse.Namespace) -> None:
    """One ``fasthess.diag`` call with ``args.chunk`` tangents per pass; prints a JSON record."""
    import fasthess
    from fasthess.engines import get_engine
    from fasthess.objective import Objective

    model, logits, X, y, layers = build("encoder", PRESETS[("encoder", args.preset)])
    model, X, y = model.to(args.device), X.to(args.device), y.to(args.device)
    loss = lambda: F.cross_entropy(logits(X), y)  # noqa: E731
    layer = layers[0]  # the first encoder layer: tangents run through the whole depth
    check = Objective(model, [loss], {layer: dict(model.named_parameters())[layer]}).validate()
    estimate = get_engine(args.engine, "sampled", args.device).per_tangent_bytes(check)
    with torch.no_grad():
        loss().item()
    peak = PeakMemory(args.device)
    fasthess.diag(model, loss, [layer], method="sampled", num_samples=args.chunk, chunk_size=args.chunk,
                  engine=args.engine)
    print(json.dumps({"peak_mib": peak.mib(), "estimate_mib": estimate / 2**20,
                      "saved_mib": check.saved_bytes / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["quick", "medium", "paper"], default="quick")
    parser.add_argument("--engines", default=",".join(ENGINE_NAMES))
    parser.add_argument("--chunks", default="4,12", help="the two chunk sizes a,b of the slope")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    from experiments.provenance import provenance, write_csv

    a, b = (int(c) for c in args.chunks.split(","))
    rows = []
    for engine in args.engines.split(","):
        peaks = {}
        for chunk in (a, b):
            cmd = [sys.executable, __file__, "--child", "--engine", engine, "--chunk", str(chunk),
                   "--preset", args.preset, "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{engine} chunk {chunk} failed:\n{proc.stderr[-2000:]}")
            peaks[chunk] = json.loads(proc.stdout.strip().splitlines()[-1])
        per_tangent = (peaks[b]["peak_mib"] - peaks[a]["peak_mib"]) / (b - a)
        est = peaks[a]["estimate_mib"]
        rows.append({"engine": engine, "saved_mib": peaks[a]["saved_mib"], "peak_mib_a": peaks[a]["peak_mib"],
                     "peak_mib_b": peaks[b]["peak_mib"], "measured_mib_per_tangent": per_tangent,
                     "estimate_mib_per_tangent": est, "measured_over_estimate": per_tangent / est})
        print(f"{engine:>16}: {per_tangent:8.1f} MiB per tangent measured, {est:8.1f} estimated "
              f"({per_tangent / est:.2f}x); one gradient saves {peaks[a]['saved_mib']:.1f} MiB", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"engine_memory-{args.preset}{'-cuda' if args.device == 'cuda' else ''}"
    meta = {"preset": args.preset, "config": PRESETS[("encoder", args.preset)], "chunks": [a, b],
            "device": args.device, **provenance()}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    write_csv(stem.with_suffix(".csv"), rows)


if __name__ == "__main__":
    main()
