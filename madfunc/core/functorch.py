"""The one home of madfunc's calls into PyTorch's private functorch API (``torch._C._functorch``,
``torch._functorch``): what changes first on a torch upgrade is found here, and nowhere else.

It reads the wrappers torch.func puts around tensors (grad levels, vmap batches) and the stack of active
transforms, and names the tensor queries that read metadata only.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "CUSTOM_FUNCTION_CALL", "METADATA_OPS", "TransformType", "differentiating_transforms", "grad_transforms_active",
    "interpreter_stack", "is_batched", "is_wrapped", "layer_depth", "outside_transforms", "plain_value",
    "restore_layer_depth", "run_below_grad", "unwrap", "vmap_randomness_same",
]

_F = torch._C._functorch  # pyright: ignore[reportAttributeAccessIssue]  (torch._C's stubs lack it)
TransformType = _F.TransformType

try:  # what SomeFunction.apply(...) becomes under a functorch transform (a HigherOrderOperator)
    from torch._functorch.autograd_function import custom_function_call as CUSTOM_FUNCTION_CALL
except ImportError:  # pragma: no cover - other PyTorch versions: custom Functions go their own way
    CUSTOM_FUNCTION_CALL = object()


def is_wrapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is a functorch wrapper (a grad-level or batched tensor)."""
    return bool(_F.is_functorch_wrapped_tensor(t))


def unwrap(t: torch.Tensor) -> torch.Tensor:
    """``t`` without any of torch.func's wrappers (the tensor a transform hands back, or the storage's owner)."""
    while isinstance(t, torch.Tensor) and _F.is_functorch_wrapped_tensor(t):
        t = _F.get_unwrapped(t)
    return t


def is_batched(t: torch.Tensor) -> bool:
    """Whether ``t`` carries a vmap batch at any functorch level (under torch.func.grad a batched tensor
    is wrapped in a GradTrackingTensor, so the outer level alone can hide it)."""
    while _F.is_functorch_wrapped_tensor(t):
        if _F.is_batchedtensor(t):
            return True
        t = _F.get_unwrapped(t)
    return False


def plain_value(t: torch.Tensor) -> torch.Tensor | None:
    """The plain tensor under ``t``'s wrappers, or None if a vmap batch sits in between (no single value)."""
    while _F.is_functorch_wrapped_tensor(t):
        if _F.is_batchedtensor(t):
            return None
        t = _F.get_unwrapped(t)
    return t


def _interpreters() -> list[Any]:
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return list(retrieve_all_functorch_interpreters())


def differentiating_transforms() -> int:
    """How many torch.func grad/jvp transforms are active (vmap does not count)."""
    kinds = {"TransformType.Grad", "TransformType.Jvp"}
    return sum(str(i.key()) in kinds for i in _interpreters())


def grad_transforms_active() -> bool:
    """Whether a torch.func grad transform is active."""
    return any(str(i.key()) == "TransformType.Grad" for i in _interpreters())


def outside_transforms() -> bool:
    """Whether no functorch transform is active (a plain call; True on torch versions that cannot tell)."""
    peek = getattr(_F, "peek_interpreter_stack", None)  # (torch >= 2.1; else: as before)
    return peek is not None and peek() is None


def interpreter_stack() -> list[Any]:
    """The active transforms' interpreters, outermost first (``level.key()`` is a TransformType)."""
    return list(_F.get_interpreter_stack() or [])


def vmap_randomness_same(level: Any) -> bool:
    """Whether the vmap interpreter ``level`` draws once for its whole batch (randomness="same")."""
    return _F.CVmapInterpreterPtr(level).randomness() == _F.RandomnessType.Same


def layer_depth() -> int:
    """The depth of functorch's dynamic layer stack (to restore after a trace that raised inside a transform)."""
    return _F.get_dynamic_layer_stack_depth()


def restore_layer_depth(depth: int) -> None:
    """Pop functorch's dynamic layer stack back to ``depth`` if a failed trace left layers on it."""
    if _F.get_dynamic_layer_stack_depth() != depth:
        _F.pop_dynamic_layer_stack_and_undo_to_depth(depth)


def run_below_grad(fn: Any, tensors: list) -> list:
    """``fn(tensors)`` run one level below the innermost transform when that is a torch.func grad transform:
    the tensors enter unwrapped from its level and the results are wrapped back without a history there.

    A first-order backward that recomputes (Checkpointed) calls it: torch.func.grad runs backward with
    ``create_graph`` so that its work is recorded at the grad level, and a recomputation's activations then
    stay alive, held by the gradients' history, until the whole step ends (measured: checkpointing saved no
    memory under mixed_grad). Outside a grad transform, ``fn(tensors)`` as is."""
    top = _F.peek_interpreter_stack()
    if top is None or str(top.key()) != "TransformType.Grad":
        return fn(tensors)
    from torch._functorch.pyfunctorch import temporarily_pop_interpreter_stack

    level = _F.current_level()
    inner = [None if t is None else _F._unwrap_for_grad(t, level) for t in tensors]
    with temporarily_pop_interpreter_stack():
        results = fn(inner)
    return [None if r is None else _F._wrap_for_grad(r, level) for r in results]


def _metadata_op(name: str) -> Any:
    attr = getattr(torch.Tensor, name)
    # properties and C getset descriptors are dispatched to __torch_function__ as their __get__
    return attr.__get__ if isinstance(attr, property) or type(attr).__name__ == "getset_descriptor" else attr


# Tensor queries that read metadata only: a tensor passed to them is not "used" by a segment, and needs no
# tangent (the op seam, lazy seeding and the traceable engine's watch all read this one set).
METADATA_OPS = frozenset(
    _metadata_op(name)
    for name in ("size", "dim", "numel", "stride", "is_contiguous", "is_floating_point", "element_size",
                 "data_ptr", "__len__", "shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "layout",
                 "is_complex", "storage_offset")
)
