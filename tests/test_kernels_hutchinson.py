"""The fused Hutchinson accumulation: every backend against the pure-torch reference."""

from __future__ import annotations

import os

import pytest
import torch
from tolerances import KERNEL_VS_REFERENCE
from triton_interpreter import ROOT, run_interpreted

from fasthess.errors import BackendUnavailableError
from fasthess.kernels.hutchinson import family, hutchinson_update_
from fasthess.kernels.hutchinson.reference import hutchinson_update_ as reference
from fasthess.kernels.registry import KernelFamily, extension_loaded

needs_ext = pytest.mark.skipif(not extension_loaded(), reason="C++ extension not built")


def test_extension_built_when_required() -> None:
    """scripts/test.sh sets FASTHESS_REQUIRE_EXT=1, so a silently failed build cannot pass CI."""
    if os.environ.get("FASTHESS_REQUIRE_EXT") != "1":
        pytest.skip("FASTHESS_REQUIRE_EXT is not set")
    assert extension_loaded(), "the C++ extension did not build; see the pip install log"


def _inputs(k: int, n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(0, 2, (k, n), generator=g).to(dtype) * 2 - 1
    hz = torch.randn(k, n, generator=g, dtype=dtype)
    mean = torch.randn(n, generator=g, dtype=dtype)
    m2 = torch.rand(n, generator=g, dtype=dtype)
    return mean, m2, z, hz


def test_reference_equals_two_pass_statistics() -> None:
    """Merging batches of any size reproduces the mean and M2 of all samples at once."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(13, 7, generator=g, dtype=torch.float64)
    hz = torch.randn(13, 7, generator=g, dtype=torch.float64)
    mean, m2 = torch.zeros(7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    done = 0
    for k in (1, 5, 2, 5):
        reference(mean, m2, z[done : done + k], hz[done : done + k], done)
        done += k
    s = z * hz
    torch.testing.assert_close(mean, s.mean(0))
    torch.testing.assert_close(m2, ((s - s.mean(0)) ** 2).sum(0))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,n", [(1, 1), (3, 97), (5, 1025), (2, 5000)])
@pytest.mark.parametrize("count", [0, 7])
def test_cpp_matches_reference(k: int, n: int, count: int, dtype: torch.dtype) -> None:
    want = _inputs(k, n, dtype)
    got = [t.clone() for t in want]
    reference(*want, count)
    assert hutchinson_update_(*got, count, backend="cpp") == "cpp"
    rtol, atol = KERNEL_VS_REFERENCE[dtype]
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(got[1], want[1], rtol=rtol, atol=atol)


@needs_ext
def test_cpp_rejects_bad_shapes() -> None:
    mean, m2, z, hz = _inputs(2, 5, torch.float64)
    with pytest.raises(RuntimeError, match="\\(k, n\\)"):
        torch.ops.fasthess.hutchinson_update_(mean, m2, z[:, :4], hz[:, :4], 0)


@needs_ext
def test_opcheck() -> None:
    mean, m2, z, hz = _inputs(3, 11, torch.float64)
    torch.library.opcheck(torch.ops.fasthess.hutchinson_update_.default, (mean, m2, z, hz, 4))


def test_registry_auto_falls_back_and_explicit_raises() -> None:
    fam = KernelFamily("demo")
    fam.register("fast", available=lambda: False)(lambda: "fast")
    fam.register("torch", available=lambda: True)(lambda: "torch")
    assert fam.select("auto")[0] == "torch"
    with pytest.raises(BackendUnavailableError, match="not available"):
        fam.select("fast")
    with pytest.raises(BackendUnavailableError, match="no backend 'cuda'"):
        fam.select("cuda")
    assert "torch" in family.available()


def test_registry_dtypes_and_exclude() -> None:
    fam = KernelFamily("demo")
    fam.register("fast", available=lambda: True, dtypes=(torch.float32,))(lambda: "fast")
    fam.register("torch", available=lambda: True)(lambda: "torch")
    assert fam.select("auto", dtype=torch.float32)[0] == "fast"
    assert fam.select("auto", dtype=torch.float64)[0] == "torch"  # auto passes over a backend for other dtypes
    assert fam.select("auto", dtype=torch.float32, exclude=("fast",))[0] == "torch"
    assert fam.select("fast", dtype=torch.float32, exclude=("fast",))[0] == "fast"  # explicit wins
    with pytest.raises(TypeError, match="takes"):
        fam.select("fast", dtype=torch.float64)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_backends_give_the_same_diag_end_to_end(backend: str) -> None:
    import fasthess
    from zoo import mlp

    if backend not in family.available():
        with pytest.raises(BackendUnavailableError):
            hutchinson_update_(*_inputs(1, 1, torch.float64), 0, backend=backend)
        return
    case = mlp()
    a = fasthess.diag(case.model, case.loss, method="hutchinson", num_probes=9, backend=backend)
    b = fasthess.diag(case.model, case.loss, method="hutchinson", num_probes=9, backend="torch")
    assert a.meta["backend"] == backend
    for name in a:
        torch.testing.assert_close(a[name].values, b[name].values, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a[name].stderr, b[name].stderr, rtol=1e-12, atol=1e-14)


# --- the Triton kernel (a GPU backend) as far as a CPU can check it: under TRITON_INTERPRET=1 and compiled
# to PTX for sm_90; the CUDA kernel is compiled by tests/test_kernels_attention.py ---

_INTERPRET_SCRIPT = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
sys.path.insert(0, {tests!r})
import torch
from tolerances import KERNEL_VS_REFERENCE
from test_kernels_hutchinson import _inputs
from fasthess.kernels.hutchinson.reference import hutchinson_update_
from fasthess.kernels.hutchinson.triton_kernels import hutchinson_update_triton
ok = 0
for dtype in (torch.float32, torch.float64):
    rtol, atol = KERNEL_VS_REFERENCE[dtype]
    for n in (1, 97, 1025):
        for k in (1, 3):
            for count in (0, 7):
                want = _inputs(k, n, dtype, seed=n + k)
                got = [t.clone() for t in want]
                hutchinson_update_(*want, count)
                hutchinson_update_triton(*got, count)
                for a, b in zip(got[:2], want[:2]):
                    what = f"{{dtype}} {{k}} {{n}} {{count}}"
                    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{{what}}: {{m}}")
                ok += 1
# float32 samples into float64 statistics (the estimators' case): converted on load, as the cpp backend does
mean, m2, z, hz = _inputs(3, 97, torch.float64)
want, got = [mean.clone(), m2.clone()], [mean.clone(), m2.clone()]
hutchinson_update_(*want, z, hz.float().double(), 5)
hutchinson_update_triton(*got, z.float(), hz.float(), 5)
torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
print("ok", ok + 1)
"""


def test_triton_kernel_under_interpreter() -> None:
    stdout = run_interpreted(_INTERPRET_SCRIPT.format(tests=os.path.join(ROOT, "tests")))
    assert "ok 25" in stdout  # 24 shapes, dtypes and counts + mixed dtypes


def test_triton_kernel_rejects_statistics_it_cannot_update_in_place() -> None:
    pytest.importorskip("triton")
    from fasthess.kernels.hutchinson.triton_kernels import hutchinson_update_triton

    mean, m2, z, hz = _inputs(2, 6, torch.float64)
    with pytest.raises(ValueError, match="contiguous"):
        hutchinson_update_triton(torch.zeros(12, dtype=torch.float64)[::2], m2, z, hz, 0)
    with pytest.raises(ValueError, match="hz must be"):
        hutchinson_update_triton(mean, m2, z[:, :4], hz[:, :4], 0)


@pytest.mark.parametrize("acc,samples", [("fp32", "fp32"), ("fp64", "fp32"), ("fp64", "fp64")])
def test_triton_kernel_compiles_to_ptx_for_sm90(acc: str, samples: str) -> None:
    triton = pytest.importorskip("triton")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fasthess.kernels.hutchinson.triton_kernels import BLOCK, _hutchinson_update_kernel as kernel

    const = dict(ACC=tl.float64 if acc == "fp64" else tl.float32, BLOCK=BLOCK)
    sig = {"MEAN": f"*{acc}", "M2": f"*{acc}", "Z": f"*{samples}", "HZ": f"*{samples}", "N": "i32", "K": "i32",
           "count": "i32"} | {c: "constexpr" for c in const}
    names = kernel.arg_names
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(c),): v for c, v in const.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    assert ".target sm_90" in ptx and ".entry _hutchinson_update_kernel" in ptx
