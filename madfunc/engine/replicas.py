"""The process group a transform reduces over (``mixed_grad``/``use_plan``'s ``process_group`` and
``reduction``), validated and resolved once per call; see ``_distributed`` for what is reduced."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch.distributed as dist

__all__ = ["Reduction", "Replicas", "check_options", "resolve"]

Reduction = Literal["mean", "sum"]


@dataclasses.dataclass(frozen=True)
class Replicas:
    """A resolved process group: the ranks whose gradients are reduced, and how (mean or sum)."""

    group: Any
    world_size: int
    reduction: str


def check_options(where: str, process_group: Any, reduction: Any) -> None:
    """Validate ``process_group``/``reduction`` types and values when the transform is built."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{where}(reduction=...): expected 'mean' or 'sum', got {reduction!r}.")
    if process_group is None or process_group == "world":
        return
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(
            f"{where}(process_group=...): expected a torch.distributed.ProcessGroup (e.g. dist.group.WORLD), "
            f"'world' or None, got {type(process_group).__name__} {process_group!r:.60}."
        )


def resolve(where: str, process_group: Any, reduction: str) -> Replicas | None:
    """The process group to reduce over, or None; refuses one that torch.distributed cannot use now."""
    check_options(where, process_group, reduction)
    if process_group is None:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{where}(process_group={process_group!r:.40}): torch.distributed is not initialised. Call "
            "torch.distributed.init_process_group(...) first on every rank (under torchrun: "
            "init_process_group('gloo') on CPU, 'nccl' on GPU), or drop process_group for one process."
        )
    group = dist.group.WORLD if process_group == "world" else process_group
    try:
        world_size = dist.get_world_size(group)
    except (RuntimeError, ValueError) as error:
        raise RuntimeError(
            f"{where}(process_group=...): this process group cannot be used ({error}); it was destroyed or "
            "this rank is not a member. Pass a live group that contains every rank, e.g. dist.group.WORLD."
        ) from error
    return Replicas(group, world_size, reduction)
