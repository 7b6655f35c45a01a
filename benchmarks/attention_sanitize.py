"""Runs the CUDA attention 2-jet kernel (and, for backend "cuda", the CUDA attention HVP kernels) on small
awkward shapes, for compute-sanitizer (gpu_check.sh).

    compute-sanitizer --tool memcheck python benchmarks/attention_sanitize.py
Prints one line per case and exits non-zero if an output is wrong.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from attention_cases import inputs, padding  # noqa: E402

from fasthess.kernels.attention import attention_jet2  # noqa: E402
from fasthess.kernels.attention.reference import attention_jet2 as reference  # noqa: E402


def main() -> int:
    backend = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    bad = 0
    for shape in [(1, 1, 1, 1, 4, 1), (2, 3, 33, 33, 5, 2), (1, 2, 70, 45, 72, 1), (1, 1, 20, 20, 256, 1)]:
        if backend == "triton" and shape[4] > 128:
            continue
        # None tangents: all given; second order absent (the fused rule's call: the kernel instance without
        # q2, k2, v2); only q1 given (absent first-order tangents read as 0, never dereferenced)
        for causal, absent in [(False, ()), (True, ()), (True, (6, 7, 8)), (False, (4, 5, 6, 7, 8))]:
            x = [None if i in absent else t for i, t in enumerate(inputs(*shape, torch.float32, device="cuda"))]
            pad = padding(shape[0], shape[3], "cuda")
            got = attention_jet2(*x, causal=causal, key_padding_mask=pad, backend=backend)
            torch.cuda.synchronize()
            x64 = inputs(*shape, torch.float64, device="cuda")
            want = reference(*[t.zero_() if i in absent else t for i, t in enumerate(x64)], causal=causal,
                             key_padding_mask=pad)
            err = max(float((a.double() - b).abs().max()) for a, b in zip(got, want))
            ok = err < 1e-3
            bad += not ok
            print(f"{backend} {shape} causal={causal} absent={absent} max_err={err:.2e} {'ok' if ok else 'WRONG'}",
                  flush=True)
    if backend == "cuda" and os.environ.get("FASTHESS_CUDA_ATTENTION_ROWWISE") != "1":  # once per gpu_check.sh
        bad += attention_hvp_cases()
    return 1 if bad else 0


def attention_hvp_cases() -> int:
    """The CUDA attention HVP kernels (csrc/cuda/attention_hvp.cu): partial tiles, Tq != Tk, head dims across
    the staged chunks, several tangent groups, N = 0; float32 and float64. Returns the number of wrong cases."""
    from attention_cases import hvp_inputs

    from fasthess.kernels.attention_hvp import attention_hvp
    from fasthess.kernels.attention_hvp.reference import attention_hvp as hvp_reference

    bad = 0
    for shape, dtype in [((1, 1, 1, 1, 4, 1), torch.float32), ((2, 3, 33, 70, 5, 2), torch.float32),
                         ((1, 2, 70, 45, 72, 3), torch.float64), ((2, 1, 65, 65, 40, 0), torch.float64)]:
        for causal in (False, True):
            x = hvp_inputs(*shape, dtype, device="cuda")
            pad = padding(shape[0], shape[3], "cuda")
            got = attention_hvp(*x, causal=causal, key_padding_mask=pad, backend="cuda")
            torch.cuda.synchronize()
            exact = hvp_inputs(*shape, torch.float64, device="cuda")
            backend = "torch" if shape[-1] == 0 else None  # the reference does not vmap over N = 0 tangents
            want = (attention_hvp(*exact, causal=causal, key_padding_mask=pad, backend=backend) if backend
                    else hvp_reference(*exact, causal=causal, key_padding_mask=pad))
            err = max((float((a.double() - b).abs().max()) for a, b in zip(got, want) if b.numel()), default=0.0)
            ok = err < 1e-3
            bad += not ok
            print(f"cuda attention_hvp {shape} {dtype} causal={causal} max_err={err:.2e} {'ok' if ok else 'WRONG'}",
                  flush=True)
    return bad


if __name__ == "__main__":
    sys.exit(main())
