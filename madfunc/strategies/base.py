"""The interface every strategy implements, and ``Reverse``.

A strategy is an immutable value (hashable, picklable, printable in the plan string form) that also
carries its behaviour, so that no other module branches on its kind (the habit of optax's
``GradientTransformation`` and JAX's rule tables). A forward strategy answers five questions for the
engine and the diagnostics:

* ``push(engine, tensors, diff_tensors, n)``: which tangents to push through the segment (the passes
  themselves are the engine's);
* ``contract(engine, ydots, ybars)``: the coefficients ``s`` from the output tangents and cotangents;
* ``combine(engine, s, meta, s_shared, shared)``: the input gradients from ``s``;
* ``variance(stats)``: the theoretical relative variance ``E||g^ - g||^2 / ||g||^2`` of one call, or None;
* ``advice(stats)``: what ``inspect`` should flag about a call.

A new strategy is one module defining a subclass (its string kind is registered by ``kind=``), plus a
row in ``tests/strategies.py``, the table every generic test runs over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from madfunc.strategies.kernels import contract

__all__ = ["KINDS", "Reverse", "Strategy"]

# The kinds of the string form (``"random:16:rademacher"`` -> Random), filled by Strategy subclasses.
KINDS: dict[str, type[Strategy]] = {}


class Strategy:
    """Base class of the differentiation strategies of a segment."""

    __slots__ = ()
    _FIELDS: ClassVar[tuple[str, ...]] = ()  # the ':' fields its string form may have after the kind
    is_forward: ClassVar[bool] = True  # whether a segment under it runs in forward mode
    stochastic: ClassVar[bool] = False  # whether its estimate depends on random tangents (drawn from a seed)
    # Whether its k coefficients, reduced over ranks, give the parameters' gradient (_distributed's scalar
    # scheme): true only where the tangents of parameters are the same on every rank.
    shares_coefficients: ClassVar[bool] = False
    # Whether each rank of torch.distributed draws its own tangents (per-example ones: N ranks of B examples
    # then estimate like one process with N*B examples); otherwise every rank draws the same ones.
    per_rank_tangents: ClassVar[bool] = False

    def __init_subclass__(cls, kind: str | tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in (kind,) if isinstance(kind, str) else kind:
            KINDS[name] = cls

    def to_string(self) -> str:
        """The strategy in the string form that :func:`parse_strategy` reads back, e.g. ``"random:16:rademacher"``."""
        raise TypeError("Strategy is abstract; use Reverse(), Exact(), Random(...), Activity(...) or Guessed(...).")

    def __str__(self) -> str:
        return self.to_string()

    @classmethod
    def _from_fields(cls, fields: list[str], where: str) -> Strategy:
        """Build the strategy from the (at most ``len(_FIELDS)``) fields after its kind in the string form."""
        raise ValueError(f"{where}: {cls.__name__} has no string form; build it in Python.")

    # -- behaviour of forward strategies (the engine calls these) -----------------------------------
    def push(self, engine: Any, tensors: Sequence[torch.Tensor], diff_tensors: Sequence[torch.Tensor], n: int):
        """Run the segment's passes (``engine.push``, ``_lazy.push_lazy``) and return ``(ys, ydots, buffers)``."""
        raise NotImplementedError(f"{type(self).__name__} is not a forward strategy")

    def finish(self, engine: Any, ydots: Sequence[torch.Tensor]) -> None:
        """After the forward passes, with the differentiated outputs' tangents: keep what backward needs in
        ``engine.notes`` (default: nothing)."""

    def contract(self, engine: Any, ydots: Sequence[torch.Tensor], ybars: Sequence[torch.Tensor | None]):
        """The coefficients ``s`` (one per tangent) of the output tangents against the cotangents."""
        return contract(ydots, ybars)

    def combine(
        self,
        engine: Any,
        s: torch.Tensor | None,
        meta: Sequence[tuple[torch.Size, torch.dtype, torch.device]],
        s_shared: torch.Tensor | None = None,
        shared: Sequence[bool] = (),
    ) -> list[torch.Tensor]:
        """The gradients of the differentiated inputs (shapes, dtypes, devices in ``meta``) from ``s``."""
        raise NotImplementedError(f"{type(self).__name__} is not a forward strategy")

    def variance(self, stats: Mapping[str, Any]) -> float | None:
        """``E||g^ - g||^2 / ||g||^2`` of one call of a stochastic strategy with these ``stats``, or None if
        it is not determined by the sizes alone (asked only when ``stochastic``)."""
        return None

    def advice(self, stats: Mapping[str, Any]) -> list[str]:
        """What ``inspect`` flags about one call of a segment under this strategy."""
        return []


@dataclasses.dataclass(frozen=True)
class Reverse(Strategy, kind=("rev", "reverse")):
    """Differentiate the segment by ordinary backpropagation (reverse mode).

    Examples:
        >>> import madfunc as mf
        >>> mf.Reverse()
        Reverse()
    """

    is_forward: ClassVar[bool] = False

    def to_string(self) -> str:
        return "rev"

    @classmethod
    def _from_fields(cls, fields: list[str], where: str) -> Strategy:
        return cls()


def zeros(meta: Sequence[tuple[torch.Size, torch.dtype, torch.device]]) -> list[torch.Tensor]:
    """Exact zero gradients (no cotangent reached the outputs, or nothing to differentiate)."""
    return [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in meta]


def positive_int(text: str, where: str, what: str, usage: str) -> int:
    """A string-form field that must be an integer >= 1."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError(f"{where}: {usage}: {what} must be an integer >= 1, got {text!r}.")
    return int(text)

