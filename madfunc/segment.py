"""Segment annotations: ``fwd`` and ``rev`` mark a pure function (or module) as one named segment."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

import torch
from torch import nn

from madfunc.engine import context as _context
from madfunc.engine import traced as _traced
from madfunc.engine.checkpoint import run_checkpointed
from madfunc.engine.forward import run_forward
from madfunc.engine.reverse import run_reverse
from madfunc.plan import Exact, Reverse, Strategy, StrategyLike, as_strategy

__all__ = ["ModuleSegment", "Segment", "SegmentSpec", "call_segment", "fwd", "rev"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class SegmentSpec:
    """What a segment is, fixed when it is made (``fwd``/``rev``, ``mark_segments``): its name, default strategy,
    what the user marked (``owner``: searched for captured tensors and keyed for replay), the identity that
    tells two functions under one name apart, a module segment's module, and whether passes may be recorded."""

    name: str
    default: Strategy
    owner: Any
    identity: Any
    own_module: nn.Module | None = None
    record_passes: bool = True


@torch.compiler.disable  # eager inside torch.compile: see transforms._eager
def _dispatch(spec: SegmentSpec, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    state = _context.active()
    if state is None:  # outside any madfunc transform: exactly the plain function
        return fn(*args, **kwargs)
    state.claim(spec.name, spec.owner, spec.identity)
    outer = _context.nested_in()
    if outer is not None:  # part of an enclosing forward segment's computation
        state.calls.append(_context.SegmentCall(spec.name, Reverse(), nested_in=outer))
        return fn(*args, **kwargs)
    strategy = state.plan.lookup(spec.name) or spec.default
    record = _context.SegmentCall(spec.name, strategy)
    state.calls.append(record)
    if strategy.recomputes:
        return run_checkpointed(spec.name, fn, args, kwargs, record, state.measure, own_module=spec.own_module,
                                owner=spec.owner)
    if not strategy.is_forward:
        return run_reverse(spec.name, fn, args, kwargs, record if state.measure else None)
    return run_forward(
        spec.name, strategy, fn, args, kwargs, record, state.measure, own_module=spec.own_module, owner=spec.owner,
        record_passes=spec.record_passes,
    )


def call_segment(spec: SegmentSpec, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """One call of a segment, as every kind of segment makes it (``fwd``/``rev`` and ``mark_segments``).

    Under ``mixed_grad(traceable=True)`` the segment is plain torch code that torch.compile traces. That is
    checked here, not in ``_dispatch``, which is compiler.disable'd (a graph break) and reads the default
    engine's ContextVars."""
    traced = _traced.active()
    if traced is not None:
        return _traced.dispatch(traced, spec.name, spec.default, spec.identity, fn, args, kwargs)
    # torch.compiler.disable is unannotated: pyright takes its result for its one-argument wrapper
    return _dispatch(spec, fn, args, kwargs)  # pyright: ignore[reportCallIssue]


def _identity(fn: Any) -> Any:
    # Functions re-created from the same source (a lambda or closure built in a loop or per call) count
    # as one function; anything else is compared by identity.
    code = getattr(fn, "__code__", None)
    return ("code", code) if code is not None else ("object", id(fn))


def _name_of(fn: Any, name: str | None, annotation: str) -> str:
    if name is not None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{annotation}(name=...): expected a non-empty string, got {name!r}.")
        return name
    if isinstance(fn, nn.Module):
        raise TypeError(
            f"{annotation}(module): a module segment needs an explicit name, e.g. "
            f"{annotation}(model.{type(fn).__name__.lower()}, name='stem')."
        )
    fn_name = getattr(fn, "__name__", None)
    if not fn_name or fn_name == "<lambda>" or not fn_name.isidentifier():
        raise TypeError(
            f"{annotation}(fn): {fn!r} has no usable __name__ (a lambda or functools.partial); give the "
            f"segment an explicit name, e.g. {annotation}(fn, name='stem')."
        )
    return fn_name


class Segment:
    """A pure function marked as one segment; see :func:`fwd` and :func:`rev`.

    Outside a madfunc transform, calling it calls the function. Inside one, the active plan decides
    whether it runs in reverse mode (plain code) or forward mode.
    """

    def __init__(self, fn: Callable[..., Any], name: str, default: Strategy, annotation: str,
                 record: bool = True) -> None:
        if not callable(fn):
            raise TypeError(f"{annotation}(fn): expected a callable, got {type(fn).__name__} {fn!r}.")
        self.fn = fn
        self.name = name
        self.default = default
        self.annotation = annotation
        self.record = record
        functools.update_wrapper(self, fn)

    @property
    def spec(self) -> SegmentSpec:
        return SegmentSpec(self.name, self.default, self.fn, _identity(self.fn), record_passes=self.record)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return call_segment(self.spec, self.fn, args, kwargs)

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        # As a method decorator: bind like a function, keep one segment per method.
        if instance is None:
            return self
        return functools.partial(self.__call__, instance)

    def __repr__(self) -> str:
        fn = getattr(self.fn, "__qualname__", self.fn)
        return f"{self.annotation}({fn!s}, name={self.name!r}, default={self.default!r})"


class ModuleSegment(nn.Module):
    """An ``nn.Module`` marked as one segment; see :func:`fwd` and :func:`rev`.

    Call it as ``seg(params, *inputs)`` with a dict of parameters (``torch.func.functional_call``
    style), or as ``seg(*inputs)`` to use the module's own parameters (imperative training with
    ``use_plan`` and ``torch.optim``). It is itself a module, so its parameters belong to any
    enclosing model (under the prefix ``module.``).
    """

    def __init__(self, module: nn.Module, name: str, default: Strategy, annotation: str, record: bool = True) -> None:
        super().__init__()
        self.module = module
        self.name = name
        self.default = default
        self.annotation = annotation
        self.record = record

    @property
    def spec(self) -> SegmentSpec:  # (read per call: a deep copy's spec names its own module)
        module = self.module
        return SegmentSpec(self.name, self.default, module, ("object", id(module)), own_module=module,
                           record_passes=self.record)

    def _functional(self, params: Mapping[str, torch.Tensor], *inputs: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.module, dict(params), inputs, kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], Mapping):
            params, inputs = dict(args[0]), args[1:]
        else:
            params, inputs = dict(self.module.named_parameters()), args
        return call_segment(self.spec, self._functional, (params, *inputs), kwargs)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, default={self.default!r}"


def _make(fn: Any, name: str | None, default: Strategy, annotation: str, record: bool) -> Any:
    seg_name = _name_of(fn, name, annotation)
    if not isinstance(record, bool):
        raise TypeError(f"{annotation}(record=...): expected True or False, got {type(record).__name__} {record!r}.")
    if isinstance(fn, nn.Module):
        return ModuleSegment(fn, seg_name, default, annotation, record)
    return Segment(fn, seg_name, default, annotation, record)


@overload
def fwd(fn: F, /, *, name: str | None = None, strategy: StrategyLike | None = None, record: bool = True) -> F: ...
@overload
def fwd(
    fn: None = None, /, *, name: str | None = None, strategy: StrategyLike | None = None, record: bool = True
) -> Callable[[F], F]: ...
def fwd(
    fn: Any = None, /, *, name: str | None = None, strategy: StrategyLike | None = None, record: bool = True
) -> Any:
    """Mark ``fn`` as a forward-mode segment.

    Under :func:`mixed_grad` (or :func:`use_plan`) the segment is differentiated in forward mode by
    ``strategy`` unless the plan names it; outside a madfunc transform it is the plain function, so
    ``torch.func.grad`` of the same model gives ordinary backprop.

    Args:
        fn: a pure function of pytrees of tensors, or an ``nn.Module`` (then called as
            ``seg(params, *inputs)`` or ``seg(*inputs)``). Omit it to use ``fwd`` as a decorator factory.
        name: the segment's name in plans. Default: ``fn.__name__`` (a lambda, partial or module
            needs an explicit name).
        strategy: the strategy when the plan does not name the segment: a Strategy or its string form
            (``"exact"``, ``"rev"``, ``"random:16"``). Default: ``Exact()``.
        record: whether forward mode may record the segment's tangent passes once per input signature
            and replay them (docs/guides/performance.md, "Record and replay": no effect on values). Pass
            ``False`` for a body whose ops depend on Python state other than its arguments and its modules'
            ``training`` flags, such as a global flag or a module attribute reassigned between calls.
            Default: ``True``.

    Returns:
        The segment (a callable with ``fn``'s signature), or a decorator if ``fn`` was omitted.

    Examples:
        >>> import torch, madfunc as mf
        >>> @mf.fwd
        ... def stem(w, x):
        ...     return torch.tanh(x @ w)
        >>> def loss(w, x):
        ...     return stem(w, x).sum()
        >>> w, x = torch.ones(3, 2, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64)
        >>> torch.allclose(mf.mixed_grad(loss)(w, x), torch.func.grad(loss)(w, x))
        True
    """
    default = Exact() if strategy is None else as_strategy(strategy, "fwd(strategy=...)")
    if fn is None:
        return lambda f: _make(f, name, default, "fwd", record)
    return _make(fn, name, default, "fwd", record)


@overload
def rev(fn: F, /, *, name: str | None = None, record: bool = True) -> F: ...
@overload
def rev(fn: None = None, /, *, name: str | None = None, record: bool = True) -> Callable[[F], F]: ...
def rev(fn: Any = None, /, *, name: str | None = None, record: bool = True) -> Any:
    """Mark ``fn`` as a reverse-mode segment (ordinary backprop unless a plan says otherwise).

    Args:
        fn: a pure function of pytrees of tensors, or an ``nn.Module``. Omit it to use ``rev`` as a
            decorator factory.
        name: the segment's name in plans. Default: ``fn.__name__``.
        record: as for :func:`fwd`, when a plan runs the segment in forward mode. Default: ``True``.

    Returns:
        The segment, or a decorator if ``fn`` was omitted.

    Examples:
        >>> import torch, madfunc as mf
        >>> body = mf.rev(lambda w, h: (h * w).sum(), name="body")
        >>> grad = mf.mixed_grad(lambda w, h: body(w, h), plan={"body": "exact"})
        >>> grad(torch.ones(2), torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
    """
    if fn is None:
        return lambda f: _make(f, name, Reverse(), "rev", record)
    return _make(fn, name, Reverse(), "rev", record)
