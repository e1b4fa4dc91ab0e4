"""Shared machinery of the op_db and module_db sweeps (tests/test_opdb_sweep.py, tests/test_moduledb_sweep.py).
No tests here. ``benchmarks/sweep.py`` runs the full sweep tests (``pytest -m sweep``) with the settings below
(``MADFUNC_SWEEP_*`` in the environment) and summarises the results they append to ``MADFUNC_SWEEP_RESULTS``.

Every case is one function of some float64 tensors run as a single ``Exact`` forward segment, differentiated
two ways and compared with torch's own reverse mode:

(a) ``mf.mixed_grad(loss, plan=...)`` against ``torch.func.grad(loss)`` (outside a madfunc transform a segment
    *is* the plain function, so the same ``loss`` is the reference);
(b) ``loss(...).backward()`` under ``mf.use_plan(plan)`` against plain ``backward()``, on fresh leaves;
(a) again in ``REPLAY`` mode: the second call of each transform, from the passes recorded by the first.

The loss contracts every floating (or complex, through ``view_as_real``) output leaf with a fixed random
cotangent, so the whole vector-Jacobian product is checked, not one summary of it. Each case lands in one of
``CATEGORIES``; ``BAD`` ones are bugs of madfunc (a torch error that names no segment, a silently wrong gradient,
or a warning of madfunc's own that names no segment).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import optree
import torch

import madfunc as mf

# -- categories ------------------------------------------------------------------------------------------
PASS = "pass"
MADFUNC_ERROR = "madfunc_error"  # a refusal that names the segment (or a madfunc error type): fine
RAW_ERROR = "raw_error"  # any other exception from the madfunc run: BAD (the user gets no guidance)
MISMATCH = "mismatch"  # a wrong gradient, silently: BAD
WARNING = "warning"  # the madfunc run warned (and the reference did not), naming no segment: BAD
INHERITED = "inherited"  # wrong, but because torch's own forward mode disagrees with its reverse mode
TIMEOUT = "timeout"  # the case ran past its time limit (reported, not judged)
REFERENCE_ERROR = "reference_error"  # the plain reference itself fails: nothing to compare (not counted)
NO_GRAD_INPUTS = "no_grad_inputs"  # nothing to differentiate (not counted)

CATEGORIES = (RAW_ERROR, MISMATCH, WARNING, TIMEOUT, MADFUNC_ERROR, INHERITED, PASS, REFERENCE_ERROR, NO_GRAD_INPUTS)
BAD = frozenset({RAW_ERROR, MISMATCH, WARNING})
# Combining the results of several samples / both modes of one op: the first category in CATEGORIES that occurs
# wins, so one bad sample makes the op bad and a reference failure never hides a real result.
_SEVERITY = {c: i for i, c in enumerate(CATEGORIES)}

# -- tolerances ------------------------------------------------------------------------------------------
# Both sides compute the same derivative in float64 along different floating-point paths (torch's jvp rule and
# a contraction against basis tangents, vs. torch's vjp rule). Their rounding differences are bounded by about
# (number of terms summed) * (conditioning of the op at the sample) * eps64; op_db samples have at most ~1e3
# terms and the linalg samples are built well conditioned (~1e2..1e4), so about 1e3 * 1e4 * 2.2e-16 ~ 2e-9
# relative. RTOL = 1e-7 sits ~50x above that, while a real bug (a dropped term, a different dropout mask, a
# wrong rule) is an O(1) relative error: ~1e7 times the tolerance. ATOL is relative to the gradient's
# largest entry (absolute errors scale with it), with a floor for all-zero gradients.
RTOL = 1e-7
ATOL = 1e-9
# Outputs in a lower precision (e.g. op ``half``) are rounded once in that precision on either side, in
# possibly different places: allow a few of its ulps instead.
LOW_PRECISION_ULPS = 16
SEED = 0  # torch.manual_seed before every run, so random ops draw the same numbers in reference and madfunc

# -- settings (benchmarks/sweep.py sets them through the environment) ----------------------------------------
# Replay mode (MADFUNC_SWEEP_REPLAY=1, benchmarks/sweep.py --replay): mode (a) calls each transform twice and
# keeps the second result, with madfunc recording a pass on its first clean sighting, so every case that can be
# recorded is checked as replayed from its recording (madfunc/engine/replay.py).
REPLAY = os.environ.get("MADFUNC_SWEEP_REPLAY", "") == "1"
if REPLAY:
    from madfunc.engine import replay as _replay

    _replay.RECORD_AFTER = 1
# Where samples, modules and cotangents live (MADFUNC_SWEEP_DEVICE, benchmarks/sweep.py --device). Random data is
# still drawn on CPU generators and moved, so a case's numbers are the same on every device.
DEVICE = os.environ.get("MADFUNC_SWEEP_DEVICE", "cpu")
# The full sweep tests' samples per op / module, seconds per sample and intra-op threads (tiny samples: one).
SAMPLES = int(os.environ.get("MADFUNC_SWEEP_SAMPLES", "3"))
TIMEOUT = float(os.environ.get("MADFUNC_SWEEP_TIMEOUT", "120"))
THREADS = int(os.environ.get("MADFUNC_SWEEP_THREADS", "1"))
# A JSON-lines file every full sweep test appends its result to (``report``), for benchmarks/sweep.py.
RESULTS = os.environ.get("MADFUNC_SWEEP_RESULTS", "")


def on_device(x: Any) -> Any:
    """``x`` on ``DEVICE`` if it is a tensor elsewhere (a leaf again, with the same requires_grad), else ``x``."""
    if not isinstance(x, torch.Tensor) or x.device == torch.device(DEVICE):
        return x
    return x.detach().to(DEVICE).requires_grad_(x.requires_grad)


@dataclasses.dataclass
class CaseResult:
    """The outcome of one sample (of an op or a module) in one mode ("grad" or "backward")."""

    category: str
    mode: str = ""
    detail: str = ""  # the first line of the error / warning, or the size of the mismatch
    error_type: str = ""


@dataclasses.dataclass
class SweepResult:
    """Every case of one op (or module in one training mode), and the category they combine to."""

    name: str
    cases: list[tuple[int, CaseResult]] = dataclasses.field(default_factory=list)  # (sample index, result)
    setup_error: str = ""

    @property
    def category(self) -> str:
        if not self.cases:
            return REFERENCE_ERROR if self.setup_error else NO_GRAD_INPUTS
        return worst(c.category for _, c in self.cases)

    def first(self, category: str) -> CaseResult | None:
        return next((c for _, c in self.cases if c.category == category), None)

    def summary(self) -> str:
        """One line for an assertion message or a report."""
        case = self.first(self.category)
        if case is None:
            return f"{self.name}: {self.category} {self.setup_error}"
        return f"{self.name}: {self.category} [{case.mode}] {case.error_type}: {case.detail}"


def worst(categories: Iterator[str] | Sequence[str]) -> str:
    return min(categories, key=lambda c: _SEVERITY[c], default=NO_GRAD_INPUTS)


def first_line(text: str, limit: int = 300) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return (lines[0] if lines else "")[:limit]


# -- robustness --------------------------------------------------------------------------------------------
class CaseTimeout(Exception):
    """Raised by the alarm when one case runs too long."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise CaseTimeout after ``seconds`` (main thread, POSIX only; a no-op elsewhere or for None).

    A C++ kernel is not interrupted, but the next Python-level step raises, so one slow op cannot stall a
    sweep for long.
    """
    if not seconds or not hasattr(signal, "setitimer"):
        yield
        return

    def alarm(signum, frame):
        raise CaseTimeout(f"ran past the {seconds:g} s limit")

    try:
        previous = signal.signal(signal.SIGALRM, alarm)
    except ValueError:  # not the main thread
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def recorded_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning (none becomes an error, whatever pytest's filters say)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _warning_key(w: warnings.WarningMessage) -> tuple[str, str]:
    return (w.category.__name__, first_line(str(w.message)))


# Warnings that are torch's, whoever happens to trigger them first: pyproject's filterwarnings ignores this one
# too (torch's lazy imports, e.g. on the first vmap, warn about torch.jit.script once per process).
IGNORED_WARNINGS = ("`torch.jit.script` is deprecated",)


def _ignored(w: warnings.WarningMessage) -> bool:
    return any(text in str(w.message) for text in IGNORED_WARNINGS)


# -- pytrees of tensors ------------------------------------------------------------------------------------
def is_diff(x: Any) -> bool:
    """What madfunc differentiates (and what the sweeps pass as explicit segment arguments)."""
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.requires_grad


def fresh(t: torch.Tensor) -> torch.Tensor:
    """An independent leaf that needs a gradient, with the same value (no run sees another's .grad)."""
    return t.detach().clone().requires_grad_()


def contraction(out: Any) -> Callable[[Any], torch.Tensor]:
    """``loss(out) = sum_i <real(out_i), c_i>`` over the floating / complex leaves of ``out``, with fixed
    random cotangents ``c_i`` (shapes taken from ``out``; integer and bool leaves carry no gradient)."""
    gen = torch.Generator().manual_seed(1234)
    cotangents = []
    for leaf in optree.tree_leaves(out):
        if isinstance(leaf, torch.Tensor) and (leaf.is_floating_point() or leaf.is_complex()):
            shape = (*leaf.shape, 2) if leaf.is_complex() else leaf.shape
            cotangents.append(torch.randn(shape, dtype=torch.float64, generator=gen).to(leaf.device))
        else:
            cotangents.append(None)

    def loss(value: Any) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for leaf, c in zip(optree.tree_leaves(value), cotangents, strict=True):
            if c is None:
                continue
            # view_as_real: the real loss sees both parts of a complex output (torch.real alone would drop
            # the imaginary part's gradient).
            real = torch.view_as_real(leaf.resolve_conj()) if leaf.is_complex() else leaf
            total = total + (real.to(torch.float64) * c).sum()
        return total

    return loss


def output_dtypes(out: Any) -> list[torch.dtype]:
    return [leaf.dtype for leaf in optree.tree_leaves(out) if isinstance(leaf, torch.Tensor)]


def output_note(out: Any) -> str:
    dtypes = output_dtypes(out)
    notes = ["complex output"] if any(d.is_complex for d in dtypes) else []
    if any(d in (torch.float16, torch.bfloat16, torch.float32) for d in dtypes):
        notes.append("low-precision output")
    return ", ".join(notes)


def tolerances(dtypes: Sequence[torch.dtype]) -> tuple[float, float]:
    eps = max((torch.finfo(d).eps for d in dtypes if d.is_floating_point or d.is_complex), default=0.0)
    low = LOW_PRECISION_ULPS * eps if eps > torch.finfo(torch.float64).eps else 0.0
    return max(RTOL, low), max(ATOL, low)


def _as_list(grads: Any) -> list[torch.Tensor]:
    return [g for g in optree.tree_leaves(grads)]


def compare(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], rtol: float, atol: float) -> str:
    """'' if close, else a description of the worst entry. ``atol`` is relative to the largest |expected|."""
    scale = max((float(e.abs().max()) for e in expected if e.numel() and torch.isfinite(e).all()), default=0.0)
    atol = atol * max(1.0, scale)
    worst_text, worst_ratio = "", 0.0
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if a.shape != e.shape:
            return f"gradient {i}: shape {tuple(a.shape)} vs reference {tuple(e.shape)}"
        a64, e64 = a.detach().to(torch.float64), e.detach().to(torch.float64)
        same_nonfinite = (a64.isnan() & e64.isnan()) | (a64 == e64)
        err = torch.where(same_nonfinite, torch.zeros_like(a64), (a64 - e64).abs())
        err = torch.nan_to_num(err, nan=math.inf)
        allowed = atol + rtol * e64.abs().nan_to_num(nan=0.0, posinf=0.0)
        if not bool((err <= allowed).all()):
            ratio = float((err / allowed).max())
            if ratio > worst_ratio:
                worst_ratio = ratio
                worst_text = f"gradient {i}: max |madfunc - torch| = {float(err.max()):.3g} (scale {scale:.3g})"
    return worst_text


# -- one case ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    """One function of explicit differentiated tensors, with its segment name and a plain twin.

    ``loss(*diff)`` calls the segment named ``name`` (a madfunc segment) and returns a real scalar;
    ``diff`` are the leaves to differentiate. ``before_run`` resets state (seed, module copies) before each
    run; ``after_run`` returns extra state to compare after the run (e.g. BatchNorm running statistics).
    """

    name: str
    make_loss: Callable[[], Callable[..., torch.Tensor]]  # a fresh loss (e.g. over a fresh module copy)
    diff: list[torch.Tensor]
    dtypes: list[torch.dtype]
    state: Callable[[Callable[..., torch.Tensor]], list[torch.Tensor]] = lambda loss: []
    note: str = ""  # what the output holds that may explain a mismatch (e.g. "complex output")


def _exception(error: BaseException, segment: str) -> CaseResult:
    text = str(error)
    named = f"segment {segment!r}" in text
    category = MADFUNC_ERROR if named or isinstance(error, mf.ForwardModeError) else RAW_ERROR
    if isinstance(error, CaseTimeout):
        category = TIMEOUT
    detail = first_line(text)
    if category == RAW_ERROR:  # where in the engine it surfaced helps whoever fixes it
        frames = [f for f in traceback.extract_tb(error.__traceback__) if "madfunc" in f.filename]
        if frames:
            detail += f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} {frames[-1].name})"
    return CaseResult(category, detail=detail, error_type=type(error).__name__)


def _grad_run(case: Case, plan: dict | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Mode (a): torch.func.grad of the loss (plain), or mf.mixed_grad under ``plan``."""
    loss = case.make_loss()
    argnums = tuple(range(len(case.diff)))
    leaves = [t.detach() for t in case.diff]
    transform = torch.func.grad(loss, argnums=argnums) if plan is None else \
        mf.mixed_grad(loss, plan=plan, argnums=argnums)
    for _ in range(2 if REPLAY else 1):  # REPLAY: the second call runs the passes the first one recorded
        torch.manual_seed(SEED)
        grads = transform(*leaves)
    return _as_list(grads), case.state(loss)


def _backward_run(case: Case, plan: dict | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Mode (b): loss.backward() under plain autograd, or under mf.use_plan(plan)."""
    loss = case.make_loss()
    leaves = [fresh(t) for t in case.diff]
    torch.manual_seed(SEED)
    with mf.use_plan(plan) if plan is not None else contextlib.nullcontext():
        value = loss(*leaves)
        value.backward()
    grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]  # unused leaf: zero gradient
    return grads, case.state(loss)


def _torch_disagrees(
    case: Case, mode: str, expected: list[torch.Tensor], actual: list[torch.Tensor], rtol: float, atol: float
) -> str:
    """Why a mismatch is torch's own, or '' if it is not.

    - torch's forward mode disagrees with its reverse mode on the plain loss, and madfunc agrees with its forward
      mode (Exact *is* forward mode). Torch's forward-mode gradient is ``torch.func.jacfwd`` of the plain loss
      (one basis tangent per scalar, like Exact; randomness="same": every tangent sees the one set of random
      numbers a plain call draws). Where jacfwd cannot run, the directional derivative along a random ``u``
      stands in: ``jvp(loss, u)`` against ``<expected, u>`` and ``<actual, u>``.
    - mode (b) only: torch.func.grad and plain autograd disagree with each other (e.g. a fused kernel with its own
      random numbers under plain autograd, a decomposition under torch.func), and madfunc agrees with
      torch.func.grad.
    """
    if mode == "backward":
        functional, _ = _grad_run(case, None)
        if compare(functional, expected, rtol, atol) and not compare(actual, functional, rtol, atol):
            return "torch.func.grad != plain autograd on the plain loss; madfunc == torch.func.grad"
    leaves = tuple(t.detach() for t in case.diff)
    torch.manual_seed(SEED)
    plain = float(case.make_loss()(*leaves))
    loss = case.make_loss()

    def valued(*xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value = loss(*xs)
        return value, value.detach()

    torch.manual_seed(SEED)
    try:
        jacobian, value = torch.func.jacfwd(valued, argnums=tuple(range(len(leaves))), has_aux=True,
                                            randomness="same")(*leaves)
        forward = _as_list(jacobian)
    except Exception:  # noqa: BLE001 - e.g. an op without a batching rule: fall back to one jvp
        forward = None
    # jacfwd's vmap draws random numbers through its batching rules, which on CUDA map the generator's state to
    # other numbers than the plain call's fused dropout kernel: then jacfwd differentiated another function and
    # its verdict proves nothing (the single jvp below draws as the plain call does).
    if forward is not None and not _same_value(float(value), plain):
        forward = None
    if forward is not None:
        if compare(forward, expected, rtol, atol) and not compare(actual, forward, rtol, atol):
            return "torch's jacfwd != its reverse mode on the plain loss; madfunc == jacfwd"
        return ""
    gen = torch.Generator().manual_seed(99)
    u = [torch.randn(t.shape, dtype=t.dtype, generator=gen).to(t.device) for t in case.diff]
    torch.manual_seed(SEED)
    value, along = torch.func.jvp(case.make_loss(), leaves, tuple(u))
    along = float(along)
    if not _same_value(float(value), plain):  # it differentiated another function (other random draws)
        return ""
    reverse = sum(float((g.to(torch.float64) * v).sum()) for g, v in zip(expected, u, strict=True))
    ours = sum(float((g.to(torch.float64) * v).sum()) for g, v in zip(actual, u, strict=True))
    # The directional derivative sums every term g_i u_i: its rounding error scales with sum |g_i u_i|.
    scale = sum(float((g.to(torch.float64) * v).abs().sum()) for g, v in zip(expected, u, strict=True))
    tol = rtol * max(scale, abs(along), 1.0)
    if all(math.isfinite(x) for x in (along, reverse, ours)) and abs(along - reverse) > tol >= abs(along - ours):
        return "torch's jvp != its vjp along a random direction; madfunc == jvp"
    return ""


def _same_value(value: float, plain: float) -> bool:
    """Whether a transform's primal loss is the plain call's (the same function, the same random draws)."""
    same_nan = math.isnan(value) and math.isnan(plain)
    return value == plain or same_nan or abs(value - plain) <= RTOL * max(1.0, abs(plain))


def run_mode(case: Case, mode: str, plan: dict, segment: str) -> CaseResult:
    run = _grad_run if mode == "grad" else _backward_run
    rtol, atol = tolerances(case.dtypes)
    with recorded_warnings() as ref_warnings:
        try:
            expected, expected_state = run(case, None)
        except Exception as error:  # the reference must work for the comparison to mean anything
            return CaseResult(REFERENCE_ERROR, mode, first_line(str(error)), type(error).__name__)
    known = {_warning_key(w) for w in ref_warnings}
    with recorded_warnings() as caught:
        try:
            actual, actual_state = run(case, plan)
        except Exception as error:  # noqa: BLE001 - every failure is a result to classify, not a crash
            result = _exception(error, segment)
            result.mode = mode
            return result
    new = [
        w
        for w in caught
        if _warning_key(w) not in known and f"segment {segment!r}" not in str(w.message) and not _ignored(w)
    ]
    if new:
        w = new[0]
        return CaseResult(WARNING, mode, f"{first_line(str(w.message))} ({w.filename}:{w.lineno})", w.category.__name__)
    if len(actual) != len(expected):
        return CaseResult(MISMATCH, mode, f"{len(actual)} gradients vs reference {len(expected)}")
    problem = compare(actual, expected, rtol, atol)
    if not problem and expected_state:
        problem = compare(actual_state, expected_state, rtol, atol)
        problem = problem and "state after the call (e.g. running statistics): " + problem
    if not problem:
        return CaseResult(PASS, mode)
    try:
        with recorded_warnings():
            why = _torch_disagrees(case, mode, expected, actual, rtol, atol)
    except Exception:  # noqa: BLE001 - forward mode of the plain op failing proves nothing either way
        why = ""
    notes = "; ".join(n for n in (case.note, why) if n)
    return CaseResult(INHERITED if why else MISMATCH, mode, problem + (f" [{notes}]" if notes else ""))


def run_case(case: Case, plan: dict, segment: str, modes: Sequence[str] = ("grad", "backward")) -> list[CaseResult]:
    return [run_mode(case, mode, plan, segment) for mode in modes]


# -- op_db -------------------------------------------------------------------------------------------------------
OP_SEGMENT = "op"
OP_PLAN = {OP_SEGMENT: mf.Exact()}


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    """torch's test utilities warn on import (e.g. an ImportWarning without hypothesis): not what is tested.
    They need the ``expecttest`` package (torch's own test dependency)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def op_name(op: Any) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


def sweep_ops() -> list[Any]:
    """Every OpInfo with autograd support and float64 among its dtypes on ``DEVICE``, by name."""
    with _quiet_import():
        from torch.testing._internal.common_methods_invocations import op_db
    return [op for op in op_db if op.supports_autograd and torch.float64 in op.supported_dtypes(DEVICE)]


def ops_by_name() -> dict[str, Any]:
    return {op_name(op): op for op in sweep_ops()}


def function_case(
    name: str, call: Callable[..., Any], diff: Sequence[torch.Tensor], process: Callable[[Any], Any] = lambda out: out
) -> Case:
    """``call(*diff)`` as one segment ``op`` (``diff`` are explicit arguments, never closures), followed by the
    glue ``process`` and the contraction with fixed cotangents."""
    diff = [t.detach() for t in diff]
    torch.manual_seed(SEED)
    with torch.no_grad(), recorded_warnings():
        out = process(call(*diff))
    contract = contraction(out)
    dtypes = [*output_dtypes(out), *(t.dtype for t in diff)]

    def make_loss() -> Callable[..., torch.Tensor]:
        segment = mf.fwd(call, name=OP_SEGMENT)
        return lambda *tensors: contract(process(segment(*tensors)))

    return Case(name, make_loss, diff, dtypes, note=output_note(out))


def op_case(op: Any, sample: Any) -> Case | None:
    """The sample as one segment ``op`` over its floating requires_grad tensors."""
    leaves, spec = optree.tree_flatten((sample.input, sample.args, sample.kwargs))
    positions = [i for i, leaf in enumerate(leaves) if is_diff(leaf)]
    if not positions:
        return None

    def call(*tensors: torch.Tensor) -> Any:
        rebuilt = list(leaves)
        for i, t in zip(positions, tensors, strict=True):
            rebuilt[i] = t
        inp, args, kwargs = optree.tree_unflatten(spec, rebuilt)
        # As torch's own gradient tests do: the wrapper makes ops defined on a subspace (eigh, cholesky:
        # Hermitian inputs; triangular_solve: triangular ones) functions of the whole input, so that forward and
        # reverse mode differentiate the same function. It is the identity for most ops.
        return op.gradcheck_wrapper(op.get_op(), inp, *args, **kwargs)

    # output_process_fn_grad is glue after the segment (e.g. abs() of eigenvectors, whose phase is arbitrary).
    return function_case(op_name(op), call, [leaves[i] for i in positions], sample.output_process_fn_grad)


def run_op(op: Any, samples: int = 3, timeout: float | None = 60.0) -> SweepResult:
    """The first ``samples`` samples of ``op`` in float64, both modes. Never raises."""
    result = SweepResult(op_name(op))
    try:
        with time_limit(timeout), recorded_warnings():
            torch.manual_seed(SEED)  # some sample functions draw random data
            iterator = op.sample_inputs(DEVICE, torch.float64, requires_grad=True)
            picked = []
            for sample in iterator:
                picked.append(sample)
                if len(picked) == samples:
                    break
    except Exception as error:  # noqa: BLE001
        result.setup_error = f"sample_inputs: {type(error).__name__}: {first_line(str(error))}"
        return result
    for index, sample in enumerate(picked):
        try:
            with time_limit(timeout):
                case = op_case(op, sample)
                if case is None:
                    continue
                for outcome in run_case(case, OP_PLAN, OP_SEGMENT):
                    result.cases.append((index, outcome))
        except CaseTimeout as error:
            result.cases.append((index, CaseResult(TIMEOUT, detail=str(error), error_type="CaseTimeout")))
        except Exception as error:  # noqa: BLE001 - building the case (the plain forward) failed
            result.cases.append(
                (index, CaseResult(REFERENCE_ERROR, detail=first_line(str(error)), error_type=type(error).__name__))
            )
    return result


# -- module_db ----------------------------------------------------------------------------------------------------
MOD_SEGMENT = "mod"
MOD_PLAN = {MOD_SEGMENT: mf.Exact()}


@dataclasses.dataclass
class ModuleSpec:
    """What a module case needs, from a ModuleInfo's ModuleInput or from EXTRA_MODULES."""

    name: str
    build: Callable[[], torch.nn.Module]
    args: tuple
    kwargs: dict


def module_name(info: Any) -> str:
    return info.name + (f".{info.variant_name}" if getattr(info, "variant_name", "") else "")


def sweep_modules() -> list[Any]:
    with _quiet_import():
        from torch.testing._internal.common_modules import module_db
    return [info for info in module_db if torch.float64 in info.dtypes]


def module_specs(info: Any, training: bool, samples: int) -> list[ModuleSpec]:
    torch.manual_seed(SEED)
    inputs = info.module_inputs_func(info, device=DEVICE, dtype=torch.float64, requires_grad=True, training=training)
    specs = []
    for module_input in inputs[:samples]:
        c = module_input.constructor_input

        def build(c=c) -> torch.nn.Module:
            return info.module_cls(*c.args, **c.kwargs)

        f = module_input.forward_input
        specs.append(ModuleSpec(module_name(info), build, tuple(f.args), dict(f.kwargs)))
    return specs


def _extra(name: str, build: Callable[[], torch.nn.Module], *args: Any) -> tuple[str, Callable[[bool], list]]:
    # The inputs move to DEVICE when the case is built.
    return name, lambda training: [ModuleSpec(name, build, tuple(on_device(a) for a in args), {})]


def _x(*shape: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_()


# Modules the brief asks for that module_db (torch 2.13) lacks: dropout in all its forms (random in train mode),
# EmbeddingBag (integer inputs, offsets), and an encoder layer whose dropout is active.
EXTRA_MODULES: dict[str, Callable[[bool], list[ModuleSpec]]] = dict(
    [
        _extra("nn.Dropout", lambda: torch.nn.Dropout(0.5), _x(3, 4)),
        _extra("nn.Dropout1d", lambda: torch.nn.Dropout1d(0.5), _x(2, 3, 4)),
        _extra("nn.Dropout2d", lambda: torch.nn.Dropout2d(0.5), _x(2, 3, 2, 2)),
        _extra("nn.AlphaDropout", lambda: torch.nn.AlphaDropout(0.5), _x(3, 4)),
        _extra("nn.FeatureAlphaDropout", lambda: torch.nn.FeatureAlphaDropout(0.5), _x(2, 3, 2, 2)),
        _extra(
            "nn.EmbeddingBag",
            lambda: torch.nn.EmbeddingBag(10, 3, mode="mean"),
            torch.tensor([1, 2, 4, 5, 4, 3, 2, 9]),
            torch.tensor([0, 4]),
        ),
        _extra(
            "nn.TransformerEncoderLayer.dropout",
            lambda: torch.nn.TransformerEncoderLayer(4, 2, 8, dropout=0.1, batch_first=True),
            _x(2, 3, 4),
        ),
    ]
)


def all_module_names() -> list[str]:
    return [module_name(info) for info in sweep_modules()] + list(EXTRA_MODULES)


def _specs_for(name: str, training: bool, samples: int) -> list[ModuleSpec]:
    if name in EXTRA_MODULES:
        return EXTRA_MODULES[name](training)
    info = next(info for info in sweep_modules() if module_name(info) == name)
    return module_specs(info, training, samples)


def module_case(spec: ModuleSpec, training: bool) -> Case | None:
    """``mf.fwd(module, name='mod')`` called as ``seg(params, *inputs)``: differentiate the parameters and every
    floating requires_grad input (explicit arguments). Buffers (running statistics) are compared after the run."""
    with recorded_warnings():  # constructors warn (lazy modules, nested tensors): not what is tested
        torch.manual_seed(SEED)
        base = spec.build().to(device=DEVICE, dtype=torch.float64).train(training)
        leaves, tree = optree.tree_flatten((spec.args, spec.kwargs))
        if any(isinstance(p, torch.nn.parameter.UninitializedParameter) for p in base.parameters()):
            with torch.no_grad():  # a lazy module's parameters take their shapes from a first call
                detached = [x.detach() if isinstance(x, torch.Tensor) else x for x in leaves]
                inp, kw = optree.tree_unflatten(tree, detached)
                base(*inp, **kw)
    names = [n for n, p in base.named_parameters() if p.requires_grad]
    params = [p.detach() for n, p in base.named_parameters() if p.requires_grad]
    positions = [i for i, leaf in enumerate(leaves) if is_diff(leaf)]
    inputs = [leaves[i].detach() for i in positions]
    diff = [*params, *inputs]
    if not diff:
        return None
    n = len(params)
    modules: list[torch.nn.Module] = []

    def make_loss() -> Callable[..., torch.Tensor]:
        module = copy.deepcopy(base)  # each run from the same state: buffers change in train mode
        modules.append(module)
        segment = mf.fwd(module, name=MOD_SEGMENT)

        def forward(*tensors: torch.Tensor) -> Any:
            rebuilt = list(leaves)
            for i, t in zip(positions, tensors[n:], strict=True):
                rebuilt[i] = t
            args, kwargs = optree.tree_unflatten(tree, rebuilt)
            return segment(dict(zip(names, tensors[:n], strict=True)), *args, **kwargs)

        return forward

    torch.manual_seed(SEED)
    with torch.no_grad(), recorded_warnings():
        out = make_loss()(*diff)
    contract = contraction(out)
    dtypes = [*output_dtypes(out), *(t.dtype for t in diff)]

    def make_contracted() -> Callable[..., torch.Tensor]:
        forward = make_loss()
        return lambda *tensors: contract(forward(*tensors))

    def state(loss: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        return [b.detach().clone() for b in modules[-1].buffers()]

    return Case(spec.name, make_contracted, diff, dtypes, state, note=output_note(out))


def run_module(name: str, training: bool, samples: int = 3, timeout: float | None = 60.0) -> SweepResult:
    result = SweepResult(f"{name}[{'train' if training else 'eval'}]")
    try:
        with time_limit(timeout), recorded_warnings():
            specs = _specs_for(name, training, samples)
    except Exception as error:  # noqa: BLE001
        result.setup_error = f"module_inputs_func: {type(error).__name__}: {first_line(str(error))}"
        return result
    for index, spec in enumerate(specs):
        try:
            with time_limit(timeout):
                case = module_case(spec, training)
                if case is None:
                    continue
                for outcome in run_case(case, MOD_PLAN, MOD_SEGMENT):
                    result.cases.append((index, outcome))
        except CaseTimeout as error:
            result.cases.append((index, CaseResult(TIMEOUT, detail=str(error), error_type="CaseTimeout")))
        except Exception as error:  # noqa: BLE001 - building the module or its plain forward failed
            result.cases.append(
                (index, CaseResult(REFERENCE_ERROR, detail=first_line(str(error)), error_type=type(error).__name__))
            )
    return result


@contextlib.contextmanager
def sweep_threads() -> Iterator[None]:
    """Run on ``THREADS`` intra-op threads, restoring the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def report(result: SweepResult, seconds: float) -> None:
    """Append ``result`` as one JSON line to ``RESULTS`` (benchmarks/sweep.py's summary), if it is set."""
    if not RESULTS:
        return
    row = {
        "name": result.name,
        "category": result.category,
        "setup_error": result.setup_error,
        "seconds": round(seconds, 3),
        "cases": [{"sample": s, **dataclasses.asdict(c)} for s, c in result.cases],
    }
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")


def assert_not_bad(result: SweepResult) -> None:
    """The sweeps' one assertion: madfunc either gets the gradient right or refuses naming the segment."""
    bad = [
        f"sample {i} [{c.mode}] {c.category}: {c.error_type} {c.detail}" for i, c in result.cases if c.category in BAD
    ]
    assert not bad, f"{result.name}: " + "; ".join(bad)
