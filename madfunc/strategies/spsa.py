"""``SPSA``: zeroth-order gradients of a segment from central differences along ``k`` random directions
(Spall 1992; MeZO, Malladi et al. 2023), contracted as ``Random`` contracts its forward-mode derivatives.

Where ``Random`` pushes ``J v`` through the segment in forward mode, ``SPSA`` runs the segment plainly at
``theta + eps v`` and ``theta - eps v`` and takes ``(f(theta + eps v) - f(theta - eps v)) / (2 eps)``, so it
needs no derivative of any op: it differentiates integer or quantized kernels, ops without forward rules and
black-box code (a body that goes through NumPy). It draws the same directions as ``Random`` from the same
seed, contracts and combines as ``Random`` does (``Random.combine``: the gradient ``(1/k) sum_j s_j v_j`` is
drawn again from the seed in backward, leaf by leaf), and so agrees with it to ``O(eps^2)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from madfunc.core.checks import _common_device
from madfunc.core.functorch import is_wrapped
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
)
from madfunc.strategies.random import (
    LAZY_SEEDING_BYTES,
    Random,
    RandomState,
    check_distribution,
    parse_random_fields,
)
from madfunc.strategies.tangents import DISTRIBUTIONS, draw_leaf, draw_tangents, leaf_seed

__all__ = ["PRIMALS", "SPSA", "call_seed"]

# Where a call's outputs come from: a plain pass at theta (2k + 1 passes), or the mean of the first pair of
# perturbed passes, f(theta) + O(eps^2) (2k passes, MeZO's count).
PRIMALS = ("exact", "mean")


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names)


def call_seed(generator: torch.Generator, call: int = 1) -> int:
    """The tangent seed of the ``call``-th stochastic segment call (1-based, in the order they run) of the next
    transform call given ``generator=generator``, read without advancing ``generator``.

    Also ``SPSA.call_seed``. With it, :meth:`SPSA.directions` gives the directions that call draws (and
    ``Random`` with the same ``k`` and distribution draws the same ones). It follows ``engine/rng.py``'s
    ``TangentStream``: one number per transform call drawn from the generator, hashed with the call's index
    (``tests/strategies/test_spsa.py`` pins the two together).

    Examples:
        >>> import torch
        >>> from madfunc.strategies.spsa import call_seed
        >>> g = torch.Generator().manual_seed(0)
        >>> call_seed(g) == call_seed(g) != call_seed(g, 2)
        True
    """
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    base = int(torch.randint(0, 2**62, (), dtype=torch.int64, generator=copy))
    return leaf_seed(base, call)


def _check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"SPSA(eps=...): expected a positive float, got {type(eps).__name__} {eps!r}.")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(
            f"SPSA(eps={eps!r}): eps must be a finite float > 0 (the perturbation's size along each direction); "
            "1e-3 is MeZO's default."
        )
    return float(eps)


def _parse_eps(text: str, where: str) -> float:
    try:
        eps = float(text)
    except ValueError:
        eps = math.nan
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{where}: spsa:K:EPS: EPS must be a float > 0 (e.g. 1e-3), got {text!r}.")
    return eps


@dataclasses.dataclass(frozen=True, repr=False)
class SPSA(Strategy, kind="spsa", fields=("K", "EPS", "DISTRIBUTION", "SEEDING", "PRIMAL")):
    """Estimate the segment's gradient from central differences along ``k`` random directions (zeroth order).

    For each direction ``v_j`` the segment runs at ``theta + eps v_j`` and ``theta - eps v_j`` (``theta``: its
    differentiated inputs, parameters and activations alike); ``d_j = (f(theta + eps v_j) - f(theta - eps
    v_j)) / (2 eps)`` takes the place of ``J v_j``, and the estimate is ``(1/k) sum_j (d_j . ybar) v_j``, as
    ``Random``'s. A whole model as one ``SPSA(k=1)`` segment trained with SGD is MeZO (Malladi et al. 2023,
    arXiv 2305.17333). It needs no derivative of any op, so it differentiates what forward mode cannot:
    integer or quantized kernels, ops without forward rules, black-box code. It runs the segment ``2k + 1``
    times (its outputs come from a plain pass at ``theta``; ``primal="mean"`` saves that pass); each pass sees
    the random numbers of the first (dropout), and side effects (module buffers, caches) happen once, as for
    one plain call.

    It draws the directions ``Random(k, distribution)`` draws from the same seed, so for a smooth segment the
    two estimates differ by ``O(eps^2)`` (the third derivatives along ``v``): in float64, a difference far above
    that is finite-difference error of another kind (a kink, a discrete op), not sampling noise. Its variance
    law is ``Random``'s as ``eps -> 0``. In float32 or lower precision, the differences lose
    ``log10(|f| / (eps |J v|))`` digits to cancellation: keep ``eps`` well above the dtype's resolution.

    Memory: a perturbed input is substituted where an op reads it, its direction drawn from the seed there and
    overwritten by ``theta + eps v``, so one input-sized buffer exists at a time (what MeZO's in-place
    perturbation needs for its ``z``; the perturbed model never exists as a whole, and the inputs are never
    written to). Small
    segments (``"eager"`` seeding) draw all directions on entry and perturb all inputs at once (faster).

    Args:
        k: number of random directions (``2k`` extra passes). Default: ``1``.
        eps: the perturbation's size along each direction, ``> 0``. Default: ``1e-3``.
        distribution: ``"gaussian"``, ``"rademacher"`` or ``"orthogonal"``, as for :class:`Random`.
            Default: ``"gaussian"``.
        seeding: ``"lazy"`` substitutes each input's perturbed value where an op uses it (drawing its
            ``k`` directions there, once per use and pass: ``k`` times the draws of ``"eager"``); ``"eager"``
            draws all directions on entry and perturbs all inputs at once; ``"kept"`` does that and keeps
            them for backward; ``"auto"`` is lazy when the ``k`` directions of all inputs exceed 32 MiB.
            ``"orthogonal"`` directions are always drawn on entry. Default: ``"auto"``.
        primal: where the segment's outputs come from. ``"exact"``: a plain pass at ``theta`` (``2k + 1``
            passes; side effects from it). ``"mean"``: ``(f(theta + eps v_1) + f(theta - eps v_1)) / 2``, which
            is ``f(theta) + O(eps^2)``, in ``2k`` passes (MeZO's count; MeZO reports ``f(theta + eps z)``);
            integer outputs and module buffers (BatchNorm's statistics) are those of the ``theta + eps v_1``
            pass, ``O(eps)`` away from a plain call's. Default: ``"exact"``.

    Examples:
        >>> import madfunc as mf
        >>> mf.SPSA(k=4, eps=1e-4)
        SPSA(k=4, eps=0.0001, distribution='gaussian')
        >>> mf.Plan.from_string("f=spsa:2:1e-3:rademacher")["f"]
        SPSA(k=2, eps=0.001, distribution='rademacher')
    """

    k: int = 1
    eps: float = 1e-3
    distribution: str = "gaussian"
    seeding: str = "auto"
    primal: str = "exact"
    stochastic: ClassVar[bool] = True
    # Every rank draws the same directions of the parameters, so their gradient is the directions combined with
    # the coefficients reduced over ranks (engine/distributed), as for Random.
    shares_coefficients: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_distribution("SPSA", self.distribution, self.seeding, self.k)
        if self.primal not in PRIMALS:
            raise ValueError(f"SPSA(primal={self.primal!r}): unknown primal; expected one of {_quoted(PRIMALS)}.")
        object.__setattr__(self, "eps", _check_eps(self.eps))

    def __repr__(self) -> str:
        extra = "" if self.seeding == "auto" else f", seeding={self.seeding!r}"
        extra += "" if self.primal == "exact" else f", primal={self.primal!r}"
        return f"SPSA(k={self.k}, eps={self.eps!r}, distribution={self.distribution!r}{extra})"

    def to_string(self) -> str:
        extra = "" if self.seeding == "auto" and self.primal == "exact" else f":{self.seeding}"
        extra += "" if self.primal == "exact" else f":{self.primal}"
        return f"spsa:{self.k}:{self.eps!r}:{self.distribution}{extra}"

    @classmethod
    def _from_fields(cls, fields: list[str], where: str) -> Strategy:
        k = positive_int(fields[0], where, "K", "spsa:K") if fields else 1
        eps = _parse_eps(fields[1], where) if len(fields) >= 2 else 1e-3
        _, distribution, seeding = parse_random_fields(["1", *fields[2:4]], where, "spsa")
        primal = fields[4].lower() if len(fields) >= 5 else "exact"
        if primal not in PRIMALS:
            raise ValueError(f"{where}: unknown primal {primal!r}; valid: {', '.join(PRIMALS)}.")
        return cls(k, eps, distribution, seeding, primal)

    call_seed = staticmethod(call_seed)  # (also here, so that the API reference shows it with the class)

    def _twin(self) -> Random:
        """The ``Random`` strategy that draws the same directions (and combines them the same way)."""
        return Random(self.k, self.distribution, "kept" if self.seeding == "kept" else "eager")

    def directions(self, seed: int, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The directions a call with tangent seed ``seed`` draws for differentiated inputs like ``tensors``: one
        tensor ``(k, *t.shape)`` per input, row ``j`` being ``v_j`` on that input.

        ``tensors`` are the segment's differentiated inputs in the engine's order: its argument tensors as
        optree flattens them (a dict's keys sorted), then the parameters and tensors it reads from outside
        its arguments. ``seed``: ``SPSA.call_seed(generator)``. The call's scalar ``s_j`` (for a loss segment,
        ``(l(theta + eps v_j) - l(theta - eps v_j)) / (2 eps)``) is, for k = 1, ``<g, v> / ||v||^2``.

        Examples:
            >>> import torch, madfunc as mf
            >>> [v.shape for v in mf.SPSA(k=2).directions(7, [torch.zeros(3), torch.zeros(2, 2)])]
            [torch.Size([2, 3]), torch.Size([2, 2, 2])]
        """
        if not tensors:
            return []
        device = tensors[0].device
        return draw_tangents(self.distribution, self.k, [t.shape for t in tensors], [t.dtype for t in tensors],
                             device, seed)

    def push(self, engine: EngineView, tensors: Sequence[torch.Tensor], diff_tensors: Sequence[torch.Tensor],
             n: int) -> tuple[Passes, StrategyState]:
        law = DISTRIBUTIONS[self.distribution]
        if law.draw is None and self.k > n:
            raise ValueError(
                f"segment {engine.name!r}: {self!r} needs k <= n, the number of differentiated scalars, which is "
                f"{n}; use k <= {n}."
            )
        engine.stats.tangents = self.k
        seed, device = engine.seed, _common_device(engine.name, diff_tensors)
        assert seed is not None  # (a stochastic strategy's call always has one)
        tangent_bytes = self.k * sum(t.numel() * t.element_size() for t in diff_tensors)
        lazy = law.draw is not None and (
            self.seeding == "lazy" or (self.seeding == "auto" and tangent_bytes >= LAZY_SEEDING_BYTES)
        )
        drawn = None if lazy else tuple(self.directions(seed, diff_tensors))
        exact = self.primal == "exact"
        used = [True] * len(diff_tensors)  # until a watched pass has seen which inputs the body reads
        if exact:
            engine.begin_pass()
            ys, buffers = engine.perturbed_pass(tensors, None, watch=True)  # the call's outputs and effects
            used[:] = engine.used

        def perturb(j: int, step: float):
            def at(i: int, x: torch.Tensor) -> torch.Tensor:
                if not used[i]:
                    return x
                if drawn is not None:
                    return torch.add(x, drawn[i][j], alpha=step)
                # Drawn here and ours: the perturbed value overwrites it (one leaf-sized buffer, as MeZO's in-place
                # perturbation needs), computed as MeZO computes it (p.add_(z, alpha=eps)).
                v = draw_leaf(self.distribution, self.k, x.shape, x.dtype, device, seed, i)[j]
                if is_wrapped(x):  # (under an outer vmap or grad: out= cannot take a functorch tensor's result)
                    return torch.add(x, v, alpha=step)
                return torch.add(x, v, alpha=step, out=v)
            return at

        rows: list[list[torch.Tensor]] = []
        for j in range(self.k):
            first = not exact and j == 0  # primal="mean": this pair gives the outputs, its first pass the reads
            engine.begin_pass()
            plus, plus_buffers = engine.perturbed_pass(tensors, perturb(j, self.eps), at_use=lazy, watch=first)
            if first:
                used[:] = engine.used
            engine.begin_pass()
            minus = engine.perturbed_pass(tensors, perturb(j, -self.eps), at_use=lazy)[0]
            if first:
                ys, buffers = [_mean(p, m) for p, m in zip(plus, minus, strict=True)], plus_buffers
            rows.append([_difference(p, m, self.eps) for p, m in zip(plus, minus, strict=True)])
            del plus, minus, plus_buffers
        ydots = [torch.stack(column) for column in zip(*rows, strict=True)]
        state = RandomState(tangents=drawn if self.seeding == "kept" else None)
        return (ys, ydots, buffers), state

    def combine(self, engine: EngineView, state: StrategyState, s: torch.Tensor | None, meta: Sequence[Meta],
                shared: Shared | None = None) -> list[torch.Tensor | None]:
        return self._twin().combine(engine, state, s, meta, shared)

    def seed_records(self, engine: EngineView, state: StrategyState, s: torch.Tensor | None, meta: Sequence[Meta],
                     shared: Shared | None = None) -> list[SeedRecord | None] | None:
        """``combine``'s gradients deferred as Random's are (same directions, same ``(1/k) sum_j s_j v_j``)."""
        return self._twin().seed_records(engine, state, s, meta, shared)

    def variance(self, stats: SegmentStats) -> float | None:
        """``Random``'s law, which SPSA's relative variance tends to as ``eps -> 0``: a smooth segment's finite
        differences are ``J v + O(eps^2)``."""
        return self._twin().variance(stats)

    def advice(self, stats: SegmentStats) -> list[str]:
        n = stats.differentiated_numel or 0
        if not n or self.k < n:
            return []
        return [
            f"k = {self.k} >= n = {n} differentiated scalars: Exact() gives the exact gradient with {n} "
            "tangents where forward mode applies; otherwise a smaller k costs fewer passes."
        ]


def _mean(plus: torch.Tensor, minus: torch.Tensor) -> torch.Tensor:
    """``(f(theta + eps v) + f(theta - eps v)) / 2 = f(theta) + O(eps^2)`` of one output (``primal="mean"``); an
    integer output as the first pass left it."""
    if not (plus.is_floating_point() or plus.is_complex()):
        return plus
    return torch.add(plus, minus).mul_(0.5)


def _difference(plus: torch.Tensor, minus: torch.Tensor, eps: float) -> torch.Tensor:
    """``(f(theta + eps v) - f(theta - eps v)) / (2 eps)`` of one output; zeros for an integer output (no
    derivative: the engine drops it)."""
    if not (plus.is_floating_point() or plus.is_complex()):
        return torch.zeros(plus.shape, device=plus.device)
    return (plus - minus).div_(2 * eps)  # as MeZO writes it, so that the two agree to the last bit
