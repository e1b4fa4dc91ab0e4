"""Tensors a segment reads from outside its arguments: module parameters and buffers, closure tensors.

A segment written as a method (``self.layer(x)``), a closure over a module, or a module segment called
as ``seg(x)`` reads parameters that are not among its flat tensor arguments. Forward mode can only
differentiate what it seeds, so such tensors must become inputs of the forward segment: they are found
here, passed to the engine like arguments, and *installed* in place of the originals while the
segment's body runs (``Installed``). Buffers (BatchNorm's running statistics) are installed as fresh
copies per pass, so that each of the engine's passes starts from the same state, and the state one
plain call would leave is written back once at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from madfunc.core.functorch import grad_transforms_active, is_wrapped

__all__ = ["Captured", "discover"]


@dataclasses.dataclass
class Captured:
    """What a segment reads from outside its arguments.

    ``params``: (owner module, attribute name, tensor) for every parameter slot that needs a gradient
    (tied weights appear once per slot, deduplicated by ``tensors``); ``cells``: closure cells holding a
    tensor that needs a gradient; ``buffers``: (owner module, name, tensor) for every buffer of a module in
    training mode, which the body may update in place.
    """

    params: list[tuple[nn.Module, str, torch.Tensor]] = dataclasses.field(default_factory=list)
    cells: list[tuple[Any, torch.Tensor]] = dataclasses.field(default_factory=list)
    buffers: list[tuple[nn.Module, str, torch.Tensor]] = dataclasses.field(default_factory=list)

    def tensors(self) -> list[torch.Tensor]:
        """The distinct differentiable tensors (parameters, then closure tensors), in a fixed order."""
        seen: dict[int, torch.Tensor] = {}
        for _, _, t in self.params:
            seen.setdefault(id(t), t)
        for _, t in self.cells:
            seen.setdefault(id(t), t)
        return list(seen.values())

    def buffer_tensors(self) -> list[torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        for _, _, t in self.buffers:
            seen.setdefault(id(t), t)
        return list(seen.values())

    @contextlib.contextmanager
    def installed(self, values: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor]) -> Iterator[None]:
        """Put ``values`` (one per :meth:`tensors` entry) and ``buffers`` (one per :meth:`buffer_tensors`
        entry) where the originals live, for the duration of the block."""
        by_id = {id(t): v for t, v in zip(self.tensors(), values, strict=True)}
        by_id.update({id(t): b for t, b in zip(self.buffer_tensors(), buffers, strict=True)})
        undo: list[Any] = []
        try:
            for module, name, t in self.params:
                undo.append((module._parameters, name, t))
                # a plain tensor stands in for the Parameter, as in torch.func.functional_call
                module._parameters[name] = by_id[id(t)]  # pyright: ignore[reportArgumentType]
            for module, name, t in self.buffers:
                undo.append((module._buffers, name, t))
                module._buffers[name] = by_id[id(t)]
            for cell, t in self.cells:
                undo.append((cell, None, t))
                cell.cell_contents = by_id[id(t)]
            yield
        finally:
            for where, name, t in reversed(undo):
                if name is None:
                    where.cell_contents = t
                else:
                    where[name] = t


def _add_module(captured: Captured, module: nn.Module, params: bool, differentiable) -> None:
    for owner in module.modules():
        if params:
            for name, p in owner._parameters.items():
                if p is not None and differentiable(p):
                    captured.params.append((owner, name, p))
        if not owner.training:
            # Only training mode updates buffers (running statistics); in eval mode they are constants, and
            # some ops refuse a forward tangent on them (batch_norm's running_mean), even a zero one.
            continue
        for name, b in owner._buffers.items():
            if b is not None:
                captured.buffers.append((owner, name, b))


def discover(fn: Any, arg_leaves: Sequence[Any], own_module: nn.Module | None) -> Captured:
    """Find what segment ``fn`` reads from outside its flat tensor arguments.

    ``own_module`` is a module segment's module: its parameters already arrive as arguments (functional
    call), only its buffers are captured. Elsewhere: modules among the arguments (``self`` of a method
    segment), the closure cells and ``__self__`` of ``fn`` (and of a ``functools.partial``'s function and
    arguments) are searched one level deep.
    """
    transforms = grad_transforms_active()

    def differentiable(t: torch.Tensor) -> bool:
        # Under torch.func.grad only tensors of its levels are differentiated (a plain nn.Parameter is a
        # constant there, as in torch.func.grad of the plain model); under plain autograd, requires_grad.
        if not (t.is_floating_point() and t.requires_grad):
            return False
        return is_wrapped(t) if transforms else True

    captured = Captured()
    seen: set[int] = set()
    if own_module is not None:
        seen.add(id(own_module))
        _add_module(captured, own_module, params=False, differentiable=differentiable)

    def visit(obj: Any, cell: Any = None) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            _add_module(captured, obj, params=True, differentiable=differentiable)
        elif isinstance(obj, torch.Tensor) and cell is not None and differentiable(obj):
            captured.cells.append((cell, obj))

    for leaf in arg_leaves:
        if isinstance(leaf, nn.Module):
            visit(leaf)
    functions = [fn]
    while isinstance(functions[-1], functools.partial):
        partial = functions[-1]
        for value in (*partial.args, *partial.keywords.values()):
            if isinstance(value, nn.Module):
                visit(value)
        functions.append(partial.func)
    for function in functions:
        owner = getattr(function, "__self__", None)
        if owner is not None and not isinstance(owner, type):
            visit(owner)
            function = getattr(function, "__func__", function)
        for cell in getattr(function, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned later in the enclosing scope)
                continue
            visit(value, cell)
    return captured


