"""Arithmetic of a tensor and a Python number inside a forward segment, run by the op's .Scalar overload.

``x * 2``, ``x / 3``, ``x - 1``: the .Tensor overload that torch calls wraps the number in a tensor without a
tangent, and its forward formula gives that tensor an all-zero tangent (an ``_efficientzerotensor``), whose
arithmetic computes its result's shape with torch's Python meta functions: 1.1-1.7 ms an op, against 10-20 us
for the .Scalar overload, whose formula has no such term (measured in torch 2.13 under ``jvp`` and
``vmap(jvp)``, a 256x16 float32 tensor, 1 CPU thread). The op seam (``rules.OpRules``) and the replay's
tracing (``ScalarForms``) run such calls by the .Scalar overload: the same kernel, values and type promotion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["ScalarForms", "scalar_form", "seam_pays"]

# The overloads by the functions that torch-function dispatch sees (``2 * x`` arrives as ``Tensor.mul(x, 2)``).
_aten = torch.ops.aten
_SCALAR_FORMS: dict[Any, Callable[..., Any]] = {
    **dict.fromkeys((torch.Tensor.mul, torch.mul), _aten.mul.Scalar),
    **dict.fromkeys((torch.Tensor.add, torch.add), _aten.add.Scalar),
    **dict.fromkeys((torch.Tensor.sub, torch.sub), _aten.sub.Scalar),
    **dict.fromkeys((torch.Tensor.div, torch.div), _aten.div.Scalar),
}


def _scalar_operand(scalar: Any, args: tuple, kwargs: dict) -> bool:
    """``(tensor, number)`` (and ``alpha`` for add and sub): a call that the .Scalar overload runs the same (not a
    bool, which promotes differently, nor a tensor subclass, whose own __torch_function__ would be skipped)."""
    return (len(args) == 2 and type(args[1]) in (int, float) and type(args[0]) in (torch.Tensor, torch.nn.Parameter)
            and (not kwargs or (kwargs.keys() == {"alpha"} and scalar in _WITH_ALPHA)))


_WITH_ALPHA = (_aten.add.Scalar, _aten.sub.Scalar)


def scalar_form(func: Any, args: tuple, kwargs: dict) -> Callable[..., Any] | None:
    """The .Scalar overload that runs ``func(*args, **kwargs)`` the same, or None."""
    scalar = _SCALAR_FORMS.get(func)
    return scalar if scalar is not None and _scalar_operand(scalar, args, kwargs) else None


class ScalarForms(TorchFunctionMode):
    """Only the seam's .Scalar forms: around a pass that met no rule, when it is traced for replay
    (engine/replay.py), so that the recording has the eager pass's ops, without zero-tangent work."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        scalar = scalar_form(func, args, kwargs)
        return (scalar or func)(*args, **kwargs)


def seam_pays(modes: Sequence[Any]) -> bool:
    """Whether later passes should keep the op seam for its .Scalar forms alone: a bare pass would spend ~1 ms on
    each of them, the seam ~25 us on each torch call."""
    return any(getattr(m, "scalar_forms", 0) * 40 >= getattr(m, "calls", 0) > 0 for m in modes)
