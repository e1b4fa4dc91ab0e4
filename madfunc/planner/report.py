"""What ``auto_plan`` predicted and chose: a frozen, printable report."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from madfunc.core.memory import format_bytes
from madfunc.core.text import text_table
from madfunc.plan import Plan

__all__ = ["PlanEstimate", "PlanReport", "SegmentOption", "SegmentPlan"]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:+.3g} ms" if seconds < 0 or seconds > 0 else "0 ms"


def _variance(value: float) -> str:
    return "exact" if value == 0 else "unknown" if math.isinf(value) else f"{value:.3g}"


@dataclasses.dataclass(frozen=True)
class SegmentOption:
    """One candidate strategy of one segment, as profiled (bytes summed over the segment's calls).

    ``time_delta``: seconds one step takes beyond the base plan when this segment alone takes the strategy;
    ``kept_bytes``: what its forward leaves live for backward (and for the next segments); ``forward_peak_bytes``
    and ``backward_peak_bytes``: the most its forward and its backward add on top of what is live;
    ``variance``: the relative variance of its gradient (0: exact; ``inf``: a law the strategy does not state).
    """

    strategy: str
    time_delta: float
    kept_bytes: int
    forward_peak_bytes: int
    backward_peak_bytes: int
    variance: float


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
    """One segment: its sizes, the strategy chosen and every option the planner weighed."""

    name: str
    calls: int
    differentiated: int | None  # scalars it differentiates (read leaves)
    output_numel: int | None
    chosen: str
    options: tuple[SegmentOption, ...]


@dataclasses.dataclass(frozen=True)
class PlanEstimate:
    """A whole plan's predicted step time and peak (``measured_time``: a timed step, where one was run)."""

    plan: str
    time: float
    peak_bytes: int
    variance: float
    fits: bool
    measured_time: float | None = None


@dataclasses.dataclass(frozen=True)
class PlanReport:
    """What :func:`auto_plan` measured, predicted and chose.

    Attributes:
        plan: the chosen :class:`Plan`.
        budget_bytes: the budget, in bytes.
        predicted_time: predicted seconds of one step under ``plan``.
        predicted_peak_bytes: predicted peak bytes one step allocates (beyond what exists before it).
        measured_peak_bytes: that peak measured on one step under ``plan`` (:func:`measure_peak`).
        min_peak_bytes: the smallest predicted peak of any plan of the candidates: the smallest budget.
        variance: the plan's summed relative gradient variance (0 for an exact plan).
        base_time: the measured step time of the base plan (every segment on the first candidate; the fastest
            of the repeats).
        segments: per segment, its options (:class:`SegmentPlan`).
        alternatives: uniform plans (every segment on one candidate) and the chosen one, predicted, with the
            uniform plans' measured times.
        notes: what the planner left out, and why.

    :meth:`replan` chooses again for another budget from the same profile, without running the step again
    but for one measured step of the new choice (a budget sweep profiles once).
    """

    plan: Plan
    budget_bytes: int
    predicted_time: float
    predicted_peak_bytes: int
    measured_peak_bytes: int
    min_peak_bytes: int
    variance: float
    base_time: float
    segments: tuple[SegmentPlan, ...]
    alternatives: tuple[PlanEstimate, ...]
    notes: tuple[str, ...] = ()
    # auto_plan's choice from the profile this report was made from (for replan; not data)
    _replan: Callable[[int | float | str, bool | None], PlanReport] | None = dataclasses.field(
        default=None, repr=False, compare=False)

    def replan(self, budget: int | float | str, exact: bool | None = None) -> PlanReport:
        """The report :func:`auto_plan` would give for ``budget`` (and ``exact``; default: as profiled), from the
        same profile: the step is run only to measure the new choice's peak. ``exact=False`` needs a profile made
        with ``exact=False`` (or with estimates among the candidates).

        Examples:
            >>> import torch, madfunc as mf
            >>> seg = mf.rev(lambda w, x: torch.tanh(x @ w).sum(), name="seg")
            >>> w, x = torch.randn(8, 64), torch.randn(128, 8)
            >>> _, report = mf.auto_plan(seg, w, x, budget="1MiB", repeats=1, return_report=True)
            >>> report.replan("2MiB").budget_bytes
            2097152
        """
        if self._replan is None:
            raise RuntimeError("PlanReport.replan: this report carries no profile (it was not made by auto_plan).")
        return self._replan(budget, exact)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types (JSON-serialisable): the plan as its string form."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "_replan"}
        out["segments"] = [dataclasses.asdict(x) for x in self.segments]
        out["alternatives"] = [dataclasses.asdict(x) for x in self.alternatives]
        out["notes"] = list(self.notes)
        out["plan"] = str(self.plan)
        return out

    def __str__(self) -> str:
        head = (
            f"auto_plan: {self.plan or '(empty plan)'}\n"
            f"budget {format_bytes(self.budget_bytes)}: predicted peak {format_bytes(self.predicted_peak_bytes)} "
            f"(measured {format_bytes(self.measured_peak_bytes)}), predicted step {self.predicted_time * 1e3:.3g} "
            f"ms, variance {_variance(self.variance)}; smallest feasible budget {format_bytes(self.min_peak_bytes)}"
        )
        rows = [
            [
                seg.name if i == 0 else "",
                ("* " if option.strategy == seg.chosen else "  ") + option.strategy,
                str(seg.differentiated if seg.differentiated is not None else "-") if i == 0 else "",
                _ms(option.time_delta),
                format_bytes(option.kept_bytes),
                format_bytes(option.forward_peak_bytes),
                format_bytes(option.backward_peak_bytes),
                _variance(option.variance),
            ]
            for seg in self.segments
            for i, option in enumerate(seg.options)
        ]
        headers = ("segment", "strategy", "n", "time vs base", "kept", "fwd peak", "bwd peak", "variance")
        plans = [
            [e.plan, _ms(e.time).lstrip("+"), "-" if e.measured_time is None else _ms(e.measured_time).lstrip("+"),
             format_bytes(e.peak_bytes), "yes" if e.fits else "no"]
            for e in self.alternatives
        ]
        notes = "".join(f"\nnote: {note}" for note in self.notes)
        return (
            f"{head}\nper segment (* chosen; base step {self.base_time * 1e3:.3g} ms):\n{text_table(headers, rows)}\n"
            f"plans:\n{text_table(('plan', 'time', 'measured', 'peak', 'fits'), plans, left=1)}{notes}"
        )
