"""Ops whose PyTorch forward rule takes a different derivative from their backward rule at a kink or a tie.

At a point where an op is not differentiable (PReLU at 0, ``fmax`` of two equal numbers, ``clamp`` at its
bound), backprop's formula picks one one-sided derivative and PyTorch's forward rule, for some ops, the other.
There a forward segment's exact gradient differed from ``torch.func.grad``'s, silently: found by an audit of
ops at kinks, ties and zeros against ``torch.func.grad`` in float64 (2026-12-07, kept as ``tests/test_kinks.py``).
Such points are reached in practice: inputs that are exactly zero (padding, a ReLU before a PReLU), a ``clamp``
against a bound computed from the same tensor. Each rule here computes the op as the ``torch.where`` that
backprop's formula differentiates: the same values bit for bit, and, under forward mode, the tangent that agrees
with backprop.

| op | backprop at the kink or tie | PyTorch's forward rule |
|---|---|---|
| ``prelu(x, a)`` at ``x = 0`` | slope ``a`` | slope 1 |
| ``fmax(x, y)`` at ``x == y`` | all to ``x`` | all to ``y`` |
| ``clamp(x, min=t)`` or ``max=t``, ``t`` a tensor (``clip``, in place) at ``x == t`` | all to ``x`` | all to ``t`` |

(``fmin``, ``clamp`` with both tensor bounds or with number bounds, ``maximum``/``minimum`` (half to each) and
``clamp_min``/``clamp_max`` agree already.)

Also here, as the op it is: ``rrelu`` in eval mode, which PyTorch's kernel computes as ``leaky_relu`` with the
slope ``(lower + upper) / 2``. It has no forward rule: out of place it took the fallback one tangent at a time,
and in place (``nn.RReLU(inplace=True)``) it was refused. (In training its slopes are random: unchanged.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["KINK_RULES", "NATIVE"]

# A rule's answer "this call needs no rule": the seam runs the op as any other, so a pass that meets only such
# calls (clamp with number bounds, the common case) still counts as untouched and later passes may go bare.
NATIVE: Any = object()


def _prelu(mode: Any, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    bound = dict(zip(("input", "weight"), args, strict=False)) | kwargs
    x, a = bound["input"], bound["weight"]
    if a.numel() > 1:  # one slope per channel: the channels on dim 1 (dim 0 of a 1-D input)
        channels = x.shape[1] if x.dim() >= 2 else x.shape[0] if x.dim() == 1 else 1
        if a.numel() != channels:
            return NATIVE  # PyTorch's own error
        a = a.reshape(1, channels, *([1] * (x.dim() - 2))) if x.dim() >= 2 else a
    return torch.where(x > 0, x, a * x)  # prelu's kernel computes the same: x if x > 0 else a * x


def _fmax(mode: Any, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    bound = dict(zip(("input", "other"), args, strict=False)) | kwargs
    x, y = bound.get("input"), bound.get("other")
    if set(bound) - {"input", "other"} or not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        return NATIVE  # out=
    # x where x >= y or y is NaN (a NaN loses unless both are), else y: backprop's masks exactly.
    return torch.where((x >= y) | y.isnan(), x, y)


def _clamp(mode: Any, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    bound = dict(zip(("input", "min", "max"), args, strict=False)) | kwargs
    x, low, high = bound.get("input"), bound.get("min"), bound.get("max")
    t = low if high is None else high if low is None else None  # the one bound, if only one is given
    if set(bound) - {"input", "min", "max"} or not isinstance(x, torch.Tensor) or not isinstance(t, torch.Tensor) \
            or torch.broadcast_shapes(x.shape, t.shape) != x.shape:
        return NATIVE  # number bounds, both bounds, out=, or a bound that would broadcast x
    keep = x >= t if high is None else x <= t
    return torch.where(keep | x.isnan(), x, t)  # a NaN input stays NaN, as in clamp; a NaN bound wins


def _clamp_(mode: Any, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    out = _clamp(mode, name, func, args, kwargs)  # (in place: the same values, written into the input)
    return out if out is NATIVE else (args[0] if args else kwargs["input"]).copy_(out)


def _rrelu(mode: Any, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    names = ("input", "lower", "upper", "training", "inplace") if func is F.rrelu else \
        ("input", "lower", "upper", "training")
    bound = dict(zip(names, args, strict=False)) | kwargs
    if bound.get("training", False) or set(bound) - set(names):
        return NATIVE  # random slopes (or generator=): the op as it is
    slope = (bound.get("lower", 1.0 / 8) + bound.get("upper", 1.0 / 3)) / 2
    inplace = bound.get("inplace", False) or func is torch.rrelu_
    return F.leaky_relu(bound["input"], slope, inplace=inplace)


KINK_RULES: dict[Any, Callable[..., Any]] = {
    F.prelu: _prelu,  # (torch.prelu is the same function)
    torch.Tensor.prelu: _prelu,
    torch.fmax: _fmax,
    torch.Tensor.fmax: _fmax,
    torch.clamp: _clamp,
    torch.Tensor.clamp: _clamp,
    torch.clip: _clamp,
    torch.Tensor.clip: _clamp,
    torch.clamp_: _clamp_,
    torch.Tensor.clamp_: _clamp_,
    torch.clip_: _clamp_,
    torch.Tensor.clip_: _clamp_,
    F.rrelu: _rrelu,
    torch.rrelu: _rrelu,
    torch.rrelu_: _rrelu,
}
