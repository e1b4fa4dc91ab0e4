"""Profiling for the planner: one step under a plan, its memory timeline cut into per-segment windows.

A step's forward runs the segments one after another; the engine appends a ``SegmentCall`` as each starts,
which opens a forward window. In backward, the op running belongs to the autograd node being executed
(``torch._C._current_autograd_node``), and a node belongs to the forward window in which it was created:
node sequence numbers grow with creation, so a probe node made as each window opens brackets them. Nodes
made during backward (a checkpointed segment's recomputation) and ``AccumulateGrad`` (no sequence number)
belong to the window of the op before them. The live bytes come from :class:`~madfunc.core.memory.PeakMemory`.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch

from madfunc.core.memory import PeakMemory
from madfunc.engine import context as _context
from madfunc.engine import deferral as _deferral
from madfunc.plan import Plan

__all__ = ["Step", "Trace", "WindowCost", "trace_step", "time_steps"]

WHERE = "madfunc.auto_plan"
ArgNums = int | tuple[int, ...] | None


def _probe() -> int:
    """The autograd sequence number the next node made on this thread would get, minus one."""
    with torch.enable_grad():
        node = (torch.empty(0, requires_grad=True) * 1).grad_fn
    assert node is not None
    return node._sequence_nr()


def _leaves(loss: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors ``loss.backward()`` would give a ``.grad`` (its graph's AccumulateGrad nodes)."""
    found: dict[int, torch.Tensor] = {}
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            found.setdefault(id(variable), variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(found.values())


@dataclasses.dataclass(frozen=True)
class Step:
    """One gradient step of ``fn(*args)`` under a plan, as the user will run it.

    ``argnums`` an int or tuple: ``torch.func.grad(fn, argnums)`` under the plan (what :func:`mixed_grad`
    does); None: ``fn(*args)`` under the plan and backward to the leaves that need a gradient (what
    ``loss.backward()`` in a :func:`use_plan` block does, without touching their ``.grad``).
    """

    fn: Callable[..., Any]
    args: tuple
    argnums: ArgNums

    def run(self, plan: Plan, watch: Callable[[_context.CallState], None] | None = None) -> Any:
        """The gradients of one step under ``plan``; ``watch`` sees the call state before any segment runs."""
        if self.argnums is None:
            # A SeedSGD's claims (read when a segment runs) would take Random parts out of the result.
            with _deferral.suspended():
                with _context.planned_call(plan, WHERE, allow_unused=True) as state:
                    if watch is not None:
                        watch(state)
                    loss = self.fn(*self.args)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or loss.grad_fn is None:
                    raise ValueError(
                        f"{WHERE}(fn, ..., argnums=None): fn must return a scalar tensor that depends on tensors "
                        f"needing a gradient (a model's parameters), got {type(loss).__name__}."
                    )
                return torch.autograd.grad(loss, _leaves(loss))

        def planned(*inner: Any) -> Any:
            with _context.planned_call(plan, WHERE, allow_unused=True) as state:
                if watch is not None:
                    watch(state)
                return self.fn(*inner)

        return torch.func.grad(planned, self.argnums)(*self.args)

    def sync(self, tree: Any) -> None:
        """Wait for CUDA work on ``tree``'s tensors (and the arguments'): timing needs it."""
        leaves: list[Any] = optree.tree_leaves((tree, self.args))  # pyright: ignore[reportArgumentType]
        if any(isinstance(t, torch.Tensor) and t.is_cuda for t in leaves):
            torch.cuda.synchronize()


@dataclasses.dataclass(frozen=True)
class WindowCost:
    """What one forward window (a segment call and the code after it) adds to live memory, in bytes.

    ``f_peak`` and ``f_net``: the most above its start while its forward runs, and what stays at its end;
    ``b_peak`` and ``b_net``: the same for its backward (``b_net`` is negative where backward frees what
    the forward kept)."""

    f_peak: int
    f_net: int
    b_peak: int
    b_net: int


@dataclasses.dataclass(frozen=True)
class Trace:
    """One profiled step: per forward window (window 0: the code before the first segment) its segment
    name and costs, the order backward visits the windows, the measured peak and the segments' stats."""

    names: tuple[str | None, ...]
    costs: tuple[WindowCost, ...]
    backward_order: tuple[int, ...]
    peak_bytes: int
    stats: dict[str, Any]


class _Timeline(PeakMemory):
    """A PeakMemory that cuts the step into forward windows and backward runs (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(cuda=False)
        self.names: list[str | None] = [None]
        self.forward: list[list[int]] = [[0, 0, 0]]  # per window: start, peak, end (live bytes)
        self.seqs = [-1]
        self.runs: list[list[int]] = []  # backward: [window, start, peak, end]
        self.in_backward = False
        self.end_seq = 0

    def open_window(self, name: str) -> None:
        if self.in_backward:
            return
        self.forward[-1][2] = self.live_bytes
        self.names.append(name)
        self.forward.append([self.live_bytes, self.live_bytes, 0])
        self.seqs.append(_probe())

    def _window_of(self, node: Any) -> int:
        seq = node._sequence_nr()
        if seq >= self.end_seq:  # made in backward, or AccumulateGrad (the largest number)
            return self.runs[-1][0] if self.runs else len(self.names) - 1
        return max(bisect.bisect_right(self.seqs, seq) - 1, 0)

    def _op_start(self) -> None:
        node = torch._C._current_autograd_node()
        if node is None:
            return
        if not self.in_backward:
            self.in_backward = True
            self.forward[-1][2] = self.live_bytes
            # Backward starts at the graph's root, the last node the forward made: later numbers were made in
            # backward. (Numbers are per thread; on CUDA backward runs on a device thread and makes its own.)
            self.end_seq = node._sequence_nr() + 1
        window = self._window_of(node)
        if not self.runs or self.runs[-1][0] != window:
            if self.runs:
                self.runs[-1][3] = self.live_bytes
            self.runs.append([window, self.live_bytes, self.live_bytes, 0])

    def _op_end(self) -> None:
        record = self.runs[-1] if self.in_backward else self.forward[-1]
        i = 2 if self.in_backward else 1
        record[i] = max(record[i], self.live_bytes)

    def finish(self) -> None:
        if self.in_backward:
            self.runs[-1][3] = self.live_bytes
        else:
            self.forward[-1][2] = self.live_bytes

    def costs(self) -> tuple[tuple[WindowCost, ...], tuple[int, ...]]:
        backward: dict[int, list[int]] = {}  # window -> [net so far, peak above its first start]
        for window, start, peak, end in self.runs:
            net_peak = backward.setdefault(window, [0, 0])
            net_peak[1] = max(net_peak[1], net_peak[0] + peak - start)
            net_peak[0] += end - start
        costs = tuple(
            WindowCost(peak - start, end - start, *reversed(backward.get(w, [0, 0])))
            for w, (start, peak, end) in enumerate(self.forward)
        )
        return costs, tuple(backward)


def trace_step(step: Step, plan: Plan, warmup: int = 2) -> Trace:
    """Run ``step`` under ``plan`` ``warmup`` times (forward segments record their replay on the second call),
    then once under a timeline; return its per-window costs."""
    for _ in range(warmup):
        step.run(plan)
    timeline = _Timeline()
    states: list[_context.CallState] = []

    def watch(state: _context.CallState) -> None:
        state.calls = _WatchedCalls(timeline)
        states.append(state)

    with timeline:
        grads = step.run(plan, watch)
        timeline.finish()
    del grads
    costs, order = timeline.costs()
    stats = {call.name: call.stats for call in states[0].calls if call.nested_in is None}
    return Trace(tuple(timeline.names), costs, order, timeline.peak_bytes, stats)


class _WatchedCalls(list):
    """The call state's list of segment calls, telling the timeline when a top-level segment starts."""

    def __init__(self, timeline: _Timeline) -> None:
        super().__init__()
        self.timeline = timeline

    def append(self, call: Any) -> None:
        super().append(call)
        if call.nested_in is None:
            self.timeline.open_window(call.name)


def time_steps(step: Step, plans: Sequence[Plan], repeats: int, slow: float = 1.0) -> list[float]:
    """Seconds of one step under each plan, the fastest of ``repeats`` (other load only ever adds time), each
    plan warmed up first and the rounds interleaved (a slow moment of the machine then hits every plan
    alike). A plan whose warm step took over ``slow`` seconds is not repeated: its warm step is its time (its
    cost is then far above the others' anyway)."""
    warm: list[float] = []
    for plan in plans:
        step.sync(step.run(plan))
        start = time.perf_counter()
        step.sync(step.run(plan))
        warm.append(time.perf_counter() - start)
    seconds: list[list[float]] = [[] if t <= slow else [t] for t in warm]
    for _ in range(repeats):
        for i, plan in enumerate(plans):
            if warm[i] > slow:
                continue
            start = time.perf_counter()
            step.sync(step.run(plan))
            seconds[i].append(time.perf_counter() - start)
    return [min(s) for s in seconds]
