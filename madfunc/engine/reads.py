"""Which differentiated inputs a forward segment's body reads, so that ``Exact`` seeds only those.

A segment handed a whole parameter dict that reads two of its entries must not push a basis tangent for
every scalar it was given (65,600 tangents where 64 are read): the inputs it does not read have exact zero
gradients, and no tangents. ``read_inputs`` answers from what earlier calls of the same segment read
(``_READS``, keyed by its name, code and input shapes), or, the first time, from one plain pass under
``ReadWatch`` (a primal pass: no tangents). A remembered answer may be stale (a leaf read only under a
branch that this call takes): the call's first eager tangent pass watches every differentiated input
(``Engine.expected_reads``, checked in ``pushes.PassRunner``), and an input read there outside the
answer is added to what is remembered and the segment runs again (``ReadsChanged``). The remembered set
only grows, so a segment whose branches alternate settles on their union after one such retry per leaf.

A replayed pass (``replay``) is not watched: its recording is the program its key determines, made from an
eager pass that was checked.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from madfunc.core.functorch import METADATA_OPS
from madfunc.core.registry import REGISTRY
from madfunc.engine.passes import Retry

__all__ = ["ReadWatch", "ReadsChanged", "missed", "read_inputs"]

# key -> per differentiated input: read by some call so far. Least recently used first.
_READS: collections.OrderedDict[tuple, list[bool]] = REGISTRY.register(
    "reads.inputs", collections.OrderedDict, "differentiated inputs each segment's body reads")
_CAPACITY = 1024


class ReadsChanged(Retry):
    """A tangent pass found the body reading an input it was not expected to: run the segment again."""


class ReadWatch(TorchFunctionMode):
    """Records which of ``watched`` any torch call receives (metadata queries such as ``.shape`` aside).

    Only the calls the body makes itself reach a mode (the ones inside them run with it off), and every
    read of a tensor's values starts with one of those: an op, a method, an indexing, ``.T``.
    """

    def __init__(self, watched: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.ids = {id(t): i for i, t in enumerate(watched)}
        self.read: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func not in METADATA_OPS:
            self.note(args)
            self.note(kwargs.values())
        return func(*args, **kwargs)

    def note(self, values: Any) -> None:
        for value in values:
            if isinstance(value, torch.Tensor):
                index = self.ids.get(id(value))
                if index is not None:
                    self.read.add(index)
            elif isinstance(value, (list, tuple)):  # torch.cat([...]), torch.stack((...))
                self.note(value)


def _code(fn: Any) -> Any:
    """What a segment runs, stable across calls: a function's code (a closure made per call has the same),
    a method's function and its object's class, or a callable's class."""
    self_ = getattr(fn, "__self__", None)
    fn = getattr(fn, "__func__", fn)
    return (getattr(fn, "__code__", None) or type(fn), type(self_))


def _key(engine: Any, tensors: Sequence[torch.Tensor]) -> tuple:
    # A key shared by two bodies reading different inputs costs a retry or needless tangents, never a wrong
    # gradient (every eager call checks its first pass), so it need not name the body exactly.
    return (engine.name, _code(engine.fn), tuple((tensors[i].shape, tensors[i].dtype) for i in engine.diff))


def read_inputs(engine: Any, tensors: Sequence[torch.Tensor]) -> list[bool]:
    """Per differentiated input of ``engine`` (a ``runner.Engine``): whether the body reads it."""
    key = _key(engine, tensors)
    found = _READS.get(key)
    if found is not None:
        _READS.move_to_end(key)
        return list(found)
    values = [tensors[i] for i in engine.diff]
    watch = ReadWatch(values)
    engine.begin_pass()
    with watch:
        outs = engine._call(tensors, values, engine._pass_buffers())
    # A leaf returned as it is reaches no torch call, yet its gradient is the output's cotangent.
    watch.read.update(i for i, v in enumerate(values) if any(o is v for o in outs))
    read = [i in watch.read for i in range(len(values))]
    _remember(key, read)
    return list(read)


def missed(engine: Any, tensors: Sequence[torch.Tensor], expected: Sequence[bool], read: set[int]) -> None:
    """After a watched tangent pass: ``read`` (indices of differentiated inputs) beyond ``expected`` are
    remembered, and the segment runs again (``ReadsChanged``) to seed them."""
    extra = [i for i in read if not expected[i]]
    if not extra:
        return
    key = _key(engine, tensors)
    merged = list(_READS.get(key, expected))
    for i in extra:
        merged[i] = True
    _remember(key, merged)
    raise ReadsChanged(engine.name)


def _remember(key: tuple, read: list[bool]) -> None:
    _READS[key] = read
    _READS.move_to_end(key)
    while len(_READS) > _CAPACITY:
        _READS.popitem(last=False)
