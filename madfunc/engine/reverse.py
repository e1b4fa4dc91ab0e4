"""The plain (reverse-mode) run of a segment under a transform, with the purity and output checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch

from madfunc.core.checks import (
    _check_not_mutated,
    _flatten_output,
    _needs_grad,
    _translate_error,
    _versions,
)
from madfunc.core.functorch import differentiating_transforms
from madfunc.engine import context as _context

__all__ = ["differentiated_per_argument", "run_reverse"]


def differentiated_per_argument(args: tuple, kwargs: dict) -> dict[str, int]:
    sizes = {f"arg{i}": optree.tree_leaves(a) for i, a in enumerate(args)}
    sizes.update({k: optree.tree_leaves(v) for k, v in kwargs.items()})
    return {k: sum(t.numel() for t in leaves if _needs_grad(t)) for k, leaves in sizes.items()}


def run_reverse(
    name: str, fn: Callable[..., Any], args: tuple, kwargs: dict, record: _context.SegmentCall | None = None
) -> Any:
    """Run a reverse-mode segment under a transform: plain code, plus the purity and output checks.

    With ``record`` (diagnostics), also count the bytes autograd saves for backward inside it.
    """
    # optree's PyTree is a class to type checkers, so no plain tuple matches it (a stub limit)
    leaves = optree.tree_leaves((args, kwargs))  # pyright: ignore[reportArgumentType]
    before = _versions(leaves)
    try:
        out = _call_reverse(fn, args, kwargs, leaves, record)
    except RuntimeError as error:
        translated = _translate_error(name, error) if "in-place" in str(error) else None
        if translated is None:
            raise
        raise translated from error
    _check_not_mutated(name, leaves, before)
    _flatten_output(name, out)
    return out


def _call_reverse(
    fn: Callable[..., Any], args: tuple, kwargs: dict, leaves: list, record: _context.SegmentCall | None
) -> Any:
    if record is None:
        return fn(*args, **kwargs)
    stats = record.stats
    stats.differentiated_numel = sum(t.numel() for t in leaves if _needs_grad(t))
    stats.differentiated_per_argument = differentiated_per_argument(args, kwargs)
    stats.tangents = 0
    if differentiating_transforms() > 0:
        # torch.func's grad transforms refuse saved-tensor hooks: bytes are measured under plain autograd.
        stats.saved_bytes = None
        return fn(*args, **kwargs)
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    stats.saved_bytes = saved[0]
    return out
