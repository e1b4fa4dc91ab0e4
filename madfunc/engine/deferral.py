"""Gradients deferred to a seed-fused optimizer: which parameters are claimed, and by whom.

A seed-fused optimizer (``madfunc.optim.SeedSGD``) claims its parameters here. When a forward segment's
backward (``forward._backward``) meets a claimed parameter, and its strategy can give its gradient as a
:class:`~madfunc.strategies.base.SeedRecord` (``Random``: ``(1/k) sum_j s_j v_j``, the ``v`` drawn again from
a seed), the record goes to the claiming optimizer and autograd gets no gradient for that input: no
parameter-sized buffer is written. Everything else (other strategies, activations, parameters nobody
claimed, a parameter's uses outside the segment) gets its ordinary gradient, so ``p.grad`` holds the rest.

The claim is looked up by the tensor's identity, as autograd delivers it to the segment under ``use_plan``
(the ``nn.Parameter`` itself). Under ``mixed_grad`` or ``torch.func`` the segment sees wrappers, never a
claimed tensor, so functional gradients are never deferred. Claims hold the parameter and the optimizer
weakly: a deleted optimizer's parameters get ordinary gradients again.

This is configuration, like a registered forward rule, not a cache: ``REGISTRY.reset()`` leaves it alone.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from torch.utils.weak import WeakIdKeyDictionary

from madfunc.strategies.base import SeedRecord

__all__ = ["Claimant", "claim", "claimant", "claims_of", "release", "suspended"]


class Claimant(Protocol):
    """What claims parameters: told each deferred gradient of one of them."""

    def defer(self, param: torch.Tensor, record: SeedRecord) -> None: ...


# parameter -> weakref to the optimizer that claimed it
_CLAIMS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_SUSPENDED = [0]  # depth of suspended() blocks: claims are ignored inside them


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Ignore every claim inside the block (segments called in it record none, so their backward defers
    nothing): gradients are ordinary, and ``torch.autograd.grad`` returns them whole.

    For madfunc's own measuring steps (``auto_plan``'s profile) on a model whose optimizer already claimed its
    parameters: a deferred gradient would vanish from the step's result into the optimizer's records."""
    _SUSPENDED[0] += 1
    try:
        yield
    finally:
        _SUSPENDED[0] -= 1


def claimant(param: torch.Tensor) -> Claimant | None:
    """The live optimizer that claimed ``param``, or None."""
    ref = _CLAIMS.get(param)
    return None if ref is None else ref()


def claim(params: Sequence[torch.Tensor], owner: Claimant, where: str) -> None:
    """Claim ``params`` for ``owner``; a parameter claimed by another live optimizer is an error (its
    deferred gradients could reach only one of them)."""
    for p in params:
        other = claimant(p)
        if other is not None and other is not owner:
            raise ValueError(
                f"{where}: a parameter of shape {tuple(p.shape)} is already handled by another seed-fused optimizer "
                f"({type(other).__name__} at {id(other):#x}); its deferred gradients can reach only one. Give each "
                "parameter to one optimizer, or delete the other optimizer first."
            )
    ref = weakref.ref(owner)
    for p in params:
        _CLAIMS[p] = ref


def release(params: Sequence[torch.Tensor], owner: Claimant) -> None:
    """Drop ``owner``'s claims on ``params``: they get ordinary gradients again."""
    for p in params:
        if claimant(p) is owner:
            del _CLAIMS[p]


def claims_of(tensors: Sequence[torch.Tensor]) -> list[Claimant | None] | None:
    """Per tensor, the optimizer that claimed it; None when none is claimed (the common, free case)."""
    if not _CLAIMS or _SUSPENDED[0]:
        return None
    found = [claimant(t) for t in tensors]
    return found if any(c is not None for c in found) else None
