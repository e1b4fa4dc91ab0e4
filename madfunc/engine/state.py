"""Python state a forward segment's body can reach, saved on entry and restored before every pass.

A forward segment runs its body several times per call (the primal and tangent passes, chunks,
diagnostic and recording passes), but a plain call runs it once. A body with side effects on Python
objects, such as a transformers decoder layer appending its keys and values to a KV cache
(``DynamicCache.update`` rebinds ``layer.keys = torch.cat([layer.keys, k])``), would otherwise see the
previous passes' effects: the second pass attends to the first pass's keys, and the tangents of the new
keys can be masked away while the primal output looks right. A silently wrong gradient.

So :class:`State` walks what the body can reach (the segment's non-tensor arguments, its modules'
attributes, a bound method's owner and closure cells) and keeps a shallow copy of every mutable
container and object ``__dict__`` it meets. Restoring those copies undoes rebinding and appending,
which is how Python objects and transformers' dynamic caches change. An *in-place* write into a
reachable tensor (which a shallow copy could not undo, e.g. a ``StaticCache``) never happens: torch.func
refuses to mutate a tensor captured from outside the transform, and the engine reports it by name.

After the passes the engine restores the state and runs the body once more as plain code
(``_forward.apply_side_effects``), so the objects end exactly as one plain call leaves them, holding
primal tensors rather than the passes' functorch wrappers.
"""

from __future__ import annotations

import collections
import enum
import functools
import operator
import types
from collections.abc import Iterable
from typing import Any

import optree
import torch
from torch import nn

__all__ = ["State", "containers_changed"]

# Values that are immutable or that the body cannot change through attribute assignment: not walked.
_ATOMS = (
    int, float, complex, bool, str, bytes, type(None), type, enum.Enum, torch.dtype, torch.device, torch.Size,
    torch.layout, torch.memory_format, torch.Generator, types.FunctionType, types.BuiltinFunctionType,
    types.ModuleType, types.CodeType, range, slice, frozenset,
)
_ATOM_TYPES = frozenset(_ATOMS)
# Module attributes that hold hooks and bookkeeping, never the body's state: skipped for speed.
_MODULE_SKIP = frozenset({
    "_modules", "_parameters", "_buffers", "_backward_pre_hooks", "_backward_hooks", "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
    "_non_persistent_buffers_set",
})
# How many objects one walk visits at most: far above a transformers model's modules and caches, and a
# bound on the per-call cost of a body that reaches a huge object graph (beyond it: not protected).
_LIMIT = 50_000


class State:
    """Shallow copies of the mutable objects reachable from ``roots``."""

    __slots__ = ("_lists", "_dicts", "_sets", "_objects", "_slotted")

    def __init__(self, roots: Iterable[Any]) -> None:
        self._lists: list[tuple[Any, list]] = []
        self._dicts: list[tuple[dict, dict]] = []
        self._sets: list[tuple[set, set]] = []
        self._objects: list[tuple[Any, dict]] = []
        self._slotted: list[tuple[Any, tuple[str, ...], list]] = []
        seen: set[int] = set()
        stack = list(roots)
        while stack and len(seen) < _LIMIT:
            obj = stack.pop()
            cls = type(obj)  # not isinstance: some classes (transformers' configs) override __getattribute__
            if cls in _ATOM_TYPES or id(obj) in seen or issubclass(cls, _ATOMS):
                continue
            seen.add(id(obj))
            stack += self._visit(obj, cls)

    def _visit(self, obj: Any, cls: type) -> Iterable[Any]:
        """Save ``obj`` and return its children to walk."""
        if issubclass(cls, torch.Tensor):  # rebinding is undone by its holder's copy; in place: see above
            return ()
        if issubclass(cls, (list, collections.deque)):
            saved = list(obj)
            self._lists.append((obj, saved))
            return saved
        if issubclass(cls, tuple):
            return obj
        if issubclass(cls, dict):
            saved = dict(obj)
            self._dicts.append((obj, saved))
            return saved.values()
        if issubclass(cls, set):
            self._sets.append((obj, set(obj)))
            return ()
        if issubclass(cls, types.MethodType):
            return (obj.__self__,)
        children: list[Any] = []
        attrs = getattr(obj, "__dict__", None)
        if isinstance(attrs, dict):
            saved = dict(attrs)
            self._objects.append((obj, saved))
            if issubclass(cls, nn.Module):
                children += obj._modules.values()
                # Buffer slots: rebinding is undone, their tensors are the engine's business (_captured). Not
                # the parameter slots: the engine and functional_call swap those themselves, and restore them.
                if obj._buffers:
                    self._dicts.append((obj._buffers, dict(obj._buffers)))
                children += [v for k, v in saved.items() if k not in _MODULE_SKIP]
            else:
                children += saved.values()
        slots = _all_slots(cls)
        if slots:
            values = [getattr(obj, s, _MISSING) for s in slots]
            self._slotted.append((obj, slots, values))
            children += values
        return children

    def changed(self) -> bool:
        """Whether any saved container or object differs (by identity of its entries) from its copy."""
        return (
            any(not _same_seq(obj, saved) for obj, saved in self._lists)
            or any(not _same_map(obj, saved) for obj, saved in self._dicts)
            or any(obj != saved for obj, saved in self._sets)
            or any(not _same_map(obj.__dict__, saved) for obj, saved in self._objects)
            or any(not _same_seq([getattr(obj, s, _MISSING) for s in slots], saved)
                   for obj, slots, saved in self._slotted)
        )

    def restore(self) -> bool:
        """Put every saved container and object back as it was (entries by identity, not copies); whether
        anything had changed. One comparison per object: the check and the restore are the same walk."""
        changed = False
        for obj, saved in self._objects:
            if not _same_map(obj.__dict__, saved):
                changed = True
                obj.__dict__.clear()
                obj.__dict__.update(saved)
        for obj, slots, saved in self._slotted:
            for s, v in zip(slots, saved, strict=True):
                if getattr(obj, s, _MISSING) is v:
                    continue
                changed = True
                if v is _MISSING:
                    delattr(obj, s)
                else:
                    setattr(obj, s, v)
        for obj, saved in self._lists:
            if not _same_seq(obj, saved):
                changed = True
                obj.clear()
                obj.extend(saved)
        for obj, saved in self._dicts:
            if not _same_map(obj, saved):
                changed = True
                obj.clear()
                obj.update(saved)
        for obj, saved in self._sets:
            if obj != saved:
                changed = True
                obj.clear()
                obj.update(saved)
        return changed


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


@functools.lru_cache(maxsize=1024)
def _all_slots(cls: type) -> tuple[str, ...]:
    """The slot names of ``cls`` and its bases that can hold state (not __dict__ or __weakref__)."""
    names = []
    for base in cls.__mro__:
        slots = base.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else list(slots)
    return tuple(n for n in names if n not in ("__dict__", "__weakref__"))


# Identity comparisons in C (map over operator.is_): these run before every pass, over every module's
# __dict__. Keys are compared in order: a key removed and added again counts as a change (restored: safe).
def _same_seq(a: Any, b: list) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _same_map(a: dict, b: dict) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a.values(), b.values())) and all(map(operator.eq, a, b))


def containers_changed(tree: Any, leaves: list) -> bool:
    """Whether the body changed the argument containers it was given (rebuilt per pass from ``leaves``), e.g.
    appended to a list: the engine then runs it once more on the caller's own containers."""
    after = optree.tree_leaves(tree)
    return len(after) != len(leaves) or any(a is not b for a, b in zip(after, leaves, strict=True))
