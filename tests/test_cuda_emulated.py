"""Every kernel of csrc/cuda/*.cu run on the CPU through the stand-in CUDA runtime, against its torch reference.

No GPU is needed: tests/cuda_emulation (the ``cuda_emulator`` fixture of tests/conftest.py) rewrites each .cu
for a runtime in which every CUDA thread is a std::thread (real barriers, warp shuffles, shared memory that
starts as NaN) and runs the launchers in a subprocess. The "plain" build checks the values on odd shapes and
both dtypes; one small case per kernel runs under AddressSanitizer + UBSan (any out-of-bounds access of a
buffer or of shared memory fails the run), and the kernels with shared memory and barriers once under
ThreadSanitizer (a missing barrier between a write and a read of shared memory fails it). The attention HVP
kernels are covered the same way in tests/test_kernels_attention_hvp.py. Inputs are drawn in float64 and
rounded to the tested dtype; the references run in float64 on the rounded values.
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import inputs, padding
from tolerances import (
    ATTENTION_JET2_VS_REFERENCE,
    CROSS_ENTROPY_JET2_VS_REFERENCE,
    KERNEL_VS_REFERENCE,
    POINTWISE_JET2_VS_REFERENCE,
    assert_entries_close,
)

from fasthess.kernels.attention.reference import attention_jet2 as attention_ref
from fasthess.kernels.gelu.reference import gelu_jet2 as gelu_ref
from fasthess.kernels.hutchinson.reference import hutchinson_update_
from fasthess.kernels.layer_norm.reference import layer_norm_jet2 as layer_norm_ref
from fasthess.kernels.linear.reference import hash32, hutchinson_update_seeded_, onehot_weight_tangent, rademacher
from fasthess.kernels.loss.reference import cross_entropy_jet2 as cross_entropy_ref

F32, F64 = torch.float32, torch.float64


# the emulated entry point (tests/cuda_emulation/shims.cpp) each test calls
_ENTRY_OF_TEST = {
    "test_gelu_jet2": "gelu_jet2", "test_layer_norm_jet2": "layer_norm_jet2",
    "test_cross_entropy_jet2_rows": "cross_entropy_jet2_rows", "test_hutchinson_update": "hutchinson_update",
    "test_onehot_weight_tangent": "onehot_weight_tangent", "test_attention_jet2": "attention_jet2",
}


@pytest.fixture(scope="module")
def emu(cuda_emulator, request):
    """The session's emulator, with every build the selected tests of this module need compiling in parallel."""
    builds: dict = {}
    for item in request.session.items:
        entry = _ENTRY_OF_TEST.get(getattr(item, "originalname", ""))
        if entry and item.module is request.module:
            builds.setdefault(item.callspec.params.get("tool", "plain"), set()).add(entry)
    cuda_emulator.prebuild([(entries, tool) for tool, entries in builds.items()])
    return cuda_emulator


def _randn(*shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def _close(got, want, tol, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, f"{what} output {i}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert_entries_close(a.reshape(-1), b.reshape(-1), *tol, f"{what} output {i}")


# --- GELU 2-jet: M elements (1, one partial block, 1025: 5 blocks), N tangent pairs ---
@pytest.mark.parametrize("m,n,approximate,dtype,tool", [
    (1, 1, "none", F64, "plain"), (97, 2, "tanh", F32, "plain"), (1025, 2, "none", F32, "plain"),
    (1025, 3, "tanh", F64, "plain"), (97, 2, "none", F64, "address"),
], ids=str)
def test_gelu_jet2(emu, m, n, approximate, dtype, tool) -> None:
    x, x1, x2 = 3 * _randn(m, dtype=dtype), _randn(n, m, dtype=dtype, seed=1), _randn(n, m, dtype=dtype, seed=2)
    outs = [torch.full_like(t, float("nan")) for t in (x, x1, x1)]
    got = emu.call("gelu_jet2", [x, x1, x2, *outs], [x.element_size(), m, n, approximate == "tanh"],
                             tool=tool)[3:]
    want = gelu_ref(x.double(), x1.double(), x2.double(), approximate)
    _close(got, want, POINTWISE_JET2_VS_REFERENCE[dtype], f"gelu {approximate} M={m}")


# --- layer-norm 2-jet: D <= 512 the warp-per-row kernel (4 rows per block: R = 5 leaves a partial block),
# D > 512 the block-per-row kernel (static shared scratch, block reductions); x2 None: the HAS_X2 = false path ---
@pytest.mark.parametrize("r,d,n,affine,has_x2,dtype,tool", [
    (5, 1, 2, True, True, F64, "plain"), (5, 97, 2, False, True, F32, "plain"), (5, 512, 1, True, False, F64, "plain"),
    (3, 513, 2, True, True, F32, "plain"), (2, 1025, 2, False, False, F64, "plain"),
    (5, 40, 1, True, True, F64, "address"), (2, 600, 1, True, True, F64, "address"),
    (2, 600, 2, True, True, F64, "thread"),
], ids=str)
def test_layer_norm_jet2(emu, r, d, n, affine, has_x2, dtype, tool) -> None:
    x = 2 * _randn(r, d, dtype=dtype) + 1
    x1, x2 = _randn(n, r, d, dtype=dtype, seed=1), _randn(n, r, d, dtype=dtype, seed=2)
    w, b = (_randn(d, dtype=dtype, seed=3), _randn(d, dtype=dtype, seed=4)) if affine else (None, None)
    outs = [torch.full_like(t, float("nan")) for t in (x, x1, x1)]
    got = emu.call("layer_norm_jet2", [x, w, b, x1, x2 if has_x2 else None, *outs],
                             [x.element_size(), r, d, n], [1e-5], tool=tool)[5:]
    dbl = lambda t: None if t is None else t.double()  # noqa: E731
    want = layer_norm_ref(x.double(), dbl(w), dbl(b), x1.double(), x2.double() if has_x2 else torch.zeros_like(
        x1.double()), 1e-5)
    _close(got, want, POINTWISE_JET2_VS_REFERENCE[dtype], f"layer_norm D={d}")


# --- cross-entropy 2-jet rows: V columns (threads per block 64/128/256/512), K tangents in blocks of KC = 4, 2
# or 1 (FASTHESS_EMU_SMS steers the choice: few SMs keep KC large; K = 5 with KC = 4 leaves a partial group),
# with and without z2; row 1 is ignored (zeros), row 2's target is the last class ---
@pytest.mark.parametrize("v,k,sms,has_z2,dtype,tool", [
    (1, 1, 4, True, F64, "plain"), (97, 5, 1, True, F64, "plain"), (97, 3, 64, False, F32, "plain"),
    (1025, 2, 1, True, F32, "plain"), (1025, 5, 1, False, F64, "plain"), (4099, 3, 1, True, F64, "plain"),
    (4099, 1, 4, False, F32, "plain"), (97, 5, 1, True, F64, "address"), (300, 5, 1, True, F64, "thread"),
], ids=str)
def test_cross_entropy_jet2_rows(emu, v, k, sms, has_z2, dtype, tool) -> None:
    n = 4
    z = 3 * _randn(n, v, dtype=dtype)
    z1, z2 = _randn(k, n, v, dtype=dtype, seed=1), _randn(k, n, v, dtype=dtype, seed=2)
    y = torch.tensor([0, -100, v - 1, v // 2])
    outs = [torch.full((n,), float("nan"), dtype=dtype), *[torch.full((k, n), float("nan"), dtype=dtype)] * 2]
    got = emu.call("cross_entropy_jet2_rows", [z, y, z1, z2 if has_z2 else None, *outs],
                             [z.element_size(), n, v, k, -100], tool=tool, env={"FASTHESS_EMU_SMS": str(sms)})[4:]
    rows = [0, 2, 3]
    want = [torch.zeros(n, dtype=F64), torch.zeros(k, n, dtype=F64), torch.zeros(k, n, dtype=F64)]
    for i in rows:  # one row at a time: the kernel's per-row terms
        w2 = z2[:, i:i + 1].double() if has_z2 else None
        l0, l1, l2 = cross_entropy_ref(z[i:i + 1].double(), y[i:i + 1], z1[:, i:i + 1].double(), w2)
        want[0][i], want[1][:, i], want[2][:, i] = l0, l1, l2
    _close(got, want, CROSS_ENTROPY_JET2_VS_REFERENCE[dtype], f"cross_entropy V={v} K={k}")
    assert all(bool((g[..., 1] == 0).all()) for g in got), "an ignored row must give zeros"


def test_cross_entropy_target_out_of_range_gives_nan(emu) -> None:
    z, z1 = _randn(2, 5, dtype=F64), _randn(1, 2, 5, dtype=F64, seed=1)
    outs = [torch.zeros(2, dtype=F64), torch.zeros(1, 2, dtype=F64), torch.zeros(1, 2, dtype=F64)]
    got = emu.call("cross_entropy_jet2_rows", [z, torch.tensor([5, 1]), z1, None, *outs], [8, 2, 5, 1, -100])
    assert all(bool(g[..., 0].isnan().all()) and bool(g[..., 1].isfinite().all()) for g in got[4:])


# --- Hutchinson accumulation (1024 coordinates per block: 1025 needs 2), plain and seeded ---
@pytest.mark.parametrize("n,k,count,seeded,dtype,tool", [
    (1, 3, 0, False, F64, "plain"), (97, 1, 5, False, F32, "plain"), (1025, 3, 7, False, F64, "plain"),
    (1, 2, 0, True, F32, "plain"), (97, 3, 4, True, F64, "plain"), (1025, 3, 0, True, F32, "plain"),
    (97, 2, 3, False, F64, "address"), (1030, 2, 3, True, F64, "address"),
], ids=str)
def test_hutchinson_update(emu, n, k, count, seeded, dtype, tool) -> None:
    seed, first = 1234567, 2**32 - 2  # probe indices past 2^32 wrap as in the reference
    mean, m2 = _randn(n, dtype=dtype), _randn(n, dtype=dtype, seed=1).abs() * count
    hz = _randn(k, n, dtype=dtype, seed=2)
    z = rademacher(seed, first, k, n, dtype=dtype) if seeded else torch.sign(_randn(k, n, dtype=dtype, seed=3))
    want_mean, want_m2 = mean.double().clone(), m2.double().clone()
    if seeded:
        got = emu.call("hutchinson_update_seeded", [mean, m2, hz],
                                 [mean.element_size(), k, n, int(hash32(torch.tensor(seed))), first, count], tool=tool)
        hutchinson_update_seeded_(want_mean, want_m2, hz.double(), seed, first, count)
    else:
        got = emu.call("hutchinson_update", [mean, m2, z, hz], [mean.element_size(), k, n, count], tool=tool)
        hutchinson_update_(want_mean, want_m2, z.double(), hz.double(), count)
    _close(got[:2], [want_mean, want_m2], KERNEL_VS_REFERENCE[dtype], f"hutchinson n={n} k={k} count={count}")


@pytest.mark.parametrize("dtype", [F32, F64])
def test_hutchinson_seeded_probes_are_the_reference_rademacher(emu, dtype) -> None:
    """With Hz = 1 and no earlier samples the merged mean is the probe itself: bit-identical to rademacher."""
    n = 1500
    for seed, probe in [(0, 0), (7, 3), (2**40 + 5, 2**31 + 1)]:
        mean, m2 = torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype)
        got = emu.call("hutchinson_update_seeded", [mean, m2, torch.ones(1, n, dtype=dtype)],
                                 [mean.element_size(), 1, n, int(hash32(torch.tensor(seed & 0xFFFFFFFF))), probe, 0])
        assert torch.equal(got[0], rademacher(seed, probe, 1, n, dtype=dtype)[0]), (seed, probe)


def test_hutchinson_count_zero_k_zero_is_a_no_op(emu) -> None:
    mean, m2 = _randn(5, dtype=F64), _randn(5, dtype=F64, seed=1)
    got = emu.call("hutchinson_update", [mean, m2, torch.zeros(0, 5, dtype=F64), torch.zeros(0, 5,
                             dtype=F64)], [8, 0, 5, 3])
    assert torch.equal(got[0], mean) and torch.equal(got[1], m2)


# --- one-hot weight tangents: 2-d blocks (32 x 8), raw copies of 2/4/8-byte elements, rows < 0: zero ---
@pytest.mark.parametrize("m,out_features,dtype,tool", [
    (5, 97, torch.bfloat16, "plain"), (1, 1, F32, "plain"), (13, 33, F64, "plain"), (5, 40, torch.bfloat16, "address"),
    (3, 70, F64, "address"),
], ids=str)
def test_onehot_weight_tangent(emu, m, out_features, dtype, tool) -> None:
    inn = 7
    x = _randn(m, inn, dtype=dtype)
    rows = torch.tensor([0, -1, out_features - 1, out_features // 2, -1])
    cols = torch.tensor([3, 0, inn - 1, 0, 5])
    out = torch.full((rows.numel(), m, out_features), float("nan"), dtype=dtype)
    got = emu.call("onehot_weight_tangent", [x, rows, cols, out],
                             [rows.numel(), m, inn, out_features, x.element_size()], tool=tool)[3]
    want = onehot_weight_tangent(x.double(), rows, cols, out_features).to(dtype)
    assert torch.equal(got, want)


# --- attention 2-jet: the tiled kernel (D <= 128: 1, 2, 4 columns per lane; 16 query rows per block, keys in
# chunks of 32), the rowwise one (D > 128, or forced); SECOND false when q2, k2, v2 are all None; a None
# first-order tangent is zero; Tq != Tk; padding row 0 of batch 1 sees no key under the causal mask ---
ATTENTION_CASES = [  # (B, H, Tq, Tk, D, N), causal, padded, second-order given, first-order None, dtype, rowwise, tool
    ((1, 2, 5, 7, 8, 2), True, True, "qkv", "", F64, False, "plain"),
    ((1, 2, 5, 7, 8, 2), True, True, "", "", F64, False, "plain"),
    ((2, 1, 17, 40, 40, 1), False, True, "", "k", F32, False, "plain"),
    ((2, 1, 17, 40, 40, 1), False, True, "v", "", F64, False, "plain"),
    ((1, 1, 9, 5, 100, 1), True, False, "", "q", F64, False, "plain"),
    ((2, 1, 6, 35, 130, 1), True, True, "qkv", "", F32, False, "plain"),
    ((2, 1, 6, 35, 130, 1), False, False, "", "", F64, False, "plain"),
    ((2, 2, 5, 7, 8, 2), True, True, "", "", F32, True, "plain"),
    ((2, 2, 5, 7, 8, 2), True, True, "k", "v", F64, True, "plain"),
    ((2, 1, 18, 33, 8, 1), True, True, "qkv", "", F64, False, "address"),
    ((1, 1, 18, 33, 8, 1), True, True, "", "", F64, False, "address"),
    ((2, 1, 5, 33, 8, 1), True, True, "", "", F64, True, "address"),
    ((1, 1, 18, 33, 8, 1), True, True, "qkv", "", F64, False, "thread"),
    ((1, 1, 5, 33, 8, 1), True, True, "", "", F64, True, "thread"),
]


@pytest.mark.parametrize("shape,causal,padded,second,absent,dtype,rowwise,tool", ATTENTION_CASES, ids=str)
def test_attention_jet2(emu, shape, causal, padded, second, absent, dtype, rowwise, tool) -> None:
    b, h, tq, tk, d, n = shape
    x = inputs(*shape, dtype)
    for i, name in enumerate("qkv"):  # tangents not given: None for the kernel, zero for the reference
        if name in absent:
            x[3 + i] = None
        if name not in second:
            x[6 + i] = None
    pad = padding(b, tk) if padded else None
    keep = None if pad is None else (~pad).to(torch.uint8)
    outs = [torch.full_like(x[0], float("nan")), *[torch.full((n, b, h, tq, d), float("nan"), dtype=dtype)] * 2]
    got = emu.call("attention_jet2", [*x, keep, *outs], [x[0].element_size(), b, h, tq, tk, d, n, causal],
                             [0.3], tool=tool, env={"FASTHESS_CUDA_ATTENTION_ROWWISE": "1" if rowwise else "0"})[10:]
    full = [t.double() for t in x[:3]]
    for i in range(3, 9):
        shape_i = (n, b, h, tq if i % 3 == 0 else tk, d)
        full.append(torch.zeros(shape_i, dtype=F64) if x[i] is None else x[i].double())
    want = attention_ref(*full, causal=causal, key_padding_mask=pad, scale=0.3)
    _close(got, want, ATTENTION_JET2_VS_REFERENCE[dtype], f"attention_jet2 {shape} second={second!r}")


def test_rewrite_turns_launches_and_shared_memory_into_runtime_calls() -> None:
    """The source rewrite the emulation depends on (pure text: runs without g++)."""
    from cuda_emulation.emulator import rewrite

    src = """
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ OnlineState<T, KC> warp_states[kMaxThreads / 32];
  k<T, 4><<<(unsigned)(b < m ? b : m), dim3(32, 8), 0, stream>>>(x, y);
"""
    out = rewrite(src)
    assert "unsigned char* smem_raw = reinterpret_cast<unsigned char*>(fasthess_emu::shared);" in out
    assert "auto& warp_states = *fasthess_emu::static_shared<OnlineState<T, KC>[kMaxThreads / 32]>(" in out
    assert "fasthess_emu::launch(k<T, 4>, (unsigned)(b < m ? b : m), dim3(32, 8), 0, stream)(x, y);" in out
    with pytest.raises(AssertionError, match="__shared__"):
        rewrite("__shared__ float a;")  # a scalar __shared__ is not handled: it must not pass silently
