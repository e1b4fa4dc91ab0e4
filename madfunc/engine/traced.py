"""Forward segments as plain torch code that ``torch.compile`` can trace: ``mixed_grad(..., traceable=True)``.

The default engine (``_forward``) runs a forward segment as an ``autograd.Function`` that regenerates its
tangents from a seed, replays recorded passes and checks its inputs at run time: fast eagerly, but Dynamo
cannot trace it, so a compiled step breaks its graph around each segment. With ``traceable=True`` a forward
segment is instead written as ordinary differentiable code with the same gradient,

    out = y + (1/k) * sum_j c_j * ydot_j,    c_j = sum_leaves <v_j, leaf - leaf.detach()>,

where ``(y, ydot_j) = jvp(segment, leaves.detach(), v_j)``. ``c_j`` is zero, so ``out`` is ``y``; its
gradient is ``<ydot_j, ybar>`` per ``j``, and the chain rule through ``c_j`` gives every leaf
``(1/k) sum_j <ydot_j, ybar> v_j``: the forward-gradient estimate (basis tangents and scale 1: ``Exact``).
Everything is torch ops, so Dynamo traces a whole training step into one graph, and inductor draws the
tangents with its counter-based generator (benchmarks/RESULTS.md: 8x eager on a small MLP).

Bookkeeping lives in a module-level stack, not the ContextVars of the default path: Dynamo traces list
and attribute mutation, not ``ContextVar.set``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode

from madfunc.core.checks import check_output, needs_grad_traced, refuse_complex, same_name_error
from madfunc.core.functorch import METADATA_OPS
from madfunc.engine.context import TRACED_STACK, check_plan_used
from madfunc.plan import conflict_error, matching_keys
from madfunc.strategies.base import Strategy

__all__ = ["TracedState", "active", "check_strategy", "dispatch", "planned", "run_segment"]



@dataclasses.dataclass
class TracedState:
    """Plan and bookkeeping of one traceable transform call."""

    plan: dict  # plan key -> Strategy (a dict: Dynamo traces it, and not a Plan made inside the traced step)
    where: str
    names: list = dataclasses.field(default_factory=list)  # segments that ran, in order (plan checks)
    owners: dict = dataclasses.field(default_factory=dict)  # segment name -> identity of its function
    nested: list = dataclasses.field(default_factory=list)  # (inner, outer) pairs: segments inside a forward one
    inside: str | None = None  # the forward segment whose body is running now


_STACK = TRACED_STACK  # (shared with the default engine's calls, which push None: see context.planned_call)


def active() -> TracedState | None:
    """The innermost traceable call, or None (outside one, or inside a default-engine call nested in one).

    While a forward segment's body runs, the state stays active with ``inside`` set: ``dispatch`` then runs
    the segments the body calls as plain code."""
    return _STACK[-1] if _STACK else None


class _Watch(TorchFunctionMode):
    """Records which of ``leaves`` an op reads (metadata queries aside) into ``used``."""

    def __init__(self, leaves: tuple, used: list[bool]) -> None:
        super().__init__()
        self.leaves, self.used = leaves, used

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func not in METADATA_OPS:
            for arg in pytree.tree_leaves((args, kwargs)):
                for i, leaf in enumerate(self.leaves):
                    if arg is leaf:
                        self.used[i] = True
        return func(*args, **kwargs)


def check_strategy(name: str, strategy: Strategy) -> None:
    """Only strategies with a traceable form run traced; the others are refused by name, before any work."""
    if not strategy.is_forward or strategy.traceable:
        return
    raise ValueError(
        f"mixed_grad(traceable=True): segment {name!r} has strategy {strategy!r}, which has no traceable form. "
        "Traceable forward segments take a strategy whose `traceable` is true (Exact(), Random(distribution="
        "'gaussian' or 'rademacher')); use another strategy for this segment, or traceable=False (the default "
        "engine, which runs segments eagerly inside a compiled step)."
    )


def run_segment(state: TracedState, name: str, strategy: Strategy, fn: Callable[..., Any], args: tuple,
                kwargs: dict) -> Any:
    """Segment ``name`` under ``strategy``, written as traceable code with the forward-mode gradient."""
    check_strategy(name, strategy)
    flat, spec = pytree.tree_flatten((args, kwargs))
    refuse_complex(name, flat)
    diff = [i for i, leaf in enumerate(flat) if needs_grad_traced(leaf)] if torch.is_grad_enabled() else []
    if not strategy.is_forward or not diff:
        return fn(*args, **kwargs)
    leaves = [flat[i] for i in diff]
    detached = [t.detach() for t in leaves]
    tangents, scale = strategy.traced_tangents(name, detached)
    k = tangents[0].shape[0]

    used = [False] * len(diff)

    def body(*primals: torch.Tensor) -> Any:
        inputs = list(flat)
        for i, p in zip(diff, primals, strict=True):
            inputs[i] = p
        a, kw = pytree.tree_unflatten(inputs, spec)
        with _Watch(primals, used):
            out = fn(*a, **kw)
        check_output(name, out, pytree.tree_leaves(out))
        return out

    def one(*v: torch.Tensor) -> Any:
        return torch.func.jvp(body, tuple(detached), v)

    state.inside = name
    try:
        if k == 1:
            y, ydot = one(*(v[0] for v in tangents))
            ydot = pytree.tree_map(lambda d: d.unsqueeze(0), ydot)
        else:
            ys, ydot = torch.func.vmap(one, randomness="same")(*tangents)
            y = pytree.tree_map(lambda t: t[0], ys)
    finally:
        state.inside = None
    if not any(used):  # the output does not depend on the differentiated inputs: zero gradients, as eagerly
        return y
    # Inputs no op read get exact zeros, as in the default engine (their tangents would add only noise).
    c = cast(torch.Tensor, sum((v * (t - d).unsqueeze(0)).flatten(1).sum(1)  # (a tensor: any(used) above)
                               for v, t, d, u in zip(tangents, leaves, detached, used, strict=True) if u))

    def attach(out: Any, dots: Any) -> Any:
        if not (isinstance(out, torch.Tensor) and (out.is_floating_point() or out.is_complex())):
            return out  # integer outputs have no gradient
        coef = (c * scale).to(dots.dtype).reshape(k, *([1] * out.dim()))
        return out + (coef * dots).sum(0)

    return pytree.tree_map(attach, y, ydot)


# Plan matching (fnmatch, compiled regexes) is Python that Dynamo cannot trace. Its results depend only on the
# plan's keys and the segment names, strings that Dynamo treats as constants, so it runs once while tracing.
_constant = getattr(torch.compiler, "assume_constant_result", lambda fn: fn)


class _Keys(tuple):
    """A plan's keys, with the plan's matching rule (what ``check_plan_used`` reads of a plan)."""

    def matching_keys(self, name: str) -> list[str]:
        return matching_keys(self, name)


@_constant
def _matching(keys: tuple, name: str) -> tuple:
    return tuple(matching_keys(keys, name))


@_constant
def _unused_keys(keys: tuple, where: str, names: tuple, nested: tuple) -> str:
    """The error for a plan key that matched no segment that ran, or "" (see ``_context.check_plan_used``)."""
    try:
        check_plan_used(_Keys(keys), where, list(dict.fromkeys(names)), dict(nested))
    except ValueError as error:
        return str(error)
    return ""


def dispatch(state: TracedState, name: str, default: Strategy, identity: Any, fn: Callable[..., Any], args: tuple,
             kwargs: dict) -> Any:
    """A segment call under a traceable transform: plain inside a forward segment, else as the plan says."""
    if state.owners.setdefault(name, identity) != identity:
        raise same_name_error(state.where, name)
    if state.inside is not None:  # part of the enclosing forward segment's computation
        state.nested.append((name, state.inside))
        return fn(*args, **kwargs)
    state.names.append(name)
    keys = _matching(tuple(state.plan), name)
    strategy = state.plan[keys[0]] if keys else default
    # (Identity first: a strategy's int fields may be symbolic in a graph compiled for several values of k,
    # and Dynamo cannot compare those as constants; only distinct objects from several patterns need ==.)
    if any(state.plan[key] is not strategy and state.plan[key] != strategy for key in keys):
        raise conflict_error(name, [(key, state.plan[key]) for key in keys])
    return run_segment(state, name, strategy, fn, args, kwargs)


def planned(fn: Callable[..., Any], plan: Any, where: str, allow_unused: bool) -> Callable[..., Any]:
    """``fn`` run with ``plan`` active for traceable segments; every plan key must match a segment that ran."""

    def inner(*args: Any, **kwargs: Any) -> Any:
        state = TracedState(plan, where)
        _STACK.append(state)
        try:
            out = fn(*args, **kwargs)
        finally:
            _STACK.pop()
        if not allow_unused:
            problem = _unused_keys(tuple(plan), where, tuple(state.names), tuple(state.nested))
            if problem:
                raise ValueError(problem)
        return out

    return inner
