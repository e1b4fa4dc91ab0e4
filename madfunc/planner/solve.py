"""The assignment problem: each segment one candidate, the least cost with the predicted peak within budget.

The cost is ``(variance, time)`` compared in that order: with exact candidates only, the variance is 0 and
it is the step time. Up to ``ENUMERATE_LIMIT`` assignments are enumerated (exact). Beyond that, when each
segment runs once and backward visits the segments in reverse (a chain), a DP over forward windows with
the forward's live bytes as the state, in ``buckets`` memory buckets (Naumann's Jacobian chaining under a
memory limit, arXiv 2406.11862, uses the same shape of recursion): each window's backward peak is charged
the most any later window can leave behind, and live bytes are rounded up, so the DP's plans always fit
(it may miss a plan within rounding of the budget). Other layouts fall back to a local search from the
feasible uniform plans (one segment changed at a time while the cost falls).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

from madfunc.planner.costs import Candidate, CostTable

__all__ = ["Solution", "min_peak", "solve"]

ENUMERATE_LIMIT = 20_000
Assignment = dict[str, Candidate]
Solution = tuple[Assignment, tuple[float, float]]  # (assignment, (variance, time))


def _cost(table: CostTable, assignment: Mapping[str, Candidate]) -> tuple[float, float]:
    return table.variance(assignment), table.time(assignment)


def _all(table: CostTable) -> list[Assignment]:
    names = table.segments
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*table.candidates.values())]


def _count(table: CostTable) -> int:
    return math.prod(len(c) for c in table.candidates.values())


def _is_chain(table: CostTable) -> bool:
    named = [w for w, name in enumerate(table.window_names) if name is not None]
    once = len(named) == len(set(table.window_names[w] for w in named))
    order = [w for w in table.backward_order if table.window_names[w] is not None]
    return once and order == named[::-1] and all(table.window_names[w] is None for w in range(named[0]))


def solve(table: CostTable, budget: int, buckets: int | None = None) -> Solution | None:
    """The cheapest assignment whose predicted peak is within ``budget``, or None if none is."""
    if _count(table) <= ENUMERATE_LIMIT and buckets is None:
        fitting = [a for a in _all(table) if table.peak(a) <= budget]
        if not fitting:
            return None
        best = min(fitting, key=lambda a: _cost(table, a))
        return best, _cost(table, best)
    if _is_chain(table):
        found = _dp(table, budget, buckets or 64 * len(table.window_names))
    else:
        found = _local_search(table, budget)
    return None if found is None else (found, _cost(table, found))


def min_peak(table: CostTable) -> int:
    """The smallest predicted peak of any assignment (the smallest budget ``solve`` can meet)."""
    if _count(table) <= ENUMERATE_LIMIT:
        return min(table.peak(a) for a in _all(table))
    # Bisect the budget over what solve meets: between the least and the most any window can add.
    low = 0
    high = min(table.peak({n: c[i % len(c)] for n, c in table.candidates.items()})
               for i in range(max(len(c) for c in table.candidates.values())))
    while high - low > max(high // 1000, 1):
        middle = (low + high) // 2
        found = solve(table, middle)
        low, high = (low, table.peak(found[0])) if found is not None else (middle, high)
    return high


def _suffix_bounds(table: CostTable) -> list[int]:
    """Per window, the most that all later windows can leave live once their backward has run."""
    most = []
    for w, name in enumerate(table.window_names):
        options = [table.fixed[w]] if name is None else [c.windows[0] for c in table.candidates[name]]
        most.append(max(o.f_net + o.b_net for o in options))
    bounds = [0] * len(most)
    for w in range(len(most) - 2, -1, -1):
        bounds[w] = bounds[w + 1] + most[w + 1]
    return bounds


def _dp(table: CostTable, budget: int, buckets: int) -> Assignment | None:
    """The DP over a chain's windows (see the module docstring)."""
    step = max(math.ceil(budget / buckets), 1)
    bounds = _suffix_bounds(table)
    # state: live bytes after the forward windows so far, in buckets -> (cost, assignment so far)
    states: dict[int, tuple[tuple[float, float], Assignment]] = {0: ((0.0, 0.0), {})}
    for w, name in enumerate(table.window_names):
        options = [(None, table.fixed[w])] if name is None else [(c, c.windows[0]) for c in table.candidates[name]]
        following: dict[int, tuple[tuple[float, float], Assignment]] = {}
        for bucket, (cost, chosen) in states.items():
            live = bucket * step
            for candidate, window in options:
                backward = live + window.f_net + bounds[w] + window.b_peak
                if live + window.f_peak > budget or backward > budget:
                    continue
                after = max(math.ceil((live + window.f_net) / step), 0)
                if candidate is None:
                    new_cost, new_chosen = cost, chosen
                else:
                    new_cost = (cost[0] + candidate.variance, cost[1] + candidate.time_delta)
                    new_chosen = {**chosen, name: candidate}
                if after not in following or new_cost < following[after][0]:
                    following[after] = (new_cost, new_chosen)
        states = following
    if not states:
        return None
    return min(states.values(), key=lambda item: item[0])[1]


def _local_search(table: CostTable, budget: int) -> Assignment | None:
    """From each feasible uniform assignment, change one segment at a time while the cost falls."""
    best: Assignment | None = None
    width = max(len(c) for c in table.candidates.values())
    for i in range(width):
        current = {n: c[min(i, len(c) - 1)] for n, c in table.candidates.items()}
        if table.peak(current) > budget:
            continue
        improved = True
        while improved:
            improved = False
            for name, options in table.candidates.items():
                for option in options:
                    trial = {**current, name: option}
                    if _cost(table, trial) < _cost(table, current) and table.peak(trial) <= budget:
                        current, improved = trial, True
        if best is None or _cost(table, current) < _cost(table, best):
            best = current
    return best
