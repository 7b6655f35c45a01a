"""Cross-entropy 2-jet: every backend against the nested-jvp reference and a dense float64 check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import KERNEL_VS_REFERENCE

from fasthess.kernels.loss import cross_entropy_jet2, cross_entropy_jet2_reference, family

DTYPE_TOL = {torch.float64: KERNEL_VS_REFERENCE[torch.float64], torch.float32: (1e-4, 1e-5)}


def _inputs(k: int, n: int, v: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[n // 2] = -100  # one ignored row
    z1, z2 = (torch.randn(k, n, v, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    return z, y, z1, z2


def test_reference_matches_dense_hessian() -> None:
    """loss2 = z1ᵀ H z1 + g·z2 with H and g of the loss as a function of the flattened logits."""
    z, y, z1, z2 = _inputs(2, 5, 4, torch.float64)
    f = lambda a: F.cross_entropy(a.view(5, 4), y)  # noqa: E731
    h = torch.autograd.functional.hessian(f, z.reshape(-1))
    g = torch.func.grad(f)(z.reshape(-1))
    want2 = torch.stack([t1.reshape(-1) @ h @ t1.reshape(-1) + g @ t2.reshape(-1) for t1, t2 in zip(z1, z2)])
    _, l1, l2 = cross_entropy_jet2_reference(z, y, z1, z2)
    torch.testing.assert_close(l2, want2)
    torch.testing.assert_close(l1, torch.stack([g @ t.reshape(-1) for t in z1]))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k,n,v", [(1, 1, 1), (2, 3, 97), (3, 4, 1025)])
def test_backends_match_reference(backend: str, dtype, k: int, n: int, v: int) -> None:
    if backend not in family.available():
        pytest.skip(f"{backend} not built")
    x = _inputs(k, n, v, dtype)
    if n == 1:
        x[1][0] = 0  # the single row must count
    want = cross_entropy_jet2_reference(*(t.double() if t.is_floating_point() else t for t in x))
    got = cross_entropy_jet2(*x, backend=backend)
    rtol, atol = DTYPE_TOL[dtype]
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b.to(dtype), rtol=rtol, atol=atol)


@pytest.mark.skipif("cpp" not in family.available(), reason="C++ extension not built")
def test_cpp_opcheck_and_errors() -> None:
    z, y, z1, z2 = _inputs(2, 3, 5, torch.float64)
    torch.library.opcheck(torch.ops.fasthess.cross_entropy_jet2.default, (z, y, z1, z2, -100))
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.fasthess.cross_entropy_jet2(z, torch.tensor([0, 5, 1]), z1, z2, -100)
    with pytest.raises(ValueError, match="need z"):
        cross_entropy_jet2(z, y, z1[:, :2], z2)
