"""GELU 2-jet kernels: the closed-form derivatives against autograd of F.gelu and finite differences,
every CPU backend against the nested-jvp reference, the Triton kernel under TRITON_INTERPRET=1 and
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
from fasthess.kernels.gelu import family, gelu_derivatives, gelu_jet2, gelu_jet2_reference as reference

APPROX = ["none", "tanh"]


def inputs(shape: tuple[int, ...], n: int, dtype, seed: int = 0):
    """x of ``shape`` spread over [-9, 9] (both tails of the erf/tanh), x1, x2 (n, *shape)."""
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(shape, generator=g, dtype=torch.float64)
    x1, x2 = (torch.randn(n, *shape, generator=g, dtype=torch.float64) for _ in range(2))
    return [t.to(dtype) for t in (x, x1, x2)]


def _close(got, want, dtype, what: str) -> None:
    rtol, atol = POINTWISE_JET2_VS_REFERENCE[dtype]
    for name, a, b in zip(("y", "y1", "y2"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, (what, name, a.dtype, a.shape, b.shape)
        torch.testing.assert_close(a, b.to(dtype), rtol=rtol, atol=atol, msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.parametrize("approximate", APPROX)
def test_derivatives_match_autograd_of_f_gelu_and_finite_differences(approximate: str) -> None:
    x = torch.linspace(-9, 9, 181, dtype=torch.float64, requires_grad=True)
    y = F.gelu(x, approximate=approximate)
    (d1,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    g, g1, g2 = gelu_derivatives(x.detach(), approximate)
    rtol, atol = POINTWISE_JET2_VS_DENSE
    for got, want in ((g, y), (g1, d1), (g2, d2)):
        torch.testing.assert_close(got, want.detach(), rtol=rtol, atol=atol)
    h = 1e-3
    f = lambda a: F.gelu(a, approximate=approximate)  # noqa: E731
    rtol, atol = POINTWISE_FINITE_DIFFERENCE
    xd = x.detach()
    torch.testing.assert_close(g2, (f(xd + h) - 2 * f(xd) + f(xd - h)) / h**2, rtol=rtol, atol=atol)
    # the reference (nested jvp on the written-out formula) is y1 = g' x1, y2 = g' x2 + g'' x1²
    _, x1, x2 = inputs((181,), 2, torch.float64)
    _, r1, r2 = reference(xd, x1, x2, approximate)
    rtol, atol = POINTWISE_JET2_VS_DENSE
    torch.testing.assert_close(r1, d1.detach() * x1, rtol=rtol, atol=atol)
    torch.testing.assert_close(r2, d1.detach() * x2 + d2 * x1 * x1, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape,n", [((1,), 1), ((3, 97), 2), ((2, 1025), 3), ((4099,), 1)])
def test_cpu_backends_match_reference(backend: str, dtype, approximate: str, shape, n: int) -> None:
    if backend not in family.available():
        pytest.skip(f"{backend} not built")
    want = reference(*inputs(shape, n, torch.float64), approximate)
    got = gelu_jet2(*inputs(shape, n, dtype), approximate, backend=backend)
    _close(got, want, dtype, f"{backend} {approximate} {shape}")


@pytest.mark.skipif("cpp" not in family.available(), reason="C++ extension not built")
def test_cpp_bfloat16_opcheck_and_errors() -> None:
    want = reference(*inputs((5, 97), 2, torch.float64))
    _close(gelu_jet2(*inputs((5, 97), 2, torch.bfloat16), backend="cpp"), want, torch.bfloat16, "bf16")
    x, x1, x2 = inputs((2, 5), 2, torch.float64)
    for approximate in APPROX:
        torch.library.opcheck(torch.ops.fasthess.gelu_jet2.default, (x, x1, x2, approximate))
    with pytest.raises(RuntimeError, match="approximate must be"):
        torch.ops.fasthess.gelu_jet2(x, x1, x2, "erf")
    with pytest.raises(RuntimeError, match=r"x1 and x2 must be \(N, \*x.shape\)"):
        torch.ops.fasthess.gelu_jet2(x, x1[:, :1], x2, "none")


def test_wrapper_errors_and_backend_selection() -> None:
    x, x1, x2 = inputs((2, 5), 1, torch.float64)
    with pytest.raises(ValueError, match="approximate must be one of"):
        gelu_jet2(x, x1, x2, "sigmoid")
    with pytest.raises(ValueError, match="x1 must be"):
        gelu_jet2(x, x1[0], x2)
    with pytest.raises(ValueError, match="dtype"):
        gelu_jet2(x, x1, x2.float())
    for backend in ("triton", "cuda"):  # no GPU here, or CPU tensors
        with pytest.raises(BackendUnavailableError):
            gelu_jet2(x, x1, x2, backend=backend)
    assert family.select("auto", "cpu")[0] == ("cpp" if "cpp" in family.available() else "torch")


_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    sys.path.insert(0, {tests!r})
    import torch
    from test_kernels_gelu import inputs, _close
    from fasthess.kernels.gelu.reference import gelu_jet2 as reference
    from fasthess.kernels.gelu.triton_kernels import gelu_jet2_triton
    for shape, n, approximate, dtype in {cases!r}:
        dtype = getattr(torch, dtype)
        want = reference(*inputs(shape, n, torch.float64), approximate)
        _close(gelu_jet2_triton(*inputs(shape, n, dtype), approximate), want, dtype, f"triton {{shape}} {{approximate}}")
        print("ok", shape, n, approximate, dtype)
    """
)


def test_triton_kernel_under_interpreter() -> None:
    cases = [((1,), 1, "none", "float32"), ((3, 97), 2, "tanh", "float32"), ((2, 1025), 2, "none", "float32"),
             ((2, 1025), 1, "tanh", "float64"), ((97,), 3, "none", "float64")]
    script = _INTERPRET_SCRIPT.format(tests=os.path.join(ROOT, "tests"), cases=cases)
    stdout = run_interpreted(script)
    assert stdout.count("ok") == len(cases)


@pytest.mark.parametrize("tanh", [False, True])
def test_triton_kernel_compiles_to_ptx_for_sm90(tanh: bool) -> None:
    triton = pytest.importorskip("triton")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fasthess.kernels.gelu.triton_kernels import BLOCK, _gelu_jet2_kernel as kernel

    const = dict(TANH=tanh, ACC=tl.float32, BLOCK=BLOCK)
    names = kernel.arg_names
    sig = {name: "*fp32" for name in names[:6]} | {"M": "i32", "N": "i32"} | {c: "constexpr" for c in const}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(c),): v for c, v in const.items()})
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = out.asm["ptx"]
    assert ".target sm_90" in ptx and ".entry _gelu_jet2_kernel" in ptx
