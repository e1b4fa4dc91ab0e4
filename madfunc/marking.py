"""Segments by module path: ``mark_segments(model, spec)`` marks submodules of an existing model in place.

A marked module keeps its class, its parameters and their names; only its instance gets a ``forward``
attribute (a :class:`_MarkedForward`) that runs the original forward as a segment named by the module's
qualified name. ``state_dict`` keys, ``load_state_dict``, hooks (run once, around the segment) and
checkpoints are untouched, and :meth:`SegmentHandle.remove` restores the original forward.

The segment runs in ``ModuleSegment``'s functional form: the module's parameters enter as a dict argument
(so forward mode seeds them and the traceable path differentiates them), installed in their slots while the
original forward runs, without calling the module again (``functional_call`` would re-enter the swapped
forward); ``own_module`` gives the engine the module's buffers and ``training`` flags.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from madfunc.engine import context as _context
from madfunc.engine import traced as _traced
from madfunc.plan import Exact, Reverse, Strategy, as_strategy
from madfunc.segment import SegmentSpec, call_segment

__all__ = ["SegmentHandle", "mark_segments"]

_KINDS = {"fwd": Exact(), "rev": Reverse()}  # the spec's own words; any other value must be a strategy
_ACCEPTED = (
    "'fwd' (forward mode, Exact() unless the plan says otherwise), 'rev' (reverse mode), a strategy such as "
    "madfunc.Random(k=4) (forward mode with that default), or one of the strings 'exact', 'reverse'"
)


def _slots(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """Every parameter slot under ``module``: (owner, attribute, name), tied slots named by their first slot."""
    first: dict[int, str] = {}
    slots = []
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for attr, p in owner._parameters.items():
            if p is not None:
                slots.append((owner, attr, first.setdefault(id(p), f"{prefix}.{attr}" if prefix else attr)))
    return slots


class _MarkedForward:
    """The ``forward`` of a marked module: its original forward, run as segment ``name``.

    A module-level class, not a closure, so that ``copy.deepcopy`` of the model gives a copy whose segment
    runs the copy (``module`` is copied with it) and ``pickle``/``torch.save`` of the model work.
    """

    def __init__(self, module: nn.Module, name: str, default: Strategy, original: Any, record: bool) -> None:
        self.module = module
        self.name = name
        self.default = default
        self.original = original  # the instance's own forward before marking, or None: the class's
        self.record = record
        self.active = True  # False once removed (if something wrapped it meanwhile, it stays in the chain)

    def bound(self) -> Callable[..., Any]:
        """The original forward, bound to the module."""
        if self.original is not None:
            return self.original
        return type(self.module).forward.__get__(self.module, type(self.module))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.active or (_context.active() is None and _traced.active() is None):
            return self.bound()(*args, **kwargs)  # outside madfunc transforms: exactly the plain forward
        params: dict[str, torch.Tensor] = {}
        for owner, attr, name in _slots(self.module):
            p = owner._parameters[attr]
            assert p is not None  # (_slots lists filled slots only)
            params.setdefault(name, p)
        spec = SegmentSpec(self.name, self.default, self.module, ("object", id(self.module)), own_module=self.module,
                           record_passes=self.record)
        return call_segment(spec, self.functional, (params, *args), kwargs)

    def functional(self, params: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """The original forward with ``params`` in the module's parameter slots (put back afterwards)."""
        slots = _slots(self.module)
        saved = [owner._parameters[attr] for owner, attr, _ in slots]
        try:
            for owner, attr, name in slots:
                # a plain tensor stands in for the Parameter, as in torch.func.functional_call
                owner._parameters[attr] = params[name]  # pyright: ignore[reportArgumentType]
            return self.bound()(*args, **kwargs)
        finally:
            for (owner, attr, _), t in zip(slots, saved, strict=True):
                owner._parameters[attr] = t

    @property
    def __signature__(self) -> inspect.Signature:
        # Callers that inspect model.forward (generate's argument checks, Trainer's label names) see the original.
        return inspect.signature(self.bound())

    def __repr__(self) -> str:
        state = "" if self.active else ", removed"
        return f"<segment {self.name!r} (default {self.default!r}) over {type(self.module).__name__}.forward{state}>"


class SegmentHandle:
    """The marks one :func:`mark_segments` call made; ``remove()`` (or leaving a ``with`` block) undoes them.

    ``segments`` maps each segment's name (the module's qualified name) to its default strategy.
    """

    def __init__(self, marks: list[tuple[nn.Module, _MarkedForward]]) -> None:
        self._marks = [(weakref.ref(module), wrapper) for module, wrapper in marks]
        self.segments: dict[str, Strategy] = {wrapper.name: wrapper.default for _, wrapper in marks}

    def remove(self) -> None:
        """Restore every forward this handle swapped (the class's, or the instance's own). Idempotent."""
        for ref, wrapper in self._marks:
            wrapper.active = False
            module = ref()
            if module is None or module.__dict__.get("forward") is not wrapper:
                continue  # gone, or wrapped again by someone else: the inactive wrapper passes calls through
            if wrapper.original is None:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = wrapper.original
        self._marks = []

    def __enter__(self) -> SegmentHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._marks else "removed"
        return f"SegmentHandle({list(self.segments)!r}, {state})"


# -- choosing the modules ---------------------------------------------------------------------------------


def _kind(key: str, value: Any) -> Strategy:
    if isinstance(value, str) and value.lower() in _KINDS:
        return _KINDS[value.lower()]
    where = f"mark_segments: spec[{key!r}]"
    if not isinstance(value, (str, Strategy)):
        raise TypeError(f"{where}: expected {_ACCEPTED}; got {type(value).__name__} {value!r}.")
    try:
        return as_strategy(value, where)
    except ValueError:
        raise ValueError(f"{where}: unknown value {value!r}; expected {_ACCEPTED}.") from None


def _matches(key: str, name: str) -> bool:
    # Only the explicit key "" marks the root: a pattern such as "*" would otherwise swallow the whole model.
    return name == key if not name else fnmatch.fnmatchcase(name, key)


def _outermost(names: list[str]) -> list[str]:
    """Of ``names`` (pre-order), those with no ancestor in the list: a key marks the outermost modules it matches."""
    kept: list[str] = []
    for name in names:
        if not any(a == "" or name.startswith(a + ".") for a in kept):
            kept.append(name)
    return kept


def _no_match(model: nn.Module, key: str, names: list[str]) -> ValueError:
    named = [n for n in names if n]
    hints = []
    prefixed = [n[: i + 1] for n in named for i, c in enumerate(n) if c == "." and _matches(key, n[i + 1 :])]
    if prefixed:
        prefix = min(prefixed, key=len)
        hints.append(f"Did you mean {prefix + key!r} (with the prefix {prefix!r})?")
    for i, c in enumerate(key):  # (a remainder of wildcards alone, such as '*', would match anything)
        if c == "." and key[i + 1 :].strip("*?.") and any(_matches(key[i + 1 :], n) for n in named):
            hints.append(f"Did you mean {key[i + 1 :]!r} (without the prefix {key[: i + 1]!r})?")
            break
    close = difflib.get_close_matches(key, named, n=4, cutoff=0.6)
    if close:
        hints.append("Close module names: " + ", ".join(map(repr, close)) + ".")
    else:
        top = [n for n in named if "." not in n][:8]
        hints.append("Its top-level modules: " + (", ".join(map(repr, top)) or "none") + ".")
    return ValueError(
        f"mark_segments: key {key!r} matched no module of {type(model).__name__} (keys are qualified module "
        "names or fnmatch patterns over them, as model.named_modules() lists them; '' is the model itself). "
        + " ".join(hints)
    )


def _choose(model: nn.Module, spec: Mapping[str, Any]) -> dict[str, tuple[nn.Module, Strategy]]:
    """Qualified name -> (module, default strategy) for every module ``spec`` marks."""
    kinds = {}
    for key, value in spec.items():
        if not isinstance(key, str):
            raise TypeError(f"mark_segments: spec keys must be module names or patterns (str), got {key!r}.")
        kinds[key] = _kind(key, value)
    modules = dict(model.named_modules(remove_duplicate=False))
    names = list(modules)
    chosen: dict[str, list[str]] = {}  # name -> the keys that mark it
    for key in kinds:
        matched = [n for n in names if _matches(key, n)]
        if not matched:
            raise _no_match(model, key, names)
        for name in _outermost(matched):
            chosen.setdefault(name, []).append(key)
    marks: dict[str, tuple[nn.Module, Strategy]] = {}
    by_module: dict[int, str] = {}
    for name in names:  # pre-order, so a shared module is named by its first path
        keys = chosen.get(name)
        if keys is None:
            continue
        keys = [name] if name in keys else keys  # an exact key beats patterns, as in plans
        if len({kinds[k] for k in keys}) > 1:
            listed = ", ".join(f"{k!r} -> {kinds[k]!r}" for k in keys)
            raise ValueError(
                f"mark_segments: module {name!r} is matched by several keys with different values ({listed}); "
                f"add an exact key {name!r} or make the patterns disjoint."
            )
        module, kind = modules[name], kinds[keys[0]]
        other = by_module.setdefault(id(module), name)
        if other != name:  # one module under two paths is one segment, named by its first path
            if marks[other][1] != kind:
                raise ValueError(
                    f"mark_segments: {other!r} and {name!r} are one shared module, marked with different values "
                    f"({marks[other][1]!r} and {kind!r}); a module is one segment: mark it by {other!r} only."
                )
            continue
        marks[name] = (module, kind)
    return marks


def _check_unmarked(marks: Mapping[str, tuple[nn.Module, Strategy]]) -> None:
    for name, (module, _) in marks.items():
        current = module.__dict__.get("forward")
        if isinstance(current, _MarkedForward) and current.active:
            raise ValueError(
                f"mark_segments: module {name!r} is already marked (as segment {current.name!r}); call .remove() "
                "on the handle that marked it first (a deep copy or unpickled model keeps its marks: "
                f"`del model.get_submodule({name!r}).forward` unmarks one)."
            )


def mark_segments(model: nn.Module, spec: Mapping[str, str | Strategy], *, record: bool = True) -> SegmentHandle:
    """Mark submodules of ``model`` as segments named by their qualified names, without editing the model.

    Each module a key of ``spec`` matches becomes one segment whose name is its qualified name
    (``"model.layers.0"``), so plans address it by that name or a pattern (``{"model.layers.*": "exact"}``).
    Only the module instance's ``forward`` is swapped: ``state_dict()`` and ``named_parameters()`` keys,
    ``load_state_dict``, checkpoints and hooks are unchanged (hooks run once, around the segment), and
    outside a madfunc transform the model computes exactly what it computed before.

    Matching: a key is a qualified name as ``model.named_modules()`` lists it, or an fnmatch pattern over
    those names (``*`` also matches dots). A key marks the *outermost* modules it matches: modules inside
    them run as part of them. Modules marked by different keys may nest (``"model.layers.*"`` and
    ``"model.layers.*.mlp"``): the inner one is a segment of its own when the outer one runs in reverse
    mode, and part of the outer one's computation when that runs in forward mode. A module that several
    keys mark takes its exact key's value; patterns that give it different values are an error. A module
    registered under several paths is one segment, named by its first path. Only the
    exact key ``""`` marks ``model`` itself (a plan then addresses that segment, named ``""``, by a pattern
    such as ``"*"``).

    Args:
        model: the model whose submodules to mark.
        spec: module name or pattern -> ``"fwd"`` (a forward segment, ``Exact()`` unless the plan says
            otherwise), ``"rev"`` (a reverse segment), or a strategy (``mf.Random(k=4)``, ``"exact"``,
            ``"reverse"``): the segment's default strategy.
        record: as for :func:`fwd`: whether forward mode may record and replay the segments' tangent passes
            (pass ``False`` for modules whose forward depends on Python state that changes between calls).
            Default: ``True``.

    Returns:
        A :class:`SegmentHandle`: ``.remove()`` restores the original forwards; as a context manager
        (``with mf.mark_segments(model, spec): ...``) it removes them on exit. ``.segments`` maps the
        segment names to their default strategies.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or a key or value has the wrong type.
        ValueError: a key matches no module (the message lists near names), a value is unknown, patterns
            conflict, or a module is already marked.

    Examples:
        >>> import torch, madfunc as mf
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> with mf.mark_segments(model, {"0": "fwd", "2": "rev"}) as handle:
        ...     with mf.use_plan({"0": "exact"}):  # or e.g. {"0": mf.Random(k=4)}: a forward gradient
        ...         model(x).sum().backward()
        >>> handle.segments
        {'0': Exact(chunk_size=None), '2': Reverse()}
        >>> reference = torch.func.grad(lambda w: torch.func.functional_call(model, {"0.weight": w}, (x,)).sum())
        >>> torch.allclose(model[0].weight.grad, reference(model[0].weight.detach()))
        True
        >>> "forward" in model[0].__dict__
        False
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"mark_segments(model, spec): expected an nn.Module, got {type(model).__name__} {model!r}.")
    if not isinstance(spec, Mapping):
        raise TypeError(
            "mark_segments(model, spec): expected a mapping from module names or patterns to 'fwd', 'rev' or a "
            f"strategy, e.g. {{'model.layers.*': 'fwd'}}; got {type(spec).__name__} {spec!r}."
        )
    if not isinstance(record, bool):
        raise TypeError(f"mark_segments(record=...): expected True or False, got {type(record).__name__} {record!r}.")
    marks = _choose(model, spec)
    _check_unmarked(marks)
    done = []
    for name, (module, default) in marks.items():
        current = module.__dict__.get("forward")
        if isinstance(current, _MarkedForward):  # removed, but wrapped by someone since: mark its original
            current = current.original
        wrapper = _MarkedForward(module, name, default, current, record)
        module.__dict__["forward"] = wrapper
        done.append((module, wrapper))
    return SegmentHandle(done)
