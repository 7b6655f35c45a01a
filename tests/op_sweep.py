"""Run the op-coverage sweep: dense references, one outcome per (case, engine), the README table.

The reference for a case is the diagonal of its dense float64 Hessian computed reverse-over-reverse
(one double backward per row, torch's own ops; under :func:`fasthess.autodiff_safe` only where
torch has no double backward for one of them), checked against central finite differences of
torch's gradient (``tests/tolerances.py``: ``OP_SWEEP_FINITE_DIFFERENCE``, on the scale of the whole
case). Neither trusts a forward-mode rule, which is where the bugs being hunted live. Where torch
has no second-order path at all (``cdist``, ``hardsigmoid``, ...), the finite differences are the
reference and engines are held to their tolerance.

An engine's outcome on a case (``fasthess.diag(..., method="exact", engine=...)``) is one of

* ``exact``: every entry within ``tests/tolerances.py``'s ``ENGINE_VS_DENSE`` (float64) of the reference;
* ``fallback``: exact, after the tangent-adjoint engine handed over to a generic one
  (``meta["engine_fallback"]`` says why);
* ``refused``: a fasthess error (:mod:`fasthess.errors`, :class:`fasthess.capture.CaptureError`)
  whose message names the op;
* ``WRONG``: numbers off (the relative error ``max|got - want| / max|want|`` is in the detail),
  NaN/Inf entries included;
* ``RAW``: any other exception (a bare torch error, or a fasthess error that names no op).
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from op_cases import CASES, OpCase
from tolerances import ENGINE_VS_DENSE, OP_SWEEP_FINITE_DIFFERENCE, assert_entries_close
from torch import Tensor
from zoo import Case, _loss_with

import fasthess
from fasthess import fused_nodes
from fasthess.capture import CaptureError, capture
from fasthess.engines import generic_second_order
from fasthess.errors import FasthessError, NonFiniteCurvatureError, first_line
from fasthess.objective import Objective

D = torch.float64
ENGINES = ("tangent_adjoint", "double_backward", "fwd_rev", "fwd_fwd", "auto")
OUTCOMES = ("exact", "fallback", "refused", "WRONG", "RAW")
FD_STEP = 1e-5  # relative step of the central differences (truncation ~1e-10, round-off ~1e-11 of the gradient)
README_BEGIN, README_END = "<!-- op-coverage:begin -->", "<!-- op-coverage:end -->"

_OP_NAME = re.compile(r"\b(?:aten|fasthess)(?:\.|::)\w+")


class SweepFailure(AssertionError):
    """An outcome the sweep does not accept."""


class WrongNumbers(SweepFailure):
    """``WRONG``: an engine's entries are off."""


class RawError(SweepFailure):
    """``RAW``: an exception other than fasthess's own error naming the op."""


REVERSE, DECOMPOSED, FINITE_DIFFERENCES = (
    "reverse-over-reverse", "reverse-over-reverse under fasthess.autodiff_safe", "finite differences"
)


@dataclass(frozen=True)
class Reference:
    """A case's reference diagonal, per selected parameter.

    ``source``: ``REVERSE``; ``DECOMPOSED`` (one of torch's own ops has no double backward);
    ``FINITE_DIFFERENCES`` (none has a second-order path: ``diag`` is ``finite_difference``).
    ``disagreement``: why the finite differences do not confirm ``diag`` (None: they do).
    """

    diag: dict[str, Tensor]
    finite_difference: dict[str, Tensor]
    source: str
    disagreement: str | None

    def tolerance(self, engine: str) -> tuple[float, float]:
        """(rtol, atol_rel) for an engine's entries against this reference."""
        if self.source == FINITE_DIFFERENCES:
            return OP_SWEEP_FINITE_DIFFERENCE
        return ENGINE_VS_DENSE[(D, engine)]


@dataclass(frozen=True)
class Outcome:
    outcome: str  # one of OUTCOMES
    detail: str  # fallback reason, error message, or relative error
    engine: str | None = None  # the engine that produced the numbers (meta["engine"])
    rel_error: float | None = None

    def failure(self) -> SweepFailure | None:
        if self.outcome == "WRONG":
            return WrongNumbers(self.detail)
        if self.outcome == "RAW":
            return RawError(self.detail)
        return None


@contextlib.contextmanager
def quiet():  # noqa: ANN201
    """Silence the deprecation and performance warnings of torch (NLLLoss2d, KLDivLoss(reduction="mean"), ...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


_case_assessments: dict[str, dict] = {}


@contextlib.contextmanager
def own_assessments(name: str):  # noqa: ANN201
    """Inside: the generic rule's per-op-signature verdicts are case ``name``'s own (restored after), so its
    outcomes do not depend on which tests assessed an op of the same signature with other inputs before."""
    cache = generic_second_order._assessments
    saved = dict(cache)
    cache.clear()
    cache.update(_case_assessments.get(name, {}))
    try:
        yield
    finally:
        _case_assessments[name] = dict(cache)
        cache.clear()
        cache.update(saved)


@functools.lru_cache(maxsize=None)
def built(name: str) -> Case:
    """Case ``name``, built once per session (every engine and the reference see the same model)."""
    with quiet():
        return CASES[name].build()


def _dense(t: Tensor) -> Tensor:
    return t.to_dense() if t.is_sparse else t  # nn.Embedding(sparse=True)'s gradient


def _row_by_row(f, p: Tensor) -> Tensor:  # noqa: ANN001
    """Diagonal of the Hessian of ``f`` at ``p``: one double backward per row."""
    w = p.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(f(w), w, create_graph=True)
        g = _dense(g).reshape(-1)
        out = torch.zeros(p.numel(), dtype=p.dtype)
        for i in range(p.numel()):
            if g[i].requires_grad:
                (row,) = torch.autograd.grad(g[i], w, retain_graph=True, allow_unused=True)
                if row is not None:
                    out[i] = _dense(row).reshape(-1)[i]
    return out


def _finite_difference(f, p: Tensor) -> Tensor:  # noqa: ANN001
    """Diagonal of the Hessian of ``f`` at ``p`` by central differences of torch's gradient."""

    def gradient(w: Tensor) -> Tensor:
        w = w.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(f(w), w, allow_unused=True)
        return (torch.zeros_like(w) if g is None else _dense(g)).reshape(-1)

    flat = p.detach().reshape(-1)
    out = torch.zeros(flat.numel(), dtype=p.dtype)
    for i in range(flat.numel()):
        step = FD_STEP * max(1.0, abs(float(flat[i])))
        e = torch.zeros_like(flat)
        e[i] = step
        out[i] = (gradient((flat + e).view_as(p))[i] - gradient((flat - e).view_as(p))[i]) / (2 * step)
    return out


_ALL = "all selected parameters"


def _joined(d: dict[str, Tensor]) -> dict[str, Tensor]:
    """All layers as one: finite differences err on the scale of the whole case, not of each layer."""
    return {_ALL: torch.cat([v.reshape(-1) for v in d.values()])}


def _mismatch(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float, atol: float) -> str | None:
    """``tolerances.assert_entries_close``'s message for the first layer that differs, else None."""
    for name, w in want.items():
        try:
            assert_entries_close(got[name], w, rtol, atol, name)
        except AssertionError as err:
            return str(err)
    return None


def rel_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    """``max|got - want| / max|want|`` over all the case's entries (inf where ``got`` has NaN)."""
    got, want = _joined(got)[_ALL].double(), _joined(want)[_ALL]
    diff = (got - want).abs()
    if bool(diff.isnan().any()):
        return float("inf")
    scale = float(want.abs().max())
    return float(diff.max()) / scale if scale > 0 else float(diff.max())


def _diagonals(case: Case, of) -> dict[str, Tensor]:  # noqa: ANN001
    params = dict(case.model.named_parameters())
    return {n: of(functools.partial(_loss_with, case, n), params[n]) for n in case.layers}


@functools.lru_cache(maxsize=None)
def reference(name: str) -> Reference:
    """Case ``name``'s reference diagonal (computed once per session)."""
    case = built(name)
    fd = _diagonals(case, _finite_difference)
    try:
        diag, source = _diagonals(case, _row_by_row), REVERSE
    except RuntimeError:  # an op without a double backward in torch (NotImplementedError is one)
        try:
            with fasthess.autodiff_safe():
                diag, source = _diagonals(case, _row_by_row), DECOMPOSED
        except RuntimeError:
            return Reference(fd, fd, FINITE_DIFFERENCES, None)
    return Reference(diag, fd, source, _mismatch(_joined(diag), _joined(fd), *OP_SWEEP_FINITE_DIFFERENCE))


@functools.lru_cache(maxsize=1)
def _aten_names() -> frozenset[str]:
    return frozenset(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("aten::"))


def names_op(err: BaseException) -> bool:
    """Whether a fasthess error names the op: its ``op``, ``aten.x`` / ``aten::x`` in the message, or torch's own
    words quoted in it (an ATen op name in quotes or with an underscore: ``grid_sampler_2d``)."""
    text = str(err)
    if getattr(err, "op", None) or _OP_NAME.search(text):
        return True
    return any(("_" in w or f"'{w}'" in text) for w in re.findall(r"[A-Za-z_]\w*", text) if w in _aten_names())


@functools.lru_cache(maxsize=None)
def run(name: str, engine: str) -> Outcome:
    """The outcome of ``engine`` on case ``name`` (computed once per session)."""
    op: OpCase = CASES[name]
    case = built(name)
    ref = reference(name)
    want = ref.diag
    try:
        with fused_nodes.using(op.fused), own_assessments(name), quiet():
            res = fasthess.diag(case.model, case.loss, case.layers, method="exact", engine=engine)
    except NonFiniteCurvatureError as err:
        err_ = rel_error({n: err.result[n].values for n in want}, want)
        return Outcome("WRONG", f"NaN/Inf entries (relative error {err_:.2g})", err.result.meta["engine"], err_)
    except (FasthessError, CaptureError) as err:
        if names_op(err):
            return Outcome("refused", f"{type(err).__name__}: {first_line(err)}")
        return Outcome("RAW", f"{type(err).__name__} names no op: {first_line(err)}")
    except Exception as err:  # noqa: BLE001 - every other escape is the finding
        return Outcome("RAW", f"{type(err).__name__}: {first_line(err)}")
    got = {n: res[n].values for n in want}
    used = res.meta["engine"]
    err = rel_error(got, want)
    tolerance = ref.tolerance(used)
    compared = (_joined(got), _joined(want)) if ref.source == FINITE_DIFFERENCES else (got, want)
    if _mismatch(*compared, *tolerance) is not None:
        return Outcome("WRONG", f"relative error {err:.2g} ({used})", used, err)
    if res.meta["engine_fallback"]:
        return Outcome("fallback", res.meta["engine_fallback"], used, err)
    return Outcome("exact", "", used, err)


@functools.lru_cache(maxsize=None)
def recorded_ops(name: str) -> frozenset[str]:
    """The ops the tangent-adjoint engine records for a case (under its fused-node mode), as ``str(op)``."""
    case = built(name)
    params = fasthess.resolve_parameters(case.model, case.layers)
    with fasthess.autodiff_safe(), fused_nodes.using(CASES[name].fused), quiet():
        objective = Objective(case.model, [case.loss], params)
        graph = capture(lambda ps: objective(0, ps), objective.primals, fused=fused_nodes.enabled())
    return frozenset(str(node.func) for node in graph.nodes)


def outcomes_of(name: str) -> dict[str, Outcome]:
    """Every engine's outcome on case ``name``."""
    return {engine: run(name, engine) for engine in ENGINES}



# ----------------------------------------------------------------------------- the README table

_CELL = {"exact": "exact", "fallback": "falls back", "refused": "refused", "WRONG": "**wrong**", "RAW": "**error**"}
README_ENGINES = ("auto", "tangent_adjoint", "double_backward", "fwd_rev", "fwd_fwd")
REASON_CHARS = 200  # per explanation


def _short(text: str) -> str:
    """One line, at most REASON_CHARS, without the measured differences of fasthess's op audit (they would tie
    the README to the last digits of one machine's arithmetic)."""
    text = re.sub(r"max difference \S+ of max magnitude [^)\s]+", "max difference …", text)
    text = re.sub(r"differ by \S+ of [^)\s]+", "differ", text)
    text = re.sub(r"\s+", " ", text).replace("|", "\\|").strip()
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1].rstrip() + "…"


def _compact(detail: str) -> str:
    """A fallback's or refusal's message without fasthess's boilerplate."""
    m = re.match(r"\w+ cannot record this loss \((.*)\); used the generic engine$", detail)
    if m:
        return f"not recordable: {m.group(1)}"
    m = re.match(r"\w+: engine '(\w+)' cannot take the second derivative of this loss \(torch: (.*?)\)(?:;|\. )",
                 detail)
    if m:
        return f"{m.group(1)}: {m.group(2)}"
    m = re.match(r"\w+: engine '(\w+)' \([^)]*\) cannot be trusted on this loss: (.*?)\. Use engine=", detail)
    if m:  # the forward-mode engines' audit; "cannot be recorded (why)": the why is the fallback's, said before
        why = re.sub(r" op by op \(.*\)$", " op by op", m.group(2))
        return f"{m.group(1)}: {why}"
    return detail


def _reason(name: str, outcomes: dict[str, Outcome], known: Mapping[tuple[str, str], str]) -> str:
    """Why: the known bug (WRONG / RAW), then the first fallback's and the first refusal's explanation."""
    parts = []
    for engine in README_ENGINES:
        o = outcomes[engine]
        if o.outcome in ("WRONG", "RAW"):
            parts.append(known.get((name, engine), f"{o.outcome} (not in KNOWN_FAILURES): {o.detail}"))
            break
    for kind in ("fallback", "refused"):
        found = [outcomes[e] for e in README_ENGINES if outcomes[e].outcome == kind]
        if found:
            parts.append(_compact(found[0].detail))
    return "; ".join(_short(p) for p in parts)


def readme_row(name: str, outcomes: dict[str, Outcome], known: Mapping[tuple[str, str], str]) -> str | None:
    """The README table's row of one case (``known``: the KNOWN_FAILURES reasons), or None where all are exact."""
    if all(o.outcome == "exact" for o in outcomes.values()):
        return None
    cells = [_CELL[outcomes[e].outcome] for e in README_ENGINES]
    return f"| `{name}` | {CASES[name].kind} | " + " | ".join(cells) + f" | {_reason(name, outcomes, known)} |"


README_HEAD = (
    "Generated by `scripts/op_coverage.py --write` from the op-coverage sweep (`tests/test_op_coverage.py`, "
    "`tests/op_cases.py`: {total} cases, each a tiny float64 model against a dense Hessian); do not edit by hand. "
    "Listed: every case where some engine is not exact with no fallback, i.e. falls back to a generic engine "
    "(`engine=\"auto\"` and `\"tangent_adjoint\"` for a loss it cannot record), is refused with fasthess's "
    "error naming the op, gives **wrong** numbers or raises another **error** (the last two are known bugs, "
    "listed in `KNOWN_FAILURES`). The other {exact} cases are exact on every engine.\n"
)


def readme_section(rows: dict[str, str | None]) -> str:
    """The generated Markdown between the README markers, from every case's row (catalogue order)."""
    listed = [r for r in rows.values() if r is not None]
    lines = [
        README_HEAD.format(total=len(rows), exact=len(rows) - len(listed)),
        "| case | kind | " + " | ".join(f"`{e}`" for e in README_ENGINES) + " | why |",
        "|---" * (3 + len(README_ENGINES)) + "|",
        *listed,
    ]
    return "\n".join(lines) + "\n"


def readme_split(text: str) -> tuple[str, str, str]:
    """README text -> (before the section, the section, after it); raises if the markers are missing."""
    head, sep, rest = text.partition(README_BEGIN + "\n")
    body, sep2, tail = rest.partition(README_END)
    if not sep or not sep2:
        raise ValueError(f"README.md lacks the markers {README_BEGIN} / {README_END}")
    return head + sep, body, sep2 + tail


def readme_rows_in(section: str) -> dict[str, str]:
    """The listed rows of a README section, by case name."""
    out = {}
    for line in section.splitlines():
        m = re.match(r"\| `([^`]+)` \|", line)
        if m:
            out[m.group(1)] = line
    return out

