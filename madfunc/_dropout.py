"""Dropout in a forward segment called from plain autograd (``use_plan``): the plain call's mask.

A plain (eager) call of ``F.dropout`` on CPU fills its noise tensor ``empty_like(input)`` in the *memory
order* of ``input``, so the mask a seed gives depends on the input's strides. Under torch.func's
transforms (a forward segment's passes are ``vmap(jvp)``) dropout is decomposed into draws in *logical*
(contiguous) order instead. Both are valid masks, but on a non-contiguous activation (the output of
``nn.MultiheadAttention`` with ``batch_first=True``, so every ``TransformerEncoderLayer``) a segment drew
another mask than the plain model under the same seed: its output and gradient differed from the plain
code it wraps. Called from plain autograd, the segment now draws the noise as the plain kernel does, on a
plain tensor laid out as the plain call's ``empty_like(input)`` (bit for bit the same, checked against
``F.dropout`` and ``F.alpha_dropout`` for contiguous, transposed, permuted, sliced, expanded and
channels-last inputs, ``p`` in {0, 0.1, 0.5, 1}, in place or not). Under ``mixed_grad`` the plain code is
itself run by torch.func (``torch.func.grad``), whose dropout the segment's passes already share: nothing
changes there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["PLAIN_RNG_RULES"]

_SELU_ALPHA = 1.7580993408473766  # -selu's negative saturation value, as alpha_dropout's kernel uses it


def _arguments(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: tuple) -> list:
    """The call's arguments by position: ``args``, then ``kwargs`` or the defaults for the rest."""
    rest = zip(names[len(args) :], defaults[len(args) :], strict=True)
    return [*args, *(kwargs.get(name, default) for name, default in rest)]


def _noisy(input: torch.Tensor, p: float, train: bool, inplace: bool, alpha: bool) -> torch.Tensor:
    """ATen's CPU dropout (``_dropout_impl``) with its noise drawn on a plain tensor in ``input``'s layout."""
    if not train or p == 0 or input.numel() == 0:
        return input
    if p == 1:
        zero = torch.zeros((), dtype=input.dtype, device=input.device)
        return input.mul_(zero) if inplace else input * zero
    # empty_like of a plain tensor with input's strides: the layout rule of the plain call's empty_like(input)
    layout = torch.empty_strided(input.shape, input.stride(), dtype=input.dtype, device=input.device)
    noise = torch.empty_like(layout).bernoulli_(1 - p)
    if not alpha:
        noise.div_(1 - p)
        return input.mul_(noise) if inplace else input * noise
    a = 1.0 / math.sqrt((_SELU_ALPHA**2 * p + 1) * (1 - p))
    shift = noise.add(-1).mul_(_SELU_ALPHA * a).add_(_SELU_ALPHA * a * p)
    noise.mul_(a)
    return (input.mul_(noise) if inplace else input * noise).add_(shift)


def _rule(names: tuple[str, ...], defaults: tuple, alpha: bool, inplace: bool | None) -> Callable[..., Any]:
    def rule(mode: Any, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        values = _arguments(args, kwargs, names, defaults)
        input, p, train = values[0], values[1], values[2]
        in_place = values[3] if inplace is None else inplace
        if (
            not isinstance(input, torch.Tensor) or input.device.type != "cpu" or not input.is_floating_point()
            or isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p <= 1.0)
        ):
            return func(*args, **kwargs)  # (accelerators use fused kernels; invalid arguments raise there)
        return _noisy(input, float(p), bool(train), bool(in_place), alpha)

    return rule


_F_NAMES = ("input", "p", "training", "inplace")
_TORCH_NAMES = ("input", "p", "train")

# Torch functions (what the op seam sees) -> rule(mode, name, func, args, kwargs); consulted by OpRules only
# for a segment called outside torch.func's transforms.
PLAIN_RNG_RULES: dict[Any, Callable[..., Any]] = {
    F.dropout: _rule(_F_NAMES, (None, 0.5, True, False), alpha=False, inplace=None),
    F.alpha_dropout: _rule(_F_NAMES, (None, 0.5, False, False), alpha=True, inplace=None),
    torch.dropout: _rule(_TORCH_NAMES, (None, None, None), alpha=False, inplace=False),
    torch.dropout_: _rule(_TORCH_NAMES, (None, None, None), alpha=False, inplace=True),
    torch.alpha_dropout: _rule(_TORCH_NAMES, (None, None, None), alpha=True, inplace=False),
    torch.alpha_dropout_: _rule(_TORCH_NAMES, (None, None, None), alpha=True, inplace=True),
}
