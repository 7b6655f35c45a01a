"""Linear-layer kernels: one-hot weight tangents, the linear 2-jet, regenerated Hutchinson probes."""

from __future__ import annotations

import os

import pytest
import torch
from tolerances import KERNEL_VS_REFERENCE, RADEMACHER_AGREEMENT_BAND, RADEMACHER_MEAN_BOUND
from triton_interpreter import ROOT, run_interpreted

from fasthess.errors import BackendUnavailableError
from fasthess.kernels.hutchinson.reference import hutchinson_update_
from fasthess.kernels.linear import (
    hutchinson_update_seeded_,
    linear_jet2,
    linear_jet2_reference,
    onehot_family,
    onehot_weight_tangent,
    onehot_weight_tangent_reference,
    rademacher,
    seeded_family,
)
from fasthess.kernels.linear.reference import hash32
from fasthess.kernels.registry import extension_loaded

needs_ext = pytest.mark.skipif(not extension_loaded(), reason="C++ extension not built")


def _coords(k: int, out: int, inp: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, out, (k,), generator=g)
    cols = torch.randint(0, inp, (k,), generator=g)
    rows[k // 2] = -1  # one zero direction
    return rows, cols


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("xshape,out,k", [((1, 1), 1, 1), ((3, 97), 5, 4), ((2, 5, 7), 1025, 3), ((1025, 3), 2, 9)])
def test_onehot_weight_tangent_matches_dense_seed(backend: str, dtype, xshape, out: int, k: int) -> None:
    if backend not in onehot_family.available():
        pytest.skip(f"{backend} not built")
    x = torch.randn(xshape, generator=torch.Generator().manual_seed(1)).to(dtype)
    rows, cols = _coords(k, out, xshape[-1])
    got = onehot_weight_tangent(x, rows, cols, out, backend=backend)
    want = onehot_weight_tangent_reference(x, rows, cols, out)
    assert got.shape == (k, *xshape[:-1], out) and got.dtype == dtype
    assert torch.equal(got, want)  # a copy: exact


def test_onehot_weight_tangent_rejects_outside_coordinates() -> None:
    x = torch.randn(2, 3)
    with pytest.raises(IndexError, match="outside the \\(4, 3\\) weight"):
        onehot_weight_tangent(x, torch.tensor([1]), torch.tensor([3]), 4)
    with pytest.raises(ValueError, match="equal size"):
        onehot_weight_tangent(x, torch.tensor([1, 2]), torch.tensor([0]), 4)


@needs_ext
def test_onehot_cpp_opcheck_and_error() -> None:
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    rows, cols = _coords(6, 7, 5)
    torch.library.opcheck(torch.ops.fasthess.onehot_weight_tangent.default, (x, rows, cols, 7))
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.fasthess.onehot_weight_tangent(x, torch.tensor([7]), torch.tensor([0]), 7)


@pytest.mark.parametrize("which", ["both", "x_only", "w_only"])
def test_linear_jet2_matches_nested_jvp(which: str) -> None:
    g = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(s, generator=g, dtype=torch.float64) for s in [(2, 5, 3), (4, 3), (4,)])
    x1, x2 = (torch.randn(3, 2, 5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    w1, w2 = (torch.randn(3, 4, 3, generator=g, dtype=torch.float64) for _ in range(2))
    if which == "x_only":
        w1 = w2 = None
    if which == "w_only":
        x1 = x2 = None
    z = lambda t, like: torch.zeros_like(like) if t is None else t  # noqa: E731
    want = linear_jet2_reference(x, w, b, z(x1, x.expand(3, *x.shape)), z(w1, w.expand(3, *w.shape)),
                                 z(x2, x.expand(3, *x.shape)), z(w2, w.expand(3, *w.shape)))
    got = linear_jet2(x, w, b, x1, w1, x2, w2)
    rtol, atol = KERNEL_VS_REFERENCE[torch.float64]
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=rtol, atol=atol)


def test_hash_matches_known_values_and_rademacher_statistics() -> None:
    # lowbias32 reference values (computed with Python integers, independent of the tensor code)
    def py_hash(x: int) -> int:
        x &= 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = [0, 1, 2, 12345, 0xFFFFFFFF, 0x80000000]
    assert hash32(torch.tensor(xs)).tolist() == [py_hash(x) for x in xs]
    z = rademacher(3, 0, 100, 1000)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(z.mean())) < RADEMACHER_MEAN_BOUND
    agree = float((z == rademacher(4, 0, 100, 1000)).double().mean())
    assert abs(agree - 0.5) < RADEMACHER_AGREEMENT_BAND
    assert torch.equal(rademacher(3, 40, 10, 1000), z[40:50])  # any probe regenerates alone


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,n", [(1, 1), (3, 97), (5, 1025)])
@pytest.mark.parametrize("count", [0, 7])
def test_seeded_update_equals_update_with_stored_probes(backend: str, dtype, k: int, n: int, count: int) -> None:
    if backend not in seeded_family.available():
        pytest.skip(f"{backend} not built")
    g = torch.Generator().manual_seed(5)
    hz = torch.randn(k, n, generator=g, dtype=dtype)
    mean0, m20 = torch.randn(n, generator=g, dtype=dtype), torch.rand(n, generator=g, dtype=dtype)
    want = [mean0.clone(), m20.clone()]
    hutchinson_update_(*want, rademacher(11, 3, k, n, dtype=dtype), hz, count)
    got = [mean0.clone(), m20.clone()]
    assert hutchinson_update_seeded_(*got, hz, seed=11, first_probe=3, count=count, backend=backend) == backend
    rtol, atol = KERNEL_VS_REFERENCE[dtype]
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(got[1], want[1], rtol=rtol, atol=atol)


def test_seeded_hutchinson_estimates_a_known_diagonal() -> None:
    """H = A (dense, diag known): the running mean of z ⊙ Az over regenerated probes tends to diag(A)."""
    g = torch.Generator().manual_seed(9)
    n, probes = 6, 4000
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = a + a.T
    mean, m2 = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for first in range(0, probes, 500):
        z = rademacher(21, first, 500, n)
        hutchinson_update_seeded_(mean, m2, z @ a, seed=21, first_probe=first, count=first)
    stderr = (m2 / (probes - 1) / probes).sqrt()
    assert ((mean - a.diagonal()).abs() < 5 * stderr + 1e-12).all()


@needs_ext
def test_seeded_cpp_opcheck() -> None:
    hz = torch.randn(3, 11, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fasthess.hutchinson_update_seeded_.default,
                          (torch.zeros(11, dtype=torch.float64), torch.zeros(11, dtype=torch.float64), hz, 5, 2, 4))


def test_explicit_unavailable_backend_raises() -> None:
    with pytest.raises(BackendUnavailableError):
        onehot_family.select("cuda")


@pytest.mark.parametrize("case_name", ["mlp", "attention", "encoder"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_sampled_diag_identical_for_every_onehot_backend(backend: str, case_name: str, monkeypatch) -> None:
    """The tangent-adjoint engine's one-hot weight tangents through each backend give the same entries."""
    import fasthess
    import zoo

    case = getattr(zoo, case_name)()
    if backend not in onehot_family.available():
        with pytest.raises(BackendUnavailableError):
            fasthess.diag(case.model, case.loss, case.layers, num_samples=20, backend=backend)
        return
    calls = []
    ok, fn = onehot_family.backends[backend]
    monkeypatch.setitem(onehot_family.backends, backend, (ok, lambda *a: calls.append(1) or fn(*a)))
    got = fasthess.diag(case.model, case.loss, case.layers, num_samples=20, engine="tangent_adjoint", backend=backend)
    want = fasthess.diag(case.model, case.loss, case.layers, num_samples=20, engine="tangent_adjoint", backend="torch")
    assert got.meta["backend"] == backend and want.meta["backend"] == "torch"
    assert calls, f"the {backend} kernel was never called"
    for name in want:
        assert torch.equal(got[name].indices, want[name].indices)
        torch.testing.assert_close(got[name].values, want[name].values, rtol=1e-12, atol=1e-14)


# --- GPU backends (triton, cuda) as far as a CPU can check them: bit-identical probes on every CPU backend,
# device registration, the Triton kernels under TRITON_INTERPRET=1 and compiled to PTX for sm_90 ---

PROBE_STREAMS = [(0, 0), (11, 3), (2**40 + 7, 2**32 - 2), (-5, 9)]  # seeds / first probes past 32 bits wrap


def probe_of(backend: str, seed: int, first_probe: int, n: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Probe ``first_probe`` of ``seed`` as a backend draws it: one sample with ``hz = 1`` into empty statistics
    leaves ``mean = z`` exactly."""
    mean, m2 = torch.zeros(n, dtype=dtype, device=device), torch.zeros(n, dtype=dtype, device=device)
    hz = torch.ones(1, n, dtype=dtype, device=device)
    hutchinson_update_seeded_(mean, m2, hz, seed, first_probe, 0, backend=backend)
    return mean


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_cpu_backends_draw_bit_identical_probes(backend: str) -> None:
    if backend not in seeded_family.available():
        pytest.skip(f"{backend} not built")
    for seed, first in PROBE_STREAMS:
        assert torch.equal(probe_of(backend, seed, first, 1025), rademacher(seed, first, 1, 1025)[0]), (seed, first)


def test_gpu_backends_registered_for_cuda_tensors_only() -> None:
    from fasthess.kernels.hutchinson import family as plain_family

    for fam in (onehot_family, seeded_family, plain_family):
        assert list(fam.backends)[:3] == ["triton", "cuda", "cpp"], fam.name  # "auto" order
        assert fam.devices["triton"] == fam.devices["cuda"] == ("cuda",) and fam.devices["cpp"] == ("cpu",)
        assert fam.select("auto", "cpu")[0] == ("cpp" if "cpp" in fam.available() else "torch")
        for backend in ("triton", "cuda"):  # no GPU here, or CPU tensors
            with pytest.raises(BackendUnavailableError):
                fam.select(backend, "cpu")
    if not torch.cuda.is_available():
        assert seeded_family.select("auto", "cuda")[0] == "torch"
    if "cpp" in plain_family.available():  # the CPU kernel no longer takes (and quietly mishandles) CUDA tensors
        with pytest.raises(BackendUnavailableError, match="runs on"):
            plain_family.select("cpp", "cuda")


_INTERPRET_SCRIPT = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
sys.path.insert(0, {tests!r})
import torch
from tolerances import KERNEL_VS_REFERENCE
from test_kernels_linear import PROBE_STREAMS, _coords
from fasthess.kernels.linear.reference import hutchinson_update_seeded_, onehot_weight_tangent, rademacher
from fasthess.kernels.linear.triton_kernels import hutchinson_update_seeded_triton, onehot_weight_tangent_triton
ok = 0
for seed, first in PROBE_STREAMS:  # probes bit-identical to the reference hash
    mean, m2 = torch.zeros(1025, dtype=torch.float64), torch.zeros(1025, dtype=torch.float64)
    hutchinson_update_seeded_triton(mean, m2, torch.ones(1, 1025, dtype=torch.float64), seed, first, 0)
    assert torch.equal(mean, rademacher(seed, first, 1, 1025)[0]), (seed, first)
    ok += 1
for dtype in (torch.float32, torch.float64):
    rtol, atol = KERNEL_VS_REFERENCE[dtype]
    for n in (1, 97, 1025):
        for k in (1, 3):
            for count in (0, 7):
                g = torch.Generator().manual_seed(n + k)
                hz = torch.randn(k, n, generator=g, dtype=dtype)
                mean0, m20 = torch.randn(n, generator=g, dtype=dtype), torch.rand(n, generator=g, dtype=dtype)
                want, got = [mean0.clone(), m20.clone()], [mean0.clone(), m20.clone()]
                hutchinson_update_seeded_(*want, hz, 11, 3, count)
                hutchinson_update_seeded_triton(*got, hz, 11, 3, count)
                for a, b in zip(got, want):
                    what = f"seeded {{dtype}} {{k}} {{n}} {{count}}"
                    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{{what}}: {{m}}")
                ok += 1
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    for xshape, out, kk in [((1, 5), 3, 4), ((97, 6), 130, 5), ((2, 3, 7), 17, 9)]:  # 130: a partial column tile
        x = torch.randn(xshape, generator=torch.Generator().manual_seed(1)).to(dtype)
        rows, cols = _coords(kk, out, xshape[-1])
        rows[0] = -1
        got, want = onehot_weight_tangent_triton(x, rows, cols, out), onehot_weight_tangent(x, rows, cols, out)
        assert got.shape == want.shape and got.dtype == dtype and torch.equal(got, want), (dtype, xshape, out)
        ok += 1
print("ok", ok)
"""


def test_triton_kernels_under_interpreter() -> None:
    stdout = run_interpreted(_INTERPRET_SCRIPT.format(tests=os.path.join(ROOT, "tests")))
    assert "ok 37" in stdout  # 4 probe streams, 24 seeded cases, 9 one-hot cases


def _compile_sm90(kernel, signature: dict, constexprs: dict) -> str:
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    sig = signature | {c: "constexpr" for c in constexprs}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(c),): v for c, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]


@pytest.mark.parametrize("acc,base", [("fp32", "i32"), ("fp64", "i64")])  # a base below 2^31 is passed as i32
def test_triton_seeded_kernel_compiles_to_ptx_for_sm90(acc: str, base: str) -> None:
    pytest.importorskip("triton")
    import triton.language as tl

    from fasthess.kernels.linear.triton_kernels import BLOCK, _seeded_update_kernel as kernel

    sig = {"MEAN": f"*{acc}", "M2": f"*{acc}", "HZ": "*fp32", "N": "i64", "K": "i32", "BASE": base, "count": "i64"}
    ptx = _compile_sm90(kernel, sig, dict(ACC=getattr(tl, "float64" if acc == "fp64" else "float32"), BLOCK=BLOCK))
    assert ".target sm_90" in ptx and ".entry _seeded_update_kernel" in ptx
    assert "shr.u32" in ptx and "shr.s32" not in ptx  # the hash's shifts are logical (uint32), as in C++


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp64"])
def test_triton_onehot_kernel_compiles_to_ptx_for_sm90(dtype: str) -> None:
    pytest.importorskip("triton")
    from fasthess.kernels.linear.triton_kernels import _onehot_kernel as kernel

    sig = {"X": f"*{dtype}", "ROWS": "*i64", "COLS": "*i64", "Y": f"*{dtype}", "KM": "i64", "M": "i64", "IN": "i32",
           "OUT": "i32"}
    ptx = _compile_sm90(kernel, sig, dict(BLOCK_R=32, BLOCK_O=128))
    assert ".target sm_90" in ptx and ".entry _onehot_kernel" in ptx
