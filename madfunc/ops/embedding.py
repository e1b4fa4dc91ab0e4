"""Embedding lookups in forward mode, under backprop's conventions for the padding row and frequency scaling.

``nn.Embedding(padding_idx=p)`` (``F.embedding``) treats row ``p`` as padding: by PyTorch's documented
convention its backward gives that row no gradient from the lookups of index ``p``, although the forward
pass reads it. PyTorch's forward rule carries row ``p``'s tangent into those lookups, so a forward segment
differentiated a different function from the one ``torch.func.grad`` differentiates, and its gradient of
the padding row was silently not backprop's (found on transformers' OPT, whose ``pad_token_id`` is 1, on
inputs containing token 1). The rule here runs the op as usual and stops the tangent of the outputs
looked up at index ``p``: the primal is untouched, and the tangent is the one backprop's convention implies.

``scale_grad_by_freq=True`` scales backprop's gradient of row ``r`` by ``1 / (the count of index r in the
call)``: no longer the derivative of the forward pass at all. The tangent that agrees with that backward is
the lookup's tangent divided by its index's count, which the rule applies too (the double-vjp fallback cannot:
PyTorch's double backward of ``embedding`` ignores the scaling).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["EMBEDDING_RULES"]


def _backprops_tangent(out: torch.Tensor, indices: torch.Tensor, padding_idx: int | None, by_freq: bool,
                       rows: int) -> torch.Tensor:
    """``out`` with its values, and the tangent of each lookup scaled as backprop's convention scales its
    gradient: by 0 at the padding index, by 1 / its count in the call under ``scale_grad_by_freq``."""
    if not by_freq:  # (the common case, one op: detach drops the tangent of a dual or torch.func-wrapped tensor)
        return torch.where((indices != padding_idx).unsqueeze(-1), out, out.detach())
    count = torch.bincount(indices.reshape(-1), minlength=rows)[indices]
    factor = 1.0 / count.to(out.dtype)
    if padding_idx is not None:
        factor = factor.masked_fill(indices == padding_idx, 0.0)
    stopped = out.detach()
    return stopped + (out - stopped) * factor.unsqueeze(-1)  # (out - stopped: values 0, the tangent)


def _embedding(mode: Any, name: str, func: Callable[..., Any], args: tuple, kwargs: dict, *, aten_order: bool) -> Any:
    # F.embedding(input, weight, padding_idx=None, max_norm, norm_type, scale_grad_by_freq, sparse) normalises a
    # negative padding_idx and passes -1 for none to torch.embedding(weight, input, padding_idx=-1,
    # scale_grad_by_freq, sparse).
    names = ("weight", "input", "padding_idx", "scale_grad_by_freq") if aten_order else \
        ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq")
    bound = dict(zip(names, args, strict=False)) | kwargs
    out = func(*args, **kwargs)
    padding_idx, weight = bound.get("padding_idx", -1 if aten_order else None), bound["weight"]
    if padding_idx is not None and padding_idx < 0:  # torch.embedding: -1 is none; F.embedding counts from the end
        padding_idx = None if aten_order else padding_idx + weight.shape[0]
    by_freq = bool(bound.get("scale_grad_by_freq", False))
    if padding_idx is None and not by_freq:
        return out
    return _backprops_tangent(out, bound["input"], padding_idx, by_freq, weight.shape[0])


def _functional(mode: Any, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    return _embedding(mode, name, func, args, kwargs, aten_order=False)


def _aten(mode: Any, name: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    return _embedding(mode, name, func, args, kwargs, aten_order=True)


EMBEDDING_RULES: dict[Any, Callable[..., Any]] = {F.embedding: _functional, torch.embedding: _aten}
