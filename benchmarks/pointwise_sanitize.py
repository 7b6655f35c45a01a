"""Runs the CUDA layer-norm, GELU and cross-entropy 2-jet kernels on small awkward shapes, for compute-sanitizer
(gpu_check.sh); also the CUDA Hutchinson accumulation and one-hot weight tangent kernels (:func:`linear_main`).

    compute-sanitizer --tool memcheck python benchmarks/pointwise_sanitize.py
Covers both layer-norm kernels (warp per row: D = 1, 97, 512; block per row: D = 513, 1025), with and
without weight/bias and with and without x2 (None), both GELU forms, and the cross-entropy kernel (V = 1, 97,
1025, 4099: 64 to 512 threads per block; 1, 2 and 4 tangents per block, a partial last one; with and without z2,
ignored rows) in float32 and float64. Prints one line per case and exits non-zero if an output is wrong.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_kernels_gelu import inputs as gelu_inputs  # noqa: E402
from test_kernels_layer_norm import EPS, inputs as layer_norm_inputs  # noqa: E402
from test_kernels_loss import inputs as loss_inputs  # noqa: E402

from fasthess.kernels import gelu, layer_norm, loss  # noqa: E402


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
        # up to 4 tangents per block once N · blocks per row >= 2 · SMs (H200: 264): N = 300 at K = 2 and 5
        for k, n, v, second in [(1, 1, 1, True), (2, 3, 97, False), (5, 4, 1025, True), (3, 2, 4099, False),
                                (2, 300, 33, True), (5, 300, 97, False)]:
            z, y, z1, z2 = loss_inputs(k, n, v, dtype, device="cuda")
            want = loss.cross_entropy_jet2_reference(z.double(), y, z1.double(), z2.double() if second else None)
            got = loss.cross_entropy_jet2(z, y, z1, z2 if second else None, backend="cuda")
            torch.cuda.synchronize()
            err = _err(got, want)
            bad += not err < tol
            print(f"cross_entropy {dtype} K={k} N={n} V={v} z2={second} max_rel_err={err:.2e} "
                  f"{'ok' if err < tol else 'WRONG'}", flush=True)
    bad += linear_main()
    return 1 if bad else 0


# --- linear / Hutchinson kernels (csrc/cuda/hutchinson_update.cu, csrc/cuda/onehot_weight_tangent.cu) ---


def linear_main() -> int:
    """The CUDA Hutchinson accumulation (plain and seeded: n not a multiple of the tile, k = 1 and 3, counts 0
    and > 0) and one-hot weight tangents (zero directions, M = 1 and 97, out not a multiple of the warp,
    2/4/8-byte elements); returns the number of wrong cases."""
    from fasthess.kernels import hutchinson, linear

    bad = 0
    for dtype in (torch.float32, torch.float64):
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        for k, n, count in [(1, 1, 0), (3, 97, 5), (3, 1025, 0), (1, 4099, 2)]:
            g = torch.Generator().manual_seed(n)
            hz = torch.randn(k, n, generator=g, dtype=dtype)
            mean0, m20 = torch.randn(n, generator=g, dtype=dtype), torch.rand(n, generator=g, dtype=dtype)
            z = linear.rademacher(3, 1, k, n, dtype=dtype)
            want = [mean0.clone(), m20.clone()]
            hutchinson.reference.hutchinson_update_(*want, z, hz, count)
            for what in ("plain", "seeded"):
                got = [mean0.cuda(), m20.cuda()]
                if what == "plain":
                    hutchinson.hutchinson_update_(*got, z.cuda(), hz.cuda(), count, backend="cuda")
                else:
                    linear.hutchinson_update_seeded_(*got, hz.cuda(), 3, 1, count, backend="cuda")
                torch.cuda.synchronize()
                err = _err(got, want)
                bad += not err < tol
                print(f"hutchinson_update {what} {dtype} k={k} n={n} count={count} max_rel_err={err:.2e} "
                      f"{'ok' if err < tol else 'WRONG'}", flush=True)
    for dtype in (torch.float16, torch.float32, torch.float64):
        for xshape, out, k in [((1, 3), 1, 2), ((97, 5), 33, 5), ((2, 3, 7), 130, 4)]:
            x = torch.randn(xshape, generator=torch.Generator().manual_seed(0)).to(dtype)
            rows = torch.arange(k) * 7 % out
            rows[k // 2] = -1  # a zero direction
            cols = torch.arange(k) % xshape[-1]
            want = linear.onehot_weight_tangent_reference(x, rows, cols, out)
            got = linear.onehot_weight_tangent(x.cuda(), rows.cuda(), cols.cuda(), out, backend="cuda")
            torch.cuda.synchronize()
            same = torch.equal(got.cpu(), want)
            bad += not same
            print(f"onehot_weight_tangent {dtype} x={xshape} out={out} K={k} {'ok' if same else 'WRONG'}", flush=True)
    return bad


if __name__ == "__main__":
    sys.exit(main())
