"""Runs the CUDA layer-norm and GELU 2-jet kernels on small awkward shapes, for compute-sanitizer (gpu_check.sh).

    compute-sanitizer --tool memcheck python benchmarks/pointwise_sanitize.py
Covers both layer-norm kernels (warp per row: D = 1, 97, 512; block per row: D = 513, 1025), with and
without weight/bias and with and without x2 (None), and both GELU forms, in float32 and float64. Prints
one line per case and exits non-zero if an output is wrong.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_kernels_gelu import inputs as gelu_inputs  # noqa: E402
from test_kernels_layer_norm import EPS, inputs as layer_norm_inputs  # noqa: E402

from fasthess.kernels import gelu, layer_norm  # noqa: E402


def _err(got, want) -> float:
    """Largest error relative to the largest entry, over the three outputs."""
    return max(float((a.double().cpu() - b).abs().max() / b.abs().max().clamp_min(1e-300)) for a, b in zip(got, want))


def main() -> int:
    bad = 0
    for dtype in (torch.float32, torch.float64):
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        for lead, d, n, affine in [((1,), 1, 1, True), ((3, 5), 97, 2, False), ((2,), 512, 1, True),
                                   ((3,), 513, 2, True), ((2,), 1025, 1, False)]:
            for has_x2 in (True, False):  # x2 = None: the kernel instances without x2
                x, w, b, x1, x2 = layer_norm_inputs(lead, d, n, torch.float64, affine)
                want = layer_norm.layer_norm_jet2_reference(x, w, b, x1, x2 if has_x2 else x2.zero_(), EPS)
                x, w, b, x1, x2 = (t if t is None else t.cuda() for t in layer_norm_inputs(lead, d, n, dtype, affine))
                got = layer_norm.layer_norm_jet2(x, w, b, x1, x2 if has_x2 else None, EPS, backend="cuda")
                torch.cuda.synchronize()
                err = _err(got, want)
                bad += not err < tol
                print(f"layer_norm {dtype} {lead} D={d} N={n} affine={affine} x2={has_x2} max_rel_err={err:.2e} "
                      f"{'ok' if err < tol else 'WRONG'}", flush=True)
        for shape, n in [((1,), 1), ((3, 37), 2), ((1025,), 3)]:
            for approximate in ("none", "tanh"):
                want = gelu.gelu_jet2_reference(*gelu_inputs(shape, n, torch.float64), approximate)
                got = gelu.gelu_jet2(*[t.cuda() for t in gelu_inputs(shape, n, dtype)], approximate, backend="cuda")
                torch.cuda.synchronize()
                err = _err(got, want)
                bad += not err < tol
                print(f"gelu {dtype} {shape} N={n} {approximate} max_rel_err={err:.2e} {'ok' if err < tol else 'WRONG'}",
                      flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
