"""The solver against brute force on synthetic cost tables (no profiling: the tables are made up)."""

from __future__ import annotations

import itertools
import random

import pytest

from madfunc.plan import Exact, Random, Reverse
from madfunc.planner.costs import Candidate, CostTable
from madfunc.planner.profile import WindowCost
from madfunc.planner.solve import min_peak, solve

STRATEGIES = (Reverse(), Exact(chunk_size=8), Exact(), Random(k=4))  # stand-ins: only their identity matters
UNIT = 1024  # every byte figure a multiple of it, so that DP buckets of UNIT bytes round nothing


def _chain(seed: int, segments: int, stochastic: bool = False) -> CostTable:
    """A made-up chain: per segment and strategy random window costs and times; gradients (f_net + b_net)
    the same for every strategy of a segment, as for real ones (a gradient has the leaf's size)."""
    rng = random.Random(seed)
    candidates = {}
    for s in range(segments):
        grad = rng.randint(0, 4) * UNIT
        options = []
        for strategy in STRATEGIES if stochastic else STRATEGIES[:3]:
            kept = rng.randint(0, 40) * UNIT
            window = WindowCost(kept + rng.randint(0, 30) * UNIT, kept, rng.randint(0, 30) * UNIT, grad - kept)
            variance = rng.uniform(1, 10) if strategy.stochastic else 0.0
            options.append(Candidate(strategy, (window,), rng.uniform(-1, 5), variance))
        candidates[f"s{s}"] = tuple(options)
    names = (None, *candidates)
    order = tuple(range(segments, 0, -1))
    return CostTable(names, order, {0: WindowCost(0, 0, 0, 0)}, candidates, 1.0)


def _brute(table: CostTable, budget: int):
    fitting = []
    for combo in itertools.product(*table.candidates.values()):
        a = dict(zip(table.segments, combo, strict=True))
        if table.peak(a) <= budget:
            fitting.append((table.variance(a), table.time(a)))
    return min(fitting) if fitting else None


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("stochastic", [False, True])
def test_dp_finds_the_brute_force_optimum(seed: int, stochastic: bool) -> None:
    table = _chain(seed, segments=5, stochastic=stochastic)
    smallest = min_peak(table)
    largest = max(table.peak(dict(zip(table.segments, c, strict=True)))
                  for c in itertools.product(*table.candidates.values()))
    for budget in (smallest - UNIT, smallest, (smallest + largest) // 2 // UNIT * UNIT, largest):
        best = _brute(table, budget)
        # buckets of UNIT bytes: the DP's rounding is exact, so it must match brute force
        found = solve(table, budget, buckets=max(budget // UNIT, 1))
        enumerated = solve(table, budget)
        if best is None:
            assert found is None and enumerated is None
            continue
        assert found is not None and enumerated is not None
        assert table.peak(found[0]) <= budget and table.peak(enumerated[0]) <= budget
        assert found[1] == pytest.approx(best) and enumerated[1] == pytest.approx(best)


def test_min_peak_is_the_least_budget_that_solves() -> None:
    for seed in range(5):
        table = _chain(seed, segments=4)
        smallest = min_peak(table)
        assert solve(table, smallest) is not None
        assert solve(table, smallest - 1) is None


def test_dozens_of_segments_use_the_dp_and_fit() -> None:
    # 24 segments x 3 strategies: 3**24 plans, beyond enumeration; the default buckets may round, never overrun
    table = _chain(7, segments=24)
    budget = min_peak(table) * 3 // 2
    found = solve(table, budget)
    assert found is not None and table.peak(found[0]) <= budget
    # no worse than every uniform plan that fits
    for i in range(3):
        uniform = {name: options[i] for name, options in table.candidates.items()}
        if table.peak(uniform) <= budget:
            assert found[1][1] <= table.time(uniform) + 1e-9
