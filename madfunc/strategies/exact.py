"""``Exact``: forward mode with one basis tangent per differentiated scalar; the gradient is read off ``s``."""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Sequence

import torch

from madfunc.core.guards import EXACT_BASIS_BYTES, EXACT_WARN_TANGENTS, check_basis_size, warn_exact_cost
from madfunc.core.registry import REGISTRY
from madfunc.strategies.base import (
    EngineView,
    Meta,
    Passes,
    SegmentStats,
    Shared,
    Strategy,
    StrategyState,
    positive_int,
    zeros,
)
from madfunc.strategies.tangents import basis_block, group_leaves

__all__ = ["Exact"]

# Up to this many bytes of basis tangents, all of a segment's leaf groups are seeded at once (see push).
MERGED_BASIS_BYTES = 32 * 2**20
# Those bases depend only on shapes, dtypes and devices: the last few are kept (building them took ~5% of
# a small CNN's Exact step). Nothing writes to them: passes read tangents, and replayed graphs mutate nothing.
_BASES: collections.OrderedDict[tuple, tuple[list, int]] = REGISTRY.register(
    "exact.bases", collections.OrderedDict, "merged basis tangents by shapes")
_BASES_KEPT_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class ExactState(StrategyState):
    """Which differentiated inputs got basis tangents, in the order of ``s`` (None: all of them)."""

    read: tuple[int, ...] | None = None


NO_STATE = ExactState()  # every input read: s is the gradient


def _bases(tensors: Sequence[torch.Tensor], groups: list, nbytes: int) -> list:
    key = (tuple((tensors[j].shape, tensors[j].dtype, tensors[j].device) for which, _, _ in groups for j in which),
           tuple((tuple(which), tuple(group)) for which, group, _ in groups))
    found = _BASES.get(key)
    if found is not None:
        _BASES.move_to_end(key)
        return found[0]
    passes = [(which, basis_block(tensors, which, group, count)) for which, group, count in groups]
    _BASES[key] = (passes, nbytes)
    while sum(b for _, b in _BASES.values()) > _BASES_KEPT_BYTES:
        _BASES.popitem(last=False)
    return passes


@dataclasses.dataclass(frozen=True)
class Exact(Strategy, kind="exact", fields=("CHUNK",)):
    """Differentiate the segment exactly in forward mode, one basis tangent per differentiated scalar it reads.

    Inputs the body does not read (a segment handed a whole parameter dict that uses two of its entries)
    get exact zero gradients and no tangents: ``n``, the tangent count, counts the scalars read.

    Args:
        chunk_size: the most basis tangents pushed through the segment at once. It bounds the working
            memory of the forward pass (``chunk_size`` copies of the segment's activations, instead of
            one per differentiated scalar); the stored output tangents are not affected.
            ``None`` pushes all of one leaf's tangents at once. Default: ``None``.

    Examples:
        >>> import madfunc as mf
        >>> mf.Exact(chunk_size=64)
        Exact(chunk_size=64)
    """

    chunk_size: int | None = None

    def to_string(self) -> str:
        return "exact" if self.chunk_size is None else f"exact:{self.chunk_size}"

    @classmethod
    def _from_fields(cls, fields: list[str], where: str) -> Strategy:
        return cls(positive_int(fields[0], where, "CHUNK", "exact:CHUNK") if fields else None)

    def __post_init__(self) -> None:
        if self.chunk_size is not None:
            if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int):
                raise TypeError(
                    f"Exact(chunk_size=...): expected an int >= 1 or None, got "
                    f"{type(self.chunk_size).__name__} {self.chunk_size!r}."
                )
            if self.chunk_size < 1:
                raise ValueError(
                    f"Exact(chunk_size={self.chunk_size}): chunk_size must be >= 1 (or None for no chunking)."
                )

    def push(self, engine: EngineView, tensors: Sequence[torch.Tensor], diff_tensors: Sequence[torch.Tensor],
             n: int) -> tuple[Passes, StrategyState]:
        read = engine.read_inputs(tensors)
        leaves = [i for i, r in enumerate(read) if r]
        state = NO_STATE if len(leaves) == len(read) else ExactState(tuple(leaves))
        n = engine.stats.tangents = sum(diff_tensors[i].numel() for i in leaves)
        if n == 0 or (engine.measure and n > EXACT_WARN_TANGENTS):
            # Nothing read; or inspect(), which only needs the sizes: one plain pass, and what n tangents
            # would keep, predicted.
            engine.stats.predicted = n > 0
            return engine.plain_pass(tensors), state
        # Lazy seeding: one group of leaves at a time, so forward AD does no tangent work before the
        # group's first use; small leaves (biases) ride along with their neighbour (see group_leaves).
        groups = []
        for group in group_leaves([diff_tensors[i].numel() for i in leaves], self.chunk_size):
            which = [engine.diff[leaves[g]] for g, _, _ in group]
            count = sum(stop - start for _, start, stop in group)
            check_basis_size(engine.name, tensors, which, count)
            groups.append((which, group, count))
        basis_bytes = sum(count * tensors[j].numel() * tensors[j].element_size() for which, _, count in groups
                          for j in which)
        # Small bases are all built at once, so that the groups' passes replay as one recording (their
        # common primal work done once); big ones (chunk_size exists to bound memory) one group at a time.
        together = None
        if len(groups) > 1 and basis_bytes <= MERGED_BASIS_BYTES:
            together = [basis for _, basis in _bases(tensors, groups, basis_bytes)]
        passes = engine.push_groups(
            tensors, [(which, functools.partial(basis_block, tensors, which, group, count))
                      for which, group, count in groups], together,
        )
        warn_exact_cost(engine.name, n)  # after the passes: a refusal (check_basis_size) says more
        return passes, state

    def combine(self, engine: EngineView, state: StrategyState, s: torch.Tensor | None, meta: Sequence[Meta],
                shared: Shared | None = None) -> list[torch.Tensor | None]:
        if s is None or s.numel() == 0:  # no cotangent reached the outputs, or nothing to differentiate
            return zeros(meta)
        subset = getattr(state, "read", None)  # (an ExactState; None: every input was read)
        read = range(len(meta)) if subset is None else subset
        pieces = torch.split(s, [math.prod(meta[i][0]) for i in read])  # s_i is the i-th partial
        grads: list[torch.Tensor | None] = [None] * len(meta) if subset is None else zeros(meta)  # unread: 0
        for i, p in zip(read, pieces, strict=True):
            shape, dtype, _ = meta[i]
            grads[i] = p.reshape(shape).to(dtype)
        return grads

    def advice(self, stats: SegmentStats) -> list[str]:
        tangents = stats.tangents or 0
        if tangents <= EXACT_WARN_TANGENTS:
            return []
        return [
            f"Exact() pushes {tangents} tangents, about {tangents} forward passes of the segment "
            "(backprop: about 3)" + (" (not run by inspect: sizes predicted)" if stats.predicted else "")
            + "; Random(k) or Reverse() is far cheaper."
        ]

    @property
    def traceable(self) -> bool:
        return True

    def traced_tangents(self, name: str, leaves: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
        """One-hot basis tangents over all leaves at once (scale 1: ``s`` is the gradient)."""
        sizes = [t.numel() for t in leaves]
        n = sum(sizes)
        nbytes = n * sum(t.numel() * t.element_size() for t in leaves)
        if nbytes > EXACT_BASIS_BYTES:  # refused before allocating, as the default engine refuses (rather than OOM)
            raise MemoryError(
                f"segment {name!r}: traceable Exact() pushes all {n} basis tangents at once, {nbytes / 2**30:.1f} "
                "GiB for the tangents alone. Use Random(k) or Reverse() for a segment this large, or "
                "traceable=False, whose Exact() pushes them in chunks (Exact(chunk_size=...))."
            )
        eye = torch.eye(n, dtype=leaves[0].dtype, device=leaves[0].device)
        blocks = torch.split(eye, sizes, dim=1)
        return [b.reshape(n, *t.shape) for b, t in zip(blocks, leaves, strict=True)], 1.0
