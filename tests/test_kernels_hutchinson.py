"""The fused Hutchinson accumulation: every backend against the pure-torch reference."""

from __future__ import annotations

import os

import pytest
import torch
from tolerances import KERNEL_VS_REFERENCE

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
