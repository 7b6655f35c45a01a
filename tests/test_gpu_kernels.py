"""Attention, layer-norm and GELU 2-jet GPU backends (CUDA and Triton kernels) against the float64 reference (run by benchmarks/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch
from attention_cases import MASKS, SHAPES, inputs, padding
from tolerances import ATTENTION_JET2_TF32_VS_REFERENCE, ATTENTION_JET2_VS_REFERENCE, ATTENTION_TF32X3_VS_IEEE_ERROR

from fasthess.kernels.attention import attention_jet2, family, select_backend
from fasthess.kernels.attention.reference import attention_jet2 as reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

GPU_SHAPES = SHAPES + [(1, 2, 1025, 1025, 64, 2), (2, 2, 300, 300, 128, 3), (1, 1, 64, 64, 200, 1)]
# cuda-rowwise: the CUDA fallback kernel (one warp per row), forced through its environment switch;
# triton: at precision "tf32x3", held to the exact-float32 tolerance
CASES = [("cuda", torch.float32), ("cuda", torch.float64), ("cuda-rowwise", torch.float32),
         ("cuda-rowwise", torch.float64), ("triton", torch.float32)]


def _attention_backend(backend: str, shape, monkeypatch) -> str:
    """The family's name for a ``CASES`` backend (``cuda-rowwise``: the CUDA kernel forced onto its row-wise
    path); fails if it is not built here, skips head dims the Triton tiles cannot take."""
    if backend == "cuda-rowwise":
        monkeypatch.setenv("FASTHESS_CUDA_ATTENTION_ROWWISE", "1")
        backend = "cuda"
    if backend not in family.available():
        pytest.fail(f"backend {backend!r} is not available on this GPU machine (available: {family.available()})")
    if backend == "triton" and shape[4] > 128:
        pytest.skip("head dim > 128: the triton tiles would not fit in shared memory")
    return backend


@pytest.mark.parametrize("backend,dtype", CASES, ids=lambda c: str(c).replace("torch.", ""))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("causal,padded", MASKS)
def test_gpu_backend_matches_reference(backend: str, dtype, shape, causal: bool, padded: bool, monkeypatch) -> None:
    backend = _attention_backend(backend, shape, monkeypatch)
    x = inputs(*shape, dtype, device="cuda")
    pad = padding(shape[0], shape[3], "cuda") if padded else None
    want = reference(*inputs(*shape, torch.float64, device="cuda"), causal=causal, key_padding_mask=pad)
    got = attention_jet2(*x, causal=causal, key_padding_mask=pad, backend=backend, precision="tf32x3")
    torch.cuda.synchronize()
    rtol, atol = ATTENTION_JET2_VS_REFERENCE[dtype]
    for name, a, b in zip(("o", "o1", "o2"), got, want):
        assert a.dtype == dtype and a.device.type == "cuda"
        torch.testing.assert_close(a, b.to(dtype), rtol=rtol, atol=atol, msg=lambda m: f"{backend} {shape} {name}: {m}")


def test_triton_precisions_at_1025() -> None:
    """precision="tf32x3" meets the float32 tolerance and stays within a small factor of "ieee"'s error on
    the same inputs; "tf32" meets its own, looser tolerance. The shape and masks match the benchmark's
    (causal, no padding, D=64), whose rows triton-ieee / triton-tf32x3 / triton-tf32 reuse these compiles."""
    shape = (1, 2, 1025, 1025, 64, 2)
    x = inputs(*shape, torch.float32, device="cuda")
    want = reference(*inputs(*shape, torch.float64, device="cuda"), causal=True)
    worst = {}
    for precision in ("ieee", "tf32x3", "tf32"):
        got = attention_jet2(*x, causal=True, backend="triton", precision=precision)
        torch.cuda.synchronize()
        rtol, atol = ATTENTION_JET2_TF32_VS_REFERENCE if precision == "tf32" else ATTENTION_JET2_VS_REFERENCE[torch.float32]
        for name, a, b in zip(("o", "o1", "o2"), got, want):
            torch.testing.assert_close(a, b.float(), rtol=rtol, atol=atol, msg=lambda m: f"{precision} {name}: {m}")
        worst[precision] = max(float((a.double() - b).abs().max()) for a, b in zip(got, want))
    print("largest |error| by precision:", worst)
    assert worst["tf32x3"] <= ATTENTION_TF32X3_VS_IEEE_ERROR * worst["ieee"], worst


def test_auto_picks_a_compiled_gpu_backend() -> None:
    """float32: the exact CUDA kernel at the default "ieee", Triton on the tensor cores at "tf32x3"."""
    assert select_backend("auto", "cuda", torch.float32)[0] == "cuda"
    assert select_backend("auto", "cuda", torch.float32, "tf32x3")[0] == "triton"
    assert select_backend("auto", "cuda", torch.float64)[0] == "cuda"
    assert select_backend("auto", "cuda", torch.bfloat16)[0] == "triton"


def test_cuda_backends_are_built() -> None:
    """gpu_check.sh builds the extension against the CUDA torch: the CUDA kernels must be there."""
    from fasthess.kernels import gelu, layer_norm

    for fam in (family, layer_norm.family, gelu.family):
        assert "cuda" in fam.available(), f"the CUDA {fam.name} kernel did not build (available: {fam.available()})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("lead,d,n,affine", [((1,), 1, 1, True), ((8, 33), 97, 3, True), ((300,), 1025, 2, False),
                                             ((2, 64), 4096, 2, True)], ids=str)
def test_triton_layer_norm_matches_reference(dtype, lead, d: int, n: int, affine: bool) -> None:
    from test_kernels_layer_norm import EPS, _close, inputs

    from fasthess.kernels import layer_norm

    assert layer_norm.family.select("auto", "cuda")[0] == "triton"
    want = layer_norm.layer_norm_jet2_reference(*inputs(lead, d, n, torch.float64, affine), EPS)
    got = layer_norm.layer_norm_jet2(*[t if t is None else t.cuda() for t in inputs(lead, d, n, dtype, affine)], EPS)
    torch.cuda.synchronize()
    _close([t.cpu() for t in got], want, dtype, f"triton layer norm {lead} D={d}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape,n", [((1,), 1), ((3, 1025), 2), ((64, 4099), 4)], ids=str)
def test_triton_gelu_matches_reference(dtype, approximate: str, shape, n: int) -> None:
    from test_kernels_gelu import _close, inputs

    from fasthess.kernels import gelu

    assert gelu.family.select("auto", "cuda")[0] == "triton"
    want = gelu.gelu_jet2_reference(*inputs(shape, n, torch.float64), approximate)
    got = gelu.gelu_jet2(*[t.cuda() for t in inputs(shape, n, dtype)], approximate)
    torch.cuda.synchronize()
    _close([t.cpu() for t in got], want, dtype, f"triton gelu {shape} {approximate}")


# D = 1 and 97: the warp-per-row kernel (D <= 512: 1, 4 and 16 values per lane at 1, 97, 512);
# 513, 1025, 4096: the block-per-row kernel
LAYER_NORM_CUDA_CASES = [((1,), 1, 1, True), ((8, 33), 97, 3, True), ((5,), 512, 2, True), ((3,), 513, 1, False),
                         ((300,), 1025, 2, False), ((2, 64), 4096, 2, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("lead,d,n,affine", LAYER_NORM_CUDA_CASES, ids=str)
def test_cuda_layer_norm_matches_reference(dtype, lead, d: int, n: int, affine: bool) -> None:
    from test_kernels_layer_norm import EPS, _close, inputs

    from fasthess.kernels import layer_norm

    want = layer_norm.layer_norm_jet2_reference(*inputs(lead, d, n, torch.float64, affine), EPS)
    x = [t if t is None else t.cuda() for t in inputs(lead, d, n, dtype, affine)]
    got = layer_norm.layer_norm_jet2(*x, EPS, backend="cuda")
    torch.cuda.synchronize()
    _close([t.cpu() for t in got], want, dtype, f"cuda layer norm {lead} D={d}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape,n", [((1,), 1), ((3, 1025), 2), ((97,), 3), ((64, 4099), 4)], ids=str)
def test_cuda_gelu_matches_reference(dtype, approximate: str, shape, n: int) -> None:
    from test_kernels_gelu import _close, inputs

    from fasthess.kernels import gelu

    want = gelu.gelu_jet2_reference(*inputs(shape, n, torch.float64), approximate)
    got = gelu.gelu_jet2(*[t.cuda() for t in inputs(shape, n, dtype)], approximate, backend="cuda")
    torch.cuda.synchronize()
    _close([t.cpu() for t in got], want, dtype, f"cuda gelu {shape} {approximate}")


def test_cuda_pointwise_opcheck_and_errors() -> None:
    """Schema, fake (meta) functions and the shared input checks (csrc/jet2_checks.h) of the CUDA ops."""
    from test_kernels_gelu import inputs as gelu_inputs
    from test_kernels_layer_norm import EPS, inputs as ln_inputs

    x, w, b, x1, x2 = (t.cuda() for t in ln_inputs((2, 3), 7, 2, torch.float32))
    torch.library.opcheck(torch.ops.fasthess.layer_norm_jet2.default, (x, w, b, x1, x2, EPS))
    torch.library.opcheck(torch.ops.fasthess.layer_norm_jet2.default, (x, None, None, x1, x2, EPS))
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.fasthess.layer_norm_jet2(x, w[:3], b, x1, x2, EPS)
    with pytest.raises(RuntimeError, match="takes float32 or float64"):
        torch.ops.fasthess.layer_norm_jet2(x.half(), None, None, x1.half(), x2.half(), EPS)
    g, g1, g2 = (t.cuda() for t in gelu_inputs((2, 5), 2, torch.float64))
    torch.library.opcheck(torch.ops.fasthess.gelu_jet2.default, (g, g1, g2, "tanh"))
    with pytest.raises(RuntimeError, match=r"x1 and x2 must be \(N, \*x.shape\)"):
        torch.ops.fasthess.gelu_jet2(g, g1[:, :1], g2, "none")


# --- attention HVP (fasthess/kernels/attention_hvp): Triton kernels and the fwd_rev route ---

HVP_GPU_SHAPES = [(1, 1, 1, 1, 4, 1), (2, 3, 7, 7, 5, 3), (2, 2, 11, 5, 4, 2), (1, 2, 1025, 1025, 64, 2),
                  (2, 2, 300, 300, 128, 3)]


@pytest.mark.parametrize("shape", HVP_GPU_SHAPES, ids=str)
@pytest.mark.parametrize("causal,padded", MASKS)
def test_triton_attention_hvp_matches_reference(shape, causal: bool, padded: bool) -> None:
    from attention_cases import hvp_inputs
    from tolerances import ATTENTION_HVP_VS_REFERENCE

    from fasthess.kernels.attention_hvp import attention_hvp, family as hvp_family
    from fasthess.kernels.attention_hvp.reference import attention_hvp as hvp_reference

    if "triton" not in hvp_family.available():
        pytest.fail(f"the triton attention HVP backend is not available (available: {hvp_family.available()})")
    x = hvp_inputs(*shape, torch.float32, device="cuda")
    pad = padding(shape[0], shape[3], "cuda") if padded else None
    want = hvp_reference(*hvp_inputs(*shape, torch.float64, device="cuda"), causal=causal, key_padding_mask=pad)
    got = attention_hvp(*x, causal=causal, key_padding_mask=pad, backend="triton")
    torch.cuda.synchronize()
    rtol, atol = ATTENTION_HVP_VS_REFERENCE[torch.float32]
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == torch.float32 and a.device.type == "cuda"
        torch.testing.assert_close(a, b.float(), rtol=rtol, atol=atol, msg=lambda m: f"{shape} output {i}: {m}")


@pytest.mark.parametrize("backend,dtype", [("triton", torch.float32), ("cuda", torch.float64)])
def test_fwd_rev_hutchinson_routed_through_gpu_kernel_equals_double_backward(backend: str, dtype, monkeypatch) -> None:
    """The zoo SDPA model on the GPU: fwd_rev with attention routed through the Triton (float32) or CUDA
    (float64) HVP kernel gives the double-backward engine's estimate with the same probes (round-off only)."""
    import fasthess
    from tolerances import SAME_PROBES_RTOL
    from zoo import ZOO

    from fasthess.kernels.attention_hvp import forward_over_reverse as route_module
    from fasthess.kernels.registry import use_backend

    model = ZOO["sdpa"]().model.to(dtype).cuda()
    layers = ["qkv.weight", "proj.weight"]
    ids = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(1)).cuda()

    def loss():
        return torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())

    kw = dict(method="hutchinson", num_probes=6, seed=11)
    plain = fasthess.diag(model, loss, layers, engine="double_backward", **kw)
    calls = []
    original = route_module._hvp
    monkeypatch.setattr(route_module, "_hvp", lambda *a: calls.append(1) or original(*a))
    with use_backend(backend):
        routed = fasthess.diag(model, loss, layers, engine="fwd_rev", **kw)
    assert calls, "the route was not taken"
    assert routed.meta["kernels"]["attention_hvp"] == backend
    rtol = 1e-3 if dtype == torch.float32 else SAME_PROBES_RTOL
    atol_scale = 1e-4 if dtype == torch.float32 else SAME_PROBES_RTOL
    for name in plain.layers:
        a, b = routed.layers[name].values, plain.layers[name].values
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol_scale * float(b.abs().max()), msg=lambda m: f"{name}: {m}")


# --- linear / Hutchinson kernels (fasthess/kernels/linear, fasthess/kernels/hutchinson): Triton and CUDA ---

LINEAR_GPU_BACKENDS = ["triton", "cuda"]


def _linear_families():
    from fasthess.kernels import hutchinson, linear

    return linear.onehot_family, linear.seeded_family, hutchinson.family


def test_linear_gpu_backends_available_and_auto_picks_triton() -> None:
    for fam in _linear_families():
        for backend in LINEAR_GPU_BACKENDS:
            assert backend in fam.available(), f"{backend} {fam.name} is not available (available: {fam.available()})"
        assert fam.select("auto", "cuda", torch.float64)[0] == "triton"


@pytest.mark.parametrize("backend", LINEAR_GPU_BACKENDS)
def test_gpu_probes_bit_identical_to_the_cpu(backend: str) -> None:
    """A probe regenerated on the GPU (float32 and float64 statistics) is the CPU's, bit for bit."""
    from test_kernels_linear import PROBE_STREAMS, probe_of

    from fasthess.kernels.linear import rademacher

    for seed, first in PROBE_STREAMS:
        want = rademacher(seed, first, 1, 4099)[0]  # the CPU reference; the cpp kernel is checked against it
        for dtype in (torch.float32, torch.float64):
            got = probe_of(backend, seed, first, 4099, dtype=dtype, device="cuda").cpu()
            assert torch.equal(got, want.to(dtype)), (backend, seed, first, dtype)
        assert torch.equal(rademacher(seed, first, 1, 4099, device="cuda").cpu()[0], want)  # the torch path on the GPU


SEEDED_GPU_SHAPES = [(1, 1), (3, 97), (5, 1025), (8, 300_001)]


@pytest.mark.parametrize("backend", LINEAR_GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("k,n", SEEDED_GPU_SHAPES, ids=str)
@pytest.mark.parametrize("count", [0, 7])
def test_gpu_seeded_and_plain_updates_match_reference(backend: str, dtype, k: int, n: int, count: int) -> None:
    from tolerances import KERNEL_VS_REFERENCE

    from fasthess.kernels.hutchinson import hutchinson_update_
    from fasthess.kernels.hutchinson.reference import hutchinson_update_ as plain_reference
    from fasthess.kernels.linear import hutchinson_update_seeded_, rademacher

    g = torch.Generator().manual_seed(k + n)
    hz = torch.randn(k, n, generator=g, dtype=dtype)
    mean0, m20 = torch.randn(n, generator=g, dtype=dtype), torch.rand(n, generator=g, dtype=dtype)
    z = rademacher(11, 3, k, n, dtype=dtype)
    want = [mean0.clone(), m20.clone()]
    plain_reference(*want, z, hz, count)
    rtol, atol = KERNEL_VS_REFERENCE[dtype]
    seeded = [mean0.cuda(), m20.cuda()]
    assert hutchinson_update_seeded_(*seeded, hz.cuda(), 11, 3, count, backend=backend) == backend
    plain = [mean0.cuda(), m20.cuda()]
    assert hutchinson_update_(*plain, z.cuda(), hz.cuda(), count, backend=backend) == backend
    torch.cuda.synchronize()
    for what, got in (("seeded", seeded), ("plain", plain)):
        for name, a, b in zip(("mean", "m2"), got, want):
            torch.testing.assert_close(a.cpu(), b, rtol=rtol, atol=atol, msg=lambda m: f"{backend} {what} {name}: {m}")


@pytest.mark.parametrize("backend", LINEAR_GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("xshape,out,k", [((1, 1), 1, 1), ((1, 5), 3, 4), ((97, 6), 1025, 5), ((2, 5, 7), 130, 9),
                                          ((4099, 64), 64, 3)], ids=str)
def test_gpu_onehot_matches_reference(backend: str, dtype, xshape, out: int, k: int) -> None:
    from test_kernels_linear import _coords

    from fasthess.kernels.linear import onehot_weight_tangent, onehot_weight_tangent_reference

    x = torch.randn(xshape, generator=torch.Generator().manual_seed(1)).to(dtype)
    rows, cols = _coords(k, out, xshape[-1])  # rows[k // 2] = -1: a zero direction
    want = onehot_weight_tangent_reference(x, rows, cols, out)
    got = onehot_weight_tangent(x.cuda(), rows.cuda(), cols.cuda(), out, backend=backend)
    torch.cuda.synchronize()
    assert got.shape == want.shape and got.dtype == dtype and got.device.type == "cuda"
    assert torch.equal(got.cpu(), want)  # a copy: exact


def test_cuda_linear_opcheck_and_errors() -> None:
    """Schemas, fake functions and the input checks shared with the CPU ops (csrc/linear_checks.h)."""
    from test_kernels_linear import _coords

    x = torch.randn(3, 4, 5, dtype=torch.float64, device="cuda")
    rows, cols = (t.cuda() for t in _coords(6, 7, 5))
    torch.library.opcheck(torch.ops.fasthess.onehot_weight_tangent.default, (x, rows, cols, 7))
    with pytest.raises(RuntimeError, match="outside the \\(7, 5\\) weight"):
        torch.ops.fasthess.onehot_weight_tangent(x, torch.full_like(rows[:1], 7), torch.zeros_like(cols[:1]), 7)
    with pytest.raises(RuntimeError, match="on x's device"):
        torch.ops.fasthess.onehot_weight_tangent(x, rows.cpu(), cols.cpu(), 7)
    mean, m2 = torch.zeros(11, dtype=torch.float64, device="cuda"), torch.rand(11, dtype=torch.float64, device="cuda")
    z = torch.ones(3, 11, dtype=torch.float64, device="cuda")
    hz = torch.randn(3, 11, dtype=torch.float64, device="cuda")
    torch.library.opcheck(torch.ops.fasthess.hutchinson_update_seeded_.default, (mean, m2, hz, 5, 2, 4))
    torch.library.opcheck(torch.ops.fasthess.hutchinson_update_.default, (mean, m2, z, hz, 4))
    with pytest.raises(RuntimeError, match="\\(k, n\\)"):
        torch.ops.fasthess.hutchinson_update_(mean, m2, z[:, :4], hz[:, :4], 0)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.fasthess.hutchinson_update_seeded_(mean, m2, hz.float(), 5, 2, 4)
    with pytest.raises(RuntimeError, match="takes float32 or float64"):
        torch.ops.fasthess.hutchinson_update_seeded_(mean.half(), m2.half(), hz.half(), 5, 2, 4)


@pytest.mark.parametrize("backend", LINEAR_GPU_BACKENDS)
def test_diag_on_cuda_same_for_every_linear_backend(backend: str) -> None:
    """fasthess.diag on a CUDA MLP: Hutchinson (the accumulation) and sampled entries (one-hot weight tangents)
    through each GPU backend give the torch backend's result."""
    from tolerances import KERNEL_VS_REFERENCE

    import fasthess

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double().cuda()
    x, y = torch.randn(10, 7, dtype=torch.float64, device="cuda"), torch.randint(0, 3, (10,), device="cuda")

    def loss():
        return torch.nn.functional.cross_entropy(model(x), y)

    for kw in (dict(method="hutchinson", num_probes=9), dict(num_samples=20, engine="tangent_adjoint")):
        got = fasthess.diag(model, loss, backend=backend, **kw)
        want = fasthess.diag(model, loss, backend="torch", **kw)
        assert got.meta["backend"] == backend, (kw, got.meta)
        rtol, atol = KERNEL_VS_REFERENCE[torch.float64]
        for name in want:
            torch.testing.assert_close(got[name].values, want[name].values, rtol=rtol, atol=atol,
                                       msg=lambda m: f"{kw} {name}: {m}")


@pytest.mark.parametrize("backend", LINEAR_GPU_BACKENDS)
def test_gpu_seeded_update_stores_no_probes(backend: str) -> None:
    """The seeded kernels hash the probes in the pass over hz: the call allocates nothing (torch: the (k, n) probes)."""
    from fasthess.kernels.linear import hutchinson_update_seeded_

    k, n = 8, 1 << 20
    hz = torch.randn(k, n, dtype=torch.float64, device="cuda")
    mean, m2 = torch.zeros(n, dtype=torch.float64, device="cuda"), torch.zeros(n, dtype=torch.float64, device="cuda")
    hutchinson_update_seeded_(mean, m2, hz, 1, 0, 0, backend=backend)  # compile / warm up
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    hutchinson_update_seeded_(mean, m2, hz, 1, k, k, backend=backend)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() == base, torch.cuda.max_memory_allocated() - base


# --- cross-entropy 2-jet (fasthess/kernels/loss): Triton and CUDA kernels ---

# (K, N, V): a short row, several column blocks, the vocabulary scale (GPT-2's V; 64 rows: one tangent per
# program / block), and enough rows for 2 (K = 2) and 4 (K = 5, the last block partial) tangents per block
CE_GPU_SHAPES = [(1, 1, 1), (3, 97, 1025), (4, 64, 50257), (2, 300, 97), (5, 300, 97)]
CE_GPU_CASES = [("triton", torch.float32), ("triton", torch.float64), ("triton", torch.bfloat16),
                ("cuda", torch.float32), ("cuda", torch.float64)]


@pytest.mark.parametrize("backend,dtype", CE_GPU_CASES, ids=lambda c: str(c).replace("torch.", ""))
@pytest.mark.parametrize("k,n,v", CE_GPU_SHAPES, ids=str)
@pytest.mark.parametrize("second", [True, False], ids=["z2", "z2=None"])
def test_cross_entropy_gpu_backend_matches_reference(backend: str, dtype, k: int, n: int, v: int, second: bool) -> None:
    from test_kernels_loss import close, inputs

    from fasthess.kernels import loss

    if backend not in loss.family.available():
        pytest.fail(f"backend {backend!r} is not available on this GPU machine (available: {loss.family.available()})")
    z, y, z1, z2 = inputs(k, n, v, dtype, device="cuda", ignored=(0,) if n > 1 else ())
    # the reference on the rounded inputs in float64 (bfloat16 rounding would swamp the kernel's own error)
    want = loss.cross_entropy_jet2_reference(z.double(), y, z1.double(), z2.double() if second else None)
    got = loss.cross_entropy_jet2(z, y, z1, z2 if second else None, backend=backend)
    torch.cuda.synchronize()
    close(got, want, dtype, f"{backend} {k, n, v}")
    again = loss.cross_entropy_jet2(z, y, z1, z2 if second else None, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(got, again)), "not deterministic"


def test_cross_entropy_gpu_selection_opcheck_and_errors() -> None:
    """auto picks Triton; the CUDA op's schema, fake function and shared checks (csrc/jet2_checks.h); every row
    ignored gives NaN on both GPU backends, as the reference."""
    from test_kernels_loss import inputs

    from fasthess.kernels import loss

    assert "cuda" in loss.family.available(), f"the CUDA kernel did not build (available: {loss.family.available()})"
    assert loss.family.select("auto", "cuda", torch.float32)[0] == "triton"
    z, y, z1, z2 = inputs(2, 3, 5, torch.float32, device="cuda")
    torch.library.opcheck(torch.ops.fasthess.cross_entropy_jet2.default, (z, y, z1, z2, -100))
    torch.library.opcheck(torch.ops.fasthess.cross_entropy_jet2.default, (z, y, z1, None, -100))
    with pytest.raises(RuntimeError, match="takes float32 or float64"):
        torch.ops.fasthess.cross_entropy_jet2(z.half(), y, z1.half(), None, -100)
    with pytest.raises(RuntimeError, match="z2 must be None or of z1's shape"):
        torch.ops.fasthess.cross_entropy_jet2(z, y, z1, z2[:1], -100)
    with pytest.raises(ValueError, match="outside"):
        loss.cross_entropy_jet2(z, torch.tensor([0, 5, 1], device="cuda"), z1, z2)
    for backend in ("triton", "cuda"):
        got = loss.cross_entropy_jet2(z, torch.full_like(y, -100), z1, z2, backend=backend)
        assert all(t.isnan().all() for t in got), (backend, got)


# --- attention HVP: the CUDA kernels (csrc/cuda/attention_hvp.cu) ---

HVP_CUDA_SHAPES = HVP_GPU_SHAPES + [(1, 1, 64, 64, 200, 1), (2, 3, 130, 70, 33, 5)]  # D > 128; many tangents


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", HVP_CUDA_SHAPES, ids=str)
@pytest.mark.parametrize("causal,padded", MASKS)
def test_cuda_attention_hvp_matches_reference(dtype, shape, causal: bool, padded: bool) -> None:
    from attention_cases import hvp_inputs
    from tolerances import ATTENTION_HVP_VS_REFERENCE

    from fasthess.kernels.attention_hvp import attention_hvp, family as hvp_family
    from fasthess.kernels.attention_hvp.reference import attention_hvp as hvp_reference

    if "cuda" not in hvp_family.available():
        pytest.fail(f"the CUDA attention HVP backend is not available (available: {hvp_family.available()})")
    x = hvp_inputs(*shape, dtype, device="cuda")
    pad = padding(shape[0], shape[3], "cuda") if padded else None
    want = hvp_reference(*hvp_inputs(*shape, torch.float64, device="cuda"), causal=causal, key_padding_mask=pad)
    got = attention_hvp(*x, causal=causal, key_padding_mask=pad, backend="cuda")
    torch.cuda.synchronize()
    rtol, atol = ATTENTION_HVP_VS_REFERENCE[dtype]
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == dtype and a.device.type == "cuda"
        torch.testing.assert_close(a, b.to(dtype), rtol=rtol, atol=atol, msg=lambda m: f"{shape} output {i}: {m}")


def test_cuda_attention_hvp_opcheck_selection_and_errors() -> None:
    """Schema and fake function of the CUDA kernel, bitwise-repeatable results (no atomics), the backward
    only (N = 0), "auto" (triton first for float32, cuda for float64) and the shared input checks."""
    from attention_cases import hvp_inputs

    from fasthess.kernels.attention_hvp import attention_hvp, select_backend

    x = hvp_inputs(2, 2, 70, 75, 16, 3, torch.float64, device="cuda")
    keep = ~padding(2, 75, "cuda")
    op = torch.ops.fasthess.attention_hvp
    torch.library.opcheck(op.default, (*x, keep, True, 0.5))
    torch.library.opcheck(op.default, (*x, None, False, 0.5))
    first, again = op(*x, keep, True, 0.5), op(*x, keep, True, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    none = op(*x[:4], *(t[:0] for t in x[4:]), keep, True, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(none[:3], first[:3])) and none[3].shape[0] == 0
    assert select_backend("auto", "cuda", torch.float64)[0] == "cuda"
    assert select_backend("auto", "cuda", torch.float32)[0] == "triton"
    with pytest.raises(TypeError, match="takes"):
        attention_hvp(*(t.half() for t in x), backend="cuda")
    with pytest.raises(RuntimeError, match=r"k1, v1 must be \(N, \*k.shape\)"):
        op(*x[:5], x[5][:, :, :, :3], *x[6:], keep, True, 0.5)
    with pytest.raises(RuntimeError, match="takes float32 or float64"):
        op(*(t.half() for t in x), keep, True, 0.5)


# --- None tangents (zero, skipped) in the attention and layer-norm GPU kernels ---

ABSENT_GPU_SHAPES = SHAPES + [(1, 2, 1025, 1025, 64, 2), (2, 2, 300, 300, 128, 3)]


@pytest.mark.parametrize("backend,dtype", CASES, ids=lambda c: str(c).replace("torch.", ""))
@pytest.mark.parametrize("shape", ABSENT_GPU_SHAPES, ids=str)
@pytest.mark.parametrize("causal,padded", MASKS)
def test_gpu_backend_skips_absent_tangents(backend: str, dtype, shape, causal: bool, padded: bool, monkeypatch) -> None:
    """Every GPU kernel with None tangents (the fused rule's q2 = k2 = v2 = None, and first-order ones
    left out) against the reference with explicit zeros."""
    from test_kernels_attention import ABSENT, without

    backend = _attention_backend(backend, shape, monkeypatch)
    pad = padding(shape[0], shape[3], "cuda") if padded else None
    rtol, atol = ATTENTION_JET2_VS_REFERENCE[dtype]
    # the fused rule's calls everywhere (second order absent; also k1, v1); every mixed case on one shape and
    # mask (each pattern is a Triton compile of its own)
    mixed = shape == SHAPES[1] and causal and padded
    for absent in ABSENT if mixed else (ABSENT[0], ABSENT[3]):
        want = reference(*without(inputs(*shape, torch.float64, device="cuda"), absent)[1], causal=causal,
                         key_padding_mask=pad)
        got = attention_jet2(*without(inputs(*shape, dtype, device="cuda"), absent)[0], causal=causal,
                             key_padding_mask=pad, backend=backend, precision="tf32x3")
        torch.cuda.synchronize()
        for name, a, b in zip(("o", "o1", "o2"), got, want):
            assert a.dtype == dtype and a.device.type == "cuda"
            torch.testing.assert_close(a, b.to(dtype), rtol=rtol, atol=atol,
                                       msg=lambda m: f"{backend} {shape} without {absent} {name}: {m}")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("lead,d,n,affine", LAYER_NORM_CUDA_CASES, ids=str)
def test_gpu_layer_norm_skips_absent_x2(backend: str, dtype, lead, d: int, n: int, affine: bool) -> None:
    from test_kernels_layer_norm import EPS, _close, inputs as ln_inputs

    from fasthess.kernels import layer_norm

    x, w, b, x1, x2 = ln_inputs(lead, d, n, torch.float64, affine)
    want = layer_norm.layer_norm_jet2_reference(x, w, b, x1, torch.zeros_like(x2), EPS)
    x, w, b, x1, _ = (t if t is None else t.cuda() for t in ln_inputs(lead, d, n, dtype, affine))
    got = layer_norm.layer_norm_jet2(x, w, b, x1, None, EPS, backend=backend)
    torch.cuda.synchronize()
    _close([t.cpu() for t in got], want, dtype, f"{backend} layer norm {lead} D={d} x2=None")


def test_cuda_opcheck_with_absent_tangents() -> None:
    """Schemas with optional tangents, fake functions and the undefined-tensor paths of the CUDA glue."""
    from test_kernels_attention import ABSENT, without
    from test_kernels_layer_norm import EPS, inputs as ln_inputs

    x = inputs(2, 2, 5, 6, 4, 2, torch.float64, device="cuda")
    keep = ~padding(2, 6, "cuda")
    for absent in ABSENT:
        torch.library.opcheck(torch.ops.fasthess.attention_jet2.default, (*without(x, absent)[0], keep, True, 0.5))
    with pytest.raises(RuntimeError, match="at least one of q1, k1, v1"):
        torch.ops.fasthess.attention_jet2(*x[:3], None, None, None, *x[6:], None, False, 1.0)
    y, w, b, y1, _ = (t.cuda() for t in ln_inputs((2, 3), 7, 2, torch.float32))
    torch.library.opcheck(torch.ops.fasthess.layer_norm_jet2.default, (y, w, b, y1, None, EPS))
