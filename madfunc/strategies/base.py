"""The contract between a strategy and the engine, the base class ``Strategy``, and ``Reverse``.

A strategy is an immutable value (hashable, picklable, printable in the plan string form) that carries
its behaviour, so that no other module branches on its kind (the habit of optax's
``GradientTransformation`` and JAX's rule tables). A forward strategy answers, for one segment call:

* ``push(engine, tensors, diff_tensors, n) -> (passes, state)``: which tangents to push through the segment
  (the passes themselves are the engine's: ``engine`` is an :class:`EngineView`), and the per-call state it
  keeps for backward (a frozen dataclass, :class:`StrategyState`: threaded as optax threads its state);
* ``finish(engine, state, ydots) -> state``: after the passes, with the differentiated outputs' tangents;
* ``contract(engine, state, ydots, ybars) -> (s, state)``: the coefficients ``s`` from the output tangents
  and cotangents;
* ``combine(engine, state, s, meta, shared) -> grads``: the input gradients from ``s``;
* ``variance(stats)`` and ``advice(stats)``: the relative variance of one call (or None) and what
  ``inspect`` should flag, from the call's :class:`SegmentStats`.

A strategy never imports the engine or the call context: it sees only what :class:`EngineView` offers.
A new strategy is one module defining a subclass (its string kind registered by ``kind=``, its fields by
``fields=``), plus a row in ``tests/support/strategies.py``, the table every generic test runs over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import torch

from madfunc.strategies.kernels import combine_tangents, contract
from madfunc.strategies.tangents import draw_leaf

__all__ = [
    "KINDS", "StrategyState", "EngineView", "Meta", "Passes", "Reverse", "SegmentStats", "SeedRecord", "Shared",
    "Strategy", "positive_int", "zeros",
]

# The kinds of the string form (``"random:16:rademacher"`` -> Random), filled by Strategy subclasses.
KINDS: dict[str, type[Strategy]] = {}

Meta = tuple[torch.Size, torch.dtype, torch.device]  # a differentiated input's shape, dtype and device
# What a push returns: the primal outputs, the output tangents (one batch (T, *y.shape) per output) and the
# module buffers as the pass left them.
Passes = tuple[Sequence[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


@dataclasses.dataclass
class SegmentStats:
    """What one call of one segment did, for ``inspect`` and the variance laws (None: not recorded).

    The engine fills the sizes; a strategy may fill ``tangents``, ``predicted`` and its own fields.
    """

    differentiated_numel: int | None = None  # scalars the segment differentiates: those its body reads
    differentiated_per_argument: dict[str, int] | None = None  # the same, per argument (inspect)
    activation_numel: int | None = None  # of those, scalars of activation inputs (computed upstream)
    parameter_numel: int | None = None  # of those, scalars of parameters (Activity)
    per_example_numel: int | None = None  # activation scalars per example (Activity)
    output_numel: int | None = None  # differentiated output scalars
    tangents: int | None = None  # tangents pushed (forward passes, batched)
    saved_bytes: int | None = None  # kept for backward (None: could not be measured)
    # Checkpointed: what autograd saves while its backward recomputes the body (transient: freed by that backward)
    recompute_bytes: int | None = None
    predicted: bool = False  # sizes predicted, the passes not run (inspect of a costly Exact segment)
    fallbacks: list[str] | None = None  # ops routed to the double-vjp fallback


@dataclasses.dataclass(frozen=True)
class StrategyState:
    """Per-call state a strategy keeps between its forward passes and backward (subclass it, frozen)."""

    def kept(self) -> Sequence[torch.Tensor | None]:
        """Tensors kept for backward beyond the output tangents (counted in ``saved_bytes``)."""
        return ()


class Reduction(Protocol):
    """Records the gradients of parameters whose coefficients were reduced over ranks (engine/distributed)."""

    read: Sequence[bool]

    def record(self, grads: list[torch.Tensor | None]) -> None: ...


@dataclasses.dataclass(frozen=True)
class Shared:
    """Data parallelism: the coefficients ``s`` reduced over a process group, which parameters take."""

    s: torch.Tensor  # the reduced coefficients
    params: Sequence[bool]  # per differentiated input: a parameter (takes ``s``) or an activation (its own)
    reduction: Reduction  # told the gradients ``combine`` returns


@dataclasses.dataclass(frozen=True)
class SeedRecord:
    """One segment call's gradient of one input, deferred: ``sum_j coef_j v_j``, with the tangents ``v``
    (``k`` of them, shape ``(k, *shape)``) drawn again from the call's ``seed`` and the leaf's stream ``index``.

    What a seed-fused optimizer (``madfunc.optim``) keeps instead of a gradient: ``k`` scalars and a seed.
    ``coef`` is already scaled (``s / k`` for ``Random``); None: the segment did not read the input (an
    exact zero gradient, which still counts as a gradient for weight decay and momentum).
    """

    seed: int
    index: int  # the leaf's stream among the call's differentiated inputs (tangents.leaf_seed)
    distribution: str
    k: int
    coef: torch.Tensor | None  # (k,), or None: an exact zero
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    def gradient(self) -> torch.Tensor:
        """The gradient itself: one leaf's ``k`` tangents exist while it is built (and become it when k = 1)."""
        if self.coef is None:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        v = draw_leaf(self.distribution, self.k, self.shape, self.dtype, self.device, self.seed, self.index)
        return combine_tangents(self.coef, v, self.dtype, reuse=True)


class EngineView(Protocol):
    """What the engine offers a strategy during one segment call (``madfunc.engine.runner.Engine``)."""

    # Read-only to a strategy (properties, so that the engine's plain attributes, lists among them, match).
    @property
    def name(self) -> str: ...  # the segment's name (for messages)
    @property
    def seed(self) -> int | None: ...  # the call's tangent seed (stochastic strategies), else None
    @property
    def diff(self) -> Sequence[int]: ...  # indices of the differentiated tensors among ``tensors``
    @property
    def used(self) -> Sequence[bool]: ...  # per differentiated tensor: read by the body (after a watched push
    # or read_inputs; all True before)
    @property
    def activation(self) -> Sequence[bool]: ...  # per differentiated tensor: computed upstream (an activation)
    @property
    def stats(self) -> SegmentStats: ...  # its fields a strategy may fill
    @property
    def measure(self) -> bool: ...  # inspect: a costly strategy may predict its sizes instead of running
    @property
    def data_parallel(self) -> bool: ...  # under a process group (coefficients are reduced over ranks in backward)
    @property
    def identity(self) -> tuple: ...  # what the body is (name, function, owner): a key for per-segment caches

    def begin_pass(self) -> None:
        """Call before each push: every pass starts from the RNG state of the first."""
        ...

    def push(self, tensors: Sequence[torch.Tensor], which: Sequence[int], tangents: Sequence[torch.Tensor], *,
             watch: bool = False, check: bool = True) -> Passes:
        """One pass: tangent batches ``tangents`` seeded on ``tensors[which]``; ``watch``: record which the body
        reads (into ``used``); ``check``: look closer at all-zero output tangents."""
        ...

    def push_groups(self, tensors: Sequence[torch.Tensor],
                    groups: Sequence[tuple[Sequence[int], Callable[[], Sequence[torch.Tensor]]]],
                    together: Sequence[Sequence[torch.Tensor]] | None = None) -> Passes:
        """Several passes, one per group ``(which, make_tangents)``, their output tangents concatenated; with
        ``together`` (the groups' tangents built already), recorded and replayed as one."""
        ...

    def push_lazy(self, tensors: Sequence[torch.Tensor], device: torch.device, k: int,
                  make: Callable[[int, torch.Tensor], torch.Tensor]) -> Passes | None:
        """One pass of ``k`` tangents per input, ``make(index, input)``, seeded where each input is first used
        (so at most one input's tangents exist at once); None if the segment does not allow it."""
        ...

    def read_inputs(self, tensors: Sequence[torch.Tensor]) -> Sequence[bool]:
        """Per differentiated tensor, whether the body reads it (remembered per segment, or found by one plain
        pass; the call's first eager pass checks it and runs the segment again if it reads more). ``used``
        becomes this answer, and ``n`` in the stats counts the tensors read. Unread ones need no tangents:
        their gradients are exact zeros."""
        ...

    def plain_pass(self, tensors: Sequence[torch.Tensor]) -> Passes:
        """One pass without tangents (empty output tangents)."""
        ...

    def perturbed_pass(self, tensors: Sequence[torch.Tensor],
                       perturb: Callable[[int, torch.Tensor], torch.Tensor] | None,
                       at_use: bool = True, watch: bool = False) -> tuple[Sequence[torch.Tensor], list[torch.Tensor]]:
        """One pass without tangents, differentiated input ``i`` replaced by ``perturb(i, input)`` (``None``: as
        it is) where an op uses it (``at_use``: one perturbed input exists at a time) or on entry; ``watch``:
        record which inputs the body reads (into ``used``). Returns the outputs and the module buffers it left."""
        ...

    def arguments(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
        """The segment's ``(args, kwargs)`` with its argument tensors replaced by ``tensors``."""
        ...


class Strategy:
    """Base class of the strategies that differentiate one segment.

    Subclass it as a frozen dataclass; ``kind=`` registers its name(s) in the plan string form and
    ``fields=`` the ``:`` fields after the kind (``random:K:DISTRIBUTION:SEEDING``); both also feed the
    string syntax in errors and the CLI help. See the README, "Writing a strategy".
    """

    __slots__ = ()
    _FIELDS: ClassVar[tuple[str, ...]] = ()  # the ':' fields its string form may have after the kind
    _KINDS: ClassVar[tuple[str, ...]] = ()  # its names in the string form
    is_forward: ClassVar[bool] = True  # whether a segment under it runs in forward mode
    # Whether a segment under it runs in reverse mode keeping only its inputs, its body recomputed in backward
    # (``Checkpointed``; engine/checkpoint.py). Such a strategy is not ``is_forward``.
    recomputes: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False  # whether its estimate depends on random tangents (drawn from a seed)
    # Whether its k coefficients, reduced over ranks, give the parameters' gradient (engine/distributed's
    # scalar scheme): true only where the tangents of parameters are the same on every rank.
    shares_coefficients: ClassVar[bool] = False
    # Whether each rank of torch.distributed draws its own tangents (per-example ones: N ranks of B examples
    # then estimate like one process with N*B examples); otherwise every rank draws the same ones.
    per_rank_tangents: ClassVar[bool] = False

    def __init_subclass__(cls, kind: str | tuple[str, ...] = (), fields: tuple[str, ...] | None = None,
                          **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names = (kind,) if isinstance(kind, str) else tuple(kind)
        if names:
            cls._KINDS = names
        if fields is not None:
            cls._FIELDS = tuple(fields)
        for name in names:
            KINDS[name.lower()] = cls

    @classmethod
    def syntax(cls) -> str:
        """The string forms of the class, e.g. ``"random[:K[:DISTRIBUTION[:SEEDING]]]"`` ("" if it has none)."""
        if not cls._KINDS:
            return ""
        tail = "".join(f"[:{f}" for f in cls._FIELDS) + "]" * len(cls._FIELDS)
        return " | ".join(f"{kind}{tail}" for kind in cls._KINDS)

    def to_string(self) -> str:
        """The strategy in the string form that ``parse_strategy`` reads back, e.g. ``"random:16:rademacher"``."""
        if not self._KINDS:
            raise TypeError(f"{self!r} has no string form; build plans with it in Python.")
        values = [getattr(self, f.lower()) for f in self._FIELDS] if self._FIELDS else []
        return ":".join([self._KINDS[0], *(str(v) for v in values)])

    def __str__(self) -> str:
        return self.to_string()

    @classmethod
    def _from_fields(cls, fields: list[str], where: str) -> Strategy:
        """Build the strategy from the (at most ``len(_FIELDS)``) fields after its kind in the string form.

        The default reads each field as an integer (``positive_int``) in the order of ``_FIELDS``, passed as
        the keyword argument of the same name in lower case."""
        values = {f.lower(): positive_int(text, where, f, ":".join((cls._KINDS[0], *cls._FIELDS)))
                  for f, text in zip(cls._FIELDS, fields, strict=False)}
        return cls(**values)

    # -- behaviour of forward strategies (the engine calls these) -----------------------------------
    def push(self, engine: EngineView, tensors: Sequence[torch.Tensor], diff_tensors: Sequence[torch.Tensor],
             n: int) -> tuple[Passes, StrategyState]:
        """Run the segment's passes (``engine.push`` and friends); return them and the per-call state."""
        raise NotImplementedError(f"{type(self).__name__} is not a forward strategy")

    def finish(self, engine: EngineView, state: StrategyState, ydots: Sequence[torch.Tensor]) -> StrategyState:
        """After the forward passes, with the differentiated outputs' tangents (default: nothing)."""
        return state

    def contract(self, engine: EngineView, state: StrategyState, ydots: Sequence[torch.Tensor],
                 ybars: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor | None, StrategyState]:
        """The coefficients ``s`` (one per tangent) of the output tangents against the cotangents."""
        return contract(ydots, ybars), state

    def combine(self, engine: EngineView, state: StrategyState, s: torch.Tensor | None, meta: Sequence[Meta],
                shared: Shared | None = None) -> list[torch.Tensor | None]:
        """The gradients of the differentiated inputs (shapes, dtypes, devices in ``meta``) from ``s``;
        ``shared``: under a process group, the coefficients reduced over ranks that parameters take."""
        raise NotImplementedError(f"{type(self).__name__} is not a forward strategy")

    def seed_records(self, engine: EngineView, state: StrategyState, s: torch.Tensor | None, meta: Sequence[Meta],
                     shared: Shared | None = None) -> list[SeedRecord | None] | None:
        """What ``combine`` would return, deferred (for a seed-fused optimizer, ``madfunc.optim``): per input a
        :class:`SeedRecord`, or None where ``combine`` gives None; None for the whole call where the strategy's
        gradient is not ``sum_j c_j v_j`` with ``v`` regenerable leaf by leaf (the default: the engine then
        calls ``combine`` and the optimizer reads ``p.grad``)."""
        return None

    def variance(self, stats: SegmentStats) -> float | None:
        """``E||g^ - g||^2 / ||g||^2`` of one call of a stochastic strategy with these ``stats``, or None if
        it is not determined by the sizes alone (asked only when ``stochastic``)."""
        return None

    def advice(self, stats: SegmentStats) -> list[str]:
        """What ``inspect`` flags about one call of a segment under this strategy."""
        return []

    # -- the traceable engine (mixed_grad(traceable=True)) --------------------------------------------
    @property
    def traceable(self) -> bool:
        """Whether ``traced_tangents`` gives this strategy's estimator as plain torch code."""
        return False

    def traced_tangents(self, name: str, leaves: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
        """Tangents ``(T, *leaf.shape)`` per leaf drawn with plain torch ops, and the scale of
        ``sum_j s_j v_j`` (the traceable form of the estimate; see engine/traced.py)."""
        raise NotImplementedError(f"{type(self).__name__} has no traceable form")


@dataclasses.dataclass(frozen=True)
class Reverse(Strategy, kind=("rev", "reverse"), fields=()):
    """Differentiate the segment by ordinary backpropagation (reverse mode).

    Examples:
        >>> import madfunc as mf
        >>> mf.Reverse()
        Reverse()
    """

    is_forward: ClassVar[bool] = False



def zeros(meta: Sequence[Meta]) -> list[torch.Tensor | None]:
    """Exact zero gradients (no cotangent reached the outputs, or nothing to differentiate)."""
    return [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in meta]


def positive_int(text: str, where: str, what: str, usage: str) -> int:
    """A string-form field that must be an integer >= 1."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError(f"{where}: {usage}: {what} must be an integer >= 1, got {text!r}.")
    return int(text)
