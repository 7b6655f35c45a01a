"""Cross-entropy 2-jet: the reference against a dense float64 Hessian, every CPU backend against the reference
(with and without second-order tangents, ignored rows, all rows ignored), the Triton kernel under
TRITON_INTERPRET=1 (several column and tangent blocks per row) and compiled to PTX for sm_90, opcheck of the
C++ op."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
import torch.nn.functional as F
from tolerances import CROSS_ENTROPY_JET2_VS_REFERENCE
from triton_interpreter import ROOT, run_interpreted

from fasthess.errors import BackendUnavailableError
from fasthess.kernels.loss import cross_entropy_jet2, cross_entropy_jet2_reference as reference, family


def inputs(k: int, n: int, v: int, dtype, seed: int = 0, ignored: tuple[int, ...] | None = None, device="cpu"):
    """z (n, v) spread as 3·randn, y (n,) with the rows ``ignored`` (default: the middle one of n > 1) set to
    -100, z1, z2 (k, n, v); floating tensors rounded from float64 to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(n, v, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    y[list((n // 2,) if ignored is None and n > 1 else ignored or ())] = -100
    z1, z2 = (torch.randn(k, n, v, generator=g, dtype=torch.float64) for _ in range(2))
    return [t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in (z, y, z1, z2)]


def close(got, want, dtype, what: str) -> None:
    """``got`` (of ``dtype``) against the float64 ``want``; NaN where ``want`` is NaN (every row ignored)."""
    rtol, atol = CROSS_ENTROPY_JET2_VS_REFERENCE[dtype]
    for name, a, b in zip(("loss", "loss1", "loss2"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, (what, name, a.dtype, a.shape, b.shape)
        torch.testing.assert_close(a.cpu(), b.cpu().to(dtype), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{what} {name}: {m}")


def test_reference_matches_dense_hessian() -> None:
    """loss2 = z1ᵀ H z1 + g·z2 with H and g of the loss as a function of the flattened logits."""
    z, y, z1, z2 = inputs(2, 5, 4, torch.float64)
    f = lambda a: F.cross_entropy(a.view(5, 4), y)  # noqa: E731
    h = torch.autograd.functional.hessian(f, z.reshape(-1))
    g = torch.func.grad(f)(z.reshape(-1))
    want2 = torch.stack([t1.reshape(-1) @ h @ t1.reshape(-1) + g @ t2.reshape(-1) for t1, t2 in zip(z1, z2)])
    _, l1, l2 = reference(z, y, z1, z2)
    torch.testing.assert_close(l2, want2)
    torch.testing.assert_close(l1, torch.stack([g @ t.reshape(-1) for t in z1]))
    # z2=None is zero; every row ignored: NaN (0/0), as F.cross_entropy
    torch.testing.assert_close(reference(z, y, z1)[2], reference(z, y, z1, torch.zeros_like(z2))[2])
    assert all(t.isnan().all() for t in reference(z, torch.full_like(y, -100), z1, z2))


CPU_BACKENDS = ["torch", "cpp"]
SHAPES = [(1, 1, 1), (2, 3, 97), (3, 4, 1025), (3, 97, 97)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k,n,v", SHAPES)
@pytest.mark.parametrize("second", [True, False], ids=["z2", "z2=None"])
def test_cpu_backends_match_reference(backend: str, dtype, k: int, n: int, v: int, second: bool) -> None:
    if backend not in family.available():
        pytest.skip(f"{backend} not built")
    z, y, z1, z2 = inputs(k, n, v, torch.float64)
    want = reference(z, y, z1, z2 if second else torch.zeros_like(z2))
    z, y, z1, z2 = inputs(k, n, v, dtype)
    close(cross_entropy_jet2(z, y, z1, z2 if second else None, backend=backend), want, dtype, f"{backend} {k, n, v}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_row_ignored_gives_nan_like_the_reference(backend: str) -> None:
    if backend not in family.available():
        pytest.skip(f"{backend} not built")
    z, y, z1, z2 = inputs(2, 5, 7, torch.float64, ignored=tuple(range(5)))
    for b in (z2, None):
        got = cross_entropy_jet2(z, y, z1, b, backend=backend)
        assert all(t.isnan().all() for t in got), got


@pytest.mark.skipif("cpp" not in family.available(), reason="C++ extension not built")
def test_cpp_opcheck_and_errors() -> None:
    z, y, z1, z2 = inputs(2, 3, 5, torch.float64)
    torch.library.opcheck(torch.ops.fasthess.cross_entropy_jet2.default, (z, y, z1, z2, -100))
    torch.library.opcheck(torch.ops.fasthess.cross_entropy_jet2.default, (z, y, z1, None, -100))
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.fasthess.cross_entropy_jet2(z, torch.tensor([0, 5, 1]), z1, z2, -100)
    with pytest.raises(RuntimeError, match="z2 must be None or of z1's shape"):
        torch.ops.fasthess.cross_entropy_jet2(z, y, z1, z2[:1], -100)
    with pytest.raises(RuntimeError, match="share one dtype"):
        torch.ops.fasthess.cross_entropy_jet2(z, y, z1, z2.float(), -100)


def test_wrapper_errors_and_backend_selection() -> None:
    z, y, z1, z2 = inputs(2, 3, 5, torch.float64)
    with pytest.raises(ValueError, match="need z"):
        cross_entropy_jet2(z, y, z1[:, :2], z2)
    with pytest.raises(ValueError, match="z2 must be None or"):
        cross_entropy_jet2(z, y, z1, z2[:1])
    with pytest.raises(ValueError, match="dtype"):
        cross_entropy_jet2(z, y, z1.float(), z2)
    with pytest.raises(ValueError, match="integer class indices"):
        cross_entropy_jet2(z, y.double(), z1, z2)
    for bad in (5, -1):  # not ignore_index and outside [0, V): the same error from every backend
        for backend in family.available():
            with pytest.raises(ValueError, match=rf"target {bad} of row 1 is outside \[0, 5\)"):
                cross_entropy_jet2(z, torch.tensor([0, bad, 1]), z1, z2, backend=backend)
    for backend in ("triton", "cuda"):  # no GPU here, or CPU tensors
        with pytest.raises(BackendUnavailableError):
            cross_entropy_jet2(z, y, z1, z2, backend=backend)
    assert family.select("auto", "cpu")[0] == ("cpp" if "cpp" in family.available() else "torch")
    assert family.select("auto", "cpu", torch.bfloat16)[0] == "torch"  # the C++ op takes float32/float64
    assert list(family.backends) == ["triton", "cuda", "cpp", "torch"]


_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    sys.path.insert(0, {tests!r})
    import torch
    from test_kernels_loss import inputs, close
    from fasthess.kernels.loss.reference import cross_entropy_jet2 as reference
    from fasthess.kernels.loss.triton_kernels import cross_entropy_jet2_triton
    for k, n, v, dtype, second, ignored, block_k, block_v in {cases!r}:
        dtype = getattr(torch, dtype)
        z, y, z1, z2 = inputs(k, n, v, dtype, ignored=ignored)
        want = reference(z.double(), y, z1.double(), z2.double() if second else None)  # on the rounded inputs
        got = cross_entropy_jet2_triton(z, y, z1, z2 if second else None, -100, block_k, block_v)
        close(got, want, dtype, f"triton {{k, n, v}} {{dtype}} second={{second}}")
        print("ok", k, n, v, dtype, second, ignored, block_k, block_v)
    """
)

# (K, N, V, dtype, second-order tangents, ignored rows (None: the middle one), BLOCK_K, BLOCK_V (None: auto)):
# BLOCK_V < V streams a row in several blocks (the online softmax); BLOCK_K < K splits the tangents over
# programs (with a partly masked last block at K = 3, BLOCK_K = 2)
INTERPRET_CASES = [
    (1, 1, 1, "float32", True, None, None, None),
    (3, 97, 97, "float32", True, None, 2, 32),
    (1, 97, 1025, "float64", True, (0, 50, 96), None, 512),
    (3, 1, 1025, "float64", False, None, 4, 64),
    (3, 4, 1025, "float32", False, (1,), 1, None),
    (2, 5, 97, "float64", True, (0, 1, 2, 3, 4), None, 16),  # every row ignored: NaN
    (2, 3, 97, "bfloat16", True, None, None, 32),
]


def test_triton_kernel_under_interpreter() -> None:
    script = _INTERPRET_SCRIPT.format(tests=os.path.join(ROOT, "tests"), cases=INTERPRET_CASES)
    stdout = run_interpreted(script)
    assert stdout.count("ok") == len(INTERPRET_CASES)


@pytest.mark.parametrize("second", [True, False])
def test_triton_kernel_compiles_to_ptx_for_sm90(second: bool) -> None:
    """At the vocabulary-scale launch configuration (N = 64, V = 50257, K = 4 on an H200's 132 SMs)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fasthess.kernels.loss.triton_kernels import _cross_entropy_jet2_kernel as kernel, launch_config

    block_k, block_v, warps = launch_config(64, 50257, 4, 132)
    assert block_k * block_v > 1
    const = dict(HAS_Z2=second, ACC=tl.float32, BLOCK_K=block_k, BLOCK_V=block_v)
    names = kernel.arg_names
    sig = {"Z": "*fp32", "Y": "*i64", "Z1": "*fp32", "Z2": "*fp32", "R0": "*fp32", "R1": "*fp32", "R2": "*fp32"}
    sig |= {"N": "i32", "V": "i32", "K": "i32", "ignore_index": "i32"} | {c: "constexpr" for c in const}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(c),): v for c, v in const.items()})
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptx = out.asm["ptx"]
    assert ".target sm_90" in ptx and ".entry _cross_entropy_jet2_kernel" in ptx
