"""Layer-norm 2-jet kernels: the reference against dense float64 derivatives of F.layer_norm and finite
differences, every CPU backend against the reference, the Triton kernel under TRITON_INTERPRET=1 and
compiled to PTX for sm_90, opcheck of the C++ op."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
import torch.nn.functional as F
from tolerances import POINTWISE_FINITE_DIFFERENCE, POINTWISE_JET2_VS_DENSE, POINTWISE_JET2_VS_REFERENCE
from triton_interpreter import ROOT, run_interpreted

from fasthess.errors import BackendUnavailableError
from fasthess.kernels.layer_norm import family, layer_norm_jet2, layer_norm_jet2_reference as reference

EPS = 1e-5


def inputs(lead: tuple[int, ...], d: int, n: int, dtype, affine: bool = True, seed: int = 0):
    """x (*lead, d) with a per-row offset and scale, weight and bias (d,) or None, x1, x2 (n, *lead, d)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=g, dtype=torch.float64) * 2 + torch.randn(*lead, 1, generator=g, dtype=torch.float64)
    w, b = (torch.randn(d, generator=g, dtype=torch.float64) if affine else None for _ in range(2))
    x1, x2 = (torch.randn(n, *lead, d, generator=g, dtype=torch.float64) for _ in range(2))
    return [t if t is None else t.to(dtype) for t in (x, w, b, x1, x2)]


def _close(got, want, dtype, what: str) -> None:
    rtol, atol = POINTWISE_JET2_VS_REFERENCE[dtype]
    for name, a, b in zip(("y", "y1", "y2"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, (what, name, a.dtype, a.shape, b.shape)
        torch.testing.assert_close(a, b.to(dtype), rtol=rtol, atol=atol, msg=lambda m: f"{what} {name}: {m}")


def test_reference_matches_dense_jacobians_and_finite_differences() -> None:
    """y1 = J x1, y2 = J x2 + H[x1, x1] with J, H from reverse-over-reverse through torch's F.layer_norm."""
    x, w, b, x1, x2 = inputs((3,), 5, 2, torch.float64)
    f = lambda a: F.layer_norm(a, (5,), w, b, EPS)  # noqa: E731
    jac = torch.func.jacrev(f)(x)  # (3, 5, 3, 5)
    hess = torch.func.jacrev(torch.func.jacrev(f))(x)  # (3, 5, 3, 5, 3, 5)
    want1 = torch.einsum("ijkl,nkl->nij", jac, x1)
    want2 = torch.einsum("ijkl,nkl->nij", jac, x2) + torch.einsum("ijklmo,nkl,nmo->nij", hess, x1, x1)
    y, y1, y2 = reference(x, w, b, x1, x2, EPS)
    rtol, atol = POINTWISE_JET2_VS_DENSE
    torch.testing.assert_close(y, f(x), rtol=rtol, atol=atol)
    torch.testing.assert_close(y1, want1, rtol=rtol, atol=atol)
    torch.testing.assert_close(y2, want2, rtol=rtol, atol=atol)
    h = 1e-3
    at = lambda t: torch.stack([f(x + t * a + t * t / 2 * c) for a, c in zip(x1, x2)])  # noqa: E731
    rtol, atol = POINTWISE_FINITE_DIFFERENCE
    torch.testing.assert_close(y1, (at(h) - at(-h)) / (2 * h), rtol=rtol, atol=atol)
    torch.testing.assert_close(y2, (at(h) - 2 * at(0.0) + at(-h)) / h**2, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lead,d,n,affine", [((1,), 1, 1, True), ((2, 3), 97, 2, True), ((3,), 1025, 3, False),
                                             ((2, 1), 97, 1, False)])
def test_cpu_backends_match_reference(backend: str, dtype, lead, d: int, n: int, affine: bool) -> None:
    if backend not in family.available():
        pytest.skip(f"{backend} not built")
    want = reference(*inputs(lead, d, n, torch.float64, affine), EPS)
    got = layer_norm_jet2(*inputs(lead, d, n, dtype, affine), EPS, backend=backend)
    _close(got, want, dtype, f"{backend} {lead} D={d}")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lead,d,n,affine", [((1,), 1, 1, True), ((2, 3), 97, 2, True), ((3,), 1025, 3, False),
                                             ((2, 1), 97, 1, False)])
def test_cpu_backends_skip_absent_x2(backend: str, dtype, lead, d: int, n: int, affine: bool) -> None:
    """x2=None (a zero second-order tangent, not materialised) gives the reference with explicit zeros."""
    if backend not in family.available():
        pytest.skip(f"{backend} not built")
    x, w, b, x1, x2 = inputs(lead, d, n, torch.float64, affine)
    want = reference(x, w, b, x1, torch.zeros_like(x2), EPS)
    x, w, b, x1, _ = inputs(lead, d, n, dtype, affine)
    _close(layer_norm_jet2(x, w, b, x1, None, EPS, backend=backend), want, dtype, f"{backend} {lead} D={d} x2=None")


@pytest.mark.skipif("cpp" not in family.available(), reason="C++ extension not built")
def test_cpp_bfloat16_and_no_tangents() -> None:
    want = reference(*inputs((4,), 97, 2, torch.float64), EPS)
    _close(layer_norm_jet2(*inputs((4,), 97, 2, torch.bfloat16), EPS, backend="cpp"), want, torch.bfloat16, "bf16")
    x, w, b, x1, x2 = inputs((4,), 9, 0, torch.float64)
    y, y1, y2 = layer_norm_jet2(x, w, b, x1, x2, backend="cpp")
    torch.testing.assert_close(y, F.layer_norm(x, (9,), w, b, EPS))
    assert y1.shape == y2.shape == (0, 4, 9)


@pytest.mark.skipif("cpp" not in family.available(), reason="C++ extension not built")
def test_cpp_opcheck_and_errors() -> None:
    x, w, b, x1, x2 = inputs((2, 3), 7, 2, torch.float64)
    torch.library.opcheck(torch.ops.fasthess.layer_norm_jet2.default, (x, w, b, x1, x2, EPS))
    torch.library.opcheck(torch.ops.fasthess.layer_norm_jet2.default, (x, None, None, x1, x2, EPS))
    torch.library.opcheck(torch.ops.fasthess.layer_norm_jet2.default, (x, w, b, x1, None, EPS))
    with pytest.raises(RuntimeError, match=r"x1 and x2 must be \(N, \*x.shape\)"):
        torch.ops.fasthess.layer_norm_jet2(x, w, b, x1[:, :1], x2, EPS)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.fasthess.layer_norm_jet2(x, w[:3], b, x1, x2, EPS)


def test_wrapper_errors_and_backend_selection() -> None:
    x, w, b, x1, x2 = inputs((2,), 4, 1, torch.float64)
    with pytest.raises(ValueError, match="x2 must be"):
        layer_norm_jet2(x, w, b, x1, x2[..., :3])
    with pytest.raises(ValueError, match="bias must be"):
        layer_norm_jet2(x, w, b[:2], x1, x2)
    with pytest.raises(ValueError, match="dtype"):
        layer_norm_jet2(x, w.float(), b, x1, x2)
    for backend in ("triton", "cuda"):  # no GPU here, or CPU tensors
        with pytest.raises(BackendUnavailableError):
            layer_norm_jet2(x, w, b, x1, x2, backend=backend)
    assert family.select("auto", "cpu")[0] == ("cpp" if "cpp" in family.available() else "torch")


_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    sys.path.insert(0, {tests!r})
    import torch
    from test_kernels_layer_norm import EPS, inputs, _close
    from fasthess.kernels.layer_norm.reference import layer_norm_jet2 as reference
    from fasthess.kernels.layer_norm.triton_kernels import layer_norm_jet2_triton
    for lead, d, n, affine, dtype, has_x2 in {cases!r}:
        dtype = getattr(torch, dtype)
        x, w, b, x1, x2 = inputs(lead, d, n, torch.float64, affine)
        want = reference(x, w, b, x1, x2 if has_x2 else torch.zeros_like(x2), EPS)
        x, w, b, x1, x2 = inputs(lead, d, n, dtype, affine)
        got = layer_norm_jet2_triton(x, w, b, x1, x2 if has_x2 else None, EPS)
        _close(got, want, dtype, f"triton {{lead}} {{d}} x2 given: {{has_x2}}")
        print("ok", lead, d, n, affine, dtype, has_x2)
    """
)


def test_triton_kernel_under_interpreter() -> None:
    cases = [((1,), 1, 1, True, "float32", True), ((5, 3), 97, 2, True, "float32", True),
             ((3,), 1025, 2, False, "float32", True), ((17,), 97, 1, True, "float64", True),
             ((2,), 1025, 1, True, "float64", True),
             # x2 = None: the kernel compiled without it
             ((1,), 1, 1, True, "float32", False), ((5, 3), 97, 2, True, "float32", False),
             ((3,), 1025, 2, False, "float32", False), ((17,), 97, 1, True, "float64", False)]
    script = _INTERPRET_SCRIPT.format(tests=os.path.join(ROOT, "tests"), cases=cases)
    stdout = run_interpreted(script)
    assert stdout.count("ok") == len(cases)


def _triton_ptx_sm90(d: int, has_x2: bool) -> str:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fasthess.kernels.layer_norm.triton_kernels import _layer_norm_jet2_kernel as kernel, launch_config

    block_r, block_d, warps = launch_config(d)
    const = dict(HAS_W=True, HAS_B=True, HAS_X2=has_x2, ACC=tl.float32, BLOCK_R=block_r, BLOCK_D=block_d)
    names = kernel.arg_names
    sig = {name: "*fp32" for name in names[:8]} | {"R": "i32", "N": "i32", "D": "i32", "eps": "fp32"}
    sig |= {c: "constexpr" for c in const}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(c),): v for c, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]


@pytest.mark.parametrize("d", [97, 1025])
def test_triton_kernel_compiles_to_ptx_for_sm90(d: int) -> None:
    pytest.importorskip("triton")
    ptx = _triton_ptx_sm90(d, True)
    assert ".target sm_90" in ptx and ".entry _layer_norm_jet2_kernel" in ptx


def test_triton_kernel_without_x2_compiles_without_its_loads() -> None:
    """HAS_X2 = False (x2 = None, the fused rule's call): no loads of x2 in the sm_90 PTX."""
    pytest.importorskip("triton")
    with_x2, without_x2 = (_triton_ptx_sm90(97, has) for has in (True, False))
    assert ".entry _layer_norm_jet2_kernel" in without_x2
    assert without_x2.count("ld.global") < with_x2.count("ld.global"), (without_x2.count("ld.global"),
                                                                          with_x2.count("ld.global"))
