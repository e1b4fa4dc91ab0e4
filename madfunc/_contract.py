"""The backward half of a forward segment: contract output tangents with the cotangent, combine.

``s_j = <ydot_j, ybar>`` over every differentiable output (complex outputs as pairs of reals: for a
real loss, PyTorch's cotangent of a complex ``y`` is ``dL/dRe y + i dL/dIm y``, so the contraction is
``Re(conj(ybar) ydot)``); ``Exact`` reads the gradient off ``s`` directly (one entry per basis tangent),
``Random`` returns ``(1/k) sum_j s_j v_j`` with the tangents regenerated from the seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._checks import _is_batched
from ._plan import Exact, Random, Strategy
from ._tangents import draw_leaf, draw_tangents

__all__ = ["contract", "combine"]


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t.resolve_conj()) if t.is_complex() else t  # a conj view must be resolved first


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def contract(ydots: Sequence[torch.Tensor], ybars: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """``s_j = sum over outputs of <ydot_j, ybar>`` for tangent batches ``ydots`` of shape (T, *y.shape)."""
    s = None
    for ydot, ybar in zip(ydots, ybars, strict=True):
        if ybar is None:
            continue
        ydot, ybar = _real(ydot), _real(ybar)
        acc = accumulation_dtype(ydot.dtype)
        term = ydot.reshape(ydot.shape[0], ybar.numel()).to(acc) @ ybar.reshape(-1).to(acc)
        s = term if s is None else s + term.to(s.dtype)
    return s


def combine(
    strategy: Strategy,
    seed: int | None,
    s: torch.Tensor | None,
    meta: Sequence[tuple[torch.Size, torch.dtype, torch.device]],
    used: Sequence[bool],
    s_shared: torch.Tensor | None = None,
    shared: Sequence[bool] = (),
) -> list[torch.Tensor]:
    """The gradients of the differentiated inputs (shapes, dtypes, devices in ``meta``) from ``s``.

    Inputs the segment never used (``used[i]`` False) get an exact zero; for ``Random`` their tangents
    are not even regenerated. Under a process group (``_distributed``), the inputs flagged in ``shared``
    (parameters) are combined with ``s_shared``, the coefficients reduced over ranks, the others with
    this rank's ``s``.
    """
    if s_shared is not None:
        s = torch.zeros_like(s_shared) if s is None else s
    elif s is None or s.numel() == 0:  # no cotangent reached the outputs, or nothing to differentiate
        return [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in meta]
    shapes = [m[0] for m in meta]
    dtypes = [m[1] for m in meta]
    if isinstance(strategy, Exact):
        pieces = torch.split(s, [math.prod(shape) for shape in shapes])
        return [p.reshape(shape).to(dtype) for p, shape, dtype in zip(pieces, shapes, dtypes, strict=True)]
    assert isinstance(strategy, Random) and seed is not None
    local = s * (1.0 / strategy.k)  # scale the k coefficients, not the n-element gradients
    coefs = [local] * len(meta)
    if s_shared is not None:
        coefs = [s_shared * (1.0 / strategy.k) if p else local for p in shared]
    if strategy.distribution == "orthogonal":  # orthogonal jointly over all leaves: drawn together
        tangents = draw_tangents(strategy.distribution, strategy.k, shapes, dtypes, s.device, seed)
        return [
            _combine(coef, v, dtype, reuse=False) if u else torch.zeros_like(v[0])
            for coef, v, dtype, u in zip(coefs, tangents, dtypes, used, strict=True)
        ]
    # Regenerate one leaf at a time (each has its own stream), so at most one leaf's tangents exist
    # next to the gradients.
    return [
        _combine(coef, draw_leaf(strategy.distribution, strategy.k, shape, dtype, s.device, seed, index), dtype)
        if u
        else torch.zeros(shape, dtype=dtype, device=s.device)
        for index, (coef, shape, dtype, u) in enumerate(zip(coefs, shapes, dtypes, used, strict=True))
    ]


def _combine(coef: torch.Tensor, v: torch.Tensor, dtype: torch.dtype, reuse: bool = True) -> torch.Tensor:
    """``sum_j coef_j v_j`` for tangents ``v`` of shape ``(k, *shape)``, as ``dtype``; with ``reuse``
    (``v`` is a fresh tensor of our own), it may be overwritten."""
    acc = accumulation_dtype(v.dtype)
    if reuse and v.shape[0] == 1 and acc == v.dtype and not _is_batched(coef):
        return v[0].mul_(coef[0].to(acc))  # in place: the regenerated tangent becomes the gradient
    return torch.tensordot(coef.to(acc), v.to(acc), dims=1).to(dtype)
