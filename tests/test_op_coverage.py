"""Op coverage: torch.nn layers, activations, losses, functional ops, every rule, decomposition and fused node.

Each case of ``tests/op_cases.py`` (a tiny float64 model in eval mode whose loss passes through one
op) runs on every engine with ``method="exact"`` and is compared with its dense reference
(``tests/op_sweep.py``: reverse-over-reverse, confirmed by central differences of the gradient). An
engine may be exact, fall back (``engine="auto"``, or a loss the tangent-adjoint engine cannot record)
with exact numbers, or refuse with fasthess's own error naming the op; ``WRONG`` numbers and ``RAW``
errors fail. Those found today are listed in :data:`KNOWN_FAILURES`, strict xfails: a case that starts
passing fails until its entry is removed, and one that fails differently (WRONG <-> RAW) fails too.

The default run takes the representative cases (every op, layer class, rule, decomposition and fused
node has one); ``pytest tests/test_op_coverage.py -m slow`` runs the remaining variants and checks the
whole generated README section (``scripts/op_coverage.py --write`` regenerates it; never edit it by
hand). Measured on 2 cores (torch 2.13 CPU, 2 intra-op threads): default run (326 cases x 5 engines)
about 47 s, ``-m "slow or not slow"`` (all 575) about 135 s. With other jobs saturating the cores the
threads contend and it took up to 6 min; ``--torch-threads=1`` then keeps it near the quiet-machine time.
"""

from __future__ import annotations

import collections
import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from op_cases import CASES, KINDS, MAX_ENTRIES, entries, module_classes, module_name
from op_sweep import (
    ENGINES,
    FINITE_DIFFERENCES,
    RawError,
    WrongNumbers,
    built,
    outcomes_of,
    quiet,
    readme_row,
    readme_rows_in,
    readme_section,
    readme_split,
    recorded_ops,
    reference,
    run,
)

from fasthess import decompositions, fused_nodes
from fasthess.engines.second_order_rules import RULES

README = Path(__file__).resolve().parents[1] / "README.md"
RULE_OPS = ("aten.", "fasthess.")  # covers entries naming rule-table ops (the others are decompositions)
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread)
FULL_SWEEP = [
    pytest.mark.slow,
    pytest.mark.skipif("'slow' not in config.getoption('markexpr')", reason="full sweep only: pytest -m slow"),
]

# ----------------------------------------------------------------------------- what is wrong today
# (case, engine) -> "WRONG: why" / "RAW: why": reviewed, the work list of issue 20. Reasons name the root cause.

KNOWN_FAILURES: dict[tuple[str, str], str] = {}

# Cases whose reverse-over-reverse reference is not confirmed by finite differences of the gradient, and why.
REFERENCE_DISAGREES = {
    "aten.detach.default": (
        "the loss uses h.detach(): finite differences of torch's gradient move the detached value too, "
        "reverse-over-reverse (the reference used) keeps it constant, as torch's stop-gradient does at every order"
    ),
}


def _cases() -> list:
    return [pytest.param(c.name, marks=FULL_SWEEP if c.slow else [], id=c.name.replace(" ", "_")) for c in CASES.values()]


def _runs() -> list:
    out = []
    for case in CASES.values():
        for engine in ENGINES:
            marks = list(FULL_SWEEP) if case.slow else []
            known = KNOWN_FAILURES.get((case.name, engine))
            if known is not None:
                raises = WrongNumbers if known.startswith("WRONG") else RawError
                marks.append(pytest.mark.xfail(strict=True, raises=raises, reason=known))
            out.append(pytest.param(case.name, engine, marks=marks, id=f"{case.name}-{engine}".replace(" ", "_")))
    return out


@pytest.mark.parametrize("name, engine", _runs())
def test_engine_is_exact_falls_back_or_refuses(name: str, engine: str) -> None:
    outcome = run(name, engine)
    failure = outcome.failure()
    if failure is not None:
        raise failure
    assert outcome.outcome in ("exact", "fallback", "refused"), outcome


@pytest.mark.parametrize("name", _cases())
def test_reference_agrees_with_finite_differences(name: str) -> None:
    ref = reference(name)
    if ref.source == FINITE_DIFFERENCES:
        pytest.skip("torch has no second-order path here: the finite differences are the reference")
    if name in REFERENCE_DISAGREES:
        pytest.xfail(REFERENCE_DISAGREES[name])  # checked below to still disagree
    assert ref.disagreement is None, ref.disagreement


def test_reference_disagreements_are_real() -> None:
    """The listed disagreements still occur (a stale entry would hide a broken reference)."""
    for name in REFERENCE_DISAGREES:
        assert reference(name).disagreement is not None, f"{name} agrees now: drop it from REFERENCE_DISAGREES"
        assert reference(name).source != FINITE_DIFFERENCES


def test_known_failures_name_real_cases_and_engines() -> None:
    for (name, engine), reason in KNOWN_FAILURES.items():
        assert name in CASES and engine in ENGINES, (name, engine)
        assert reason.split(":")[0] in ("WRONG", "RAW"), reason
    assert set(REFERENCE_DISAGREES) <= set(CASES)


# ----------------------------------------------------------------------------- the catalogue itself


def test_catalogue_cases_are_tiny_float64_eval_models() -> None:
    for name, op in CASES.items():
        assert op.kind in KINDS, name
        case = built(name)
        assert not any(m.training for m in case.model.modules()), f"{name}: a module in training mode"
        assert 0 < entries(case) <= MAX_ENTRIES, f"{name}: {entries(case)} selected entries"
        with quiet():
            loss = case.loss()
        assert loss.dim() == 0 and loss.dtype == torch.float64 and bool(torch.isfinite(loss)), name


def test_every_torch_nn_module_class_has_a_default_case() -> None:
    have = collections.defaultdict(list)
    for op in CASES.values():
        if module_name(op.name) is not None:
            have[module_name(op.name)].append(op)
    missing = sorted(set(module_classes()) - set(have))
    assert not missing, f"torch.nn classes without a case: {missing}"
    only_slow = sorted(n for n in module_classes() if all(op.slow for op in have[n]))
    assert not only_slow, f"torch.nn classes with slow cases only: {only_slow}"


def test_every_rule_has_a_case() -> None:
    covered = {c for op in CASES.values() for c in op.covers}
    missing = sorted(str(op) for op in RULES if str(op) not in covered)
    assert not missing, f"rules without a case (add one to op_cases.RULE_CASES): {missing}"


def _composite(op_name: str) -> bool:
    """Whether torch decomposes the op before a TorchDispatchMode sees it (so the recorder never does)."""
    op = functools.reduce(getattr, op_name.split("."), torch.ops)
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")


@pytest.mark.parametrize("name", [c.name for c in CASES.values() if any(x.startswith(RULE_OPS) for x in c.covers)])
def test_rule_and_fused_cases_record_their_op(name: str) -> None:
    """Each rule case records the op it covers (ops torch decomposes before recording excepted: reshape, ...)."""
    recorded = recorded_ops(name)
    for op in CASES[name].covers:
        if op.startswith(RULE_OPS):
            assert op in recorded or _composite(op), f"{name} does not record {op}: {sorted(recorded)}"


def _decomposition_name(key: tuple) -> str:
    """``(torch.nn.functional, "glu")`` -> ``"F.glu"``; ``(torch, "cdist")`` -> ``"torch.cdist"``."""
    module, attr = key
    return f"{'F' if module is F else module.__name__}.{attr}"


def test_every_decomposition_has_a_case_that_calls_it(monkeypatch: pytest.MonkeyPatch) -> None:
    original = decompositions._patcher.replacements
    calls: collections.Counter = collections.Counter()

    def counted() -> dict:
        def wrap(key, fn):  # noqa: ANN001, ANN202
            def inner(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                calls[key] += 1
                return fn(*args, **kwargs)
            return inner
        return {key: wrap(_decomposition_name(key), fn) for key, fn in original().items()}

    monkeypatch.setattr(decompositions._patcher, "replacements", counted)
    for name in sorted(_decomposition_name(key) for key in original()):
        cases = [op for op in CASES.values() if name in op.covers]
        assert cases, f"decomposition {name} has no case (add one to op_cases.DECOMPOSITIONS)"
        for op in cases:
            calls.clear()
            case = built(op.name)
            with decompositions.autodiff_safe(), quiet():
                case.loss()
            assert calls[name], f"{op.name} does not call {name}"


def test_every_fused_node_has_a_case_that_records_it() -> None:
    nodes = [f"fasthess.{n}.default" for n in fused_nodes.__all__ if n.endswith("_fused")]
    assert nodes and all(any(n == str(op) for op in RULES) for n in nodes)
    for node in nodes:
        cases = [op for op in CASES.values() if node in op.covers and op.kind == "fused"]
        assert cases, f"fused node {node} has no case (add one to op_cases.FUSED_CASES)"
        assert all(node in recorded_ops(op.name) for op in cases), node


# ----------------------------------------------------------------------------- the generated README section


def test_readme_rows_of_the_default_cases_are_current() -> None:
    """The default cases' rows of README's op-coverage section are what they give now (slow cases: -m slow)."""
    _, section, _ = readme_split(README.read_text())
    listed = readme_rows_in(section)
    assert set(listed) <= set(CASES), f"README lists unknown cases: {sorted(set(listed) - set(CASES))}"
    stale = []
    for op in CASES.values():
        if not op.slow and listed.get(op.name) != readme_row(op.name, outcomes_of(op.name), KNOWN_FAILURES):
            stale.append(op.name)
    assert not stale, f"README's op-coverage rows are stale for {stale}: run scripts/op_coverage.py --write"


@pytest.mark.parametrize("_", [pytest.param(None, marks=FULL_SWEEP, id="all")])
def test_readme_section_is_current(_: None) -> None:
    _, section, _ = readme_split(README.read_text())
    want = readme_section({name: readme_row(name, outcomes_of(name), KNOWN_FAILURES) for name in CASES})
    assert section == want, "README's op-coverage section is stale: run scripts/op_coverage.py --write"
