"""What can go wrong inside one tangent pass, and how the engine recovers instead of failing or lying.

- An op whose forward rule silently yields *no* tangent (a ``torch.library.custom_op`` with only a
  backward, a kernel without forward-mode support) would contract as zeros: PyTorch's jvp fills the
  missing tangent with zeros. After every pass, an output whose tangents are all exactly zero
  (``all_zero_tangents``) sends the body through once more under ``OpRules(strict=True)``, which finds the
  top-level op whose subtree dropped a tangent and routes it to the double-vjp fallback from then on,
  and the segment runs again from the start (``Retry``). An output whose zeros are real is remembered.
- An op that ``vmap`` cannot batch: the pass is run again one tangent at a time (``loop``), slower but
  right, with a ``PerformanceWarning`` naming the segment.
- vmap's own "performance drop ... batching rule" warnings name no segment: they are collected and
  re-issued once per segment and op as a ``PerformanceWarning`` (``batching_warnings``).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Sequence
from collections.abc import Set as AbstractSet

import torch

from madfunc.core.checks import ForwardModeError
from madfunc.core.functorch import is_batched
from madfunc.core.guards import PerformanceWarning
from madfunc.core.registry import REGISTRY
from madfunc.ops.rules import OpFailed

__all__ = [
    "BARE", "Bare", "Retry", "all_zero_tangents", "batching_warnings", "diagnosed", "vmap_may_be_at_fault", "warn_loop",
]

# (key, output index) pairs whose all-zero tangents were diagnosed as real (no op dropped them), so later
# calls need not diagnose again; the key names segment, function and seeded inputs (Engine._zero_key).
_INDEPENDENT: set[tuple[tuple, int]] = REGISTRY.register(
    "passes.real_zeros", set, "outputs whose all-zero tangents were diagnosed as real")
_warned: set[tuple[str, str]] = REGISTRY.register("passes.warned", set, "batching warnings given")


class Retry(Exception):  # noqa: N818 - control flow inside the engine, never seen by users
    """A pass learned that an op drops tangents (now routed to the fallback): run the segment again."""


def _differentiable(t: object) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


def all_zero_tangents(key: tuple, ys: Sequence[torch.Tensor], ydots: Sequence[torch.Tensor]) -> list[int]:
    """Outputs whose tangents are all exactly zero, not yet known to be independent of the seeded inputs.

    PyTorch's jvp fills a missing tangent with zeros, so a dropped tangent always looks like this; a real
    one almost never does. One reduction per output, outside the vmap: cheap next to the pass itself.
    """
    return [
        i
        for i, (y, d) in enumerate(zip(ys, ydots, strict=True))
        if _differentiable(y) and d.numel() and (key, i) not in _INDEPENDENT
        and not is_batched(d) and not _any_nonzero(d)
    ]


def _any_nonzero(d: torch.Tensor) -> bool:
    # any() has no CUDA kernel for complex32 ("or_cuda" not implemented for 'ComplexHalf'); != 0 has one for
    # every dtype (and, unlike view_as_real, takes conjugated views). Real tangents keep the one-kernel any().
    return bool((d != 0).any()) if d.is_complex() else bool(d.any())


def diagnosed(key: tuple, suspicious: Sequence[int], learned: AbstractSet[str]) -> None:
    """Inside the diagnostic pass (the body under ``OpRules(strict=True)``, at its jvp level): conclude.

    If the strict mode routed ops that dropped tangents (``learned``), the segment must run again: ``Retry``.
    If not, the suspicious outputs' zeros are real (no tangent flows there, or a zero derivative, such as
    T5's relative position bias for every leaf but its own table): remembered, so that later calls do not
    look again, and the pass stands. (The diagnosis started from the RNG and Python state of the call's
    entry and updated copies of the buffers, like every pass, so it changed nothing the next pass sees.)
    Not a Retry: a segment with many leaf groups, each with its own real zeros, would otherwise run out of
    attempts, and restart from its first group each time.
    """
    if not learned:
        _INDEPENDENT.update((key, i) for i in suspicious)
        return
    raise Retry(key[0])


@contextlib.contextmanager
def batching_warnings(name: str) -> Iterator[None]:
    """Re-issue vmap's warnings about ops without a batching rule as one PerformanceWarning per segment
    and op; pass every other warning on unchanged (to the filters in force outside)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        match = re.search(r"batching rule for (\S+?)\.? ", str(w.message))
        if match is None or "performance drop" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
            continue
        op = match.group(1)
        if (name, op) in _warned:
            continue
        _warned.add((name, op))
        warnings.warn(
            f"segment {name!r}: vmap has no batching rule for {op}, so PyTorch runs that op once per tangent "
            "(correct, slower). Fine for a few tangents; for many, Random(k) with a small k is cheaper.",
            PerformanceWarning,
            stacklevel=4,
        )


def warn_loop(name: str, count: int, error: BaseException) -> None:
    """The segment's tangents are pushed one at a time because vmap failed on its body."""
    key = (name, "<loop>")
    if key in _warned:
        return
    _warned.add(key)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    warnings.warn(
        f"segment {name!r}: torch.func.vmap cannot batch its body ({first[:200]}), so its {count} tangents "
        "are pushed one pass at a time (correct, about that many times slower). Random(k=1) or "
        "Exact(chunk_size=1) avoids vmap altogether.",
        PerformanceWarning,
        stacklevel=4,
    )


class Bare:
    """Stands in for OpRules in a pass that runs without the op seam (see Engine._push)."""

    used: frozenset = frozenset()
    fallbacks: frozenset = frozenset()
    learned: frozenset[str] = frozenset()
    touched = False

    def __enter__(self) -> Bare:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


BARE = Bare()


def vmap_may_be_at_fault(error: BaseException) -> bool:
    """Whether a failed vmapped pass is worth one more try without vmap (not our own refusals)."""
    if isinstance(error, OpFailed):  # it may be vmap that made the op fail: one tangent at a time may work
        return True
    return not isinstance(error, (ForwardModeError, FloatingPointError)) and "segment '" not in str(error)
