"""Gradient-quality diagnostics: ``compare`` (estimates vs the exact gradient) and ``inspect`` (what each
segment does and keeps for backward), with their frozen, printable report objects."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import optree
import torch

from madfunc.engine import context as _context
from madfunc.plan import Plan, PlanLike, Reverse, Strategy, as_plan
from madfunc.strategies.base import SegmentStats
from madfunc.tools.reports import CompareReport, GradientFigures, InspectReport, SegmentRow, _bytes

__all__ = ["CompareReport", "GradientFigures", "InspectReport", "SegmentRow", "compare", "inspect"]

ArgNums = int | tuple[int, ...]


def theoretical_variance(strategy: Strategy, stats: SegmentStats) -> float | None:
    """``E||g^ - g||^2 / ||g||^2`` of one call of a segment (its stats), or None (see Strategy.variance).

    None as well when the segment differentiates an activation input: its variance law holds for the
    gradients of its own inputs, but ``compare`` measures the gradient leaves, which that input's estimated
    cotangent reaches through the upstream Jacobians (the law does not carry over)."""
    if not strategy.stochastic or stats.activation_numel:
        return None
    return strategy.variance(stats)


def _t_quantile(dof: int) -> float:
    """Student-t 97.5% quantile: a table for dof <= 2, else Cornish-Fisher (relative error < 1e-3)."""
    if dof <= 2:
        return (math.nan, 12.7062, 4.3027)[max(dof, 0)]
    z = statistics.NormalDist().inv_cdf(0.975)
    terms = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(term / dof ** (i + 1) for i, term in enumerate(terms))


def _figures(draws: torch.Tensor, exact: torch.Tensor, **extra: Any) -> GradientFigures:
    """Figures of ``draws`` (D x N estimates) against ``exact`` (N), all relative to ``||exact||``."""
    count, norm = draws.shape[0], float(exact.norm())
    if norm == 0.0:  # nothing to be relative to
        nan = math.nan
        return GradientFigures(nan, nan, nan, nan, (nan, nan), nan, count, exact.numel(), **extra)
    errors = draws - exact
    cosine = (draws @ exact) / (draws.norm(dim=1).clamp_min(torch.finfo(draws.dtype).tiny) * norm)
    relative = errors.norm(dim=1) / norm
    along = (errors @ exact) / norm**2  # signed relative error along the exact gradient
    bias = float(along.mean())
    half = _t_quantile(count - 1) * float(along.std()) / math.sqrt(count) if count > 1 else math.nan
    return GradientFigures(
        cosine=float(cosine.mean()),
        relative_error=float(relative.mean()),
        variance=float(relative.square().mean()),
        bias=bias,
        bias_ci=(bias - half, bias + half),
        bias_norm=float(errors.mean(dim=0).norm()) / norm,
        draws=count,
        numel=exact.numel(),
        **extra,
    )


def _flat(grads: Any) -> tuple[list[str], torch.Tensor]:
    """Leaf names (paths) and all leaves concatenated, in float64 on the CPU."""
    paths, leaves, _ = optree.tree_flatten_with_path(grads)
    names = ["/".join(map(str, path)) or "(argument)" for path in paths]
    flat = [leaf.detach().reshape(-1).to(device="cpu", dtype=torch.float64) for leaf in leaves]
    return names, torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64)


def _sync(tree: Any) -> None:
    if any(isinstance(t, torch.Tensor) and t.is_cuda for t in optree.tree_leaves(tree)):
        torch.cuda.synchronize()


def _grad(fn: Callable[..., Any], args: tuple, argnums: ArgNums, plan: Plan | None, check: bool = False):
    """Gradient of ``fn`` under ``plan`` (None: plain backprop) by torch.func.grad, the call's state
    (None for backprop), and the seconds it took."""
    states: list[_context.CallState] = []

    def planned(*inner: Any) -> Any:
        if plan is None:
            with _context.activate(None):
                return fn(*inner)
        with _context.planned_call(plan, "madfunc.compare", allow_unused=not check) as state:
            out = fn(*inner)
        states.append(state)
        return out

    _sync(args)
    start = time.perf_counter()
    grads = torch.func.grad(planned, argnums)(*args)
    _sync(grads)
    return grads, (states[0] if states else None), time.perf_counter() - start


def _top_level(state: _context.CallState) -> dict[str, list[_context.SegmentCall]]:
    calls: dict[str, list[_context.SegmentCall]] = {}
    for call in state.calls:
        if call.nested_in is None:
            calls.setdefault(call.name, []).append(call)
    return calls


def compare(
    fn: Callable[..., Any],
    plan: PlanLike,
    *args: Any,
    reference: PlanLike = None,
    draws: int = 32,
    argnums: ArgNums = 0,
) -> CompareReport:
    """Measure how good the gradients of ``fn`` under ``plan`` are, against an exact reference.

    Runs the reference once (and up to 8 times for timing) and ``plan`` ``draws`` times with fresh random
    tangents (torch's RNG: ``torch.manual_seed`` makes the report reproducible), and reports, relative
    to the exact gradient ``g``: ``cosine`` (mean cosine similarity), ``relative_error`` (mean
    ``||g^ - g|| / ||g||``), ``variance`` (measured ``E||g^ - g||^2 / ||g||^2``), ``bias`` (mean of
    ``<g^ - g, g> / ||g||^2``, the systematic shrinking or growing along ``g``, with a 95% Student-t
    confidence interval ``bias_ci``; 0 for an unbiased plan), ``bias_norm`` (``||mean(g^) - g|| / ||g||``,
    which shrinks like ``sqrt(variance / draws)`` when unbiased) and the median time per call.

    Per segment, one segment at a time follows ``plan`` while every other segment follows the
    reference, so the figures measure the error that segment alone introduces (errors of different
    segments mix upstream, so an attribution from one combined run would not be sound). They are
    taken over the gradient leaves that segment's estimate reaches, found as the leaves whose gradient
    moves beyond rounding (``sqrt(eps) * ||g||``) in any draw: its own parameters, plus upstream ones
    when its activation inputs are differentiated. A deterministic segment (``Exact``, ``Reverse``, or
    one whose estimate reaches nothing) is measured once, over the whole gradient. For a ``Random``
    segment called once, ``variance_theory`` is the relative variance of its own estimate:
    ``(n+1)/k`` (gaussian), ``(n-1)/k`` (rademacher), ``n/k - 1`` (orthogonal), with ``n`` its
    differentiated scalars. The measured ``variance`` has that expectation when what the segment
    differentiates is exactly the leaves it reaches (its parameters, not shared; e.g. the first
    segment); when the segment's activation inputs are differentiated its error also flows upstream,
    and the two differ.

    Args:
        fn: a function of ``args`` returning a scalar tensor, calling segments (:func:`fwd`/:func:`rev`).
        plan: the plan to assess (dict or :class:`Plan`); a key that matches no segment is an error.
        *args: the arguments of ``fn``.
        reference: the plan giving the exact gradient. Default: ``None``, plain backprop (every
            segment reverse mode).
        draws: number of independent gradients under ``plan``. Default: ``32``.
        argnums: which positional argument(s) to differentiate, as in ``torch.func.grad``. Default: ``0``.

    Returns:
        A frozen :class:`CompareReport`: overall figures (``report.cosine``, ..., ``report.overall``),
        ``report.per_segment`` (segment name -> :class:`GradientFigures`), ``time_plan`` and
        ``time_reference`` (median seconds per gradient call). ``str(report)`` is a table,
        ``report.to_dict()`` plain Python types.

    Examples:
        >>> import torch, madfunc as mf
        >>> layer = mf.fwd(torch.nn.Linear(4, 3), name="layer")
        >>> head = mf.rev(lambda h: h.tanh().sum(), name="head")
        >>> def loss(params, x):
        ...     return head(layer(params, x))
        >>> params, x = dict(layer.module.named_parameters()), torch.randn(8, 4)
        >>> _ = torch.manual_seed(0)
        >>> plan = {"layer": mf.Random(k=5, distribution="rademacher")}
        >>> report = mf.compare(loss, plan, params, x, draws=8)
        >>> report.per_segment["layer"].variance_theory   # (n - 1) / k with n = 4 * 3 + 3
        2.8
        >>> exact = mf.compare(loss, {"layer": "exact"}, params, x, draws=2)
        >>> round(exact.cosine, 6), round(exact.relative_error, 6)
        (1.0, 0.0)
    """
    checked = as_plan(plan)
    ref_plan = None if reference is None else as_plan(reference)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(
            f"madfunc.compare(draws={draws!r}): draws must be an int >= 1 (independent gradients under the plan)."
        )
    exact_grads, ref_state, _ = _grad(fn, args, argnums, ref_plan, check=True)
    names, exact = _flat(exact_grads)
    sizes = [t.numel() for t in optree.tree_leaves(exact_grads)]
    ref_times = [_grad(fn, args, argnums, ref_plan)[2] for _ in range(min(draws, 8))]
    runs = [_grad(fn, args, argnums, checked, check=i == 0) for i in range(draws)]
    stacked = torch.stack([_flat(grads)[1] for grads, _, _ in runs])
    state = runs[0][1]
    assert state is not None  # (a run under a plan, as ``checked`` is, records its call)
    calls = _top_level(state)
    ref_calls = _top_level(ref_state) if ref_state is not None else {}

    def reference_strategy(name: str) -> Strategy:
        if ref_plan is None:
            return Reverse()
        if name in ref_calls:
            return ref_calls[name][0].strategy
        return ref_plan.lookup(name) or calls[name][0].strategy

    differs = {name for name, seg in calls.items() if seg[0].strategy != reference_strategy(name)}
    dtypes = [t.dtype for t in optree.tree_leaves(exact_grads)]
    eps = max((torch.finfo(d).eps for d in dtypes), default=torch.finfo(torch.float64).eps)
    tolerance = math.sqrt(eps) * float(exact.norm())  # differences below this are rounding
    per_segment: dict[str, GradientFigures] = {}
    overall_theory = None
    for name, seg_calls in calls.items():
        strategy = seg_calls[0].strategy
        stochastic = strategy.stochastic
        if differs <= {name}:  # every other segment already follows the reference: reuse the draws
            seg_draws = stacked if stochastic else stacked[:1]
        else:
            single = Plan({**(ref_plan or {"*": Reverse()}), name: strategy})
            count = draws if stochastic else 1
            seg_draws = torch.stack([_flat(_grad(fn, args, argnums, single)[0])[1] for _ in range(count)])
        moved = torch.split((seg_draws - exact).abs(), sizes, dim=1)
        reached = [i for i, m in enumerate(moved) if stochastic and float(m.norm(dim=1).max()) > tolerance]
        n = int(seg_calls[0].stats.differentiated_numel or 0)
        theory = theoretical_variance(strategy, seg_calls[0].stats) if len(seg_calls) == 1 else None
        extra = dict(strategy=repr(strategy), differentiated=n, calls=len(seg_calls), variance_theory=theory)
        if reached:
            mask = torch.cat([torch.full((s,), i in reached, dtype=torch.bool) for i, s in enumerate(sizes)])
            leaves = tuple(names[i] for i in reached)
            per_segment[name] = _figures(seg_draws[:, mask], exact[mask], leaves=leaves, **extra)
            if len(reached) == len(sizes) and differs == {name}:
                overall_theory = theory
        else:
            per_segment[name] = _figures(seg_draws, exact, leaves=tuple(names), **extra)
    return CompareReport(
        overall=_figures(stacked, exact, leaves=tuple(names), variance_theory=overall_theory),
        per_segment=per_segment,
        time_plan=statistics.median(t for _, _, t in runs),
        time_reference=statistics.median(ref_times),
        plan=repr(checked),
        reference="backprop" if ref_plan is None else repr(ref_plan),
    )


def inspect(fn: Callable[..., Any], plan: PlanLike, *args: Any, argnums: ArgNums = 0) -> InspectReport:
    """List the segments of ``fn`` as they actually run under ``plan``, and flag costly choices.

    Runs ``fn`` forward once under ``plan`` and once with every segment in reverse mode (under plain
    autograd: torch.func.grad does not support the saved-tensor hooks that measure reverse segments),
    recording what each segment keeps for backward. A forward segment keeps its output tangents
    (tangents x output size x element size); a reverse segment keeps what autograd saves inside it.
    Flags: a forward segment that keeps more than twice what backprop would keep there (typically
    ``Exact`` over a large activation input: one tangent per input scalar), and ``Random`` with ``k``
    at least the number of differentiated scalars ``n`` (``Exact`` would be exact at that cost).
    To choose every segment's strategy for the fastest step within a memory budget, see :func:`auto_plan`.

    Args:
        fn: a function of ``args`` returning a scalar tensor, calling segments (:func:`fwd`/:func:`rev`).
        plan: the plan (dict or :class:`Plan`); a key that matches no segment is an error.
        *args: the arguments of ``fn``.
        argnums: which positional argument(s) to differentiate, as in ``torch.func.grad``. Default: ``0``.

    Returns:
        A frozen :class:`InspectReport`: ``rows`` (one :class:`SegmentRow` per segment call, in the
        order they ran; segments nested in a forward segment listed once per enclosing call) and
        ``flags`` (readable warnings). ``str(report)`` is a table, ``report.to_dict()`` plain types.

    Examples:
        >>> import torch, madfunc as mf
        >>> layer = mf.fwd(torch.nn.Linear(4, 3), name="layer")
        >>> params, x = dict(layer.module.named_parameters()), torch.randn(8, 4)
        >>> report = mf.inspect(lambda p, x: layer(p, x).sum(), {"layer": mf.Random(k=2)}, params, x)
        >>> row = report.rows[0]
        >>> row.name, row.differentiated, row.tangents, row.output_numel, row.saved_bytes   # 2 * 24 * 4 bytes
        ('layer', {'arg0': 15, 'arg1': 0}, 2, 24, 192)
    """
    checked = as_plan(plan)
    state = _measure(fn, args, argnums, checked)  # (checks that every plan key matched a segment)
    all_reverse = _measure(fn, args, argnums, Plan({"*": Reverse()})) if state.calls else None
    reverse_bytes = _reverse_bytes(state, all_reverse)
    rows: list[SegmentRow] = []
    seen_nested: set[tuple[int, str]] = set()
    parent = -1
    for call in state.calls:
        if call.nested_in is None:
            parent += 1
        elif (parent, call.name) in seen_nested:
            continue  # the enclosing forward segment traced its body once per tangent batch
        else:
            seen_nested.add((parent, call.name))
        stats = call.stats
        compared = call.strategy.is_forward or call.strategy.recomputes  # (Checkpointed: what it saves against)
        alternative = reverse_bytes[parent] if call.nested_in is None and compared else None
        rows.append(
            SegmentRow(
                name=call.name,
                strategy=repr(call.strategy),
                nested_in=call.nested_in,
                differentiated=dict(stats.differentiated_per_argument or {}),
                differentiated_numel=stats.differentiated_numel,
                tangents=stats.tangents,
                output_numel=stats.output_numel,
                saved_bytes=stats.saved_bytes,
                reverse_saved_bytes=alternative,
                flags=tuple(_flags(call, alternative)),
            )
        )
    return InspectReport(rows=tuple(rows), plan=repr(checked))


def _measure(fn: Callable[..., Any], args: tuple, argnums: ArgNums, plan: Plan) -> _context.CallState:
    """Run ``fn`` forward under ``plan`` with measuring on, under plain autograd: the differentiated
    arguments become fresh leaves that require grad (torch.func.grad rejects saved-tensor hooks)."""
    args_ = list(args)
    for i in (argnums,) if isinstance(argnums, int) else argnums:
        args_[i] = optree.tree_map(
            lambda t: t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t,
            args_[i],
        )
    with _context.planned_call(plan, "madfunc.inspect", measure=True) as state:
        fn(*args_)
    return state


def _reverse_bytes(state: _context.CallState, rev_state: _context.CallState | None) -> list[int | None]:
    """Bytes backprop would keep for each top-level call of ``state``, from the all-reverse run.

    In the all-reverse run, segments that were nested in a forward segment run on their own right after
    it; their bytes belong to the enclosing call.
    """
    top = [call.name for call in state.calls if call.nested_in is None]
    result: list[int | None] = [None] * len(top)
    index = -1
    for call in rev_state.calls if rev_state is not None else ():
        if index + 1 < len(top) and call.name == top[index + 1]:
            index += 1
            result[index] = 0
        elif index < 0:
            break  # the runs diverged (data-dependent control flow)
        result[index] = (result[index] or 0) + (call.stats.saved_bytes or 0)  # (set to 0 above: an int)
    return result if index == len(top) - 1 else [None] * len(top)


def _flags(call: _context.SegmentCall, reverse_bytes: int | None) -> list[str]:
    stats, strategy = call.stats, call.strategy
    flags = list(strategy.advice(stats)) if strategy.is_forward else []
    saved = stats.saved_bytes or 0
    if strategy.is_forward and reverse_bytes is not None and saved > 2 * max(reverse_bytes, 1):
        per_arg = stats.differentiated_per_argument or {}
        largest = max(per_arg, key=per_arg.__getitem__, default=None)
        where = f" (largest differentiated input: {largest}, {per_arg[largest]} scalars)" if largest else ""
        tangents, outputs = stats.tangents, stats.output_numel
        flags.append(
            f"keeps {_bytes(saved)} for backward ({tangents} tangents x {outputs} outputs){where}; backprop "
            f"would keep {_bytes(reverse_bytes)}: Reverse() or Random(k) with a small k is cheaper here."
        )
    fallbacks = stats.fallbacks
    if fallbacks:
        flags.append(
            f"runs {', '.join(fallbacks)} by the double-vjp fallback (no forward rule in PyTorch): its tangents "
            "cost about 2-3x the op's backward; madfunc.register_forward_rule can give a cheaper rule."
        )
    return flags
