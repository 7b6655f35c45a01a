"""Attention HVP kernels (tangent of the attention backward): the reference against a dense float64
Hessian (reverse-over-reverse) and finite differences, every CPU backend against the reference,
the Triton kernels under TRITON_INTERPRET=1 and compiled to PTX for sm_90, the CUDA kernels run on the CPU
through a stand-in CUDA runtime (tests/cuda_emulation), opcheck of the C++ op, backend selection, and the
route through the fwd_rev engine."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
from attention_cases import HVP_SHAPES, MASKS, hvp_inputs, padding
from tolerances import ATTENTION_HVP_FINITE_DIFFERENCE, ATTENTION_HVP_VS_DENSE, ATTENTION_HVP_VS_REFERENCE
from triton_interpreter import ROOT, run_interpreted

from fasthess.errors import BackendUnavailableError
from fasthess.kernels.attention.reference import attention
from fasthess.kernels.attention_hvp import attention_hvp, family, select_backend
from fasthess.kernels.attention_hvp.reference import attention_hvp as reference
from fasthess.kernels.attention_hvp.reference import attention_vjp
from fasthess.kernels.registry import extension_loaded

needs_ext = pytest.mark.skipif(not extension_loaded(), reason="C++ extension not built")
NAMES = ("dq", "dk", "dv", "dq1", "dk1", "dv1")


def _close(got, want, tol, what: str) -> None:
    rtol, atol = tol
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=rtol, atol=atol, msg=lambda m: f"{what} {name}: {m}")


def _dense(q, k, v, dout, q1, k1, v1, dout1, causal, pad):
    """(dq, dk, dv) and tangents from the dense Hessian of ⟨dout, attention⟩ by double backward:
    tangent = H·(q1, k1, v1) + Jᵀ dout1, independent of forward-mode AD."""
    shapes = [q.shape, k.shape, v.shape]
    sizes = [s.numel() for s in shapes]

    def split(x):
        return [t.reshape(s) for t, s in zip(x.split(sizes), shapes)]

    def loss(x, g):
        return (g * attention(*split(x), causal=causal, key_padding_mask=pad)).sum()

    x = torch.cat([q.flatten(), k.flatten(), v.flatten()])
    hess = torch.autograd.functional.hessian(lambda y: loss(y, dout), x)
    grad = torch.autograd.functional.jacobian(lambda y: loss(y, dout), x)
    outs = [[], [], []]
    for i in range(q1.shape[0]):
        xdot = torch.cat([q1[i].flatten(), k1[i].flatten(), v1[i].flatten()])
        jt = torch.autograd.functional.jacobian(lambda y: loss(y, dout1[i]), x)  # Jᵀ dout1
        for o, t in zip(outs, split(hess @ xdot + jt)):
            o.append(t)
    return (*split(grad), *(torch.stack(o) for o in outs))


@pytest.mark.parametrize("causal,padded", MASKS)
def test_reference_matches_dense_hessian_and_finite_differences(causal: bool, padded: bool) -> None:
    x = hvp_inputs(2, 2, 5, 6, 3, 2, torch.float64, seed=3)
    pad = padding(2, 6) if padded else None
    want = reference(*x, causal=causal, key_padding_mask=pad)
    _close(_dense(*x, causal, pad), want, ATTENTION_HVP_VS_DENSE, "dense Hessian")
    # central difference of the backward along (q1, k1, v1, dout1)
    h = 1e-4
    prim, tang = x[:4], x[4:]

    def grads_at(eps: float) -> list[torch.Tensor]:
        per = [attention_vjp(*(p + eps * t[i] for p, t in zip(prim, tang)), causal=causal, key_padding_mask=pad)
               for i in range(tang[0].shape[0])]
        return [torch.stack(g) for g in zip(*per)]

    fd = [(a - b) / (2 * h) for a, b in zip(grads_at(h), grads_at(-h))]
    rtol, atol = ATTENTION_HVP_FINITE_DIFFERENCE
    for name, a, b in zip(NAMES[3:], want[3:], fd):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"finite difference {name}: {m}")


def test_row_without_visible_key_contributes_nothing() -> None:
    x = hvp_inputs(2, 1, 3, 3, 4, 2, torch.float64)
    pad = padding(2, 3)  # batch 1: key 0 padded, causal row 0 sees nothing
    for backend in family.available():
        got = attention_hvp(*x, causal=True, key_padding_mask=pad, backend=backend)
        assert all(torch.isfinite(t).all() for t in got), backend
        assert got[0][1, :, 0].abs().max() == 0 and got[3][:, 1, :, 0].abs().max() == 0, backend
        assert got[1][1, :, 0].abs().max() == 0 and got[4][:, 1, :, 0].abs().max() == 0, backend  # padded key


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", HVP_SHAPES)
@pytest.mark.parametrize("causal,padded", MASKS)
def test_cpu_backends_match_reference(backend: str, dtype, shape, causal: bool, padded: bool) -> None:
    if backend not in family.available():
        pytest.skip(f"{backend} not built")
    x = hvp_inputs(*shape, dtype)
    pad = padding(shape[0], shape[3]) if padded else None
    want = reference(*hvp_inputs(*shape, torch.float64), causal=causal, key_padding_mask=pad)
    got = attention_hvp(*x, causal=causal, key_padding_mask=pad, backend=backend)
    _close(got, want, ATTENTION_HVP_VS_REFERENCE[dtype], f"{backend} {shape}")


@needs_ext
@pytest.mark.parametrize("causal", [False, True])
def test_cpp_matches_torch_backend_at_1025(causal: bool) -> None:
    """Long sequences (many query blocks, a partial last block) against the blocked torch backend."""
    x = hvp_inputs(1, 2, 1025, 1025, 8, 2, torch.float64, seed=1)
    pad = padding(1, 1025)
    got = attention_hvp(*x, causal=causal, key_padding_mask=pad, backend="cpp")
    want = attention_hvp(*x, causal=causal, key_padding_mask=pad, backend="torch")
    _close(got, want, ATTENTION_HVP_VS_REFERENCE[torch.float64], "cpp vs torch at T=1025")


@needs_ext
def test_cpp_tangent_groups_match_one_thread() -> None:
    """More threads than heads splits the tangents into groups: same numbers as one thread."""
    x = hvp_inputs(1, 1, 70, 70, 4, 5, torch.float64, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.fasthess.attention_hvp(*x, None, True, 0.5)
        torch.set_num_threads(4)
        grouped = torch.ops.fasthess.attention_hvp(*x, None, True, 0.5)
    finally:
        torch.set_num_threads(threads)
    _close(grouped, one, ATTENTION_HVP_VS_REFERENCE[torch.float64], "4 threads vs 1")


@needs_ext
def test_cpp_opcheck() -> None:
    x = hvp_inputs(2, 2, 5, 6, 4, 2, torch.float64)
    keep = ~padding(2, 6)
    torch.library.opcheck(torch.ops.fasthess.attention_hvp.default, (*x, keep, True, 0.5))
    torch.library.opcheck(torch.ops.fasthess.attention_hvp.default, (*x, None, False, 0.5))


@needs_ext
def test_cpp_rejects_bad_shapes() -> None:
    x = hvp_inputs(1, 1, 4, 4, 4, 2, torch.float64)
    x[7] = x[7][:1]
    with pytest.raises(RuntimeError, match=r"q1, dout1 must be \(N, \*q.shape\)"):
        torch.ops.fasthess.attention_hvp(*x, None, False, 1.0)


def test_wrapper_errors_and_backend_selection() -> None:
    x = hvp_inputs(1, 1, 4, 4, 4, 2, torch.float64)
    with pytest.raises(ValueError, match="v1 must be"):
        attention_hvp(*x[:6], x[6][:1], x[7])
    with pytest.raises(ValueError, match="dout must have"):
        attention_hvp(*x[:3], x[3][..., :2, :], *x[4:])
    with pytest.raises(BackendUnavailableError):
        attention_hvp(*x, backend="cuda")  # CUDA tensors only (and built only against a CUDA torch)
    with pytest.raises(BackendUnavailableError):
        attention_hvp(*x, backend="triton")  # unavailable here, or not for CPU tensors
    assert select_backend("auto", "cpu", torch.float64)[0] == ("cpp" if extension_loaded() else "torch")
    assert select_backend("auto", "cpu", torch.bfloat16)[0] == "torch"  # cpp takes float32/64 only
    if extension_loaded():
        with pytest.raises(TypeError, match="takes"):
            select_backend("cpp", "cpu", torch.bfloat16)
        with pytest.raises(BackendUnavailableError, match="runs on"):
            select_backend("cpp", "meta", torch.float64)
    else:
        with pytest.raises(BackendUnavailableError, match="not available"):
            attention_hvp(*x, backend="cpp")
    # no tangents: the backward and empty tangents
    empty = [t[:0] for t in x[4:]]
    got = attention_hvp(*x[:4], *empty)
    _close(got[:3], attention_vjp(*x[:4]), ATTENTION_HVP_VS_REFERENCE[torch.float64], "N = 0")
    assert got[3].shape == (0, 1, 1, 4, 4)


def test_torch_backend_in_bfloat16_matches_reference() -> None:
    x = hvp_inputs(1, 2, 9, 9, 8, 2, torch.bfloat16)
    want = reference(*hvp_inputs(1, 2, 9, 9, 8, 2, torch.float64), causal=True)
    got = attention_hvp(*x, causal=True)
    assert all(t.dtype == torch.bfloat16 for t in got)
    _close(got, want, ATTENTION_HVP_VS_REFERENCE[torch.bfloat16], "torch bf16")


_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    sys.path.insert(0, {tests!r})
    import torch
    from attention_cases import hvp_inputs, padding
    from tolerances import ATTENTION_HVP_VS_REFERENCE
    from fasthess.kernels.attention_hvp import triton_op
    from fasthess.kernels.attention_hvp.reference import attention_hvp as reference
    from fasthess.kernels.attention_hvp.triton_kernels import attention_hvp_triton
    rtol, atol = ATTENTION_HVP_VS_REFERENCE[torch.float32]

    def close(got, want, what):
        for i, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b.float(), rtol=rtol, atol=atol, msg=lambda m: f"{{what}} output {{i}}: {{m}}")

    for shape, causal, padded in {cases!r}:
        x = hvp_inputs(*shape, torch.float32)
        pad = padding(shape[0], shape[3]) if padded else None
        want = reference(*hvp_inputs(*shape, torch.float64), causal=causal, key_padding_mask=pad)
        close(attention_hvp_triton(*x, causal=causal, key_padding_mask=pad), want, shape)
        print("ok", shape, causal, padded)
    # the custom op: vmap over the tangents (N = 1 each) folds them into one call; opcheck
    op = triton_op()
    x = hvp_inputs(2, 1, 6, 7, 8, 3, torch.float32)
    keep = ~padding(2, 7)
    want = reference(*hvp_inputs(2, 1, 6, 7, 8, 3, torch.float64), causal=True, key_padding_mask=~keep, scale=0.5)
    got = torch.func.vmap(lambda *t: op(*x[:4], *(s[None] for s in t), keep, True, 0.5),
                          out_dims=(None,) * 3 + (0,) * 3)(*x[4:])
    close(got[:3] + tuple(t[:, 0] for t in got[3:]), want, "vmap")
    torch.library.opcheck(op, (*x, keep, True, 0.5), test_utils=("test_schema", "test_faketensor"))
    print("ok vmap")
    """
)


def test_triton_kernels_under_interpreter() -> None:
    cases = [((1, 1, 1, 1, 4, 1), True, False), ((2, 2, 7, 7, 5, 2), True, True),
             ((2, 1, 5, 40, 8, 1), False, False), ((2, 1, 40, 5, 8, 1), True, True), ((1, 1, 70, 70, 16, 2), True, False)]
    script = _INTERPRET_SCRIPT.format(tests=os.path.join(ROOT, "tests"), cases=cases)
    stdout = run_interpreted(script)
    assert stdout.count("ok") == len(cases) + 1


@pytest.mark.parametrize("kernel_name", ["_hvp_dq_kernel", "_hvp_dkv_kernel"])
def test_triton_kernels_compile_to_ptx_for_sm90(kernel_name: str) -> None:
    triton = pytest.importorskip("triton")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fasthess.kernels.attention_hvp import triton_kernels

    kernel = getattr(triton_kernels, kernel_name)
    bm, bn, bd, warps, stages = triton_kernels.launch_config(64)
    const = dict(CAUSAL=True, HAS_KEEP=True, ACC=tl.float32, PRECISION="ieee", BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    names = kernel.arg_names
    sig = {name: "*fp32" for name in names[: names.index("H")]} | {"KEEP": "*i8", "scale": "fp32"}
    sig |= {name: "i32" for name in ("H", "BH", "TQ", "TK", "D")} | {c: "constexpr" for c in const}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(c),): v for c, v in const.items()})
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    ptx = out.asm["ptx"]
    assert ".target sm_90" in ptx and f".entry {kernel_name}" in ptx
    assert out.metadata.shared <= 227 * 1024  # fits the H100/H200 shared memory per block


# --- routing through the fwd_rev engine (fasthess/kernels/attention_hvp/forward_over_reverse.py) ---


@needs_ext
def test_cpp_vmap_rule_folds_the_vmapped_tangents_into_n() -> None:
    x = hvp_inputs(2, 1, 6, 7, 4, 3, torch.float64)
    keep = ~padding(2, 7)
    op = torch.ops.fasthess.attention_hvp
    want = op(*x, keep, True, 0.5)
    # vmap over the 3 tangents, each call with N = 1
    got = torch.func.vmap(lambda *t: op(*x[:4], *(s[None] for s in t), keep, True, 0.5), out_dims=(None,) * 3 + (0,) * 3)(*x[4:])
    _close(got[:3] + tuple(t[:, 0] for t in got[3:]), want, ATTENTION_HVP_VS_REFERENCE[torch.float64], "vmap")
    # an unbatched (zero) tangent next to batched ones, and batched primals (a loop)
    zero = torch.zeros_like(x[6][:1])
    got = torch.func.vmap(lambda a, b, d: op(*x[:4], a[None], b[None], zero, d[None], keep, True, 0.5))(x[4], x[5], x[7])
    want = op(*x[:6], zero.expand_as(x[6]), x[7], keep, True, 0.5)
    for a, b in zip(got[3:], want[3:]):
        torch.testing.assert_close(a[:, 0], b, rtol=1e-12, atol=1e-12)
    got = torch.func.vmap(lambda a: op(a, *x[1:4], *(t[:1] for t in x[4:]), keep, True, 0.5))(torch.stack([x[0], 2 * x[0]]))
    for i, s in enumerate((1, 2)):
        want = op(s * x[0], *x[1:4], *(t[:1] for t in x[4:]), keep, True, 0.5)
        for a, b in zip(got, want):
            torch.testing.assert_close(a[i], b, rtol=1e-12, atol=1e-12)


def _available_backends() -> list[str]:
    return [b for b in ("cpp", "torch") if b in family.available()]


@pytest.mark.parametrize("causal", [False, True])
def test_routed_attention_hvp_matches_dense_hessian(causal: bool) -> None:
    """vmap(jvp(grad(f))) through the routed attention (every backend) = dense reverse-over-reverse Hessian."""
    from fasthess.kernels.attention_hvp.forward_over_reverse import attention as routed
    from fasthess.kernels.registry import use_backend

    g = torch.Generator().manual_seed(5)
    b, h, tq, tk, d = 2, 2, 5, 7, 3
    w = torch.randn(h * d, 3 * h * d, generator=g, dtype=torch.float64)
    xq = torch.randn(b, tq, h * d, generator=g, dtype=torch.float64)
    xk = torch.randn(b, tk, h * d, generator=g, dtype=torch.float64)

    def f(w, fn):
        heads = lambda x: x.view(b, -1, h, d).transpose(1, 2)  # noqa: E731
        q = heads(xq @ w[:, : h * d])
        k, v = heads(xk @ w[:, h * d : 2 * h * d]), heads(xk @ w[:, 2 * h * d :])
        return (fn(q, k, v, causal=causal, scale=0.7).sin() * torch.arange(d, dtype=w.dtype)).sum()

    tangents = torch.randn(4, *w.shape, generator=g, dtype=torch.float64)
    dense = torch.autograd.functional.hessian(lambda y: f(y, attention), w).reshape(w.numel(), w.numel())
    want = (tangents.reshape(4, -1) @ dense).reshape(tangents.shape)
    grad = torch.func.grad(lambda y: f(y, routed))
    for backend in _available_backends():
        with use_backend(backend):
            got = torch.func.vmap(lambda t: torch.func.jvp(grad, (w,), (t,))[1])(tangents)
        _close([got], [want], ATTENTION_HVP_VS_DENSE, f"routed {backend}")


def test_hutchinson_fwd_rev_through_the_kernel_equals_plain_path(monkeypatch) -> None:
    """fasthess.diag(method='hutchinson', engine='fwd_rev') on the SDPA zoo model: the routed kernel gives
    the same estimate as the plain double-backward engine with the same probes (and is really called)."""
    import fasthess
    from fasthess.kernels.attention_hvp import forward_over_reverse as route_module
    from fasthess.kernels.registry import use_backend
    from tolerances import SAME_PROBES_RTOL
    from zoo import ZOO

    case = ZOO["sdpa"]()
    kw = dict(method="hutchinson", num_probes=6, seed=11)
    plain = fasthess.diag(case.model, case.loss, case.layers, engine="double_backward", **kw)
    calls = []
    original = route_module._hvp
    monkeypatch.setattr(route_module, "_hvp", lambda *a: calls.append(a[4][0].shape[0]) or original(*a))
    for backend in _available_backends():
        calls.clear()
        with use_backend(backend):
            routed = fasthess.diag(case.model, case.loss, case.layers, engine="fwd_rev", **kw)
        assert calls and max(calls) == 1, calls  # N = 1 per vmapped tangent: the vmap rule folds the probes
        assert routed.meta["kernels"]["attention_hvp"] == backend
        for name in plain.layers:
            torch.testing.assert_close(routed.layers[name].values, plain.layers[name].values,
                                       rtol=SAME_PROBES_RTOL, atol=1e-12, msg=lambda m: f"{backend} {name}: {m}")


def test_route_applies_only_inside_fwd_rev_and_with_a_worthwhile_backend() -> None:
    from fasthess.kernels.attention_hvp.forward_over_reverse import route, routes
    from fasthess.kernels.registry import use_backend

    q64, q16 = torch.zeros(1, 1, 2, 4, dtype=torch.float64), torch.zeros(1, 1, 2, 4, dtype=torch.bfloat16)
    assert not routes(q64)
    with route():
        assert routes(q64) == extension_loaded()  # auto: only with a compiled backend for these tensors
        assert not routes(q16)
        with use_backend("torch"):
            assert routes(q16)
        with use_backend("cpp"):
            assert not routes(q16)  # cpp takes float32/64 only: the plain decomposition


@pytest.mark.parametrize("form", ["bool", "additive", "additive-causal", "bias"])
def test_routed_sdpa_with_a_mask_matches_dense_hessian(form: str, monkeypatch) -> None:
    """F.scaled_dot_product_attention with an attn_mask inside the fwd_rev route: key-padding masks
    (boolean; additive 0 / -inf as HF models pass them; combined with the causal pattern) go through the
    kernel, a bias falls back to the plain path; both equal the dense reverse-over-reverse Hessian."""
    from fasthess.decompositions import scaled_dot_product_attention as sdpa
    from fasthess.kernels.attention_hvp import forward_over_reverse as route_module
    from fasthess.kernels.registry import use_backend

    g = torch.Generator().manual_seed(7)
    b, h, t, d = 2, 2, 6, 3
    w = torch.randn(h * d, 3 * h * d, generator=g, dtype=torch.float64)
    x = torch.randn(b, t, h * d, generator=g, dtype=torch.float64)
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[0, -2:] = True  # two padded keys in the first sequence
    if form == "bool":
        mask = ~pad[:, None, None, :]
    elif form == "bias":
        mask = torch.randn(b, 1, t, t, generator=g, dtype=torch.float64)
    else:
        blocked = pad[:, None, None, :] | (torch.ones(t, t, dtype=torch.bool).triu(1) if form == "additive-causal" else False)
        mask = torch.zeros(b, 1, t, t, dtype=torch.float64).masked_fill(blocked, float("-inf"))

    def f(w):
        heads = lambda y: y.view(b, -1, h, d).transpose(1, 2)  # noqa: E731
        q, k, v = (heads(x @ w[:, i * h * d : (i + 1) * h * d]) for i in range(3))
        return (sdpa(q, k, v, attn_mask=mask, scale=0.7).sin() * torch.arange(d, dtype=w.dtype)).sum()

    tangents = torch.randn(3, *w.shape, generator=g, dtype=torch.float64)
    dense = torch.autograd.functional.hessian(f, w).reshape(w.numel(), w.numel())
    want = (tangents.reshape(3, -1) @ dense).reshape(tangents.shape)
    calls = []
    original = route_module._hvp
    monkeypatch.setattr(route_module, "_hvp", lambda *a: calls.append(a[5]) or original(*a))
    for backend in _available_backends():
        calls.clear()
        with use_backend(backend), route_module.route():
            got = torch.func.vmap(lambda u: torch.func.jvp(torch.func.grad(f), (w,), (u,))[1])(tangents)
        _close([got], [want], ATTENTION_HVP_VS_DENSE, f"{form} {backend}")
        if form == "bias":
            assert not calls, "a bias is not a key-padding mask: the plain path must run"
        else:
            assert calls and all(torch.equal(p, pad) for p in calls), "the mask must reach the kernel as key padding"


# --- the CUDA kernels (csrc/cuda/attention_hvp.cu) run on the CPU through a stand-in CUDA runtime ---
# tests/cuda_emulation (the cuda_emulator fixture): one std::thread per CUDA thread, real barriers and warp
# shuffles. Built with AddressSanitizer + UBSan (out-of-bounds global or shared memory accesses fail the run) or
# with ThreadSanitizer (a missing barrier between writes and reads of shared memory fails it: checked by removing
# one); the workspace starts as NaN, so a statistic read before it is written shows. FASTHESS_EMU_SMS sets the
# SM count the launch sees, hence the tangent groups: (B, H, Tq, Tk, D, N), causal, padded, dtype, SMs, tool.
EMULATION_CASES = [
    ((2, 2, 7, 7, 5, 3), True, True, torch.float64, 64, "address"),  # 3 tangent groups
    ((1, 1, 70, 70, 20, 2), True, True, torch.float64, 1, "address"),  # 2 × 2 tiles, 2 head-dim chunks, one group
    ((2, 1, 5, 70, 40, 2), False, True, torch.float32, 64, "address"),  # 2 key tiles, 2 head-dim chunks, 2 groups
    ((2, 2, 11, 5, 4, 2), True, True, torch.float32, 4, "address"),  # causal rows past Tk
    ((1, 2, 9, 9, 8, 0), True, False, torch.float64, 4, "address"),  # N = 0: the backward only
    ((1, 1, 70, 70, 20, 2), True, True, torch.float64, 64, "thread"),  # 2 × 2 tiles, 2 groups: races
]


def _run_emulated(emu, x, causal: bool, pad, scale: float, sms: int, tool: str):
    """dq, dk, dv, dq1, dk1, dv1 of the emulated kernels (outputs start at zero, the workspace as NaN)."""
    b, h, tq, d = x[0].shape
    tk, n = x[1].shape[2], x[4].shape[0]
    outs = [torch.zeros_like(t) for t in (x[0], x[1], x[2], x[4], x[5], x[6])]
    ws = torch.full((2 * b * h * tq * (1 + n),), float("nan"), dtype=x[0].dtype)
    keep = None if pad is None else (~pad).to(torch.uint8)
    got = emu.call("attention_hvp", [*x, keep, *outs, ws], [x[0].element_size(), b, h, tq, tk, d, n, causal],
                   [scale], tool=tool, env={"FASTHESS_EMU_SMS": str(sms)})
    return got[9:15]


@pytest.mark.parametrize("shape,causal,padded,dtype,sms,tool", EMULATION_CASES, ids=str)
def test_cuda_kernels_emulated_on_cpu_match_reference(cuda_emulator, shape, causal, padded, dtype, sms, tool) -> None:
    x = hvp_inputs(*shape, dtype)
    pad = padding(shape[0], shape[3]) if padded else None
    exact = hvp_inputs(*shape, torch.float64)
    if shape[-1] == 0:  # the jvp-of-vjp reference does not vmap over no tangents: the blocked torch backend
        want = attention_hvp(*exact, causal=causal, key_padding_mask=pad, scale=0.7, backend="torch")
    else:
        want = reference(*exact, causal=causal, key_padding_mask=pad, scale=0.7)
    got = _run_emulated(cuda_emulator, x, causal, pad, 0.7, sms, tool)
    _close(got, want, ATTENTION_HVP_VS_REFERENCE[dtype], f"emulated cuda {shape}")
