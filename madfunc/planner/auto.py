"""``auto_plan``: profile a step per candidate strategy, model every plan, pick the fastest within a budget."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import optree
import torch

from madfunc.core.guards import EXACT_WARN_TANGENTS
from madfunc.core.memory import format_bytes, measure_peak
from madfunc.engine import context as _context
from madfunc.plan import Exact, Plan, Random, Reverse, Strategy, StrategyLike, as_strategy, parse_strategy
from madfunc.planner.budget import parse_budget
from madfunc.planner.costs import Candidate, CostTable
from madfunc.planner.profile import WHERE, ArgNums, Step, Trace, time_steps, trace_step
from madfunc.planner.report import PlanEstimate, PlanReport, SegmentOption, SegmentPlan
from madfunc.planner.solve import min_peak, solve

__all__ = ["auto_plan", "default_candidates"]


def default_candidates(exact: bool = True) -> tuple[Strategy, ...]:
    """``Reverse()``, ``Checkpointed()`` (where this madfunc has it) and ``Exact()``; with ``exact=False`` also
    ``Random(k=16)`` and ``Random(k=1)`` with Rademacher tangents (the lowest variance of the laws)."""
    found: list[Strategy] = [Reverse()]
    try:
        found.append(parse_strategy("ckpt"))
    except ValueError:  # (a madfunc without Checkpointed)
        pass
    found.append(Exact())
    if not exact:
        found += [Random(k=16, distribution="rademacher"), Random(k=1, distribution="rademacher")]
    return tuple(found)


def _candidates(candidates: Sequence[StrategyLike] | None, exact: bool) -> tuple[Strategy, ...]:
    if candidates is None:
        return default_candidates(exact)
    if isinstance(candidates, str | Strategy) or not isinstance(candidates, Sequence) or not candidates:
        raise TypeError(f"{WHERE}(candidates=...): expected a non-empty list of strategies or their string forms, "
                        f"e.g. ['rev', 'ckpt', 'exact'], got {candidates!r}.")
    found = tuple(dict.fromkeys(as_strategy(c, f"{WHERE}(candidates=...)") for c in candidates))
    stochastic = [repr(c) for c in found if c.stochastic]
    if exact and stochastic:
        raise ValueError(f"{WHERE}(exact=True): candidates {', '.join(stochastic)} estimate the gradient; pass "
                         "exact=False to let estimates in where no exact plan fits, or drop them.")
    return found


def _sizes(step: Step, names: Sequence[str]) -> dict[str, int]:
    """Per segment, the scalars ``Exact`` would push (the leaves its body reads), from one forward in the
    measuring mode of ``inspect`` (costly segments predict their sizes instead of running the passes)."""
    args = list(step.args)
    for i in () if step.argnums is None else (step.argnums,) if isinstance(step.argnums, int) else step.argnums:
        args[i] = optree.tree_map(
            lambda t: t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t, args[i])
    with _context.planned_call(Plan(dict.fromkeys(names, Exact())), WHERE, measure=True, allow_unused=True) as state:
        step.fn(*args)
    return {call.name: call.stats.tangents or 0 for call in state.calls if call.nested_in is None}


# What a step under a candidate may raise that rules the candidate out rather than the call (ForwardModeError is a
# NotImplementedError; the Exact size guard raises MemoryError).
PROFILE_ERRORS = (RuntimeError, NotImplementedError, MemoryError)
VERIFY_ROUNDS = 3  # choices measured against the budget before giving up (_choose_measured)


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]


def _eligible(strategy: Strategy, n: int | None) -> bool:
    """Exact-like strategies (one tangent per scalar read) only where that is at most EXACT_WARN_TANGENTS."""
    return not strategy.is_forward or strategy.stochastic or (n is not None and n <= EXACT_WARN_TANGENTS)


def _uniform(names: Sequence[str], strategy: Strategy, base: Strategy, allowed: dict[str, set[Strategy]]) -> Plan:
    return Plan({name: strategy if strategy in allowed[name] else base for name in names})


def _segment_names(trace: Trace) -> list[str]:
    names = [name for name in dict.fromkeys(trace.names) if name is not None]
    if not names:
        raise ValueError(f"{WHERE}: the function called no segment; mark parts of it with madfunc.fwd/rev or "
                         "madfunc.mark_segments, so that there is something to plan.")
    return names


@dataclasses.dataclass
class _Profile:
    """Everything measured: the traces per candidate, which candidate each segment may take, the times."""

    names: list[str]
    candidates: tuple[Strategy, ...]
    traces: dict[Strategy, Trace]
    allowed: dict[str, set[Strategy]]
    sizes: dict[str, int]
    base_time: float
    deltas: dict[tuple[str, Strategy], float]
    uniform_times: dict[Strategy, float]
    notes: list[str]


def _profile(step: Step, candidates: tuple[Strategy, ...], repeats: int) -> _Profile:
    base = candidates[0]
    first = trace_step(step, Plan({"*": base}))
    names = _segment_names(first)
    notes: list[str] = []
    needs_sizes = any(c.is_forward and not c.stochastic for c in candidates)
    try:
        sizes = _sizes(step, names) if needs_sizes else {}
    except PROFILE_ERRORS as error:  # then no Exact-like candidate is eligible anywhere (n unknown)
        sizes = {}
        notes.append(f"Exact-like candidates left out: sizing them failed ({_first_line(error)}).")
    allowed = {name: {c for c in candidates if _eligible(c, sizes.get(name))} for name in names}
    for name in names:
        if needs_sizes and sizes.get(name, 0) > EXACT_WARN_TANGENTS:
            notes.append(f"segment {name!r} reads {sizes[name]} differentiated scalars: Exact, one tangent each, "
                         f"is not a candidate there (above {EXACT_WARN_TANGENTS}).")
    traces = {base: first}
    for c in candidates[1:]:
        if any(c in allowed[name] for name in names):
            try:
                traces[c] = trace_step(step, _uniform(names, c, base, allowed))
            except PROFILE_ERRORS as error:  # e.g. an op forward mode cannot run: the candidate is out
                notes.append(f"{c!r} left out: a step with it failed ({_first_line(error)}).")
                for name in names:
                    allowed[name].discard(c)
                continue
            if traces[c].names != first.names:
                raise RuntimeError(f"{WHERE}: the segments ran in another order under {c!r} than under {base!r} "
                                   f"({traces[c].names[1:]} vs {first.names[1:]}); a planned step must call the "
                                   "same segments each time.")
    base_plan = Plan(dict.fromkeys(names, base))
    singles = [(n, c) for n in names for c in candidates[1:] if c in allowed[n]]
    uniform = [c for c in candidates[1:] if c in traces]
    plans = [base_plan, *(Plan({**base_plan, n: c}) for n, c in singles),
             *(_uniform(names, c, base, allowed) for c in uniform)]
    times = time_steps(step, plans, repeats)
    deltas = {key: t - times[0] for key, t in zip(singles, times[1:], strict=False)}
    uniform_times = {base: times[0], **dict(zip(uniform, times[1 + len(singles):], strict=True))}
    _fit_deltas(deltas, uniform_times, base)
    return _Profile(names, candidates, traces, allowed, sizes, times[0], deltas, uniform_times, notes)


def _fit_deltas(deltas: dict[tuple[str, Strategy], float], uniform_times: dict[Strategy, float],
                base: Strategy) -> None:
    """Least squares over the timed plans: each single-segment change measured ``base + d_s`` and the uniform plan
    ``base + sum_s d_s``, all with the same noise; the fit moves each ``d_s`` by ``1 / (S + 1)`` of the uniform
    plan's residual (S: the segments that take the candidate). Every timing then informs the model."""
    for c, measured in uniform_times.items():
        keys = [key for key in deltas if key[1] == c]
        if c == base or not keys:
            continue
        shift = (measured - uniform_times[base] - sum(deltas[k] for k in keys)) / (len(keys) + 1)
        for key in keys:
            deltas[key] += shift


def _table(profile: _Profile, keep: Callable[[Strategy], bool]) -> CostTable:
    base = profile.candidates[0]
    first = profile.traces[base]
    candidates: dict[str, tuple[Candidate, ...]] = {}
    for name in profile.names:
        options = []
        for c in profile.candidates:
            if c not in profile.allowed[name] or c not in profile.traces or not keep(c):
                continue
            trace = profile.traces[c]
            windows = tuple(cost for cost, n in zip(trace.costs, trace.names, strict=True) if n == name)
            variance = (c.variance(trace.stats[name]) if c.stochastic else 0.0)
            options.append(Candidate(c, windows, profile.deltas.get((name, c), 0.0),
                                     math.inf if variance is None else variance))
        candidates[name] = tuple(options)
    fixed = {w: cost for w, (cost, n) in enumerate(zip(first.costs, first.names, strict=True)) if n is None}
    return CostTable(first.names, first.backward_order, fixed, candidates, profile.base_time)


def _no_plan_error(budget: int, table: CostTable, exact: bool) -> ValueError:
    smallest = min_peak(table)
    more = (" or pass exact=False to let gradient estimates (Random) in where no exact plan fits" if exact
            else " or add cheaper candidates")
    return ValueError(
        f"{WHERE}(budget={format_bytes(budget)}): no plan fits; the smallest feasible budget is {smallest} bytes "
        f"({format_bytes(smallest)}) for these candidates. Raise the budget to at least that,{more}."
    )


def _choose(profile: _Profile, budget: int, exact: bool) -> tuple[CostTable, dict[str, Candidate]]:
    """The table the choice was made in (every candidate's, for the report, with ``exact=False``) and the choice:
    an exact plan if one fits, else (``exact=False``) the least variance, then time."""
    exact_table = _table(profile, lambda c: not c.stochastic)
    table = exact_table if exact else _table(profile, lambda c: True)
    found = solve(exact_table, budget) if all(exact_table.candidates.values()) else None
    if found is None and table is not exact_table:
        found = solve(table, budget)
    if found is None:
        raise _no_plan_error(budget, table, exact)
    return table, _check_uniform(profile, table, found[0], budget)


def _uniform_assignments(profile: _Profile, table: CostTable) -> dict[Strategy, dict[str, Candidate]]:
    """The plans with every segment on one candidate, where every segment may take it."""
    found = {}
    for c in profile.uniform_times:
        options = {n: next((o for o in table.candidates[n] if o.strategy == c), None) for n in profile.names}
        if all(options.values()):
            found[c] = {n: o for n, o in options.items() if o is not None}
    return found


def _check_uniform(profile: _Profile, table: CostTable, chosen: dict[str, Candidate],
                   budget: int) -> dict[str, Candidate]:
    """A uniform plan that fits, no noisier, and was measured faster than the choice is predicted to be wins:
    a mixed plan's time is predicted from single-segment changes, a uniform plan's was measured whole."""
    best, best_time = chosen, table.time(chosen)
    for c, assignment in _uniform_assignments(profile, table).items():
        fits = table.peak(assignment) <= budget and table.variance(assignment) <= table.variance(chosen)
        if fits and profile.uniform_times[c] < best_time:
            best, best_time = assignment, profile.uniform_times[c]
    return best


def _report(profile: _Profile, table: CostTable, chosen: dict[str, Candidate], budget: int,
            measured: int) -> PlanReport:
    segments = []
    for name in profile.names:
        stats = profile.traces[profile.candidates[0]].stats[name]
        options = tuple(
            SegmentOption(repr(c.strategy), c.time_delta, sum(w.f_net for w in c.windows),
                          max(w.f_peak for w in c.windows), max(w.b_peak for w in c.windows), c.variance)
            for c in table.candidates[name])
        calls = sum(1 for n in table.window_names if n == name)
        segments.append(SegmentPlan(name, calls, profile.sizes.get(name, stats.differentiated_numel),
                                    stats.output_numel, repr(chosen[name].strategy), options))
    alternatives = []
    for c, full in _uniform_assignments(profile, table).items():
        peak = table.peak(full)
        alternatives.append(PlanEstimate(str(Plan({"*": c})), table.time(full), peak, table.variance(full),
                                         peak <= budget, profile.uniform_times[c]))
    plan = Plan({name: chosen[name].strategy for name in profile.names})
    alternatives.append(PlanEstimate(str(plan), table.time(chosen), table.peak(chosen), table.variance(chosen),
                                     True))
    return PlanReport(plan, budget, table.time(chosen), table.peak(chosen), measured, min_peak(table),
                      table.variance(chosen), profile.base_time, tuple(segments), tuple(alternatives),
                      tuple(profile.notes))


@overload
def auto_plan(fn: Callable[..., Any], *args: Any, budget: int | float | str, exact: bool = ...,
              argnums: ArgNums = ..., candidates: Sequence[StrategyLike] | None = ..., repeats: int = ...,
              return_report: Literal[False] = ...) -> Plan: ...
@overload
def auto_plan(fn: Callable[..., Any], *args: Any, budget: int | float | str, exact: bool = ...,
              argnums: ArgNums = ..., candidates: Sequence[StrategyLike] | None = ..., repeats: int = ...,
              return_report: Literal[True]) -> tuple[Plan, PlanReport]: ...
def auto_plan(fn: Callable[..., Any], *args: Any, budget: int | float | str, exact: bool = True,
              argnums: ArgNums = 0, candidates: Sequence[StrategyLike] | None = None, repeats: int = 3,
              return_report: bool = False) -> Plan | tuple[Plan, PlanReport]:
    """Choose each segment's strategy for the fastest step whose peak memory stays within ``budget``.

    It profiles the step ``fn(*args)`` once per candidate strategy (every segment on it), cutting the
    deterministic memory timeline (:func:`measure_peak`) into one window per segment call: what the
    segment's forward adds at most and leaves live, and the same for its backward. It times the step with
    one segment at a time changed from the base plan (every segment on the first candidate). A plan's
    predicted time is the base time plus each segment's change; its predicted peak replays the windows in
    order under the plan's strategies. Then it solves:

    * ``exact=True``: minimise the predicted step time subject to the predicted peak <= ``budget``, over
      exact strategies only (by default ``Reverse``, ``Checkpointed``, ``Exact``).
    * ``exact=False``: the same where an exact plan fits. Where none does, gradient estimates (by default
      ``Random(16)`` and ``Random(1)``, Rademacher) enter: minimise the summed relative variance of the
      segments' gradients (each strategy's law, ``Strategy.variance``: e.g. ``(n-1)/k``) subject to the
      budget, and among plans of equal variance the predicted time. Estimates thus go first where they cost
      the least variance (few scalars ``n``, large ``k``).

    A uniform plan (every segment on one candidate, timed whole) that fits, with no more variance, and was
    measured faster than the choice is predicted to run is taken instead. The choice is then measured on one
    step: one whose measured peak is above ``budget`` (the model missed a tensor) is chosen again with the
    missed bytes as a margin, so the plan returned was measured within ``budget`` on ``args``. ``Exact``-like
    candidates (one tangent per scalar) are left out of segments that read more than 4096 differentiated
    scalars. The step runs about ``(segments + 1) * candidates * (2 + repeats)
    + 3 * candidates + 3`` times; profile on a batch of the size you will train with (docs/guides/planner.md).

    Args:
        fn: the loss function, a scalar tensor of ``args``, calling segments (:func:`fwd`, :func:`rev`,
            :func:`mark_segments`).
        *args: its arguments (a batch).
        budget: the peak bytes one step may allocate beyond what exists before it (parameters, inputs):
            activations, tangents, gradients. An int, or a string with a unit: ``"2GiB"``, ``"50MiB"``,
            ``"1.5GB"``.
        exact: only exact strategies (see above). Default: ``True``.
        argnums: the argument(s) differentiated, as for :func:`mixed_grad` (the plan is for
            ``mixed_grad(fn, plan, argnums)``); ``None``: the tensors ``fn`` uses that require a gradient (a
            model's parameters), as ``fn(*args).backward()`` in a :func:`use_plan` block. Default: ``0``.
        candidates: strategies (or string forms) each segment may take, the first the base for timing.
            Default: ``None`` (see above).
        repeats: timed steps per profiled plan (the fastest counts). Default: ``3``.
        return_report: also return a :class:`PlanReport` of what it predicted for each option. Default:
            ``False``.

    Returns:
        The :class:`Plan` naming every segment; with ``return_report=True``, ``(plan, report)``.

    Raises:
        ValueError: no plan fits ``budget``; the message gives the smallest feasible budget (or, where the
            plans predicted to fit were measured above it, what each measured).

    Examples:
        >>> import torch, madfunc as mf
        >>> stem = mf.rev(lambda w, x: torch.tanh(x @ w), name="stem")
        >>> head = mf.rev(lambda w, h: (h @ w).pow(2).sum(), name="head")
        >>> def loss(p, x):
        ...     return head(p["head"], stem(p["stem"], x))
        >>> p = {"stem": torch.randn(4, 64), "head": torch.randn(64, 1)}
        >>> x = torch.randn(256, 4)
        >>> plan, report = mf.auto_plan(loss, p, x, budget="1MiB", repeats=1,
        ...                             return_report=True)
        >>> sorted(plan)  # every segment, each on the fastest strategy that keeps the step within budget
        ['head', 'stem']
        >>> report.measured_peak_bytes <= 2**20
        True
        >>> mf.auto_plan(loss, p, x, budget=1000, repeats=1)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: madfunc.auto_plan(budget=1000 B): no plan fits; the smallest feasible budget is ...
    """
    nbytes = parse_budget(budget, WHERE)
    if argnums is not None and not isinstance(argnums, int | tuple):
        raise TypeError(f"{WHERE}(argnums={argnums!r}): expected an int, a tuple of ints or None.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"{WHERE}(repeats={repeats!r}): expected an int >= 1.")
    step = Step(fn, args, argnums)
    profile = _profile(step, _candidates(candidates, exact), repeats)
    table, chosen, measured = _choose_measured(step, profile, nbytes, exact)
    plan = Plan({name: chosen[name].strategy for name in profile.names})
    if not return_report:
        return plan
    return plan, _measured_report(step, profile, table, chosen, nbytes, exact, measured)


def _measure(step: Step, profile: _Profile, chosen: dict[str, Candidate]) -> int:
    """The peak of a step under the choice, measured on its third call (the first two warm caches and recordings)."""
    plan = Plan({name: chosen[name].strategy for name in profile.names})
    step.run(plan)
    step.run(plan)
    with measure_peak(cuda=False) as meter:
        grads = step.run(plan)
    del grads
    return meter.peak_bytes


def _choose_measured(step: Step, profile: _Profile, budget: int,
                     exact: bool) -> tuple[CostTable, dict[str, Candidate], int]:
    """:func:`_choose`, then the choice measured: a choice whose measured peak is above ``budget`` (the window model
    can miss a tensor that two neighbouring strategies keep alive together: 1 MiB, one activation, on the digits
    MLP's Reverse/Checkpointed mixes) is chosen again against the budget less what the model missed, so that the
    plan returned is one measured within the budget. Raises ValueError when no plan is."""
    table, chosen = _choose(profile, budget, exact)  # (no plan predicted within the budget: its error)
    tried, target = [], budget
    for _ in range(VERIFY_ROUNDS):
        measured = _measure(step, profile, chosen)
        if measured <= budget:
            return table, chosen, measured
        predicted = table.peak(chosen)
        tried.append(f"{Plan({n: c.strategy for n, c in chosen.items()})} (predicted {format_bytes(predicted)}, "
                     f"measured {format_bytes(measured)})")
        target -= max(measured - predicted, 1)  # ask again for the plan, with the margin the model missed
        try:
            table, chosen = _choose(profile, target, exact)
        except ValueError:
            break
    raise ValueError(f"{WHERE}(budget={format_bytes(budget)}): no plan was measured within the budget; tried "
                     f"{'; '.join(tried)}. Raise the budget above the smallest measured peak"
                     f"{'' if not exact else ', or pass exact=False'}.")


def _measured_report(step: Step, profile: _Profile, table: CostTable, chosen: dict[str, Candidate], budget: int,
                     exact: bool, measured: int) -> PlanReport:
    """The report of a choice whose peak ``measured`` was measured on a step (:func:`_measure`)."""

    def replan(new_budget: int | float | str, new_exact: bool | None) -> PlanReport:
        nbytes, use_exact = parse_budget(new_budget, WHERE), exact if new_exact is None else new_exact
        if not use_exact and not any(c.stochastic for c in profile.candidates):
            raise ValueError(f"{WHERE}: this profile has no gradient estimates among its candidates; call auto_plan("
                             "..., exact=False) to profile them, then replan.")
        new_table, new_chosen, new_measured = _choose_measured(step, profile, nbytes, use_exact)
        return _measured_report(step, profile, new_table, new_chosen, nbytes, use_exact, new_measured)

    return dataclasses.replace(_report(profile, table, chosen, budget, measured), _replan=replan)
