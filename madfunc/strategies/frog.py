"""``Frog``: forward gradients from ``k`` random tangents, aggregated by the orthogonal projection on their span
(FROG, Flügel, Coquelin, Weiel, Debus, Streit and Götz, IJCNN 2025, arXiv 2410.17764) instead of their mean.

With ``V`` the ``n x k`` tangents (one column per tangent, stacked over every used differentiated input) and
``s = V^T g`` the ``k`` directional derivatives the forward passes give, the estimate is

    ``g^ = (n / r) V (V^T V)^+ s = (n / r) P g``,  ``P = V (V^T V)^+ V^T``,  ``r = rank V`` (``= min(k, n)``).

Law. ``P`` is the orthogonal projection on ``span V``. Gaussian ``V``, ``k <= n``: the span is uniformly
distributed among the ``k``-dimensional subspaces, so ``E[P] = (k/n) I`` (``E[P]`` commutes with every rotation,
and ``tr P = k``). Rademacher ``V``: ``E[P | r]`` commutes with every signed permutation, so it is diagonal and
constant, ``(r/n) I``. (``k > n``: ``P = I`` once ``r = n``.) Either way ``E[g^] = g``: the factor ``n/r``
makes the projection unbiased. With ``b = ||P g||^2 / ||g||^2`` (``E[b | r] = r/n``, as ``P^2 = P``),
``||g^ - g||^2 / ||g||^2 = ((n/r)^2 - 2 n/r) b + 1``, whose mean is ``E[n/r] - 1``: ``n/k - 1`` for ``k < n``,
0 (exact) for ``k >= n`` (Gaussian).
Gaussian ``Frog`` is thus distributed as ``Random(k, "orthogonal")``, which draws ``k`` orthonormal directions
jointly over all ``n`` scalars (a QR of ``n x k``); here the tangents stay i.i.d. (drawn and regenerated leaf
by leaf, lazily seeded when large) and the projection is a ``k x k`` solve. Rademacher ``V`` has ``r < k``
with probability below ``2^(k-n)`` (Odlyzko 1988), hence its law is ``n/k - 1`` within ``n 2^(k-n)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import ClassVar

import torch

from madfunc.core.autocast import without_autocast
from madfunc.strategies.base import EngineView, Meta, Passes, SegmentStats, Shared, Strategy, StrategyState, zeros
from madfunc.strategies.kernels import combine_tangents
from madfunc.strategies.random import RandomFields, check_distribution, parse_random_fields, push_random, regenerate

__all__ = ["Frog", "FrogState"]

GRAM_ENTRIES = 2**22  # the Gram matrix is summed over blocks of at most this many float64 tangent entries


@dataclasses.dataclass(frozen=True)
class FrogState(StrategyState):
    """What a ``Frog`` call keeps for backward: the Gram matrix when the tangents were drawn up front."""

    tangents: tuple[torch.Tensor, ...] | None = None  # seeding="kept": the forward pass's own tangents
    drawn: tuple[torch.Tensor, ...] | None = None  # drawn up front: finish sums the Gram matrix from them
    gram: torch.Tensor | None = None  # V^T V over the used inputs, (k, k) in float64

    def kept(self) -> Sequence[torch.Tensor | None]:
        return [*(self.tangents or ()), self.gram]


def gram(tangents: Iterable[torch.Tensor | None], k: int, device: torch.device) -> torch.Tensor:
    """``V^T V`` (``k x k``, float64) summed over the inputs' tangents ``(k, *shape)`` (None: unused, left out),
    in float64 blocks of at most ``GRAM_ENTRIES`` entries (so no input's tangents are copied whole)."""
    total = torch.zeros(k, k, dtype=torch.float64, device=device)
    for v in tangents:
        if v is not None:
            for block in v.reshape(k, -1).split(max(GRAM_ENTRIES // k, 1), dim=1):
                block = block.to(torch.float64)
                total.addmm_(block, block.T)
    return total


def solve(vtv: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x = (V^T V)^+ s`` and ``r = rank V`` from the eigendecomposition of the Gram matrix ``vtv``: a
    least-squares solve that stays defined when the tangents are dependent (``k > n``, or equal signs).
    Eigenvalues below ``k eps`` of the largest are zero (the rank tolerance of ``matrix_rank``)."""
    values, vectors = torch.linalg.eigh(vtv)
    keep = values > values[-1] * vtv.shape[0] * torch.finfo(vtv.dtype).eps
    rank = int(keep.sum())
    if rank == 0:
        return torch.zeros_like(s, dtype=vtv.dtype), 0
    values, vectors = values[keep], vectors[:, keep]
    return vectors @ ((vectors.T @ s.to(vtv.dtype)) / values), rank


@dataclasses.dataclass(frozen=True, repr=False)  # (RandomFields prints it)
class Frog(RandomFields, Strategy, kind="frog", fields=("K", "DISTRIBUTION", "SEEDING")):
    """Estimate the segment's gradient in forward mode from ``k`` random tangents, projected on their span.

    Where ``Random`` averages the ``k`` forward gradients, ``(1/k) V s``, FROG (Flügel et al., IJCNN 2025,
    arXiv 2410.17764) projects the gradient on the span of the tangents, ``V (V^T V)^-1 V^T g``, computed from
    the same ``s = V^T g``: the best estimate of ``g`` in that span. The projection is scaled by ``n/k`` (``n``
    the number of scalars the segment differentiates and reads), which makes it unbiased; its relative mean
    squared error ``E||g^ - g||^2 / ||g||^2`` is ``n/k - 1`` instead of Random's ``(n+1)/k`` (Gaussian), and its
    cosine with ``g`` is that of the projection. At ``k >= n`` the estimate is exact (once the tangents span all
``n`` directions: always for Gaussian ones). The cost beyond
    ``Random``: the ``k x k`` Gram matrix ``V^T V`` (``k^2 n`` float64 flops, ``k`` times Random's combination)
    and its solve. The module docstring derives the law.

    Args:
        k: number of tangents (forward passes, batched). Default: ``1`` (then the same as ``Random(1)`` up to
            the scale: ``n (g.v) v / ||v||^2``).
        distribution: ``"gaussian"`` or ``"rademacher"`` (``"orthogonal"`` tangents are their own projection:
            that is ``Random(k, "orthogonal")``). Default: ``"gaussian"``.
        seeding: when the tangents are drawn, as for ``Random``: ``"auto"``, ``"lazy"``, ``"eager"`` or
            ``"kept"``. Tangents drawn up front give the Gram matrix at the end of the forward pass; lazily
            seeded ones are drawn once more in backward for it. Default: ``"auto"``.

    Examples:
        >>> import torch, madfunc as mf
        >>> from madfunc.strategies.frog import Frog
        >>> Frog(k=8, distribution="rademacher")
        Frog(k=8, distribution='rademacher')
        >>> mf.Plan.from_string("layer=frog:8")["layer"]
        Frog(k=8, distribution='gaussian')
        >>> layer = mf.fwd(lambda w, x: torch.tanh(x @ w), name="layer")
        >>> x, w = torch.randn(4, 3), torch.randn(3, 2)
        >>> exact = torch.func.grad(lambda w: torch.tanh(x @ w).sum())(w)
        >>> g = mf.mixed_grad(lambda w: layer(w, x).sum(), {"layer": Frog(k=12)})(w)  # k >= n = 6: exact
        >>> torch.allclose(g, exact, atol=1e-5)
        True
    """

    k: int = 1
    distribution: str = "gaussian"
    seeding: str = "auto"
    stochastic: ClassVar[bool] = True

    @classmethod
    def _from_fields(cls, fields: list[str], where: str) -> Strategy:
        if len(fields) >= 2 and fields[1].lower() not in ("gaussian", "rademacher"):
            raise ValueError(f"{where}: Frog's distribution must be gaussian or rademacher, got {fields[1]!r}.")
        return cls(*parse_random_fields(fields, where, "frog"))

    def __post_init__(self) -> None:
        check_distribution("Frog", self.distribution, self.seeding, self.k)
        if self.distribution == "orthogonal":
            raise ValueError(
                f"Frog(distribution='orthogonal'): orthogonal tangents are their own projection; use Random(k="
                f"{self.k}, distribution='orthogonal'), or Frog with 'gaussian' (the same law) or 'rademacher'."
            )

    def push(self, engine: EngineView, tensors: Sequence[torch.Tensor], diff_tensors: Sequence[torch.Tensor],
             n: int) -> tuple[Passes, StrategyState]:
        passes, drawn = push_random(self, engine, tensors, diff_tensors, keep_drawn=True)
        return passes, FrogState(tangents=drawn.tangents, drawn=drawn.drawn)

    @without_autocast
    def finish(self, engine: EngineView, state: StrategyState, ydots: Sequence[torch.Tensor]) -> StrategyState:
        """The Gram matrix of the tangents drawn up front (the engine now knows which inputs were used)."""
        assert isinstance(state, FrogState)
        if state.drawn is None:  # lazily seeded: combine draws them again for it
            return state
        used = [v if u else None for v, u in zip(state.drawn, engine.used, strict=True)]
        return dataclasses.replace(state, drawn=None, gram=gram(used, self.k, state.drawn[0].device))

    @without_autocast
    def combine(self, engine: EngineView, state: StrategyState, s: torch.Tensor | None, meta: Sequence[Meta],
                shared: Shared | None = None) -> list[torch.Tensor | None]:
        assert isinstance(state, FrogState) and shared is None  # (shares_coefficients is False)
        if s is None or s.numel() == 0:  # no cotangent reached the outputs
            return zeros(meta)
        seed, kept = engine.seed, state.tangents
        assert seed is not None
        vtv = state.gram
        if vtv is None:  # lazily seeded: the tangents once more, for the Gram matrix
            vtv = gram(regenerate(self, seed, meta, engine.used, s.device, kept), self.k, s.device)
        x, rank = solve(vtv, s)
        if rank == 0:  # no used input (or all-zero tangents): nothing to project on
            return zeros(meta)
        n = sum(math.prod(shape) for (shape, _, _), u in zip(meta, engine.used, strict=True) if u)
        coef = x * (n / rank)  # scale the k coefficients, not the n-element gradients
        reuse = kept is None  # regenerated tangents are ours to overwrite; kept ones may serve a second backward
        return [
            combine_tangents(coef, v, dtype, reuse=reuse) if v is not None
            else torch.zeros(shape, dtype=dtype, device=s.device)  # unused: an exact zero
            for v, (shape, dtype, _) in zip(regenerate(self, seed, meta, engine.used, s.device, kept), meta,
                                            strict=True)
        ]

    def variance(self, stats: SegmentStats) -> float | None:
        n = stats.differentiated_numel or 0
        if n < 1:
            return None
        law = max(n / self.k - 1.0, 0.0)
        # Dependent signs (rank < k, probability < 2^(k-n)) move the law by at most n 2^(k-n): told when negligible.
        if self.distribution == "rademacher" and (self.k >= n or n * 2.0 ** (self.k - n) > 1e-3 * law):
            return None
        return law

    def advice(self, stats: SegmentStats) -> list[str]:
        n = stats.differentiated_numel or 0
        if not n or self.k < n:
            return []
        return [
            f"k = {self.k} >= n = {n} differentiated scalars: Frog's projection is then the exact gradient, which "
            f"Exact() gives with {n} tangents and no {self.k} x {self.k} solve; use Exact() or a smaller k."
        ]
