"""``Random``: forward gradients from ``k`` random tangents on every differentiated input (weight
perturbation, Baydin et al. 2022), regenerated from one seed in backward instead of being kept."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from madfunc.core.autocast import without_autocast
from madfunc.core.checks import _common_device
from madfunc.strategies.base import (
    EngineView,
    Meta,
    Passes,
    SeedRecord,
    SegmentStats,
    Shared,
    Strategy,
    StrategyState,
    positive_int,
    zeros,
)
from madfunc.strategies.kernels import accumulation_dtype, combine_tangents, contract
from madfunc.strategies.tangents import DISTRIBUTIONS, draw_leaf, draw_tangents

__all__ = ["LAZY_SEEDING_BYTES", "SEEDINGS", "Random", "RandomState", "check_distribution", "seed_records"]

SEEDINGS = ("auto", "lazy", "eager", "kept")
# Random tangents this large (k x the differentiated inputs) are seeded lazily, where each leaf is first
# used, so that they need not all exist at once: memory then stops growing with the number of leaves
# (benchmarks/RESULTS.md, target 5). Below it, eager seeding is faster: lazy seeding costs an extra
# pass over every leaf (the seeding op) and a Python hook on every op of the segment.
LAZY_SEEDING_BYTES = 32 * 2**20


def check_distribution(owner: str, distribution: str, seeding: str, k: int) -> None:
    """The constructor checks Random and its per-example variants share (errors name ``owner``)."""
    if seeding not in SEEDINGS:
        raise ValueError(
            f"{owner}(seeding={seeding!r}): unknown seeding; expected one of {', '.join(repr(s) for s in SEEDINGS)}."
        )
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{owner}(k=...): expected an int >= 1, got {type(k).__name__} {k!r}.")
    if k < 1:
        raise ValueError(f"{owner}(k={k}): k must be >= 1 (it is the number of random tangents).")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"{owner}(distribution={distribution!r}): unknown distribution; expected one of "
            f"{', '.join(repr(d) for d in DISTRIBUTIONS)}."
        )


def parse_random_fields(fields: list[str], where: str, kind: str) -> tuple[int, str, str]:
    """``K``, ``DISTRIBUTION``, ``SEEDING`` of a ``kind:K:DISTRIBUTION:SEEDING`` string form."""
    k = positive_int(fields[0], where, "K", f"{kind}:K") if fields else 1
    distribution = fields[1].lower() if len(fields) >= 2 else "gaussian"
    if distribution not in DISTRIBUTIONS:
        valid = ", ".join(DISTRIBUTIONS)
        raise ValueError(f"{where}: unknown distribution {distribution!r}; valid distributions: {valid}.")
    seeding = fields[2].lower() if len(fields) >= 3 else "auto"
    if seeding not in SEEDINGS:
        raise ValueError(f"{where}: unknown seeding {seeding!r}; valid seedings: {', '.join(SEEDINGS)}.")
    return k, distribution, seeding


@dataclasses.dataclass(frozen=True)
class RandomState(StrategyState):
    """What a ``Random`` (or ``Activity``) call keeps for backward."""

    tangents: tuple[torch.Tensor, ...] | None = None  # seeding="kept": the forward pass's own tangents
    drawn: tuple[torch.Tensor, ...] | None = None  # drawn up front: finish may contract them now
    contracted: tuple[torch.Tensor | None, ...] | None = None  # U = V^T Ydot per leaf (see Random.finish)
    acc: torch.dtype | None = None  # the dtype of ``contracted``
    ybar: torch.Tensor | None = None  # the cotangent, flattened, when ``contracted`` is used

    def kept(self) -> Sequence[torch.Tensor | None]:
        return [*(self.tangents or ()), *(self.contracted or ())]


def push_random(strategy: Any, engine: EngineView, tensors: Sequence[torch.Tensor],
                diff_tensors: Sequence[torch.Tensor], keep_drawn: bool = False) -> tuple[Passes, RandomState]:
    """The passes of ``k`` random tangents on every differentiated input: lazily seeded when they are
    large (and the distribution can be drawn leaf by leaf), else drawn up front (and, with ``keep_drawn``,
    left in the state's ``drawn`` for ``Random.finish``)."""
    k, distribution = strategy.k, strategy.distribution
    engine.stats.tangents = k
    device = _common_device(engine.name, diff_tensors)
    tangent_bytes = k * sum(t.numel() * t.element_size() for t in diff_tensors)
    seeding = strategy.seeding
    lazy_wanted = seeding == "lazy" or (seeding == "auto" and tangent_bytes >= LAZY_SEEDING_BYTES)
    seed = engine.seed
    assert seed is not None  # (a stochastic strategy's call always has one)
    if DISTRIBUTIONS[distribution].draw is not None and lazy_wanted:
        engine.begin_pass()

        def make(index: int, leaf: torch.Tensor) -> torch.Tensor:
            return draw_leaf(distribution, k, leaf.shape, leaf.dtype, device, seed, index)

        lazy = engine.push_lazy(tensors, device, k, make)
        if lazy is not None:
            return lazy, RandomState()
    shapes, dtypes = [t.shape for t in diff_tensors], [t.dtype for t in diff_tensors]
    tangents = tuple(draw_tangents(distribution, k, shapes, dtypes, device, seed))
    state = RandomState(tangents=tangents if seeding == "kept" else None,  # backward reuses them
                        drawn=tangents if keep_drawn else None)
    engine.begin_pass()
    return engine.push(tensors, engine.diff, tangents, watch=True), state


def regenerate(strategy: Any, seed: int, meta: Sequence[tuple], used: Sequence[bool], device: torch.device,
               kept: Sequence[torch.Tensor] | None = None):
    """The tangents of every used leaf again (None for unused ones), one leaf at a time where the
    distribution allows (each leaf has its own stream), so at most one leaf's tangents exist at once;
    ``kept``: the tangents the forward pass kept (``seeding="kept"``)."""
    k, distribution = strategy.k, strategy.distribution
    if kept is not None:  # seeding="kept": the forward pass's own tangents
        yield from (v if u else None for v, u in zip(kept, used, strict=True))
        return
    if DISTRIBUTIONS[distribution].draw is None:  # orthogonal jointly over all leaves: drawn together
        drawn = draw_tangents(distribution, k, [m[0] for m in meta], [m[1] for m in meta], device, seed)
        yield from (v if u else None for v, u in zip(drawn, used, strict=True))
        return
    for index, ((shape, dtype, _), u) in enumerate(zip(meta, used, strict=True)):
        yield draw_leaf(distribution, k, shape, dtype, device, seed, index) if u else None


def seed_records(strategy: Any, engine: EngineView, s: torch.Tensor | None, meta: Sequence[Meta],
                 shared: Shared | None, scale: float) -> list[SeedRecord | None] | None:
    """The deferred form of ``combine`` for a gradient ``scale * sum_j s_j v_j`` with ``v`` drawn leaf by leaf
    from the call's seed (``Strategy.seed_records``): the same coefficients ``combine`` uses (under a process
    group, parameters take the reduced ``shared.s``, activations this rank's ``s``; a parameter the segment
    did not read gets None), no tangent drawn. None for ``"orthogonal"`` (drawn jointly over all leaves)."""
    distribution = strategy.distribution
    if DISTRIBUTIONS[distribution].draw is None:
        return None
    seed = engine.seed
    assert seed is not None  # (a stochastic strategy's call always has one)
    if shared is not None:
        s = torch.zeros_like(shared.s) if s is None else s
    elif s is None or s.numel() == 0:  # no cotangent reached the outputs: exact zeros
        s = None
    local = None if s is None else s.detach() * scale
    coefs = [local] * len(meta)
    unread = [False] * len(meta)
    if shared is not None:
        coefs = [shared.s.detach() * scale if p else local for p in shared.params]
        unread = [bool(p) and not r for p, r in zip(shared.params, shared.reduction.read, strict=True)]
    return [
        None if skip
        else SeedRecord(seed, index, distribution, strategy.k, coef if used else None, shape, dtype, device)
        for index, (coef, (shape, dtype, device), used, skip) in enumerate(
            zip(coefs, meta, engine.used, unread, strict=True)
        )
    ]


class RandomFields:
    """The printed and string forms of a strategy with fields ``k``, ``distribution`` and ``seeding`` (the
    default seeding left out): ``Random(k=16, distribution='rademacher')``, ``random:16:rademacher``."""

    k: int
    distribution: str
    seeding: str
    _KINDS: tuple[str, ...]

    def __repr__(self) -> str:
        extra = "" if self.seeding == "auto" else f", seeding={self.seeding!r}"
        return f"{type(self).__name__}(k={self.k}, distribution={self.distribution!r}{extra})"

    def to_string(self) -> str:
        extra = "" if self.seeding == "auto" else f":{self.seeding}"
        return f"{self._KINDS[0]}:{self.k}:{self.distribution}{extra}"


@dataclasses.dataclass(frozen=True, repr=False)  # (RandomFields prints it)
class Random(RandomFields, Strategy, kind="random", fields=("K", "DISTRIBUTION", "SEEDING")):
    """Estimate the segment's gradient in forward mode from ``k`` random tangents (forward gradients).

    The estimate is ``(1/k) sum_j (J v_j . ybar) v_j`` with ``E[v v^T] = I``, hence unbiased
    (Baydin et al. 2022, arXiv 2202.08587). Its relative mean squared error
    ``E||g^ - g||^2 / ||g||^2`` is ``(n+1)/k`` for ``"gaussian"``, ``(n-1)/k`` for ``"rademacher"`` and ``n/k - 1`` for
    ``"orthogonal"``, where ``n`` is the number of scalars the segment differentiates. Every differentiated
    input, parameters and activations alike, gets the same ``k`` directions for the whole batch (weight
    perturbation); :class:`Activity` perturbs activations per example instead.

    Args:
        k: number of tangents (forward passes, batched). Default: ``1``.
        distribution: ``"gaussian"`` (standard normal entries), ``"rademacher"`` (random signs) or
            ``"orthogonal"`` (``k`` random orthonormal directions scaled by ``sqrt(n)``; needs
            ``k <= n`` and gives the exact gradient at ``k == n``). Default: ``"gaussian"``.
        seeding: when the tangents are drawn. ``"eager"`` draws all ``k`` tangents of every leaf on
            entry to the segment (fastest; they all exist during its forward pass). ``"lazy"`` draws
            each leaf's tangents where an op first uses the leaf and drops them after it, so at most
            one leaf's tangents exist at a time (least memory; costs about two extra passes over the
            tangents). ``"kept"`` draws them eagerly and keeps them for backward instead of drawing
            them again from the seed (fastest, for small segments: it keeps ``k x n`` scalars, which
            ``inspect`` counts). ``"auto"`` is lazy when the ``k`` tangents of all leaves exceed 32 MiB,
            else eager. ``"orthogonal"`` tangents are always drawn eagerly (they are orthogonal jointly
            over all leaves). The gradient estimate is the same either way (up to float rounding).
            Default: ``"auto"``. Tangents drawn up front (``"eager"``, ``"kept"``, ``"orthogonal"``) of a
            segment with at most ``k`` output entries (a loss) are contracted with the output tangents
            at the end of its forward pass, keeping ``n x m`` numbers for backward instead of drawing
            them again (or keeping ``k x n``).

    Examples:
        >>> import madfunc as mf
        >>> mf.Random(k=16, distribution="rademacher")
        Random(k=16, distribution='rademacher')
    """

    k: int = 1
    distribution: str = "gaussian"
    seeding: str = "auto"
    stochastic: ClassVar[bool] = True
    shares_coefficients: ClassVar[bool] = True

    @classmethod
    def _from_fields(cls, fields: list[str], where: str) -> Strategy:
        return cls(*parse_random_fields(fields, where, "random"))

    def __post_init__(self) -> None:
        check_distribution("Random", self.distribution, self.seeding, self.k)

    def push(self, engine: EngineView, tensors: Sequence[torch.Tensor], diff_tensors: Sequence[torch.Tensor],
             n: int) -> tuple[Passes, StrategyState]:
        if DISTRIBUTIONS[self.distribution].draw is None and self.k > n:
            raise ValueError(
                f"segment {engine.name!r}: Random(k={self.k}, distribution={self.distribution!r}) needs k <= n, "
                f"the number of differentiated scalars, which is {n}; use k <= {n} (k == {n} is exact)."
            )
        return push_random(self, engine, tensors, diff_tensors, keep_drawn=True)

    @without_autocast  # U is a product of tangents: in float32 even inside an autocast block
    def finish(self, engine: EngineView, state: StrategyState, ydots: Sequence[torch.Tensor]) -> StrategyState:
        """Contract the tangents drawn up front with the output tangents now, when that keeps no more than
        they take: then backward needs neither the tangents nor to draw them again.

        With ``m`` differentiated output entries (1 for a loss), ``U = V^T Ydot`` (``n x m``) gives the
        estimate ``(1/k) V^T (Ydot ybar) = (1/k) U ybar`` in backward. Done when ``m <= k`` (U is no larger
        than the ``k x n`` tangents that existed during the pass), and not under torch.distributed, whose
        backward rebuilds the parameters' gradient from coefficients reduced over ranks.
        """
        assert isinstance(state, RandomState)
        drawn, state = state.drawn, dataclasses.replace(state, drawn=None)
        if drawn is None or engine.data_parallel or not ydots:
            return state
        if self.k == 1 and state.tangents is not None:  # kept, k = 1: U would cost what the kept tangent costs
            return state
        if any(d.is_complex() for d in ydots) or sum(d[0].numel() for d in ydots) > self.k:
            return state
        acc = accumulation_dtype(functools.reduce(torch.promote_types, [d.dtype for d in ydots]))
        rows = torch.cat([d.reshape(d.shape[0], -1).to(acc) for d in ydots], dim=1)  # Ydot: (k, m)
        contracted = tuple(
            None if not used  # (m, *leaf shape); k = m = 1: a scaled tangent, without tensordot's (1 x 1) mm
            else v.to(acc) * rows[0, 0] if rows.shape == (1, 1) else torch.tensordot(rows.T, v.to(acc), dims=1)
            for v, used in zip(drawn, engine.used, strict=True)
        )
        return dataclasses.replace(state, contracted=contracted, acc=acc, tangents=None)  # kept ones: not needed

    def contract(self, engine: EngineView, state: StrategyState, ydots: Sequence[torch.Tensor],
                 ybars: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor | None, StrategyState]:
        assert isinstance(state, RandomState)
        if state.contracted is not None:  # (finish) combine needs the cotangent itself: ybar, m entries
            acc = state.acc
            ybar = torch.cat([
                torch.zeros(d[0].numel(), dtype=acc, device=d.device) if b is None else b.reshape(-1).to(acc)
                for d, b in zip(ydots, ybars, strict=True)
            ])
            state = dataclasses.replace(state, ybar=ybar)
        return contract(ydots, ybars), state

    def combine(self, engine: EngineView, state: StrategyState, s: torch.Tensor | None, meta: Sequence[Meta],
                shared: Shared | None = None) -> list[torch.Tensor | None]:
        assert isinstance(state, RandomState)
        if state.contracted is not None and state.ybar is not None and shared is None and s is not None and s.numel():
            coef = state.ybar * (1.0 / self.k)
            return [
                combine_tangents(coef, u, dtype, reuse=False) if u is not None
                else torch.zeros(shape, dtype=dtype, device=coef.device)
                for u, (shape, dtype, _) in zip(state.contracted, meta, strict=True)
            ]
        if shared is not None:
            s = torch.zeros_like(shared.s) if s is None else s
        elif s is None or s.numel() == 0:  # no cotangent reached the outputs
            return zeros(meta)
        local = s * (1.0 / self.k)  # scale the k coefficients, not the n-element gradients
        coefs = [local] * len(meta)
        if shared is not None:  # parameters take the coefficients reduced over ranks (engine/distributed)
            coefs = [shared.s * (1.0 / self.k) if p else local for p in shared.params]
        kept = state.tangents
        # Regenerated tangents are ours to overwrite; kept ones may serve a second backward (retain_graph).
        reuse = kept is None and DISTRIBUTIONS[self.distribution].draw is not None
        # Under a process group, a parameter the segment did not read gets no gradient from it (None, not
        # zeros), so that its gradient from elsewhere is reduced as any other; the gradients of those it read
        # are recorded as reduced (left alone later if nothing else contributed to them).
        unread = [False] * len(meta) if shared is None else [
            bool(p) and not r for p, r in zip(shared.params, shared.reduction.read, strict=True)
        ]
        seed = engine.seed
        assert seed is not None
        grads = [
            None if skip
            else combine_tangents(coef, v, dtype, reuse=reuse) if v is not None
            else torch.zeros(shape, dtype=dtype, device=s.device)  # unused: an exact zero
            for coef, v, (shape, dtype, _), skip in zip(
                coefs, regenerate(self, seed, meta, engine.used, s.device, kept), meta, unread, strict=True
            )
        ]
        if shared is not None:
            shared.reduction.record(grads)
        return grads

    def seed_records(self, engine: EngineView, state: StrategyState, s: torch.Tensor | None, meta: Sequence[Meta],
                     shared: Shared | None = None) -> list[SeedRecord | None] | None:
        return seed_records(self, engine, s, meta, shared, 1.0 / self.k)

    def variance(self, stats: SegmentStats) -> float | None:
        n = stats.differentiated_numel or 0
        return DISTRIBUTIONS[self.distribution].variance(n, self.k) if n >= 1 else None

    def advice(self, stats: SegmentStats) -> list[str]:
        n = stats.differentiated_numel or 0
        if not n or self.k < n:
            return []
        return [
            f"k = {self.k} >= n = {n} differentiated scalars: Exact() gives the exact gradient with {n} "
            "tangents; use Exact() or a smaller k."
        ]

    @property
    def traceable(self) -> bool:
        return self.distribution in ("gaussian", "rademacher")  # plain elementwise draws inductor can generate

    def traced_tangents(self, name: str, leaves: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
        k = self.k
        if self.distribution == "gaussian":
            return [torch.randn((k, *t.shape), dtype=t.dtype, device=t.device) for t in leaves], 1.0 / k
        # randint, not bernoulli_: 2x faster eagerly and under inductor on CPU (benchmarks/RESULTS.md)
        signs = [torch.randint(0, 2, (k, *t.shape), dtype=t.dtype, device=t.device) * 2 - 1 for t in leaves]
        return signs, 1.0 / k
