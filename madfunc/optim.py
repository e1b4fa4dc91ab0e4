"""Seed-fused optimizers: apply a ``Random`` segment's update leaf by leaf from its seed, with no ``p.grad``.

The gradient a ``Random(k)`` segment gives a parameter is ``(1/k) sum_j s_j v_j``: ``k`` scalars ``s`` and
tangents ``v`` that can be drawn again from the call's seed, one leaf at a time. :class:`SeedSGD` claims
its parameters (``engine/deferral``); under ``use_plan``, such a segment's backward then hands it that
record instead of writing a parameter-sized gradient, and ``step()`` draws each leaf's tangents again and
updates the leaf, as MeZO does (Malladi et al. 2023, Algorithm 1). The peak of a step is then the model
plus one leaf's tangents and its update, not the model plus a gradient for every parameter.

Everything else is ordinary: a parameter's gradient from anywhere else (a ``Reverse`` or ``Exact`` part, a
tied weight's other use, a strategy that cannot defer) accumulates in ``p.grad`` as usual, and ``step()``
adds it to the deferred part.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from madfunc.engine import deferral as _deferral
from madfunc.strategies.base import SeedRecord

__all__ = ["SeedSGD"]


def _check_hyper(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"SeedSGD({name}=...): expected a float >= 0, got {type(value).__name__} {value!r}.")
    if not value >= 0.0:  # (also refuses NaN)
        raise ValueError(f"SeedSGD({name}={value!r}): {name} must be >= 0.")
    return float(value)


class SeedSGD(torch.optim.Optimizer):
    """Stochastic gradient descent (``torch.optim.SGD``'s update) that takes ``Random`` segments' gradients
    as seeds and coefficients, so that no parameter-sized gradient buffer exists for them.

    Use it as ``torch.optim.SGD``: ``loss.backward()`` under :func:`madfunc.use_plan`, then ``step()`` and
    ``zero_grad()``. For each parameter it holds, a ``Random`` segment's backward defers its gradient
    ``(1/k) sum_j s_j v_j`` to the optimizer (``k`` numbers and a seed) instead of writing ``p.grad``;
    ``step()`` draws the tangents ``v`` again leaf by leaf and applies the update. Gradient parts from
    anywhere else (``Reverse``, ``Exact`` or ``Activity`` segments, a tied weight's other use, code outside
    every segment) arrive in ``p.grad`` as usual and are added. Several backward calls before one ``step()``
    accumulate (one record per call, a few bytes each), as ``p.grad`` does.

    Memory: without momentum the optimizer keeps nothing per parameter, and a step needs one leaf's ``k``
    tangents and its update at a time. Momentum keeps a buffer per parameter, as ``torch.optim.SGD`` does:
    one more copy of the parameters it holds (Adam would keep two: its first and second moments, which
    is why MeZO and this optimizer use SGD). The update equals ``torch.optim.SGD``'s with the same
    arguments on the same gradient, up to float rounding.

    Caveats: ``p.grad`` holds only the non-deferred part, so ``torch.nn.utils.clip_grad_norm_`` would see
    the wrong norm (use :meth:`clip_grad_norm_`), and ``torch.autograd.grad`` of a claimed parameter under
    ``use_plan`` gets none of a ``Random`` segment's part. ``model.zero_grad()`` clears ``p.grad`` but not the
    deferred parts: clear them with ``opt.zero_grad()`` (``step()`` also consumes them). ``state_dict()`` holds
    the momentum buffers and hyperparameters, never pending gradients (as torch's optimizers never hold
    ``p.grad``). Under ``mixed_grad`` or ``torch.func`` nothing is deferred: the gradients are returned as
    tensors, and this optimizer applies ``p.grad`` like ``torch.optim.SGD``. Under ``use_plan(...,
    process_group=...)`` the deferred coefficients are the ones reduced over ranks, so every rank applies the
    same update; a DDP-wrapped model then sees no gradient for those parameters (``find_unused_parameters``).

    Args:
        params: the parameters (or parameter groups, dicts as for torch optimizers).
        lr: learning rate. Default: ``1e-3``.
        momentum: momentum factor (keeps a buffer per parameter). Default: ``0``.
        dampening: dampening of the momentum. Default: ``0``.
        weight_decay: L2 penalty, added to the gradient as ``torch.optim.SGD`` does. Default: ``0``.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``). Default: ``False``.

    Examples:
        >>> import torch, madfunc as mf
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(mf.fwd(torch.nn.Linear(4, 4), name="body"), torch.nn.Linear(4, 1))
        >>> opt = mf.SeedSGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> with mf.use_plan({"body": mf.Random(k=4)}):
        ...     loss = model(torch.randn(8, 4)).pow(2).mean()
        ...     loss.backward()
        >>> model[0].module.weight.grad is None, model[1].weight.grad is not None  # deferred / ordinary
        (True, True)
        >>> opt.pending()
        2
        >>> opt.step(); opt.zero_grad()
        >>> opt.pending()
        0
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("dampening", dampening),
                            ("weight_decay", weight_decay)):
            _check_hyper(name, value)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SeedSGD(nesterov=True): Nesterov momentum needs momentum > 0 and dampening == 0.")
        self._pending: dict[int, list[SeedRecord]] = {}  # id(param) -> its deferred gradient parts
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay,
                    "nesterov": nesterov}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (as ``torch.optim.Optimizer.add_param_group``) and claim its parameters."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        _deferral.claim(params, self, "SeedSGD")  # first: a refused group is not added
        super().add_param_group({**param_group, "params": params})

    def defer(self, param: torch.Tensor, record: SeedRecord) -> None:
        """Take one deferred gradient part of ``param`` (called by a segment's backward)."""
        self._pending.setdefault(id(param), []).append(record)

    def pending(self) -> int:
        """How many deferred gradient parts wait for the next ``step()`` (one per parameter and backward call)."""
        return sum(len(records) for records in self._pending.values())

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad`` (as ``torch.optim.Optimizer.zero_grad``) and the deferred gradient parts."""
        super().zero_grad(set_to_none)
        self._pending.clear()

    def _gradient(self, p: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """``p``'s whole gradient, ``p.grad`` plus its deferred parts, built leaf by leaf; whether it is a
        fresh tensor (ours to overwrite) rather than ``p.grad`` itself."""
        records = self._pending.pop(id(p), [])
        return (self._whole(p, records), True) if records else (p.grad, False)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One SGD step, with ``torch.optim.SGD``'s update, from ``p.grad`` and the deferred parts; consumes the
        deferred parts. A parameter with neither is left alone (as torch's optimizers skip ``p.grad is None``).

        Args:
            closure: re-evaluates the model and returns the loss (as for torch optimizers). Default: none.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                g, owned = self._gradient(p)
                if g is not None:
                    self._update(p, g, owned, group)
        self._pending.clear()  # (parts of parameters no longer in any group)
        return loss

    def _update(self, p: torch.Tensor, g: torch.Tensor, owned: bool, group: dict[str, Any]) -> None:
        """``torch.optim.SGD``'s update of ``p`` with gradient ``g``, in place in ``g`` when it is ``owned``."""
        wd, momentum = group["weight_decay"], group["momentum"]
        if wd != 0:
            g = g.add_(p, alpha=wd) if owned else g.add(p, alpha=wd)
            owned = True
        if momentum != 0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.clone(g).detach()
            else:
                buf.mul_(momentum).add_(g, alpha=1 - group["dampening"])
            if group["nesterov"]:
                g = g.add_(buf, alpha=momentum) if owned else g.add(buf, alpha=momentum)
            else:
                g = buf
        p.add_(g, alpha=-group["lr"])

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
                        ) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over this optimizer's parameters, deferred parts included.

        The norm is taken of each parameter's whole gradient (``p.grad`` plus its deferred parts, drawn
        again leaf by leaf, so this costs one more draw of the tangents); then ``p.grad`` and the deferred
        coefficients are scaled by ``max_norm / (norm + 1e-6)`` where that is below 1, as torch does.

        Args:
            max_norm: the largest norm the gradient may have.
            norm_type: the p-norm (``float('inf')`` for the largest entry). Default: ``2``.
            error_if_nonfinite: raise if the norm is NaN or infinite. Default: ``False``.

        Returns:
            The norm before clipping (a 0-dim tensor).
        """
        params = [p for group in self.param_groups for p in group["params"]]
        norms = []
        for p in params:
            records = self._pending.get(id(p), [])
            if p.grad is None and not records:
                continue
            g = p.grad if not records else self._whole(p, records)
            norms.append(torch.linalg.vector_norm(g, norm_type))
        if not norms:
            return torch.tensor(0.0)
        total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), norm_type)
        if error_if_nonfinite and not math.isfinite(float(total)):
            raise RuntimeError(
                f"SeedSGD.clip_grad_norm_: the total norm of order {norm_type} is non-finite ({float(total)}); "
                "pass error_if_nonfinite=False to clip anyway."
            )
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.device, p.grad.dtype))
            if id(p) in self._pending:
                self._pending[id(p)] = [
                    r if r.coef is None else dataclasses.replace(r, coef=r.coef * scale.to(r.coef.device, r.coef.dtype))
                    for r in self._pending[id(p)]
                ]
        return total

    def _whole(self, p: torch.Tensor, records: list[SeedRecord]) -> torch.Tensor:
        """``p.grad`` plus the deferred parts ``records``, as a fresh tensor (from k = 1, the first part's
        regenerated tangent itself: one leaf-sized buffer)."""
        total = records[0].gradient()
        for record in records[1:]:
            total.add_(record.gradient())
        return total if p.grad is None else total.add_(p.grad)
