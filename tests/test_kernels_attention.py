"""Attention 2-jet kernels: the reference against independent float64 checks, every CPU backend
against the reference, the Triton kernel under TRITON_INTERPRET=1 (also with the tensor cores' TF32
rounding emulated, for its float32 precisions) and compiled to PTX for sm_90, every CUDA source
(csrc/cuda/*.cu) compiled with nvcc for sm_80/sm_90 and their torch glue against the torch headers,
opcheck of the C++ op."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import textwrap

import pytest
import torch
from attention_cases import MASKS, SHAPES, inputs, padding
from tolerances import ATTENTION_FINITE_DIFFERENCE, ATTENTION_JET2_VS_REFERENCE
from triton_interpreter import ROOT, run_interpreted

from fasthess.errors import BackendUnavailableError
from fasthess.kernels.attention import attention_jet2, family, select_backend
from fasthess.kernels.attention.reference import attention, attention_jet2 as reference, visible
from fasthess.kernels.registry import extension_loaded

needs_ext = pytest.mark.skipif(not extension_loaded(), reason="C++ extension not built")


def _close(got, want, dtype: torch.dtype, what: str) -> None:
    rtol, atol = ATTENTION_JET2_VS_REFERENCE[dtype]
    for name, a, b in zip(("o", "o1", "o2"), got, want):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=rtol, atol=atol, msg=lambda m: f"{what} {name}: {m}")


def _dense_jet(q, k, v, q1, k1, v1, q2, k2, v2, causal, pad):
    """The closed-form 2-jet with whole T×T matrices (no online softmax, no autodiff)."""
    scale = q.shape[-1] ** -0.5
    s = q @ k.transpose(-1, -2) * scale
    s1 = (q1 @ k.transpose(-1, -2) + q @ k1.transpose(-1, -2)) * scale
    s2 = (q2 @ k.transpose(-1, -2) + 2 * q1 @ k1.transpose(-1, -2) + q @ k2.transpose(-1, -2)) * scale
    mask = visible(q.shape[-2], k.shape[-2], causal, pad, q.device)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) if mask is not None else torch.softmax(s, -1)
    p = torch.nan_to_num(p)
    mu1 = (p * s1).sum(-1, keepdim=True)
    mu2 = (p * s2).sum(-1, keepdim=True)
    var = (p * (s1 - mu1) ** 2).sum(-1, keepdim=True)
    p1 = p * (s1 - mu1)
    p2 = p * (s2 - mu2 + (s1 - mu1) ** 2 - var)
    return p @ v, p1 @ v + p @ v1, p2 @ v + 2 * p1 @ v1 + p @ v2


@pytest.mark.parametrize("causal,padded", MASKS)
def test_reference_matches_closed_form_and_finite_differences(causal: bool, padded: bool) -> None:
    x = inputs(2, 2, 6, 6, 4, 2, torch.float64, seed=3)
    pad = padding(2, 6) if padded else None
    want = reference(*x, causal=causal, key_padding_mask=pad)
    _close(_dense_jet(*x, causal, pad), want, torch.float64, "closed form")
    # o2 = d²/dt² o(x + t x1 + t²/2 x2) at 0, by a central second difference
    q, k, v, q1, k1, v1, q2, k2, v2 = x
    h = 1e-3

    def o_at(t: float) -> torch.Tensor:
        return torch.stack([
            attention(q + t * q1[i] + t * t / 2 * q2[i], k + t * k1[i] + t * t / 2 * k2[i],
                      v + t * v1[i] + t * t / 2 * v2[i], causal=causal, key_padding_mask=pad)
            for i in range(q1.shape[0])
        ])

    fd1 = (o_at(h) - o_at(-h)) / (2 * h)
    fd2 = (o_at(h) - 2 * o_at(0.0) + o_at(-h)) / h**2
    rtol, atol = ATTENTION_FINITE_DIFFERENCE
    torch.testing.assert_close(want[1], fd1, rtol=rtol, atol=atol)
    torch.testing.assert_close(want[2], fd2, rtol=rtol, atol=atol)


def test_row_without_visible_key_is_zero() -> None:
    x = inputs(2, 1, 3, 3, 4, 1, torch.float64)
    pad = padding(2, 3)  # batch 1: key 0 padded, causal row 0 sees nothing
    for backend in family.available():
        if backend in ("cuda", "triton"):
            continue
        o, o1, o2 = attention_jet2(*x, causal=True, key_padding_mask=pad, backend=backend)
        assert torch.isfinite(o2).all(), backend
        assert o[1, :, 0].abs().max() == 0 and o1[:, 1, :, 0].abs().max() == 0 and o2[:, 1, :, 0].abs().max() == 0


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal,padded", MASKS)
def test_cpu_backends_match_reference(backend: str, dtype, shape, causal: bool, padded: bool) -> None:
    if backend not in family.available():
        pytest.skip(f"{backend} not built")
    x = inputs(*shape, dtype)
    pad = padding(shape[0], shape[3]) if padded else None
    want = reference(*inputs(*shape, torch.float64), causal=causal, key_padding_mask=pad)
    got = attention_jet2(*x, causal=causal, key_padding_mask=pad, backend=backend)
    _close(got, want, dtype, f"{backend} {shape}")


@needs_ext
@pytest.mark.parametrize("causal", [False, True])
def test_cpp_matches_torch_backend_at_1025(causal: bool) -> None:
    x = inputs(1, 2, 1025, 1025, 8, 2, torch.float64, seed=1)
    pad = padding(1, 1025)
    got = attention_jet2(*x, causal=causal, key_padding_mask=pad, backend="cpp")
    want = attention_jet2(*x, causal=causal, key_padding_mask=pad, backend="torch")
    _close(got, want, torch.float64, "cpp vs torch at T=1025")


@needs_ext
def test_cpp_opcheck() -> None:
    x = inputs(2, 2, 5, 6, 4, 2, torch.float64)
    keep = ~padding(2, 6)
    torch.library.opcheck(torch.ops.fasthess.attention_jet2.default, (*x, keep, True, 0.5))
    torch.library.opcheck(torch.ops.fasthess.attention_jet2.default, (*x, None, False, 0.5))


@needs_ext
def test_cpp_rejects_bad_shapes() -> None:
    x = inputs(1, 1, 4, 4, 4, 2, torch.float64)
    x[3] = x[3][:1]
    with pytest.raises(RuntimeError, match=r"q1, q2 must be \(N, \*q.shape\)"):
        torch.ops.fasthess.attention_jet2(*x, None, False, 1.0)


def test_wrapper_errors_and_backend_selection() -> None:
    x = inputs(1, 1, 4, 4, 4, 2, torch.float64)
    with pytest.raises(ValueError, match="k1 must be"):
        attention_jet2(*x[:4], x[4][:1], *x[5:])
    for name in ("triton", "cuda"):  # GPU backends on CPU tensors: unavailable here, or not for "cpu"
        with pytest.raises(BackendUnavailableError):
            attention_jet2(*x, backend=name)
    assert select_backend("auto", "cpu", torch.float64)[0] == ("cpp" if extension_loaded() else "torch")
    assert select_backend("auto", "cpu", torch.bfloat16)[0] == "torch"  # cpp takes float32/64 only
    if extension_loaded():
        with pytest.raises(TypeError, match="takes"):
            select_backend("cpp", "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="precision must be one of"):
        attention_jet2(*x, precision="fp32")
    for precision in ("ieee", "tf32x3", "tf32"):  # CPU backends are exact at every precision setting
        got = attention_jet2(*x, causal=True, precision=precision)
        _close(got, reference(*x, causal=True), torch.float64, precision)


_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    sys.path.insert(0, {tests!r})
    import torch
    from attention_cases import inputs, padding
    from tolerances import ATTENTION_JET2_VS_REFERENCE
    from fasthess.kernels.attention.reference import attention_jet2 as reference
    from fasthess.kernels.attention.triton_kernels import attention_jet2_triton
    rtol, atol = ATTENTION_JET2_VS_REFERENCE[torch.float32]
    for shape, causal, padded in {cases!r}:
        x = inputs(*shape, torch.float32)
        pad = padding(shape[0], shape[3]) if padded else None
        want = reference(*inputs(*shape, torch.float64), causal=causal, key_padding_mask=pad)
        got = attention_jet2_triton(*x, causal=causal, key_padding_mask=pad)
        for name, a, b in zip(("o", "o1", "o2"), got, want):
            torch.testing.assert_close(a, b.float(), rtol=rtol, atol=atol, msg=lambda m: f"{{shape}} {{name}}: {{m}}")
        print("ok", shape, causal, padded)
    """
)


def test_triton_kernel_under_interpreter() -> None:
    cases = [((1, 1, 1, 1, 4, 1), True, False), ((2, 2, 7, 7, 5, 2), True, True),
             ((1, 1, 97, 97, 16, 2), False, True), ((2, 1, 5, 40, 8, 1), False, False)]
    script = _INTERPRET_SCRIPT.format(tests=os.path.join(ROOT, "tests"), cases=cases)
    stdout = run_interpreted(script)
    assert stdout.count("ok") == len(cases)


_EMULATED_PRECISION_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    sys.path.insert(0, {tests!r})
    import torch
    import tensor_core_emulation
    tensor_core_emulation.install()
    from attention_cases import inputs, padding
    from fasthess.kernels.attention.reference import attention_jet2 as reference
    from fasthess.kernels.attention.triton_kernels import attention_jet2_triton
    out = []
    for shape, causal, padded in {cases!r}:
        x = inputs(*shape, torch.float32)
        pad = padding(shape[0], shape[3]) if padded else None
        want = reference(*inputs(*shape, torch.float64), causal=causal, key_padding_mask=pad)
        for precision in ("ieee", "tf32x3", "tf32"):
            got = attention_jet2_triton(*x, causal=causal, key_padding_mask=pad, precision=precision)
            for name, a, b in zip(("o", "o1", "o2"), got, want):
                out.append(dict(shape=shape, precision=precision, name=name, got=a.double().tolist(), want=b.tolist()))
    print(json.dumps(out))
    """
)


def test_triton_precisions_under_emulated_tensor_cores() -> None:
    """The interpreter's ``tl.dot`` is exact at every ``input_precision``; with the tensor cores' TF32
    rounding emulated (tests/tensor_core_emulation.py), ``"tf32x3"`` must meet the float32 tolerance and
    stay near ``"ieee"``, while ``"tf32"`` must miss it (which shows the precision reaches every product)."""
    import json

    from tolerances import ATTENTION_JET2_TF32_VS_REFERENCE, ATTENTION_TF32X3_VS_IEEE_ERROR

    cases = [((2, 2, 7, 7, 5, 2), True, True), ((1, 2, 64, 64, 64, 1), True, False)]
    script = _EMULATED_PRECISION_SCRIPT.format(tests=os.path.join(ROOT, "tests"), cases=cases)
    stdout = run_interpreted(script)
    rtol, atol = ATTENTION_JET2_VS_REFERENCE[torch.float32]
    worst: dict[tuple, float] = {}  # (shape, precision) -> largest |error| over o, o1, o2
    meets_fp32: dict[tuple, bool] = {}  # (shape, precision) -> all of o, o1, o2 within the float32 tolerance
    for r in json.loads(stdout.splitlines()[-1]):
        got, want = torch.tensor(r["got"]), torch.tensor(r["want"])
        key = (tuple(r["shape"]), r["precision"])
        worst[key] = max(worst.get(key, 0.0), float((got - want).abs().max()))
        meets_fp32[key] = meets_fp32.get(key, True) and torch.allclose(got, want, rtol=rtol, atol=atol)
        if r["precision"] == "tf32":
            torch.testing.assert_close(got, want, rtol=ATTENTION_JET2_TF32_VS_REFERENCE[0],
                                       atol=ATTENTION_JET2_TF32_VS_REFERENCE[1], msg=lambda m: f"tf32 {key}: {m}")
    for shape in {shape for shape, _ in worst}:
        assert meets_fp32[shape, "ieee"] and meets_fp32[shape, "tf32x3"], (shape, worst)
        assert not meets_fp32[shape, "tf32"], (shape, worst)  # one TF32 product: visibly less accurate
        assert worst[shape, "tf32x3"] <= ATTENTION_TF32X3_VS_IEEE_ERROR * worst[shape, "ieee"], (shape, worst)


def test_tensor_core_emulation_splits_float32_into_tf32_parts() -> None:
    """The hi/lo split behind "tf32x3": a_hi + a_lo == a exactly, a_hi has a 10-bit mantissa, and three
    TF32 products recover a float32-accurate product where one TF32 product keeps ~3 digits."""
    import numpy as np
    from tensor_core_emulation import tf32_dot, tf32_round, tf32x3_dot

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 96)).astype(np.float32), rng.standard_normal((96, 48)).astype(np.float32)
    hi = tf32_round(a)
    assert np.array_equal(hi + (a - hi), a) and not np.array_equal(hi, a)
    assert not (hi.view(np.uint32) & np.uint32(0x1FFF)).any()  # low 13 mantissa bits clear
    assert np.abs(hi - a).max() <= 2.0**-11 * np.abs(a).max()  # rounded to nearest: half a TF32 ulp
    exact = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(exact).max()
    err1, err3 = (float(np.abs(f(a, b) - exact).max() / scale) for f in (tf32_dot, tf32x3_dot))
    err_fp32 = float(np.abs(a @ b - exact).max() / scale)
    assert err1 > 1e-4 and err3 < 4 * err_fp32 + 1e-7, (err1, err3, err_fp32)


def _triton_ptx_sm90(precision: str, has: dict[str, bool]):  # noqa: ANN202
    """The attention kernel compiled for sm_90 at D = 64 (``has``: the HAS_* tangent flags)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fasthess.kernels.attention.triton_kernels import _attention_jet2_kernel as kernel, launch_config

    bm, bn, bd, warps, stages = launch_config(64)
    const = dict(CAUSAL=True, HAS_KEEP=True, ACC=tl.float32, PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    const |= {f"HAS_{name.upper()}": has.get(name, True) for name in TANGENTS}
    names = kernel.arg_names
    sig = {name: "*fp32" for name in names[:13]} | {"KEEP": "*i8", "scale": "fp32"}
    sig |= {name: "i32" for name in ("H", "BH", "TQ", "TK", "D")} | {c: "constexpr" for c in const}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(c),): v for c, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_triton_kernel_compiles_to_ptx_for_sm90(precision: str) -> None:
    pytest.importorskip("triton")
    out = _triton_ptx_sm90(precision, {})
    ptx = out.asm["ptx"]
    assert ".target sm_90" in ptx and ".entry _attention_jet2_kernel" in ptx
    assert out.metadata.shared <= 227 * 1024  # fits the H100/H200 shared memory per block
    if precision == "tf32x3":  # tensor-core MMAs (Hopper wgmma) on operands split by cvt.rna.tf32
        assert "wgmma.mma_async" in ptx and "cvt.rna.tf32.f32" in ptx


def test_triton_kernel_without_second_order_tangents_has_fewer_products() -> None:
    """HAS_Q2 = HAS_K2 = HAS_V2 = False (the fused rule's call) compiles for sm_90 without the products
    q2 kᵀ, q k2ᵀ and P v2: fewer tensor-core MMAs and global loads than with all six tangents."""
    pytest.importorskip("triton")
    full = _triton_ptx_sm90("tf32x3", {}).asm["ptx"]
    first = _triton_ptx_sm90("tf32x3", {"q2": False, "k2": False, "v2": False}).asm["ptx"]
    assert ".target sm_90" in first and ".entry _attention_jet2_kernel" in first
    mma = [p.count("wgmma.mma_async") for p in (full, first)]
    loads = [p.count("ld.global") for p in (full, first)]
    assert mma[1] < mma[0] and loads[1] < loads[0], (mma, loads)


CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _nvcc() -> str | None:
    return shutil.which("nvcc") or next((p for p in ["/usr/local/cuda/bin/nvcc"] if os.path.exists(p)), None)


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("source", CU_SOURCES, ids=os.path.basename)
def test_cuda_sources_compile(source: str, arch: str, tmp_path) -> None:
    cmd = [_nvcc(), "-c", "-std=c++17", "-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-Xptxas", "-v", source, "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "spill" in res.stderr  # ptxas reported on the kernels it built


@pytest.mark.skipif(shutil.which("g++") is None or _nvcc() is None, reason="needs g++ and the CUDA toolkit headers")
def test_cuda_glue_compiles_against_torch_headers(tmp_path) -> None:
    """The torch glue of the CUDA kernels is built only against a CUDA torch; check its C++ here.

    The CPU torch wheel ships the c10/cuda headers but not the build-generated
    ``cuda_cmake_macros.h``: an empty stand-in suffices for a syntax check.
    """
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    (tmp_path / "c10" / "cuda" / "impl").mkdir(parents=True)
    (tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
    nvcc = os.path.realpath(_nvcc())  # /usr/local/bin/nvcc may be a wrapper: ask nvcc where CUDA lives
    res = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
    top = next((line.split("=", 1)[1].strip() for line in (res.stdout + res.stderr).splitlines()
                if "TOP=" in line), os.path.dirname(os.path.dirname(nvcc)))
    cuda_include = os.path.join(top, "include")
    # every glue file in one translation unit: the torch headers are parsed once
    glue = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    assert len(glue) >= 4  # attention, layer norm, GELU, cross-entropy
    (tmp_path / "all_glue.cpp").write_text("".join(f'#include "{g}"\n' for g in glue))
    cmd = ["g++", "-fsyntax-only", "-std=c++17", f"-I{tmp_path}", *(f"-I{p}" for p in include_paths()),
           f"-I{cuda_include}", f"-I{sysconfig.get_paths()['include']}", str(tmp_path / "all_glue.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]


# --- None tangents: a missing tangent is zero and skipped (no zero tensor, no products) ---

TANGENTS = ("q1", "k1", "v1", "q2", "k2", "v2")
# the tangents left out (None); the first: the tangent-adjoint engine's fused rule (second order 0)
ABSENT = [("q2", "k2", "v2"), ("k2",), ("q2", "v2"), ("k1", "v1", "q2", "k2", "v2"), ("q1", "k1", "q2", "k2", "v2"),
          ("q1", "v1", "k2")]


def without(x: list, absent: tuple[str, ...]) -> tuple[list, list]:
    """``(inputs with the absent tangents None, the same with explicit zeros)``."""
    dropped = [None if i >= 3 and TANGENTS[i - 3] in absent else t for i, t in enumerate(x)]
    zeros = [torch.zeros_like(t) if d is None else t for t, d in zip(x, dropped)]
    return dropped, zeros


@pytest.mark.parametrize("absent", ABSENT, ids="-".join)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal,padded", MASKS)
def test_cpu_backends_skip_absent_tangents(absent, shape, causal: bool, padded: bool) -> None:
    """torch and cpp with None tangents against the reference with explicit zeros (computed once for both)."""
    pad = padding(shape[0], shape[3]) if padded else None
    want = reference(*without(inputs(*shape, torch.float64), absent)[1], causal=causal, key_padding_mask=pad)
    for backend in [b for b in ("torch", "cpp") if b in family.available()]:
        got = attention_jet2(*without(inputs(*shape, torch.float64), absent)[0], causal=causal, key_padding_mask=pad,
                             backend=backend)
        _close(got, want, torch.float64, f"{backend} {shape} without {absent}")
        if absent == ABSENT[0]:  # the fused rule's case in float32 too
            got32 = attention_jet2(*without(inputs(*shape, torch.float32), absent)[0], causal=causal,
                                   key_padding_mask=pad, backend=backend)
            _close(got32, want, torch.float32, f"{backend} float32 {shape} without {absent}")


def test_absent_tangents_errors_and_opcheck() -> None:
    x = inputs(2, 2, 5, 6, 4, 2, torch.float64)
    with pytest.raises(ValueError, match="at least one of q1, k1, v1"):
        attention_jet2(*x[:3], None, None, None, *x[6:])
    with pytest.raises(ValueError, match="v2 must be"):
        attention_jet2(*x[:8], x[8][:1])
    if not extension_loaded():
        return
    with pytest.raises(RuntimeError, match="at least one of q1, k1, v1"):
        torch.ops.fasthess.attention_jet2(*x[:3], None, None, None, *x[6:], None, False, 1.0)
    keep = ~padding(2, 6)
    for absent in ABSENT[:4]:
        torch.library.opcheck(torch.ops.fasthess.attention_jet2.default, (*without(x, absent)[0], keep, True, 0.5))


_INTERPRET_ABSENT_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    sys.path.insert(0, {tests!r})
    import torch
    from attention_cases import inputs, padding
    from test_kernels_attention import without
    from tolerances import ATTENTION_JET2_VS_REFERENCE
    from fasthess.kernels.attention.reference import attention_jet2 as reference
    from fasthess.kernels.attention.triton_kernels import attention_jet2_triton
    rtol, atol = ATTENTION_JET2_VS_REFERENCE[torch.float32]
    for shape, causal, padded, absent in {cases!r}:
        pad = padding(shape[0], shape[3]) if padded else None
        want = reference(*without(inputs(*shape, torch.float64), absent)[1], causal=causal, key_padding_mask=pad)
        got = attention_jet2_triton(*without(inputs(*shape, torch.float32), absent)[0], causal=causal,
                                    key_padding_mask=pad)
        for name, a, b in zip(("o", "o1", "o2"), got, want):
            torch.testing.assert_close(a, b.float(), rtol=rtol, atol=atol, msg=lambda m: f"{{shape}} {{name}}: {{m}}")
        print("ok", shape, causal, padded, absent)
    """
)


def test_triton_kernel_skips_absent_tangents_under_interpreter() -> None:
    cases = [((2, 2, 7, 7, 5, 2), True, True, ABSENT[0]), ((1, 1, 97, 97, 16, 2), False, True, ABSENT[1]),
             ((2, 1, 5, 40, 8, 1), False, False, ABSENT[3]), ((2, 3, 7, 7, 5, 3), True, False, ABSENT[4]),
             ((1, 1, 1, 1, 4, 1), True, False, ABSENT[5]), ((2, 1, 5, 11, 8, 2), False, True, ABSENT[2])]
    script = _INTERPRET_ABSENT_SCRIPT.format(tests=os.path.join(ROOT, "tests"), cases=cases)
    stdout = run_interpreted(script)
    assert stdout.count("ok") == len(cases)
