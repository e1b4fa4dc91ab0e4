"""The kernels of a forward segment's backward half: contract output tangents with the cotangent, combine.

``s_j = <ydot_j, ybar>`` over every differentiable output (complex outputs as pairs of reals: for a
real loss, PyTorch's cotangent of a complex ``y`` is ``dL/dRe y + i dL/dIm y``, so the contraction is
``Re(conj(ybar) ydot)``). Each strategy decides what to do with ``s`` (``Strategy.combine``): ``Exact``
reads the gradient off it (one entry per basis tangent), ``Random`` returns ``(1/k) sum_j s_j v_j``
(``combine_tangents``) with the tangents regenerated from the seed. Both run with autocast off
(``_autocast.no_autocast``): in float32 (or the tensors' own wider dtype), never in the autocast dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from madfunc.core.autocast import without_autocast
from madfunc.core.functorch import is_batched

__all__ = ["accumulation_dtype", "combine_tangents", "contract"]


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t.resolve_conj()) if t.is_complex() else t  # a conj view must be resolved first


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@without_autocast
def contract(
    ydots: Sequence[torch.Tensor],
    ybars: Sequence[torch.Tensor | None],
    units: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """``s_j = sum over outputs of <ydot_j, ybar>`` for tangent batches ``ydots`` of shape (T, *y.shape).

    With ``units`` (``units(t, lead)``: ``t`` with its unit dims moved after ``lead`` leading dims and
    flattened into one), ``s`` has shape ``(T, U)``: one coefficient per tangent and unit (``Activity``).
    """
    s = None
    for ydot, ybar in zip(ydots, ybars, strict=True):
        if ybar is None:
            continue
        ydot, ybar = _real(ydot), _real(ybar)
        acc = accumulation_dtype(ydot.dtype)
        if units is None:
            term = ydot.reshape(ydot.shape[0], ybar.numel()).to(acc) @ ybar.reshape(-1).to(acc)
        else:
            rows, cols = units(ydot, 1).to(acc), units(ybar, 0).to(acc)
            term = torch.einsum("kbi,bi->kb", rows.reshape(*rows.shape[:2], -1), cols.reshape(cols.shape[0], -1))
        s = term if s is None else s + term.to(s.dtype)
    return s


@without_autocast
def combine_tangents(coef: torch.Tensor, v: torch.Tensor, dtype: torch.dtype, reuse: bool = True) -> torch.Tensor:
    """``sum_j coef_j v_j`` for tangents ``v`` of shape ``(k, *shape)``, as ``dtype``; with ``reuse``
    (``v`` is a fresh tensor of our own), it may be overwritten."""
    acc = accumulation_dtype(v.dtype)
    if v.shape[0] == 1 and acc == v.dtype and not is_batched(coef):
        if reuse:
            return v[0].mul_(coef[0].to(acc))  # in place: the regenerated tangent becomes the gradient
        return v[0] * coef[0].to(acc)  # one tangent: a scaled copy, without tensordot's reshapes
    return torch.tensordot(coef.to(acc), v.to(acc), dims=1).to(dtype)
