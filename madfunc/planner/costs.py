"""The planner's cost model: a plan's step time and peak memory, predicted from profiled windows.

Memory: a step is replayed window by window, forward in call order, then backward in the order the
profile saw. Each window under the strategy its segment gets adds its profiled peak on top of what is
live and leaves its net behind; the predicted peak is the highest point. Each window's figures come from a
step where every segment had that strategy, so what a window frees of its input (a reverse consumer saves
it, a forward one does not) is charged to the consumer, whose strategy decides it.

Time: the base plan's step time plus, per segment, what changing that segment alone to its strategy
changed in a measured step (times add: each segment's passes run once per step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from madfunc.plan import Strategy
from madfunc.planner.profile import WindowCost

__all__ = ["Candidate", "CostTable"]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One strategy for one segment: its windows' costs, its time above the base plan and its variance."""

    strategy: Strategy
    windows: tuple[WindowCost, ...]  # one per call of the segment, in call order
    time_delta: float
    variance: float  # relative variance of the segment's gradient (0 for exact strategies)


@dataclasses.dataclass(frozen=True)
class CostTable:
    """Everything the solver needs: the windows' layout and every segment's candidates."""

    window_names: tuple[str | None, ...]  # forward windows in call order (None: before the first segment)
    backward_order: tuple[int, ...]  # window indices in the order backward visits them
    fixed: Mapping[int, WindowCost]  # windows of no segment (code before the first one)
    candidates: Mapping[str, tuple[Candidate, ...]]  # per segment, in first-call order
    base_time: float

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.candidates)

    def windows_of(self, assignment: Mapping[str, Candidate]) -> list[WindowCost]:
        calls: dict[str, int] = {}
        out = []
        for w, name in enumerate(self.window_names):
            if name is None:
                out.append(self.fixed[w])
            else:
                i = calls[name] = calls.get(name, -1) + 1
                out.append(assignment[name].windows[i])
        return out

    def peak(self, assignment: Mapping[str, Candidate]) -> int:
        """Predicted peak bytes of one step with each segment on its candidate."""
        windows = self.windows_of(assignment)
        live = peak = 0
        for cost in windows:
            peak = max(peak, live + cost.f_peak)
            live += cost.f_net
        for w in self.backward_order:
            peak = max(peak, live + windows[w].b_peak)
            live += windows[w].b_net
        return peak

    def time(self, assignment: Mapping[str, Candidate]) -> float:
        """Predicted seconds of one step (never below a tenth of the base plan's: the deltas are measured
        differences, and on a noisy machine their sum can undershoot; a step costs something)."""
        return max(self.base_time + sum(candidate.time_delta for candidate in assignment.values()),
                   0.1 * self.base_time)

    def variance(self, assignment: Mapping[str, Candidate]) -> float:
        """Sum of the segments' relative gradient variances (0: an exact plan)."""
        return sum(candidate.variance for candidate in assignment.values())
