"""The state of one call of a madfunc transform (or one ``use_plan`` block), held in a ContextVar."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from madfunc.core.checks import same_name_error
from madfunc.engine.rng import TangentStream
from madfunc.plan import Plan
from madfunc.strategies.base import SegmentStats, Strategy

__all__ = ["TRACED_STACK", "CallState", "SegmentCall", "active", "activate", "check_plan_used", "nested_in",
           "planned_call"]


@dataclasses.dataclass
class SegmentCall:
    """What one call of one segment did; the forward engine fills ``stats``."""

    name: str
    strategy: Strategy
    nested_in: str | None = None
    stats: SegmentStats = dataclasses.field(default_factory=SegmentStats)


@dataclasses.dataclass
class CallState:
    """Plan and bookkeeping of one transform call: which segments ran, under which function."""

    plan: Plan
    where: str
    measure: bool = False  # diagnostics: also measure what reverse segments save for backward
    generator: torch.Generator | None = None  # the tangents' source (see _rng.TangentStream)
    allow_unused: bool = False  # plan keys may match no segment (segments that run only on some steps)
    # Data parallelism (_distributed): the process group Random segments all-reduce their coefficients over
    # (a Replicas, or None), and for mixed_grad the call that maps its differentiated argument leaves.
    replicas: Any = None
    functional: Any = None
    owners: dict[str, Any] = dataclasses.field(default_factory=dict)
    calls: list[SegmentCall] = dataclasses.field(default_factory=list)
    tangents: TangentStream = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.tangents = TangentStream(self.where, self.generator)

    def claim(self, name: str, owner: Any, identity: Any) -> None:
        """Record that segment ``name`` runs ``owner``; two different functions under one name are an error."""
        previous = self.owners.get(name)
        if previous is None:
            self.owners[name] = (owner, identity)
        elif previous[1] != identity:
            raise same_name_error(self.where, name, f" ({_describe(previous[0])} and {_describe(owner)})")

    def check_plan_used(self) -> None:
        """Every plan key must match a segment that ran (a typo would otherwise be silently ignored).

        A segment that ran only inside a forward segment is differentiated as part of that segment's
        computation, so a key that matches nothing else has no effect either: also an error.
        """
        if self.allow_unused:
            return
        top = list(dict.fromkeys(c.name for c in self.calls if c.nested_in is None))
        nested = {c.name: c.nested_in for c in self.calls if c.nested_in is not None}
        check_plan_used(self.plan, self.where, top, nested)


class PlanKeys(Protocol):
    """What ``check_plan_used`` reads of a plan: its keys, and which of them apply to a segment."""

    def __iter__(self) -> Iterator[str]: ...

    def matching_keys(self, name: str) -> list[str]: ...


def check_plan_used(plan: PlanKeys, where: str, top: list[str], nested: dict[str, str]) -> None:
    """Raise if a key of ``plan`` matches none of the segments ``top`` that ran on their own.

    ``nested`` maps segments that ran only inside a forward segment to it: a key matching only those has
    no effect either (it is differentiated as part of the outer segment), and gets its own message.
    """
    for key in plan:
        if any(key in plan.matching_keys(n) for n in top):
            continue
        hidden = [n for n in nested if key in plan.matching_keys(n)]
        if hidden:
            inner = hidden[0]
            raise ValueError(
                f"{where}: plan key {key!r} matches only segment {inner!r}, which ran inside forward "
                f"segment {nested[inner]!r} and is differentiated as part of it, so the key has no effect. "
                f"Drop the key, or give {nested[inner]!r} the strategy Reverse() so that {inner!r} runs "
                "on its own."
            )
        listed = ", ".join(repr(n) for n in top) if top else "none"
        raise ValueError(
            f"{where}: plan key {key!r} matched no segment that ran. Segments that ran: {listed}. "
            "Fix the name or pattern, or drop the key (or pass allow_unused=True if that segment runs only on "
            "some steps)."
        )


def _describe(fn: Any) -> str:
    code = getattr(fn, "__code__", None)
    if code is not None:
        return f"{getattr(fn, '__qualname__', fn)!s} at {code.co_filename}:{code.co_firstlineno}"
    return f"{type(fn).__name__} object at {id(fn):#x}"


# The traceable engine's calls (engine/traced.py), innermost last; None entries are default-engine calls nested
# in a traceable one, which shadow it. A module-level list, not a ContextVar: Dynamo traces list mutation, not
# ``ContextVar.set``.
TRACED_STACK: list[Any] = []


@contextlib.contextmanager
def planned_call(plan: Plan, where: str, **options: Any) -> Iterator[CallState]:
    """The one way every entry point (mixed_grad, use_plan, compare, inspect) runs code under a plan: a fresh
    call state active for the block (``options``: CallState's fields), and on a normal exit the check that
    every plan key matched a segment that ran. The block shadows an enclosing traceable call."""
    state = CallState(plan, where, **options)
    TRACED_STACK.append(None)
    try:
        with activate(state):
            yield state
    finally:
        TRACED_STACK.pop()
    state.check_plan_used()


# The active call, or None outside any madfunc transform. While a forward segment runs its own
# computation, `_NESTED` names it: segments called inside run as plain code (they are part of it).
_ACTIVE: contextvars.ContextVar[CallState | None] = contextvars.ContextVar("madfunc_active", default=None)
_NESTED: contextvars.ContextVar[str | None] = contextvars.ContextVar("madfunc_nested", default=None)


def active() -> CallState | None:
    """The active call state, or None."""
    return _ACTIVE.get()


def nested_in() -> str | None:
    """Name of the forward segment whose computation is running now, or None."""
    return _NESTED.get()


@contextlib.contextmanager
def activate(state: CallState | None) -> Iterator[None]:
    """Make ``state`` the active call (None: no madfunc transform) for the duration of the block."""
    token = _ACTIVE.set(state)
    token_nested = _NESTED.set(None)
    try:
        yield
    finally:
        _NESTED.reset(token_nested)
        _ACTIVE.reset(token)
    if state is not None:
        state.tangents.finish()


@contextlib.contextmanager
def inside_forward_segment(name: str) -> Iterator[None]:
    """Mark the block as the computation of forward segment ``name``."""
    token = _NESTED.set(name)
    try:
        yield
    finally:
        _NESTED.reset(token)
