"""What every segment call is checked for, by both engines.

Purity (no in-place changes to inputs), outputs that are pytrees of tensors, ops without forward-mode
rules, non-finite tangents, and differentiation beyond first order: each failure names the segment
and says what to do, instead of a torch error from deep inside a transform or a silently wrong gradient.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import optree
import torch

from madfunc.core.functorch import differentiating_transforms

__all__ = ["ForwardModeError"]


class ForwardModeError(NotImplementedError):
    """An op inside a forward segment has no forward-mode (jvp) rule in PyTorch."""


def _needs_grad(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad


def needs_grad_traced(t: Any) -> bool:
    """``_needs_grad`` as the traceable engine must read it: Dynamo (torch 2.13) reads an argument of
    torch.func.grad as not requiring grad (the requires_grad it had before grad set it), while tensors computed
    from it read True; a view is computed from it."""
    return isinstance(t, torch.Tensor) and t.is_floating_point() and (t.requires_grad or t.view_as(t).requires_grad)


def writes_first_operand(func: Any) -> bool:
    """Whether torch function ``func`` is an in-place op by its name (``add_``, ``__iadd__``, ``__setitem__``),
    which writes to its first operand. (A call with ``out=`` writes too: callers check that separately.)"""
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or name == "__setitem__"


def check_output(name: str, out: Any, leaves: Sequence[Any]) -> None:
    """A segment returns a tensor or a pytree of tensors (``leaves``: ``out`` flattened by the caller's pytree
    library: optree eagerly, torch's under Dynamo). Shared by both engines."""
    if out is None:
        raise TypeError(
            f"segment {name!r} returned None; a segment must return a tensor or a pytree (tuple, list, dict) "
            "of tensors. Did its function miss a `return`?"
        )
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"segment {name!r} returned a {type(leaf).__name__} ({leaf!r:.60}) inside its output; a "
                "segment must return a tensor or a pytree (tuple, list, dict) of tensors. Return "
                "non-tensor values from outside the segment, or wrap numbers with torch.tensor()."
            )


def _flatten_output(name: str, out: Any) -> tuple[list[torch.Tensor], Any]:
    leaves, spec = optree.tree_flatten(out)
    check_output(name, out, leaves)
    return leaves, spec


def refuse_complex(name: str, tensors: Sequence[Any]) -> None:
    """Forward segments differentiate real tensors only (both engines)."""
    if any(isinstance(t, torch.Tensor) and t.is_complex() and t.requires_grad for t in tensors):
        raise TypeError(
            f"segment {name!r}: complex inputs that need gradients are not supported in forward mode; "
            "pass real and imaginary parts as separate real tensors, or mark the segment rev()."
        )


def same_name_error(where: str, name: str, detail: str = "") -> ValueError:
    """Two different functions ran under one segment name in one call (both engines; ``detail``: which)."""
    return ValueError(
        f"{where}: two different functions ran under the segment name {name!r} in one call{detail}. Give each "
        "segment its own name, e.g. fwd(fn, name='block1'); a plan pattern such as 'block*' can still address "
        "them together."
    )


def _versions(leaves: Sequence[Any]) -> list[int | None]:
    return [leaf._version if isinstance(leaf, torch.Tensor) else None for leaf in leaves]


def _check_not_mutated(name: str, leaves: Sequence[Any], before: Sequence[int | None]) -> None:
    for index, (leaf, version) in enumerate(zip(leaves, before, strict=False)):
        if version is not None and leaf._version != version:
            raise RuntimeError(
                f"segment {name!r} modified its input in place (input leaf {index}, shape "
                f"{tuple(leaf.shape)}). Segments must be pure functions: use out-of-place ops "
                "(x = x + 1, not x += 1 or x.add_(1)), or clone the input first."
            )


def _translate_error(name: str, error: BaseException) -> BaseException | None:
    """A madfunc error for failures whose torch message would not say what to do, else None."""
    if isinstance(error, ForwardModeError):
        return None  # ours already: it names the segment
    message = str(error)
    if "jvp function for custom autograd.Function" in message or "does not have vmap support" in message:
        return ForwardModeError(
            f"segment {name!r} runs in forward mode, but a custom torch.autograd.Function inside it has no "
            "forward-mode rule (a `jvp` staticmethod) or no vmap rule (`vmap`, or `generate_vmap_rule = True`). "
            "Give the Function both (`setup_context` + `jvp` + `generate_vmap_rule = True`), or mark the part "
            f"that uses it rev() (or give segment {name!r} Reverse()).\n"
            f"PyTorch said: {message.strip().splitlines()[0]}"
        )
    if "must override the setup_context staticmethod" in message:  # e.g. transformers' Bloom GeLUFunction
        return ForwardModeError(
            f"segment {name!r} runs in forward mode, but a custom torch.autograd.Function inside it is written in "
            "the old style (forward(ctx, ...) without a separate `setup_context`), which torch.func, and so forward "
            f"mode, cannot run. Mark the part that uses it rev() (or give segment {name!r} Reverse()), or rewrite "
            "the Function with `setup_context` + `jvp` + `generate_vmap_rule = True`.\n"
            f"PyTorch said: {message.strip().splitlines()[0]}"
        )
    if "Batching rule not implemented" in message or "vmap: we do not yet support" in message:
        return RuntimeError(
            f"segment {name!r}: an op inside it cannot be batched by torch.func.vmap (the engine already pushed "
            "one tangent at a time, so the batching is an outer vmap's, e.g. per-example gradients). Mark the "
            f"part that uses the op rev().\nPyTorch said: {message.strip().splitlines()[0]}"
        )
    op = missing_forward_rule(message)
    if isinstance(error, (NotImplementedError, RuntimeError)) and op is not None:
        what = f"op '{op.strip(chr(39) + chr(34))}'" if op else "an op"
        return ForwardModeError(
            f"segment {name!r} runs in forward mode, but {what} inside it has no forward-mode (jvp) rule "
            f"in PyTorch {torch.__version__}. Mark the part that uses it rev() (or give segment {name!r} "
            f"the strategy Reverse() in the plan).\nPyTorch said: {message.strip().splitlines()[0]}"
        )
    if isinstance(error, RuntimeError) and ("in-place" in message or "inplace" in message):
        return RuntimeError(
            f"segment {name!r} modified a tensor in place, which a segment must not do (it would change "
            "its own inputs or what its gradient is computed from). Use out-of-place ops (x = x + 1, not "
            "x += 1 or x.add_(1)), or clone the input first. A tensor the body reaches outside its arguments "
            "cannot be written in place either (the body runs several times per call); for a transformers cache "
            "that preallocates (StaticCache), use the default DynamicCache or call the model with use_cache=False.\n"
            f"PyTorch said: {message.strip().splitlines()[0]}"
        )
    return None


_MISSING_RULE = re.compile(
    r"forward AD with (\S+?) that does not support|derivative for (\S+?) is not implemented"
    r"|(\S+?): forward AD is not implemented|jvp for (\S+?) is not implemented"
)


def missing_forward_rule(message: str) -> str | None:
    """The op named by PyTorch's "no forward-mode rule" error message ("" if unnamed), or None if the
    message is not that error."""
    match = _MISSING_RULE.search(message)
    if match:
        return next((g for g in match.groups() if g), "")
    return "" if "forward AD" in message or "forward-mode" in message else None


def _common_device(name: str, tensors: Sequence[torch.Tensor]) -> torch.device:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(
            f"segment {name!r}: its differentiated inputs live on several devices "
            f"({', '.join(sorted(map(str, devices)))}); move them to one device."
        )
    return next(iter(devices))


def _refuse_higher_order(name: str) -> None:
    """The backward contraction is not itself differentiable: refuse instead of a silently wrong result."""
    levels = differentiating_transforms()
    if levels >= 2 or (levels == 0 and torch.is_grad_enabled()):
        raise NotImplementedError(
            f"segment {name!r}: a forward-mode segment's gradient was differentiated again (torch.func.grad, "
            "jacrev or hessian over mixed_grad, or backward(create_graph=True) under use_plan). madfunc "
            "gives first-order gradients only; take higher-order derivatives of the plain model (outside "
            "madfunc transforms), or mark the segment rev()."
        )
