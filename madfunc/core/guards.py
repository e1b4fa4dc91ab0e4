"""Checks a forward segment's call makes, each raising (or warning) with the segment's name and a fix."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from madfunc.core.functorch import is_batched
from madfunc.core.registry import REGISTRY

__all__ = [
    "PerformanceWarning",
    "check_basis_size",
    "check_finite",
    "check_no_hidden_inputs",
    "check_strided",
    "warn_exact_cost",
]

# The largest block of Exact basis tangents pushed at once before we refuse (see check_basis_size).
EXACT_BASIS_BYTES = 2 * 2**30
# An Exact segment pushing more tangents than this costs thousands of forward passes: say so, once.
EXACT_WARN_TANGENTS = 4096
_warned: set[str] = REGISTRY.register("guards.warned", set, "cost warnings given, by segment")


class PerformanceWarning(UserWarning):
    """A plan choice that is correct but costly (e.g. ``Exact`` on a segment with many parameters)."""


def warn_exact_cost(name: str, n: int) -> None:
    """Warn once per segment name when ``Exact`` pushes more than ``EXACT_WARN_TANGENTS`` tangents (``n``: the
    differentiated scalars the body reads; inputs it does not read get no tangents)."""
    if n <= EXACT_WARN_TANGENTS or name in _warned:
        return
    _warned.add(name)
    warnings.warn(
        f"segment {name!r}: Exact() pushes one tangent per differentiated scalar its body reads, {n} here, so it costs "
        f"about {n} forward passes of the segment (backprop: about 3). Exact is the default of fwd(); for a "
        f"segment this large give it Random(k) (an unbiased estimate) or Reverse() in the plan. "
        "madfunc.inspect(...) shows each segment's tangent count.",
        PerformanceWarning,
        stacklevel=2,
    )


def check_basis_size(name: str, tensors: Sequence[torch.Tensor], which: Sequence[int], count: int) -> None:
    """Refuse, before allocating, an Exact basis block that could not fit (rather than dying of OOM).

    ``which``: the inputs seeded together (read by the body: unread ones get no tangents); ``count``: the
    block's tangents."""
    nbytes = count * sum(tensors[i].numel() * tensors[i].element_size() for i in which)
    if nbytes > EXACT_BASIS_BYTES:
        raise MemoryError(
            f"segment {name!r}: Exact() would push {count} basis tangents at once, "
            f"{nbytes / 2**30:.1f} GiB for the tangents alone (and {count} times the segment's activations). "
            f"Bound it with Exact(chunk_size=...) (each leaf's n tangents are then pushed chunk_size at a "
            "time), or use Random(k) / Reverse() for a segment this large."
        )


def check_no_hidden_inputs(name: str, ys: Sequence[torch.Tensor], grad_mode: bool) -> None:
    """An output that autograd tracks was computed from a tensor needing a gradient that is not among
    the segment's inputs (inputs enter detached): forward mode cannot see it, so its gradient would be
    silently lost."""
    if grad_mode and any(isinstance(y, torch.Tensor) and y.requires_grad for y in ys):
        raise hidden_input_error(name)


def hidden_input_error(name: str) -> RuntimeError:
    """The error for a segment that reads a tensor needing a gradient that madfunc cannot see.

    Under plain autograd ``check_no_hidden_inputs`` finds it; under torch.func.grad, a tensor of the grad
    transform's level used inside our autograd.Function trips an internal assertion of torch instead.
    """
    return RuntimeError(
        f"segment {name!r} reads a tensor that needs a gradient from outside its arguments (a global, or an "
        "attribute of an object madfunc does not search), so forward mode cannot differentiate it and its "
        "gradient would be silently lost. Pass the tensor (or the module that owns it) as an argument of "
        f"the segment, make the segment a method of that module, or give segment {name!r} Reverse()."
    )


def check_finite(name: str, ys: Sequence[torch.Tensor], ydots: Sequence[torch.Tensor], index: Sequence[int]) -> None:
    """Non-finite output tangents poison every differentiated input's gradient: refuse them.

    In forward mode one NaN/inf entry of ``J v_j`` makes ``s_j = <J v_j, ybar>`` NaN (0 * inf = NaN
    even where ``ybar`` is 0), so unlike backprop no gradient entry would survive.
    """
    for i, y, ydot in zip(index, ys, ydots, strict=True):
        if is_batched(y) or is_batched(ydot) or y.layout != torch.strided:
            continue  # data-dependent checks cannot run under vmap
        finite = torch.isfinite(ydot)
        if bool(finite.all()):
            continue
        at_finite = ~finite & torch.isfinite(y)
        if bool(at_finite.any()):
            raise FloatingPointError(
                f"segment {name!r}: forward mode produced non-finite output tangents where the "
                f"output itself is finite (output leaf {i}, {int(at_finite.sum())} entries). Some ops' "
                "forward-mode rules give NaN where backprop is finite (e.g. LPPool or sqrt at 0). "
                f"Mark the op rev(), or give segment {name!r} the strategy Reverse()."
            )
        raise FloatingPointError(
            f"segment {name!r}: its output has non-finite entries (output leaf {i}, e.g. log(0) or "
            "a division by zero) and so do its output tangents there. In forward mode these make the "
            "gradient of every differentiated input NaN (0 * inf = NaN), even where backprop's stays "
            f"finite. Keep the output finite (clamp or mask before the op), or give segment {name!r} "
            "the strategy Reverse()."
        )


def check_strided(name: str, ys: Sequence[torch.Tensor]) -> None:
    for i, y in enumerate(ys):
        if y.layout != torch.strided:
            raise TypeError(
                f"segment {name!r} returned a {y.layout} tensor (output leaf {i}); forward segments support dense "
                "(strided) tensors only. Return y.to_dense() from the segment, or mark it rev()."
            )


