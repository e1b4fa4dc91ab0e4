"""``Checkpointed``: reverse mode that keeps only the segment's inputs and recomputes its body in backward."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from madfunc.strategies.base import Strategy

__all__ = ["Checkpointed"]


@dataclasses.dataclass(frozen=True)
class Checkpointed(Strategy, kind=("ckpt", "checkpointed"), fields=()):
    """Differentiate the segment by backpropagation, keeping only its inputs (activation checkpointing).

    The forward call records no graph inside the segment; backward runs the body again, with autograd
    recording, and backpropagates through it: the semantics of ``torch.utils.checkpoint(use_reentrant=False)``,
    also under :func:`mixed_grad` (torch.func.grad, where torch's checkpoint is refused). The gradient is that
    of :class:`Reverse`, to rounding; the memory a segment keeps between forward and backward is its input
    tensors (parameters aside: they exist anyway), and its activations exist only during its own backward,
    for the price of one more forward pass of the segment.

    The recomputation redraws the same random numbers (dropout masks), and side effects happen once:
    module buffers (BatchNorm's running statistics) are updated by the forward call only, and the objects
    the body reaches through its arguments, modules and closure (a transformers KV cache) are seen by the
    recomputation as the forward call saw them and left as backward found them. Under
    ``mixed_grad(traceable=True)`` the segment runs as plain reverse-mode code (the compiler decides what
    it keeps). String form: ``"ckpt"`` or ``"checkpointed"``.

    Examples:
        >>> import torch, madfunc as mf
        >>> block = mf.rev(lambda w, h: torch.tanh(h @ w).sum(), name="block")
        >>> w, h = torch.ones(3, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
        >>> grad = mf.mixed_grad(lambda w, h: block(w, h), plan={"block": "ckpt"})
        >>> torch.allclose(grad(w, h), torch.func.grad(lambda w, h: block(w, h))(w, h))
        True
        >>> mf.Plan({"block": "ckpt"})["block"]
        Checkpointed()
    """

    is_forward: ClassVar[bool] = False
    recomputes: ClassVar[bool] = True
