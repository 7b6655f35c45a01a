"""Benchmark: the tangent-adjoint engine with fused attention / layer-norm / cross-entropy nodes on vs off.

``fasthess.diag(method="sampled")`` on the models of ``sampled_diag.py`` in one process,
cycling through the fused-node modes (``fasthess.fused_nodes.using``: ``all`` = every
supported node fused, ``auto`` = the default policy, ``off`` = plain ops, as
``FASTHESS_FUSED_NODES=0``) repeat by repeat, the order rotated every repeat, so all
see the same load on a shared machine. Reported per mode: median seconds and entries/s,
the memory the engine keeps between passes (recorded values + adjoints: the bytes of
their distinct storages), on a GPU the allocator's peak per call; the on/off ratios; the largest
relative difference between the two modes' entries (they compute the same numbers).

Run:
    python benchmarks/fused_nodes.py --model encoder --preset quick --repeats 7
Writes ``benchmarks/results/fused_nodes-<model>-<preset>[-cuda].json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sampled_diag  # noqa: E402 - the models and presets of the main benchmark

import fasthess  # noqa: E402
from fasthess.engines import tangent_adjoint  # noqa: E402
from fasthess.fused_nodes import using  # noqa: E402

MODES = ("all", "auto", "off")


class KeptBytes:
    """Bytes of the values and adjoints the engine keeps between passes (wraps its private helper)."""

    def __init__(self) -> None:
        self.last = 0
        self._orig = tangent_adjoint._primal_and_adjoints

    def __enter__(self) -> KeptBytes:
        def counted(graph, params):  # noqa: ANN001, ANN202
            values, adjoints = self._orig(graph, params)
            # distinct storages: expanded views (stride 0) and views of one tensor count once
            tensors = [t for d in (values, adjoints) for t in d.values()]
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
            self.last = sum(storages.values())
            return values, adjoints

        tangent_adjoint._primal_and_adjoints = counted
        return self

    def __exit__(self, *exc: object) -> None:
        tangent_adjoint._primal_and_adjoints = self._orig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["encoder", "seq2seq"], default="encoder")
    parser.add_argument("--preset", choices=["quick", "medium", "paper"], default="quick")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backend", default="auto", help="kernel backend (diag(..., backend=))")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    c = sampled_diag.PRESETS[(args.model, args.preset)]
    model, logits, X, y, layers = sampled_diag.build(args.model, c)
    model, X, y = model.to(args.device), X.to(args.device), y.to(args.device)
    loss = lambda: F.cross_entropy(logits(X), y)  # noqa: E731
    cuda = args.device == "cuda"

    def run(mode: str) -> tuple[float, float | None, fasthess.DiagResult]:
        with using(mode):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t = time.perf_counter()
            res = fasthess.diag(model, loss, layers, num_samples=c["samples"], backend=args.backend)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t
        return seconds, ((torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None), res

    times: dict[str, list[float]] = {m: [] for m in MODES}
    peaks: dict[str, list[float]] = {m: [] for m in MODES}
    kept: dict[str, float] = {}
    results = {}
    with KeptBytes() as counter:
        for mode in MODES:  # warm-up (first captures, kernel loading), and the kept memory
            results[mode] = run(mode)[2]
            kept[mode] = counter.last / 2**20
    for r in range(args.repeats):
        for mode in MODES[r % 3 :] + MODES[: r % 3]:
            seconds, peak, _ = run(mode)
            times[mode].append(seconds)
            if peak is not None:
                peaks[mode].append(peak)
    entries = sum(layer.values.numel() for layer in results["off"].layers.values())
    dev = max(
        float((results[m][n].values - results["off"][n].values).abs().max() / results["off"][n].values.abs().max())
        for m in MODES for n in results["off"].layers
    )
    rows = {}
    for mode in MODES:
        s = statistics.median(times[mode])
        rows[mode] = {
            "seconds": s, "all_seconds": times[mode], "entries_per_s": entries / s, "kept_mib": kept[mode],
            "peak_mib": statistics.median(peaks[mode]) if peaks[mode] else None,
        }
    ratio = {
        mode: {
            "entries_per_s": rows[mode]["entries_per_s"] / rows["off"]["entries_per_s"],
            "kept": kept[mode] / kept["off"],
            "peak": rows[mode]["peak_mib"] / rows["off"]["peak_mib"] if cuda else None,
        }
        for mode in MODES[:2]
    }
    meta = {
        "model": args.model, "preset": args.preset, "config": c, "layers": layers, "entries": entries,
        "repeats": args.repeats, "device": args.device, "backend": results["all"].meta.get("backend"),
        "gpu": torch.cuda.get_device_name() if cuda else None, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "max_rel_dev_on_vs_off": dev,
        "git_commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE
        ).stdout.strip(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fused_nodes-{args.model}-{args.preset}{'-cuda' if cuda else ''}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows, "ratio": ratio}, indent=1))
    for mode, row in rows.items():
        peak = f", peak {row['peak_mib']:.0f} MiB" if row["peak_mib"] is not None else ""
        print(f"fused {mode:>4}: {row['seconds']:.2f} s median of {args.repeats} ({entries} entries, "
              f"{row['entries_per_s']:.1f} entries/s), kept {row['kept_mib']:.1f} MiB{peak}")
    for mode, r in ratio.items():
        print(f"{mode}/off: {r['entries_per_s']:.2f}x entries/s, kept memory {r['kept']:.2f}x"
              + (f", peak {r['peak']:.2f}x" if cuda else ""))
    print(f"max rel. difference between modes {dev:.1e}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
