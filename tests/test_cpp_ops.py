"""Every C++ op gives the same numbers whatever its caller and the number of intra-op threads.

Grad mode, inference mode and the dispatcher's excluded keys are thread-local; an op that runs ATen
calls in ``at::parallel_for`` workers once failed with inputs that require grad as soon as more than
one thread ran (csrc/parallel.h). Each op here is called with inputs that require grad, under
``no_grad`` and under ``inference_mode``, at 1 and 4 threads, and must match its call on plain inputs
at one thread. Each op's own numbers are checked against its reference in ``test_kernels_*.py``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tolerances import KERNEL_VS_REFERENCE

from fasthess.kernels.registry import extension_loaded

CSRC = Path(__file__).resolve().parents[1] / "csrc"
pytestmark = pytest.mark.skipif(not extension_loaded(), reason="C++ extension not built")


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _attention(n: int = 2, b: int = 2, h: int = 2, t: int = 70, d: int = 4) -> list[torch.Tensor]:
    q, k, v = (_randn(b, h, t, d, seed=s) for s in range(3))
    return [q, k, v] + [_randn(n, b, h, t, d, seed=10 + s) for s in range(4)]


def _hutchinson(n: int = 5000, k: int = 3) -> list[torch.Tensor]:
    z = torch.randint(0, 2, (k, n), generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    return [_randn(n, seed=1), _randn(n, seed=2).abs(), z, _randn(k, n, seed=3)]


# op name -> (inputs: the tensor arguments; call(*tensors) -> outputs; indices of the tensors it writes).
# Sizes make every op split its work over several threads (grain sizes in csrc/*.cpp).
CASES: dict[str, tuple[Callable[[], list[torch.Tensor]], Callable[..., object], tuple[int, ...]]] = {
    "attention_jet2": (
        _attention,
        lambda q, k, v, q1, k1, v1, q2: torch.ops.fasthess.attention_jet2(
            q, k, v, q1, k1, v1, q2, None, None, None, True, 0.5
        ),
        (),
    ),
    "attention_hvp": (
        lambda: _attention() + [_randn(2, 2, 70, 4, seed=20)],
        lambda q, k, v, q1, k1, v1, dout1, dout: torch.ops.fasthess.attention_hvp(
            q, k, v, dout, q1, k1, v1, dout1, None, False, 0.5
        ),
        (),
    ),
    "gelu_jet2": (
        lambda: [_randn(9000, seed=0), _randn(2, 9000, seed=1), _randn(2, 9000, seed=2)],
        lambda x, x1, x2: torch.ops.fasthess.gelu_jet2(x, x1, x2, "none"),
        (),
    ),
    "layer_norm_jet2": (
        lambda: [_randn(4000, 8, seed=0), _randn(8, seed=1), _randn(8, seed=2), _randn(2, 4000, 8, seed=3),
                 _randn(2, 4000, 8, seed=4)],
        lambda x, w, b, x1, x2: torch.ops.fasthess.layer_norm_jet2(x, w, b, x1, x2, 1e-5),
        (),
    ),
    "cross_entropy_jet2": (
        lambda: [_randn(8, 5, seed=0), _randn(3, 8, 5, seed=1), _randn(3, 8, 5, seed=2)],
        lambda z, z1, z2: torch.ops.fasthess.cross_entropy_jet2(z, torch.arange(8) % 5, z1, z2, -100),
        (),
    ),
    "onehot_weight_tangent": (
        lambda: [_randn(4, 3, 5, seed=0)],
        lambda x: torch.ops.fasthess.onehot_weight_tangent(
            x, torch.tensor([0, 1, 3, -1, 2, 3]), torch.tensor([4, 0, 2, 0, 1, 3]), 4
        ),
        (),
    ),
    "hutchinson_update_": (
        _hutchinson,
        lambda mean, m2, z, hz: torch.ops.fasthess.hutchinson_update_(mean, m2, z, hz, 4),
        (0, 1),
    ),
    "hutchinson_update_seeded_": (
        lambda: _hutchinson()[:2] + [_randn(3, 5000, seed=3)],
        lambda mean, m2, hz: torch.ops.fasthess.hutchinson_update_seeded_(mean, m2, hz, 7, 2, 4),
        (0, 1),
    ),
}


def _registered_ops() -> set[str]:
    """Names of the ops csrc/*.cpp define (``m.def("name(...``)."""
    return {m for f in CSRC.glob("*.cpp") for m in re.findall(r'm\.def\(\s*"(\w+)\(', f.read_text())}


def test_every_op_has_a_case() -> None:
    assert _registered_ops() == set(CASES), "add a case for each C++ op (and drop cases of removed ones)"


def test_no_bare_parallel_for() -> None:
    """Ops use fasthess::parallel_for (workers in the caller's thread-local state), never at::parallel_for."""
    bare = [f.name for f in CSRC.glob("*.cpp") if "at::parallel_for(" in f.read_text()]
    assert not bare, f"{bare} call at::parallel_for: use fasthess::parallel_for from parallel.h"


def _run(op: str, caller: str) -> list[torch.Tensor]:
    make, call, written = CASES[op]
    mode = torch.inference_mode() if caller == "inference_mode" else contextlib.nullcontext()
    with mode:
        tensors = make()
        if caller in ("requires_grad", "no_grad"):  # a user's parameters; written tensors stay plain
            tensors = [t if i in written else t.requires_grad_(True) for i, t in enumerate(tensors)]
        with torch.no_grad() if caller == "no_grad" else contextlib.nullcontext():
            out = call(*tensors)
    got = [tensors[i] for i in written] if written else list(out)
    return [t.detach().clone() for t in got]


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("op", sorted(CASES))
def test_same_numbers_for_every_caller_and_thread_count(op: str, threads) -> None:
    threads(1)
    want = _run(op, "plain")
    rtol, atol = KERNEL_VS_REFERENCE[torch.float64]
    for n in (1, 4):
        threads(n)
        for caller in ("plain", "requires_grad", "no_grad", "inference_mode"):
            got = _run(op, caller)
            for i, (g, w) in enumerate(zip(got, want)):
                where = f"{op} output {i}, {n} threads, {caller}"
                torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")  # noqa: B023
