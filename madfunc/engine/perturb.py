"""Perturbed passes: the body run plainly (no tangents) with its differentiated inputs replaced by other values,
for zeroth-order strategies (``SPSA``: ``f(theta + eps v)``). One pass of an ``Engine`` (``runner``).

A perturbed input is substituted where an op uses it (``Substitute``), not on entry, so that the perturbed
value of one input exists only while the op that reads it runs: with ``theta`` a model's parameters, the
perturbed model is never materialised as a whole. That is what MeZO gets by perturbing the parameters in
place (Malladi et al. 2023, Algorithm 1), without writing to them: the user's parameters are never changed,
not even by float rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch
from torch.overrides import TorchFunctionMode

from madfunc.core.checks import writes_first_operand
from madfunc.core.functorch import METADATA_OPS

__all__ = ["Substitute", "perturbed_pass"]

Perturb = Callable[[int, torch.Tensor], torch.Tensor]


class Substitute(TorchFunctionMode):
    """Replaces every op argument that *is* one of ``leaves`` by ``make(index, leaf)`` (None: by nothing, only
    recording the use), computed on the spot and dropped after the op. ``seen`` records which leaves an op read.

    An in-place op on a leaf (``x.add_``, ``out=``) would write to the substitute, not to the leaf; the caller
    then substitutes on entry instead (``saw_inplace``), where the purity check names the segment.
    """

    def __init__(self, leaves: Sequence[torch.Tensor], make: Perturb | None) -> None:
        super().__init__()
        self.by_id = {id(t): (index, t) for index, t in enumerate(leaves)}
        self.make = make
        self.seen: set[int] = set()
        self.saw_inplace = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in METADATA_OPS:
            return func(*args, **kwargs)
        # optree's PyTree is a class to type checkers, so no plain tuple matches it (a stub limit)
        flat, spec = optree.tree_flatten((args, kwargs), none_is_leaf=True)  # pyright: ignore[reportArgumentType]
        keep_first = writes_first_operand(func)
        self.saw_inplace |= keep_first or "out" in kwargs
        hit = False
        for pos, arg in enumerate(flat):
            entry = self.by_id.get(id(arg)) if isinstance(arg, torch.Tensor) else None
            if entry is None or entry[1] is not arg:
                continue
            self.seen.add(entry[0])
            if self.make is not None and not (pos == 0 and keep_first):
                flat[pos] = self.make(entry[0], arg)
                hit = True
        if hit:
            args, kwargs = optree.tree_unflatten(spec, flat)
        return func(*args, **kwargs)


def perturbed_pass(engine: Any, tensors: Sequence[torch.Tensor], perturb: Perturb | None,
                   at_use: bool = True, watch: bool = False) -> tuple[tuple, list[torch.Tensor]]:
    """One plain pass with differentiated input ``i`` replaced by ``perturb(i, input)`` (None: as it is): where an
    op uses it (``at_use``) or on entry. ``watch``: record which inputs the body reads into ``engine.used``.
    Returns the outputs and the module buffers as the pass left them.

    The caller calls ``engine.begin_pass()`` first (every pass sees the random numbers of the first); a pass
    retried on entry (an in-place op, or an input returned as it is, which no op reads) begins again.
    """
    values = [tensors[i] for i in engine.diff]
    if perturb is not None and at_use:
        buffers = engine._pass_buffers()
        mode = Substitute(values, perturb)
        with mode:
            outs = engine._call(tensors, values, buffers)
        # An input returned as it is never passes through an op: it would come back unperturbed.
        if not (mode.saw_inplace or any(o is v for o in outs for v in values)):
            if watch:
                engine.used = [i in mode.seen for i in range(len(values))]
            return outs, buffers
        engine.begin_pass()
    moved = values if perturb is None else [perturb(i, v) for i, v in enumerate(values)]
    buffers = engine._pass_buffers()
    watcher = Substitute(moved, None) if watch else contextlib.nullcontext()
    with watcher:
        outs = engine._call(tensors, moved, buffers)
    if isinstance(watcher, Substitute):
        engine.used = [i in watcher.seen or any(o is m for o in outs) for i, m in enumerate(moved)]
    return outs, buffers
